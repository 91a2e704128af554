"""The keyframe-based tracking front end (in the manner of DeepV2D's SLAM system).

    system = SlamSystem(model, cfg, intrinsics, (H, W), calibrated=True)
    for rgb in frames:                 # (H, W, 3) uint8 at the network size
        system.add_frame(rgb)
    result = system.finish()           # poses of every frame, keyframes, per-frame status

How a video is processed:

- Initialisation: frames are buffered until `slam.init_frames` frames spaced `slam.init_rate`
  apart exist; the V2D model (depth from the depth module with identity poses, then
  `model.iters` unfixed pose/depth rounds) gives the first keyframe's depth and the set's poses,
  which seed the tracking of the buffered frames.
- Tracking: each frame is aligned to the current keyframe by the motion module (keyframe depth
  fixed, keyframe mode, constant-velocity initial pose). The flow the keyframe's depth induces,
  the mean flow confidence, the visible fraction of the keyframe (overlap) and the
  confidence-weighted flow residual describe the result.
- Keyframes: a frame becomes a keyframe when the induced flow passes `slam.keyframe_flow`, or when
  confidence or overlap drop below `slam.min_confidence` / `slam.min_overlap` (only once the flow
  is a quarter of the threshold, so a hard stretch does not make every frame a keyframe). Its
  initial depth is the previous keyframe's depth splatted into it; the window is optimised (below),
  the depth module computes the keyframe's depth from frames spread over the recorded ones (with
  `slam.scale_lock`, rescaled to agree with the window's splatted depth; with
  `slam.fuse_tolerance`, averaged with it where they agree) and, with
  `slam.depth_timing: both`, recomputes the previous keyframe's depth with the frames after it.
- Local window: global-mode Gauss-Newton over the last `slam.window` keyframes (every ordered pair
  an edge, the oldest `slam.window_fixed` poses fixed; uncalibrated runs also optimise the focal
  length). Frames keep their pose relative to their keyframe, so they follow the window.
- Dense bundle adjustment (`slam.ba_iterations`, DIS flow only): after the depth module, the
  window keyframes' poses and per-pixel inverse depths are optimised jointly against their DIS
  flow to each other (`v2d.geometry.window_ba`: Gauss-Newton with the pixels eliminated by the
  Schur complement; the depth module's depth, locked and fused, is the prior). The network's depth
  only has to be right where the flow carries no parallax, and the map's scale is carried by the
  triangulated structure of many keyframes. Joint, not alternating: depth-then-poses (block
  coordinate descent) creeps along the direction where depth and translation change together,
  which is the scale that drifts (7-Scenes ATE 6.83 / 5.21 / 4.64 / 4.09 cm with 1 / 2 / 3 / 5
  rounds of alternation; 3.9 cm jointly in 2 steps, at higher speed).
- Lost tracking: below `slam.lost_confidence` / `slam.lost_overlap`, above `slam.lost_residual`
  or non-finite, the frame is tracked again from the keyframe's pose (re-initialised against the
  last good keyframe); if that fails too it is marked lost and holds the last good pose. After
  `slam.relocalise_after` lost frames in a row, the current frame becomes a new keyframe with
  single-image depth scaled to the last keyframe's median (a restart; reported).
- Memory: only the window's keyframes keep full-size images and depth; a keyframe leaving the
  window is handed to `on_keyframe` (the run loop writes its depth) and kept as a strided depth and
  colour image for the point cloud; the image buffer holds at most `slam.buffer_frames` frames.

All poses are world->camera (`poses_cw`, lietorch layout), float64 in the store; the networks run
in float32 on poses expressed relative to a keyframe (small numbers, no precision loss far from
the origin).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from slam.config import RunConfig
from slam.fusion import splat_depth
from v2d.errors import ShapeError, V2DError
from v2d.geometry.camera import backproject, pixel_grid, project, reproject, scale_intrinsics, valid_reprojection
from v2d.geometry.lie import se3_act, se3_identity, se3_inv, se3_mul
from v2d.geometry.window_ba import WindowBAOptions, window_bundle_adjust
from v2d.model import V2D, normalize_images

__all__ = ["SlamSystem", "SlamResult", "FrameState", "Keyframe", "TrackQuality", "release_heap"]

_log = logging.getLogger(__name__)


@dataclass
class TrackQuality:
    """How well a frame is aligned to its keyframe (pixel values at the network size)."""

    flow: float = 0.0  # mean flow the keyframe's depth induces in the frame (pose distance)
    confidence: float = 0.0  # mean flow confidence over the keyframe's visible pixels
    overlap: float = 0.0  # fraction of keyframe pixels visible in the frame
    residual: float = 0.0  # confidence-weighted RMS of (target - reprojection)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class FrameState:
    """One input frame: its keyframe, pose relative to it and flags."""

    keyframe: int  # keyframe id whose pose this frame's pose is relative to
    rel_cw: torch.Tensor  # (7,) float64: T_frame * T_keyframe^-1
    quality: TrackQuality = field(default_factory=TrackQuality)
    lost: bool = False
    static: bool = False
    textureless: bool = False
    is_keyframe: bool = False


@dataclass
class Keyframe:
    """A keyframe. `image`/`depth` are full size while in the window, None afterwards."""

    frame: int
    pose_cw: torch.Tensor  # (7,) float64
    image: np.ndarray | None  # (H, W, 3) uint8
    depth: torch.Tensor | None  # (H, W) float32
    valid: torch.Tensor | None = None  # (H, W) bool: depth known (False in splatting holes)
    small_depth: np.ndarray | None = None  # (H/s, W/s) float32 after leaving the window
    small_image: np.ndarray | None = None  # (H/s, W/s, 3) uint8
    motion_feats: torch.Tensor | None = None  # (F, H/4, W/4), learned flow only
    prior: torch.Tensor | None = None  # (H, W) float32: the depth module's depth, locked and fused (the BA prior)


@dataclass
class SlamResult:
    """Everything the run loop writes.

    Shapes: poses_cw (N, 7) float64 for every frame; keyframe_frames (K,) frame indices;
    keyframe_poses_cw (K, 7); cloud_depths K x (h, w) float32 and cloud_images K x (h, w, 3)
    uint8 at stride `cloud_stride`; intrinsics (4,) float64 at the network size.
    """

    poses_cw: torch.Tensor
    frames: list[FrameState]
    keyframe_frames: list[int]
    keyframe_poses_cw: torch.Tensor
    cloud_depths: list[np.ndarray]
    cloud_images: list[np.ndarray]
    cloud_stride: int
    intrinsics: torch.Tensor
    restarts: int
    warnings: list[str]


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """K x (H, W, 3) uint8 -> (K, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


_LOCK_STRIDE = 4  # pixel stride of the scale lock's splats


def release_heap() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Tracking allocates and frees many image-sized tensors; glibc keeps the freed pages, and their
    fragmentation lets the peak creep up over a long video (measured: RSS 569 -> 385 MB after
    trimming at the end of a 1000-frame run). Called when a keyframe leaves the window and before
    the output phase.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _unit(T: torch.Tensor) -> torch.Tensor:
    """The pose with its quaternion renormalised (float32 network poses drift off unit length, and
    products of slightly non-unit quaternions compound: a constant-velocity guess cubes the error).

    Shapes: (..., 7) -> (..., 7) float64.
    """
    T = T.double()
    return torch.cat([T[..., :3], T[..., 3:] / T[..., 3:].norm(dim=-1, keepdim=True)], dim=-1)


def _texture(image: np.ndarray) -> float:
    """Mean absolute grey-level gradient per pixel (Sobel, normalised to grey levels per pixel)."""
    import cv2

    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.mean(np.abs(gx) + np.abs(gy)) / 8.0)


class SlamSystem:
    """Keyframe tracking, local-window optimisation and keyframe depth over a stream of frames.

    Args:
        model: the V2D model (eval mode); its depth and motion modules are used.
        cfg: the full configuration (`slam`, `gn`, `motion`, `model` sections).
        intrinsics: (4,) fx, fy, cx, cy at the frame size (the initial guess when uncalibrated).
        size: (H, W) of the frames given to `add_frame`.
        calibrated: False optimises the focal length (init and window) from `intrinsics`.
        on_keyframe: called as on_keyframe(frame_index, depth (H, W) float32 ndarray, pose_cw (7,),
            image (H, W, 3) uint8) when a keyframe's depth is final (it left the window, or at `finish`).
    """

    def __init__(self, model: V2D, cfg: RunConfig, intrinsics: torch.Tensor, size: tuple[int, int],
                 calibrated: bool = True,
                 on_keyframe: Callable[[int, np.ndarray, torch.Tensor, np.ndarray], None] | None = None
                 ) -> None:
        intr = torch.as_tensor(intrinsics, dtype=torch.float64)
        if intr.shape != (4,) or not bool(torch.isfinite(intr).all()) or bool((intr[:2] <= 0).any()):
            raise ShapeError(f"intrinsics: expected (4,) finite fx, fy > 0, cx, cy; got {intrinsics}")
        self.model, self.cfg, self.sc = model, cfg, cfg.slam
        self.H, self.W = size
        self.intr = intr
        self.calibrated = calibrated
        self.on_keyframe = on_keyframe
        self.source = cfg.motion.flow_source
        self.frames: list[FrameState] = []
        self.keyframes: list[Keyframe] = []
        self.window: list[int] = []  # keyframe ids, oldest first
        self.buffer: OrderedDict[int, np.ndarray] = OrderedDict()  # frame index -> image
        self.pending: list[np.ndarray] = []  # frames before initialisation
        self.dis_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.feat_cache: dict[int, torch.Tensor] = {}  # frame index -> depth features (C, H/4, W/4)
        self.init_poses: dict[int, torch.Tensor] = {}
        self.lost_run = 0
        self.lost_count = 0
        self.restarts = 0
        self.finished = False
        self.warnings: list[str] = []
        self._prev_coords: torch.Tensor | None = None
        self._grid = pixel_grid(self.H, self.W, dtype=torch.float32)
        self.px = self.W / 320.0  # pixel thresholds are given for 320-wide frames
        gn = cfg.gn
        # tracking: the keyframe fixed, the focal length fixed (two frames do not determine it well)
        self.track_gn = gn.options(fixed_poses=1, optimize_focal=False)
        self.track_outer = cfg.motion.iterations
        if self.source == "dis":  # targets do not change between outer iterations: one call, all steps
            self.track_gn = dataclasses.replace(self.track_gn, iterations=gn.iterations * cfg.motion.iterations)
            self.track_outer = 1

    # ------------------------------------------------------------------------------------ helpers
    @property
    def initialised(self) -> bool:
        return bool(self.keyframes)

    def frame_pose(self, f: int) -> torch.Tensor:
        """World->camera pose of frame f (7,) float64."""
        st = self.frames[f]
        return se3_mul(st.rel_cw, self.keyframes[st.keyframe].pose_cw)

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            _log.warning(message)
            self.warnings.append(message)

    @torch.no_grad()
    def _depth_of(self, image: np.ndarray, views: list[np.ndarray], rel_poses: torch.Tensor,
                  frames: list[int] | None = None) -> torch.Tensor:
        """Depth module on a keyframe and its views. rel_poses (V, 7): T_view * T_key^-1. -> (H, W).

        `frames` (the keyframe's and the views' frame indices) lets the depth features of frames
        seen before come from the cache (a frame serves several cost volumes).
        """
        images = [image] + views
        if frames is None:
            feats = self.model.depth.features(normalize_images(_to_tensor(images)))
        else:
            new = [k for k, f in enumerate(frames) if f not in self.feat_cache]
            if new:
                computed = self.model.depth.features(normalize_images(_to_tensor([images[k] for k in new])))
                for k, ft in zip(new, computed, strict=True):
                    self.feat_cache[frames[k]] = ft
            feats = torch.stack([self.feat_cache[f] for f in frames])
        feats = feats[None]
        poses = torch.cat([se3_identity((1,), dtype=torch.float64), rel_poses]).float()[None]
        return self.model.depth(feats, poses, self.intr.float()[None], (self.H, self.W))[-1][0]

    def _motion_feats(self, image: np.ndarray) -> torch.Tensor:
        return self.model.motion.features(normalize_images(_to_tensor([image])))[0]

    def _dis(self, a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from v2d.flow import dis_targets

        return dis_targets(a, b, self.cfg.motion.dis)

    # ------------------------------------------------------------------------------------ public
    def add_frame(self, image: np.ndarray) -> FrameState | None:
        """Process the next frame; returns its state (None while initialisation is pending).

        Shapes: image (H, W, 3) uint8 RGB at the configured size.
        """
        if self.finished:
            raise V2DError("add_frame: this run has finished; start a new SlamSystem")
        if image.shape != (self.H, self.W, 3) or image.dtype != np.uint8:
            raise ShapeError(f"frame: expected ({self.H}, {self.W}, 3) uint8, got {image.shape} {image.dtype}")
        if not self.initialised:
            self.pending.append(image)
            if len(self.pending) >= (self.sc.init_frames - 1) * self.sc.init_rate + 1:
                self._initialise()
            return None
        return self._process(image)

    def finish(self) -> SlamResult:
        """Flush initialisation (short videos), finalise the window and return the result."""
        if self.finished:
            raise V2DError("finish: this run has already finished")
        if not self.initialised:
            if len(self.pending) < 2:
                raise ShapeError(f"a run needs at least 2 frames, got {len(self.pending)}")
            self._initialise()
        last = self.window[-1]
        if self.sc.depth_timing == "both" and len(self.frames) - 1 > self.keyframes[last].frame:
            self._refine_depth(last)  # the last keyframe's depth with the frames recorded after it
            if self.sc.ba_iterations > 0 and self.source == "dis":
                self._bundle_adjust()  # the recomputed depth is refined like every other
        for k in list(self.window):
            self._finalise(k)
        self.window = []
        poses = torch.stack([self.frame_pose(f) for f in range(len(self.frames))])
        self._report_flags()
        self.finished = True
        return SlamResult(
            poses_cw=poses, frames=self.frames,
            keyframe_frames=[k.frame for k in self.keyframes],
            keyframe_poses_cw=torch.stack([k.pose_cw for k in self.keyframes]),
            cloud_depths=[k.small_depth for k in self.keyframes],
            cloud_images=[k.small_image for k in self.keyframes],
            cloud_stride=self.sc.cloud_stride, intrinsics=self.intr.clone(), restarts=self.restarts,
            warnings=self.warnings)

    # ------------------------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def _initialise(self) -> None:
        frames, rate = self.pending, self.sc.init_rate
        chosen = list(range(0, len(frames), rate))
        if len(chosen) < 2:
            chosen = list(range(len(frames)))
        x = _to_tensor([frames[i] for i in chosen])
        out = self.model(x, self.intr.float(), optimize_focal=not self.calibrated)
        poses, depth, intr = _unit(out.poses[-1]), out.depths[-1][-1][0], out.intrinsics[-1].double()
        if not (torch.isfinite(poses).all() and torch.isfinite(depth).all() and torch.isfinite(intr).all()):
            self._warn("initialisation produced non-finite values; starting from identity poses and "
                       "single-image depth")
            poses = se3_identity((len(chosen),), dtype=torch.float64)
            depth = self._depth_of(frames[0], [frames[0]], se3_identity((1,), dtype=torch.float64))
            if not bool(torch.isfinite(depth).all()):
                depth = torch.full_like(depth, self.cfg.model.init_depth)
        else:
            self.intr = intr
        kf = Keyframe(frame=0, pose_cw=se3_identity((), dtype=torch.float64), image=frames[0],
                      depth=depth.float(), valid=torch.ones_like(depth, dtype=torch.bool), prior=depth.float())
        if self.source == "learned":
            kf.motion_feats = self._motion_feats(frames[0])
        self.keyframes.append(kf)
        self.window.append(0)
        self.init_poses = {i: poses[c] for c, i in enumerate(chosen)}
        self.frames.append(FrameState(keyframe=0, rel_cw=se3_identity((), dtype=torch.float64), is_keyframe=True,
                                      quality=TrackQuality(confidence=1.0, overlap=1.0),
                                      textureless=_texture(frames[0]) < self.sc.min_texture))
        self.buffer[0] = frames[0]
        pending, self.pending = frames[1:], []
        for image in pending:
            self._process(image)
        self.init_poses = {}

    # ------------------------------------------------------------------------------------ tracking
    @torch.no_grad()
    def _track(self, image: np.ndarray, rel_init: torch.Tensor) -> tuple[torch.Tensor, TrackQuality, torch.Tensor]:
        """Align a frame to the current keyframe. Returns rel pose (7,) float64, quality, coords (H, W, 2)."""
        kf = self.keyframes[self.window[-1]]
        images = _to_tensor([kf.image, image])[None]
        poses = torch.stack([se3_identity((), dtype=torch.float64), rel_init]).float()[None]
        inv = (1.0 / kf.depth.clamp_min(1e-3))[None, None]
        ii, jj = torch.tensor([0]), torch.tensor([1])
        dis = feats = None
        if self.source == "dis":
            t, w = self._dis(kf.image, image)
            t, w = t[None, None], (w * kf.valid[..., None])[None, None]
            # two passes: the second re-weights each target by its residual after the first (Cauchy)
            steps = self.model.motion(images, None, poses, inv, self.intr.float()[None], ii, jj, dis=(t, w),
                                      gn=self.track_gn, iterations=1)
            w = self._reweight(t[0], w[0], inv[0], steps[-1].poses_cw[0], ii, jj)[None]
            poses = steps[-1].poses_cw
            dis = (t, w)
        else:
            feats = torch.stack([kf.motion_feats, self._motion_feats(image)])[None]
        steps = self.model.motion(images, feats, poses, inv, self.intr.float()[None], ii, jj, dis=dis,
                                  gn=self.track_gn, iterations=self.track_outer)
        rel = _unit(steps[-1].poses_cw[0, 1])
        quality, coords = self._quality(steps[-1].targets[0, 0], steps[-1].weights[0, 0], kf.depth, rel)
        return rel, quality, coords

    def _reweight(self, targets: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, poses: torch.Tensor,
                  ii: torch.Tensor, jj: torch.Tensor) -> torch.Tensor:
        """Weights times a Cauchy factor 1 / (1 + (r / robust_scale)^2) of each target's residual r.

        DIS flow has no learned confidence; its forward-backward check passes consistent but wrong
        matches (repeated texture, large displacements), which pull a least-squares solution away.
        Shapes: targets, weights (E, H, W, 2); inv (E, H, W); poses (N, 7) float32 -> (E, H, W, 2).
        """
        coords, depth_j = reproject(inv, poses[ii], poses[jj], self.intr.float())
        valid = valid_reprojection(inv, coords, depth_j, self.cfg.gn.min_depth)
        r2 = ((targets - coords) ** 2).sum(-1) / (self.sc.robust_scale * self.px) ** 2
        factor = torch.where(valid & torch.isfinite(r2), 1.0 / (1.0 + r2.nan_to_num(0.0)), torch.zeros_like(r2))
        return weights * factor[..., None]

    def _quality(self, targets: torch.Tensor, weights: torch.Tensor, depth: torch.Tensor, rel: torch.Tensor
                 ) -> tuple[TrackQuality, torch.Tensor]:
        """Quality of an alignment; targets/weights (h, w, 2) at the flow's resolution.

        Returns the quality and the keyframe pixels' coordinates in the frame (h, w, 2), in pixels of
        the network size (for the static-camera test).
        """
        h, w = targets.shape[:2]
        ratio = self.W / w
        intr = scale_intrinsics(self.intr.float(), w / self.W, h / self.H)
        d = depth if (h, w) == (self.H, self.W) else F.interpolate(depth[None, None], size=(h, w),
                                                                   mode="bilinear", align_corners=False)[0, 0]
        inv = 1.0 / d.clamp_min(1e-3)
        identity = se3_identity((), dtype=torch.float32)
        coords, depth_j = reproject(inv, identity, rel.float(), intr)
        valid = valid_reprojection(inv, coords, depth_j, self.cfg.gn.min_depth)
        if not bool(torch.isfinite(rel).all()):
            return TrackQuality(flow=math.inf, residual=math.inf), coords
        n = valid.sum().clamp_min(1)
        grid = self._grid if ratio == 1 else pixel_grid(h, w, dtype=torch.float32)
        flow = float(((coords - grid).norm(dim=-1) * valid).sum() / n) * ratio
        wv = weights[..., 0] * valid
        conf = float(wv.sum() / n)
        err = ((targets - coords).nan_to_num(0.0) ** 2).sum(-1)
        residual = float(torch.sqrt((wv * err).sum() / wv.sum().clamp_min(1e-6))) * ratio
        return TrackQuality(flow, conf, float(valid.float().mean()), residual), coords * ratio

    def _is_lost(self, q: TrackQuality) -> bool:
        s = self.sc
        if not all(math.isfinite(v) for v in (q.flow, q.confidence, q.overlap, q.residual)):
            return True
        return q.overlap < s.lost_overlap or q.confidence < s.lost_confidence or q.residual > s.lost_residual * self.px

    def _process(self, image: np.ndarray, may_promote: bool = True) -> FrameState:
        f = len(self.frames)
        kid = self.window[-1]
        kf_pose = self.keyframes[kid].pose_cw
        if f in self.init_poses:  # the initialisation's pose (keyframe 0 is the identity)
            rel_init = se3_mul(self.init_poses[f], se3_inv(kf_pose))
        else:  # constant velocity from the last two frames
            prev = self.frame_pose(f - 1)
            before = self.frame_pose(f - 2) if f >= 2 else prev
            guess = se3_mul(se3_mul(prev, se3_inv(before)), prev)
            rel_init = _unit(se3_mul(guess, se3_inv(kf_pose)))
        rel, q, coords = self._track(image, rel_init)
        lost = self._is_lost(q)
        if lost:  # re-initialise against the last good keyframe: start from its pose
            rel2, q2, coords2 = self._track(image, se3_identity((), dtype=torch.float64))
            if not self._is_lost(q2) or q2.residual < q.residual:
                rel, q, coords = rel2, q2, coords2
            lost = self._is_lost(q)
        state = FrameState(keyframe=kid, rel_cw=rel, quality=q, lost=lost,
                           textureless=_texture(image) < self.sc.min_texture)
        if lost:
            last = next((s for s in reversed(self.frames) if not s.lost), self.frames[0])
            state.rel_cw = se3_mul(se3_mul(last.rel_cw, self.keyframes[last.keyframe].pose_cw), se3_inv(kf_pose))
            self.lost_run += 1
            self.lost_count += 1
            self._prev_coords = None
        else:
            self.lost_run = 0
            if self._prev_coords is not None:
                moved = (coords - self._prev_coords).norm(dim=-1)
                ok = torch.isfinite(moved)
                state.static = bool(ok.any()) and float(moved[ok].mean()) < self.sc.static_flow * self.px
            self._prev_coords = coords
        self.frames.append(state)
        self.buffer[f] = image
        s = self.sc
        kf_flow = s.keyframe_flow * self.px
        good = q.confidence >= s.min_confidence and q.overlap >= s.min_overlap
        prev = self.frames[f - 1] if f >= 1 else None
        if lost and self.lost_run >= s.relocalise_after:
            self._restart(f, image)
        elif not lost and good and q.flow > kf_flow:
            self._add_keyframe(f, image)
        elif (not lost and not good and q.flow > kf_flow * s.promote_flow and may_promote and prev is not None
              and not prev.is_keyframe and not prev.lost and f - 1 in self.buffer
              and f - 1 - self.keyframes[kid].frame >= s.min_keyframe_gap):
            # tracking quality dropped: the previous (well-tracked) frame becomes the keyframe and
            # this frame is tracked again against it; a poor frame itself never becomes a keyframe
            self.frames.pop()
            del self.buffer[f]
            self._add_keyframe(f - 1, self.buffer[f - 1])
            return self._process(image, may_promote=False)
        self._trim_buffer()
        return state

    # ------------------------------------------------------------------------------------ keyframes
    @torch.no_grad()
    def _add_keyframe(self, f: int, image: np.ndarray) -> None:
        prev_id = self.window[-1]
        prev = self.keyframes[prev_id]
        state = self.frames[f]
        pose = _unit(se3_mul(state.rel_cw, prev.pose_cw))
        depth = splat_depth(prev.depth, se3_identity((), dtype=torch.float32), state.rel_cw.float(),
                            self.intr.float())
        valid = depth > 0
        fill = depth[valid].median() if bool(valid.any()) else prev.depth.median()
        kf = Keyframe(frame=f, pose_cw=pose, image=image, depth=torch.where(valid, depth, fill), valid=valid)
        if self.source == "learned":
            kf.motion_feats = self._motion_feats(image)
        kid = len(self.keyframes)
        self.keyframes.append(kf)
        self.window.append(kid)
        state.keyframe, state.rel_cw, state.is_keyframe = kid, se3_identity((), dtype=torch.float64), True
        self._prev_coords = None
        self._optimise_window()
        self._refine_depth(kid)
        if self.sc.depth_timing == "both":
            self._refine_depth(prev_id)
        if self.sc.ba_iterations > 0 and self.source == "dis":  # the adjustment's targets are DIS flow
            self._bundle_adjust()
        while len(self.window) > self.sc.window:
            self._finalise(self.window.pop(0))

    def _refine_depth(self, kid: int) -> None:
        """Depth module on keyframe kid with up to `depth_views` frames spread over the recorded ones."""
        kf = self.keyframes[kid]
        cand = [f for f in self.buffer if f != kf.frame and not self.frames[f].lost]
        if not cand:
            return
        pick = sorted({cand[int(round(i))] for i in np.linspace(0, len(cand) - 1, self.sc.depth_views)})
        rel = torch.stack([se3_mul(self.frame_pose(f), se3_inv(kf.pose_cw)) for f in pick])
        depth = self._depth_of(kf.image, [self.buffer[f] for f in pick], rel, frames=[kf.frame, *pick])
        if bool(torch.isfinite(depth).all()):
            if self.sc.scale_lock or self.sc.fuse_tolerance > 0:
                refs = self._window_depths(kid)
                if self.sc.scale_lock:
                    depth = depth * self._scale_to(refs, depth)
                if self.sc.fuse_tolerance > 0:
                    depth = self._fuse(depth, refs)
            kf.depth, kf.valid, kf.prior = depth.float(), torch.ones_like(depth, dtype=torch.bool), depth.float()
        else:
            self._warn(f"the depth module gave non-finite depth for keyframe at frame {kf.frame}; kept the previous")

    def _window_depths(self, kid: int) -> list[torch.Tensor]:
        """The other window keyframes' depth splatted into keyframe kid (those covering > 10 %).

        Shapes: each (H, W), 0 where nothing landed.
        """
        kf = self.keyframes[kid]
        refs = []
        for other in self.window:
            o = self.keyframes[other]
            if other == kid or o.depth is None:
                continue
            rel = se3_mul(kf.pose_cw, se3_inv(o.pose_cw)).float()
            ref = splat_depth(o.depth, se3_identity((), dtype=torch.float32), rel, self.intr.float())
            if float((ref > 0).float().mean()) > 0.1:
                refs.append(ref)
        return refs

    def _scale_to(self, refs: list[torch.Tensor], depth: torch.Tensor) -> float:
        """Median ratio making `depth` agree with the window's splatted depths (1 without any).

        The network's single-image prior pulls each keyframe's scale a little and monocular scale
        drifts; anchoring to the whole window rather than the previous keyframe alone makes the
        per-keyframe error smaller (a longer lever). A median needs no full resolution: every
        `_LOCK_STRIDE`-th pixel is used.
        """
        s = _LOCK_STRIDE
        mine = depth[::s, ::s]
        ratios = [r[::s, ::s][r[::s, ::s] > 0] / mine[r[::s, ::s] > 0].clamp_min(1e-6) for r in refs]
        if not ratios:
            return 1.0
        ratio = float(torch.cat(ratios).median())
        return ratio if math.isfinite(ratio) and ratio > 0 else 1.0

    def _fuse(self, depth: torch.Tensor, refs: list[torch.Tensor]) -> torch.Tensor:
        """Average `depth` with the window's splatted depths where they agree, in inverse depth.

        Every pixel's estimate from the depth module is noisy (7-Scenes keyframe AbsRel ~0.2), and
        tracking against noisy depth biases the translation; the window's keyframes saw the same
        surfaces, so averaging the estimates that agree within `slam.fuse_tolerance` (relative)
        reduces the noise without mixing in occlusions.
        """
        acc, count = 1.0 / depth.clamp_min(1e-6), torch.ones_like(depth)
        for ref in refs:
            ok = (ref > 0) & ((ref - depth).abs() < self.sc.fuse_tolerance * depth)
            acc = acc + torch.where(ok, 1.0 / ref.clamp_min(1e-6), torch.zeros_like(ref))
            count = count + ok.to(depth.dtype)
        return count / acc

    @torch.no_grad()
    def _optimise_window(self) -> None:
        """Global-mode Gauss-Newton over the window's keyframes and recent frames.

        Nodes: the window's keyframes (the oldest `window_fixed` fixed) and up to `window_frames`
        frames recorded between the last two keyframes (free). Edges: every ordered keyframe pair,
        and each of the last two keyframes to each frame (frames have no depth, so they are only
        targets), except edges whose predicted flow exceeds `edge_max_flow`. Frames then keep their
        optimised pose relative to their keyframe.
        """
        ids = self.window
        n = len(ids)
        if n < 2:
            return
        kfs = [self.keyframes[k] for k in ids]
        lo, hi = kfs[-2].frame, kfs[-1].frame
        between = [f for f in self.buffer if lo < f < hi and not self.frames[f].lost]
        extra = sorted({between[int(round(x))] for x in np.linspace(0, len(between) - 1, self.sc.window_frames)}) \
            if between and self.sc.window_frames else []
        base = kfs[0].pose_cw
        poses = torch.stack([se3_mul(k.pose_cw, se3_inv(base)) for k in kfs]
                            + [se3_mul(self.frame_pose(f), se3_inv(base)) for f in extra])
        images_np = [k.image for k in kfs] + [self.buffer[f] for f in extra]
        candidates = [(a, b) for a in range(n) for b in range(n) if a != b]
        candidates += [(a, n + e) for a in (n - 2, n - 1) for e in range(len(extra))]
        pairs = self._gate_pairs(kfs, poses, candidates)
        if not pairs:
            return
        ii, jj = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        inv = torch.stack([1.0 / kfs[a].depth.clamp_min(1e-3) for a, _ in pairs])[None]
        images = _to_tensor(images_np)[None]
        dis = feats = None
        if self.source == "dis":
            ts, ws = [], []
            for a, b in pairs:
                if b < n:
                    t, w = self._keyframe_dis(ids[a], ids[b])
                else:  # a frame serves this one optimisation
                    t, w = self._dis(kfs[a].image, images_np[b])
                ts.append(t)
                ws.append(w * kfs[a].valid[..., None])
            t = torch.stack(ts)
            dis = (t[None], self._reweight(t, torch.stack(ws), inv[0], poses.float(), ii, jj)[None])
            outer, iters = 1, self.sc.window_iterations
        else:
            feats = [k.motion_feats for k in kfs] + [self._motion_feats(self.buffer[f]) for f in extra]
            feats = torch.stack(feats)[None]
            outer, iters = self.cfg.motion.iterations, max(1, self.sc.window_iterations // self.cfg.motion.iterations)
        opts = dataclasses.replace(self.cfg.gn.options(fixed_poses=min(self.sc.window_fixed, n - 1),
                                                       optimize_focal=not self.calibrated), iterations=iters)
        steps = self.model.motion(images, feats, poses.float()[None], inv, self.intr.float()[None], ii, jj,
                                  dis=dis, gn=opts, iterations=outer)
        new = _unit(steps[-1].poses_cw[0])
        intr = steps[-1].intrinsics[0].double()
        if not (torch.isfinite(new).all() and torch.isfinite(intr).all()):
            self._warn("window optimisation gave non-finite poses; kept the tracked poses")
            return
        for k, kf in enumerate(kfs):
            if k >= opts.fixed_poses:
                kf.pose_cw = _unit(se3_mul(new[k], base))
        for e, f in enumerate(extra):  # after the keyframes: a frame's pose is relative to its keyframe
            st = self.frames[f]
            st.rel_cw = _unit(se3_mul(se3_mul(new[n + e], base), se3_inv(self.keyframes[st.keyframe].pose_cw)))
        if not self.calibrated:
            self.intr = intr
            _log.debug("window ending at frame %d: focal length %.1f px", kfs[-1].frame, float(intr[0]))

    @torch.no_grad()
    def _bundle_adjust(self) -> None:
        """Joint Gauss-Newton over the window keyframes' poses and per-pixel inverse depths.

        Edges: every ordered pair of window keyframes whose predicted flow is within
        `slam.edge_max_flow` (as in the window optimisation, whose DIS flow they share through the
        cache). The prior is each keyframe's depth as the depth module gave it (after the scale lock
        and fusion; the current depth where the depth module failed), with a relative standard
        deviation of `slam.ba_prior`; the oldest `slam.window_fixed` poses are held (gauge). Frames
        keep their pose relative to their keyframe.
        """
        ids = list(self.window)
        n = len(ids)
        if n < 2:
            return
        kfs = [self.keyframes[k] for k in ids]
        base = kfs[0].pose_cw
        poses = torch.stack([se3_mul(k.pose_cw, se3_inv(base)) for k in kfs])  # small numbers near the window
        pairs = self._gate_pairs(kfs, poses, [(a, b) for a in range(n) for b in range(n) if a != b])
        if not pairs:
            return
        ts, ws = [], []
        for a, b in pairs:
            t, w = self._keyframe_dis(ids[a], ids[b])
            ts.append(t)
            ws.append(w[..., 0])
        inv = torch.stack([1.0 / k.depth.clamp_min(1e-3) for k in kfs])
        prior = torch.stack([1.0 / (k.depth if k.prior is None else k.prior).clamp_min(1e-3) for k in kfs])
        fixed = min(self.sc.window_fixed, n - 1)
        gn = self.cfg.gn
        opts = WindowBAOptions(iterations=self.sc.ba_iterations, robust_scale=self.sc.robust_scale * self.px,
                               min_depth=self.cfg.gn.min_depth, stride=self.sc.ba_stride, fixed_poses=fixed,
                               max_translation_step=gn.max_translation_step, max_rotation_step=gn.max_rotation_step)
        new, rho = window_bundle_adjust(poses, inv, self.intr, torch.tensor([p[0] for p in pairs]),
                                        torch.tensor([p[1] for p in pairs]), torch.stack(ts), torch.stack(ws), prior,
                                        1.0 / (self.sc.ba_prior * prior) ** 2, opts)
        if not (bool(torch.isfinite(new).all()) and bool(torch.isfinite(rho).all())):
            self._warn("the window's bundle adjustment gave non-finite values; kept the previous estimate")
            return
        for k, kf in enumerate(kfs):
            if k >= fixed:
                kf.pose_cw = _unit(se3_mul(new[k], base))
            kf.depth, kf.valid = (1.0 / rho[k]).float(), torch.ones_like(kf.valid)

    def _gate_pairs(self, kfs: list[Keyframe], poses: torch.Tensor, candidates: list[tuple[int, int]]
                    ) -> list[tuple[int, int]]:
        """The candidate edges (a, b) whose flow, predicted from keyframe a's depth, is within
        `slam.edge_max_flow` (NaN is left out too). Shapes: poses (N, 7), kfs[a] for a < len(kfs)."""
        max_flow = self.sc.edge_max_flow * self.px
        pairs = []
        for a in range(len(kfs)):
            mine = [b for a2, b in candidates if a2 == a]
            if mine:
                flows = self._induced_flow(kfs[a], se3_mul(poses[mine], se3_inv(poses[a])[None]))
                pairs += [(a, b) for b, fl in zip(mine, flows.tolist(), strict=True) if fl <= max_flow]
        return pairs

    def _keyframe_dis(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """DIS targets and weights from keyframe a to keyframe b (ids), cached: a pair serves the window
        optimisation and the bundle adjustment of every window that holds both (dropped in `_finalise`)."""
        if (a, b) not in self.dis_cache:
            self.dis_cache[(a, b)] = self._dis(self.keyframes[a].image, self.keyframes[b].image)
        return self.dis_cache[(a, b)]

    def _induced_flow(self, kf: Keyframe, rel: torch.Tensor) -> torch.Tensor:
        """Mean flow (px) keyframe kf's depth induces under rel = T_other * T_kf^-1 (strided estimate).

        Shapes: rel (7,) or (M, 7) -> () or (M,) float32; inf where no point stays in front.
        """
        s = 4  # every 4th pixel: pixel (i, j) of the strided grid is (s i, s j), so fx/s, cx/s
        fx, fy, cx, cy = self.intr.float().unbind()
        intr = torch.stack([fx / s, fy / s, cx / s, cy / s])
        depth = kf.depth[::s, ::s].clamp_min(1e-3)
        rel = rel.float()
        q = se3_act(rel[..., None, None, :], backproject(depth, intr))  # (..., h, w, 3)
        ok = q[..., 2] > self.cfg.gn.min_depth
        grid = pixel_grid(*depth.shape, dtype=depth.dtype)
        dist = (project(q, intr) - grid).norm(dim=-1)
        n = ok.sum((-2, -1))
        mean = torch.where(ok, dist, torch.zeros_like(dist)).sum((-2, -1)) / n.clamp_min(1)
        return torch.where(n > 0, mean * s, torch.full_like(mean, math.inf))

    def _finalise(self, kid: int) -> None:
        """The keyframe leaves the window: hand its depth out, keep a strided copy for the cloud."""
        kf = self.keyframes[kid]
        if kf.image is None:
            return
        depth = kf.depth.numpy().astype(np.float32)
        depth = np.where(kf.valid.numpy(), depth, 0.0).astype(np.float32)
        if self.on_keyframe is not None:
            self.on_keyframe(kf.frame, depth, kf.pose_cw.clone(), kf.image)
        s = self.sc.cloud_stride
        kf.small_depth, kf.small_image = depth[::s, ::s].copy(), kf.image[::s, ::s].copy()
        kf.image = kf.depth = kf.valid = kf.motion_feats = kf.prior = None
        for key in [k for k in self.dis_cache if kid in k]:
            del self.dis_cache[key]
        release_heap()

    def _trim_buffer(self) -> None:
        oldest = self.keyframes[self.window[0]].frame
        for f in [f for f in self.buffer if f < oldest]:
            del self.buffer[f]
        while len(self.buffer) > self.sc.buffer_frames:
            self.buffer.popitem(last=False)
        keep = set(self.buffer) | {self.keyframes[k].frame for k in self.window}
        for f in [f for f in self.feat_cache if f not in keep]:
            del self.feat_cache[f]

    @torch.no_grad()
    def _restart(self, f: int, image: np.ndarray) -> None:
        """Re-initialise at frame f after `relocalise_after` lost frames: single-image depth, last good pose."""
        last = self.keyframes[self.window[-1]]
        depth = self._depth_of(image, [image], se3_identity((1,), dtype=torch.float64))
        ref = last.depth.median()
        depth = depth * (ref / depth.median().clamp_min(1e-6))
        if not bool(torch.isfinite(depth).all()):
            depth = torch.full_like(depth, float(ref) if math.isfinite(float(ref)) else self.cfg.model.init_depth)
        state = self.frames[f]
        pose = se3_mul(state.rel_cw, last.pose_cw)
        for k in list(self.window):
            self._finalise(k)
        kf = Keyframe(frame=f, pose_cw=pose, image=image, depth=depth.float(),
                      valid=torch.ones_like(depth, dtype=torch.bool), prior=depth.float())
        if self.source == "learned":
            kf.motion_feats = self._motion_feats(image)
        kid = len(self.keyframes)
        self.keyframes.append(kf)
        self.window = [kid]
        state.keyframe, state.rel_cw = kid, se3_identity((), dtype=torch.float64)
        state.is_keyframe = state.lost = True
        self.restarts += 1
        self.lost_run = 0
        self._prev_coords = None
        self._warn("tracking was lost; re-initialised with single-image depth (the trajectory's scale may jump)")

    def _report_flags(self) -> None:
        n = len(self.frames)
        lost = sum(s.lost for s in self.frames)
        static = sum(s.static for s in self.frames)
        flat = sum(s.textureless for s in self.frames)
        if lost:
            self._warn(f"tracking was lost on {lost} of {n} frames (they hold the last good pose)")
        run = longest = 0
        for st in self.frames:
            run = run + 1 if st.static else 0
            longest = max(longest, run)
        if static and (longest >= self.sc.static_run or static >= max(2, (n - 1) // 2)):
            self._warn(f"the camera is static on {static} of {n} frames (longest stretch {longest}): little "
                       "parallax there, depth comes mostly from single-image cues")
        if flat:
            self._warn(f"{flat} of {n} frames are nearly textureless: tracking there relies on the rest of the image")

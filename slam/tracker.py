"""The tracker: one frame in, its pose relative to the current keyframe and a quality out.

    tracker = Tracker(model, cfg, flows, (H, W))
    result = tracker.track(f, image, map.reference(), rel_init, map.intrinsics)

A frame is aligned to the keyframe by the motion module (keyframe depth fixed, keyframe mode): with
DIS flow the targets come from `slam.flowcache.FlowCache` and a second pass re-weights every target
by its residual (Cauchy), because DIS has no learned confidence. The flow the keyframe's depth
induces, the mean confidence, the visible fraction of the keyframe (overlap) and the
confidence-weighted residual describe the result (`TrackQuality`). A result below the lost
thresholds is tracked again from the keyframe's pose; if that fails too the frame is lost.

The tracker owns the state of the frame-to-frame tests (static camera); the map is the caller's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slam.config import RunConfig
from slam.flowcache import FlowCache
from slam.map import KeyframeView, TrackQuality, normalized_pose
from slam.measurements import images_to_tensor, induced_motion, motion_features, robust_weights, subsample
from v2d.geometry.camera import pixel_grid, reproject, scale_intrinsics, valid_reprojection
from v2d.geometry.lie import se3_identity
from v2d.model import V2D

__all__ = ["Tracker", "TrackResult"]


@dataclass(frozen=True)
class TrackResult:
    """A frame aligned to a keyframe.

    Shapes: rel_cw (7,) float64 = T_frame T_keyframe^-1; coords (H, W, 2): the keyframe pixels'
    coordinates in the frame (network-size pixels), None for a sparse (feature) registration.
    """

    rel_cw: torch.Tensor
    quality: TrackQuality
    coords: torch.Tensor | None
    lost: bool


class Tracker:
    """Aligns frames to keyframes with the motion module.

    Args:
        model: the V2D model (its motion module is used; eval mode).
        cfg: the configuration (`slam`, `gn`, `motion` sections).
        flows: the DIS flow cache shared with the mapper (flow source "dis").
        size: (H, W) of the frames.
        device: where tensors are created.
    """

    def __init__(self, model: V2D, cfg: RunConfig, flows: FlowCache, size: tuple[int, int],
                 device: torch.device) -> None:
        self.model, self.motion, self.cfg, self.sc, self.flows = model, model.motion, cfg, cfg.slam, flows
        self.H, self.W = size
        self.device = device
        self.source = cfg.motion.flow_source
        self.px = self.W / 320.0  # pixel thresholds are given for 320-wide frames
        self._grid = pixel_grid(self.H, self.W, dtype=torch.float32, device=device)
        self._prev_coords: torch.Tensor | None = None
        # the keyframe fixed, the focal length fixed (two frames do not determine it well)
        self.gn = cfg.gn.options(fixed_poses=1, optimize_focal=False)
        self.outer = cfg.motion.iterations
        if self.source == "dis":  # targets do not change between outer iterations: one call, all steps
            self.gn = dataclasses.replace(self.gn, iterations=cfg.gn.iterations * cfg.motion.iterations)
            self.outer = 1

    def keyframe_features(self, image: np.ndarray) -> torch.Tensor | None:
        """What tracking against `image` as a keyframe needs besides its depth: the learned flow's
        features (None with DIS flow). Shapes: (H, W, 3) uint8 -> (F, H/4, W/4) or None."""
        return motion_features(self.model, image, self.device) if self.source == "learned" else None

    def track(self, f: int, image: np.ndarray, ref: KeyframeView, rel_init: torch.Tensor,
              intrinsics: torch.Tensor, retry: bool = True) -> TrackResult:
        """Align frame f to keyframe `ref`, from rel_init = T_frame T_kf^-1; with `retry`, again from
        the keyframe's pose when the first result is lost.

        Shapes: image (H, W, 3) uint8; rel_init (7,) float64; intrinsics (4,) -> TrackResult.
        """
        rel, q, coords = self._align(f, image, ref, rel_init, intrinsics)
        lost = self.is_lost(q)
        if lost and retry:  # re-initialise against the keyframe: start from its pose
            rel2, q2, coords2 = self._align(f, image, ref, se3_identity(dtype=torch.float64, device=self.device),
                                            intrinsics)
            if not self.is_lost(q2) or q2.residual < q.residual:
                rel, q, coords = rel2, q2, coords2
            lost = self.is_lost(q)
        return TrackResult(rel, q, coords, lost)

    def predict(self, ref: KeyframeView, rel: torch.Tensor, intrinsics: torch.Tensor) -> tuple[float, float]:
        """The mean flow (px) and the overlap keyframe `ref` would have with a frame at rel = T_frame
        T_kf^-1 (e.g. the next frame's constant-velocity pose). Shapes: rel (7,); intrinsics (4,)."""
        flow, overlap = induced_motion(ref.depth, rel[None], intrinsics, self.cfg.gn.min_depth)
        return float(flow[0]), float(overlap[0])

    def sparse_result(self, ref: KeyframeView, rel: torch.Tensor, intrinsics: torch.Tensor, confidence: float,
                      residual: float) -> TrackResult:
        """A pose found by sparse registration (dense tracking failed there), with the flow and overlap
        the keyframe's depth predicts at it. Shapes: rel (7,) float64; intrinsics (4,)."""
        flow, overlap = self.predict(ref, rel, intrinsics)
        return TrackResult(normalized_pose(rel), TrackQuality(flow, confidence, overlap, residual), None, False)

    def is_static(self, result: TrackResult) -> bool:
        """Whether the keyframe's pixels barely moved since the previous tracked frame."""
        if result.lost or result.coords is None:
            self._prev_coords = None
            return False
        prev, self._prev_coords = self._prev_coords, result.coords
        if prev is None:
            return False
        moved = (result.coords - prev).norm(dim=-1)
        ok = torch.isfinite(moved)
        return bool(ok.any()) and float(moved[ok].mean()) < self.sc.static_flow * self.px

    def new_reference(self) -> None:
        """The keyframe changed: frame-to-frame tests restart."""
        self._prev_coords = None

    def is_lost(self, q: TrackQuality) -> bool:
        s = self.sc
        if not all(math.isfinite(v) for v in (q.flow, q.confidence, q.overlap, q.residual)):
            return True
        return q.overlap < s.lost_overlap or q.confidence < s.lost_confidence or q.residual > s.lost_residual * self.px

    @torch.no_grad()
    def _align(self, f: int, image: np.ndarray, ref: KeyframeView, rel_init: torch.Tensor, intrinsics: torch.Tensor
               ) -> tuple[torch.Tensor, TrackQuality, torch.Tensor]:
        dev = self.device
        intr = intrinsics.float()[None]
        images = images_to_tensor([ref.image, image], dev)[None]
        poses = torch.stack([se3_identity(dtype=torch.float64, device=dev), rel_init]).float()[None]
        inv = (1.0 / ref.depth.clamp_min(1e-3))[None, None]
        ii, jj = torch.tensor([0], device=dev), torch.tensor([1], device=dev)
        dis = feats = None
        stride = 1
        if self.source == "dis":
            stride = self.sc.track_stride
            t, w = self.flows.targets(ref.frame, f, ref.image, image)
            t, w, inv, intr = subsample(t[None, None], (w * ref.valid[..., None])[None, None], inv, intr, stride)
            # two passes: the second re-weights each target by its residual after the first (Cauchy)
            steps = self.motion(images, None, poses, inv, intr, ii, jj, dis=(t, w), gn=self.gn, iterations=1)
            w = robust_weights(t[0], w[0], inv[0], steps[-1].poses_cw[0], ii, jj, intr[0],
                               self.sc.robust_scale * self.px / stride, self.cfg.gn.min_depth)[None]
            poses = steps[-1].poses_cw
            dis = (t, w)
        else:
            feats = torch.stack([ref.motion_feats, motion_features(self.model, image, dev)])[None]
        steps = self.motion(images, feats, poses, inv, intr, ii, jj, dis=dis, gn=self.gn, iterations=self.outer)
        rel = normalized_pose(steps[-1].poses_cw[0, 1])
        if stride > 1:  # the strided problem is its own image grid
            quality, coords = self._quality(steps[-1].targets[0, 0], steps[-1].weights[0, 0], inv[0, 0], rel,
                                            intr[0], stride)
        else:
            quality, coords = self._quality_at(steps[-1].targets[0, 0], steps[-1].weights[0, 0], ref.depth, rel,
                                               intrinsics)
        return rel, quality, coords

    def _quality_at(self, targets: torch.Tensor, weights: torch.Tensor, depth: torch.Tensor, rel: torch.Tensor,
                    intrinsics: torch.Tensor) -> tuple[TrackQuality, torch.Tensor]:
        """Quality of an alignment whose targets/weights (h, w, 2) come at the learned flow's
        resolution (a resized image: depth and intrinsics are resized to it)."""
        h, w = targets.shape[:2]
        intr = scale_intrinsics(intrinsics.float(), w / self.W, h / self.H)
        d = depth if (h, w) == (self.H, self.W) else F.interpolate(depth[None, None], size=(h, w),
                                                                   mode="bilinear", align_corners=False)[0, 0]
        return self._quality(targets, weights, 1.0 / d.clamp_min(1e-3), rel, intr, self.W / w)

    def _quality(self, targets: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, rel: torch.Tensor,
                 intr: torch.Tensor, ratio: float) -> tuple[TrackQuality, torch.Tensor]:
        """Quality of an alignment on a grid `ratio` times coarser than the network size.

        Returns the quality and the keyframe pixels' coordinates in the frame (h, w, 2), in pixels of
        the network size (for the static-camera test). Shapes: targets, weights (h, w, 2); inv (h, w);
        intr (4,) on that grid.
        """
        h, w = targets.shape[:2]
        identity = se3_identity(dtype=torch.float32, device=self.device)
        coords, depth_j = reproject(inv, identity, rel.float(), intr)
        valid = valid_reprojection(inv, coords, depth_j, self.cfg.gn.min_depth)
        if not bool(torch.isfinite(rel).all()):
            return TrackQuality(flow=math.inf, residual=math.inf), coords
        n = valid.sum().clamp_min(1)
        grid = self._grid if ratio == 1 else pixel_grid(h, w, dtype=torch.float32, device=self.device)
        flow = float(((coords - grid).norm(dim=-1) * valid).sum() / n) * ratio
        wv = weights[..., 0] * valid
        conf = float(wv.sum() / n)
        err = ((targets - coords).nan_to_num(0.0) ** 2).sum(-1)
        residual = float(torch.sqrt((wv * err).sum() / wv.sum().clamp_min(1e-6))) * ratio
        return TrackQuality(flow, conf, float(valid.float().mean()), residual), coords * ratio

"""The SLAM system: wires the map, the tracker and the mapper over a stream of frames.

    system = SlamSystem(model, cfg, intrinsics, (H, W), calibrated=True)
    with system:                           # stops the mapper thread on any exit
        for rgb in frames:                 # (H, W, 3) uint8 at the network size
            system.add_frame(rgb)
        result = system.finish()           # poses of every frame, keyframes, per-frame status

A frame's path, top to bottom (`add_frame` -> `_process`):

1. Tracking (`slam.tracker.Tracker`): the frame is aligned to the newest keyframe from a
   constant-velocity guess (during initialisation: the initialisation's pose); a lost result is
   retried from the keyframe's pose, and a frame that stays lost holds the last good pose.
2. The frame enters the map (`slam.map.Map`) with its pose relative to the keyframe and its
   quality; the image buffer is trimmed.
3. Keyframe decision: a new keyframe when the flow the keyframe's depth induces passes
   `slam.keyframe_flow`; when tracking quality drops (confidence, overlap) the previous,
   well-tracked frame becomes the keyframe and this frame is tracked again against it; after
   `slam.relocalise_after` lost frames in a row, a restart at the current frame.
4. A new keyframe gets the previous keyframe's depth splatted into it at once (tracking goes on
   against it) and is handed to the mapper (`slam.mapper.Mapper`: window optimisation, depth
   module, bundle adjustment, retiring keyframes) through `slam.worker.MapperWorker`: in a
   background thread (`slam.concurrent: true`; tracking waits only when `slam.mapper_queue`
   keyframes are queued), or inline (`false`: results identical run to run).

Initialisation: frames are buffered until `slam.init_frames` frames spaced `slam.init_rate` apart
exist; the V2D model gives the first keyframe's depth and the set's poses, which seed the tracking
of the buffered frames.

Threads: in concurrent mode the tracker and the mapper each get one PyTorch and OpenCV thread (two
cores, no oversubscription); the process-wide settings are restored when the system closes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from slam.backend import GlobalBA, GlobalBAReport
from slam.config import RunConfig
from slam.filler import FillReport, FrameFiller
from slam.flowcache import FlowCache
from slam.map import FrameState, Keyframe, KeyframeView, Map, TrackQuality, normalized_pose
from slam.mapper import KeyframeJob, Mapper
from slam.measurements import texture
from slam.relocaliser import KeyframeIndex
from slam.tracker import Tracker, TrackResult
from slam.tracks import PairMatcher
from slam.worker import MapperWorker
from v2d.errors import ConfigError, ShapeError, V2DError
from v2d.features import Features
from v2d.geometry.lie import se3_identity, se3_inv, se3_mul
from v2d.model import V2D

__all__ = ["SlamSystem", "SlamResult"]

_log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0  # longest wait for the mapper thread to finish its running job on shutdown


@dataclass
class SlamResult:
    """Everything the run loop writes.

    Shapes: poses_cw (N, 7) float64 for every frame; keyframe_frames (K,) frame indices;
    keyframe_poses_cw (K, 7); cloud_depths K x (h, w) float32 and cloud_images K x (h, w, 3)
    uint8 at stride `cloud_stride`; cloud_normals K x (h, w, 3) float32 camera-frame unit normals
    (None for a keyframe without: no `depth.normals`, or its depth was never computed by the
    module); intrinsics (4,) float64 at the network size. `global_ba` is the
    backend's report (None with `slam.global_ba: false`); poses and cloud depths are after it.
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
    recovered: int = 0  # lost frames whose dense tracking resumed from a feature registration
    relocalised: int = 0  # frames registered by features only (each became a keyframe)
    segments: list[list[int]] = field(default_factory=list)  # each segment's keyframe frames
    merges: int = 0  # segments joined to an earlier one
    loops: list[tuple[int, int]] = field(default_factory=list)  # keyframe frames found to see the same place
    global_ba: GlobalBAReport | None = None
    filler: FillReport | None = None  # the final alignment of every frame (None with `slam.fill_frames: false`)
    cloud_normals: list[np.ndarray | None] = field(default_factory=list)


class _ThreadPlan:
    """Half the usable cores each for the tracker's and the mapper's PyTorch and OpenCV work while
    the mapper thread runs (1 + 1 on our 2-core machines); restores the previous settings after.

    PyTorch's intra-op thread count is read by each thread when it first runs a parallel op (and
    set again in the mapper thread by `apply`); OpenCV's is process-wide.
    """

    def __init__(self) -> None:
        import cv2

        self.per_thread = max(1, len(os.sched_getaffinity(0)) // 2)
        self._torch, self._cv = torch.get_num_threads(), cv2.getNumThreads()
        self.apply()

    def apply(self) -> None:
        import cv2

        torch.set_num_threads(self.per_thread)
        cv2.setNumThreads(self.per_thread)

    def restore(self) -> None:
        import cv2

        torch.set_num_threads(self._torch)
        cv2.setNumThreads(self._cv)


class SlamSystem:
    """Keyframe tracking, local mapping and keyframe depth over a stream of frames.

    Args:
        model: the V2D model (eval mode), on `device`.
        cfg: the full configuration (`slam`, `gn`, `motion`, `model` sections).
        intrinsics: (4,) fx, fy, cx, cy at the frame size (the initial guess when uncalibrated).
        size: (H, W) of the frames given to `add_frame`.
        calibrated: False optimises the focal length (initialisation and window).
        on_keyframe: called as on_keyframe(frame_index, depth (H, W) float32 ndarray, pose_cw (7,),
            image (H, W, 3) uint8, normal (H, W, 3) float32 or None) when a keyframe's depth is final
            (it left the window, or at `finish`); in concurrent mode from the mapper thread.
        device: where the map's and the networks' tensors live (default: the model's).
        on_track: called as on_track(frame_index, confidence (h, w) float32 ndarray) after each
            frame is tracked densely against its keyframe: the final weight of each keyframe pixel's
            flow target on the tracking grid (`TrackResult.confidence`); in the caller's thread.
    """

    def __init__(self, model: V2D, cfg: RunConfig, intrinsics: torch.Tensor, size: tuple[int, int],
                 calibrated: bool = True,
                 on_keyframe: Callable[[int, np.ndarray, torch.Tensor, np.ndarray, np.ndarray | None], None]
                 | None = None,
                 device: torch.device | str | None = None,
                 on_track: Callable[[int, np.ndarray], None] | None = None) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        intr = torch.as_tensor(intrinsics, dtype=torch.float64, device=self.device)
        if intr.shape != (4,) or not bool(torch.isfinite(intr).all()) or bool((intr[:2] <= 0).any()):
            raise ShapeError(f"intrinsics: expected (4,) finite fx, fy > 0, cx, cy; got {intrinsics}")
        if cfg.motion.mode != "keyframe":
            raise ConfigError(f"motion.mode: the SLAM front end tracks in keyframe mode, got {cfg.motion.mode!r}")
        self.cfg, self.sc = cfg, cfg.slam
        self.size = size
        self.warnings: list[str] = []
        self.on_track = on_track
        self._warn_lock = threading.Lock()
        self.map = Map(intr, self.device, self.sc.cloud_stride if self.sc.fill_frames else None)
        self.flows = FlowCache(cfg.motion.dis, self.device, self.sc.flow_cache_mb * 2**20)
        self.tracker = Tracker(model, cfg, self.flows, size, self.device)
        self.index = KeyframeIndex(cfg, size, self.device)
        # verified feature matches of keyframe pairs, shared by the window's and the global adjustment
        self.pairs = PairMatcher(self.index.extractor.match, self.sc.track_threshold * size[1] / 320.0,
                                 self.sc.reloc_min_inliers, self.sc.cloud_stride)
        self.mapper = Mapper(model, cfg, self.map, self.flows, size, calibrated, self.device, on_keyframe, self.warn,
                             self.pairs)
        self._threads: _ThreadPlan | None = None  # set while the mapper thread runs
        self.worker: MapperWorker[KeyframeJob] | None = None  # started after initialisation
        self._pending: list[np.ndarray] = []  # frames before initialisation
        self._init_poses: dict[int, torch.Tensor] = {}
        self.lost_run = 0  # frames lost in a row
        self.lost_count = 0
        self.restarts = 0
        self.recovered = 0  # lost frames whose dense tracking succeeded from a feature registration
        self.relocalised = 0  # lost frames registered by features only (they became keyframes)
        self.merges = 0  # map segments joined to an earlier one
        self._lost_features = 0  # sparse keypoints of the newest lost frame
        self._frame_features: tuple[int, Features] | None = None  # the newest frame whose features were extracted
        self.finished = False
        self._closed = False

    # ------------------------------------------------------------------------------------ public
    @property
    def initialised(self) -> bool:
        return self.map.num_keyframes() > 0

    @property
    def num_keyframes(self) -> int:
        return self.map.num_keyframes()

    def warn(self, message: str) -> None:
        """Log a warning and record it for the run's summary (once per distinct message)."""
        with self._warn_lock:
            if message in self.warnings:
                return
            self.warnings.append(message)
        _log.warning(message)

    def add_frame(self, image: np.ndarray) -> FrameState | None:
        """Process the next frame; returns its state (None while initialisation is pending).

        Shapes: image (H, W, 3) uint8 RGB at the configured size.
        """
        if self.finished or self._closed:
            raise V2DError("add_frame: this run has finished; start a new SlamSystem")
        H, W = self.size
        if image.shape != (H, W, 3) or image.dtype != np.uint8:
            raise ShapeError(f"frame: expected ({H}, {W}, 3) uint8, got {image.shape} {image.dtype}")
        if not self.initialised:
            self._pending.append(image)
            if len(self._pending) >= (self.sc.init_frames - 1) * self.sc.init_rate + 1:
                self._initialise()
            return None
        return self._process(image)

    def finish(self) -> SlamResult:
        """Flush initialisation (short videos), wait for the mapper, finalise the window, run the global
        bundle adjustment (`slam.global_ba`, `slam.backend`) and align every frame to the final map
        (`slam.fill_frames`, `slam.filler`), return the result."""
        if self.finished or self._closed:
            raise V2DError("finish: this run has already finished")
        if not self.initialised:
            if len(self._pending) < 2:
                raise ShapeError(f"a run needs at least 2 frames, got {len(self._pending)}")
            self._initialise()
        self.worker.wait()
        self.finished = True
        self.close()  # the mapper thread is done: the last steps get every core
        self.mapper.finish(self.map.num_frames() - 1, self.map.images())
        backend = (GlobalBA(self.cfg, self.device, self.warn, self.pairs).run(self.map)
                   if self.sc.global_ba else None)
        filler = FrameFiller(self.cfg, self.device, self.warn).run(self.map) if self.sc.fill_frames else None
        self._report_flags()
        kfs = self.map.keyframes()
        return SlamResult(
            poses_cw=self.map.frame_poses(), frames=self.map.frames(),
            keyframe_frames=[k.frame for k in kfs], keyframe_poses_cw=torch.stack([k.pose_cw for k in kfs]),
            cloud_depths=[k.small_depth for k in kfs], cloud_images=[k.small_image for k in kfs],
            cloud_normals=[k.small_normal for k in kfs], cloud_stride=self.sc.cloud_stride,
            intrinsics=self.map.intrinsics.clone(), restarts=self.restarts,
            warnings=list(self.warnings), recovered=self.recovered, relocalised=self.relocalised,
            segments=[[kfs[k].frame for k in ks] for ks in self.map.segments().values()], merges=self.merges,
            loops=sorted((kfs[a].frame, kfs[b].frame) for a, b in self.map.loops()), global_ba=backend,
            filler=filler)

    def close(self) -> None:
        """Stop the mapper thread and restore thread settings. Idempotent; after an error or Ctrl-C it
        skips the queued keyframes (the run's outputs are discarded then)."""
        if self._closed:
            return
        try:
            if self.worker is not None:
                self.worker.close(abort=not self.finished, timeout=_STOP_TIMEOUT_S)
            self._closed = True  # only after a clean stop: a Ctrl-C inside close() leaves it to try again
        finally:
            if self._threads is not None:
                self._threads.restore()
                self._threads = None

    def __enter__(self) -> SlamSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ frames
    @torch.no_grad()
    def _initialise(self) -> None:
        frames, self._pending = self._pending, []
        poses, depth, normal = self.mapper.initialise(frames)
        ident = se3_identity(dtype=torch.float64, device=self.device)
        self.map.add_frame(FrameState(keyframe=0, rel_cw=ident, is_keyframe=True,
                                      quality=TrackQuality(confidence=1.0, overlap=1.0),
                                      textureless=texture(frames[0]) < self.sc.min_texture), frames[0])
        kid = self.map.add_keyframe(Keyframe(frame=0, pose_cw=ident, image=frames[0], depth=depth, prior=depth,
                                             valid=torch.ones_like(depth, dtype=torch.bool), normal=normal), 0)
        self.map.update_keyframe(kid, features=self.index.features(frames[0]))
        self._start_worker()
        self._init_poses = poses
        for image in frames[1:]:
            self._process(image)
        self._init_poses = {}

    def _start_worker(self) -> None:
        """The mapper's worker: a thread with its share of the cores (concurrent), or inline."""
        if self.sc.concurrent:
            self._threads = _ThreadPlan()
        self.worker = MapperWorker(self.mapper.map_keyframes, self.sc.concurrent, self.sc.mapper_queue,
                                   on_start=self._threads.apply if self._threads is not None else None)

    def _process(self, image: np.ndarray, may_promote: bool = True) -> FrameState:
        self.worker.check()  # a mapper failure stops the run at the next frame
        f = self.map.num_frames()
        ref = self.map.reference()
        if f in self._init_poses:  # the initialisation's pose (keyframe 0 is the identity)
            rel_init = se3_mul(self._init_poses[f], se3_inv(ref.pose_cw))
        else:  # constant velocity from the last two frames (read together: the mapper may move them)
            recent = self.map.recent_poses(2)
            before, prev = recent[0], recent[-1]
            guess = se3_mul(se3_mul(prev, se3_inv(before)), prev)
            rel_init = normalized_pose(se3_mul(guess, se3_inv(ref.pose_cw)))
        track = self.tracker.track(f, image, ref, rel_init, self.map.intrinsics)
        if self.on_track is not None and track.confidence is not None:
            self.on_track(f, track.confidence.cpu().numpy())
        reloc = None
        if track.lost:
            track, reloc = self._recover(f, image, ref, track)
        q, lost = track.quality, track.lost
        state = FrameState(keyframe=ref.id, rel_cw=track.rel_cw, quality=q, lost=lost,
                           static=self.tracker.is_static(track), textureless=texture(image) < self.sc.min_texture)
        after_loss = not lost and self.lost_run > 0
        if lost:  # the map gives it the last good pose
            self.lost_run += 1
            self.lost_count += 1
        else:
            self.lost_run = 0
        self.map.add_frame(state, image)
        if after_loss:  # the frames lost in between get poses between their tracked neighbours
            self.lost_count -= len(self.map.bridge(f))
        keyframes = self.map.window_frames()  # only f or f - 1 can still become a keyframe
        self.flows.drop(lambda g: g >= f - 1 or g in keyframes, raw_only=True)
        s = self.sc
        kf_flow = s.keyframe_flow * self.tracker.px
        good = q.confidence >= s.min_confidence and q.overlap >= s.min_overlap
        prev_state = self.map.frame(f - 1) if f >= 1 else None
        if reloc is not None:  # registered by features only: tracking resumes from a keyframe made here
            self._keyframe(f, image, source=reloc)
        elif lost and self.lost_run >= s.relocalise_after and self._lost_features >= s.restart_min_features:
            self._restart(f, image)  # a hand over the lens or a blank wall is no place to start a map
        elif not lost and good and self._needs_keyframe(ref, track, kf_flow):
            self._keyframe(f, image)
        elif (not lost and not good and q.flow > kf_flow * s.promote_flow and may_promote and prev_state is not None
              and not prev_state.is_keyframe and not prev_state.lost and self.map.image(f - 1) is not None
              and f - 1 - ref.frame >= s.min_keyframe_gap):
            # tracking quality dropped: the previous (well-tracked) frame becomes the keyframe and
            # this frame is tracked again against it; a poor frame itself never becomes a keyframe
            self.map.drop_last_frame()
            self._keyframe(f - 1, self.map.image(f - 1))
            return self._process(image, may_promote=False)
        self.map.trim_images(s.buffer_frames)
        return self.map.frame(f)

    def _needs_keyframe(self, ref: KeyframeView, track: TrackResult, kf_flow: float) -> bool:
        """A new keyframe when the flow to the keyframe passes `keyframe_flow` (the spacing of slow
        motion), or when the overlap predicted for the next frame (constant velocity) falls below
        `keyframe_overlap`: fast motion gets keyframes before tracking runs out of shared view."""
        if track.quality.flow > kf_flow:
            return True
        recent = self.map.recent_poses(2)
        if len(recent) < 2:
            return False
        step = se3_mul(recent[-1], se3_inv(recent[0]))
        _, overlap = self.tracker.predict(ref, normalized_pose(se3_mul(step, track.rel_cw)), self.map.intrinsics)
        return overlap < self.sc.keyframe_overlap

    def _recover(self, f: int, image: np.ndarray, ref: KeyframeView, track: TrackResult
                 ) -> tuple[TrackResult, int | None]:
        """Dense tracking lost frame f: register it by features against the window's keyframes
        (newest first) and the keyframes that look most like it. Dense tracking from the registered
        pose, when it succeeds, gives the frame's pose; otherwise the registered pose does and the
        keyframe it was registered against is returned (the frame becomes a keyframe)."""
        feats = self._features(f, image)
        self._lost_features = len(feats.keypoints)
        window = self.map.window()
        kids = window[::-1] + self._similar(feats, set(window))
        reg = self.index.register(feats, self.map.keyframes(kids), kids, self.map.intrinsics, self.sc.reloc_careful)
        if reg is None:
            return track, None
        pose = se3_mul(reg.rel_cw, self.map.keyframe(reg.kid).pose_cw)
        rel = normalized_pose(se3_mul(pose, se3_inv(ref.pose_cw)))
        dense = self.tracker.track(f, image, ref, rel, self.map.intrinsics, retry=False)
        if not dense.lost:
            self.recovered += 1
            return dense, None
        self.relocalised += 1
        return self.tracker.sparse_result(ref, rel, self.map.intrinsics, reg.inliers / reg.matches,
                                          reg.reprojection_px), reg.kid

    def _keyframe(self, f: int, image: np.ndarray, source: int | None = None) -> None:
        kid = self.mapper.new_keyframe(f, image, source)
        feats = self._features(f, image)
        self.map.update_keyframe(kid, features=feats)
        self.tracker.new_reference()
        self.worker.submit(KeyframeJob(kid, self.map.images(), refine_previous=self.sc.depth_timing == "both"))
        self._find_loop(kid, feats)

    def _features(self, f: int, image: np.ndarray) -> Features:
        """Frame f's sparse features, extracted once: a lost frame's (registration) are kept for when
        it becomes a keyframe or a new segment's first."""
        if self._frame_features is None or self._frame_features[0] != f:
            self._frame_features = (f, self.index.features(image))
        return self._frame_features[1]

    def _similar(self, feats: Features, exclude: set[int]) -> list[int]:
        """The `slam.reloc_candidates` keyframes (not in `exclude`) that look most like `feats`."""
        kids = [k for k in range(self.map.num_keyframes()) if k not in exclude]
        return [k for k, _ in self.index.similar(feats, self.map.keyframes(kids), kids, self.sc.reloc_candidates)]

    def _find_loop(self, kid: int, feats: Features) -> None:
        """Loop detection at a new keyframe: the keyframes of other segments, and those of its own
        segment at least `slam.loop_min_gap` keyframes older, that look most like it are registered
        against it. A match in another segment merges the two (`Mapper.merge`); one in its own
        segment is a loop (an edge for the global bundle adjustment)."""
        seg = self.map.keyframe(kid).segment
        segments = self.map.segments()
        candidates = {k for sg, ks in segments.items() for k in ks
                      if sg != seg or k < kid - self.sc.loop_min_gap}
        if not candidates:
            return
        exclude = set(range(self.map.num_keyframes())) - candidates
        kids = self._similar(feats, exclude)
        reg = self.index.register(feats, self.map.keyframes(kids), kids, self.map.intrinsics)
        if reg is None:
            return
        if self.map.keyframe(reg.kid).segment == seg:
            self.map.add_loop(reg.kid, kid)
            return
        self.worker.wait()  # the mapper must not write the segment while it moves
        first = self.map.keyframe(self.map.segments()[seg][0]).frame
        if self.mapper.merge(kid, reg):
            self.merges += 1
            # one world now: the frames lost before the merged segment began get poses between its ends
            self.lost_count -= len(self.map.bridge(first))
            _log.info("keyframe %d relocalised against keyframe %d of an earlier map segment: merged", kid, reg.kid)

    def _restart(self, f: int, image: np.ndarray) -> None:
        """Re-initialise at frame f after `relocalise_after` lost frames (the mapper finishes first)."""
        self.worker.wait()
        kid = self.mapper.restart(f, image)
        self.map.update_keyframe(kid, features=self._features(f, image))
        self.restarts += 1
        self.lost_count -= 1  # the frame has a pose again: the new segment's origin
        self.lost_run = 0
        self.tracker.new_reference()
        self.warn("tracking was lost and relocalisation failed; started a new map segment with single-image depth "
                  "(its scale differs until it is merged: see summary.json's segments)")

    def _report_flags(self) -> None:
        frames = self.map.frames()
        n = len(frames)
        lost = sum(s.lost for s in frames)
        static = sum(s.static for s in frames)
        flat = sum(s.textureless for s in frames)
        if lost:
            self.warn(f"tracking was lost on {lost} of {n} frames (they hold the last good pose)")
        bridged = sum(s.interpolated for s in frames)
        if bridged:
            self.warn(f"{bridged} of {n} frames could not be tracked; their poses are interpolated between the "
                      "tracked frames around them")
        run = longest = 0
        for st in frames:
            run = run + 1 if st.static else 0
            longest = max(longest, run)
        if static and (longest >= self.sc.static_run or static >= max(2, (n - 1) // 2)):
            self.warn(f"the camera is static on {static} of {n} frames (longest stretch {longest}): little "
                      "parallax there, depth comes mostly from single-image cues")
        if flat:
            self.warn(f"{flat} of {n} frames are nearly textureless: tracking there relies on the rest of the image")

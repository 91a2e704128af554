"""The tracker: one frame in, its pose relative to the current keyframe and a quality out.

    tracker = Tracker(model, cfg, flows, (H, W))
    result = tracker.track(f, image, map.reference(), rel_init, map.intrinsics)

A frame is aligned to the keyframe (keyframe depth fixed) by `v2d.refiner.motion_updates` on every
`slam.track_stride`-th pixel: DIS flow targets (`slam.flowcache.FlowCache`) with their
forward-backward weights, a Gauss-Newton solve, then `motion.refiner.updates` times a re-weighting
of every target by its residual (Cauchy) and, with `motion.flow_source: learned`, the learned
update's residual flow and confidence, each followed by Gauss-Newton again. The flow the keyframe's depth
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

from slam.config import RunConfig
from slam.flowcache import FlowCache
from slam.map import KeyframeView, TrackQuality, normalized_pose
from slam.measurements import images_to_tensor, induced_motion
from v2d.geometry.camera import pixel_grid, reproject, valid_reprojection
from v2d.geometry.lie import se3_identity
from v2d.model import V2D
from v2d.refiner import Encoded, motion_updates, subsample

__all__ = ["Tracker", "TrackResult"]


@dataclass(frozen=True)
class TrackResult:
    """A frame aligned to a keyframe.

    Shapes: rel_cw (7,) float64 = T_frame T_keyframe^-1; coords (h, w, 2): the keyframe pixels'
    coordinates in the frame (network-size pixels) on the tracking grid (every `slam.track_stride`-th
    pixel), None for a sparse (feature) registration; confidence (h, w) float32: the final weight of
    each keyframe pixel's flow target (forward-backward x robust x learned), None when sparse.
    """

    rel_cw: torch.Tensor
    quality: TrackQuality
    coords: torch.Tensor | None
    lost: bool
    confidence: torch.Tensor | None = None


class Tracker:
    """Aligns frames to keyframes with the motion module.

    Args:
        model: the V2D model (its motion module is used; eval mode).
        cfg: the configuration (`slam`, `gn`, `motion` sections).
        flows: the DIS flow cache shared with the mapper.
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
        # the motion module's outer iterations as one call (DIS targets do not change between them)
        self.gn = dataclasses.replace(cfg.gn.options(fixed_poses=1, optimize_focal=False),
                                      iterations=cfg.gn.iterations * cfg.motion.iterations)
        self.updates = cfg.motion.refiner.updates
        self._encodings: dict[int, Encoded] = {}  # the learned update's view of recent frames (LRU)

    def track(self, f: int, image: np.ndarray, ref: KeyframeView, rel_init: torch.Tensor,
              intrinsics: torch.Tensor, retry: bool = True) -> TrackResult:
        """Align frame f to keyframe `ref`, from rel_init = T_frame T_kf^-1; with `retry`, again from
        the keyframe's pose when the first result is lost.

        Shapes: image (H, W, 3) uint8; rel_init (7,) float64; intrinsics (4,) -> TrackResult.
        """
        rel, q, coords, conf = self._align(f, image, ref, rel_init, intrinsics)
        lost = self.is_lost(q)
        if lost and retry:  # re-initialise against the keyframe: start from its pose
            second = self._align(f, image, ref, se3_identity(dtype=torch.float64, device=self.device), intrinsics)
            if not self.is_lost(second[1]) or second[1].residual < q.residual:
                rel, q, coords, conf = second
            lost = self.is_lost(q)
        return TrackResult(rel, q, coords, lost, conf)

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
               ) -> tuple[torch.Tensor, TrackQuality, torch.Tensor, torch.Tensor]:
        dev = self.device
        s = self.sc.track_stride
        t, w = self.flows.targets(ref.frame, f, ref.image, image)
        inv = 1.0 / ref.depth.clamp_min(1e-3)
        t, w, inv, intr = subsample(t[None], (w * ref.valid[..., None])[None], inv[None], intrinsics.float(), s)
        poses = torch.stack([se3_identity(dtype=torch.float64, device=dev), rel_init]).float()
        ii, jj = torch.tensor([0], device=dev), torch.tensor([1], device=dev)
        refine = None
        if self.source == "learned":
            src, dst = self._encoded(ref.frame, ref.image), self._encoded(f, image)

            def refine(t_, w_, c_, v_):
                return self.motion.refiner(src, dst, t_, w_, c_, v_, s)

        steps = motion_updates(poses, inv, intr, t, w, ii, jj, self.gn, self.sc.robust_scale * self.px / s,
                               self.updates, refine)
        rel = normalized_pose(steps[-1].poses[1])
        quality, coords = self._quality(steps[-1].targets[0], steps[-1].weights[0], inv[0], rel, intr, s)
        return rel, quality, coords, steps[-1].weights[0, ..., 0]

    def _encoded(self, f: int, image: np.ndarray) -> Encoded:
        """The learned update's encoding of frame f; the three used last are kept (the keyframe serves
        many frames, a retry or a relocalisation aligns the same frame again)."""
        enc = self._encodings.pop(f, None)
        if enc is None:
            enc = self.motion.refiner.encode(images_to_tensor([image], self.device))
        self._encodings[f] = enc  # the most recently used last
        while len(self._encodings) > 3:
            del self._encodings[next(iter(self._encodings))]
        return enc

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

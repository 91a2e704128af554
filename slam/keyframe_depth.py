"""A keyframe's depth from the depth module, kept at the map's scale.

    depth = KeyframeDepth(model, cfg, slam_map, (H, W), device)
    depth.compute(kid, images)     # the depth module on kid and frames spread over `images`

The depth module's cost volume takes the keyframe and `slam.depth_views` frames spread over the
recorded ones, at their current poses relative to the keyframe. Monocular scale drifts and the
network's single-image prior pulls each keyframe's scale a little, so with `slam.scale_lock` the
result is rescaled (median ratio) to agree with the other window keyframes' depth splatted into
it, and with `slam.fuse_tolerance` averaged in inverse depth with those splats where they agree.
The depth module's features of a frame serve several cost volumes, so they are cached by frame.
With `depth.temporal_fusion` the matching state of each window keyframe is kept and handed to the
next keyframe of its map segment (warped by their current relative pose); with `depth.normals`
the normals are stored with the depth (the scale lock and the fusion do not change them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from slam.config import RunConfig
from slam.fusion import splat_depth
from slam.map import Map
from slam.measurements import images_to_tensor
from v2d.depth import DepthResult, Previous
from v2d.geometry.lie import se3_identity, se3_inv, se3_mul
from v2d.model import V2D, normalize_images

__all__ = ["KeyframeDepth", "scale_to", "fuse_depths"]

_LOCK_STRIDE = 4  # pixel stride of the scale lock's median (a median needs no full resolution)
_KEPT_STATES = 2  # temporal states kept (each (1, V, H/4, W/4, D): 9.8 MB at 240x320 in `small`)


def scale_to(refs: list[torch.Tensor], depth: torch.Tensor, stride: int = _LOCK_STRIDE) -> float:
    """Median ratio making `depth` agree with the splatted reference depths (1 without any).

    Anchoring to the whole window rather than the previous keyframe alone makes the per-keyframe
    scale error smaller (a longer lever). Every `stride`-th pixel is used.

    Shapes: refs K x (H, W) (0 = nothing landed), depth (H, W).
    """
    mine = depth[::stride, ::stride]
    ratios = []
    for r in refs:
        rs = r[::stride, ::stride]
        ratios.append(rs[rs > 0] / mine[rs > 0].clamp_min(1e-6))
    if not ratios:
        return 1.0
    ratio = float(torch.cat(ratios).median())
    return ratio if math.isfinite(ratio) and ratio > 0 else 1.0


def fuse_depths(depth: torch.Tensor, refs: list[torch.Tensor], tolerance: float) -> torch.Tensor:
    """Average `depth` with the references where they agree within `tolerance` (relative), in inverse depth.

    Every pixel's estimate from the depth module is noisy (7-Scenes keyframe AbsRel ~0.2), and
    tracking against noisy depth biases the translation; the window's keyframes saw the same
    surfaces, so averaging the estimates that agree reduces the noise without mixing in occlusions.

    Shapes: depth (H, W), refs K x (H, W) (0 = nothing landed) -> (H, W).
    """
    acc, count = 1.0 / depth.clamp_min(1e-6), torch.ones_like(depth)
    for ref in refs:
        ok = (ref > 0) & ((ref - depth).abs() < tolerance * depth)
        acc = acc + torch.where(ok, 1.0 / ref.clamp_min(1e-6), torch.zeros_like(ref))
        count = count + ok.to(depth.dtype)
    return count / acc


class KeyframeDepth:
    """Keyframe depth from the depth module, scale-locked and fused with the window; owns the
    depth features cache (frame index -> (C, H/4, W/4)) and the temporal states (keyframe id ->
    (1, V, H/4, W/4, D), the newest `_KEPT_STATES`)."""

    def __init__(self, model: V2D, cfg: RunConfig, slam_map: Map, size: tuple[int, int], device: torch.device,
                 warn: Callable[[str], None]) -> None:
        self.model, self.cfg, self.sc, self.map = model, cfg, cfg.slam, slam_map
        self.H, self.W = size
        self.device, self.warn = device, warn
        self._feats: dict[int, torch.Tensor] = {}
        self._states: dict[int, torch.Tensor] = {}

    def compute(self, kid: int, images: dict[int, np.ndarray]) -> None:
        """The depth module on keyframe kid with up to `depth_views` of `images` (not lost, not kid's
        own frame) spread over them; the map's depth and prior of kid are replaced.

        Shapes: images {frame index: (H, W, 3) uint8}; writes depth, prior (H, W) float32.
        """
        kf = self.map.keyframe(kid)
        cand = [f for f in images if f != kf.frame and not self.map.frame(f).lost]
        if not cand:
            return
        pick = sorted({cand[int(round(i))] for i in np.linspace(0, len(cand) - 1, self.sc.depth_views)})
        rel = torch.stack([se3_mul(self.map.frame_pose(f), se3_inv(kf.pose_cw)) for f in pick])
        res = self._network([kf.image] + [images[f] for f in pick], rel, frames=[kf.frame, *pick],
                            previous=self._previous(kid))
        depth = res.depths[-1][0]
        if not bool(torch.isfinite(depth).all()):
            self.warn(f"the depth module gave non-finite depth for keyframe at frame {kf.frame}; kept the previous")
            return
        if self.sc.scale_lock or self.sc.fuse_tolerance > 0:
            refs = self._window_depths(kid)
            if self.sc.scale_lock:
                depth = depth * scale_to(refs, depth)
            if self.sc.fuse_tolerance > 0:
                depth = fuse_depths(depth, refs, self.sc.fuse_tolerance)
        depth = depth.float()
        normal = None if res.normals is None else res.normals[0].float()
        self.map.update_keyframe(kid, depth=depth, valid=torch.ones_like(depth, dtype=torch.bool), prior=depth,
                                 normal=normal)
        if res.state is not None:
            self._states[kid] = res.state
            # Only the newest earlier state is read; the one before it serves `refine_previous`.
            for k in sorted(self._states)[:-_KEPT_STATES]:
                del self._states[k]

    def _previous(self, kid: int) -> Previous | None:
        """The temporal state of the newest keyframe before kid in its map segment, with the pose
        taking kid's camera to that keyframe's (None: no state kept, or no temporal fusion)."""
        if not self._states:
            return None
        kf = self.map.keyframe(kid)
        earlier = [k for k in self._states if k < kid and self.map.keyframe(k).segment == kf.segment]
        if not earlier:
            return None
        p = max(earlier)
        return Previous.between(self._states[p], self.map.keyframe(p).pose_cw[None], kf.pose_cw[None])

    def single_image(self, image: np.ndarray, median: float | None) -> torch.Tensor:
        """Depth from one image (the cost volume of the image against itself: no parallax, the network
        falls back on single-image cues), scaled to `median` when given; a constant where it fails.

        Shapes: image (H, W, 3) uint8 -> (H, W) float32.
        """
        depth = self._network([image, image], se3_identity(1, dtype=torch.float64, device=self.device)).depths[-1][0]
        if median is not None:
            depth = depth * (median / depth.median().clamp_min(1e-6))
        if not bool(torch.isfinite(depth).all()):
            fill = median if median is not None and math.isfinite(median) else self.cfg.model.init_depth
            depth = torch.full_like(depth, fill)
        return depth.float()

    def normals(self, images: list[np.ndarray], rel_poses: torch.Tensor) -> torch.Tensor | None:
        """The depth module's normals of images[0] against the others (None without `depth.normals`).

        Shapes: images (V + 1) x (H, W, 3) uint8; rel_poses (V, 7) T_view * T_key^-1 -> (3, H, W) float32.
        """
        res = self._network(images, rel_poses)
        return None if res.normals is None else res.normals[0].float()

    def forget_states(self) -> None:
        """Drop the kept temporal states (after a map segment was rescaled: they hold the old scale)."""
        self._states.clear()

    def forget(self, keep: Callable[[int], bool]) -> None:
        """Drop cached features of frames for which `keep(frame)` is False."""
        for f in [f for f in self._feats if not keep(f)]:
            del self._feats[f]

    @torch.no_grad()
    def _network(self, images: list[np.ndarray], rel_poses: torch.Tensor, frames: list[int] | None = None,
                 previous: Previous | None = None) -> DepthResult:
        """Depth module on images[0] (the keyframe) against the others. rel_poses (V, 7): T_view * T_key^-1.

        Shapes: images (V + 1) x (H, W, 3) uint8 -> `DepthResult` with B = 1. `frames` (their frame
        indices) lets the features of frames seen before come from the cache.
        """
        depth_net = self.model.depth
        if frames is None:
            feats = depth_net.features(normalize_images(images_to_tensor(images, self.device)))
        else:
            new = [k for k, f in enumerate(frames) if f not in self._feats]
            if new:
                computed = depth_net.features(normalize_images(images_to_tensor([images[k] for k in new],
                                                                                self.device)))
                for k, ft in zip(new, computed, strict=True):
                    self._feats[frames[k]] = ft
            feats = torch.stack([self._feats[f] for f in frames])
        poses = torch.cat([se3_identity(1, dtype=torch.float64, device=self.device), rel_poses]).float()[None]
        intr = self.map.intrinsics.float()[None]
        return depth_net.infer(feats[None], poses, intr, (self.H, self.W), previous)

    def _window_depths(self, kid: int) -> list[torch.Tensor]:
        """The other window keyframes' depth splatted into keyframe kid (those covering > 10 %).

        Shapes: each (H, W), 0 where nothing landed.
        """
        kf = self.map.keyframe(kid)
        intr = self.map.intrinsics.float()
        identity = se3_identity(dtype=torch.float32, device=self.device)
        refs = []
        for other in self.map.window(kid):  # newer keyframes hold only a splat of kid's own depth
            o = self.map.keyframe(other)
            if other == kid or o.depth is None:
                continue
            rel = se3_mul(kf.pose_cw, se3_inv(o.pose_cw)).float()
            ref = splat_depth(o.depth, identity, rel, intr)
            if float((ref > 0).float().mean()) > 0.1:
                refs.append(ref)
        return refs

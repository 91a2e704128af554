"""Test-time refinement of the depth module on the user's own video (SfM-TTR, Consistent Video Depth).

    scene = AdaptScene(images, poses_cw, intrinsics, depths, segments)   # a run's keyframes
    adapter = DepthAdapter(model.depth, scene, RefineConfig())
    report = adapter.fit(progress=True)        # fine-tunes a copy of the depth module
    depths = adapter.predict()                 # every keyframe again, with the adapted network

No ground truth is used; the signal comes from the video and the SLAM trajectory:

- **sparse points** (SfM-TTR): each keyframe's pixels triangulated from forward-backward consistent
  DIS flow to its neighbouring keyframes under the SLAM poses, kept where the views see the point
  under enough parallax, agree with each other (at least two views within a relative tolerance) and
  the image has texture. They carry the trajectory's scale, so the loss fixes the network's scale to
  it. `sparse_targets` computes them; the loss is the mean |log d - log z| at those pixels.
- **geometric consistency** (CVD): for a pair of neighbouring keyframes i, j and their flow
  correspondences p -> q, keyframe i's predicted depth at p moved into j must land on q (spatial
  loss, pixels, Huber) and have the depth j predicts at q (disparity loss, |log ratio|), both ways.
- **a regulariser** toward the original prediction (the run's keyframe depth): the mean
  |log d - log d0| over every pixel, so that the network does not drift where there is no signal.

Each keyframe's cost volume takes its `views` nearest keyframes of the same map segment (the
output of a run keeps the keyframes' images only). With `train: matching` (the default) the 2D
encoder and the cost volume's reduction are frozen, so each keyframe's cost volume is computed
once and a step costs the 3D matching of one keyframe and its backward pass (0.36 s at 240x320 on
2 cores, against 0.70 s for the whole depth module).

Validation: every `validation_every`-th keyframe is held out of every loss; its sparse points
measure the error of the original depth and of the adapted network's depth. If the adapted one is
not better, `DepthAdapter.fit` reports `improved = False` and the caller keeps the original.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from v2d.depth import DepthModule
from v2d.errors import InputError, ShapeError
from v2d.flow import DISOptions, dis_flow, fb_targets
from v2d.geometry.camera import pixel_grid, pixel_rays, project, relative_pose, reproject
from v2d.geometry.lie import quat_to_matrix
from v2d.model import normalize_images
from v2d.ranges import NON_NEGATIVE, POSITIVE, Range, Ranges, at_least

__all__ = ["AdaptReport", "AdaptScene", "DepthAdapter", "RefineConfig", "neighbour_views", "sparse_targets",
           "triangulate"]


@dataclass(frozen=True)
class RefineConfig:
    """Settings of test-time refinement (the `refine` section; `v2d run --refine`, `v2d refine`).

    Attributes:
        steps: optimisation steps (each: one pair of neighbouring keyframes).
        minutes: wall-time budget of the optimisation (0 = no limit; whichever of steps and minutes
            ends first).
        lr: Adam learning rate.
        train: "matching" fine-tunes the 3D matching and depth heads: the encoder and the cost
            volume's reduction stay fixed, so each keyframe's cost volume is computed once (and kept
            while they fit in `volume_cache_mb`); "all" fine-tunes the whole depth module (each step
            recomputes the features and volumes: about 2x slower).
        volume_cache_mb: memory for the kept cost volumes (beyond it they are recomputed each step).
        views: neighbouring keyframes in each keyframe's cost volume.
        reach: keyframes on each side a keyframe is matched with (flow, triangulation, consistency).
        sparse_weight, spatial_weight, disparity_weight, prior_weight: weights of the losses.
        spatial_scale: pixels at which the spatial loss turns from quadratic to linear (Huber).
        min_parallax: degrees of parallax a triangulated point needs.
        max_epipolar: pixels a correspondence may lie off the epipolar line the poses predict.
        fb_max: forward-backward flow error (pixels) beyond which a correspondence is dropped.
        flow_edge: relative flow change per pixel (flow gradient, summed over u and v, x and y,
            over the flow's magnitude of at least 1 pixel) beyond which, and within 3 pixels of
            which, a correspondence is dropped: a depth edge, where DIS smooths the flow across and
            puts the background too near (0 = keep all).
        agreement: relative inverse-depth difference within which triangulations from different
            views agree.
        min_views: views that must agree for a sparse point.
        min_gradient: image gradient magnitude (grey levels per pixel) a sparse point needs.
        validation_every: every N-th keyframe is held out of training and measures the result
            (0 = none held out: no validation and no fallback).
        seed: RNG seed of the pair sampling (the refinement is deterministic given it).
    """

    steps: int = 150
    minutes: float = 0.0
    lr: float = 1e-4
    train: Literal["matching", "all"] = "matching"
    volume_cache_mb: int = 1024
    views: int = 4
    reach: int = 2
    sparse_weight: float = 1.0
    spatial_weight: float = 0.05
    disparity_weight: float = 1.0
    prior_weight: float = 0.1
    spatial_scale: float = 1.0
    min_parallax: float = 1.0
    max_epipolar: float = 1.0
    fb_max: float = 1.0
    flow_edge: float = 0.2
    agreement: float = 0.05
    min_views: int = 2
    min_gradient: float = 4.0
    validation_every: int = 5
    seed: int = 0

    RANGES: ClassVar[Ranges] = {
        "steps": NON_NEGATIVE,
        "minutes": NON_NEGATIVE,
        "lr": POSITIVE,
        "volume_cache_mb": NON_NEGATIVE,
        "views": at_least(1),
        "reach": at_least(1),
        "sparse_weight": NON_NEGATIVE,
        "spatial_weight": NON_NEGATIVE,
        "disparity_weight": NON_NEGATIVE,
        "prior_weight": NON_NEGATIVE,
        "spatial_scale": POSITIVE,
        "min_parallax": NON_NEGATIVE,
        "max_epipolar": POSITIVE,
        "fb_max": POSITIVE,
        "flow_edge": NON_NEGATIVE,
        "agreement": Range(lambda v: 0 < v < 1, "a fraction in (0, 1)"),
        "min_views": at_least(1),
        "min_gradient": NON_NEGATIVE,
        "validation_every": Range(lambda v: v == 0 or v >= 2, "0 (none) or at least 2"),
    }


@dataclass
class AdaptScene:
    """A run's keyframes. Shapes: images (K, H, W, 3) uint8 RGB; poses_cw (K, 7) world->camera;
    intrinsics (4,) at (H, W); depths (K, H, W) float32 (0 = unknown), the original prediction;
    segments: the keyframe indices of each map segment (keyframes of different segments have
    different frames and scales and are never paired)."""

    images: np.ndarray
    poses_cw: torch.Tensor
    intrinsics: torch.Tensor
    depths: np.ndarray
    segments: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        K = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ShapeError(f"images: expected (K, H, W, 3) uint8, got {self.images.dtype} {self.images.shape}")
        H, W = self.images.shape[1:3]
        if self.depths.shape != (K, H, W):
            raise ShapeError(f"depths: expected {(K, H, W)}, got {self.depths.shape}")
        if tuple(self.poses_cw.shape) != (K, 7) or not bool(torch.isfinite(self.poses_cw).all()):
            raise ShapeError(f"poses_cw: expected finite (K, 7) = {(K, 7)}, got {tuple(self.poses_cw.shape)}")
        if not np.isfinite(self.depths).all():
            raise InputError("depths: NaN or Inf in the keyframe depth")
        if not self.segments:
            self.segments = [list(range(K))]
        if sorted(k for s in self.segments for k in s) != list(range(K)):
            raise ShapeError(f"segments: expected a partition of the {K} keyframes, got {self.segments}")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class AdaptReport:
    """What `DepthAdapter.fit` did: steps and seconds of the optimisation, the training loss over
    the first and the last 10 % of the steps, the sparse points (training / held out), the held-out
    error (median |log d - log z| over the held-out keyframes' sparse points) of the original depth,
    of the network before adaptation and after, and whether the adapted network is better."""

    steps: int = 0
    seconds: float = 0.0
    targets_seconds: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    train_points: int = 0
    validation_points: int = 0
    validation_keyframes: list[int] = field(default_factory=list)
    error_original: float | None = None
    error_network: float | None = None
    error_adapted: float | None = None
    improved: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def neighbour_views(segments: Sequence[Sequence[int]], views: int) -> dict[int, list[int]]:
    """Each keyframe's `views` nearest keyframes (by position in its segment), nearer first, the
    earlier one first at equal distance; a segment of one keyframe gives it no views.
    """
    out: dict[int, list[int]] = {}
    for seg in segments:
        seg = list(seg)
        for a, k in enumerate(seg):
            order = sorted((b for b in range(len(seg)) if b != a), key=lambda b: (abs(b - a), b))
            out[k] = [seg[b] for b in order[:views]]
    return out


def _pairs(segments: Sequence[Sequence[int]], reach: int) -> list[tuple[int, int]]:
    """Unordered pairs (i < j by position) of keyframes at most `reach` apart in a segment."""
    return [(seg[a], seg[b]) for seg in segments for a in range(len(seg))
            for b in range(a + 1, min(a + reach + 1, len(seg)))]


def triangulate(coords_i: torch.Tensor, coords_j: torch.Tensor, pose_i: torch.Tensor, pose_j: torch.Tensor,
                intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth in camera i of the points seen at coords_i in i and coords_j in j (two-view, least squares
    along i's ray), the parallax angle (degrees) and the distance (pixels) of coords_j from the
    epipolar line's point nearest to it.

    Shapes: coords_i, coords_j (..., 2) [u, v]; pose_i, pose_j (7,) world->camera; intrinsics (4,)
    -> depth, parallax, epipolar (...). Depth is NaN where the rays are parallel.
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    T = relative_pose(pose_i, pose_j)
    R, t = quat_to_matrix(T[3:]), T[:3]
    ray = torch.stack([(coords_i[..., 0] - cx) / fx, (coords_i[..., 1] - cy) / fy,
                       torch.ones_like(coords_i[..., 0])], dim=-1)
    r = ray @ R.T  # X_j = z r + t
    x = (coords_j[..., 0] - cx) / fx
    y = (coords_j[..., 1] - cy) / fy
    # x (z r_z + t_z) = z r_x + t_x  ->  z (x r_z - r_x) = t_x - x t_z, and the same in y
    a1, b1 = x * r[..., 2] - r[..., 0], t[0] - x * t[2]
    a2, b2 = y * r[..., 2] - r[..., 1], t[1] - y * t[2]
    den = a1 * a1 + a2 * a2
    z = torch.where(den > 1e-12, (a1 * b1 + a2 * b2) / den.clamp_min(1e-12), torch.full_like(den, float("nan")))
    X = z[..., None] * r + t
    uv = project(X, intrinsics)
    epi = (uv - coords_j).norm(dim=-1)
    # the angle at the point between the rays from the two camera centres (i's centre is t in j's frame)
    v1, v2 = X - t, X
    cos = (v1 * v2).sum(-1) / (v1.norm(dim=-1) * v2.norm(dim=-1)).clamp_min(1e-12)
    parallax = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    return z, parallax, epi


def _gradient(image: np.ndarray) -> np.ndarray:
    """Grey-level gradient magnitude per pixel (Sobel / 8). Shapes: (H, W, 3) uint8 -> (H, W) float32."""
    import cv2

    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    return np.sqrt(gx * gx + gy * gy)


_CONSISTENCY_STRIDE = 2  # the consistency losses use every 2nd pixel's matches in each direction
_EDGE_RADIUS = 3  # pixels around a steep flow change left out (`RefineConfig.flow_edge`)


class _Correspondences:
    """Forward-backward consistent DIS matches of neighbouring keyframes (guided by the original
    depth's predicted flow, at full resolution), computed once per ordered pair.

    `get(i, j)` -> (pixels of i (M, 2) long [v, u], their matches in j (M, 2) float [u, v]).
    """

    def __init__(self, scene: AdaptScene, pairs: list[tuple[int, int]], fb_max: float, edge: float) -> None:
        H, W = scene.size
        intr = scene.intrinsics.double()
        self._data: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        grid = pixel_grid(H, W, dtype=torch.float64)
        for i, j in pairs:
            flows = {}
            for a, b in ((i, j), (j, i)):
                inv = torch.from_numpy(scene.depths[a]).double()
                inv = torch.where(inv > 0, 1.0 / inv.clamp_min(1e-6), torch.zeros_like(inv))
                coords, depth_b = reproject(inv, scene.poses_cw[a].double(), scene.poses_cw[b].double(), intr)
                ok = (depth_b > 1e-3) & torch.isfinite(coords).all(-1) & (inv > 0)
                guess = torch.where(ok[..., None], coords - grid, 0.0).float().numpy()
                flows[a, b] = dis_flow(scene.images[a], scene.images[b], "medium", init=guess, finest_scale=0)
            for a, b in ((i, j), (j, i)):
                self._data[a, b] = self._match(flows[a, b], flows[b, a], fb_max, edge)

    @staticmethod
    def _match(fwd: np.ndarray, bwd: np.ndarray, fb_max: float, edge: float) -> tuple[torch.Tensor, torch.Tensor]:
        import cv2

        targets, weights = fb_targets(fwd, bwd, DISOptions(fb_max=fb_max))  # 0 beyond fb_max or outside
        target = targets.numpy()
        ok = weights[..., 0].numpy() > 0
        if edge > 0:
            # DIS smooths the flow across depth edges: the background beside a near object takes on
            # its motion in both directions, so the forward-backward check passes and triangulation
            # puts it too near. Pixels within a few pixels of a steep flow change are left out.
            grad = sum(np.abs(cv2.Sobel(np.ascontiguousarray(fwd[..., c]), cv2.CV_32F, dx, 1 - dx, ksize=3)) / 8.0
                       for c in range(2) for dx in (0, 1))
            rel = grad / np.maximum(np.linalg.norm(fwd, axis=-1), 1.0)  # a depth edge changes the flow relatively
            steep = cv2.dilate((rel > edge).astype(np.uint8), np.ones((2 * _EDGE_RADIUS + 1,) * 2, np.uint8))
            ok &= steep == 0
        vv, uu = np.nonzero(ok)
        return torch.from_numpy(np.stack([vv, uu], -1)).long(), torch.from_numpy(target[vv, uu]).float()

    def get(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._data[i, j]

    def thin(self, stride: int) -> None:
        """Keep the matches of every `stride`-th pixel in each direction (after the sparse points are
        made: the consistency losses need no full resolution, and the memory falls by stride^2)."""
        for key, (pix, q) in self._data.items():
            keep = (pix[:, 0] % stride == 0) & (pix[:, 1] % stride == 0)
            self._data[key] = pix[keep].contiguous(), q[keep].contiguous()


def sparse_targets(scene: AdaptScene, k: int, others: Sequence[int], matches: _Correspondences,
                   cfg: RefineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Keyframe k's multi-view consistent points: pixels (M, 2) long [v, u] and depths (M,) float32.

    Each view j in `others` triangulates k's matched pixels (`triangulate`); a view's estimate counts
    where its parallax is at least `min_parallax`, the match lies within `max_epipolar` of the
    epipolar line and the depth is positive. A pixel is kept where at least `min_views` estimates
    agree (inverse depth within `agreement` of their median) and the gradient is at least
    `min_gradient`; its depth is the parallax-weighted mean of the agreeing inverse depths.
    """
    H, W = scene.size
    intr = scene.intrinsics.double()
    inv = torch.full((len(others), H, W), float("nan"), dtype=torch.float64)
    wts = torch.zeros((len(others), H, W), dtype=torch.float64)
    for n, j in enumerate(others):
        pix, q = matches.get(k, j)
        if not len(pix):
            continue
        ci = torch.stack([pix[:, 1], pix[:, 0]], -1).double()
        z, par, epi = triangulate(ci, q.double(), scene.poses_cw[k].double(), scene.poses_cw[j].double(), intr)
        ok = torch.isfinite(z) & (z > 1e-3) & (par >= cfg.min_parallax) & (epi <= cfg.max_epipolar)
        p = pix[ok]
        inv[n, p[:, 0], p[:, 1]] = 1.0 / z[ok]
        wts[n, p[:, 0], p[:, 1]] = par[ok]
    med = inv.nanmedian(dim=0).values
    agree = torch.isfinite(inv) & ((inv - med).abs() <= cfg.agreement * med)
    count = agree.sum(0)
    textured = torch.from_numpy(_gradient(scene.images[k]) >= cfg.min_gradient)
    keep = (count >= cfg.min_views) & textured
    w = torch.where(agree, wts, 0.0)
    mean_inv = (torch.where(agree, inv, 0.0) * w).sum(0) / w.sum(0).clamp_min(1e-12)
    vv, uu = torch.nonzero(keep, as_tuple=True)
    return torch.stack([vv, uu], -1), (1.0 / mean_inv[vv, uu]).float()


def _sample(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of image (H, W) at uv (M, 2) [u, v] pixel coordinates -> (M,)."""
    H, W = image.shape
    g = torch.stack([uv[:, 0] / (W - 1) * 2 - 1, uv[:, 1] / (H - 1) * 2 - 1], -1)
    return F.grid_sample(image[None, None], g[None, None], mode="bilinear", align_corners=True)[0, 0, 0]


class DepthAdapter:
    """Fine-tunes a copy of a depth module on a run's keyframes (the module passed in is not changed).

    A step trains one keyframe i: its sparse-point and prior losses, and the consistency losses with
    each neighbouring keyframe j within `reach` (both ways: i's matches moved into j, and j's into
    i), against j's latest prediction (held fixed in the step; it is refreshed whenever j is trained).
    """

    def __init__(self, depth: DepthModule, scene: AdaptScene, cfg: RefineConfig = RefineConfig()) -> None:
        self.cfg, self.scene = cfg, scene
        self.net = copy.deepcopy(depth).float().eval()  # GroupNorm: no batch statistics to freeze
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.views = neighbour_views(scene.segments, cfg.views)
        K = len(scene)
        every = cfg.validation_every
        self.held_out = [k for k in range(K) if every and K >= every and k % every == every // 2]
        held = set(self.held_out)
        self.partners: dict[int, list[int]] = {k: [] for k in range(K)}
        for i, j in _pairs(scene.segments, cfg.reach):
            self.partners[i].append(j)
            self.partners[j].append(i)
        self.train_frames = [k for k in range(K) if k not in held and self.views[k]]
        dev = next(self.net.parameters()).device
        self.intr = scene.intrinsics.float().to(dev)
        self.poses = scene.poses_cw.float().to(dev)
        self.prior = torch.from_numpy(scene.depths).float().to(dev)
        self._images = normalize_images(torch.from_numpy(scene.images).to(dev).permute(0, 3, 1, 2).float() / 255.0)
        self._feats: torch.Tensor | None = None
        self._volumes: dict[int, torch.Tensor] = {}
        self._latest: dict[int, torch.Tensor] = {}
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.matches: _Correspondences | None = None

    # ------------------------------------------------------------------ network
    def _trainable(self, name: str) -> bool:
        return self.cfg.train == "all" or name.startswith(("matching.", "heads."))

    def _features(self, frames: list[int], grad: bool) -> torch.Tensor:
        if grad and self.cfg.train == "all":
            return self.net.features(self._images[frames])
        if self._feats is None:
            with torch.no_grad():
                self._feats = torch.cat([self.net.features(self._images[a:a + 8])
                                         for a in range(0, len(self.scene), 8)])
        return self._feats[frames]

    def _volume(self, k: int, grad: bool) -> torch.Tensor:
        """Keyframe k's fused cost volume against its neighbour keyframes (B = 1); kept while the
        volumes fit in `volume_cache_mb` when only the matching is trained (the volume is then fixed)."""
        if k in self._volumes:
            return self._volumes[k]
        frames = [k, *self.views[k]]
        fixed = self.cfg.train == "matching"
        with torch.set_grad_enabled(grad and not fixed):
            vol = self.net.cost_volume(self._features(frames, grad)[None], self.poses[frames][None], self.intr[None],
                                       self.scene.size)
        if fixed and (len(self._volumes) + 1) * vol.numel() * vol.element_size() <= self.cfg.volume_cache_mb * 2**20:
            self._volumes[k] = vol
        return vol

    def _depth(self, k: int, grad: bool) -> torch.Tensor:
        """Keyframe k's depth (H, W) from the current network against its neighbour keyframes."""
        vol = self._volume(k, grad)
        with torch.set_grad_enabled(grad):
            return self.net.match(vol, self.scene.size)[-1][0]

    # ------------------------------------------------------------------ targets
    def prepare(self) -> float:
        """Compute the correspondences and sparse points (once); returns the seconds it took."""
        if self.matches is not None:
            return 0.0
        t0 = time.perf_counter()
        self.matches = _Correspondences(self.scene, _pairs(self.scene.segments, self.cfg.reach), self.cfg.fb_max,
                                        self.cfg.flow_edge)
        for k, others in self.partners.items():
            if len(others) >= self.cfg.min_views:
                pix, z = sparse_targets(self.scene, k, others, self.matches, self.cfg)
                self.targets[k] = pix.to(self.intr.device), z.to(self.intr.device)
        self.matches.thin(_CONSISTENCY_STRIDE)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ losses
    def _sparse(self, k: int, depth: torch.Tensor) -> torch.Tensor:
        pix, z = self.targets.get(k, (None, None))
        if pix is None or not len(pix):
            return depth.new_zeros(())
        d = depth[pix[:, 0], pix[:, 1]].clamp_min(1e-3)
        return (d.log() - z.log()).abs().mean()

    def _consistency(self, i: int, j: int, di: torch.Tensor, dj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial (Huber, pixels) and disparity (|log ratio|) losses of i's matches moved into j."""
        pix, q = (x.to(di.device) for x in self.matches.get(i, j))
        zero = di.new_zeros(())
        if not len(pix):
            return zero, zero
        H, W = self.scene.size
        rays = pixel_rays(self.intr, H, W)[pix[:, 0], pix[:, 1]]
        T = relative_pose(self.poses[i], self.poses[j])
        R, t = quat_to_matrix(T[3:]), T[:3]
        X = di[pix[:, 0], pix[:, 1]].clamp_min(1e-3)[:, None] * rays @ R.T + t
        front = X[:, 2] > 1e-3
        if not bool(front.any()):
            return zero, zero
        X, q = X[front], q[front]
        uv = project(X, self.intr)
        spatial = F.huber_loss(uv, q, delta=self.cfg.spatial_scale, reduction="none").sum(-1).mean()
        disparity = (X[:, 2].log() - _sample(dj, q).clamp_min(1e-3).log()).abs().mean()
        return spatial, disparity

    def _prior(self, k: int, depth: torch.Tensor) -> torch.Tensor:
        d0 = self.prior[k]
        ok = d0 > 0
        return (depth[ok].clamp_min(1e-3).log() - d0[ok].log()).abs().mean()

    def loss(self, i: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of keyframe i, with its parts (the consistency terms averaged over i's partners)."""
        c = self.cfg
        di = self._depth(i, grad=True)
        sparse, prior = self._sparse(i, di), self._prior(i, di)
        spatial, disparity = di.new_zeros(()), di.new_zeros(())
        partners = [j for j in self.partners[i] if j in self._latest and j not in self.held_out]
        for j in partners:
            s1, d1 = self._consistency(i, j, di, self._latest[j])
            _, d2 = self._consistency(j, i, self._latest[j], di)  # j's spatial term does not depend on di
            spatial, disparity = spatial + s1 / len(partners), disparity + (d1 + d2) / len(partners)
        total = c.sparse_weight * sparse + c.spatial_weight * spatial + c.disparity_weight * disparity \
            + c.prior_weight * prior
        self._latest[i] = di.detach()
        parts = {"sparse": float(sparse.detach()), "spatial": float(spatial.detach()),
                 "disparity": float(disparity.detach()), "prior": float(prior.detach())}
        return total, parts

    # ------------------------------------------------------------------ validation
    def validation_error(self, depths: dict[int, torch.Tensor]) -> float | None:
        """Median |log d - log z| over the held-out keyframes' sparse points (None without any)."""
        errs = []
        for k in self.held_out:
            pix, z = self.targets.get(k, (None, None))
            if pix is None or not len(pix) or k not in depths:
                continue
            d = depths[k][pix[:, 0], pix[:, 1]].clamp_min(1e-3)
            errs.append((d.log() - z.log()).abs())
        return float(torch.cat(errs).median()) if errs else None

    # ------------------------------------------------------------------ driver
    def fit(self, progress: bool = False) -> AdaptReport:
        """Fine-tune for `steps` steps or `minutes`, whichever ends first. The report's `improved`
        says whether the held-out error of the network went down (the adapted against the network
        before adaptation; True when nothing is held out and some step was taken)."""
        from tqdm import tqdm

        c = self.cfg
        report = AdaptReport(validation_keyframes=list(self.held_out))
        report.targets_seconds = self.prepare()
        train = set(self.train_frames)
        report.train_points = sum(len(z) for k, (_, z) in self.targets.items() if k in train)
        report.validation_points = sum(len(self.targets[k][1]) for k in self.held_out if k in self.targets)
        report.error_original = self.validation_error({k: self.prior[k] for k in self.held_out})
        self._latest = {k: d.to(self.intr.device) for k, d in self.predict().items()}
        report.error_network = self.validation_error(self._latest)
        params = [p for n, p in self.net.named_parameters() if self._trainable(n)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=c.lr)
        rng = np.random.default_rng(c.seed)
        losses: list[float] = []
        t0 = time.perf_counter()
        bar = tqdm(total=c.steps, desc="v2d refine", unit="step", disable=not progress, dynamic_ncols=True)
        try:
            for step in range(c.steps if self.train_frames else 0):
                if c.minutes and time.perf_counter() - t0 > 60.0 * c.minutes:
                    break
                total, _ = self.loss(self.train_frames[int(rng.integers(len(self.train_frames)))])
                if not bool(torch.isfinite(total)):
                    continue
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                losses.append(float(total.detach()))
                report.steps = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(False)
        report.seconds = time.perf_counter() - t0
        if losses:
            n = max(1, math.ceil(0.1 * len(losses)))
            report.loss_first, report.loss_last = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
        if c.train == "all":
            self._feats, self._volumes = None, {}
        adapted = {k: self._depth(k, grad=False) for k in self.held_out if self.views[k]}
        report.error_adapted = self.validation_error(adapted)
        if not losses:
            report.improved = False
        elif report.error_adapted is not None and report.error_network is not None:
            report.improved = report.error_adapted < report.error_network
        return report

    @torch.no_grad()
    def predict(self, keyframes: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Depth (H, W) float32 of each keyframe (default all with neighbour views) from the current network."""
        ks = [k for k in (range(len(self.scene)) if keyframes is None else keyframes) if self.views[k]]
        return {k: self._depth(k, grad=False).float().cpu() for k in ks}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapted depth module's parameters."""
        return self.net.state_dict()

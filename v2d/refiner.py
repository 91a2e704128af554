"""The learned motion update (Flow-SE3 on top of DIS): residual flow and confidence, interleaved with
Gauss-Newton steps.

Classical flow (OpenCV DIS with a forward-backward check) gives targets and weights; a least-squares
pose from them is re-weighted by each target's residual (Cauchy IRLS, `robust_weights`): that is
the "DIS mode" every run used before this module. `FlowRefiner` looks at each target where the
current poses and depth put it and predicts

- a residual flow added to the target (DIS picks the wrong match on repeated texture, under blur,
  at occlusions and exposure changes; a small correlation volume around the target shows the
  alternatives: the target frame's features are warped to the source frame by the targets and
  correlated with the source's at integer shifts, PWC-Net-style, which costs a few milliseconds
  where sampling a RAFT-style window at every pixel costs tens), and
- a change of the target's log-weight (what the robust weight cannot see: the photometric error of
  the match, occluders, textureless regions),

which the Gauss-Newton layer turns into a pose update (`motion_updates`). Its last layer starts at
zero, so an untrained refiner reproduces the DIS mode exactly (tested): training can only move it
from where DIS is. It runs at 1/4 of the image size (features, correlation and network); its
output is interpolated to the grid the Gauss-Newton layer runs on.

Everything here is per edge (a source frame i with depth, a target frame j), so tracking (keyframe
-> frame) and the mapper's window (keyframe <-> keyframe) use the same update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from v2d.errors import ShapeError
from v2d.geometry import cauchy_weight
from v2d.geometry.camera import reproject, valid_reprojection
from v2d.geometry.gauss_newton import GNOptions, gauss_newton
from v2d.ranges import Ranges, at_least

__all__ = ["Encoded", "FlowRefiner", "RefinerConfig", "UpdateStep", "motion_updates", "robust_weights", "subsample"]

# output scales: the network's raw outputs are small at the start of training
_FLOW_SCALE = 2.0  # full-resolution pixels per unit of output
_LOGW_MIN, _LOGW_MAX = -8.0, 2.0  # the log-weight change is clamped to this range


@dataclass(frozen=True)
class RefinerConfig:
    """The learned update (the `motion.refiner` section).

    Attributes:
        radius: correlation radius in 1/4-resolution pixels ((2r+1)^2 channels; 3 = +-12 px).
        feature_channels: width of the matching features (1/4 resolution).
        context_channels: width of the source frame's context features.
        hidden: width of the update network.
        updates: refinement updates per tracking alignment, each followed by the Gauss-Newton steps
            (the DIS mode makes as many robust re-weightings).
    The weights are the model's (`model.weights`: the shipped file holds the trained refiner).
    """

    radius: int = 3
    feature_channels: int = 32
    context_channels: int = 16
    hidden: int = 32
    updates: int = 1

    RANGES: ClassVar[Ranges] = {
        "radius": at_least(1),
        "feature_channels": at_least(1),
        "context_channels": at_least(1),
        "hidden": at_least(1),
        "updates": at_least(1),
    }


def robust_weights(targets: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, poses: torch.Tensor,
                   ii: torch.Tensor, jj: torch.Tensor, intrinsics: torch.Tensor, scale: float, min_depth: float
                   ) -> torch.Tensor:
    """Weights times a Cauchy factor 1 / (1 + (r / scale)^2) of each target's reprojection residual r.

    DIS flow has no learned confidence; its forward-backward check passes consistent but wrong
    matches (repeated texture, large displacements), which pull a least-squares solution away.
    Reprojections that are not valid get weight 0.

    Shapes: targets, weights (E, H, W, 2); inv (E, H, W); poses (N, 7) float32; ii, jj (E,);
    intrinsics (4,) -> (E, H, W, 2).
    """
    coords, depth_j = reproject(inv, poses[ii], poses[jj], intrinsics)
    valid = valid_reprojection(inv, coords, depth_j, min_depth)
    factor = cauchy_weight(((targets - coords) ** 2).sum(-1), scale) * valid
    return weights * factor[..., None]


def subsample(targets: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, intrinsics: torch.Tensor,
              stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every `stride`-th source pixel of flow targets, as a least-squares problem of its own.

    Pixel (i, j) of the strided grid is pixel (s i, s j) of the full one, so the intrinsics become
    (fx, fy, cx, cy) / s and the target coordinates are divided by s: the Gauss-Newton layer then
    solves the same problem on s^2 times fewer pixels (DIS flow, computed at full resolution, is
    smooth at that scale). Poses are unchanged; a focal length it returns is multiplied by s.

    Shapes: targets, weights (..., H, W, 2); inv (..., H, W); intrinsics (..., 4) ->
    (..., h, w, 2), (..., h, w, 2), (..., h, w), (..., 4) with h = ceil(H / s), w = ceil(W / s).
    """
    if stride == 1:
        return targets, weights, inv, intrinsics
    s = stride
    return (targets[..., ::s, ::s, :] / s, weights[..., ::s, ::s, :], inv[..., ::s, ::s], intrinsics / s)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(E, 3, H, W) in [0, 1] -> (E, 1, H, W) smoothed grey (5x5 box: sampled at 1/4 without aliasing)."""
    g = (0.299 * images[:, :1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
    return F.avg_pool2d(g, 5, stride=1, padding=2, count_include_pad=False)


def _sample(x: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of x (E, C, h, w) at pixel coordinates uv (E, ..., 2) -> (E, C, ...); 0 outside."""
    h, w = x.shape[-2:]
    scale = uv.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    g = (uv * scale - 1).nan_to_num(-2.0)
    squeeze = g.dim() == 3
    if squeeze:
        g = g[:, None]
    out = F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, :, 0] if squeeze else out


def _local_correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """Dot products of a's features with b's at every integer shift up to `radius` (0 outside).

    Shapes: a, b (E, C, h, w) -> (E, (2 radius + 1)^2, h, w), shifts row by row (dy, then dx).
    """
    h, w = a.shape[-2:]
    r = radius
    p = F.pad(b, (r, r, r, r))
    shifts = [(dy, dx) for dy in range(2 * r + 1) for dx in range(2 * r + 1)]
    return torch.stack([(p[:, :, dy:dy + h, dx:dx + w] * a).sum(1) for dy, dx in shifts], dim=1)


@dataclass
class Encoded:
    """Images as the update sees them (`FlowRefiner.encode`). Shapes: features (K, C, H/4, W/4) unit
    length; grey (K, 1, H, W) smoothed grey levels in [0, 1]. `encoded[idx]` picks images."""

    features: torch.Tensor
    grey: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, idx) -> Encoded:
        return Encoded(self.features[idx], self.grey[idx])


class FlowRefiner(nn.Module):
    """Residual flow and log-weight change of flow targets (see the module docstring).

    Call: refiner(source, target, targets, weights, coords, valid, stride) with source, target the
    edges' source and target images, `Encoded` (of E images each; `encode` once, index per edge) or
    (E, 3, H, W) in [0, 1]; targets, weights, coords (E, h, w, 2) on the Gauss-Newton grid (every
    `stride`-th pixel: grid pixel (y, x) is image pixel (stride y, stride x), coordinates in grid
    pixels); valid (E, h, w) bool -> (targets, weights) of the same shapes. stride is 1, 2 or 4.
    """

    def __init__(self, cfg: RefinerConfig = RefinerConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.feature_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, c, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1),
        )
        self.context = nn.Conv2d(c, cfg.context_channels, 1)
        k = 2 * cfg.radius + 1
        inputs = k * k + cfg.context_channels + 6
        h = cfg.hidden
        layers: list[nn.Module] = []
        for i, dil in enumerate((1, 2, 4)):
            layers += [nn.Conv2d(inputs if i == 0 else h, h, 3, padding=dil, dilation=dil), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(h, 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # the untrained refiner is the DIS mode, exactly
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length matching features at 1/4 resolution. Shapes: (E, 3, H, W) -> (E, C, ceil(H/4), ceil(W/4))."""
        return F.normalize(self.encoder((images - 0.45) / 0.25), dim=1)

    def encode(self, images: torch.Tensor) -> Encoded:
        """What the update needs of each image, computed once per image (a keyframe serves many
        edges). Shapes: (K, 3, H, W) in [0, 1] -> Encoded of K images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ShapeError(f"images: expected (K, 3, H, W), got {tuple(images.shape)}")
        return Encoded(self.features(images), _grey(images))

    def forward(self, source: Encoded | torch.Tensor, target: Encoded | torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, stride: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if stride not in (1, 2, 4):
            raise ShapeError(f"stride: expected 1, 2 or 4, got {stride}")
        src = source if isinstance(source, Encoded) else self.encode(source)
        dst = target if isinstance(target, Encoded) else self.encode(target)
        E, h, w = valid.shape
        if len(src) != E or len(dst) != E or src.grey.shape != dst.grey.shape or targets.shape[:-1] != valid.shape:
            raise ShapeError(f"refiner: images {tuple(src.grey.shape)}, {tuple(dst.grey.shape)}, targets "
                             f"{tuple(targets.shape)}, valid {tuple(valid.shape)} do not fit")
        r = 4 // stride
        fi, fj = src.features, dst.features
        h4, w4 = fi.shape[-2:]
        # the 1/4 grid is every r-th pixel of the Gauss-Newton grid; coordinates in 1/4 pixels
        tq = targets[:, ::r, ::r] / r
        cq = coords[:, ::r, ::r] / r
        wq = weights[:, ::r, ::r, :1].permute(0, 3, 1, 2)
        vq = valid[:, ::r, ::r, None].permute(0, 3, 1, 2).to(fi.dtype)
        if tq.shape[1:3] != (h4, w4):
            raise ShapeError(f"refiner: the grid {h}x{w} at stride {stride} does not fit images "
                             f"{tuple(src.grey.shape[-2:])}")
        corr = _local_correlation(fi, _sample(fj, tq), self.cfg.radius)
        gi, gj = src.grey, dst.grey
        g0 = gi[:, :, ::4, ::4]
        photo_t = (_sample(gj, tq * 4) - g0).abs()
        photo_c = (_sample(gj, cq * 4) - g0).abs()
        resid = ((tq - cq).nan_to_num(0.0).permute(0, 3, 1, 2) / 4.0).clamp(-4, 4)
        x = torch.cat([corr, self.context(fi), resid, 4 * photo_t, 4 * photo_c, wq, vq], 1)
        out = self.head(self.body(x))  # (E, 3, h4, w4)
        # back to the Gauss-Newton grid: grid pixel (y, x) is (y / r, x / r) on the 1/4 grid
        if r > 1:
            ys = torch.arange(h, dtype=out.dtype, device=out.device) / r
            xs = torch.arange(w, dtype=out.dtype, device=out.device) / r
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([gx / max(w4 - 1, 1), gy / max(h4 - 1, 1)], -1) * 2 - 1
            out = F.grid_sample(out, grid.expand(E, h, w, 2), mode="bilinear", padding_mode="border",
                                align_corners=True)
        delta = out[:, :2].permute(0, 2, 3, 1) * (_FLOW_SCALE / stride)
        logw = out[:, 2:].permute(0, 2, 3, 1).clamp(_LOGW_MIN, _LOGW_MAX)
        return targets + delta, weights * torch.exp(logw)


@dataclass
class UpdateStep:
    """One update of `motion_updates`. Shapes: poses (N, 7); targets, weights (E, h, w, 2); intrinsics
    (4,) of the grid (changed only when the options optimise the focal length)."""

    poses: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    intrinsics: torch.Tensor


Refine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def motion_updates(poses: torch.Tensor, inv: torch.Tensor, intrinsics: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, opts: GNOptions, scale: float | None,
                   updates: int, refine: Refine | None = None) -> list[UpdateStep]:
    """A pose estimate from flow targets: Gauss-Newton on the targets and their (e.g. forward-backward)
    weights, then `updates` times: robust re-weighting by the residuals at the current poses
    (Cauchy, `scale` in grid pixels; None: the given weights as they are), the refiner's change
    (`refine(targets, weights, coords, valid)`, e.g. a bound `FlowRefiner`; None: the DIS mode) and
    Gauss-Newton again.

    With `opts.optimize_focal` every Gauss-Newton call starts from the previous one's focal length.

    Shapes: poses (N, 7) float32 initial world->camera; inv (E, h, w); intrinsics (4,) of the grid;
    targets, weights (E, h, w, 2); ii, jj (E,) -> one UpdateStep per Gauss-Newton call (the first
    is the unweighted start; differentiable through the refiner and every Gauss-Newton call).
    """
    def gn(t: torch.Tensor, w: torch.Tensor, p: torch.Tensor, k: torch.Tensor) -> UpdateStep:
        out, k_out = gauss_newton(p[None], inv[None].contiguous(), k[None], t[None].contiguous(),
                                  w[None].contiguous(), ii, jj, opts)
        return UpdateStep(out[0], t, w, k_out[0])

    steps = [gn(targets, weights, poses, intrinsics)]
    for _ in range(updates):
        p, k = steps[-1].poses.detach(), steps[-1].intrinsics.detach()
        t = steps[-1].targets
        w = weights if scale is None else robust_weights(t, weights, inv, p, ii, jj, k, scale, opts.min_depth)
        if refine is not None:
            coords, depth_j = reproject(inv, p[ii], p[jj], k)
            valid = valid_reprojection(inv, coords, depth_j, opts.min_depth)
            t, w = refine(t, w, coords, valid)
        steps.append(gn(t, w, p, k))
    return steps

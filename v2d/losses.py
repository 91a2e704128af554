"""Training losses of the depth and motion modules (DeepV2D's supervision).

Depth: L1 between predicted and ground-truth depth on pixels with ground truth, normalised by the
valid fraction (a frame with little ground truth weighs as much per valid pixel as a full one),
plus a small edge-aware smoothness term on pixels without ground truth; every hourglass output is
supervised (deep supervision) with its own weight.

Motion (one loss for every motion update: `v2d train` and `v2d train-motion`), per source-target
pair and update:
- pose: the logarithm of the induced-flow error, the mean end-point error (pixels, each pixel's
  clipped at `flow_clip`) of the source pixels moved with the true depth by the estimated instead
  of the true poses, plus `epe_floor`. A scale-free pose error that weighs rotation and translation
  as the image does; the logarithm gives every pair the same say, whether it is 0.1 px or 5 px off
  (a linear loss is ruled by the few pairs no update can save: trained with it, the learned update
  stayed within +-5 % of the DIS mode for 900 steps, docs/TRAINING.md);
- flow: the L1 error (clipped) of the update's flow targets against the true correspondences, where
  the source pixel is visible in the target frame, weighted by `flow_weight` (only where depth is
  registered to the colour image: synthetic data).
Later updates weigh more (`iteration_decay`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from v2d.geometry.camera import backproject, reproject, valid_reprojection
from v2d.geometry.normals import angular_error, normals_from_depth
from v2d.motion import MotionStep
from v2d.ranges import NON_NEGATIVE, POSITIVE, Ranges

__all__ = ["LossConfig", "depth_loss", "motion_loss", "normal_loss", "update_loss", "visible_in_target"]


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (the `loss` section).

    Attributes:
        depth_weights: weight per 3D-hourglass output, last = estimate; a shorter list than the
            number of hourglasses applies to the last ones.
        smoothness: weight of the smoothness term where ground truth is missing.
        flow_clip: per-pixel clip (pixels) of the induced-flow and flow errors.
        epe_floor: pixels added to the induced-flow error before its logarithm.
        flow_weight: weight (per pixel) of the flow targets' error.
        motion: weight of the motion loss in joint training.
        iteration_decay: weight of outer iteration k of K is decay^(K-1-k) (later ones count more).
        normal: weight of the normal head's error, 1 - cos against the normals of the ground-truth
            depth (with `depth.normals`).
        depth_normal: weight of the depth-normal consistency (NAS): |n . (X_q - X_p)| / |X_q - X_p|
            between each pixel's predicted normal and the points of the predicted depth at it and
            its right and lower neighbours (with `depth.normals`).
    """

    depth_weights: tuple[float, ...] = (0.5, 1.0)
    smoothness: float = 0.02
    flow_clip: float = 10.0
    epe_floor: float = 0.05
    flow_weight: float = 0.1
    motion: float = 1.0
    iteration_decay: float = 0.8
    normal: float = 0.2
    depth_normal: float = 0.2

    RANGES: ClassVar[Ranges] = {
        "smoothness": NON_NEGATIVE,
        "flow_clip": POSITIVE,
        "epe_floor": POSITIVE,
        "flow_weight": NON_NEGATIVE,
        "motion": NON_NEGATIVE,
        "iteration_decay": POSITIVE,
        "normal": NON_NEGATIVE,
        "depth_normal": NON_NEGATIVE,
    }


def _smoothness(depth: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Edge-aware first-order smoothness of log depth on `mask` pixels.

    Shapes: depth (B, H, W); image (B, 3, H, W); mask (B, H, W) bool.
    """
    ld = depth.clamp_min(1e-3).log()
    dx, dy = (ld[:, :, 1:] - ld[:, :, :-1]).abs(), (ld[:, 1:] - ld[:, :-1]).abs()
    wx = torch.exp(-(image[..., :, 1:] - image[..., :, :-1]).abs().mean(1) * 10)
    wy = torch.exp(-(image[..., 1:, :] - image[..., :-1, :]).abs().mean(1) * 10)
    mx = (mask[:, :, 1:] & mask[:, :, :-1]).to(depth.dtype)
    my = (mask[:, 1:] & mask[:, :-1]).to(depth.dtype)
    return (dx * wx * mx).sum() / mx.sum().clamp_min(1) + (dy * wy * my).sum() / my.sum().clamp_min(1)


def depth_loss(preds: list[torch.Tensor], gt: torch.Tensor, image: torch.Tensor, cfg: LossConfig
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Deep-supervised depth loss.

    Shapes: preds: list of (B, H, W), one per hourglass; gt (B, H, W) with 0 where unknown;
    image (B, 3, H, W) in [0, 1] (edges for the smoothness term). Returns the loss and its parts.
    """
    valid = gt > 0
    weights = list(cfg.depth_weights)[-len(preds):]
    weights = [weights[0]] * (len(preds) - len(weights)) + weights
    frac = valid.flatten(1).float().mean(1).clamp_min(1e-6)  # (B,)
    total = preds[0].new_zeros(())
    l1_last = preds[0].new_zeros(())
    for w, pred in zip(weights, preds, strict=True):
        l1 = ((pred - gt).abs() * valid).flatten(1).mean(1) / frac  # mean |error| over valid pixels
        l1_last = l1.mean()
        total = total + w * l1_last
        if cfg.smoothness > 0 and (~valid).any():
            total = total + w * cfg.smoothness * _smoothness(pred, image, ~valid)
    return total, {"depth_l1": float(l1_last.detach())}


def normal_loss(normals: torch.Tensor, depth: torch.Tensor, gt: torch.Tensor, intrinsics: torch.Tensor,
                cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The normal head's loss: supervision by the ground truth's normals and depth-normal consistency.

    Supervision: 1 - cos between the predicted normal and the normal of the ground-truth depth
    (`v2d.geometry.normals.normals_from_depth`) where that is valid. Consistency (NAS): for each
    pixel p and its right and lower neighbours q, |n_p . (X_q - X_p)| / |X_q - X_p| with X the
    points of the predicted depth, where the predicted depth has no edge (its own normals valid);
    the gradient reaches both the normals and the depth.

    Shapes: normals (B, 3, H, W) unit; depth (B, H, W) predicted; gt (B, H, W) (0 unknown);
    intrinsics (B, 4). Returns the loss and its parts (depth_normal: the consistency; normal_deg:
    the mean angular error in degrees, absent when no pixel has a ground-truth normal).
    """
    n = normals.permute(0, 2, 3, 1)  # (B, H, W, 3)
    gt_n, gt_ok = normals_from_depth(gt, intrinsics)
    count = gt_ok.flatten(1).sum(1)  # (B,)
    cos = (n * gt_n).sum(-1)
    per_sample = ((1 - cos) * gt_ok).flatten(1).sum(1) / count.clamp_min(1)
    has = count > 0  # a sample without ground-truth normals does not dilute the others
    sup = (per_sample * has).sum() / has.sum().clamp_min(1)
    pts = backproject(depth, intrinsics)
    _, ok = normals_from_depth(depth.detach(), intrinsics)
    terms, count = depth.new_zeros(()), depth.new_zeros(())
    for d, n_p, m in ((pts[:, :, 1:] - pts[:, :, :-1], n[:, :, :-1], ok[:, :, :-1]),
                      (pts[:, 1:] - pts[:, :-1], n[:, :-1], ok[:, :-1])):
        sin = (n_p * d).sum(-1).abs() / d.norm(dim=-1).clamp_min(1e-9)
        terms = terms + torch.where(m, sin, torch.zeros_like(sin)).sum()
        count = count + m.sum()
    consistency = terms / count.clamp_min(1)
    total = cfg.normal * sup + cfg.depth_normal * consistency
    parts = {"depth_normal": float(consistency.detach())}
    if bool(gt_ok.any()):
        with torch.no_grad():
            parts["normal_deg"] = float(angular_error(n[gt_ok], gt_n[gt_ok]).mean())
    return total, parts


def visible_in_target(coords: torch.Tensor, z: torch.Tensor, depth_target: torch.Tensor, px: float,
                      tolerance: float = 0.05) -> torch.Tensor:
    """Where a source pixel, moved to `coords` at depth `z` in the target camera, is the surface the
    target frame sees there (its depth within `tolerance`, relative): not occluded, not off-frame.

    Shapes: coords (E, h, w, 2) grid pixels; z (E, h, w); depth_target (E, H, W) metres (0 unknown);
    px: full-resolution pixels per grid pixel. Returns (E, h, w) bool.
    """
    H, W = depth_target.shape[-2:]
    g = coords * px * coords.new_tensor([2.0 / (W - 1), 2.0 / (H - 1)]) - 1
    there = F.grid_sample(depth_target[:, None], g.nan_to_num(-2.0), mode="nearest", align_corners=True)[:, 0]
    return (there > 0) & ((there - z).abs() < tolerance * z)


def update_loss(coords: torch.Tensor, coords_gt: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor,
                seen: torch.Tensor | None, px: float, cfg: LossConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss of one motion update, per source-target pair (see the module docstring).

    Shapes: coords, coords_gt (..., h, w, 2): the source grid pixels moved (with the true depth) by
    the estimated and by the true poses; valid (..., h, w): where the true reprojection is valid;
    targets (..., h, w, 2): the update's flow targets; seen (..., h, w) or None: where the source pixel
    is visible in the target (the flow term is left out where None); px: full-resolution pixels per
    grid pixel. Returns the loss (mean over the leading dims), the induced-flow error (...,) and the
    flow error (...,) (None without `seen`), both in full-resolution pixels.
    """
    zero = torch.zeros_like(valid, dtype=coords.dtype)
    n = valid.sum((-2, -1)).clamp_min(1)
    err = torch.where(valid, ((coords - coords_gt).norm(dim=-1) * px).clamp(max=cfg.flow_clip), zero).nan_to_num(0.0)
    epe = err.sum((-2, -1)) / n
    loss = torch.log(epe + cfg.epe_floor)
    flow = None
    if seen is not None and cfg.flow_weight > 0:
        m = seen.sum((-2, -1))
        fl = torch.where(seen, ((targets - coords_gt).abs().sum(-1) * px).clamp(max=cfg.flow_clip), zero)
        flow = fl.nan_to_num(0.0).sum((-2, -1)) / m.clamp_min(1)
        loss = loss + cfg.flow_weight * flow  # 0 where no pixel is seen
    return loss.mean(), epe, flow


def motion_loss(steps: list[MotionStep], gt_poses: torch.Tensor, gt_depth: torch.Tensor, intrinsics: torch.Tensor,
                ii: torch.Tensor, jj: torch.Tensor, cfg: LossConfig, flow: bool = True
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """`update_loss` of every outer iteration of the motion module, later ones weighted more.

    Shapes: steps: the motion module's outer iterations (targets at the grid the GN ran on);
    gt_poses (B, N, 7); gt_depth (B, N, H, W) metres of every frame (0 = unknown); intrinsics (B, 4)
    at image resolution; ii, jj (E,). `flow`: supervise the flow targets (needs depth registered to
    the colour image: synthetic data). Returns the loss and its parts (the last iteration's mean
    induced-flow error `flow_epe` and flow error `flow_l1`, pixels).
    """
    B, N, H, W = gt_depth.shape
    h, w = steps[0].targets.shape[2:4]
    s = W // w  # the grid is every s-th pixel (`v2d.refiner.subsample`)
    intr = (intrinsics / s)[:, None]
    depth_s = gt_depth[..., ::s, ::s][:, ii]  # (B, E, h, w)
    inv = torch.where(depth_s > 0, 1.0 / depth_s.clamp_min(1e-6), torch.zeros_like(depth_s))
    coords_gt, z_gt = reproject(inv, gt_poses[:, ii], gt_poses[:, jj], intr)
    valid = valid_reprojection(inv, coords_gt, z_gt, 0.1)
    seen = None
    if flow:
        seen = valid & visible_in_target(coords_gt.flatten(0, 1), z_gt.flatten(0, 1),
                                         gt_depth[:, jj].flatten(0, 1), W / w).unflatten(0, (B, len(ii)))
    total = gt_poses.new_zeros(())
    parts: dict[str, float] = {}
    for k, step in enumerate(steps):
        coords, _ = reproject(inv, step.poses_cw[:, ii], step.poses_cw[:, jj], intr)
        loss, epe, fl = update_loss(coords, coords_gt, valid, step.targets, seen, W / w, cfg)
        total = total + cfg.iteration_decay ** (len(steps) - 1 - k) * loss
        parts = {"flow_epe": float(epe.mean().detach())}
        if fl is not None:
            parts["flow_l1"] = float(fl.mean().detach())
    return total, parts

"""Training losses of the depth and motion modules (DeepV2D's supervision).

Depth: L1 between predicted and ground-truth depth on pixels with ground truth, normalised by the
valid fraction (a frame with little ground truth weighs as much per valid pixel as a full one),
plus a small edge-aware smoothness term on pixels without ground truth; every hourglass output is
supervised (deep supervision) with its own weight.

Motion: for each outer iteration, the flow induced by the predicted poses (keyframe pixels moved
with the ground-truth depth) against the flow induced by the ground-truth poses, L1 per pixel and
clipped so that a few wild pixels cannot dominate; plus the Gauss-Newton residual of the predicted
targets under the ground-truth poses, weighted by the predicted confidence (this trains the flow
network directly), and a confidence regulariser (-log of the confidence) that keeps the network
from switching every pixel off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from v2d.geometry.camera import reproject, scale_intrinsics, valid_reprojection
from v2d.motion import MotionStep
from v2d.ranges import NON_NEGATIVE, POSITIVE, Ranges

__all__ = ["LossConfig", "depth_loss", "motion_loss"]


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (the `loss` section).

    Attributes:
        depth_weights: weight per 3D-hourglass output, last = estimate; a shorter list than the
            number of hourglasses applies to the last ones.
        smoothness: weight of the smoothness term where ground truth is missing.
        flow_clip: per-pixel clip (pixels) of the induced-flow L1.
        residual: weight of the confidence-weighted residual term.
        confidence: weight of the confidence regulariser (-log confidence).
        motion: weight of the motion loss in joint training.
        iteration_decay: weight of outer iteration k of K is decay^(K-1-k) (later ones count more).
    """

    depth_weights: tuple[float, ...] = (0.5, 1.0)
    smoothness: float = 0.02
    flow_clip: float = 10.0
    residual: float = 0.1
    confidence: float = 0.01
    motion: float = 1.0
    iteration_decay: float = 0.8

    RANGES: ClassVar[Ranges] = {
        "smoothness": NON_NEGATIVE,
        "flow_clip": POSITIVE,
        "residual": NON_NEGATIVE,
        "confidence": NON_NEGATIVE,
        "motion": NON_NEGATIVE,
        "iteration_decay": POSITIVE,
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


def motion_loss(steps: list[MotionStep], gt_poses: torch.Tensor, gt_depth: torch.Tensor, intrinsics: torch.Tensor,
                ii: torch.Tensor, jj: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Induced-flow L1 (clipped) + confidence-weighted residual + confidence regulariser.

    Shapes: steps: the motion module's outer iterations; gt_poses (B, N, 7); gt_depth (B, K, H, W)
    of the source frames (0 = unknown); intrinsics (B, 4) at image resolution; ii, jj (E,) with
    ii indexing gt_depth's K frames (0 in keyframe mode). Returns the loss and its parts (the last
    iteration's mean induced-flow error in pixels, `flow_epe`).
    """
    B, K, H, W = gt_depth.shape
    src = ii if K > 1 else torch.zeros_like(ii)
    inv = torch.where(gt_depth > 0, 1.0 / gt_depth.clamp_min(1e-6), torch.zeros_like(gt_depth))[:, src]  # (B,E,H,W)
    coords_gt, depth_gt = reproject(inv, gt_poses[:, ii], gt_poses[:, jj], intrinsics[:, None])
    valid = valid_reprojection(inv, coords_gt, depth_gt, 0.1)
    n = len(steps)
    total = gt_poses.new_zeros(())
    epe = gt_poses.new_zeros(())
    for k, step in enumerate(steps):
        w_k = cfg.iteration_decay ** (n - 1 - k)
        coords, _ = reproject(inv, step.poses_cw[:, ii], step.poses_cw[:, jj], intrinsics[:, None])
        err = (coords - coords_gt).norm(dim=-1)
        err = torch.where(valid, err, torch.zeros_like(err)).nan_to_num(0.0)
        epe = err.sum() / valid.sum().clamp_min(1)
        total = total + w_k * err.clamp(max=cfg.flow_clip).sum() / valid.sum().clamp_min(1)
        # Residual and confidence at the resolution the GN ran at (targets may be at 1/4 scale).
        h, w = step.targets.shape[2:4]
        if (h, w) != (H, W):
            intr_s = scale_intrinsics(intrinsics, w / W, h / H)
            inv_s = F.interpolate(inv, size=(h, w), mode="nearest")
            c_gt, d_gt = reproject(inv_s, gt_poses[:, ii], gt_poses[:, jj], intr_s[:, None])
            v_s = valid_reprojection(inv_s, c_gt, d_gt, 0.1)
        else:
            c_gt, v_s = coords_gt, valid
        if cfg.residual > 0:
            r = (step.targets - c_gt).abs().clamp(max=cfg.flow_clip)
            r = torch.where(v_s[..., None], r * step.weights, torch.zeros_like(r)).nan_to_num(0.0)
            total = total + w_k * cfg.residual * r.sum() / v_s.sum().clamp_min(1)
        if cfg.confidence > 0:
            conf = step.weights.clamp(1e-4, 1.0)
            reg = torch.where(v_s[..., None], -conf.log(), torch.zeros_like(conf))
            total = total + w_k * cfg.confidence * reg.sum() / v_s.sum().clamp_min(1)
    return total, {"flow_epe": float(epe.detach())}

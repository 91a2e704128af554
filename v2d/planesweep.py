"""Classical plane-sweep stereo on raw pixels, built on the cost-volume kernel.

The baseline the learned depth module must beat, and the depth source of the demo until the
networks land: neighbour images are back-projected over depth hypotheses with
`kernels.ops.backproject_volume`, compared with the keyframe (absolute colour difference,
box-filtered over a window) and the lowest cost per pixel wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import ops
from v2d.errors import ShapeError

__all__ = ["inverse_depth_hypotheses", "plane_sweep_depth"]


def inverse_depth_hypotheses(min_depth: float, max_depth: float, num: int, like: torch.Tensor) -> torch.Tensor:
    """`num` depths between min_depth and max_depth, spaced uniformly in inverse depth.

    Shapes: returns (D,) on `like`'s device and dtype, increasing.
    """
    if not 0 < min_depth < max_depth or num < 2:
        raise ShapeError(f"depth range: expected 0 < min_depth < max_depth and num >= 2, got "
                         f"{min_depth}, {max_depth}, {num}")
    inv = torch.linspace(1.0 / max_depth, 1.0 / min_depth, num, dtype=like.dtype, device=like.device)
    return (1.0 / inv).flip(0)


def plane_sweep_depth(
    keyframe: torch.Tensor,
    neighbours: torch.Tensor,
    rel_poses: torch.Tensor,
    intrinsics: torch.Tensor,
    depths: torch.Tensor,
    window: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner-take-all plane-sweep depth of the keyframe.

    A pixel's cost at a hypothesis is the mean absolute colour difference to the neighbours that
    see it (fully inside their image), box-filtered over `window` x `window` pixels.

    Shapes:
        keyframe: (C, H, W) float; neighbours: (M, C, H, W); rel_poses: (M, 3, 4) keyframe camera ->
        neighbour camera; intrinsics: (4,); depths: (D,).
        Returns depth (H, W) and cost (D, H, W) (inf where no neighbour sees the pixel).
    """
    if keyframe.dim() != 3 or neighbours.dim() != 4 or neighbours.shape[1:] != keyframe.shape:
        raise ShapeError(f"neighbours: expected (M, {', '.join(map(str, keyframe.shape))}) for keyframe "
                         f"{tuple(keyframe.shape)}, got {tuple(neighbours.shape)}")
    M = neighbours.shape[0]
    ones = torch.ones_like(neighbours[:, :1])
    feats = torch.cat([neighbours, ones], dim=1).contiguous()
    vol = ops.backproject_volume(feats, rel_poses.contiguous(), intrinsics.expand(M, 4).contiguous(), depths)
    coverage = vol[:, -1]  # (M, D, H, W): 1 where all bilinear taps are inside the image
    seen = (coverage > 0.999).to(vol.dtype)
    diff = (vol[:, :-1] - keyframe[None, :, None]).abs().mean(dim=1)  # (M, D, H, W)
    num = (diff * seen).sum(0)
    den = seen.sum(0)
    pad = window // 2
    num = F.avg_pool2d(num, window, stride=1, padding=pad, count_include_pad=False)
    den = F.avg_pool2d(den, window, stride=1, padding=pad, count_include_pad=False)
    cost = torch.where(den > 0.5 / (window * window), num / den.clamp_min(1e-12), torch.full_like(num, float("inf")))
    depth = depths[cost.argmin(dim=0)]
    return depth, cost

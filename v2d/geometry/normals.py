"""Surface normals of depth maps, in the camera frame (x right, y down, z forward).

A normal points toward the camera (n . ray < 0), so a wall facing the camera has n = (0, 0, -1).
Normals from depth are what the depth module's normal head is trained against (ground-truth
depth), what its depth-normal consistency loss compares with (predicted depth), and what the
evaluation measures the head by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from v2d.geometry.camera import backproject
from v2d.geometry.checks import check_trailing

__all__ = ["angular_error", "normals_from_depth"]


def normals_from_depth(depth: Tensor, intrinsics: Tensor, max_jump: float = 0.05) -> tuple[Tensor, Tensor]:
    """Normals from central differences of the back-projected points, oriented toward the camera.

    A pixel's normal is valid where it and its four neighbours have depth (> 0) and no neighbour's
    depth differs from its own by more than `max_jump` (relative): no normal across a depth edge.
    Border pixels are invalid. Invalid normals are 0.

    Shapes: depth (..., H, W), intrinsics (..., 4) -> normals (..., H, W, 3), valid (..., H, W) bool.
    """
    check_trailing("intrinsics", intrinsics, 4)
    points = backproject(depth, intrinsics)  # (..., H, W, 3)
    dx = torch.zeros_like(points)
    dy = torch.zeros_like(points)
    dx[..., :, 1:-1, :] = points[..., :, 2:, :] - points[..., :, :-2, :]
    dy[..., 1:-1, :, :] = points[..., 2:, :, :] - points[..., :-2, :, :]
    n = torch.linalg.cross(dy, dx, dim=-1)  # x right, y down: dy x dx points toward the camera
    norm = n.norm(dim=-1, keepdim=True)
    valid = (depth > 0) & (norm[..., 0] > 0)
    pad = F.pad(depth.reshape(-1, 1, *depth.shape[-2:]), (1, 1, 1, 1)).reshape(*depth.shape[:-2], depth.shape[-2] + 2,
                                                                               depth.shape[-1] + 2)
    centre = depth.abs()
    for nb in (pad[..., 1:-1, :-2], pad[..., 1:-1, 2:], pad[..., :-2, 1:-1], pad[..., 2:, 1:-1]):
        valid &= (nb > 0) & ((nb - depth).abs() <= max_jump * centre)
    valid[..., 0, :] = False
    valid[..., -1, :] = False
    valid[..., :, 0] = False
    valid[..., :, -1] = False
    n = torch.where(valid[..., None], n / norm.clamp_min(1e-12), torch.zeros_like(n))
    return n, valid


def angular_error(a: Tensor, b: Tensor) -> Tensor:
    """Angle in degrees between unit vectors.

    Shapes: a, b (..., 3) -> (...).
    """
    cos = (a * b).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))

"""Readable pure-torch versions of every op in kernels.ops.

Tests hold the kernels to them and they are the fallback when the extension is missing. They
materialise what the kernels fuse (per-pixel Jacobians, explicit sampling coordinates), so they are
also the baseline of the benchmarks in bench/.
"""

from __future__ import annotations

import torch


def pixel_grid(H: int, W: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates u (column) and v (row), each (H, W), on `like`'s device/dtype."""
    v, u = torch.meshgrid(
        torch.arange(H, dtype=like.dtype, device=like.device),
        torch.arange(W, dtype=like.dtype, device=like.device),
        indexing="ij",
    )
    return u, v


def gn_jacobians(
    inv_depth: torch.Tensor,
    rel_poses: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    min_depth: float,
    with_focal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel Jacobian, residual and validity of `kernels.ops.gn_reduce` (see its docstring).

    Shapes:
        inputs as gn_reduce. Returns J: (E, H, W, 2, K), r: (E, H, W, 2), valid: (E, H, W) bool.
    """
    E, H, W = inv_depth.shape
    u, v = pixel_grid(H, W, inv_depth)
    fx, fy, cx, cy = (c.view(E, 1, 1) for c in intrinsics.unbind(-1))
    R, t = rel_poses[:, :, :3], rel_poses[:, :, 3]

    valid = inv_depth > 0
    d = torch.where(valid, inv_depth, torch.ones_like(inv_depth))
    X = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(d)], dim=-1) / d[..., None]
    P = torch.einsum("eij,ehwj->ehwi", R, X) + t[:, None, None, :]
    valid = valid & (P[..., 2] > min_depth)
    # Safe depth where invalid: those pixels get zero weight, but must not poison gradients with inf.
    Z = torch.where(valid, P[..., 2], torch.ones_like(d))
    a = 1.0 / Z
    x, y = P[..., 0] * a, P[..., 1] * a
    zero, one = torch.zeros_like(a), torch.ones_like(a)

    r = targets - torch.stack([fx * x + cx, fy * y + cy], dim=-1)
    Ju = [a, zero, -x * a, -x * y, one + x * x, -y]
    Jv = [zero, a, -y * a, -(one + y * y), x * y, x]
    if with_focal:
        # d pi / d s for fx, fy <- fx e^s, fy e^s: the projection scales, and the back-projected
        # point moves by dX/ds = -[X_x, X_y, 0], i.e. dP/ds = -q with q = R [X_x, X_y, 0].
        q = torch.einsum("eij,ehwj->ehwi", R, X * X.new_tensor([1.0, 1.0, 0.0]))
        Ju.append(x - a * (q[..., 0] - x * q[..., 2]))
        Jv.append(y - a * (q[..., 1] - y * q[..., 2]))
    J = torch.stack([fx[..., None] * torch.stack(Ju, -1), fy[..., None] * torch.stack(Jv, -1)], dim=-2)
    return J, r, valid


def gn_reduce(
    inv_depth: torch.Tensor,
    rel_poses: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    min_depth: float = 0.1,
    with_focal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `kernels.ops.gn_reduce`: H = sum J^T W J, b = sum J^T W r with J materialised.

    Shapes:
        inv_depth: (E, H, W); rel_poses: (E, 3, 4); intrinsics: (E, 4); targets, weights: (E, H, W, 2).
        Returns H: (E, K, K), b: (E, K), K = 7 if with_focal else 6.
    """
    J, r, valid = gn_jacobians(inv_depth, rel_poses, intrinsics, targets, min_depth, with_focal)
    w = weights * valid[..., None].to(weights.dtype)
    H = torch.einsum("ehwki,ehwk,ehwkj->eij", J, w, J)
    b = torch.einsum("ehwki,ehwk,ehwk->ei", J, w, r)
    return H, b


VOLUME_MIN_DEPTH = 1e-6  # the kernel's kVolumeMinDepth: samples with P_z at or below it are zero


def backproject_volume(
    features: torch.Tensor, rel_poses: torch.Tensor, intrinsics: torch.Tensor, depths: torch.Tensor
) -> torch.Tensor:
    """Reference of `kernels.ops.backproject_volume`: explicit coordinates and one grid_sample call.

    Samples behind the neighbour camera are masked by moving their coordinates far outside the
    image, so grid_sample's zero padding zeroes them (and their gradients) without a second
    volume-sized tensor.

    Shapes:
        features: (M, C, h, w); rel_poses: (M, 3, 4); intrinsics: (M, 4); depths: (D,).
        Returns (M, C, D, h, w).
    """
    M, C, h, w = features.shape
    D = depths.shape[0]
    u, v = pixel_grid(h, w, features)
    fx, fy, cx, cy = (c.view(M, 1, 1, 1) for c in intrinsics.unbind(-1))
    z = depths.view(1, D, 1, 1)
    X = torch.stack(torch.broadcast_tensors(z * (u - cx) / fx, z * (v - cy) / fy, z.expand(M, D, h, w)), dim=-1)
    P = torch.einsum("mij,mdhwj->mdhwi", rel_poses[:, :, :3], X) + rel_poses[:, None, None, None, :, 3]
    valid = P[..., 2] > VOLUME_MIN_DEPTH
    Z = torch.where(valid, P[..., 2], torch.ones_like(P[..., 2]))
    up = fx * P[..., 0] / Z + cx
    vp = fy * P[..., 1] / Z + cy
    grid = torch.stack([2 * up / (w - 1) - 1, 2 * vp / (h - 1) - 1], dim=-1)
    grid = torch.where(valid[..., None], grid, torch.full_like(grid, -10.0))
    out = torch.nn.functional.grid_sample(
        features, grid.reshape(M, D * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out.view(M, C, D, h, w)

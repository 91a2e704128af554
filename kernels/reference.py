"""Readable pure-torch versions of every op in kernels.ops.

Tests hold the kernels to them and they are the fallback when the extension is missing. They
materialise what the kernels fuse (per-pixel Jacobians, explicit sampling coordinates), so they are
also the baseline of the benchmarks in bench/.
"""

from __future__ import annotations

import torch


def pixel_grid(H: int, W: int, like: torch.Tensor, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates u (column) and v (row), each (H, W), on `like`'s device/dtype; with a
    stride, entry (i, j) is the full-resolution pixel (stride j, stride i)."""
    v, u = torch.meshgrid(
        torch.arange(H, dtype=like.dtype, device=like.device) * stride,
        torch.arange(W, dtype=like.dtype, device=like.device) * stride,
        indexing="ij",
    )
    return u, v


def _project(inv_depth: torch.Tensor, rel_poses: torch.Tensor, intrinsics: torch.Tensor, targets: torch.Tensor,
             min_depth: float, stride: int = 1) -> dict[str, torch.Tensor]:
    """The projection both ops linearise (gn.h's gn_linearize): back-projected X, moved P, a = 1/P_z,
    x = P_x a, y = P_y a, the residual r = targets - pi(P) and the validity d > 0, P_z > min_depth.
    Invalid pixels get a = x = y = 0 (finite, so they cannot poison a product with a zero weight).

    Shapes: inv_depth (E, H, W); rel_poses (E, 3, 4); intrinsics (E, 4); targets (E, H, W, 2)
    -> X, P (E, H, W, 3); a, x, y (E, H, W); r (E, H, W, 2); valid (E, H, W) bool.
    """
    E, H, W = inv_depth.shape
    u, v = pixel_grid(H, W, inv_depth, stride)
    fx, fy, cx, cy = (c.view(E, 1, 1) for c in intrinsics.unbind(-1))
    R, t = rel_poses[:, :, :3], rel_poses[:, :, 3]
    valid = inv_depth > 0
    d = torch.where(valid, inv_depth, torch.ones_like(inv_depth))
    X = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(d)], dim=-1) / d[..., None]
    P = torch.einsum("eij,ehwj->ehwi", R, X) + t[:, None, None, :]
    valid = valid & (P[..., 2] > min_depth)
    # Safe depth where invalid: those pixels get zero weight, but must not poison gradients with inf.
    a = torch.where(valid, 1.0 / torch.where(valid, P[..., 2], torch.ones_like(d)), torch.zeros_like(d))
    x, y = P[..., 0] * a, P[..., 1] * a
    r = targets - torch.stack([fx * x + cx, fy * y + cy], dim=-1)
    return dict(X=X, P=P, a=a, x=x, y=y, r=r, valid=valid)


def gn_jacobians(
    inv_depth: torch.Tensor,
    rel_poses: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    min_depth: float,
    with_focal: bool,
    stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel Jacobian, residual and validity of `kernels.ops.gn_reduce` (see its docstring).

    Shapes:
        inputs as gn_reduce. Returns J: (E, H, W, 2, K), r: (E, H, W, 2), valid: (E, H, W) bool.
    """
    pr = _project(inv_depth, rel_poses, intrinsics, targets, min_depth, stride)
    return _pose_jacobian(pr, rel_poses, intrinsics, with_focal), pr["r"], pr["valid"]


def _pose_jacobian(pr: dict[str, torch.Tensor], rel_poses: torch.Tensor, intrinsics: torch.Tensor,
                   with_focal: bool) -> torch.Tensor:
    """d pi / d xi (and d pi / d s with the focal column) from `_project`'s terms; 0 on invalid pixels.

    Shapes: as `_project`'s; rel_poses (E, 3, 4); intrinsics (E, 4) -> (E, H, W, 2, K).
    """
    E = intrinsics.shape[0]
    fx, fy = (c.view(E, 1, 1) for c in intrinsics[:, :2].unbind(-1))
    a, x, y, X = pr["a"], pr["x"], pr["y"], pr["X"]
    one = torch.where(pr["valid"], torch.ones_like(a), torch.zeros_like(a))
    zero = torch.zeros_like(a)
    Ju = [a, zero, -x * a, -x * y, one + x * x, -y]
    Jv = [zero, a, -y * a, -(one + y * y), x * y, x]
    if with_focal:
        # d pi / d s for fx, fy <- fx e^s, fy e^s: the projection scales, and the back-projected
        # point moves by dX/ds = -[X_x, X_y, 0], i.e. dP/ds = -q with q = R [X_x, X_y, 0].
        q = torch.einsum("eij,ehwj->ehwi", rel_poses[:, :, :3], X * X.new_tensor([1.0, 1.0, 0.0]))
        Ju.append(x - a * (q[..., 0] - x * q[..., 2]))
        Jv.append(y - a * (q[..., 1] - y * q[..., 2]))
    return torch.stack([fx[..., None] * torch.stack(Ju, -1), fy[..., None] * torch.stack(Jv, -1)], dim=-2)


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


def ba_jacobians(
    inv_depth: torch.Tensor, rel_poses: torch.Tensor, intrinsics: torch.Tensor, targets: torch.Tensor,
    min_depth: float, stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel terms of `kernels.ops.ba_reduce` for edges whose source inverse depths are given
    per edge: the target pose's Jacobian J = d pi / d xi_j, the inverse-depth column
    J_rho = d pi / d rho, the residual r = targets - pi and the validity (see ba_reduce).
    Invalid pixels have J = J_rho = 0.

    Shapes:
        inv_depth: (E, h, w); rel_poses: (E, 3, 4); intrinsics: (4,); targets: (E, h, w, 2).
        Returns J: (E, h, w, 2, 6), J_rho: (E, h, w, 2), r: (E, h, w, 2), valid: (E, h, w) bool.
    """
    E = inv_depth.shape[0]
    intr = intrinsics.expand(E, 4)
    pr = _project(inv_depth, rel_poses, intr, targets, min_depth, stride)
    J = _pose_jacobian(pr, rel_poses, intr, False)
    # X_h = rho P = R x + rho t: d pi / d rho = (d pi / dX_h) t, with 1 / X_hz = a / rho
    fx, fy = (c.view(E, 1, 1) for c in intr[:, :2].unbind(-1))
    t = rel_poses[:, :, 3].view(E, 1, 1, 3)
    iz = pr["a"] * pr["X"][..., 2]
    J_rho = torch.stack([fx * iz * (t[..., 0] - pr["x"] * t[..., 2]), fy * iz * (t[..., 1] - pr["y"] * t[..., 2])], -1)
    return J, J_rho, pr["r"], pr["valid"]


def ba_reduce(
    inv_depth: torch.Tensor,
    ii: torch.Tensor,
    rel_poses: torch.Tensor,
    adjoints: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    stride: int = 1,
    min_depth: float = 0.1,
    robust_scale: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """Reference of `kernels.ops.ba_reduce` with every per-pixel Jacobian materialised.

    Shapes: as ba_reduce. Returns H_jj (E, 6, 6), g_j (E, 6), c (E, h, w, 6), c_own (K, h, w, 6),
    h_pp (K, h, w), g_p (K, h, w).
    """
    Kf = inv_depth.shape[0]
    J, J_rho, r, valid = ba_jacobians(inv_depth[ii], rel_poses, intrinsics, targets, min_depth, stride)
    w = torch.where(valid, weights, torch.zeros_like(weights))
    if robust_scale > 0:
        w = w / (1.0 + (r**2).sum(-1) / robust_scale**2)
    H = torch.einsum("ehwki,ehw,ehwkj->eij", J, w, J)
    g = torch.einsum("ehwki,ehw,ehwk->ei", J, w, r)
    c = torch.einsum("ehwki,ehw,ehwk->ehwi", J, w, J_rho)
    own = -torch.einsum("ehwa,eab->ehwb", c, adjoints)
    c_own = torch.zeros((Kf, *own.shape[1:]), dtype=own.dtype, device=own.device).index_add_(0, ii, own)
    h_pp = torch.zeros_like(inv_depth).index_add_(0, ii, w * (J_rho**2).sum(-1))
    g_p = torch.zeros_like(inv_depth).index_add_(0, ii, w * (J_rho * r).sum(-1))
    return H, g, c, c_own, h_pp, g_p

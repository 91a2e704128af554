"""Pinhole camera and projective ops.

Conventions:

- `intrinsics` is `(..., 4)` = [fx, fy, cx, cy] in pixels; K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].
- A pixel (col, row) has its centre at integer coordinates u = col, v = row; coordinates are
  `(..., 2)` = [u, v] (x right, y down, z forward). The image covers u in [-0.5, W - 0.5].
- Resizing an image by factors (sx, sy) with `align_corners=False` semantics (torch interpolate,
  OpenCV resize) maps u' = (u + 0.5) sx - 0.5, hence fx' = sx fx and cx' = (cx + 0.5) sx - 0.5 (same
  for y). Cropping at (x0, y0) subtracts x0 from cx and y0 from cy.
- Poses are SE3 world->camera (`poses_cw`) in lietorch layout [t, q] (see `v2d.geometry.lie`).
- `depth` is the z coordinate in the camera frame; `inv_depth` = 1 / depth.

Nothing here clamps: depths <= 0 or points with z = 0 give non-finite values. The validity helpers
(`in_front`, `in_image`, `valid_reprojection`) say which entries are meaningful; drop the others with
`torch.where` before a loss, since multiplying a NaN by a zero mask still gives NaN (and NaN grads).
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from kernels.errors import ShapeError
from v2d.geometry.checks import check_broadcast, check_trailing
from v2d.geometry.lie import quat_to_matrix, se3_inv, se3_mul

__all__ = [
    "backproject",
    "backproject_inv",
    "check_intrinsics",
    "crop_intrinsics",
    "in_front",
    "in_image",
    "intrinsics_from_matrix",
    "intrinsics_to_matrix",
    "pixel_grid",
    "pixel_rays",
    "pose_to_rt",
    "project",
    "relative_pose",
    "reproject",
    "resize_intrinsics",
    "scale_intrinsics",
    "valid_reprojection",
]


def _check_image(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor (..., H, W), got {type(x).__name__}")
    if x.dim() < 2:
        raise ShapeError(f"{name}: expected (..., H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


# --------------------------------------------------------------------------------------------------
# intrinsics


def intrinsics_from_matrix(K: Tensor) -> Tensor:
    """[fx, fy, cx, cy] from a calibration matrix (skew is dropped).

    Shapes:
        K: (..., 3, 3) -> (..., 4)
    """
    check_trailing("K", K, 3, 3)
    return torch.stack([K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]], dim=-1)


def intrinsics_to_matrix(intrinsics: Tensor) -> Tensor:
    """Calibration matrix K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].

    Shapes:
        intrinsics: (..., 4) -> (..., 3, 3)
    """
    check_trailing("intrinsics", intrinsics, 4)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    o, i = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx, o, cx, o, fy, cy, o, o, i], dim=-1).unflatten(-1, (3, 3))


def scale_intrinsics(intrinsics: Tensor, sx: float | Tensor, sy: float | Tensor) -> Tensor:
    """Intrinsics of the image resized by (sx, sy) (align_corners=False pixel-centre convention).

    fx' = sx fx, cx' = (cx + 0.5) sx - 0.5, and the same for y.

    Shapes:
        intrinsics: (..., 4); sx, sy: floats or tensors broadcastable to (...) -> (..., 4)
    """
    check_trailing("intrinsics", intrinsics, 4)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    return torch.stack([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], dim=-1)


def crop_intrinsics(intrinsics: Tensor, x0: float | Tensor, y0: float | Tensor) -> Tensor:
    """Intrinsics of the crop whose top-left pixel is (x0, y0) in the original image.

    Shapes:
        intrinsics: (..., 4); x0, y0: floats or tensors broadcastable to (...) -> (..., 4)
    """
    check_trailing("intrinsics", intrinsics, 4)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    return torch.stack([fx, fy, cx - x0, cy - y0], dim=-1)


def resize_intrinsics(intrinsics: Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> Tensor:
    """Intrinsics after resizing an image from old_hw = (H, W) to new_hw = (H', W').

    Shapes:
        intrinsics: (..., 4) -> (..., 4)
    """
    (h0, w0), (h1, w1) = old_hw, new_hw
    if min(h0, w0, h1, w1) <= 0:
        raise ShapeError(f"resize_intrinsics: sizes must be positive, got old_hw={old_hw}, new_hw={new_hw}")
    return scale_intrinsics(intrinsics, w1 / w0, h1 / h0)


def check_intrinsics(intrinsics: object) -> Tensor:
    """Validate intrinsics: shape (..., 4), finite, fx > 0 and fy > 0; returns them.

    Raises ShapeError quoting the received shape or the first offending entry.

    Shapes:
        intrinsics: (..., 4) -> (..., 4)
    """
    intr = check_trailing("intrinsics", intrinsics, 4)
    finite = torch.isfinite(intr).all(dim=-1)
    if not bool(finite.all()):
        idx = _first_false(finite)
        raise ShapeError(f"intrinsics: expected finite values, got {intr[idx].tolist()} at index {idx}")
    positive = (intr[..., 0] > 0) & (intr[..., 1] > 0)
    if not bool(positive.all()):
        idx = _first_false(positive)
        fx, fy = intr[idx][0].item(), intr[idx][1].item()
        raise ShapeError(f"intrinsics: expected fx > 0 and fy > 0, got fx={fx}, fy={fy} at index {idx}")
    return intr


def _first_false(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in (~mask).nonzero()[0])


# --------------------------------------------------------------------------------------------------
# pixels and points


def pixel_grid(
    H: int, W: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Pixel-centre coordinates: grid[v, u] = [u, v].

    Shapes:
        -> (H, W, 2)
    """
    v, u = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=device),
        torch.arange(W, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def pixel_rays(intrinsics: Tensor, H: int, W: int, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """The ray K^-1 [u, v, 1] through every pixel centre (z = 1, so a point at depth d is d times it).
    The pixel grid is made in `dtype` on `device` (default: the intrinsics'); the result has the
    promoted dtype of the grid and the intrinsics.

    Shapes:
        intrinsics: (..., 4) -> (..., H, W, 3)
    """
    check_trailing("intrinsics", intrinsics, 4)
    grid = pixel_grid(H, W, dtype=intrinsics.dtype if dtype is None else dtype,
                      device=intrinsics.device if device is None else device)
    fx, fy, cx, cy = (c[..., None, None] for c in intrinsics.unbind(-1))
    x = (grid[..., 0] - cx) / fx
    y = (grid[..., 1] - cy) / fy
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def backproject(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Camera-frame points of every pixel: depth * K^-1 [u, v, 1].

    Shapes:
        depth: (..., H, W), intrinsics: (..., 4) -> (..., H, W, 3) (leading dims broadcast)
    """
    _check_image("depth", depth)
    check_trailing("intrinsics", intrinsics, 4)
    check_broadcast("depth", depth, "intrinsics", intrinsics[..., None, :], ndim=2)
    H, W = depth.shape[-2:]
    return pixel_rays(intrinsics, H, W, depth.dtype, depth.device) * depth.unsqueeze(-1)


def backproject_inv(inv_depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Camera-frame points of every pixel: K^-1 [u, v, 1] / inv_depth.

    inv_depth <= 0 gives non-finite or meaningless points (inf, or NaN at the principal point); mask
    them with `valid_reprojection` / `inv_depth > 0`.

    Shapes:
        inv_depth: (..., H, W), intrinsics: (..., 4) -> (..., H, W, 3) (leading dims broadcast)
    """
    _check_image("inv_depth", inv_depth)
    check_trailing("intrinsics", intrinsics, 4)
    check_broadcast("inv_depth", inv_depth, "intrinsics", intrinsics[..., None, :], ndim=2)
    H, W = inv_depth.shape[-2:]
    return pixel_rays(intrinsics, H, W, inv_depth.dtype, inv_depth.device) / inv_depth.unsqueeze(-1)


@overload
def project(points: Tensor, intrinsics: Tensor, jacobian: Literal[False] = ...) -> Tensor: ...
@overload
def project(points: Tensor, intrinsics: Tensor, jacobian: Literal[True]) -> tuple[Tensor, Tensor]: ...
def project(points: Tensor, intrinsics: Tensor, jacobian: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Pinhole projection uv = [fx X/Z + cx, fy Y/Z + cy], optionally with d uv / d points.

    Z = 0 gives inf/NaN; points behind the camera (Z < 0) project to finite but meaningless pixels
    (mask them with `in_front`). For points (..., H, W, 3) and per-image intrinsics pass
    intrinsics[..., None, None, :].

    Shapes:
        points: (..., 3), intrinsics: (..., 4) -> uv (..., 2) and, if jacobian, J (..., 2, 3)
        (leading dims broadcast)
    """
    check_trailing("points", points, 3)
    check_trailing("intrinsics", intrinsics, 4)
    check_broadcast("points", points, "intrinsics", intrinsics)
    X, Y, Z = points.unbind(-1)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    iz = 1.0 / Z
    x, y = X * iz, Y * iz
    uv = torch.stack([fx * x + cx, fy * y + cy], dim=-1)
    if not jacobian:
        return uv
    fx, fy, iz, x, y = torch.broadcast_tensors(fx, fy, iz, x, y)
    o = torch.zeros_like(iz)
    J = torch.stack([fx * iz, o, -fx * x * iz, o, fy * iz, -fy * y * iz], dim=-1).unflatten(-1, (2, 3))
    return uv, J


# --------------------------------------------------------------------------------------------------
# poses


def relative_pose(poses_cw_i: Tensor, poses_cw_j: Tensor) -> Tensor:
    """T_ij = T_j * T_i^-1: maps camera-i coordinates to camera-j coordinates.

    Shapes:
        poses_cw_i: (..., 7), poses_cw_j: (..., 7) -> (..., 7) (leading dims broadcast)
    """
    check_trailing("poses_cw_i", poses_cw_i, 7)
    check_trailing("poses_cw_j", poses_cw_j, 7)
    check_broadcast("poses_cw_i", poses_cw_i, "poses_cw_j", poses_cw_j)
    return se3_mul(poses_cw_j, se3_inv(poses_cw_i))


def pose_to_rt(T: Tensor) -> Tensor:
    """[R | t] rows of an SE3 pose (the layout the kernels take relative poses in).

    Shapes:
        T: (..., 7) -> (..., 3, 4)
    """
    check_trailing("T", T, 7)
    return torch.cat([quat_to_matrix(T[..., 3:]), T[..., :3, None]], dim=-1)


def reproject(
    inv_depth: Tensor, poses_cw_i: Tensor, poses_cw_j: Tensor, intrinsics: Tensor
) -> tuple[Tensor, Tensor]:
    """Move every pixel of keyframe i, at its inverse depth, into camera j.

    Equals project(T_j T_i^-1 backproject_inv(x, inv_depth)) but is computed in homogeneous form
    X_j ~ R_ij K^-1 x + t_ij inv_depth (projection ignores the common 1/inv_depth factor), so
    points at infinity (inv_depth = 0) still get finite coordinates; depth_j = Z_j / inv_depth is
    then infinite. Both outputs are meaningful only where `valid_reprojection` holds.

    Shapes:
        inv_depth: (..., H, W), poses_cw_i: (..., 7), poses_cw_j: (..., 7), intrinsics: (..., 4)
        -> coords (..., H, W, 2) = [u, v] in image j, depth_j (..., H, W) (leading dims broadcast)
    """
    _check_image("inv_depth", inv_depth)
    T_ij = relative_pose(poses_cw_i, poses_cw_j)
    check_trailing("intrinsics", intrinsics, 4)
    check_broadcast("inv_depth", inv_depth, "poses", T_ij[..., None, :], ndim=2)
    check_broadcast("inv_depth", inv_depth, "intrinsics", intrinsics[..., None, :], ndim=2)
    H, W = inv_depth.shape[-2:]
    rays = pixel_rays(intrinsics, H, W, inv_depth.dtype, inv_depth.device)
    R, t = quat_to_matrix(T_ij[..., 3:]), T_ij[..., :3]
    X = torch.einsum("...ij,...hwj->...hwi", R, rays) + t[..., None, None, :] * inv_depth.unsqueeze(-1)
    coords = project(X, intrinsics[..., None, None, :])
    depth_j = X[..., 2] / inv_depth
    return coords, depth_j


# --------------------------------------------------------------------------------------------------
# validity


def in_front(depth_j: Tensor, min_depth: float) -> Tensor:
    """depth_j > min_depth (False for NaN).

    Shapes:
        depth_j: (...) -> bool (...)
    """
    return depth_j > min_depth


def in_image(coords: Tensor, H: int, W: int, margin: float = 0.0) -> Tensor:
    """Coordinates inside [margin, W - 1 - margin] x [margin, H - 1 - margin] (False for NaN).

    With margin = 0 this is the region where bilinear sampling touches only real pixel centres.

    Shapes:
        coords: (..., 2) = [u, v] -> bool (...)
    """
    check_trailing("coords", coords, 2)
    u, v = coords.unbind(-1)
    return (u >= margin) & (u <= W - 1 - margin) & (v >= margin) & (v <= H - 1 - margin)


def valid_reprojection(
    inv_depth: Tensor, coords: Tensor, depth_j: Tensor, min_depth: float, margin: float = 0.0
) -> Tensor:
    """Pixels whose reprojection is meaningful: inv_depth > 0, depth_j > min_depth, coords in image j.

    Image j is assumed to have the same size (H, W) as the inverse-depth map.

    Shapes:
        inv_depth: (..., H, W), coords: (..., H, W, 2), depth_j: (..., H, W) -> bool (..., H, W)
    """
    _check_image("inv_depth", inv_depth)
    H, W = inv_depth.shape[-2:]
    return (inv_depth > 0) & in_front(depth_j, min_depth) & in_image(coords, H, W, margin)

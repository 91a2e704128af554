"""Keyframe depth fusion: forward splatting, multi-view consistency, fused coloured clouds, PLY output.

A keyframe pixel enters the fused cloud only when nearby keyframes see a surface at the same depth
(the usual multi-view-stereo fusion test), so one bad depth map does not scatter floaters through
the cloud. All lookups are nearest-pixel: interpolating depth across an object's silhouette would
invent points between foreground and background.

Depth maps mark invalid pixels with 0 or a non-finite value. Open3D is imported inside the
functions that need it (importing it is slow and needs libusb).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from v2d.errors import InputError, NumericalError, ShapeError
from v2d.geometry.camera import backproject, project, relative_pose
from v2d.geometry.lie import quat_to_matrix, se3_act, se3_inv
from v2d.io.writers import atomic_write_named

__all__ = ["fuse_keyframes", "relative_disagreement", "splat_depth", "write_ply"]

_log = logging.getLogger(__name__)

# Open3D 0.20 refuses to write a cloud without points ("Write PLY failed: point cloud has 0 points")
# although a PLY file with zero vertices is valid; write_ply then writes this header itself, with
# the properties Open3D writes for a coloured cloud (its reader returns an empty cloud for it).
_EMPTY_PLY = (
    b"ply\nformat binary_little_endian 1.0\ncomment Created by v2d\nelement vertex 0\n"
    b"property double x\nproperty double y\nproperty double z\n"
    b"property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
)


# --------------------------------------------------------------------------------------------------
# validation


def _check_depth(name: str, depth: object) -> Tensor:
    if not isinstance(depth, Tensor) or depth.dim() != 2 or not depth.is_floating_point():
        got = f" {tuple(depth.shape)} {depth.dtype}" if isinstance(depth, Tensor | np.ndarray) else ""
        raise ShapeError(f"{name}: expected a floating-point torch.Tensor (H, W), got {type(depth).__name__}{got}")
    return depth


def _check_vector(name: str, x: object, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A finite float tensor of `shape`, moved to the dtype and device of `like`."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor) or tuple(x.shape) != shape or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{name}: expected a floating-point tensor {shape}, got {got}")
    if not bool(torch.isfinite(x).all()):
        raise NumericalError(f"{name}: expected finite values, got {x.tolist()}")
    return x.to(dtype=like.dtype, device=like.device)


def _check_intrinsics(intrinsics: object, like: Tensor) -> Tensor:
    intr = _check_vector("intrinsics", intrinsics, (4,), like)
    if not (intr[0] > 0 and intr[1] > 0):
        raise ShapeError(f"intrinsics: expected fx > 0 and fy > 0, got {intr.tolist()}")
    return intr


def _check_rel_tol(rel_tol: float) -> float:
    if not (isinstance(rel_tol, int | float) and math.isfinite(rel_tol) and rel_tol >= 0):
        raise InputError(f"rel_tol: expected a finite number >= 0, got {rel_tol!r}")
    return float(rel_tol)


def _check_count(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise InputError(f"{name}: expected an int >= 0, got {n!r}")
    return int(n)


def _check_depth_stack(depths: Sequence[object], poses_cw: object, intrinsics: object
                       ) -> tuple[list[Tensor], Tensor, Tensor]:
    if len(depths) == 0:
        raise ShapeError("depths: expected at least one (H, W) depth map, got none")
    deps = [_check_depth(f"depths[{i}]", d) for i, d in enumerate(depths)]
    for i, d in enumerate(deps):
        if d.shape != deps[0].shape or d.dtype != deps[0].dtype or d.device != deps[0].device:
            raise ShapeError(f"depths[{i}]: expected {tuple(deps[0].shape)} {deps[0].dtype} on {deps[0].device} "
                             f"like depths[0], got {tuple(d.shape)} {d.dtype} on {d.device}")
    poses = _check_vector("poses_cw", poses_cw, (len(deps), 7), deps[0])
    return deps, poses, _check_intrinsics(intrinsics, deps[0])


# --------------------------------------------------------------------------------------------------
# geometry


def _valid(depth: Tensor) -> Tensor:
    return torch.isfinite(depth) & (depth > 0)


def _warp(depth: Tensor, T_src_dst: Tensor, intrinsics: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest destination pixel (flat index v * W + u), destination depth and validity of every pixel.

    A pixel is valid when its depth is, it lands in front of the destination camera and its
    rounded projection is inside the image. `index` is 0 where it is not valid.

    Shapes:
        depth: (H, W), T_src_dst: (7,), intrinsics: (4,) -> index (H, W) int64, z (H, W), ok (H, W) bool
    """
    H, W = depth.shape
    valid = _valid(depth)
    X = se3_act(T_src_dst, backproject(torch.where(valid, depth, 1.0), intrinsics))
    z = X[..., 2]
    # Pixel (u, v) covers [u - 0.5, u + 0.5); NaN/inf from z <= 0 fail the range tests below.
    col, row = torch.floor(project(X, intrinsics) + 0.5).unbind(-1)
    ok = valid & (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    # Integer arithmetic: a float32 index would lose pixels beyond 2^24.
    index = torch.where(ok, row, 0.0).long() * W + torch.where(ok, col, 0.0).long()
    return index, z, ok


def splat_depth(depth: Tensor, pose_cw_src: Tensor, pose_cw_dst: Tensor, intrinsics: Tensor) -> Tensor:
    """Forward-warp a depth map into another camera with a z-buffer (nearest pixel, nearest surface).

    Every valid source pixel is moved to the destination pixel nearest to its projection; where
    several land on one pixel the smallest destination depth wins. Pixels nothing lands on (holes,
    disocclusions, outside the source view) are 0. Used to initialise a new keyframe's depth from
    the previous keyframe's.

    Shapes:
        depth: (H, W) float (0 or non-finite = invalid), pose_cw_src: (7,), pose_cw_dst: (7,),
        intrinsics: (4,) -> (H, W) depth in the destination camera, dtype and device of `depth`
    """
    depth = _check_depth("depth", depth)
    src = _check_vector("pose_cw_src", pose_cw_src, (7,), depth)
    dst = _check_vector("pose_cw_dst", pose_cw_dst, (7,), depth)
    intr = _check_intrinsics(intrinsics, depth)
    index, z, ok = _warp(depth, relative_pose(src, dst), intr)
    out = depth.new_full((depth.numel(),), torch.inf)
    out = out.scatter_reduce(0, index[ok], z[ok], reduce="amin")
    return torch.where(torch.isinf(out), 0.0, out).view(depth.shape)


def _compare(depth_src: Tensor, depth_dst: Tensor, T_src_dst: Tensor, intrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Per source pixel: |z - d_dst| / d_dst at its nearest destination pixel, and whether it was
    compared (valid, in front, inside, on a known destination depth).

    Shapes: depth_src, depth_dst (H, W), T_src_dst (7,), intrinsics (4,) -> rel (H, W), hit (H, W) bool
    """
    index, z, ok = _warp(depth_src, T_src_dst, intrinsics)
    d_dst = depth_dst.reshape(-1)[index].view(depth_src.shape)
    hit = ok & _valid(d_dst)
    return (z - d_dst).abs() / torch.where(hit, d_dst, 1.0), hit


def _consistency(depths: list[Tensor], poses_cw: Tensor, intrinsics: Tensor, k: int, neighbours: Sequence[int],
                 rel_tol: float) -> Tensor:
    """How many of the neighbour keyframes agree with each pixel of keyframe k.

    A valid pixel of k agrees with neighbour n when it lands in front of camera n, its nearest pixel
    there is inside the image with a valid depth d_n, and its depth z in camera n satisfies
    |z - d_n| <= rel_tol * d_n. A pixel occluded in n disagrees with n.

    Shapes: depths K x (H, W), poses_cw (K, 7), intrinsics (4,) -> (H, W) int64 counts
    """
    count = torch.zeros(depths[k].shape, dtype=torch.int64, device=depths[k].device)
    for n in neighbours:
        rel, hit = _compare(depths[k], depths[n], relative_pose(poses_cw[k], poses_cw[n]), intrinsics)
        count += hit & (rel <= rel_tol)
    return count


def relative_disagreement(depth_i: Tensor, depth_j: Tensor, pose_cw_i: Tensor, pose_cw_j: Tensor,
                          intrinsics: Tensor) -> tuple[Tensor, int]:
    """How far keyframe i's depth, moved into camera j, is from j's own depth.

    Every valid pixel of i is back-projected, moved into camera j and compared, at its nearest
    pixel there, with j's depth: |z - d_j| / d_j. Pixels that leave j's image, land behind it or on
    an unknown depth are skipped; a pixel occluded in j counts as a disagreement (the measure does
    not know which surface is right).

    Shapes:
        depth_i, depth_j: (H, W) float (0 or non-finite = unknown), pose_cw_i, pose_cw_j: (7,),
        intrinsics: (4,) -> ((M,) relative differences of the M compared pixels, valid pixels of i)
    """
    deps, poses, intr = _check_depth_stack([depth_i, depth_j], torch.stack([_as_tensor(pose_cw_i),
                                                                           _as_tensor(pose_cw_j)]), intrinsics)
    rel, hit = _compare(deps[0], deps[1], relative_pose(poses[0], poses[1]), intr)
    return rel[hit], int(_valid(deps[0]).sum())


# --------------------------------------------------------------------------------------------------
# fusion


def _as_tensor(x: object) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))


def fuse_keyframes(
    depths: Sequence[np.ndarray | Tensor],
    images: Sequence[np.ndarray | Tensor],
    poses_cw: Tensor | np.ndarray,
    intrinsics: Tensor | np.ndarray,
    *,
    neighbours: int = 2,
    rel_tol: float = 0.05,
    min_views: int = 1,
    voxel: float = 0.0,
    max_depth: float | None = None,
    normals: Sequence[np.ndarray | Tensor | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Fused coloured point cloud of K keyframes, in world coordinates, with normals when given.

    A pixel of keyframe k is kept when its depth is valid (finite, > 0, <= max_depth if given) and
    it agrees with at least `min_views` of keyframes k - neighbours .. k + neighbours other than k
    (clipped to [0, K)): its depth, moved into neighbour n, is within `rel_tol` (relative) of n's depth
    at the nearest pixel (a pixel that leaves n's image, lands behind n, on an unknown depth or is
    occluded in n disagrees with n); min_views = 0 turns the check off. With one keyframe nothing
    can be checked: its valid pixels are kept and a warning is logged. `voxel` > 0 (metres)
    averages points and colours per voxel of that size, merging every few keyframes so the memory
    follows the scene, not the video length. Geometry runs in float64 on the device of the first depth map; points are
    accumulated in float32 (colours as uint8). `normals` (the depth module's, camera frame) are
    rotated into the world with the points and averaged per voxel; a keyframe without (None) gets
    the normals of its depth map (`v2d.geometry.normals.normals_from_depth`; 0 across depth edges).

    Shapes:
        depths: K x (H, W) float, images: K x (H, W, 3) uint8 RGB, poses_cw: (K, 7) world->camera,
        intrinsics: (4,), normals: K x (H, W, 3) or None -> points (P, 3) float64 world, colors (P, 3)
        float64 RGB in [0, 1], normals (P, 3) float64 world unit (0 where unknown) or None
    """
    if len(depths) != len(images):
        raise ShapeError(f"fuse_keyframes: expected as many images as depth maps, got {len(images)} images "
                         f"and {len(depths)} depth maps")
    neighbours = _check_count("neighbours", neighbours)
    min_views = _check_count("min_views", min_views)
    rel_tol = _check_rel_tol(rel_tol)
    if not (isinstance(voxel, int | float) and math.isfinite(voxel) and voxel >= 0):
        raise InputError(f"voxel: expected a finite size >= 0 (metres), got {voxel!r}")
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int | float)
                                  or not max_depth > 0):
        raise InputError(f"max_depth: expected None or a depth > 0 (metres), got {max_depth!r}")

    device = _as_tensor(depths[0]).device if len(depths) else None
    float_depths = []
    for i, d in enumerate(depths):
        d = _as_tensor(d)
        if not d.is_floating_point():
            raise ShapeError(f"depths[{i}]: expected a floating-point (H, W) depth map, got dtype {d.dtype}")
        float_depths.append(d.to(dtype=torch.float64, device=device))
    deps, poses, intr = _check_depth_stack(float_depths, poses_cw, intrinsics)
    H, W = deps[0].shape
    imgs = [_as_tensor(im) for im in images]
    for i, im in enumerate(imgs):
        if tuple(im.shape) != (H, W, 3) or im.dtype != torch.uint8:
            raise ShapeError(f"images[{i}]: expected ({H}, {W}, 3) uint8 like the depth maps, "
                             f"got {tuple(im.shape)} {im.dtype}")

    K = len(deps)
    if normals is not None and len(normals) != K:
        raise ShapeError(f"fuse_keyframes: expected as many normal maps as depth maps, got {len(normals)} and {K}")
    check = K > 1 and min_views > 0
    if K == 1 and min_views > 0:
        _log.warning("fuse_keyframes: one keyframe, so no multi-view consistency check; keeping its valid pixels")
    poses_wc = se3_inv(poses)
    points, colors = [], []  # float32 / uint8 while accumulating (a long video has many keyframes)
    world_normals: list[np.ndarray] | None = None if normals is None else []
    pending = 0
    for k in range(K):
        keep = _valid(deps[k])
        if max_depth is not None:
            keep &= deps[k] <= max_depth
        if check:
            near = [n for n in range(max(0, k - neighbours), min(K, k + neighbours + 1)) if n != k]
            keep &= _consistency(deps, poses, intr, k, near, rel_tol) >= min_views
        _log.debug("fuse_keyframes: keyframe %d keeps %d of %d pixels", k, int(keep.sum()), keep.numel())
        points.append(se3_act(poses_wc[k], backproject(deps[k], intr)[keep]).float().cpu().numpy())
        colors.append(imgs[k].to(keep.device)[keep].cpu().numpy())
        if world_normals is not None:
            world_normals.append(_world_normals(normals[k], deps[k], intr, poses_wc[k])[keep].float().cpu().numpy())
        pending += 1
        if voxel > 0 and pending >= _VOXEL_EVERY:  # keyframes overlap: merging as we go bounds the memory
            points, colors, world_normals = _voxel_merge(points, colors, voxel, world_normals)
            pending = 0
    if voxel > 0:
        points, colors, world_normals = _voxel_merge(points, colors, voxel, world_normals)
    pts = np.concatenate(points).astype(np.float64) if points else np.zeros((0, 3))
    cols = np.concatenate(colors).astype(np.float64) / 255.0 if colors else np.zeros((0, 3))
    nrm = None
    if world_normals is not None:
        nrm = np.concatenate(world_normals).astype(np.float64) if world_normals else np.zeros((0, 3))
        length = np.linalg.norm(nrm, axis=1, keepdims=True)
        nrm = np.where(length > 1e-6, nrm / np.maximum(length, 1e-12), 0.0)
    return pts, cols, nrm


def _world_normals(normal: np.ndarray | Tensor | None, depth: Tensor, intr: Tensor, pose_wc: Tensor) -> Tensor:
    """A keyframe's normals rotated into the world; from its depth when it has none.

    Shapes: normal (H, W, 3) camera frame or None; depth (H, W); intr (4,); pose_wc (7,) -> (H, W, 3).
    """
    from v2d.geometry.normals import normals_from_depth

    if normal is None:
        n, _ = normals_from_depth(depth, intr)
    else:
        n = _as_tensor(normal).to(dtype=depth.dtype, device=depth.device)
        if tuple(n.shape) != (*depth.shape, 3):
            raise ShapeError(f"fuse_keyframes: expected normals {(*depth.shape, 3)} like the depth, "
                             f"got {tuple(n.shape)}")
    return n @ quat_to_matrix(pose_wc[3:]).to(n.dtype).T


_VOXEL_EVERY = 8  # keyframes between voxel merges in fuse_keyframes


def _voxel_merge(points: list[np.ndarray], colors: list[np.ndarray], voxel: float,
                 normals: list[np.ndarray] | None = None
                 ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """Merge the accumulated chunks into one chunk with one point per occupied voxel (the mean;
    normals: the sum, normalised at the end by `fuse_keyframes`).

    Written with numpy rather than Open3D's `voxel_down_sample`: measured on a 1000-frame run
    (0.9 M points), Open3D's voxel hash map and the float64 vector copies it needs raised peak
    memory by 350 MB; grid keys + `np.unique` + `np.bincount` need about 60 bytes per point.
    Points already merged count as one point each (the mean of means: fine for display).
    """
    pts = np.concatenate(points) if points else np.zeros((0, 3), np.float32)
    cols = np.concatenate(colors) if colors else np.zeros((0, 3), np.uint8)
    nrm = None if normals is None else (np.concatenate(normals) if normals else np.zeros((0, 3), np.float32))
    if not len(pts):
        return [pts], [cols], None if nrm is None else [nrm]
    cell = np.floor(pts / voxel).astype(np.int64)
    cell -= cell.min(axis=0)
    dims = cell.max(axis=0) + 1
    key = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    del cell
    _, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
    del key
    merged_pts = np.stack([np.bincount(inverse, weights=pts[:, d]) for d in range(3)], axis=1) / count[:, None]
    merged_cols = np.stack([np.bincount(inverse, weights=cols[:, d]) for d in range(3)], axis=1) / count[:, None]
    merged_nrm = None if nrm is None else [
        np.stack([np.bincount(inverse, weights=nrm[:, d]) for d in range(3)], axis=1).astype(np.float32)]
    return [merged_pts.astype(np.float32)], [np.round(merged_cols).astype(np.uint8)], merged_nrm


# --------------------------------------------------------------------------------------------------
# output


def _open3d_cloud(points: np.ndarray, colors: np.ndarray, normals: np.ndarray | None = None
                  ):  # -> open3d.geometry.PointCloud
    import open3d as o3d

    cloud = o3d.geometry.PointCloud()
    cloud.points = o3d.utility.Vector3dVector(points)
    cloud.colors = o3d.utility.Vector3dVector(colors)
    if normals is not None:
        cloud.normals = o3d.utility.Vector3dVector(normals)
    return cloud


def write_ply(path: str | Path, points: np.ndarray | Tensor, colors: np.ndarray | Tensor,
              normals: np.ndarray | Tensor | None = None) -> Path:
    """Write a coloured point cloud (with normals when given) as binary PLY (colours stored as uchar), atomically.

    The file is written under a temporary name ending in .ply (Open3D picks the format from the
    suffix) in the target directory, then renamed; on failure the temporary file is removed and
    InputError raised. An empty cloud gives a valid PLY with zero vertices.

    Shapes:
        points: (P, 3) finite, colors: (P, 3) RGB in [0, 1], normals: (P, 3) finite or None
    """
    import open3d as o3d

    path = Path(path)
    pts = np.asarray(points, dtype=np.float64)
    cols = np.asarray(colors, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or cols.shape != pts.shape:
        raise ShapeError(f"write_ply: expected points (P, 3) and colors (P, 3), got {pts.shape} and {cols.shape}")
    if not np.isfinite(pts).all():
        raise NumericalError(f"write_ply: expected finite points, got {int((~np.isfinite(pts)).any(1).sum())} "
                             "non-finite")
    if len(cols) and not (cols.min() >= 0 and cols.max() <= 1):
        raise ShapeError(f"write_ply: expected colors in [0, 1], got [{cols.min()}, {cols.max()}]")
    nrm = None if normals is None else np.asarray(normals, dtype=np.float64)
    if nrm is not None and (nrm.shape != pts.shape or not np.isfinite(nrm).all()):
        raise ShapeError(f"write_ply: expected finite normals {pts.shape} like the points, got {nrm.shape}")

    def write(name: str) -> None:
        if len(pts) == 0:
            Path(name).write_bytes(_EMPTY_PLY)
        elif not o3d.io.write_point_cloud(name, _open3d_cloud(pts, cols, nrm), write_ascii=False):
            raise OSError("Open3D could not write it")

    return atomic_write_named(path, write, suffix=".ply", what="point cloud ")

"""A TSDF mesh of a run's keyframe depths (`v2d vis --mesh`).

The mesh is fused with Open3D's voxel-block TSDF (`o3d.t.geometry.VoxelBlockGrid`): the legacy
`ScalableTSDFVolume` of open3d(-cpu) 0.20.0 integrates nothing here (an empty mesh even for a flat
wall 2 m in front of one camera), while `UniformTSDFVolume` works but needs a fixed cube.

Open3D is imported inside the functions that need it (importing it is slow and needs libusb).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slam.vis_scene import pose_matrices, quiet_open3d
from v2d.errors import InputError
from v2d.io.results import RunOutputs
from v2d.io.writers import atomic_write_named, check_output_path

if TYPE_CHECKING:
    import open3d as o3d

__all__ = ["tsdf_mesh", "write_mesh"]

MESH_VOXEL_FRACTION = 1 / 200  # voxel edge = this fraction of the median depth ...
MESH_MIN_VOXEL_PIXELS = 1.0  # ... but at least this many pixel footprints at the median depth
MESH_TRUNC_VOXELS = 4.0  # TSDF truncation distance in voxels
MESH_MIN_WEIGHT = 2.0  # keyframes that must have seen a voxel for it to be meshed (capped at K)
MESH_BLOCK_RESOLUTION = 8  # voxels per block edge of the voxel-block grid
MESH_INITIAL_BLOCKS = 20000  # the grid's hash map grows beyond this when needed


def tsdf_mesh(run: RunOutputs, voxel: float | None = None) -> tuple[o3d.geometry.TriangleMesh, dict[str, Any]]:
    """Fuse the keyframe depths (and colours, when images/ exists) into a mesh with a TSDF.

    `voxel` (scene units) defaults to MESH_VOXEL_FRACTION of the median depth, at least one pixel's
    footprint there; truncation MESH_TRUNC_VOXELS voxels; depths beyond the largest valid one are
    cut. InputError when there is no valid depth or the mesh comes out empty.

    Returns the legacy TriangleMesh and statistics: vertices, triangles, voxel, keyframes, seconds.
    """
    import open3d as o3d
    import open3d.core as o3c

    t0 = time.perf_counter()
    K = len(run.keyframe_rows)
    depths = [run.depth(k) for k in range(K)]
    valid = [d[d > 0] for d in depths if (d > 0).any()]
    if not valid:
        raise InputError(f"{run.root}: no keyframe has a valid depth; nothing to mesh")
    median = float(np.median(np.concatenate(valid)))
    depth_max = float(max(v.max() for v in valid)) * 1.001
    fx, fy, cx, cy = (float(v) for v in run.intrinsics)
    if voxel is None:
        voxel = max(median * MESH_VOXEL_FRACTION, MESH_MIN_VOXEL_PIXELS * median / max(fx, fy))
    if not (math.isfinite(voxel) and voxel > 0):
        raise InputError(f"voxel size {voxel}: expected a positive number")
    images = [run.image(k) for k in range(K)]
    colour = all(im is not None for im in images)
    names = ("tsdf", "weight", "color") if colour else ("tsdf", "weight")
    grid = o3d.t.geometry.VoxelBlockGrid(attr_names=names, attr_dtypes=(o3c.float32,) * len(names),
                                         attr_channels=(1, 1, 3)[:len(names)], voxel_size=voxel,
                                         block_resolution=MESH_BLOCK_RESOLUTION, block_count=MESH_INITIAL_BLOCKS)
    # Open3D's TSDF kernel looks a projected voxel up at pixel (int(u), int(v)), i.e. it takes pixel
    # centres at +0.5; ours are at integer coordinates, so shift the principal point by half a pixel
    # (without it the surface lands half a pixel's footprint sideways: 0.5 voxel median error in the test).
    intr = o3c.Tensor(np.array([[fx, 0, cx + 0.5], [0, fy, cy + 0.5], [0, 0, 1]]), o3c.float64)
    for k, T_wc in enumerate(pose_matrices(run.keyframe_poses_wc)):
        if not (depths[k] > 0).any():
            continue
        extr = o3c.Tensor(np.linalg.inv(T_wc), o3c.float64)  # world->camera
        depth = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(depths[k][..., None])))
        blocks = grid.compute_unique_block_coordinates(depth, intr, extr, 1.0, depth_max,
                                                       trunc_voxel_multiplier=MESH_TRUNC_VOXELS)
        if colour:
            rgb = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(images[k], dtype=np.float32) / 255))
            grid.integrate(blocks, depth, rgb, intr, extr, 1.0, depth_max, trunc_voxel_multiplier=MESH_TRUNC_VOXELS)
        else:
            grid.integrate(blocks, depth, intr, extr, 1.0, depth_max, trunc_voxel_multiplier=MESH_TRUNC_VOXELS)
    mesh = grid.extract_triangle_mesh(weight_threshold=min(MESH_MIN_WEIGHT, float(len(valid)))).to_legacy()
    if len(mesh.triangles) == 0:
        raise InputError(f"{run.root}: TSDF fusion gave an empty mesh (voxel {voxel:.4g}; too few keyframes "
                         "agreeing on a surface?)")
    mesh.compute_vertex_normals()
    predicted = (run.root / "normal").is_dir() and _predicted_vertex_normals(mesh, depths, run, voxel)
    stats = {"vertices": len(mesh.vertices), "triangles": len(mesh.triangles), "voxel": voxel,
             "keyframes": K, "coloured": colour, "normals": "predicted" if predicted else "geometric",
             "seconds": time.perf_counter() - t0}
    return mesh, stats


def _predicted_vertex_normals(mesh: o3d.geometry.TriangleMesh, depths: list[np.ndarray], run: RunOutputs,
                              voxel: float) -> bool:
    """Give each vertex the depth module's normal (`depth.normals`, normal/) of the nearest keyframe
    point (of the keyframes that have normals); False when none has.

    The TSDF's own normals follow the fused surface, whose depth noise makes planes shimmer; the
    predicted normals are smooth on planes. Keyframe points are taken every `_NORMAL_STRIDE`-th
    pixel, rotated into the world; a vertex with no point within 2 voxels, or whose predicted normal
    points away from its geometric one (> 90 degrees: across an edge), keeps the geometric normal.
    """
    import open3d as o3d
    from scipy.spatial import cKDTree

    fx, fy, cx, cy = (float(v) for v in run.intrinsics)
    s = _NORMAL_STRIDE
    pts, nrm = [], []
    for k, T_wc in enumerate(pose_matrices(run.keyframe_poses_wc)):
        normal = run.normal(k)
        if normal is None:
            continue
        d, n = depths[k][::s, ::s], normal[::s, ::s]
        v, u = np.mgrid[0:depths[k].shape[0]:s, 0:depths[k].shape[1]:s]
        ok = (d > 0) & (np.abs(np.linalg.norm(n, axis=-1) - 1) < 1e-3)
        cam = np.stack([(u[ok] - cx) / fx * d[ok], (v[ok] - cy) / fy * d[ok], d[ok]], axis=1)
        pts.append(cam @ T_wc[:3, :3].T + T_wc[:3, 3])
        nrm.append(n[ok] @ T_wc[:3, :3].T)
    if not pts or not sum(len(p) for p in pts):
        return False
    dist, idx = cKDTree(np.concatenate(pts)).query(np.asarray(mesh.vertices), distance_upper_bound=2 * voxel)
    geometric = np.asarray(mesh.vertex_normals)
    found = np.isfinite(dist)
    chosen = np.concatenate(nrm)[np.where(found, idx, 0)]
    use = found & ((chosen * geometric).sum(1) > 0)
    mesh.vertex_normals = o3d.utility.Vector3dVector(np.where(use[:, None], chosen, geometric))
    return True


_NORMAL_STRIDE = 2  # pixel stride of the keyframe points whose predicted normals the mesh takes


def write_mesh(mesh: o3d.geometry.TriangleMesh, path: str | Path) -> Path:
    """Write a mesh as binary PLY, atomically (a temporary .ply next to `path`, then renamed)."""
    import open3d as o3d

    path = check_output_path(path, ".ply", "--mesh")

    def write(name: str) -> None:
        with quiet_open3d():
            if not o3d.io.write_triangle_mesh(name, mesh, write_ascii=False, compressed=False):
                raise OSError("Open3D could not write it")

    return atomic_write_named(path, write)

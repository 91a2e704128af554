"""The scene of a run's outputs for Open3D: fused cloud, keyframe frustums, trajectories, ground truth.

The scene is the fused cloud (cloud.ply), one frustum per keyframe, the estimated trajectory and
optionally a ground-truth trajectory aligned to the estimate with Sim3 (evo's Umeyama, the estimate
being the reference, so the cloud stays where the run put it). `build_scene` makes it once for both
the interactive window and the offscreen render (`slam.vis_render`), so what the tests render is
what a user sees.

Trajectories and the highlighted frustum are drawn as thin tubes (triangle meshes), not as wide GL
lines: Mesa's core profile draws nothing at all for a line width above 1 (measured with Open3D
0.20's EGL fallback), and tubes look the same on every driver.

Open3D is imported inside the functions that need it (importing it is slow and needs libusb).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from v2d.errors import InputError
from v2d.io.results import RunOutputs

if TYPE_CHECKING:
    import open3d as o3d

__all__ = ["COLOUR_ESTIMATE", "COLOUR_GROUND_TRUTH", "COLOUR_HIGHLIGHT", "FRUSTUM_LINES", "Scene",
           "align_ground_truth", "build_scene", "frustum_points", "pose_matrices", "quiet_open3d", "read_cloud"]

_log = logging.getLogger(__name__)

# Scene sizes, relative to the median valid keyframe depth (the scene's scale, whatever its unit).
FRUSTUM_DEPTH_FRACTION = 0.15  # frustum pyramid height
TUBE_RADIUS_FRACTION = 0.004  # radius of the trajectory tubes
HIGHLIGHT_RADIUS_FACTOR = 1.5  # the highlighted frustum's tubes, relative to the trajectory's
SCENE_PERCENTILE = 95.0  # percent of the cloud's points the overview must show (the rest may be outliers)
SPACING_SAMPLES = 2000  # points whose neighbour distances estimate the cloud's spacing
SPACING_NEIGHBOURS = 8
COLOUR_ESTIMATE = (0.90, 0.10, 0.10)
COLOUR_GROUND_TRUTH = (0.05, 0.35, 0.95)
COLOUR_FRUSTUM = (0.20, 0.20, 0.20)
COLOUR_HIGHLIGHT = (1.00, 0.00, 1.00)
COLOUR_UNCOLOURED_CLOUD = (0.45, 0.45, 0.45)
# Ground-truth association (seconds, or frame numbers for 7-Scenes folders), as v2d.metrics.
GT_MAX_TIME_DIFF = 0.01

# The 8 edges of a frustum given by `frustum_points`: apex to the 4 corners, then the image rectangle.
FRUSTUM_LINES = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [2, 3], [3, 4], [4, 1]], dtype=np.int32)

# --------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------


def pose_matrices(poses_wc: np.ndarray) -> np.ndarray:
    """Camera->world 4x4 matrices from pose vectors.

    Shapes: poses_wc (N, 7) [tx, ty, tz, qx, qy, qz, qw] -> (N, 4, 4)
    """
    from scipy.spatial.transform import Rotation

    p = np.asarray(poses_wc, dtype=np.float64).reshape(-1, 7)
    T = np.tile(np.eye(4), (len(p), 1, 1))
    if len(p):
        T[:, :3, :3] = Rotation.from_quat(p[:, 3:]).as_matrix()  # scipy's order is x, y, z, w too
        T[:, :3, 3] = p[:, :3]
    return T


def frustum_points(T_wc: np.ndarray, intrinsics: np.ndarray, image_size: tuple[int, int], depth: float
                   ) -> np.ndarray:
    """A camera's pyramid in world coordinates: the camera centre, then the image's four outer corners
    (pixel edges, clockwise from the top left) back-projected to `depth`. Edges: FRUSTUM_LINES.

    Pixel centres are at integer coordinates, so the outer corners are at -0.5 and W - 0.5.

    Shapes: T_wc (4, 4) camera->world; intrinsics (4,) fx, fy, cx, cy at image_size (H, W) -> (5, 3)
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    H, W = image_size
    u = np.array([-0.5, W - 0.5, W - 0.5, -0.5])
    v = np.array([-0.5, -0.5, H - 0.5, H - 0.5])
    corners = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, np.full(4, float(depth))], axis=1)
    local = np.concatenate([np.zeros((1, 3)), corners])
    return local @ T_wc[:3, :3].T + T_wc[:3, 3]


def _tubes(points: np.ndarray, segments: np.ndarray, radius: float, colour: tuple[float, float, float]
           ) -> o3d.geometry.TriangleMesh:
    """Square tubes of `radius` along the segments (pairs of indices into points), as one mesh."""
    import open3d as o3d

    a, b = points[segments[:, 0]], points[segments[:, 1]]
    d = b - a
    length = np.linalg.norm(d, axis=1)
    keep = length > 1e-12
    a, b, d = a[keep], b[keep], d[keep] / length[keep, None]
    ref = np.where((np.abs(d[:, :1]) < 0.9), [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    u = np.cross(d, ref)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = np.cross(d, u)
    ring = np.stack([u, w, -u, -w], axis=1) * radius  # (S, 4, 3)
    verts = np.concatenate([a[:, None] + ring, b[:, None] + ring], axis=1).reshape(-1, 3)  # 8 per segment
    k = np.arange(4)
    side = np.stack([np.stack([k, 4 + k, 4 + (k + 1) % 4], 1), np.stack([k, 4 + (k + 1) % 4, (k + 1) % 4], 1)],
                    axis=1).reshape(-1, 3)  # 8 triangles of one tube segment
    tris = (np.arange(len(a))[:, None, None] * 8 + side[None]).reshape(-1, 3)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(verts), o3d.utility.Vector3iVector(tris))
    mesh.paint_uniform_color(colour)
    return mesh


def _polyline(n: int) -> np.ndarray:
    return np.stack([np.arange(n - 1), np.arange(1, n)], axis=1) if n > 1 else np.zeros((0, 2), dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def read_cloud(path: str | Path) -> o3d.geometry.PointCloud:
    """The run's fused cloud; InputError when it is missing, not a PLY file, truncated or unreadable.

    Read by Open3D's tensor PLY reader, which also parses the header (a PLY file with zero vertices is
    a valid, empty cloud). Open3D does not report a file that ends early: it returns the declared
    number of points, the missing ones uninitialised. So a binary file must hold the header plus the
    bytes of the vertex attributes Open3D found (count x row size); other elements only add bytes.
    """
    import open3d as o3d

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing (a finished `v2d run` writes the fused point cloud there)")
    with path.open("rb") as f:
        head = f.read(65536)
    if not head.startswith(b"ply"):
        raise InputError(f"{path}: not a PLY file (it does not start with 'ply'); the run's cloud is corrupt")
    with quiet_open3d():
        cloud = o3d.t.io.read_point_cloud(str(path), format="ply")
    if "positions" not in cloud.point:
        raise InputError(f"{path}: corrupt PLY header or no vertex positions (Open3D read no point cloud from it)")
    vertices = len(cloud.point.positions)
    end = head.find(b"end_header")
    if b"format ascii" not in head[:end] and end >= 0:
        row = sum(v.dtype.byte_size() * int(np.prod(v.shape[1:])) for _, v in cloud.point.items())
        need = head.index(b"\n", end) + 1 + vertices * row
        size = path.stat().st_size
        if size < need:
            raise InputError(f"{path}: truncated: its header declares {vertices} vertices ({need} bytes) but the "
                             f"file has {size} bytes")
    legacy = cloud.to_legacy()
    if not np.isfinite(np.asarray(legacy.points)).all():
        raise InputError(f"{path}: corrupt: Open3D read {vertices} points, some not finite")
    return legacy


def align_ground_truth(run: RunOutputs, timestamps: np.ndarray, poses_wc: np.ndarray,
                       max_diff: float = GT_MAX_TIME_DIFF) -> np.ndarray:
    """Ground-truth camera centres in the run's frame: associated to the estimate by timestamp, then
    Sim3-aligned to it (evo's Umeyama with scale); InputError when under 3 poses match or they are
    degenerate.

    Shapes: timestamps (M,), poses_wc (M, 7) -> (P, 3), P the associated poses, in time order
    """
    from evo.core import sync
    from evo.core.geometry import GeometryException

    from v2d.metrics import evo_trajectory

    timestamps = np.asarray(timestamps, dtype=np.float64)
    try:
        gt, est = sync.associate_trajectories(evo_trajectory(timestamps, poses_wc, "ground truth"),
                                              evo_trajectory(run.timestamps, run.poses_wc, "estimate"),
                                              max_diff=max_diff)
    except sync.SyncException:
        span = lambda t: f"{t.min():.6g}..{t.max():.6g}" if len(t) else "none"  # noqa: E731
        raise InputError(f"ground truth: none of its timestamps ({span(timestamps)}) is within {max_diff} of the "
                         f"run's ({span(run.timestamps)})") from None
    if gt.num_poses < 3:
        raise InputError(f"ground truth: {gt.num_poses} of its timestamps match the run's (within {max_diff}); "
                         "Sim3 alignment needs at least 3")
    try:
        gt.align(est, correct_scale=True)
    except GeometryException:
        raise InputError("ground truth: Sim3 alignment to the estimate is impossible: the positions are "
                         "degenerate (static or collinear)") from None
    return np.asarray(gt.positions_xyz, dtype=np.float64)


def _gt_positions(run: RunOutputs, gt: str | Path | tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
    if gt is None:
        return None
    if isinstance(gt, str | Path):
        from v2d.io.trajectory import read_trajectory

        gt = read_trajectory(gt, "auto")
    return align_ground_truth(run, *gt)


# --------------------------------------------------------------------------------------------------
# the scene
# --------------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """What is drawn, and what the viewpoints are computed from.

    Shapes: keyframes_wc (K, 4, 4) camera->world; positions (N, 3) estimated camera centres;
    gt_positions (P, 3) or None; centre (3,); up (3,) unit, the cameras' mean "up" (-y) direction.
    """

    cloud: o3d.geometry.PointCloud
    frustums: o3d.geometry.LineSet
    trajectory: o3d.geometry.TriangleMesh
    gt_trajectory: o3d.geometry.TriangleMesh | None
    highlight: o3d.geometry.TriangleMesh
    keyframes_wc: np.ndarray
    positions: np.ndarray
    gt_positions: np.ndarray | None
    intrinsics: np.ndarray
    image_size: tuple[int, int]
    median_depth: float
    spacing: float
    frustum_depth: float
    tube_radius: float
    centre: np.ndarray
    radius: float
    up: np.ndarray
    highlighted: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def geometries(self) -> list:
        """The non-empty ones (Open3D's legacy renderer warns about empty geometries)."""
        gs = [self.cloud, self.frustums, self.trajectory, self.gt_trajectory, self.highlight]
        return [g for g in gs if g is not None and not g.is_empty()]

    def highlight_mesh(self, k: int | None) -> o3d.geometry.TriangleMesh:
        """Tubes along keyframe k's frustum (an empty mesh for None)."""
        import open3d as o3d

        if k is None:
            return o3d.geometry.TriangleMesh()
        pts = frustum_points(self.keyframes_wc[k], self.intrinsics, self.image_size, self.frustum_depth)
        return _tubes(pts, FRUSTUM_LINES, HIGHLIGHT_RADIUS_FACTOR * self.tube_radius, COLOUR_HIGHLIGHT)


def _median_depth(run: RunOutputs) -> float | None:
    valid = [d[d > 0] for d in (run.depth(k) for k in range(len(run.keyframe_rows)))]
    valid = [v for v in valid if v.size]
    return float(np.median(np.concatenate(valid))) if valid else None


def _spacing(points: np.ndarray) -> float:
    """Typical distance between neighbouring points of a cloud sampling surfaces.

    On a surface with rho points per unit area the k-th neighbour is about sqrt(k / (pi rho)) away and
    the spacing is 1 / sqrt(rho). The k-th neighbour, unlike the nearest one, is not fooled by clouds
    made of overlapping views whose points come in near-duplicate pairs.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    sample = points[rng.choice(len(points), min(len(points), SPACING_SAMPLES), replace=False)]
    k = min(SPACING_NEIGHBOURS, len(points) - 1)
    dist, _ = cKDTree(points).query(sample, k=k + 1)
    return float(np.median(dist[:, k]) * math.sqrt(math.pi / k))


def build_scene(run: RunOutputs, gt: str | Path | tuple[np.ndarray, np.ndarray] | None = None,
                highlight: int | None = None) -> Scene:
    """The cloud, keyframe frustums, trajectories and the highlighted keyframe's frustum of a run.

    `gt` is a trajectory file (any format `read_trajectory` detects) or (timestamps (M,), poses_wc (M, 7));
    it is Sim3-aligned to the estimate (`align_ground_truth`).
    """
    import open3d as o3d

    if len(run.keyframe_rows) == 0:
        raise InputError(f"{run.root}: the run has no keyframes, nothing to show")
    if highlight is not None and not 0 <= highlight < len(run.keyframe_rows):
        raise InputError(f"keyframe {highlight}: the run has keyframes 0..{len(run.keyframe_rows) - 1}")
    cloud = read_cloud(run.cloud_path)
    if len(cloud.points) == 0:
        _log.warning("%s has no points; showing the cameras only", run.cloud_path)
    elif not cloud.has_colors():
        cloud.paint_uniform_color(COLOUR_UNCOLOURED_CLOUD)
    gt_positions = _gt_positions(run, gt)
    positions = np.asarray(run.poses_wc[:, :3], dtype=np.float64)
    keyframes_wc = pose_matrices(run.keyframe_poses_wc)
    pts = np.asarray(cloud.points)

    median = _median_depth(run)
    if median is None:  # no valid depth at all: size things by the trajectory, else by the cloud
        span = [np.ptp(positions, axis=0).max() if len(positions) > 1 else 0.0,
                np.ptp(pts, axis=0).max() / 4 if len(pts) > 1 else 0.0]
        median = max(max(span), 1e-3)
    frustum_depth = FRUSTUM_DEPTH_FRACTION * median
    tube_radius = TUBE_RADIUS_FRACTION * median

    frustum_pts = np.concatenate([frustum_points(T, run.intrinsics, run.image_size, frustum_depth)
                                  for T in keyframes_wc])
    frustum_lines = np.concatenate([FRUSTUM_LINES + 5 * k for k in range(len(keyframes_wc))])
    frustums = o3d.geometry.LineSet(o3d.utility.Vector3dVector(frustum_pts), o3d.utility.Vector2iVector(frustum_lines))
    frustums.paint_uniform_color(COLOUR_FRUSTUM)
    trajectory = _tubes(positions, _polyline(len(positions)), tube_radius, COLOUR_ESTIMATE)
    gt_trajectory = None
    if gt_positions is not None:
        gt_trajectory = _tubes(gt_positions, _polyline(len(gt_positions)), tube_radius, COLOUR_GROUND_TRUTH)

    # The region to frame: most of the cloud (a few far outliers must not shrink the scene to a dot),
    # and all cameras.
    cams = np.concatenate([frustum_pts, positions] + ([gt_positions] if gt_positions is not None else []))
    if len(pts):
        tail = (100 - SCENE_PERCENTILE) / 2
        lo = np.minimum(np.percentile(pts, tail, axis=0), cams.min(0))
        hi = np.maximum(np.percentile(pts, 100 - tail, axis=0), cams.max(0))
    else:
        lo, hi = cams.min(0), cams.max(0)
    centre = (lo + hi) / 2
    dist = np.linalg.norm(pts - centre, axis=1) if len(pts) else np.zeros(1)
    radius = max(float(np.percentile(dist, SCENE_PERCENTILE)), float(np.linalg.norm(cams - centre, axis=1).max()),
                 frustum_depth)
    spacing = _spacing(pts) if len(pts) > 1 else median * 0.01
    up = -keyframes_wc[:, :3, 1].mean(0)  # cameras' y points down
    up = up / np.linalg.norm(up) if np.linalg.norm(up) > 1e-6 else np.array([0.0, -1.0, 0.0])

    scene = Scene(cloud=cloud, frustums=frustums, trajectory=trajectory, gt_trajectory=gt_trajectory,
                  highlight=o3d.geometry.TriangleMesh(), keyframes_wc=keyframes_wc, positions=positions,
                  gt_positions=gt_positions, intrinsics=np.asarray(run.intrinsics, dtype=np.float64),
                  image_size=run.image_size, median_depth=median, spacing=spacing, frustum_depth=frustum_depth,
                  tube_radius=tube_radius, centre=centre, radius=radius, up=up,
                  stats={"points": len(pts), "keyframes": len(keyframes_wc), "frames": len(positions),
                         "gt_poses": 0 if gt_positions is None else len(gt_positions)})
    scene.highlight, scene.highlighted = scene.highlight_mesh(highlight), highlight
    return scene


# --------------------------------------------------------------------------------------------------
# Open3D's chatter
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_open3d() -> Iterator[None]:
    """Open3D's own chatter only in debug logging: its warnings (e.g. "GLFW Error ... falling back to
    EGL") and what its windowing libraries print straight to file descriptor 2 (e.g. "error:
    XDG_RUNTIME_DIR is invalid or not set", harmless without a display but alarming to read), which is
    caught in a temporary file and logged at debug level. Failures still raise (RenderError)."""
    import open3d as o3d

    if _log.isEnabledFor(logging.DEBUG):
        yield
        return
    old = o3d.utility.get_verbosity_level()
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            o3d.utility.set_verbosity_level(old)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                _log.debug("Open3D printed: %s", text)


"""Open3D views of a run's outputs (`v2d vis`): an interactive viewer, offscreen PNG renders and a TSDF mesh.

The scene is the fused cloud (cloud.ply), one frustum per keyframe, the estimated trajectory and
optionally a ground-truth trajectory aligned to the estimate with Sim3 (evo's Umeyama, the estimate
being the reference, so the cloud stays where the run put it). `build_scene` makes it once for both
the interactive window and the offscreen render, so what the tests render is what a user sees.

Trajectories and the highlighted frustum are drawn as thin tubes (triangle meshes), not as wide GL
lines: Mesa's core profile draws nothing at all for a line width above 1 (measured with Open3D
0.20's EGL fallback), and tubes look the same on every driver. Rendering uses the legacy
`o3d.visualization.Visualizer`, which falls back to EGL offscreen rendering when there is no display.

The mesh is fused with Open3D's voxel-block TSDF (`o3d.t.geometry.VoxelBlockGrid`): the legacy
`ScalableTSDFVolume` of open3d(-cpu) 0.20.0 integrates nothing here (an empty mesh even for a flat
wall 2 m in front of one camera), while `UniformTSDFVolume` works but needs a fixed cube.

Open3D is imported inside the functions that need it (importing it is slow and needs libusb).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from v2d.errors import InputError, RenderError
from v2d.io.results import RunOutputs
from v2d.io.writers import atomic_write_named, check_output_path

if TYPE_CHECKING:
    import open3d as o3d

__all__ = ["FRUSTUM_LINES", "KEYS", "RenderError", "Scene", "align_ground_truth", "attach_keys", "build_scene",
           "check_image_size", "frustum_points", "has_display", "keyframe_extrinsic",
           "open_window", "overview_extrinsic", "pose_matrices", "read_cloud", "render_headless", "require_display",
           "show_interactive", "tsdf_mesh", "write_mesh"]

_log = logging.getLogger(__name__)

# Scene sizes, relative to the median valid keyframe depth (the scene's scale, whatever its unit).
FRUSTUM_DEPTH_FRACTION = 0.15  # frustum pyramid height
TUBE_RADIUS_FRACTION = 0.004  # radius of the trajectory tubes
HIGHLIGHT_RADIUS_FACTOR = 1.5  # the highlighted frustum's tubes, relative to the trajectory's
# Overview camera: above and behind the keyframes, looking at the centre of the cloud.
VIEW_FOV_DEG = 60.0  # vertical field of view
VIEW_ELEVATION_DEG = 45.0  # angle of the viewing direction above the cameras' horizon
VIEW_MARGIN = 1.0  # distance factor on "the scene's radius fills the narrower field of view"
SCENE_PERCENTILE = 95.0  # percent of the cloud's points the overview must show (the rest may be outliers)
# Keyframe view (interactive N/P keys, --keyframe): behind and above the keyframe, looking where it looks.
KEYFRAME_VIEW_BACK = 4.0  # frustum heights behind the camera centre
KEYFRAME_VIEW_UP = 1.5  # frustum heights above it
# Rendering.
BACKGROUND = (1.0, 1.0, 1.0)
POINT_SIZE_RANGE_PX = (1.0, 8.0)  # points are drawn as big as the cloud's spacing looks, within these bounds
SPACING_SAMPLES = 2000  # points whose neighbour distances estimate the cloud's spacing
SPACING_NEIGHBOURS = 8
OBJECT_PIXEL_TOLERANCE = 0.03  # a pixel is "object" when a channel differs this much from the background
COLOUR_ESTIMATE = (0.90, 0.10, 0.10)
COLOUR_GROUND_TRUTH = (0.05, 0.35, 0.95)
COLOUR_FRUSTUM = (0.20, 0.20, 0.20)
COLOUR_HIGHLIGHT = (1.00, 0.00, 1.00)
COLOUR_UNCOLOURED_CLOUD = (0.45, 0.45, 0.45)
# Ground-truth association (seconds, or frame numbers for 7-Scenes folders), as v2d.metrics.
GT_MAX_TIME_DIFF = 0.01
# TSDF mesh.
MESH_VOXEL_FRACTION = 1 / 200  # voxel edge = this fraction of the median depth ...
MESH_MIN_VOXEL_PIXELS = 1.0  # ... but at least this many pixel footprints at the median depth
MESH_TRUNC_VOXELS = 4.0  # TSDF truncation distance in voxels
MESH_MIN_WEIGHT = 2.0  # keyframes that must have seen a voxel for it to be meshed (capped at K)
MESH_BLOCK_RESOLUTION = 8  # voxels per block edge of the voxel-block grid
MESH_INITIAL_BLOCKS = 20000  # the grid's hash map grows beyond this when needed

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
    with _quiet_open3d():
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
# viewpoints (OpenCV convention: x right, y down, z forward; extrinsic = world->camera)
# --------------------------------------------------------------------------------------------------


def _look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(-up, z)
    if np.linalg.norm(x) < 1e-6:  # looking straight along "up": any sideways axis will do
        x = np.cross(z, [1.0, 0.0, 0.0] if abs(z[0]) < 0.9 else [0.0, 1.0, 0.0])
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    E = np.eye(4)
    E[:3, :3] = np.stack([x, y, z])
    E[:3, 3] = -E[:3, :3] @ eye
    return E


def _fov_focal(width: int, height: int) -> float:
    return (height / 2) / math.tan(math.radians(VIEW_FOV_DEG) / 2)


def overview_extrinsic(scene: Scene, width: int, height: int) -> np.ndarray:
    """World->camera 4x4 of the overview: VIEW_ELEVATION_DEG above the keyframes' horizon, behind them
    (or, when they look all round, on the side of the trajectory), at a distance where the scene's
    radius fills the narrower field of view."""
    up = scene.up
    horizontal = lambda v: v - up * (v @ up)  # noqa: E731
    back = horizontal(-scene.keyframes_wc[:, :3, 2].mean(0))
    if np.linalg.norm(back) < 0.3:  # cameras looking all round (an orbit): view from the trajectory's side
        back = horizontal(scene.positions.mean(0) - scene.centre)
    if np.linalg.norm(back) < 1e-6:
        back = horizontal(np.array([0.0, 0.0, -1.0]) if abs(up[2]) < 0.9 else np.array([1.0, 0.0, 0.0]))
    back = back / np.linalg.norm(back)
    elev = math.radians(VIEW_ELEVATION_DEG)
    front = back * math.cos(elev) + up * math.sin(elev)
    f = _fov_focal(width, height)
    half_fov = min(math.atan(width / 2 / f), math.atan(height / 2 / f))
    distance = VIEW_MARGIN * scene.radius / math.sin(half_fov)
    return _look_at(scene.centre + front * distance, scene.centre, up)


def keyframe_extrinsic(scene: Scene, k: int) -> np.ndarray:
    """World->camera 4x4 of the view from behind and above keyframe k, looking where it looks."""
    T = scene.keyframes_wc[k]
    R = T[:3, :3]
    eye = T[:3, 3] - scene.frustum_depth * (KEYFRAME_VIEW_BACK * R[:, 2] + KEYFRAME_VIEW_UP * R[:, 1])
    E = np.eye(4)
    E[:3, :3] = R.T
    E[:3, 3] = -R.T @ eye
    return E


def _camera(width: int, height: int, extrinsic: np.ndarray) -> o3d.camera.PinholeCameraParameters:
    import open3d as o3d

    f = _fov_focal(width, height)
    params = o3d.camera.PinholeCameraParameters()
    # The legacy view control accepts only a principal point at the window's centre.
    params.intrinsic = o3d.camera.PinholeCameraIntrinsic(width, height, f, f, width / 2 - 0.5, height / 2 - 0.5)
    params.extrinsic = extrinsic
    return params


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def has_display() -> bool:
    """Whether an X11 or Wayland display is available for a window."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def require_display() -> None:
    """InputError, saying to use --headless, when there is no display for the interactive viewer."""
    if not has_display():
        raise InputError("no display (neither DISPLAY nor WAYLAND_DISPLAY is set) for the interactive viewer; "
                         "pass --headless FILE.png to render offscreen")


@contextlib.contextmanager
def _quiet_open3d() -> Iterator[None]:
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


def _point_size(scene: Scene, extrinsic: np.ndarray, width: int, height: int) -> float:
    """Pixels per point so that neighbouring points about touch at the distance of the scene centre
    (or, for a view from a keyframe, at the median depth)."""
    eye = -extrinsic[:3, :3].T @ extrinsic[:3, 3]
    distance = max(float(np.linalg.norm(eye - scene.centre)), scene.median_depth)
    px = scene.spacing * _fov_focal(width, height) / distance
    return float(np.clip(px, *POINT_SIZE_RANGE_PX))


def open_window(scene: Scene, width: int, height: int, extrinsic: np.ndarray, visible: bool, keys: bool = False,
                title: str = "v2d vis") -> o3d.visualization.Visualizer:
    """A window (or, with visible=False, an offscreen context) showing the scene from `extrinsic`: the
    one setup both the interactive viewer and the PNG renders use. With `keys`, a VisualizerWithKeyCallback
    (see `attach_keys`). RenderError when Open3D cannot create it; the caller destroys it."""
    import open3d as o3d

    vis = o3d.visualization.VisualizerWithKeyCallback() if keys else o3d.visualization.Visualizer()
    if not vis.create_window(window_name=title, width=width, height=height, visible=visible):
        raise RenderError("Open3D could not open a window" if visible else
                          "Open3D could not create an offscreen rendering context (no display and no EGL?)")
    try:
        for g in scene.geometries:
            vis.add_geometry(g)
        opt = vis.get_render_option()
        opt.background_color = np.asarray(BACKGROUND)
        opt.point_size = _point_size(scene, extrinsic, width, height)
        opt.light_on = False  # flat colours: the tubes are lines, not objects to shade
        opt.mesh_show_back_face = True
        if not vis.get_view_control().convert_from_pinhole_camera_parameters(_camera(width, height, extrinsic),
                                                                              allow_arbitrary=True):
            raise RenderError("Open3D refused the viewpoint")
    except BaseException:
        vis.destroy_window()
        raise
    return vis


def check_image_size(width: int, height: int) -> None:
    """InputError unless 16 <= width, height <= 8192 pixels."""
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise InputError(f"image size {width}x{height}: expected width and height between 16 and 8192")


def render_headless(run: RunOutputs, path: str | Path, width: int = 960, height: int = 720,
                    gt: str | Path | tuple[np.ndarray, np.ndarray] | None = None, keyframe: int | None = None
                    ) -> dict[str, Any]:
    """Render the run's scene offscreen to the PNG `path` (written atomically); returns statistics.

    The view is the overview (`overview_extrinsic`), or with `keyframe` the view behind that keyframe
    with its frustum highlighted. `gt` as for `build_scene`. Needs no display (Open3D falls back to
    EGL); RenderError when Open3D cannot create the offscreen context.

    Returns: png, width, height, object_fraction (pixels differing from the background), pixel_std,
    points, keyframes, frames, gt_poses, seconds.
    """

    from v2d.io.writers import write_image_png

    t0 = time.perf_counter()
    check_image_size(width, height)
    path = check_output_path(path, ".png", "--headless")
    scene = build_scene(run, gt, highlight=keyframe)
    extrinsic = overview_extrinsic(scene, width, height) if keyframe is None else keyframe_extrinsic(scene, keyframe)
    with _quiet_open3d():
        vis = open_window(scene, width, height, extrinsic, visible=False)
        try:
            buf = np.asarray(vis.capture_screen_float_buffer(do_render=True))
        finally:
            vis.destroy_window()
    if buf.shape != (height, width, 3):
        raise RenderError(f"Open3D rendered an image of shape {buf.shape}, expected {(height, width, 3)}")
    rgb = np.clip(np.round(buf * 255), 0, 255).astype(np.uint8)
    write_image_png(path, rgb)
    obj = (np.abs(buf - np.asarray(BACKGROUND)) > OBJECT_PIXEL_TOLERANCE).any(-1)
    return {"png": str(path), "width": width, "height": height, "object_fraction": float(obj.mean()),
            "pixel_std": float(buf.std()), **scene.stats, "seconds": time.perf_counter() - t0}


KEYS = {"next": (ord("N"), 262), "previous": (ord("P"), 263), "overview": (ord("V"),)}  # 262/263: GLFW right/left


def attach_keys(vis: o3d.visualization.VisualizerWithKeyCallback, scene: Scene, overview: np.ndarray
                ) -> dict[str, Any]:
    """Register the viewer's keys (KEYS) on `vis`, whose geometries are the scene's; returns the callbacks
    by name. "next"/"previous" move the highlighted frustum (its mesh is edited in place) and the view to
    the next/previous keyframe, cyclically; "overview" returns to the `overview` extrinsic."""

    def view(v: o3d.visualization.Visualizer, extrinsic: np.ndarray) -> None:
        ctl = v.get_view_control()
        params = ctl.convert_to_pinhole_camera_parameters()  # keeps the window's current size
        params.extrinsic = extrinsic
        ctl.convert_from_pinhole_camera_parameters(params, allow_arbitrary=True)

    def step(delta: int):
        def callback(v: o3d.visualization.Visualizer) -> bool:
            K = len(scene.keyframes_wc)
            k = scene.highlighted
            scene.highlighted = k = (0 if delta > 0 else K - 1) if k is None else (k + delta) % K
            new = scene.highlight_mesh(k)
            scene.highlight.vertices, scene.highlight.triangles = new.vertices, new.triangles
            scene.highlight.vertex_colors = new.vertex_colors
            v.update_geometry(scene.highlight)
            view(v, keyframe_extrinsic(scene, k))
            _log.info("keyframe %d of %d", k, K)
            return True
        return callback

    def to_overview(v: o3d.visualization.Visualizer) -> bool:
        view(v, overview)
        return True

    callbacks = {"next": step(1), "previous": step(-1), "overview": to_overview}
    for name, keys in KEYS.items():
        for key in keys:
            vis.register_key_callback(key, callbacks[name])
    return callbacks


def show_interactive(run: RunOutputs, gt: str | Path | tuple[np.ndarray, np.ndarray] | None = None,
                     width: int = 960, height: int = 720) -> None:
    """Open a window on the run's scene. Keys: N / right arrow and P / left arrow step the highlighted
    keyframe and move the view behind it; V returns to the overview; Open3D's own keys work too (H lists
    them, +/- change the point size, Q quits)."""

    require_display()
    check_image_size(width, height)
    scene = build_scene(run, gt, highlight=0)
    overview = overview_extrinsic(scene, width, height)
    vis = open_window(scene, width, height, overview, visible=True, keys=True, title=f"v2d vis {run.root}")
    try:
        attach_keys(vis, scene, overview)
        _log.info("keys: N/P (or right/left) next/previous keyframe, V overview, Q quit")
        vis.run()
    finally:
        vis.destroy_window()


# --------------------------------------------------------------------------------------------------
# TSDF mesh
# --------------------------------------------------------------------------------------------------


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
    stats = {"vertices": len(mesh.vertices), "triangles": len(mesh.triangles), "voxel": voxel,
             "keyframes": K, "coloured": colour, "seconds": time.perf_counter() - t0}
    return mesh, stats


def write_mesh(mesh: o3d.geometry.TriangleMesh, path: str | Path) -> Path:
    """Write a mesh as binary PLY, atomically (a temporary .ply next to `path`, then renamed)."""
    import open3d as o3d

    path = check_output_path(path, ".ply", "--mesh")

    def write(name: str) -> None:
        with _quiet_open3d():
            if not o3d.io.write_triangle_mesh(name, mesh, write_ascii=False, compressed=False):
                raise OSError("Open3D could not write it")

    return atomic_write_named(path, write)

"""Views of a run's scene (`slam.vis_scene`): viewpoints, offscreen PNG renders and the interactive window.

Viewpoints follow OpenCV's convention (x right, y down, z forward; extrinsic = world->camera): the
overview from above and behind the keyframes, or the view from behind one keyframe. Rendering uses
the legacy `o3d.visualization.Visualizer`, which falls back to EGL offscreen rendering when there is
no display; `open_window` is the one setup both the interactive viewer and the PNG renders use.

Open3D is imported inside the functions that need it (importing it is slow and needs libusb).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slam.vis_scene import Scene, build_scene, quiet_open3d
from v2d.errors import InputError, RenderError
from v2d.io.results import RunOutputs
from v2d.io.writers import check_output_path

if TYPE_CHECKING:
    import open3d as o3d

__all__ = ["KEYS", "VIEW_FOV_DEG", "attach_keys", "check_image_size", "has_display", "keyframe_extrinsic",
           "open_window", "overview_extrinsic", "render_headless", "require_display", "show_interactive"]

_log = logging.getLogger(__name__)

# Overview camera: above and behind the keyframes, looking at the centre of the cloud.
VIEW_FOV_DEG = 60.0  # vertical field of view
VIEW_ELEVATION_DEG = 45.0  # angle of the viewing direction above the cameras' horizon
VIEW_MARGIN = 1.0  # distance factor on "the scene's radius fills the narrower field of view"
# Keyframe view (interactive N/P keys, --keyframe): behind and above the keyframe, looking where it looks.
KEYFRAME_VIEW_BACK = 4.0  # frustum heights behind the camera centre
KEYFRAME_VIEW_UP = 1.5  # frustum heights above it
# Rendering.
BACKGROUND = (1.0, 1.0, 1.0)
POINT_SIZE_RANGE_PX = (1.0, 8.0)  # points are drawn as big as the cloud's spacing looks, within these bounds
OBJECT_PIXEL_TOLERANCE = 0.03  # a pixel is "object" when a channel differs this much from the background

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
    with quiet_open3d():
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

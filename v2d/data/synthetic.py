"""Procedural synthetic indoor scenes rendered with exact depth, poses and intrinsics.

A scene (`make_scene`) is a room (axis-aligned box seen from inside) holding 3-8 boxes standing on
the floor (axis-aligned or rotated about the vertical) and 1-2 slanted boards (free-standing or
leaning against a wall). Every surface carries a procedural colour texture evaluated from the 2D
coordinates of the hit point on that surface (multi-octave value noise mixed with a checker and
stripes), so a surface point has the same albedo from every view, which is what multi-view
matching needs. Lighting is an ambient term plus one directional light with Lambert shading (no
shadows, no specularities).

Rendering (`render_views`) casts one ray per pixel with Open3D's `RaycastingScene` (Embree, float32)
against the scene's faces as triangles (two per face, double-sided); the nearest hit wins. Each hit
is then textured and shaded in torch float32 from its surface's plane. Depth is the camera z of the
hit point, so back-projecting it with the intrinsics returns the rendered surface exactly (up to
float32 rounding: ~3e-8 relative median, < 2e-6 at most against float64 ray-plane intersection).

A trajectory (`make_trajectory`) moves like a hand-held camera at 30 fps: it walks round the room
centre on a ring that no box, board or wall comes near, looking inwards at the boxes in the middle.

Conventions (those of the whole code base):

- World frame: y points down (OpenCV-like), the floor is the plane y = 0 and the room spans
  x in [-W/2, W/2], y in [-height, 0], z in [-D/2, D/2]. Units are metres.
- Cameras: x right, y down, looking down +z; `poses_cw` are world->camera SE3 in lietorch layout
  [tx, ty, tz, qx, qy, qz, qw]; `intrinsics` = fx, fy, cx, cy with pixel centres at integer
  coordinates, so the ray through pixel (u, v) = (col, row) is K^-1 [u, v, 1].
- Types: images are uint8 RGB numpy, depths float32 numpy (what data loaders and OpenCV take);
  poses and intrinsics are float64 torch (what the geometry code takes).

Randomness: everything is drawn from `numpy.random.default_rng([seed, stream])` with one stream for
the scene and one for the trajectory, so the same seed gives bit-identical output on one machine and
a trajectory's first frames do not depend on how many frames are requested.

Texture contrast (so that optical flow is never hopeless): each surface mixes two colours whose
luminances differ by at least `MIN_LUMINANCE_CONTRAST` (0.4 of full scale) with a pattern that is
at least 55% value noise (4 octaves, no flat areas), and the light factor is at least
`AMBIENT_RANGE[0]` (0.5). Measured over 200 scenes, a surface's grey-level standard deviation seen
up close under the darkest lighting is 7.8 at least, 10 at the 1st percentile, 16 at the median
(of 255). Texture frequencies span 0.7-32 cycles/m; octaves finer than about 4 pixels per cycle
fade to their mean (a cheap stand-in for mip-mapping that avoids aliasing, which would make the
same surface look different from different distances).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from v2d.errors import InputError, ShapeError, V2DError
from v2d.geometry.camera import pixel_rays
from v2d.geometry.lie import matrix_to_quat, quat_to_matrix

__all__ = [
    "MAX_STEP_ROTATION_DEG",
    "MAX_STEP_TRANSLATION",
    "SceneSpec",
    "SurfaceTextures",
    "SyntheticSequence",
    "default_intrinsics",
    "make_scene",
    "make_trajectory",
    "render_sequence",
    "render_views",
    "scene_clearance",
]

# Scene ranges (metres).
ROOM_SIZE_RANGE = (4.0, 8.0)  # width (x) and depth (z), drawn independently
ROOM_HEIGHT_RANGE = (2.5, 3.5)
NUM_BOXES_RANGE = (3, 8)  # inclusive
NUM_BOARDS_RANGE = (1, 2)  # slanted planes, inclusive
BOX_HALF_SIZE_RANGE = (0.15, 0.5)  # horizontal half extents
BOX_HEIGHT_RANGE = (0.3, 2.0)
ORBIT_RADIUS_RANGE = (1.3, 2.2)  # cameras circle the room's vertical axis at this distance
ORBIT_HALF_WIDTH = 0.2  # radial drift of the cameras about the orbit
CAMERA_HEIGHT_RANGE = (1.3, 1.7)  # above the floor
CAMERA_HALF_HEIGHT = 0.15  # vertical drift of the cameras
LAYOUT_MARGIN = 0.45  # horizontal gap between the cameras' ring and walls or objects outside it
INNER_MARGIN = 0.7  # horizontal gap between the ring and objects inside it (what the cameras look at)
CENTRAL_BOX_MAX_HEIGHT = 1.2  # boxes inside the ring stay below the cameras, which look over them
# Lighting: factor = ambient + diffuse * max(0, n . l), at most 1.05 so bright albedo does not clip.
AMBIENT_RANGE = (0.5, 0.7)
DIFFUSE_RANGE = (0.2, 0.4)
# Texture.
MIN_LUMINANCE_CONTRAST = 0.4
NOISE_OCTAVES = 4
NOISE_BASE_FREQUENCY_RANGE = (0.7, 4.0)  # cycles per metre of the coarsest octave (log-uniform)
CHECKER_PERIOD_RANGE = (0.08, 0.6)  # metres (log-uniform)
STRIPE_PERIOD_RANGE = (0.05, 0.4)  # metres (log-uniform)
_NOISE_TABLE_SIZE = 256  # lattice values per axis; power of two so wrapping is a bit mask
_NOISE_STRETCH = 2.2  # fBm of value noise clusters around 0.5; stretch it to use the colour range

# Trajectory bounds at speed 1 and 30 fps, guaranteed (see make_trajectory).
MAX_STEP_TRANSLATION = 0.05  # metres per frame
MAX_STEP_ROTATION_DEG = 2.0  # degrees per frame
DEFAULT_CLEARANCE = 0.4  # metres from the camera centre to any surface

_SCENE_STREAM, _TRAJECTORY_STREAM = 0, 1
_CHUNK_PIXELS = 1 << 17  # pixels textured at once: bounds the per-pixel temporaries for large images


@dataclass(frozen=True, eq=False)
class SurfaceTextures:
    """Procedural texture parameters, one row per surface.

    Surfaces are numbered: 0-5 room faces, then 6 per box, then one per board. A face of a box or
    the room is `axis * 2 + (1 if its normal points along +axis else 0)`; the room's normals point
    inwards. Faces of one box share a material but not `uv_offset`, so they do not repeat each other.

    Shapes (S surfaces, O = NOISE_OCTAVES), all float64 unless noted:
        colour_a, colour_b: (S, 3) the two albedos the pattern mixes (RGB in [0, 1])
        colour_c: (S, 3) accent albedo blended in by a low-frequency noise, weight `accent` (S,)
        weights: (S, 3) mix of noise, checker, stripes (rows sum to 1)
        noise_frequency: (S,) cycles per metre of the coarsest octave; noise_gain: (S,) per octave
        noise_offset: (S, O, 2) int64 lattice offsets (decorrelate octaves and surfaces)
        checker_period, checker_angle, stripe_period, stripe_angle: (S,) metres, radians
        accent_frequency: (S,) cycles per metre
        uv_offset: (S, 2) metres added to the surface coordinates
    """

    colour_a: Tensor
    colour_b: Tensor
    colour_c: Tensor
    accent: Tensor
    weights: Tensor
    noise_frequency: Tensor
    noise_gain: Tensor
    noise_offset: Tensor
    checker_period: Tensor
    checker_angle: Tensor
    stripe_period: Tensor
    stripe_angle: Tensor
    accent_frequency: Tensor
    uv_offset: Tensor


@dataclass(frozen=True, eq=False)
class SceneSpec:
    """A procedural room: geometry, textures, light, and where cameras may move.

    Boxes stand on the floor: box k spans its local frame [-half, half] around `box_centers[k]`,
    rotated by `box_yaw[k]` about the vertical (world = R_y(yaw) local + centre). Board q is the
    rectangle centre + a u + b v, |a| <= half[q, 0], |b| <= half[q, 1], with unit edge directions
    u = board_axes[q, 0], v = board_axes[q, 1] and normal board_axes[q, 2] (boards are two-sided).
    Cameras of `make_trajectory` stay within ORBIT_HALF_WIDTH of the circle of radius
    `orbit_radius` about the vertical axis x = z = 0, and within CAMERA_HALF_HEIGHT of y = camera_y.

    Shapes (K boxes, Q boards, S = 6 + 6 K + Q surfaces), float64 torch:
        room_min, room_max: (3,)
        box_centers, box_half: (K, 3); box_yaw: (K,) radians
        board_centers: (Q, 3); board_axes: (Q, 3, 3) rows u, v, n; board_half: (Q, 2)
        orbit_radius, camera_y: floats (metres; camera_y < 0 is above the floor)
        light_dir: (3,) unit vector towards the light; ambient, diffuse: floats
        noise_table: (T, T) float32 value-noise lattice
        textures: per-surface parameters (see SurfaceTextures)
    """

    seed: int
    room_min: Tensor
    room_max: Tensor
    box_centers: Tensor
    box_half: Tensor
    box_yaw: Tensor
    board_centers: Tensor
    board_axes: Tensor
    board_half: Tensor
    orbit_radius: float
    camera_y: float
    light_dir: Tensor
    ambient: float
    diffuse: float
    noise_table: Tensor
    textures: SurfaceTextures

    @property
    def num_surfaces(self) -> int:
        return 6 + 6 * self.box_centers.shape[0] + self.board_centers.shape[0]


@dataclass(frozen=True, eq=False)
class SyntheticSequence:
    """A rendered sequence with its exact ground truth.

    Shapes:
        images: (N, H, W, 3) uint8 RGB numpy
        depths: (N, H, W) float32 numpy (camera z, metres; every pixel hits a surface)
        poses_cw: (N, 7) float64 torch (world->camera, [tx, ty, tz, qx, qy, qz, qw])
        intrinsics: (4,) float64 torch (fx, fy, cx, cy)
        timestamps: (N,) float64 numpy (seconds, frame k at k / fps)
    """

    images: np.ndarray
    depths: np.ndarray
    poses_cw: Tensor
    intrinsics: Tensor
    timestamps: np.ndarray
    scene: SceneSpec


# --------------------------------------------------------------------------------------------------
# validation


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed: expected a non-negative int, got {seed!r}")
    return int(seed)


def _check_size(height: object, width: object) -> None:
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ShapeError(f"image size: expected positive int height and width, got {name}={n!r}")


def _check_num_frames(num_frames: object) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int | np.integer) or num_frames < 1:
        raise ShapeError(f"num_frames: expected >= 1, got {num_frames!r}")
    return int(num_frames)


def _check_positive(name: str, x: float) -> float:
    if not (isinstance(x, int | float) and math.isfinite(x) and x > 0):
        raise InputError(f"{name}: expected a finite positive number, got {x!r}")
    return float(x)


def _as_float64(name: str, x: object, shape_text: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ShapeError(f"{name}: expected a floating-point torch.Tensor {shape_text}, got {type(x).__name__}")
    return x.detach().to(device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# scene


def _rot_y(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _luminance(c: np.ndarray) -> float:
    return float(c @ np.array([0.299, 0.587, 0.114]))


def _colour(rng: np.random.Generator, lum: float) -> np.ndarray:
    """A random hue scaled to luminance `lum` (clipping can lower it; callers re-check)."""
    chroma = rng.uniform(0.25, 1.0, 3)
    return np.clip(chroma * lum / _luminance(chroma), 0.0, 1.0)


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1]))))


def _material(rng: np.random.Generator) -> dict[str, np.ndarray | float]:
    """One random material (the per-surface parameters of SurfaceTextures, minus uv_offset)."""
    while True:
        dark = rng.uniform(0.06, 0.45)
        light = rng.uniform(dark + MIN_LUMINANCE_CONTRAST, min(0.95, dark + 0.8))
        ca, cb = _colour(rng, dark), _colour(rng, light)
        if _luminance(cb) - _luminance(ca) >= MIN_LUMINANCE_CONTRAST:
            break
    if rng.random() < 0.5:
        ca, cb = cb, ca
    w_noise = rng.uniform(0.55, 1.0)
    split = rng.random()
    return {
        "colour_a": ca,
        "colour_b": cb,
        "colour_c": _colour(rng, rng.uniform(0.2, 0.8)),
        "accent": rng.uniform(0.0, 0.3),
        "weights": np.array([w_noise, (1 - w_noise) * split, (1 - w_noise) * (1 - split)]),
        "noise_frequency": _log_uniform(rng, NOISE_BASE_FREQUENCY_RANGE),
        "noise_gain": rng.uniform(0.5, 0.75),
        "noise_offset": rng.integers(0, _NOISE_TABLE_SIZE, (NOISE_OCTAVES, 2)),
        "checker_period": _log_uniform(rng, CHECKER_PERIOD_RANGE),
        "checker_angle": rng.uniform(0.0, math.pi / 2),
        "stripe_period": _log_uniform(rng, STRIPE_PERIOD_RANGE),
        "stripe_angle": rng.uniform(0.0, math.pi),
        "accent_frequency": rng.uniform(0.2, 1.0),
    }


_Rect = tuple[float, float, float, float]  # floor footprint (cx, cz, half_x, half_z), axis-aligned


def _rect_distance(a: _Rect, b: _Rect) -> float:
    """Gap between two floor rectangles (0 if they overlap)."""
    dx = max(0.0, abs(a[0] - b[0]) - a[2] - b[2])
    dz = max(0.0, abs(a[1] - b[1]) - a[3] - b[3])
    return math.hypot(dx, dz)


def _board(bottom: np.ndarray, along: np.ndarray, forward: np.ndarray, run: float, rise: float, width: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Rect]:
    """A board whose bottom edge (centre `bottom`, direction `along`) is on the floor and whose top
    edge is `run` further along `forward` and `rise` higher: centre, axes (u, v, n), half, footprint."""
    up = np.array([0.0, -1.0, 0.0])
    v = forward * run + up * rise
    length = float(np.linalg.norm(v))
    v = v / length
    corners = np.stack([bottom + s * along * width / 2 + t * forward * run for s in (-1, 1) for t in (0, 1)])
    lo, hi = corners.min(0), corners.max(0)
    rect = ((lo[0] + hi[0]) / 2, (lo[2] + hi[2]) / 2, (hi[0] - lo[0]) / 2, (hi[2] - lo[2]) / 2)
    centre = bottom + (forward * run + up * rise) / 2
    return centre, np.stack([along, v, np.cross(along, v)]), np.array([width / 2, length / 2]), rect


class _PlacementFailed(Exception):
    """The layout draw could not place enough boxes and boards (rare; make_scene redraws)."""


def make_scene(seed: int) -> SceneSpec:
    """A random room with boxes, slanted boards, textures and light, deterministic from `seed`.

    Layout: room 4-8 m wide and deep, 2.5-3.5 m high. Cameras orbit the room's vertical axis on a
    ring (radius 1.3-2.2 m, +-0.2 m radially, 1.3-1.7 m +-0.15 m above the floor, see
    `make_trajectory`). 3-8 boxes (half sizes 0.15-0.5 m, 60% rotated about the vertical) and 1-2
    boards (slanted 20-70 degrees, some leaning against a wall) stand either inside the ring, where
    the cameras look, keeping `INNER_MARGIN` (0.7 m) from it and lower than 1.2 m, or outside it,
    keeping `LAYOUT_MARGIN` (0.45 m) from it, up to 2 m tall. The walls keep `LAYOUT_MARGIN` too.
    """
    seed = _check_seed(seed)
    # A few seeds cannot place the minimum number of objects with the first draw; those redraw the
    # whole scene from a further stream (deterministic; every other seed keeps its scene).
    for attempt in range(8):
        rng = np.random.default_rng([seed, _SCENE_STREAM] + ([attempt] if attempt else []))
        try:
            return _build_scene(seed, rng)
        except _PlacementFailed:
            continue
    raise V2DError(f"make_scene: could not place the minimum of objects for seed {seed} in 8 draws")


def _build_scene(seed: int, rng: np.random.Generator) -> SceneSpec:
    half_x, half_z = rng.uniform(*ROOM_SIZE_RANGE, 2) / 2
    height = rng.uniform(*ROOM_HEIGHT_RANGE)
    room_min = np.array([-half_x, -height, -half_z])
    room_max = np.array([half_x, 0.0, half_z])
    radius = rng.uniform(ORBIT_RADIUS_RANGE[0], min(ORBIT_RADIUS_RANGE[1], min(half_x, half_z) - ORBIT_HALF_WIDTH
                                                        - LAYOUT_MARGIN))
    camera_y = -rng.uniform(*CAMERA_HEIGHT_RANGE)
    inner = radius - ORBIT_HALF_WIDTH - INNER_MARGIN  # objects inside the ring end here
    outer = radius + ORBIT_HALF_WIDTH + LAYOUT_MARGIN  # objects outside the ring start here
    up = np.array([0.0, -1.0, 0.0])
    footprints: list[_Rect] = []

    def fits(rect: _Rect) -> bool:
        cx, cz, ex, ez = rect
        if abs(cx) + ex > half_x - 0.003 or abs(cz) + ez > half_z - 0.003:
            return False
        far = math.hypot(abs(cx) + ex, abs(cz) + ez)
        near = math.hypot(max(abs(cx) - ex, 0.0), max(abs(cz) - ez, 0.0))
        return (far <= inner or near >= outer) and all(_rect_distance(rect, f) >= 0.05 for f in footprints)

    def position(central: bool) -> np.ndarray:
        if central:
            r, a = inner * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            return np.array([r * math.cos(a), 0.0, r * math.sin(a)])
        return np.array([rng.uniform(-half_x, half_x), 0.0, rng.uniform(-half_z, half_z)])

    # Boards: against a wall when it leaves room for one between the ring and the wall, else free
    # standing (an easel-like slanted panel). Rejection sampling; sizes shrink after failures.
    board_c, board_axes, board_half = [], [], []
    num_boards = int(rng.integers(NUM_BOARDS_RANGE[0], NUM_BOARDS_RANGE[1] + 1))
    walls = [w for w in range(4) if room_max[0 if w < 2 else 2] - outer >= 0.3]
    for _ in range(num_boards):
        lean = bool(walls) and rng.random() < 0.5
        wall = int(walls.pop(int(rng.integers(len(walls))))) if lean else -1
        for attempt in range(200):
            shrink = 0.8 ** (attempt // 40)
            if lean:
                axis, sign = (0 if wall < 2 else 2), (1.0 if wall % 2 == 0 else -1.0)
                out, along = np.zeros(3), np.zeros(3)
                out[axis], along[2 - axis] = sign, 1.0
                wall_half, wall_len = room_max[axis], 2 * room_max[2 - axis]
                width = rng.uniform(0.8, min(2.0, wall_len - 1.0)) * shrink
                s = rng.uniform(-(wall_len - width) / 2 + 0.1, (wall_len - width) / 2 - 0.1)
                foot = rng.uniform(0.3, min(1.0, wall_half - outer))
                rise = rng.uniform(0.8, min(2.0, height - 0.3))
                bottom = out * (wall_half - foot) + along * s + up * 0.002
                parts = _board(bottom, along, out, foot - 0.005, rise, width)
            else:
                angle, yaw = math.radians(rng.uniform(20, 70)), rng.uniform(0, 2 * math.pi)
                length, width = rng.uniform(0.5, 1.2) * shrink, rng.uniform(0.4, 1.0) * shrink
                along, forward = _rot_y(yaw) @ np.array([1.0, 0, 0]), _rot_y(yaw) @ np.array([0, 0, 1.0])
                bottom = position(central=rng.random() < 0.7) + up * 0.002
                parts = _board(bottom, along, forward, length * math.cos(angle), length * math.sin(angle), width)
            if fits(parts[3]):
                board_c.append(parts[0])
                board_axes.append(parts[1])
                board_half.append(parts[2])
                footprints.append(parts[3])
                break

    box_c, box_h, box_yaw = [], [], []
    num_boxes = int(rng.integers(NUM_BOXES_RANGE[0], NUM_BOXES_RANGE[1] + 1))
    for _ in range(num_boxes):
        for attempt in range(200):
            shrink = 0.8 ** (attempt // 40)
            central = rng.random() < 0.6
            hx, hz = rng.uniform(*BOX_HALF_SIZE_RANGE, 2) * shrink
            top = CENTRAL_BOX_MAX_HEIGHT if central else min(BOX_HEIGHT_RANGE[1], height - 0.3)
            h = rng.uniform(BOX_HEIGHT_RANGE[0], top)
            yaw = 0.0 if rng.random() < 0.4 else rng.uniform(0.0, math.pi / 2)
            c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
            p = position(central)
            rect = (p[0], p[2], hx * c + hz * s, hx * s + hz * c)
            if fits(rect):
                footprints.append(rect)
                box_c.append([p[0], -h / 2, p[2]])
                box_h.append([hx, h / 2, hz])
                box_yaw.append(yaw)
                break
    if len(box_c) < NUM_BOXES_RANGE[0] or not board_c:  # e.g. seed 1000377 (2 boxes)
        raise _PlacementFailed

    light = np.array([rng.uniform(-1, 1), -rng.uniform(0.5, 1.5), rng.uniform(-1, 1)])
    ambient, diffuse = rng.uniform(*AMBIENT_RANGE), rng.uniform(*DIFFUSE_RANGE)
    noise_table = rng.random((_NOISE_TABLE_SIZE, _NOISE_TABLE_SIZE), dtype=np.float32)

    # Materials: one per room face, box and board; faces of a box share theirs.
    num_k, num_q = len(box_c), len(board_c)
    owners = list(range(6)) + [6 + k for k in range(num_k) for _ in range(6)] + [6 + num_k + q for q in range(num_q)]
    materials = [_material(rng) for _ in range(6 + num_k + num_q)]
    uv_offset = rng.uniform(-50.0, 50.0, (len(owners), 2))

    def column(key: str) -> Tensor:
        return torch.from_numpy(np.stack([np.asarray(materials[o][key]) for o in owners]))

    textures = SurfaceTextures(**{key: column(key) for key in materials[0]}, uv_offset=torch.from_numpy(uv_offset))
    f64 = lambda a, shape: torch.tensor(np.asarray(a, dtype=np.float64).reshape(shape))  # noqa: E731
    return SceneSpec(
        seed=seed,
        room_min=f64(room_min, (3,)),
        room_max=f64(room_max, (3,)),
        box_centers=f64(box_c, (-1, 3)),
        box_half=f64(box_h, (-1, 3)),
        box_yaw=f64(box_yaw, (-1,)),
        board_centers=f64(board_c, (-1, 3)),
        board_axes=f64(board_axes, (-1, 3, 3)),
        board_half=f64(board_half, (-1, 2)),
        orbit_radius=float(radius),
        camera_y=float(camera_y),
        light_dir=f64(light / np.linalg.norm(light), (3,)),
        ambient=float(ambient),
        diffuse=float(diffuse),
        noise_table=torch.from_numpy(noise_table),
        textures=textures,
    )


def scene_clearance(scene: SceneSpec, points: Tensor) -> Tensor:
    """Distance from each point to the nearest surface (room faces, boxes, boards).

    Points inside a box get a negative distance; the room's is positive inside it.

    Shapes:
        points: (P, 3) world coordinates -> (P,) float64
    """
    p = _as_float64("points", points, "(P, 3)")
    if p.dim() != 2 or p.shape[1] != 3:
        raise ShapeError(f"points: expected (P, 3), got {tuple(p.shape)}")
    room = torch.minimum(p - scene.room_min, scene.room_max - p).min(-1).values
    dists = [room]
    if scene.box_centers.shape[0]:
        local = torch.einsum("pkj,kji->pki", p[:, None] - scene.box_centers, _box_rotations(scene.box_yaw))
        q = local.abs() - scene.box_half
        outside = q.clamp(min=0).norm(dim=-1)
        inside = q.max(-1).values.clamp(max=0)
        dists.append((outside + inside).min(-1).values)
    if scene.board_centers.shape[0]:
        coords = torch.einsum("pqj,qij->pqi", p[:, None] - scene.board_centers, scene.board_axes)
        out_ab = (coords[..., :2].abs() - scene.board_half).clamp(min=0)
        dists.append(torch.cat([out_ab, coords[..., 2:]], -1).norm(dim=-1).min(-1).values)
    return torch.stack(dists).min(0).values


def _box_rotations(yaw: Tensor) -> Tensor:
    """R_y(yaw) per box (local -> world): (K,) -> (K, 3, 3)."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).unflatten(-1, (3, 3))


# --------------------------------------------------------------------------------------------------
# trajectory


def _sinusoids(rng: np.random.Generator, total_amplitude: float, freq_range: tuple[float, float], terms: int = 2
               ) -> np.ndarray:
    """(terms, 3) rows of amplitude, frequency (Hz), phase; amplitudes sum to `total_amplitude`."""
    amp = rng.dirichlet(np.ones(terms)) * total_amplitude
    return np.stack([amp, rng.uniform(*freq_range, terms), rng.uniform(0, 2 * math.pi, terms)], axis=1)


def _eval(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (s[:, :1] * np.sin(2 * math.pi * s[:, 1:2] * t[None] + s[:, 2:3])).sum(0)


def _max_rate(s: np.ndarray) -> float:
    """Upper bound of |d/dt| of a sum of sinusoids."""
    return float((s[:, 0] * 2 * math.pi * s[:, 1]).sum())


def make_trajectory(scene: SceneSpec, seed: int, num_frames: int, *, fps: float = 30.0, speed: float = 1.0,
                    clearance: float = DEFAULT_CLEARANCE) -> Tensor:
    """Smooth hand-held-like camera motion around the room centre, deterministic from `seed`.

    Position, in cylindrical coordinates about the room's vertical axis: the camera walks round the
    scene's orbit (`scene.orbit_radius`) at 0.45-0.9 m/s (+-40%), drifting +-0.2 m
    radially and +-0.15 m vertically (sums of sinusoids of 0.05-0.25 Hz). Orientation
    R_wc = R_y(yaw) R_x(-tilt) R_z(roll): the yaw faces the room axis, the tilt aims 0.3-0.9 m above
    the floor there (clipped to 5-30 degrees down), and hand-held sway adds +-3-10 deg of yaw,
    +-2-6 deg of tilt and +-1-3 deg of roll (0.1-0.5 Hz). So the camera looks at the boxes inside
    the ring and moves mostly sideways, which gives parallax.

    Bounds, guaranteed for every pair of consecutive frames: translation <= MAX_STEP_TRANSLATION
    * speed * 30 / fps metres and rotation <= MAX_STEP_ROTATION_DEG * speed * 30 / fps degrees
    (time runs slower when the drawn motion could exceed them; typical steps are 40-60% of the
    bounds). `speed` scales time: 2.0 is the same path at twice the speed. The camera centre keeps
    `clearance` metres from every surface (the layout gives 0.45 m); if a larger clearance is
    asked for, the drift is damped, and InputError is raised if even the bare orbit violates it.
    The first frames do not depend on `num_frames`.

    Shapes:
        -> poses_cw (N, 7) float64 torch [tx, ty, tz, qx, qy, qz, qw]
    """
    seed = _check_seed(seed)
    num_frames = _check_num_frames(num_frames)
    fps, speed = _check_positive("fps", fps), _check_positive("speed", speed)
    clearance = float(clearance)
    rng = np.random.default_rng([seed, _TRAJECTORY_STREAM])
    R = scene.orbit_radius
    alpha0, omega = rng.uniform(0, 2 * math.pi), rng.choice([-1.0, 1.0]) * rng.uniform(0.45, 0.9) / R
    alpha = _sinusoids(rng, rng.uniform(0.1, 0.4) / R, (0.05, 0.2))
    # The walking speed varies but never drops below 60% of its mean: no near-zero baselines.
    alpha[:, 0] *= min(1.0, 0.4 * abs(omega) / _max_rate(alpha))
    radial = _sinusoids(rng, ORBIT_HALF_WIDTH * rng.uniform(0.5, 1.0), (0.05, 0.25))
    vertical = _sinusoids(rng, CAMERA_HALF_HEIGHT * rng.uniform(0.5, 1.0), (0.05, 0.25))
    look_height = rng.uniform(0.3, 0.9)
    tilt0 = min(max(math.atan2(-scene.camera_y - look_height, R), math.radians(5)), math.radians(30))
    yaw = _sinusoids(rng, math.radians(rng.uniform(3, 10)), (0.1, 0.3))
    tilt = _sinusoids(rng, math.radians(rng.uniform(2, 6)), (0.1, 0.3))
    roll = _sinusoids(rng, math.radians(rng.uniform(1, 3)), (0.2, 0.5))

    # |velocity|^2 = r'^2 + (r alpha')^2 + y'^2, and a step's chord is at most its arc. The angular
    # velocity of R_y R_x R_z is at most |yaw'| + |tilt'| + |roll'|, and yaw' includes alpha'.
    alpha_rate = abs(omega) + _max_rate(alpha)
    v_max = math.sqrt(_max_rate(radial) ** 2 + ((R + ORBIT_HALF_WIDTH) * alpha_rate) ** 2 + _max_rate(vertical) ** 2)
    w_max = alpha_rate + _max_rate(yaw) + _max_rate(tilt) + _max_rate(roll)
    scale = speed * min(1.0, MAX_STEP_TRANSLATION * 30.0 / v_max, math.radians(MAX_STEP_ROTATION_DEG) * 30.0 / w_max)
    omega *= scale
    for s in (alpha, radial, vertical, yaw, tilt, roll):
        s[:, 1] *= scale

    t = np.arange(num_frames, dtype=np.float64) / fps
    a = alpha0 + omega * t + _eval(alpha, t)
    for damping in (1.0, 0.5, 0.25, 0.0):
        r = R + damping * _eval(radial, t)
        centres = np.stack([r * np.cos(a), scene.camera_y + damping * _eval(vertical, t), r * np.sin(a)], axis=1)
        if scene_clearance(scene, torch.from_numpy(centres)).min().item() >= clearance:
            break
    else:
        raise InputError(f"make_trajectory: clearance {clearance} m cannot be kept on the orbit of scene "
                         f"{scene.seed} (the layout guarantees {LAYOUT_MARGIN} m)")

    # Yaw -pi/2 - a turns the camera's +z from the camera at angle a towards the room axis.
    psi = -math.pi / 2 - a + _eval(yaw, t)
    theta = -(tilt0 + _eval(tilt, t))
    phi = _eval(roll, t)
    R_wc = np.stack([_rot_y(p) @ _rot_x(q) @ _rot_z(w) for p, q, w in zip(psi, theta, phi, strict=True)])
    R_cw = torch.from_numpy(R_wc).transpose(-1, -2)
    t_cw = -(R_cw @ torch.from_numpy(centres)[..., None])[..., 0]
    return torch.cat([t_cw, matrix_to_quat(R_cw)], dim=-1)


# --------------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class _Surfaces:
    """Every surface as a planar patch, one row per surface (numbered as in SurfaceTextures).

    A point p on surface s has texture coordinates uv = uv_axes[s] (p - uv_origin[s]) (metres).

    Shapes (S surfaces), float32: normal (S, 3) unit (room faces: inwards; box faces: outwards;
    boards: board_axes n); uv_origin (S, 3); uv_axes (S, 2, 3).
    """

    normal: Tensor
    uv_origin: Tensor
    uv_axes: Tensor


# Texture coordinates of an axis-aligned face whose normal is along axis a: these two coordinates.
_FACE_UV_AXES = ((2, 1), (0, 2), (0, 1))


def _box_faces(centre: np.ndarray, half: np.ndarray, rot: np.ndarray, inwards: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 6 faces of a box (local [-half, half], world = rot local + centre) in surface order
    `axis * 2 + (1 if the normal points along +axis)`: corners (6, 4, 3), normals (6, 3), texture
    axes (6, 2, 3) (the face's two other local axes in world coordinates)."""
    corners, normals, uv_axes = [], [], []
    for axis in range(3):
        b, c = (axis + 1) % 3, (axis + 2) % 3
        for plus_normal in (False, True):
            side = (1.0 if plus_normal else -1.0) * (-1.0 if inwards else 1.0)  # which face carries that normal
            local = np.zeros((4, 3))
            local[:, axis] = side * half[axis]
            local[:, b] = np.array([-1.0, 1.0, 1.0, -1.0]) * half[b]
            local[:, c] = np.array([-1.0, -1.0, 1.0, 1.0]) * half[c]
            corners.append(local @ rot.T + centre)
            normals.append(rot[:, axis] * (1.0 if plus_normal else -1.0))
            uv_axes.append(rot[:, list(_FACE_UV_AXES[axis])].T)
    return np.stack(corners), np.stack(normals), np.stack(uv_axes)


def _scene_surfaces(scene: SceneSpec) -> tuple[np.ndarray, _Surfaces]:
    """The scene as quads, one per surface in surface order, and each surface's plane and texture map.

    Shapes: -> quads (S, 4, 3) float64 world corners (in order round the quad), _Surfaces
    """
    room_centre = ((scene.room_min + scene.room_max) / 2).numpy()
    room_half = ((scene.room_max - scene.room_min) / 2).numpy()
    quads, normals, uv_axes = _box_faces(room_centre, room_half, np.eye(3), inwards=True)
    parts = [(quads, normals, uv_axes, np.zeros((6, 3)))]  # room texture coordinates: world coordinates
    rots = _box_rotations(scene.box_yaw).numpy()
    for centre, half, rot in zip(scene.box_centers.numpy(), scene.box_half.numpy(), rots, strict=True):
        quads, normals, uv_axes = _box_faces(centre, half, rot, inwards=False)
        parts.append((quads, normals, uv_axes, np.tile(centre, (6, 1))))
    for centre, axes, half in zip(scene.board_centers.numpy(), scene.board_axes.numpy(), scene.board_half.numpy(),
                                  strict=True):
        u, v = axes[0] * half[0], axes[1] * half[1]
        quad = np.stack([centre - u - v, centre + u - v, centre + u + v, centre - u + v])
        parts.append((quad[None], axes[2][None], axes[None, :2], centre[None]))
    quads, normals, uv_axes, uv_origin = (np.concatenate(x) for x in zip(*parts, strict=True))
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return quads, _Surfaces(f32(normals), f32(uv_origin), f32(uv_axes))


def _raycasting_scene(quads: np.ndarray):  # -> open3d.t.geometry.RaycastingScene
    """Open3D (Embree) ray casting over the quads, two triangles each: triangle i is on surface i // 2."""
    import open3d as o3d

    vertices = quads.reshape(-1, 3).astype(np.float32)
    first = 4 * np.arange(len(quads), dtype=np.uint32)[:, None]
    triangles = np.stack([first + np.array([0, 1, 2], np.uint32), first + np.array([0, 2, 3], np.uint32)], 1)
    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(o3d.core.Tensor(vertices), o3d.core.Tensor(triangles.reshape(-1, 3)))
    return rc


def _cast(scene_rc, surfaces: _Surfaces, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest surface along each ray o + t d (Open3D) and its ray parameter t.

    Shapes: o (3,), d (P, 3) float32 -> surface (P,) int64, t (P,) float32
    """
    import open3d as o3d

    rays = torch.cat([o.expand_as(d), d], -1).numpy()
    hit = scene_rc.cast_rays(o3d.core.Tensor(rays))
    t = torch.from_numpy(hit["t_hit"].numpy())
    missed = ~torch.isfinite(t)
    if missed.any():
        raise V2DError(f"render_views: {int(missed.sum())} rays from {o.tolist()} hit no surface")
    surface = torch.from_numpy(hit["primitive_ids"].numpy().astype(np.int64)) // 2
    return surface, t


def _value_noise(table: Tensor, xy: Tensor, offset: Tensor) -> Tensor:
    """Smoothly interpolated lattice noise in [0, 1] at xy (P, 2) (lattice units), offset (P, 2) int64."""
    cell = torch.floor(xy)
    f = xy - cell
    f = f * f * (3.0 - 2.0 * f)  # smoothstep: C1 across cell borders, no grid artefacts in the flow
    i = cell.long() + offset
    mask = _NOISE_TABLE_SIZE - 1
    x0, y0 = i[:, 0] & mask, i[:, 1] & mask
    x1, y1 = (x0 + 1) & mask, (y0 + 1) & mask
    flat = table.reshape(-1)
    v00, v01 = flat[x0 * _NOISE_TABLE_SIZE + y0], flat[x0 * _NOISE_TABLE_SIZE + y1]
    v10, v11 = flat[x1 * _NOISE_TABLE_SIZE + y0], flat[x1 * _NOISE_TABLE_SIZE + y1]
    fx, fy = f[:, 0], f[:, 1]
    a = v00 + (v01 - v00) * fy
    b = v10 + (v11 - v10) * fy
    return a + (b - a) * fx


def _fade(cycles_per_pixel: Tensor) -> Tensor:
    """1 up to 4 pixels per cycle, 0 from 1.33 pixels per cycle (beyond Nyquist)."""
    return ((0.75 - cycles_per_pixel) / 0.5).clamp(0.0, 1.0)


def _square_wave(x: Tensor, period: Tensor, footprint: Tensor) -> Tensor:
    """A square wave in [-1, 1] whose edges are blurred over about one pixel footprint."""
    sharp = period / (2 * math.pi * footprint)
    return (torch.sin(2 * math.pi * x / period) * sharp).clamp(-1.0, 1.0) * _fade(footprint / period)


def _rotate(uv: Tensor, angle: Tensor) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c * uv[:, 0] + s * uv[:, 1], c * uv[:, 1] - s * uv[:, 0]], -1)


def _albedo(tex: dict[str, Tensor], table: Tensor, surface: Tensor, uv: Tensor, footprint: Tensor) -> Tensor:
    """Texture colour (P, 3) of surface points; `footprint` (P,) is the pixel size on the surface (m)."""
    g = {key: value[surface] for key, value in tex.items()}
    uv = uv + g["uv_offset"]
    freq, gain = g["noise_frequency"], g["noise_gain"]
    amp = torch.ones_like(freq)
    total, norm = torch.zeros_like(freq), torch.zeros_like(freq)
    for octave in range(NOISE_OCTAVES):
        fade = _fade(freq * footprint)
        n = _value_noise(table, uv * freq[:, None], g["noise_offset"][:, octave])
        total = total + amp * (0.5 + fade * (n - 0.5))
        norm = norm + amp
        amp, freq = amp * gain, freq * 2.0
    noise = (0.5 + _NOISE_STRETCH * (total / norm - 0.5)).clamp(0.0, 1.0)
    cuv = _rotate(uv, g["checker_angle"])
    checker = 0.5 + 0.5 * _square_wave(cuv[:, 0], g["checker_period"], footprint) * _square_wave(
        cuv[:, 1], g["checker_period"], footprint)
    stripes = 0.5 + 0.5 * _square_wave(_rotate(uv, g["stripe_angle"])[:, 0], g["stripe_period"], footprint)
    w = g["weights"]
    pattern = w[:, 0] * noise + w[:, 1] * checker + w[:, 2] * stripes
    colour = g["colour_a"] + (g["colour_b"] - g["colour_a"]) * pattern[:, None]
    accent_freq = g["accent_frequency"]
    accent = g["accent"] * _value_noise(table, uv * accent_freq[:, None] + 0.5, g["noise_offset"][:, 0] + 97)
    return colour + (g["colour_c"] - colour) * accent[:, None]


def render_views(scene: SceneSpec, poses_cw: Tensor, intrinsics: Tensor, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Render the scene at arbitrary camera poses.

    Every camera centre must be inside the room (then every pixel hits a surface); a camera inside
    a box sees the box's faces from inside. Rays are cast in float32 (Open3D): depths are exact to
    ~1e-6 relative. Open3D is imported here (slow the first time).

    Shapes:
        poses_cw: (N, 7) world->camera [tx, ty, tz, qx, qy, qz, qw]; intrinsics: (4,) fx, fy, cx, cy
        -> images (N, H, W, 3) uint8 RGB numpy, depths (N, H, W) float32 numpy (camera z)
    """
    _check_size(height, width)
    poses = _as_float64("poses_cw", poses_cw, "(N, 7)")
    if poses.dim() != 2 or poses.shape[1] != 7 or poses.shape[0] < 1:
        raise ShapeError(f"poses_cw: expected (N, 7) with N >= 1, got {tuple(poses.shape)}")
    intr = _as_float64("intrinsics", intrinsics, "(4,)")
    if intr.shape != (4,):
        raise ShapeError(f"intrinsics: expected (4,) fx, fy, cx, cy, got {tuple(intr.shape)}")
    if not (torch.isfinite(intr).all() and intr[0] > 0 and intr[1] > 0):
        raise InputError(f"intrinsics: expected finite values with fx, fy > 0, got {intr.tolist()}")
    if not torch.isfinite(poses).all():
        raise InputError("poses_cw: expected finite values, got NaN or Inf")
    qnorm = poses[:, 3:].norm(dim=-1)
    if ((qnorm - 1).abs() > 1e-3).any():
        bad = int(((qnorm - 1).abs() > 1e-3).nonzero()[0])
        raise InputError(f"poses_cw: expected unit quaternions, got norm {qnorm[bad].item():.4g} at index {bad}")
    R_cw = quat_to_matrix(poses[:, 3:] / qnorm[:, None])
    centres = -(R_cw.transpose(-1, -2) @ poses[:, :3, None])[..., 0]
    outside = ((centres <= scene.room_min) | (centres >= scene.room_max)).any(-1)
    if outside.any():
        bad = int(outside.nonzero()[0])
        raise InputError(f"poses_cw: camera {bad} at {centres[bad].tolist()} is outside the room "
                         f"{scene.room_min.tolist()} - {scene.room_max.tolist()}")

    f32 = torch.float32
    quads, surfaces = _scene_surfaces(scene)
    scene_rc = _raycasting_scene(quads)
    light = scene.light_dir.to(f32)
    table = scene.noise_table.to(f32)
    tex = {}
    for name, value in vars(scene.textures).items():
        tex[name] = value if name == "noise_offset" else value.to(f32)
    rays_c = pixel_rays(intr, height, width).reshape(-1, 3)  # float64, row-major
    ray_len = rays_c.norm(dim=-1).to(f32)
    focal = math.sqrt(intr[0].item() * intr[1].item())

    images = np.empty((poses.shape[0], height, width, 3), dtype=np.uint8)
    depths = np.empty((poses.shape[0], height, width), dtype=np.float32)
    with torch.inference_mode():
        for n in range(poses.shape[0]):
            dirs = (rays_c @ R_cw[n]).to(f32)  # world directions R_wc r (row form: r^T R_cw)
            o = centres[n].to(f32)
            img, dep = images[n].reshape(-1, 3), depths[n].reshape(-1)
            for s in range(0, dirs.shape[0], _CHUNK_PIXELS):
                d = dirs[s:s + _CHUNK_PIXELS]
                surface, t = _cast(scene_rc, surfaces, o, d)
                normal = surfaces.normal[surface]
                normal = torch.where(((normal * d).sum(-1) > 0)[:, None], -normal, normal)  # the side seen
                p = o + t[:, None] * d
                uv = (surfaces.uv_axes[surface] @ (p - surfaces.uv_origin[surface])[..., None])[..., 0]
                # Pixel footprint on the surface: ray length over focal, stretched by the incidence
                # (geometric mean of the two directions' stretch, so grazing surfaces are not over-blurred).
                length = t * ray_len[s:s + _CHUNK_PIXELS]
                cos = (normal * d).sum(-1).abs() / ray_len[s:s + _CHUNK_PIXELS]
                footprint = length / (focal * cos.clamp(min=0.05).sqrt())
                albedo = _albedo(tex, table, surface, uv, footprint)
                shade = scene.ambient + scene.diffuse * (normal @ light).clamp(min=0.0)
                rgb = (albedo * shade[:, None]).clamp(0.0, 1.0) * 255.0
                img[s:s + _CHUNK_PIXELS] = rgb.round().to(torch.uint8).numpy()
                dep[s:s + _CHUNK_PIXELS] = t.numpy()
    return images, depths


def default_intrinsics(height: int, width: int) -> Tensor:
    """fx = fy = 0.8 width (about 64 deg horizontal field of view), principal point at the image centre.

    Shapes:
        -> (4,) float64 fx, fy, cx, cy
    """
    _check_size(height, width)
    return torch.tensor([0.8 * width, 0.8 * width, (width - 1) / 2, (height - 1) / 2], dtype=torch.float64)


def render_sequence(seed: int, num_frames: int, height: int = 240, width: int = 320, *, speed: float = 1.0,
                    fps: float = 30.0, intrinsics: Tensor | None = None) -> SyntheticSequence:
    """Scene `seed` seen along its trajectory: `make_scene`, `make_trajectory`, `render_views`.

    `intrinsics` defaults to `default_intrinsics(height, width)`.

    Shapes:
        intrinsics: (4,) -> SyntheticSequence with N = num_frames (see its Shapes)
    """
    num_frames = _check_num_frames(num_frames)
    _check_size(height, width)
    intr = default_intrinsics(height, width) if intrinsics is None else _as_float64("intrinsics", intrinsics, "(4,)")
    scene = make_scene(seed)
    poses = make_trajectory(scene, seed, num_frames, fps=fps, speed=speed)
    images, depths = render_views(scene, poses, intr, height, width)
    return SyntheticSequence(images=images, depths=depths, poses_cw=poses, intrinsics=intr,
                             timestamps=np.arange(num_frames, dtype=np.float64) / fps, scene=scene)

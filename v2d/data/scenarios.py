"""Hard hand-held cases rendered from the synthetic scenes, with exact ground truth.

`render_scenario(name, num_frames, seed)` renders scene `make_scene(seed)` along a trajectory or
with an image degradation that makes tracking hard, at 30 fps:

- `fast`: a phone waved round the room: `make_trajectory` run faster (its speed factor is
  calibrated so the mean step is 8 cm) plus a 1-2 Hz rotational shake about the camera centre
  (calibrated by bisection so the mean step is 4 deg).
- `rotation`: the camera centre fixed on the scene's orbit ring, facing the room axis (where the
  central boxes stand, aimed as `make_trajectory` aims), sweeping +-25-40 deg in yaw with +-3-6 deg
  tilt and +-1-3 deg roll sway; time is scaled so the mean step is 1.2-1.8 deg (drawn).
- `blur`: the normal trajectory at speed 2; each image is the mean of sub-frame renders from its
  pose to halfway to the next frame's pose (constant-twist interpolation on SE3, box shutter open
  half the frame interval). The number of sub-frames follows the motion (one per 2 pixels of
  blur, 2-8). Pose and depth are those of the shutter opening (the frame's own pose).
- `exposure`: the normal trajectory; image = 255 clip(gain (render / 255) ** gamma) with the gain
  drifting smoothly between 0.5 and 1.6 with 2-3 abrupt auto-exposure jumps and gamma drifting in
  0.9-1.1 (`exposure_curve`).
- `blocked`: the normal trajectory; in the middle 20 frames a hand-like blob 0.1-0.2 m in front of
  the lens slides in (4 frames), covers the view (12 frames; at most a corner shows) and slides out
  (4 frames) while the camera keeps moving. It moves with the camera, so it is not part of the
  static world. Depth there is the occluder's: depth ground truth stays that of what is seen.
- `loop`: out along the orbit ring and back at hand-held speed (0.5-0.8 m/s mean) with sway that
  differs on the way back; the last pose is 3-8 cm and 3-8 deg from the first (drawn: a revisit,
  not a copy). A full orbit would take 9-30 s at that speed, more than validation sequences last.
- `jump`: the normal trajectory, but from the middle frame on it is turned about the room axis by
  60 deg in the walking direction: between two consecutive frames the camera moves round the ring
  and its view turns by 60 deg (a dropped stretch of video, a wide-baseline pair), still facing the
  central boxes, so the two views share part of the scene (`Scenario.jump` is that pair).

Cases are fitted to the requested frames (time scales calibrated on them, at least 30; the gain
curve, occluder stretch and loop span them), so a shorter sequence is not a prefix of a longer one
(except `blur`). Measured over 120 frames, seeds 0-9 (`step_motion`; mean per frame, range over
seeds, largest step): fast 8.00 cm, 4.00 deg, largest 12.0 cm, 8.8 deg; rotation 0 cm, 1.43 deg
(1.23-1.65), largest 3.1 deg; blur 4.40 cm (3.55-5.92), 1.61 deg (1.15-2.45), largest 7.1 cm, 3.0
deg; exposure and blocked (normal trajectory) 2.20 cm (1.55-3.08), 0.80 deg (0.61-1.11); loop
2.22 cm (1.63-2.76), 0.78 deg (0.37-1.15), largest 4.4 cm, 1.8 deg, going 1.0-1.5 m away. Rendering
120 frames at 240x320 on one core takes 4-5 s CPU per case, `blur` about 4 times that (18 s for
seed 0, the fastest of seeds 0-9).

Randomness: `numpy.random.default_rng([seed, 100 + index of the case])`, independent of the
scene's and the normal trajectory's streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from v2d.data.synthetic import (
    SceneSpec,
    SyntheticSequence,
    default_intrinsics,
    make_scene,
    make_trajectory,
    render_views,
    scene_clearance,
)
from v2d.errors import InputError, ShapeError, V2DError
from v2d.geometry.camera import pixel_rays, project
from v2d.geometry.lie import quat_conj, quat_mul, se3_act, se3_exp, se3_inv, se3_log, se3_mul, so3_exp, so3_log

__all__ = ["SCENARIOS", "Scenario", "exposure_curve", "render_scenario", "step_motion"]

SCENARIOS: tuple[str, ...] = ("fast", "rotation", "blur", "exposure", "blocked", "loop", "jump")

FPS = 30.0
MIN_CALIBRATION_FRAMES = 30  # time scales are calibrated on the sequence itself, at least this long
FAST_STEP_TRANSLATION = 0.08  # metres per frame (mean)
FAST_STEP_ROTATION_DEG = 4.0  # degrees per frame (mean)
FAST_SHAKE_HZ = (1.0, 2.0)
ROTATION_SWEEP_DEG = (25.0, 40.0)
ROTATION_STEP_DEG = (1.2, 1.8)
BLUR_SPEED = 2.0
SHUTTER_FRACTION = 0.5  # of the frame interval
SUBFRAME_SPACING_PX = 2.0  # blur length (90th percentile over the image) per sub-frame
SUBFRAMES_RANGE = (2, 8)
GAIN_RANGE = (0.5, 1.6)
GAMMA_RANGE = (0.9, 1.1)
BLOCKED_FRAMES, SLIDE_FRAMES = 20, 4
OCCLUDER_DEPTH_RANGE = (0.1, 0.2)  # metres
LOOP_SPEED_RANGE = (0.5, 0.8)  # m/s, mean along the ring
LOOP_END_TRANSLATION = (0.03, 0.08)  # metres from the first pose
LOOP_END_ROTATION_DEG = (3.0, 8.0)
LOOP_MAX_ARC_DEG = 150.0
JUMP_DEG = 60.0
_RENDER_CHUNK = 256  # poses per render_views call (bounds memory; each call has a set-up cost)
_STREAM = 100


@dataclass(frozen=True)
class Scenario:
    """A rendered hard case: the sequence with exact ground truth and what makes it hard.

    `blocked` is [start, stop) of the frames whose view is blocked (else None); `loop` is an
    (early, late) frame pair that sees the same place (else None); `jump` the consecutive pair
    between which the view turns by `JUMP_DEG` (else None).

    Shapes: see SyntheticSequence (N = num_frames).
    """

    name: str
    sequence: SyntheticSequence
    blocked: tuple[int, int] | None
    loop: tuple[int, int] | None
    jump: tuple[int, int] | None = None


def step_motion(poses_cw: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Camera-centre distance (metres) and rotation angle (degrees) between consecutive frames.

    Shapes:
        poses_cw: (N, 7) -> (N-1,), (N-1,) float64 numpy
    """
    centres = se3_inv(poses_cw)[:, :3]
    q = poses_cw[:, 3:]
    angle = so3_log(quat_mul(q[1:], quat_conj(q[:-1]))).norm(dim=-1)
    return (centres[1:] - centres[:-1]).norm(dim=-1).numpy(), np.degrees(angle.numpy())


def _sines(rng: np.random.Generator, amplitude: float, freq: tuple[float, float], terms: int = 2) -> np.ndarray:
    """(terms, 3) rows amplitude, frequency, phase; amplitudes sum to `amplitude`."""
    amp = rng.dirichlet(np.ones(terms)) * amplitude
    return np.stack([amp, rng.uniform(*freq, terms), rng.uniform(0, 2 * math.pi, terms)], axis=1)


def _eval(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (s[:, :1] * np.sin(2 * math.pi * s[:, 1:2] * t[None] + s[:, 2:3])).sum(0)


def _poses(centres: np.ndarray, yaw: np.ndarray, tilt: np.ndarray, roll: np.ndarray) -> Tensor:
    """World->camera poses of cameras at `centres` with R_wc = R_y(yaw) R_x(-tilt) R_z(roll), the
    convention of make_trajectory (tilt > 0 looks down)."""
    def axis(k: int, a: np.ndarray) -> Tensor:
        phi = torch.zeros(len(a), 3, dtype=torch.float64)
        phi[:, k] = torch.from_numpy(np.asarray(a, dtype=np.float64))
        return so3_exp(phi)

    q_wc = quat_mul(quat_mul(axis(1, yaw), axis(0, -tilt)), axis(2, roll))
    return se3_inv(torch.cat([torch.from_numpy(np.asarray(centres, dtype=np.float64)), q_wc], -1))


def _calibrate(mean_step: Callable[[float], float], target: float) -> float:
    """Time scale s with mean_step(s) = target (mean steps grow about linearly with s)."""
    s = 1.0
    for _ in range(5):
        s *= target / mean_step(s)
    return s


def _tilt0(scene: SceneSpec, look_height: float) -> float:
    """Downward tilt from the ring to `look_height` above the floor on the room axis (5-30 deg)."""
    return min(max(math.atan2(-scene.camera_y - look_height, scene.orbit_radius), math.radians(5)), math.radians(30))


def _fast(scene: SceneSpec, seed: int, n: int, rng: np.random.Generator) -> Tensor:
    horizon = max(n, MIN_CALIBRATION_FRAMES)
    speed = _calibrate(lambda s: step_motion(make_trajectory(scene, seed, horizon, speed=s))[0].mean(),
                       FAST_STEP_TRANSLATION)
    t = np.arange(horizon) / FPS
    weights = (1.0, 0.7, 0.4)  # yaw, pitch, roll shares of the shake
    shake = [_eval(_sines(rng, w, FAST_SHAKE_HZ), t) for w in weights]

    def build(amplitude: float, frames: int) -> Tensor:
        poses = make_trajectory(scene, seed, frames, speed=speed)
        wobble = _poses(np.zeros((frames, 3)), *(amplitude * s[:frames] for s in shake))  # camera-frame rotation
        return se3_mul(wobble, poses)  # centres unchanged: R_cw' = R_shake^T R_cw

    def mean_rotation(amplitude: float) -> float:
        return float(step_motion(build(amplitude, horizon))[1].mean())

    lo, hi = 0.0, math.radians(30.0)
    if mean_rotation(lo) < FAST_STEP_ROTATION_DEG:
        for _ in range(30):  # bisection: the mean rotation grows with the shake amplitude
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_rotation(mid) < FAST_STEP_ROTATION_DEG else (lo, mid)
    return build(lo, n)


def _rotation(scene: SceneSpec, n: int, rng: np.random.Generator) -> Tensor:
    a0, R = rng.uniform(0, 2 * math.pi), scene.orbit_radius
    centre = np.array([R * math.cos(a0), scene.camera_y, R * math.sin(a0)])
    tilt0 = _tilt0(scene, rng.uniform(0.3, 0.9))
    yaw = _sines(rng, math.radians(rng.uniform(*ROTATION_SWEEP_DEG)), (0.15, 0.3))
    tilt = _sines(rng, math.radians(rng.uniform(3, 6)), (0.2, 0.6))
    roll = _sines(rng, math.radians(rng.uniform(1, 3)), (0.3, 0.8))
    target = rng.uniform(*ROTATION_STEP_DEG)

    def build(s: float, frames: int) -> Tensor:
        t = s * np.arange(frames) / FPS
        return _poses(np.tile(centre, (frames, 1)), -math.pi / 2 - a0 + _eval(yaw, t), tilt0 + _eval(tilt, t),
                      _eval(roll, t))

    s = _calibrate(lambda s: step_motion(build(s, max(n, MIN_CALIBRATION_FRAMES)))[1].mean(), target)
    return build(s, n)


def _loop(scene: SceneSpec, n: int, rng: np.random.Generator) -> Tensor:
    if n < 2:
        raise ShapeError(f"num_frames: the loop case needs >= 2 frames, got {n}")
    R, duration = scene.orbit_radius, (n - 1) / FPS
    tau = np.arange(n) / (n - 1)
    a0, direction = rng.uniform(0, 2 * math.pi), rng.choice([-1.0, 1.0])
    arc = min(rng.uniform(*LOOP_SPEED_RANGE) * duration / (2 * R), math.radians(LOOP_MAX_ARC_DEG))
    tilt0 = _tilt0(scene, rng.uniform(0.3, 0.9))
    # Sway with amplitudes small enough that sway, its end correction and the end offset stay
    # inside the ring's band (+-0.2 m radially, +-0.15 m vertically), which the layout keeps clear.
    sway = [_sines(rng, a, (0.1, 0.3)) for a in (rng.uniform(0.03, 0.06), rng.uniform(0.02, 0.035),
                                                 math.radians(rng.uniform(3, 10)), math.radians(rng.uniform(2, 6)),
                                                 math.radians(rng.uniform(1, 3)))]
    d_t, d_r = rng.normal(size=3), rng.normal(size=3)
    end_t = d_t / np.linalg.norm(d_t) * rng.uniform(*LOOP_END_TRANSLATION)  # radial, vertical, along the ring
    end_r = d_r / np.linalg.norm(d_r) * math.radians(rng.uniform(*LOOP_END_ROTATION_DEG))  # yaw, tilt, roll
    end_a = end_t[2] / R
    ends = (end_t[0], end_t[1], end_r[0] + end_a, end_r[1], end_r[2])  # yaw also turns with the ring angle
    ramp = tau * tau * (3 - 2 * tau)
    t = tau * duration
    radial, vertical, yaw, tilt, roll = (
        _eval(s, t) - _eval(s, t[:1]) * (1 - ramp) - _eval(s, t[-1:]) * ramp + e * ramp
        for s, e in zip(sway, ends, strict=True))
    a = a0 + direction * arc * (1 - np.cos(2 * math.pi * tau)) / 2 + end_a * ramp
    centres = np.stack([(R + radial) * np.cos(a), scene.camera_y + vertical, (R + radial) * np.sin(a)], 1)
    if scene_clearance(scene, torch.from_numpy(centres)).min().item() < 0.4:
        raise V2DError(f"loop case: the path of scene {scene.seed} comes nearer than 0.4 m to a surface")
    return _poses(centres, -math.pi / 2 - a + yaw, tilt0 + tilt, roll)


def _jump(scene: SceneSpec, seed: int, n: int) -> Tensor:
    """The normal trajectory with frames n // 2 and later turned about the room axis (the world's y
    axis) by JUMP_DEG, in the direction the camera walks there."""
    poses = make_trajectory(scene, seed, n)
    k = n // 2
    centres = se3_inv(poses)[:, :3].numpy()
    angle = np.unwrap(np.arctan2(centres[:, 2], centres[:, 0]))
    walk = 1.0 if k == 0 or angle[k] >= angle[k - 1] else -1.0
    # R_y(theta) turns the ring angle atan2(z, x) by -theta
    theta = -walk * math.radians(JUMP_DEG)
    turn = torch.tensor([0.0, 0.0, 0.0, 0.0, math.sin(theta / 2), 0.0, math.cos(theta / 2)], dtype=torch.float64)
    out = poses.clone()
    out[k:] = se3_mul(poses[k:], se3_inv(turn)[None])  # camera->world T_wc becomes R_y(theta) T_wc
    if scene_clearance(scene, se3_inv(out)[:, :3]).min().item() < 0.3:
        raise V2DError(f"jump case: the turned path of scene {scene.seed} comes nearer than 0.3 m to a surface")
    return out


def _render(scene: SceneSpec, poses: Tensor, intr: Tensor, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [render_views(scene, poses[i:i + _RENDER_CHUNK], intr, h, w) for i in range(0, len(poses), _RENDER_CHUNK)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _blur(scene: SceneSpec, seed: int, n: int, intr: Tensor, h: int, w: int) -> tuple[Tensor, np.ndarray, np.ndarray]:
    poses = make_trajectory(scene, seed, n + 1, speed=BLUR_SPEED)
    sharp, depths = _render(scene, poses[:n], intr, h, w)
    wc = se3_inv(poses)
    xi = se3_log(se3_mul(se3_inv(wc[:-1]), wc[1:]))  # constant body twist from frame k to k + 1
    # Blur length: how far pixels move (with the frame's depth) while the shutter is open.
    stride = max(1, min(h, w) // 24)
    rays = pixel_rays(intr, h, w)[::stride, ::stride]
    points = rays * torch.from_numpy(depths[:, ::stride, ::stride]).double()[..., None]  # (N, h', w', 3)
    close = se3_exp(-SHUTTER_FRACTION * xi)[:, None, None]  # camera k -> camera at shutter close
    moved = project(se3_act(close, points), intr) - project(points, intr)
    length = torch.quantile(moved.norm(dim=-1).flatten(1), 0.9, dim=1).numpy()
    counts = np.clip(np.ceil(length / SUBFRAME_SPACING_PX).astype(int) + 1, *SUBFRAMES_RANGE)
    frame = np.repeat(np.arange(n), counts - 1)
    frac = np.concatenate([np.arange(1, c) / (c - 1) for c in counts]) * SHUTTER_FRACTION
    sub = se3_inv(se3_mul(wc[frame], se3_exp(torch.from_numpy(frac)[:, None] * xi[frame])))
    acc = sharp.astype(np.float32)
    for i in range(0, len(sub), _RENDER_CHUNK):
        images, _ = render_views(scene, sub[i:i + _RENDER_CHUNK], intr, h, w)
        for k, image in zip(frame[i:i + _RENDER_CHUNK], images, strict=True):
            acc[k] += image
    images = np.round(acc / counts[:, None, None, None]).astype(np.uint8)
    return poses[:n], images, depths


def exposure_curve(num_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame gain and gamma of the `exposure` case (image = 255 clip(gain (I / 255) ** gamma)).

    The log gain is a smooth drift (0.5-1.5 cycles per sequence) plus 2-3 steps (the auto-exposure
    jumps, at 15-85% of the sequence), mapped onto GAIN_RANGE: it spans 0.5-1.6 exactly. Gamma
    drifts smoothly in GAMMA_RANGE.

    Shapes:
        -> gain (N,), gamma (N,) float64 numpy
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ShapeError(f"num_frames: expected an int >= 1, got {num_frames!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed: expected a non-negative int, got {seed!r}")
    rng = np.random.default_rng([seed, _STREAM + SCENARIOS.index("exposure")])
    tau = np.arange(num_frames) / max(num_frames - 1, 1)
    raw = _eval(_sines(rng, 1.0, (0.5, 1.5)), tau)
    for _ in range(int(rng.integers(2, 4))):
        raw = raw + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 0.9) * (tau >= rng.uniform(0.15, 0.85))
    lo, hi = math.log(GAIN_RANGE[0]), math.log(GAIN_RANGE[1])
    span = raw.max() - raw.min()
    gain = np.exp(lo + (raw - raw.min()) / span * (hi - lo)) if span > 0 else np.ones(num_frames)
    mid, half = sum(GAMMA_RANGE) / 2, (GAMMA_RANGE[1] - GAMMA_RANGE[0]) / 2
    gamma = mid + half * np.sin(2 * math.pi * rng.uniform(0.5, 1.5) * tau + rng.uniform(0, 2 * math.pi))
    return gain, gamma


def _occlude(images: np.ndarray, depths: np.ndarray, start: int, rng: np.random.Generator) -> None:
    """Composite the hand-like occluder into frames [start, start + BLOCKED_FRAMES) in place."""
    _, h, w, _ = images.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    x, y = (u - (w - 1) / 2) / w, (v - (h - 1) / 2) / w  # image coordinates in widths
    half_diag = math.hypot(0.5, 0.5 * h / w)
    wobble = np.stack([rng.uniform(0.02, 0.05, 3), np.arange(2, 5), rng.uniform(0, 2 * math.pi, 3)], 1)
    radius = half_diag * rng.uniform(1.1, 1.25) / (1 - wobble[:, 0].sum())  # covers the view when centred
    colour = np.array([(0.87, 0.68, 0.57), (0.72, 0.50, 0.38), (0.42, 0.29, 0.22),
                       (0.13, 0.12, 0.14)][int(rng.integers(4))]) * rng.uniform(0.9, 1.1, 3)
    z0 = rng.uniform(0.1, 0.13)
    coarse, fine = torch.from_numpy(rng.normal(size=(1, 1, 6, 6))), torch.from_numpy(rng.normal(size=(1, 1, 48, 48)))
    light = rng.normal(size=2) * 0.15
    d_in, d_out = (np.array([math.cos(a), math.sin(a)]) for a in rng.uniform(0, 2 * math.pi, 2))
    hold_angle = rng.uniform(0, 2 * math.pi)  # held a little off-centre: a corner of the view may show
    hold = np.array([math.cos(hold_angle), math.sin(hold_angle)]) * rng.uniform(0.0, 0.25) * half_diag

    def entry(d: np.ndarray) -> float:  # centre offset at which the blob just touches the view
        return radius * (1 + wobble[:, 0].sum()) + 0.5 * abs(d[0]) + 0.5 * h / w * abs(d[1])

    for j in range(BLOCKED_FRAMES):
        p_in, p_out = (j + 1) / (SLIDE_FRAMES + 1), (BLOCKED_FRAMES - j) / (SLIDE_FRAMES + 1)
        d = d_in if j < BLOCKED_FRAMES / 2 else d_out
        p = min(p_in, p_out, 1.0)
        p = p * p * (3 - 2 * p)
        shake = 0.01 * half_diag * np.array([math.sin(1.3 * j), math.cos(0.9 * j)])
        ox, oy = d * entry(d) * (1 - p) + (hold + shake) * p
        dx, dy = x - ox, y - oy
        rho, theta = torch.hypot(dx, dy), torch.atan2(dy, dx)
        edge = radius * (1 + sum(a * torch.cos(k * theta + ph) for a, k, ph in wobble))
        alpha = (0.5 - (rho - edge) * w).clamp(0.0, 1.0)  # one-pixel antialiased rim
        r2 = (rho / edge).clamp(max=1.0) ** 2
        grid = torch.stack([dx, dy], -1)[None] / radius
        texture = sum(a * F.grid_sample(g, grid, mode=m, padding_mode="reflection", align_corners=True)[0, 0]
                      for a, g, m in ((0.1, coarse, "bicubic"), (0.05, fine, "bilinear")))
        shade = (0.55 + 0.4 * (1 - r2).sqrt() + (light[0] * dx + light[1] * dy) / radius) * (1 + texture)
        rgb = (torch.from_numpy(colour)[None, None] * shade[..., None]).clamp(0, 1) * 255
        k = start + j
        blend = alpha[..., None] * rgb + (1 - alpha[..., None]) * torch.from_numpy(images[k]).double()
        images[k] = blend.round().to(torch.uint8).numpy()
        depth = (z0 + (OCCLUDER_DEPTH_RANGE[1] - 0.02 - z0) * r2).float().numpy()  # a dome, deepest at the rim
        depths[k] = np.where(alpha.numpy() >= 0.5, depth, depths[k])


def render_scenario(name: str, num_frames: int, seed: int = 0, height: int = 240, width: int = 320) -> Scenario:
    """Render hard case `name` (one of SCENARIOS) of scene `seed`: deterministic from the seed.

    Poses, depths and intrinsics (`default_intrinsics`) are exact; see the module docstring for
    what each case does. `blocked` needs >= 22 frames, `loop` and `jump` >= 2.

    Shapes:
        -> Scenario whose sequence has images (N, H, W, 3) uint8, depths (N, H, W) float32,
           poses_cw (N, 7), intrinsics (4,), timestamps (N,) (frame k at k / 30 s)
    """
    if name not in SCENARIOS:
        raise InputError(f"scenario: expected one of {', '.join(SCENARIOS)}, got {name!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ShapeError(f"num_frames: expected an int >= 1, got {num_frames!r}")
    if name == "jump" and num_frames < 2:
        raise ShapeError(f"num_frames: the jump case needs >= 2 frames, got {num_frames}")
    if name == "blocked" and num_frames < BLOCKED_FRAMES + 2:
        raise ShapeError(f"num_frames: the blocked case needs >= {BLOCKED_FRAMES + 2} frames, got {num_frames}")
    intr = default_intrinsics(height, width)
    scene = make_scene(seed)
    rng = np.random.default_rng([seed, _STREAM + SCENARIOS.index(name)])
    blocked = loop = jump = None
    if name == "blur":
        poses, images, depths = _blur(scene, seed, num_frames, intr, height, width)
    else:
        if name == "fast":
            poses = _fast(scene, seed, num_frames, rng)
        elif name == "rotation":
            poses = _rotation(scene, num_frames, rng)
        elif name == "loop":
            poses, loop = _loop(scene, num_frames, rng), (0, num_frames - 1)
        elif name == "jump":
            poses, jump = _jump(scene, seed, num_frames), (num_frames // 2 - 1, num_frames // 2)
        else:
            poses = make_trajectory(scene, seed, num_frames)
        images, depths = _render(scene, poses, intr, height, width)
    if name == "exposure":
        for k, (g, e) in enumerate(zip(*exposure_curve(num_frames, seed), strict=True)):
            images[k] = np.round(np.clip(g * (images[k] / 255.0) ** e, 0.0, 1.0) * 255.0)
    elif name == "blocked":
        start = (num_frames - BLOCKED_FRAMES) // 2
        _occlude(images, depths, start, rng)
        blocked = (start, start + BLOCKED_FRAMES)
    sequence = SyntheticSequence(images=images, depths=depths, poses_cw=poses, intrinsics=intr,
                                 timestamps=np.arange(num_frames, dtype=np.float64) / FPS, scene=scene)
    return Scenario(name=name, sequence=sequence, blocked=blocked, loop=loop, jump=jump)

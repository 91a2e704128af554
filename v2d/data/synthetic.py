"""Procedural synthetic indoor scenes with exact depth, poses and intrinsics.

A room (axis-aligned box) with random boxes standing on the floor, every surface textured by a
sum of random sinusoids and a checker in its own 2D surface coordinates (so a surface looks the
same from every view), lit by an ambient term plus one directional light. Rays are cast per
pixel (vectorised torch); depth is the camera z of the nearest hit. World frame: y points down
(OpenCV-like), the floor is at y = +floor_y. Deterministic from the seed.

This first version serves tests and the demo; the richer generator for training (slanted planes,
varied lighting and texture frequency, speed target) is part of the training issue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from v2d.errors import ShapeError
from v2d.geometry.lie import matrix_to_quat

__all__ = ["SceneSpec", "SyntheticSequence", "make_scene", "make_trajectory", "render_views", "render_sequence"]


@dataclass(frozen=True)
class SceneSpec:
    """Boxes as (K, 2, 3) min/max corners (index 0 is the room, seen from inside); per-box texture
    parameters: colours (K, 3), frequencies (K, 4) and phases (K, 4); light direction (3,)."""

    boxes: torch.Tensor
    colours: torch.Tensor
    freqs: torch.Tensor
    phases: torch.Tensor
    light: torch.Tensor


@dataclass(frozen=True)
class SyntheticSequence:
    """A rendered sequence.

    Shapes: images (N, H, W, 3) uint8 RGB numpy; depths (N, H, W) float32 numpy (camera z);
    poses_cw (N, 7) float64 torch (world->camera, [tx, ty, tz, qx, qy, qz, qw]);
    intrinsics (4,) float64 torch; timestamps (N,) float64 numpy (seconds at 30 fps).
    """

    images: np.ndarray
    depths: np.ndarray
    poses_cw: torch.Tensor
    intrinsics: torch.Tensor
    timestamps: np.ndarray
    scene: SceneSpec


def make_scene(seed: int) -> SceneSpec:
    """A 6 x 3 x 6 room with 4-6 boxes kept at least 1.6 from the room's vertical axis."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    boxes = [torch.tensor([[-3.0, -1.5, -3.0], [3.0, 1.5, 3.0]], dtype=torch.float64)]
    for _ in range(4 + int(rnd(1).item() * 3)):
        angle = rnd(1).item() * 2 * math.pi
        r = 1.6 + rnd(1).item() * 0.6
        cx, cz = r * math.cos(angle), r * math.sin(angle)
        half = 0.2 + 0.3 * rnd(3)
        height = 0.4 + 1.4 * rnd(1).item()
        lo = torch.tensor([cx - half[0], 1.5 - height, cz - half[2]], dtype=torch.float64)
        hi = torch.tensor([cx + half[0], 1.5, cz + half[2]], dtype=torch.float64)
        boxes.append(torch.stack([lo, hi]))
    K = len(boxes)
    light = torch.tensor([0.4, 1.0, 0.3], dtype=torch.float64) + 0.3 * (rnd(3) - 0.5)
    return SceneSpec(
        boxes=torch.stack(boxes),
        colours=0.3 + 0.7 * rnd(K, 3),
        freqs=1.5 + 6.0 * rnd(K, 4),
        phases=2 * math.pi * rnd(K, 4),
        light=light / light.norm(),
    )


def _look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera->world rotation with +z towards target and +y roughly down (world +y)."""
    z = target - center
    z = z / np.linalg.norm(z)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def make_trajectory(seed: int, num_frames: int, speed: float = 1.0) -> torch.Tensor:
    """Smooth hand-held-like motion near the room centre looking outwards at the boxes.

    About 1-2 cm and under 1 degree per frame at speed 1 (30 fps). Returns poses_cw (N, 7) float64.
    """
    rng = np.random.default_rng(seed + 7919)
    amp, freq, phase = rng.uniform(0.2, 0.5, 3), rng.uniform(0.02, 0.05, 3) * speed, rng.uniform(0, 2 * np.pi, 3)
    yaw0, yaw_rate = rng.uniform(0, 2 * np.pi), rng.choice([-1, 1]) * rng.uniform(0.006, 0.012) * speed
    poses = []
    for k in range(num_frames):
        c = amp * np.sin(freq * k + phase) * np.array([1.0, 0.3, 1.0])
        yaw = yaw0 + yaw_rate * k
        target = c + np.array([math.cos(yaw), 0.25 + 0.1 * math.sin(0.05 * k), math.sin(yaw)])
        R_wc = _look_at(c, target)
        R_cw = R_wc.T
        t_cw = -R_cw @ c
        q = matrix_to_quat(torch.from_numpy(R_cw))
        poses.append(torch.cat([torch.from_numpy(t_cw), q]))
    return torch.stack(poses)


def _texture(scene: SceneSpec, idx: torch.Tensor, p: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Colour (P, 3) of hit points p (P, 3) on box idx (P,) whose face normal is along `axis` (P,)."""
    # Surface coordinates: the two coordinates other than the normal axis.
    a = torch.where(axis == 0, p[:, 1], p[:, 0])
    b = torch.where(axis == 2, p[:, 1], p[:, 2])
    f, ph = scene.freqs[idx], scene.phases[idx]
    s = (torch.sin(f[:, 0] * a + ph[:, 0]) * torch.sin(f[:, 1] * b + ph[:, 1])
         + 0.6 * torch.sin(f[:, 2] * 2.3 * (a + 0.7 * b) + ph[:, 2])
         + 0.5 * torch.sin(f[:, 3] * 3.1 * (b - 0.4 * a) + ph[:, 3]))
    checker = ((torch.floor(a * 2.0) + torch.floor(b * 2.0)) % 2) * 0.3
    v = (0.5 + 0.2 * s + checker).clamp(0.05, 1.0)
    return scene.colours[idx] * v[:, None]


def render_views(scene: SceneSpec, poses_cw: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Render images (N, H, W, 3) uint8 and depths (N, H, W) float32 at the given poses."""
    if height < 1 or width < 1:
        raise ShapeError(f"image size: expected positive height and width, got {height}x{width}")
    from v2d.geometry.lie import quat_to_matrix

    poses_cw = poses_cw.to(torch.float64).reshape(-1, 7)
    fx, fy, cx, cy = intrinsics.to(torch.float64).tolist()
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    rays_c = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u)], -1).reshape(-1, 3)
    images, depths = [], []
    lo, hi = scene.boxes[:, 0], scene.boxes[:, 1]  # (K, 3)
    for T in poses_cw:
        R_cw = quat_to_matrix(T[3:])
        center = -R_cw.T @ T[:3]
        d = rays_c @ R_cw  # world directions (rows: R_wc @ ray = ray @ R_cw)
        d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t0 = (lo[None] - center) / d[:, None]  # (P, K, 3)
        t1 = (hi[None] - center) / d[:, None]
        tnear = torch.minimum(t0, t1)
        tfar = torch.maximum(t0, t1)
        enter, enter_axis = tnear.max(-1)
        leave, leave_axis = tfar.min(-1)
        # Room (box 0) is hit from inside where the ray leaves it; other boxes where the ray enters.
        is_room = torch.arange(len(lo))[None] == 0
        box_hit = torch.where((enter < leave) & (enter > 1e-6), enter, torch.full_like(enter, math.inf))
        t_hit = torch.where(is_room, leave, box_hit)
        axis_hit = torch.where(is_room, leave_axis, enter_axis)
        t_min, idx = t_hit.min(-1)
        axis = axis_hit.gather(1, idx[:, None])[:, 0]
        p = center + t_min[:, None] * d
        normal = torch.zeros_like(p).scatter_(1, axis[:, None], 1.0)
        shade = 0.55 + 0.45 * (normal @ scene.light).abs()
        colour = _texture(scene, idx, p, axis) * shade[:, None]
        images.append((colour.clamp(0, 1) * 255).round().to(torch.uint8).reshape(height, width, 3).numpy())
        depths.append(t_min.reshape(height, width).float().numpy())  # ray z = 1 in the camera: t is depth
    return np.stack(images), np.stack(depths)


def render_sequence(seed: int, num_frames: int, height: int = 240, width: int = 320, speed: float = 1.0
                    ) -> SyntheticSequence:
    """Render `num_frames` frames of scene `seed` along its trajectory (fx = fy = 0.8 width)."""
    if num_frames < 1:
        raise ShapeError(f"num_frames: expected >= 1, got {num_frames}")
    scene = make_scene(seed)
    poses = make_trajectory(seed, num_frames, speed)
    intr = torch.tensor([0.8 * width, 0.8 * width, (width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
    images, depths = render_views(scene, poses, intr, height, width)
    return SyntheticSequence(images=images, depths=depths, poses_cw=poses, intrinsics=intr,
                             timestamps=np.arange(num_frames, dtype=np.float64) / 30.0, scene=scene)

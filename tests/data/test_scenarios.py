"""The hard cases: each has the property that defines it, exact ground truth, and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v2d.data.scenarios import (
    GAIN_RANGE,
    OCCLUDER_DEPTH_RANGE,
    SCENARIOS,
    exposure_curve,
    render_scenario,
    step_motion,
)
from v2d.data.synthetic import make_trajectory, render_sequence, render_views
from v2d.errors import InputError, ShapeError
from v2d.geometry.lie import quat_to_matrix, se3_inv

H, W = 36, 48


def centres(poses_cw: torch.Tensor) -> torch.Tensor:
    return se3_inv(poses_cw)[:, :3]


def grad_energy(image: np.ndarray) -> float:
    g = image.astype(np.float64).mean(-1)
    return float((np.diff(g, axis=0) ** 2).mean() + (np.diff(g, axis=1) ** 2).mean())


@pytest.mark.parametrize("seed", [0, 3])
def test_fast_moves_8cm_and_4deg_per_frame(seed):
    sc = render_scenario("fast", 30, seed, H, W)
    t, r = step_motion(sc.sequence.poses_cw)
    assert 0.07 < t.mean() < 0.09 and 3.5 < r.mean() < 4.5
    normal_t, normal_r = step_motion(make_trajectory(sc.sequence.scene, seed, 30))
    assert t.mean() > 2.5 * normal_t.mean() and r.mean() > 2.5 * normal_r.mean()
    assert sc.sequence.images.shape == (30, H, W, 3) and sc.blocked is None and sc.loop is None


def test_rotation_keeps_the_centre_and_faces_the_room_axis():
    sc = render_scenario("rotation", 30, 1, H, W)
    c = centres(sc.sequence.poses_cw)
    assert (c - c[0]).abs().max().item() < 1e-9
    _, r = step_motion(sc.sequence.poses_cw)
    assert (r > 0.05).all() and 1.0 <= r.mean() <= 2.0
    # The optical axis stays within the yaw sweep (<= 40 deg) plus sway of the direction to the room
    # axis, where the central boxes stand, and looks down.
    forward = quat_to_matrix(sc.sequence.poses_cw[:, 3:])[:, 2, :]  # R_cw row 2 = camera z in world
    to_axis = -c[0, [0, 2]] / c[0, [0, 2]].norm()
    horizontal = forward[:, [0, 2]] / forward[:, [0, 2]].norm(dim=-1, keepdim=True)
    assert torch.rad2deg(torch.acos((horizontal @ to_axis).clamp(-1, 1))).max() < 45
    assert (forward[:, 1] > 0).all()
    assert sc.sequence.depths.max() < (sc.sequence.scene.room_max - sc.sequence.scene.room_min).norm().item()


def test_blur_smooths_fast_frames_and_keeps_the_sharp_ground_truth():
    n, h, w = 4, 120, 160
    sc = render_scenario("blur", n, 0, h, w)  # seed 0 starts fast: 5 cm and 2.3 deg per frame
    seq = sc.sequence
    assert torch.equal(seq.poses_cw, make_trajectory(seq.scene, 0, n, speed=2.0))
    sharp, depths = render_views(seq.scene, seq.poses_cw, seq.intrinsics, h, w)
    assert np.array_equal(depths, seq.depths)
    assert all(not np.array_equal(a, b) for a, b in zip(sharp, seq.images, strict=True))
    ratio = np.array([grad_energy(b) / grad_energy(a) for a, b in zip(sharp, seq.images, strict=True)])
    assert (ratio < 0.9).all()
    # Not a different view: the blurred image stays close to the sharp one.
    assert np.abs(seq.images.astype(float) - sharp).mean() < 12


def test_exposure_applies_the_gain_and_gamma_curve():
    n = 30
    sc = render_scenario("exposure", n, 4, H, W)
    plain = render_sequence(4, n, H, W)
    assert torch.equal(sc.sequence.poses_cw, plain.poses_cw) and np.array_equal(sc.sequence.depths, plain.depths)
    gain, gamma = exposure_curve(n, 4)
    assert gain.min() == pytest.approx(GAIN_RANGE[0]) and gain.max() == pytest.approx(GAIN_RANGE[1])
    expected = 255 * gain[:, None, None, None] * (plain.images / 255.0) ** gamma[:, None, None, None]
    unclipped = expected < 254
    assert unclipped.mean() > 0.5
    assert np.abs(sc.sequence.images[unclipped] - expected[unclipped]).max() <= 0.5 + 1e-9
    ratio = sc.sequence.images.mean(axis=(1, 2, 3)) / plain.images.mean(axis=(1, 2, 3))
    assert np.corrcoef(np.log(ratio), np.log(gain))[0, 1] > 0.95
    assert np.all(np.abs(np.log(ratio / gain)) < 0.35)


def test_exposure_curve_drifts_smoothly_with_a_few_jumps():
    for seed in range(5):
        gain, gamma = exposure_curve(120, seed)
        steps = np.abs(np.diff(np.log(gain)))
        jumps = steps > 5 * np.median(steps)
        assert 1 <= jumps.sum() <= 3 and steps[~jumps].max() < 0.06
        assert gamma.min() >= 0.9 - 1e-12 and gamma.max() <= 1.1 + 1e-12


def test_blocked_covers_the_middle_stretch_with_near_depth():
    n = 24
    sc = render_scenario("blocked", n, 5, H, W)
    plain = render_sequence(5, n, H, W)
    a, b = sc.blocked
    assert (a, b) == (2, 22) and sc.loop is None
    seq = sc.sequence
    near = (seq.depths >= OCCLUDER_DEPTH_RANGE[0]) & (seq.depths <= OCCLUDER_DEPTH_RANGE[1])
    coverage = near.mean(axis=(1, 2))
    assert (coverage[a + 4:b - 4] >= 0.85).all() and coverage[(a + b) // 2] >= 0.85
    assert (coverage[a:b] > 0).all()
    outside = [k for k in range(n) if not a <= k < b]
    assert np.array_equal(seq.images[outside], plain.images[outside])
    assert np.array_equal(seq.depths[outside], plain.depths[outside])
    # Only occluded pixels change depth, and the occluder is nearer than anything in the room.
    changed = seq.depths != plain.depths
    assert np.array_equal(changed, near) and (plain.depths > 0.3).all()
    assert (seq.images[near] != plain.images[near]).any(-1).mean() > 0.9
    assert torch.equal(seq.poses_cw, plain.poses_cw)


def test_loop_returns_near_the_start_after_going_away():
    n = 40
    sc = render_scenario("loop", n, 6, 24, 32)
    assert sc.loop == (0, n - 1) and sc.blocked is None
    poses = sc.sequence.poses_cw
    end_t, end_r = step_motion(poses[[0, -1]])
    assert end_t[0] < 0.10 and end_r[0] < 10.0
    assert end_t[0] > 0.01 or end_r[0] > 1.0  # a revisit, not a copy of the first frame
    c = centres(poses)
    assert (c - c[0]).norm(dim=-1).max() > 0.3
    t, r = step_motion(poses)
    assert 0.01 < t.mean() < 0.04 and r.mean() < 2.0


def test_same_seed_same_output():
    for name in ("fast", "blocked"):
        a, b = render_scenario(name, 22, 7, 24, 32), render_scenario(name, 22, 7, 24, 32)
        assert np.array_equal(a.sequence.images, b.sequence.images)
        assert np.array_equal(a.sequence.depths, b.sequence.depths)
        assert torch.equal(a.sequence.poses_cw, b.sequence.poses_cw)
        c = render_scenario(name, 22, 8, 24, 32)
        assert not np.array_equal(a.sequence.images, c.sequence.images)


def test_bad_arguments():
    with pytest.raises(InputError, match="fast, rotation, blur, exposure, blocked, loop, jump.*'spin'"):
        render_scenario("spin", 10)
    with pytest.raises(ShapeError, match="blocked.*22.*10"):
        render_scenario("blocked", 10, 0, 24, 32)
    with pytest.raises(ShapeError):
        render_scenario("fast", 0)
    with pytest.raises(InputError):
        exposure_curve(10, -1)
    assert set(SCENARIOS) == {"fast", "rotation", "blur", "exposure", "blocked", "loop", "jump"}
    with pytest.raises(ShapeError, match="jump.*2"):
        render_scenario("jump", 1, 0, 24, 32)
    assert math.isclose(GAIN_RANGE[1] / GAIN_RANGE[0], 3.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jump_turns_the_view_by_60_degrees_between_two_frames(seed):
    """Normal hand-held steps, except one: 60 deg of view and a metre or more round the ring, with
    the view still half shared (the central boxes stay in sight)."""
    from v2d.data.scenarios import JUMP_DEG
    from v2d.geometry.camera import reproject, valid_reprojection
    from v2d.geometry.lie import se3_identity, se3_inv, se3_mul

    sc = render_scenario("jump", 30, seed, 60, 80)
    a, b = sc.jump
    assert (a, b) == (14, 15) and sc.blocked is None and sc.loop is None
    dist, angle = step_motion(sc.sequence.poses_cw)
    assert abs(angle[a] - JUMP_DEG) < 3 and dist[a] > 1.0
    others = np.delete(np.arange(len(angle)), a)
    assert angle[others].max() < 5 and dist[others].max() < 0.1
    inv = 1.0 / torch.as_tensor(sc.sequence.depths[a])
    rel = se3_mul(sc.sequence.poses_cw[b], se3_inv(sc.sequence.poses_cw[a])).float()
    coords, depth_b = reproject(inv, se3_identity(dtype=torch.float32), rel, sc.sequence.intrinsics.float())
    assert float(valid_reprojection(inv, coords, depth_b, 0.05).float().mean()) > 0.3

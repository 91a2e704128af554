"""Classical flow: DIS searched around a guess (large motion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2d.data.synthetic import default_intrinsics, make_scene, make_trajectory, render_views
from v2d.errors import ShapeError
from v2d.flow import dis_flow
from v2d.geometry.camera import pixel_grid, reproject
from v2d.geometry.lie import se3_exp, se3_mul

H, W = 120, 160


def _flow(depth: np.ndarray, pose_a: torch.Tensor, pose_b: torch.Tensor, intr: torch.Tensor) -> np.ndarray:
    """The flow a -> b that depth and poses induce. Shapes: depth (H, W) -> (H, W, 2)."""
    coords, _ = reproject(torch.from_numpy(1.0 / depth).double(), pose_a, pose_b, intr)
    return (coords - pixel_grid(H, W, dtype=torch.float64)).float().numpy()


@pytest.fixture(scope="module")
def wide_pair():
    """Two views of a synthetic room 25 deg and 15 cm apart (tens of pixels of flow), the true flow
    between them, and the flow a guess 1.5 deg and 4 cm off predicts (depth 5 % off)."""
    scene = make_scene(3)
    a = make_trajectory(scene, 3, 2)[0].double()
    turn = se3_exp(torch.tensor([0.15, 0.0, 0.0, 0.0, np.radians(25), 0.0], dtype=torch.float64))
    b = se3_mul(turn, a)
    off = se3_exp(torch.tensor([0.03, -0.02, 0.02, np.radians(1.0), np.radians(-1.0), np.radians(0.5)],
                               dtype=torch.float64))
    intr = default_intrinsics(H, W).double()
    images, depths = render_views(scene, torch.stack([a, b]), intr, H, W)
    truth = _flow(depths[0], a, b, intr)
    guess = _flow(depths[0] * 1.05, a, se3_mul(off, b), intr)
    return images, truth, guess


def _epe(flow: np.ndarray, truth: np.ndarray) -> float:
    return float(np.median(np.linalg.norm(flow - truth, axis=-1)))


def test_a_guided_search_finds_motion_an_unguided_one_misses(wide_pair):
    images, truth, guess = wide_pair
    assert np.median(np.linalg.norm(truth, axis=-1)) > 25  # tens of pixels apart
    plain = _epe(dis_flow(images[0], images[1], finest_scale=0), truth)
    guided = _epe(dis_flow(images[0], images[1], init=guess, finest_scale=0), truth)
    assert guided < 1.0 and guided < _epe(guess, truth) / 2  # it refines the guess, not copies it
    assert plain > 5 * guided


def test_a_guess_with_holes_is_usable_and_a_wrong_shape_is_refused(wide_pair):
    images, truth, guess = wide_pair
    holes = guess.copy()
    holes[:10] = np.nan
    assert np.isfinite(dis_flow(images[0], images[1], init=holes)).all()
    with pytest.raises(ShapeError, match="init"):
        dis_flow(images[0], images[1], init=guess[:-1])

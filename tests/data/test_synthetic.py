"""The synthetic renderer: deterministic, and depth, poses, intrinsics and textures agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2d.data.synthetic import render_sequence
from v2d.errors import ShapeError
from v2d.geometry.camera import reproject
from v2d.geometry.lie import se3_inv, se3_log, se3_mul


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=3, num_frames=6, height=60, width=80)


def test_deterministic_and_seeded(seq):
    again = render_sequence(seed=3, num_frames=6, height=60, width=80)
    assert np.array_equal(seq.images, again.images) and np.array_equal(seq.depths, again.depths)
    other = render_sequence(seed=4, num_frames=6, height=60, width=80)
    assert not np.array_equal(seq.images, other.images)


def test_shapes_depth_and_contrast(seq):
    assert seq.images.shape == (6, 60, 80, 3) and seq.images.dtype == np.uint8
    assert seq.depths.shape == (6, 60, 80) and np.isfinite(seq.depths).all() and (seq.depths > 0.5).all()
    assert all(img.std() > 15 for img in seq.images)


def test_motion_is_smooth(seq):
    step = se3_log(se3_mul(seq.poses_cw[1:], se3_inv(seq.poses_cw[:-1])))
    assert step[:, :3].norm(dim=-1).max() < 0.05
    assert np.degrees(step[:, 3:].norm(dim=-1).max().item()) < 2.0


def test_views_are_geometrically_and_photometrically_consistent(seq):
    """Frame 0's pixels reprojected into frame 3 land where frame 3 sees the same depth and colour."""
    inv_depth = torch.from_numpy(1.0 / seq.depths[0]).double()
    coords, depth_j = reproject(inv_depth, seq.poses_cw[0], seq.poses_cw[3], seq.intrinsics)
    u, v = coords[..., 0].round().long(), coords[..., 1].round().long()
    inside = (u >= 0) & (u < 80) & (v >= 0) & (v < 60)
    uu, vv = u[inside], v[inside]
    rendered = torch.from_numpy(seq.depths[3])[vv, uu].double()
    rel = ((rendered - depth_j[inside]).abs() / rendered)
    assert inside.float().mean() > 0.5
    assert (rel < 0.05).float().mean() > 0.9  # nearest-pixel lookup: small errors at edges and slopes
    c0 = torch.from_numpy(seq.images[0].astype(np.float64))[inside]
    c3 = torch.from_numpy(seq.images[3].astype(np.float64))[vv, uu]
    assert (c0 - c3).abs().median() < 12


def test_bad_arguments():
    with pytest.raises(ShapeError, match="num_frames: expected >= 1, got 0"):
        render_sequence(seed=0, num_frames=0)
    with pytest.raises(ShapeError, match="image size"):
        render_sequence(seed=0, num_frames=1, height=0)

"""slam/relocaliser.py: feature registration against keyframes (pose accuracy, retired keyframes'
strided depth, rejection of unrelated views) and appearance retrieval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from slam.map import Keyframe
from slam.relocaliser import KeyframeIndex, global_descriptor
from v2d.data.synthetic import render_sequence
from v2d.geometry.lie import se3_inv, se3_log, se3_mul


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=4, num_frames=41, height=240, width=320)


def _keyframe(seq, k: int, retired: bool = False) -> Keyframe:
    depth = torch.from_numpy(np.asarray(seq.depths[k]))
    image = np.asarray(seq.images[k])
    if retired:  # what the map keeps after the window: a strided copy
        return Keyframe(frame=k, pose_cw=seq.poses_cw[k], image=None, depth=None,
                        small_depth=depth.numpy()[::2, ::2].copy(), small_image=image[::2, ::2].copy())
    return Keyframe(frame=k, pose_cw=seq.poses_cw[k], image=image, depth=depth,
                    valid=torch.ones_like(depth, dtype=torch.bool))


def _errors(rel: torch.Tensor, rel_gt: torch.Tensor) -> tuple[float, float]:
    xi = se3_log(se3_mul(rel, se3_inv(rel_gt)))
    return float(xi[:3].norm()), math.degrees(float(xi[3:].norm()))


@pytest.mark.parametrize("retired", [False, True])
def test_registers_a_distant_frame_to_the_true_pose(seq, retired):
    index = KeyframeIndex(RunConfig(), (240, 320))
    index.add(7, np.asarray(seq.images[0]))
    f = 12  # far apart for dense flow (tens of pixels)
    reg = index.register(np.asarray(seq.images[f]), [_keyframe(seq, 0, retired)], [7], seq.intrinsics)
    assert reg is not None and reg.kid == 7
    rel_gt = se3_mul(seq.poses_cw[f], se3_inv(seq.poses_cw[0]))
    t_err, r_err = _errors(reg.rel_cw, rel_gt)
    baseline = float(se3_log(rel_gt)[:3].norm())
    assert baseline > 0.1  # metres: a real displacement
    assert t_err < 0.1 * baseline and r_err < 0.5, (t_err, r_err, reg)
    assert reg.inliers >= RunConfig().slam.reloc_min_inliers and reg.reprojection_px < 3.0


def test_refuses_views_of_another_place(seq):
    other = render_sequence(seed=9, num_frames=1, height=240, width=320)
    index = KeyframeIndex(RunConfig(), (240, 320))
    index.add(0, np.asarray(seq.images[0]))
    assert index.register(np.asarray(other.images[0]), [_keyframe(seq, 0)], [0], seq.intrinsics) is None
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert index.register(noise, [_keyframe(seq, 0)], [0], seq.intrinsics) is None


def test_the_best_of_several_keyframes_wins(seq):
    index = KeyframeIndex(RunConfig(), (240, 320))
    for k in (0, 20, 40):
        index.add(k, np.asarray(seq.images[k]))
    reg = index.register(np.asarray(seq.images[22]), [_keyframe(seq, k) for k in (0, 20, 40)], [0, 20, 40],
                         seq.intrinsics)
    assert reg is not None and reg.kid == 20


def test_appearance_retrieval_ignores_brightness(seq):
    index = KeyframeIndex(RunConfig(), (240, 320))
    for k in (0, 20, 40):
        index.add(k, np.asarray(seq.images[k]))
    darker = (np.asarray(seq.images[21]).astype(np.float32) * 0.5 + 10).astype(np.uint8)
    ranked = index.similar(darker, exclude=set(), count=3)
    assert [k for k, _ in ranked][0] == 20
    assert [k for k, _ in index.similar(darker, exclude={20}, count=3)][0] != 20
    d = global_descriptor(np.asarray(seq.images[0]))
    assert d.shape == (768,) and abs(float(np.linalg.norm(d)) - 1.0) < 1e-5

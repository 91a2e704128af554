"""slam/relocaliser.py: feature registration against keyframes (pose accuracy, retired keyframes'
strided depth, rejection of unrelated views) and appearance retrieval, with each kind of feature."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from slam.map import Keyframe
from slam.relocaliser import KeyframeIndex
from v2d.data.synthetic import render_sequence
from v2d.geometry.lie import se3_inv, se3_log, se3_mul

KINDS = ["xfeat", "orb"]


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=4, num_frames=41, height=240, width=320)


@pytest.fixture(scope="module", params=KINDS)
def index(request):
    cfg = RunConfig()
    return KeyframeIndex(dataclasses.replace(cfg, slam=dataclasses.replace(cfg.slam, features=request.param)),
                         (240, 320))


def _keyframe(seq, k: int, index: KeyframeIndex, retired: bool = False) -> Keyframe:
    depth = torch.from_numpy(np.asarray(seq.depths[k]))
    image = np.asarray(seq.images[k])
    feats = index.features(image)
    if retired:  # what the map keeps after the window: a strided copy (and the features)
        return Keyframe(frame=k, pose_cw=seq.poses_cw[k], image=None, depth=None,
                        small_depth=depth.numpy()[::2, ::2].copy(), small_image=image[::2, ::2].copy(),
                        features=feats)
    return Keyframe(frame=k, pose_cw=seq.poses_cw[k], image=image, depth=depth,
                    valid=torch.ones_like(depth, dtype=torch.bool), features=feats)


def _errors(rel: torch.Tensor, rel_gt: torch.Tensor) -> tuple[float, float]:
    xi = se3_log(se3_mul(rel, se3_inv(rel_gt)))
    return float(xi[:3].norm()), math.degrees(float(xi[3:].norm()))


@pytest.mark.parametrize("retired", [False, True])
def test_registers_a_distant_frame_to_the_true_pose(seq, index, retired):
    f = 12  # far apart for dense flow (tens of pixels)
    reg = index.register(index.features(np.asarray(seq.images[f])), [_keyframe(seq, 0, index, retired)], [7],
                         seq.intrinsics)
    assert reg is not None and reg.kid == 7
    rel_gt = se3_mul(seq.poses_cw[f], se3_inv(seq.poses_cw[0]))
    t_err, r_err = _errors(reg.rel_cw, rel_gt)
    baseline = float(se3_log(rel_gt)[:3].norm())
    assert baseline > 0.1  # metres: a real displacement
    assert t_err < 0.1 * baseline and r_err < 0.5, (t_err, r_err, reg)
    assert reg.inliers >= RunConfig().slam.reloc_min_inliers and reg.reprojection_px < 3.0


def test_refuses_views_of_another_place(seq, index):
    other = render_sequence(seed=9, num_frames=1, height=240, width=320)
    kf = _keyframe(seq, 0, index)
    assert index.register(index.features(np.asarray(other.images[0])), [kf], [0], seq.intrinsics) is None
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert index.register(index.features(noise), [kf], [0], seq.intrinsics) is None


def test_a_keyframe_without_features_is_skipped(seq, index):
    kf = dataclasses.replace(_keyframe(seq, 0, index), features=None)
    feats = index.features(np.asarray(seq.images[2]))
    assert index.register(feats, [kf], [0], seq.intrinsics) is None
    assert index.similar(feats, [kf], [0], count=3) == []


def test_the_best_of_several_keyframes_wins(seq, index):
    kfs = [_keyframe(seq, k, index) for k in (0, 20, 40)]
    reg = index.register(index.features(np.asarray(seq.images[22])), kfs, [0, 20, 40], seq.intrinsics)
    assert reg is not None and reg.kid == 20


def test_appearance_retrieval_ignores_brightness(seq, index):
    kfs = [_keyframe(seq, k, index) for k in (0, 20, 40)]
    darker = (np.asarray(seq.images[21]).astype(np.float32) * 0.5 + 10).astype(np.uint8)
    query = index.features(darker)
    ranked = index.similar(query, kfs, [0, 20, 40], count=3)
    assert [k for k, _ in ranked][0] == 20
    assert {k for k, _ in index.similar(query, kfs, [0, 20, 40], count=2)} == {0, 20}  # the nearer views first
    d = query.global_desc
    assert d.ndim == 1 and abs(float(np.linalg.norm(d)) - 1.0) < 1e-5


def test_careful_matching_registers_a_60_degree_turn():
    """Plain XFeat matching keeps too few right matches across a 60-degree turn of view; the careful
    matcher (LighterGlue) registers it, to the true pose."""
    from v2d.data.scenarios import render_scenario

    cfg = RunConfig()
    index = KeyframeIndex(dataclasses.replace(cfg, slam=dataclasses.replace(cfg.slam, features="xfeat")), (240, 320))
    sc = render_scenario("jump", 30, seed=0).sequence
    a, b = 14, 15
    depth = torch.from_numpy(np.asarray(sc.depths[a]))
    kf = Keyframe(frame=a, pose_cw=sc.poses_cw[a], image=np.asarray(sc.images[a]), depth=depth,
                  valid=torch.ones_like(depth, dtype=torch.bool), features=index.features(np.asarray(sc.images[a])))
    feats = index.features(np.asarray(sc.images[b]))
    assert index.register(feats, [kf], [a], sc.intrinsics, careful=0) is None
    reg = index.register(feats, [kf], [a], sc.intrinsics, careful=1)
    assert reg is not None and reg.kid == a
    rel_gt = se3_mul(sc.poses_cw[b], se3_inv(sc.poses_cw[a]))
    assert math.degrees(float(se3_log(rel_gt)[3:].norm())) > 55
    t_err, r_err = _errors(reg.rel_cw, rel_gt)
    assert t_err < 0.1 * float(se3_log(rel_gt)[:3].norm()) and r_err < 2.0, (t_err, r_err)  # a start for dense tracking

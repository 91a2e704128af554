"""The engine on hard motion: relocalisation against an old keyframe instead of a restart, keyframes
by predicted overlap, a 60-degree jump in view and loops, with each kind of sparse feature. Rendered
sequences at 120x160 (ORB needs some pixels), 240x320 where the features need more."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from slam.system import SlamSystem
from v2d.config import load_config
from v2d.data.scenarios import render_scenario
from v2d.data.synthetic import render_sequence
from v2d.geometry.camera import reproject, valid_reprojection
from v2d.geometry.lie import se3_identity, se3_inv, se3_log, se3_mul
from v2d.metrics import trajectory_ate
from v2d.model import SHIPPED_WEIGHTS, load_model

H, W = 120, 160
pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason=f"shipped weights missing: {SHIPPED_WEIGHTS}")


def _cfg(*overrides: str):
    return load_config(None, ["slam.concurrent=false", *overrides], root=RunConfig)


@pytest.fixture(scope="module")
def model():
    return load_model(_cfg())


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=5, num_frames=150, height=H, width=W)


def _run(model, cfg, frames, intrinsics):
    with SlamSystem(model, cfg, intrinsics, (H, W)) as system:
        for f in frames:
            system.add_frame(np.ascontiguousarray(f))
        return system, system.finish()


def test_a_return_to_an_early_view_relocalises_in_the_same_map(seq, model):
    images = np.asarray(seq.images)
    early = 4
    frames = [*images[::2], images[early]]  # 75 frames along the orbit, then back to frame 4's view
    system, res = _run(model, _cfg(), frames, seq.intrinsics)
    assert res.restarts == 0 and not res.frames[-1].lost
    assert res.relocalised + res.recovered >= 1
    early_kf = [f for f in res.keyframe_frames if f <= early // 2 + 2]
    assert early_kf and all(k.image is None for k in system.map.keyframes()), "the early keyframe was retired"
    # the returning frame sits where the map put the early frame (the same view)
    path = float(np.linalg.norm(np.diff(se3_inv(res.poses_cw)[:, :3].numpy(), axis=0), axis=1).sum())
    xi = se3_log(se3_mul(res.poses_cw[-1], se3_inv(res.poses_cw[early // 2])))
    assert float(xi[:3].norm()) < 0.03 * path, (float(xi[:3].norm()), path)
    assert math.degrees(float(xi[3:].norm())) < 2.0
    # the ground truth says the two views are 1 m or more apart in between: a real return
    gt_wc = se3_inv(seq.poses_cw[::2])
    assert float(np.linalg.norm(gt_wc[len(gt_wc) // 2, :3] - gt_wc[0, :3])) > 1.0


def test_keyframes_by_predicted_overlap(seq, model):
    frames = np.asarray(seq.images)[:45:3]
    _, off = _run(model, _cfg("slam.keyframe_flow=1000", "slam.keyframe_overlap=0"), frames, seq.intrinsics)
    _, on = _run(model, _cfg("slam.keyframe_flow=1000", "slam.keyframe_overlap=0.9"), frames, seq.intrinsics)
    # without either rule tracking runs out of view (lost frames, restarts); the overlap rule alone
    # makes keyframes in time
    assert any(s.lost for s in off.frames)
    assert len(on.keyframe_frames) >= 3 and on.restarts == 0
    assert not any(s.lost for s in on.frames)


def _ate_percent(res, seq) -> float:
    n = len(res.frames)
    ts = np.arange(n, dtype=np.float64)
    ate = trajectory_ate(ts, se3_inv(res.poses_cw).numpy(), ts, se3_inv(seq.poses_cw[:n]).numpy())
    return 100 * ate["ate_rmse"] / ate["path_length"]


@pytest.mark.parametrize("case, size", [("fast", (H, W)), ("blocked", (240, 320))])
def test_hard_cases_complete_in_one_segment(model, case, size):
    """Fast hand-held motion (8 cm, 4 deg per frame) and a hand over the lens for 20 frames: one map
    (a restart behind the hand is merged back by relocalisation), no frame left lost, bounded error.
    The blocked view runs at the suite's size: at 120x160 an image holds ~40 ORB matches, at the
    edge of `slam.reloc_min_inliers`, and whether the merge succeeds flips with the thread count."""
    sc = render_scenario(case, 60, seed=0, height=size[0], width=size[1])
    with SlamSystem(model, _cfg(), sc.sequence.intrinsics, size) as system:
        for f in np.asarray(sc.sequence.images):
            system.add_frame(np.ascontiguousarray(f))
        res = system.finish()
    assert len(res.segments) == 1 and res.restarts == system.merges
    assert not any(s.lost for s in res.frames)
    assert _ate_percent(res, sc.sequence) < 5.0


@pytest.mark.parametrize("features", ["orb", "xfeat"])
def test_a_loop_back_to_the_start_is_detected(model, features):
    sc = render_scenario("loop", 90, seed=0, height=H, width=W)
    _, res = _run(model, _cfg("slam.loop_min_gap=5", f"slam.features={features}"), np.asarray(sc.sequence.images),
                  sc.sequence.intrinsics)
    assert len(res.loops) >= 1
    assert len(res.segments) == 1 and not any(s.lost for s in res.frames)
    for a, b in res.loops:  # every loop is a real revisit: the ground truth says the two views overlap
        assert b - a >= 20, (a, b)
        assert _overlap(sc.sequence, a, b) > 0.3, (a, b, _overlap(sc.sequence, a, b))


def _overlap(seq, a: int, b: int) -> float:
    """The fraction of frame a's pixels that frame b sees (ground-truth depth and poses)."""
    inv = 1.0 / torch.as_tensor(np.asarray(seq.depths[a]), dtype=torch.float32)
    rel = se3_mul(seq.poses_cw[b], se3_inv(seq.poses_cw[a])).float()
    coords, depth_b = reproject(inv, se3_identity(dtype=torch.float32), rel, seq.intrinsics.float())
    return float(valid_reprojection(inv, coords, depth_b, 0.05).float().mean())


def test_a_60_degree_jump_in_view_is_registered_without_a_new_segment(model):
    """Between two consecutive frames the camera moves 1-2 m round the room and its view turns by 60
    deg (about half of the view still shared): dense tracking and plain XFeat matching lose it,
    LighterGlue's matches register it against the last keyframe, and tracking goes on in one map.
    (With `slam.features=orb` the same run restarts a second segment.)"""
    size = (240, 320)
    sc = render_scenario("jump", 30, seed=1, height=size[0], width=size[1])
    a, b = sc.jump
    xi = se3_log(se3_mul(sc.sequence.poses_cw[b], se3_inv(sc.sequence.poses_cw[a])))
    assert 55 < math.degrees(float(xi[3:].norm())) < 65 and _overlap(sc.sequence, a, b) > 0.3
    with SlamSystem(model, _cfg("slam.features=xfeat"), sc.sequence.intrinsics, size) as system:
        for f in np.asarray(sc.sequence.images):
            system.add_frame(np.ascontiguousarray(f))
        res = system.finish()
    assert len(res.segments) == 1 and res.restarts == 0
    assert not any(s.lost for s in res.frames)
    assert res.relocalised + res.recovered >= 1
    assert _ate_percent(res, sc.sequence) < 5.0

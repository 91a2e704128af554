"""The SLAM front end (`slam.frontend.SlamSystem`) on small rendered sequences.

Sizes are 96x128 (a few seconds per run); the accuracy at the shipped weights' size, 240x320, is
covered by the demo test (tests/test_demo.py) and measured by bench/slam.py.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from slam.frontend import SlamSystem
from slam.run import slam_config
from v2d.config import load_config
from v2d.data.synthetic import render_sequence
from v2d.errors import ShapeError, V2DError
from v2d.geometry.lie import se3_inv, se3_mul
from v2d.metrics import trajectory_ate
from v2d.model import SHIPPED_WEIGHTS, load_model

H, W = 96, 128
pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason=f"shipped weights missing: {SHIPPED_WEIGHTS}")


def _cfg(*overrides: str):
    return slam_config(load_config(None, list(overrides), root=RunConfig))


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=2, num_frames=49, height=H, width=W)


@pytest.fixture(scope="module")
def model():
    return load_model(_cfg())


def _run(model, cfg, frames, intrinsics, calibrated=True, on_keyframe=None):
    system = SlamSystem(model, cfg, intrinsics, (H, W), calibrated=calibrated, on_keyframe=on_keyframe)
    for f in frames:
        system.add_frame(np.ascontiguousarray(f))
    return system, system.finish()


def test_tracks_a_rendered_sequence_with_keyframes(seq, model):
    frames = np.asarray(seq.images)[::2]
    finals = []
    system, res = _run(model, _cfg(), frames, seq.intrinsics, on_keyframe=lambda f, d, p, im: finals.append((f, d)))
    n = len(frames)
    assert res.poses_cw.shape == (n, 7) and torch.isfinite(res.poses_cw).all()
    assert len(res.keyframe_frames) >= 3  # the camera moves: new keyframes by induced flow
    assert res.keyframe_frames == sorted(res.keyframe_frames) and res.keyframe_frames[0] == 0
    assert [f for f, _ in finals] == res.keyframe_frames  # every keyframe's depth handed out once
    assert all(d.shape == (H, W) and np.isfinite(d).all() and (d > 0).mean() > 0.9 for _, d in finals)
    assert not any(s.lost for s in res.frames)
    ts = np.arange(n, dtype=np.float64)
    gt_wc = se3_inv(seq.poses_cw[::2]).numpy()
    ate = trajectory_ate(ts, se3_inv(res.poses_cw).numpy(), ts, gt_wc)
    assert ate["ate_rmse"] < 0.03 * ate["path_length"], ate  # 96x128 is far below the training size
    # memory bound: only the window keeps full-size images; the buffer is trimmed
    assert all(k.image is None for k in system.keyframes)
    assert len(system.buffer) <= system.sc.buffer_frames


def test_keyframe_threshold_controls_keyframes(seq, model):
    frames = np.asarray(seq.images)[:24]
    _, few = _run(model, _cfg("slam.keyframe_flow=60"), frames, seq.intrinsics)
    _, many = _run(model, _cfg("slam.keyframe_flow=8"), frames, seq.intrinsics)
    assert len(few.keyframe_frames) < len(many.keyframe_frames)


def test_window_and_buffer_stay_bounded(seq, model):
    cfg = _cfg("slam.window=2", "slam.buffer_frames=4", "slam.keyframe_flow=6")
    system = SlamSystem(model, cfg, seq.intrinsics, (H, W))
    full_images = []
    for f in np.asarray(seq.images)[::2]:
        system.add_frame(np.ascontiguousarray(f))
        if system.initialised:
            full_images.append(sum(k.image is not None for k in system.keyframes))
            assert len(system.window) <= 2 and len(system.buffer) <= 4
            # keyframe pairs of the window only: flows to frames serve one keyframe's optimisations
            assert all(a in system.window and b in system.window for a, b in system.dis_cache)
    assert max(full_images) <= 2
    assert len(system.keyframes) > 4


def test_static_stretch_is_marked_and_warned(seq, model):
    images = np.asarray(seq.images)
    frames = list(images[:10]) + [images[9]] * 12 + list(images[10:16])
    _, res = _run(model, _cfg(), frames, seq.intrinsics)
    static = [f for f, s in enumerate(res.frames) if s.static]
    assert set(range(11, 22)) <= set(static) and all(9 <= f <= 22 for f in static)
    assert any("static" in w for w in res.warnings)
    assert torch.isfinite(res.poses_cw).all()


def test_static_camera_completes_with_warning(seq, model, caplog):
    frame = np.asarray(seq.images)[0]
    with caplog.at_level(logging.WARNING):
        _, res = _run(model, _cfg(), [frame] * 14, seq.intrinsics)
    assert torch.isfinite(res.poses_cw).all()
    assert sum(s.static for s in res.frames) >= 10
    assert len(res.keyframe_frames) == 1
    assert any("static" in w for w in res.warnings)
    # the camera did not move: every pose stays at the first one
    assert (res.poses_cw[:, :3] - res.poses_cw[:1, :3]).abs().max() < 1e-2


def test_textureless_stretch_completes_without_nan(seq, model):
    frames = list(np.asarray(seq.images)[:16])
    grey = np.full((H, W, 3), 128, np.uint8)
    frames[6:11] = [grey] * 5
    _, res = _run(model, _cfg(), frames, seq.intrinsics)
    assert torch.isfinite(res.poses_cw).all()
    assert [f for f, s in enumerate(res.frames) if s.textureless] == [6, 7, 8, 9, 10]
    assert any("textureless" in w for w in res.warnings)
    assert all(np.isfinite(d).all() for d in res.cloud_depths)


def test_lost_frames_are_reported_and_tracking_recovers(seq, model):
    frames = list(np.asarray(seq.images)[:20])
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(3)]
    frames[12:15] = noise  # three frames of another "scene"
    _, res = _run(model, _cfg(), frames, seq.intrinsics)
    lost = [f for f, s in enumerate(res.frames) if s.lost]
    assert set(lost) >= {12, 13, 14} and all(f in (12, 13, 14) for f in lost)
    # they hold the last good pose (frame 11's, which the window may refine a little afterwards)
    assert all(torch.allclose(res.poses_cw[f], res.poses_cw[12], atol=1e-9) for f in lost)
    assert torch.allclose(res.poses_cw[12], res.poses_cw[11], atol=1e-2)
    assert not any(s.lost for s in res.frames[15:])  # recovered against the last good keyframe
    assert torch.isfinite(res.poses_cw).all()
    assert any("lost" in w for w in res.warnings)


def test_long_loss_restarts(seq, model):
    frames = list(np.asarray(seq.images)[:10])
    rng = np.random.default_rng(1)
    frames += [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(6)]
    _, res = _run(model, _cfg("slam.relocalise_after=3"), frames, seq.intrinsics)
    assert res.restarts >= 1
    assert torch.isfinite(res.poses_cw).all()


def test_uncalibrated_refines_focal(seq, model):
    start = torch.tensor([1.2 * W, 1.2 * W, (W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
    _, res = _run(model, _cfg(), np.asarray(seq.images)[::2][:16], start, calibrated=False)
    assert torch.isfinite(res.intrinsics).all()
    assert res.intrinsics[0] != start[0]  # the focal length was optimised
    true_f = float(seq.intrinsics[0])
    assert abs(res.intrinsics[0] - true_f) < abs(start[0] - true_f)


def test_learned_flow_source_runs(seq, model):
    cfg = _cfg("motion.flow_source=learned")
    _, res = _run(load_model(cfg), cfg, np.asarray(seq.images)[:12], seq.intrinsics)
    assert res.poses_cw.shape == (12, 7) and torch.isfinite(res.poses_cw).all()


def test_bad_frames_and_too_few_frames(seq, model):
    system = SlamSystem(model, _cfg(), seq.intrinsics, (H, W))
    with pytest.raises(ShapeError, match=r"expected \(96, 128, 3\) uint8"):
        system.add_frame(np.zeros((H, W + 4, 3), np.uint8))
    with pytest.raises(ShapeError, match="uint8"):
        system.add_frame(np.zeros((H, W, 3), np.float32))
    system.add_frame(np.asarray(seq.images)[0])
    with pytest.raises(ShapeError, match="at least 2 frames"):
        system.finish()
    with pytest.raises(ShapeError, match="intrinsics"):
        SlamSystem(model, _cfg(), torch.tensor([0.0, 1.0, 2.0, 3.0]), (H, W))
    with pytest.raises(ShapeError, match="intrinsics"):
        SlamSystem(model, _cfg(), torch.tensor([float("nan"), 1.0, 2.0, 3.0]), (H, W))


def test_short_video_initialises_on_what_it_has(seq, model):
    _, res = _run(model, _cfg(), np.asarray(seq.images)[:3], seq.intrinsics)
    assert res.poses_cw.shape == (3, 7) and torch.isfinite(res.poses_cw).all()
    assert res.keyframe_frames == [0] and not any(s.lost for s in res.frames)


def test_finished_system_refuses_more_work(seq, model):
    system, _ = _run(model, _cfg(), np.asarray(seq.images)[:4], seq.intrinsics)
    with pytest.raises(V2DError, match="finished"):
        system.add_frame(np.asarray(seq.images)[4])
    with pytest.raises(V2DError, match="finished"):
        system.finish()


def test_quality_drop_promotes_the_previous_frame(seq, model):
    frames = [np.array(f) for f in np.asarray(seq.images)[:20]]
    rng = np.random.default_rng(3)
    for f in frames[12:]:  # half the view turns to noise: confidence drops, geometry does not
        f[:, : W // 2] = rng.integers(0, 256, (H, W // 2, 3), dtype=np.uint8)
    cfg = _cfg("slam.keyframe_flow=200", "slam.promote_flow=0", "slam.min_keyframe_gap=1")  # no flow keyframes
    _, res = _run(model, cfg, frames, seq.intrinsics)
    assert len(res.keyframe_frames) >= 2  # quality drops made keyframes
    for f in res.keyframe_frames[1:]:
        assert res.frames[f].quality.confidence >= 0.3  # ... of frames that were tracked well
    assert res.keyframe_frames[1] in (11, 12)  # the last well-tracked frame before the first drop


def test_depth_fusion_averages_agreeing_estimates_in_inverse_depth(seq, model):
    system = SlamSystem(model, _cfg("slam.fuse_tolerance=0.5"), seq.intrinsics, (H, W))
    depth = torch.full((H, W), 2.0)
    near = torch.zeros(H, W)
    near[:, : W // 2] = 2.5  # agrees within 50 % on the left half, nothing landed on the right
    far = torch.full((H, W), 4.0)  # disagrees everywhere (an occluder or a wrong estimate)
    fused = system._fuse(depth, [near, far])
    assert torch.allclose(fused[:, : W // 2], torch.tensor(2 / (1 / 2.0 + 1 / 2.5)))
    assert torch.allclose(fused[:, W // 2 :], depth[:, W // 2 :])
    assert system._scale_to([near], depth) == pytest.approx(1.25)
    assert system._scale_to([], depth) == 1.0


def _window_at_truth(seq, model, *overrides: str) -> tuple[SlamSystem, torch.Tensor, torch.Tensor]:
    """A system with a window of >= 3 keyframes, their poses set to the truth (world = frame 0).

    Returns the system, the true poses (K, 7) and the true depths (K, H, W) of the window keyframes.
    """
    system = SlamSystem(model, _cfg("slam.window=4", "slam.keyframe_flow=6", *overrides), seq.intrinsics, (H, W))
    for f in np.asarray(seq.images)[::2][:14]:
        system.add_frame(np.ascontiguousarray(f))
    assert len(system.window) >= 3
    gt_cw = torch.as_tensor(np.asarray(seq.poses_cw), dtype=torch.float64)[::2]
    gt_depth = torch.as_tensor(np.asarray(seq.depths), dtype=torch.float32)[::2]
    poses, depths = [], []
    for k in system.window:
        kf = system.keyframes[k]
        kf.pose_cw = se3_mul(gt_cw[kf.frame], se3_inv(gt_cw[0]))
        kf.depth = kf.prior = gt_depth[kf.frame]
        kf.valid = torch.ones(H, W, dtype=torch.bool)
        poses.append(kf.pose_cw.clone())
        depths.append(gt_depth[kf.frame])
    system.dis_cache.clear()
    return system, torch.stack(poses), torch.stack(depths)


def _translation_errors(system: SlamSystem, truth: torch.Tensor) -> torch.Tensor:
    got = torch.stack([system.keyframes[k].pose_cw for k in system.window])
    return (got[:, :3] - truth[:, :3]).norm(dim=-1)


def test_bundle_adjustment_moves_window_depths_towards_the_truth(seq, model):
    """From true poses, each window keyframe's wrong depth is pulled to what the flow triangulates
    (up to the window's scale, which only the prior holds), and the poses stay near the truth (DIS
    flow at 96x128 leaves ~0.01, 4 % of the baseline, even when started there)."""
    system, truth, gt = _window_at_truth(seq, model, "slam.ba_iterations=5", "slam.ba_prior=0.5")
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    wrong = 1.0 + 0.45 * torch.sin(u / 9.0) * torch.cos(v / 7.0)  # a smooth shape error of up to 45 %
    for k, g in zip(system.window, gt, strict=True):
        kf = system.keyframes[k]
        kf.depth = kf.prior = g * wrong
    system._bundle_adjust()
    before, after = [], []
    for k, g in zip(system.window, gt, strict=True):
        kf = system.keyframes[k]
        assert torch.isfinite(kf.depth).all() and kf.depth.shape == (H, W)
        before.append(float(((g * wrong - g).abs() / g).median()))
        scaled = kf.depth * (g / kf.depth).median()
        after.append(float(((scaled - g).abs() / g).median()))
    assert np.mean(after) < 0.4 * np.mean(before), (before, after)
    err = _translation_errors(system, truth)
    assert float(err[0]) == 0.0 and float(err.max()) < 0.03, err  # the oldest is fixed (gauge)
    # the prior is the keyframe's `prior`, not its current depth: a tight prior wins over the flow
    system.sc = dataclasses.replace(system.sc, ba_prior=1e-3)
    for k, g in zip(system.window, gt, strict=True):
        kf = system.keyframes[k]
        kf.depth, kf.prior = g * wrong, g * 1.1
    system._bundle_adjust()
    for k in system.window:
        kf = system.keyframes[k]
        s = system.sc.ba_stride  # exact on the adjusted pixels; between them the change is interpolated
        torch.testing.assert_close(kf.depth[::s, ::s], kf.prior[::s, ::s], rtol=2e-3, atol=0)


def test_bundle_adjustment_recovers_perturbed_poses(seq, model):
    """With the true depth as the prior, the window's free poses reach the same solution from the
    truth and from a start 0.054 away (near the truth: DIS flow at 96x128 is not exact)."""
    got = []
    for scale in (0.0, 1.0):
        system, truth, _ = _window_at_truth(seq, model)
        kick = scale * torch.tensor([0.04, -0.03, 0.02, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        for k in system.window[1:]:  # the oldest is fixed
            system.keyframes[k].pose_cw = system.keyframes[k].pose_cw + kick
        system._bundle_adjust()
        err = _translation_errors(system, truth)
        assert float(err[0]) == 0.0 and float(err.max()) < 0.03, (scale, err)
        got.append(torch.stack([system.keyframes[k].pose_cw for k in system.window]))
    assert float((got[1][:, :3] - got[0][:, :3]).norm(dim=-1).max()) < 1e-3, got


def test_bundle_adjustment_leaves_the_window_when_no_pair_passes_the_flow_gate(seq, model):
    system, truth, gt = _window_at_truth(seq, model)
    system.sc = dataclasses.replace(system.sc, edge_max_flow=1e-6)
    kick = torch.tensor([0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    system.keyframes[system.window[-1]].pose_cw = truth[-1] + kick
    system._bundle_adjust()
    assert torch.equal(system.keyframes[system.window[-1]].pose_cw, truth[-1] + kick)
    assert all(torch.equal(system.keyframes[k].depth, g) for k, g in zip(system.window, gt, strict=True))
    assert not system.dis_cache  # no flow computed for pairs that were left out


@pytest.mark.parametrize("overrides, expected", [((), ["window", "depth", "ba"]),
                                                 (("slam.ba_iterations=0",), ["window", "depth"]),
                                                 (("motion.flow_source=learned",), ["window", "depth"])])
def test_bundle_adjustment_runs_once_per_keyframe_after_the_depth_module(seq, model, monkeypatch, overrides,
                                                                         expected):
    """Each new keyframe: window optimisation, depth module, then the bundle adjustment (DIS flow
    only: its targets are DIS flow); `slam.ba_iterations=0` turns it off."""
    calls: list[str] = []
    for name, label in (("_optimise_window", "window"), ("_refine_depth", "depth"), ("_bundle_adjust", "ba")):
        orig = getattr(SlamSystem, name)

        def wrapped(self, *args, _orig=orig, _label=label, _calls=calls):
            _calls.append(_label)
            return _orig(self, *args)

        monkeypatch.setattr(SlamSystem, name, wrapped)
    system = SlamSystem(model, _cfg("slam.keyframe_flow=6", *overrides), seq.intrinsics, (H, W))
    for f in np.asarray(seq.images)[::2][:10]:
        system.add_frame(np.ascontiguousarray(f))
    added = len(system.keyframes) - 1  # keyframes after initialisation
    assert added >= 2
    assert calls == expected * added, calls

"""The SLAM system (`slam.system.SlamSystem`, its tracker and mapper) on small rendered sequences.

Sizes are 96x128 (a few seconds per run); the accuracy at the shipped weights' size, 240x320, is
covered by the demo test (tests/test_demo.py) and measured by bench/slam.py.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from slam.keyframe_depth import KeyframeDepth, fuse_depths, scale_to
from slam.mapper import Mapper
from slam.system import SlamSystem
from slam.tracker import Tracker
from slam.worker import MappingError
from v2d.config import load_config
from v2d.data.synthetic import render_sequence
from v2d.errors import ConfigError, ShapeError, V2DError
from v2d.geometry.lie import se3_inv, se3_mul
from v2d.metrics import trajectory_ate
from v2d.model import SHIPPED_WEIGHTS, load_model

H, W = 96, 128
pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason=f"shipped weights missing: {SHIPPED_WEIGHTS}")


def _cfg(*overrides: str):
    """Synchronous mode unless overridden: results identical run to run."""
    return load_config(None, ["slam.concurrent=false", *overrides], root=RunConfig)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=2, num_frames=49, height=H, width=W)


@pytest.fixture(scope="module")
def model():
    return load_model(_cfg())


def _run(model, cfg, frames, intrinsics, calibrated=True, on_keyframe=None):
    with SlamSystem(model, cfg, intrinsics, (H, W), calibrated=calibrated, on_keyframe=on_keyframe) as system:
        for f in frames:
            system.add_frame(np.ascontiguousarray(f))
        return system, system.finish()


def test_tracks_a_rendered_sequence_with_keyframes(seq, model):
    frames = np.asarray(seq.images)[::2]
    finals = []
    system, res = _run(model, _cfg(), frames, seq.intrinsics, on_keyframe=lambda f, d, p, im, n: finals.append((f, d)))
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
    assert all(k.image is None for k in system.map.keyframes())
    assert len(system.map.images()) <= system.sc.buffer_frames
    assert len(system.flows) == 0  # every flow was dropped with its keyframes


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
            m = system.map
            full_images.append(sum(k.image is not None for k in m.keyframes()))
            assert len(m.window()) <= 2 and len(m.images()) <= 4
            # flows held: between window keyframes, or of frames tracked since the newest keyframe
            window_frames = {m.keyframe(k).frame for k in m.window()}
            newest = max(window_frames)
            assert all((a in window_frames and b in window_frames) or max(a, b) > newest
                       for a, b in system.flows.pairs())
            assert m.edges() <= {(a, b) for a in m.window() for b in m.window()}
    assert max(full_images) <= 2
    assert system.map.num_keyframes() > 4


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


def test_lost_frames_are_bridged_once_tracking_recovers(seq, model):
    frames = list(np.asarray(seq.images)[:20])
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(3)]
    frames[12:15] = noise  # three frames of another "scene"
    _, res = _run(model, _cfg(), frames, seq.intrinsics)
    assert [f for f, s in enumerate(res.frames) if s.interpolated] == [12, 13, 14]
    assert not any(s.lost for s in res.frames)  # recovered against the last good keyframe, the gap bridged
    # the bridged poses lie between their tracked neighbours (interpolated when frame 15 was tracked;
    # the window may refine 11 and 15 a little afterwards)
    c = se3_inv(res.poses_cw)[:, :3]
    gap = float((c[15] - c[11]).norm())
    assert float((c[13] - (c[11] + c[15]) / 2).norm()) < 0.25 * gap + 1e-3
    assert torch.isfinite(res.poses_cw).all()
    assert any("interpolated" in w for w in res.warnings)


def test_long_loss_restarts(seq, model):
    frames = list(np.asarray(seq.images)[:10])
    rng = np.random.default_rng(1)
    frames += [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(6)]
    _, res = _run(model, _cfg("slam.relocalise_after=3"), frames, seq.intrinsics)
    assert res.restarts >= 1
    assert torch.isfinite(res.poses_cw).all()


def test_a_frame_s_features_are_extracted_once(seq, model, monkeypatch):
    """A lost frame's features (extracted to register it) serve again when it starts a new segment
    or becomes a keyframe: no frame is extracted twice."""
    from slam.relocaliser import KeyframeIndex

    seen: list[bytes] = []
    extract = KeyframeIndex.features

    def counted(self, image):
        seen.append(image.tobytes())
        return extract(self, image)

    monkeypatch.setattr(KeyframeIndex, "features", counted)
    frames = list(np.asarray(seq.images)[:10])
    rng = np.random.default_rng(1)
    frames += [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(6)]
    _, res = _run(model, _cfg("slam.relocalise_after=3"), frames, seq.intrinsics)
    assert res.restarts >= 1 and len(seen) >= 3
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} frames extracted twice"


def test_uncalibrated_refines_focal(seq, model):
    start = torch.tensor([1.2 * W, 1.2 * W, (W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
    _, res = _run(model, _cfg(), np.asarray(seq.images)[::2][:16], start, calibrated=False)
    assert torch.isfinite(res.intrinsics).all()
    assert res.intrinsics[0] != start[0]  # the focal length was optimised
    true_f = float(seq.intrinsics[0])
    assert abs(res.intrinsics[0] - true_f) < abs(start[0] - true_f)


def test_learned_flow_source_starts_exactly_where_the_dis_mode_is(seq, model):
    """An untrained learned update (its last layer zero, as training starts) gives the DIS mode's
    trajectory bit for bit; the shipped, trained one gives a different, finite one."""
    frames = np.asarray(seq.images)[:16]
    _, dis = _run(model, _cfg(), frames, seq.intrinsics)
    cfg = _cfg("motion.flow_source=learned")
    trained = load_model(cfg)
    untrained = load_model(cfg)
    with torch.no_grad():
        untrained.motion.refiner.head.weight.zero_()
        untrained.motion.refiner.head.bias.zero_()
    _, same = _run(untrained, cfg, frames, seq.intrinsics)
    assert torch.equal(same.poses_cw, dis.poses_cw)
    _, learned = _run(trained, cfg, frames, seq.intrinsics)
    assert learned.poses_cw.shape == (16, 7) and torch.isfinite(learned.poses_cw).all()


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


def test_depth_fusion_averages_agreeing_estimates_in_inverse_depth():
    depth = torch.full((H, W), 2.0)
    near = torch.zeros(H, W)
    near[:, : W // 2] = 2.5  # agrees within 50 % on the left half, nothing landed on the right
    far = torch.full((H, W), 4.0)  # disagrees everywhere (an occluder or a wrong estimate)
    fused = fuse_depths(depth, [near, far], 0.5)
    assert torch.allclose(fused[:, : W // 2], torch.tensor(2 / (1 / 2.0 + 1 / 2.5)))
    assert torch.allclose(fused[:, W // 2 :], depth[:, W // 2 :])
    assert scale_to([near], depth) == pytest.approx(1.25)
    assert scale_to([], depth) == 1.0


def _window_at_truth(seq, model, *overrides: str) -> tuple[SlamSystem, torch.Tensor, torch.Tensor]:
    """A system with a window of >= 3 keyframes, their poses set to the truth (world = frame 0).

    Returns the system, the true poses (K, 7) and the true depths (K, H, W) of the window keyframes.
    """
    system = SlamSystem(model, _cfg("slam.window=4", "slam.keyframe_flow=6", *overrides), seq.intrinsics, (H, W))
    for f in np.asarray(seq.images)[::2][:14]:
        system.add_frame(np.ascontiguousarray(f))
    m = system.map
    assert len(m.window()) >= 3
    gt_cw = torch.as_tensor(np.asarray(seq.poses_cw), dtype=torch.float64)[::2]
    gt_depth = torch.as_tensor(np.asarray(seq.depths), dtype=torch.float32)[::2]
    poses, depths = [], []
    for k in m.window():
        frame = m.keyframe(k).frame
        pose = se3_mul(gt_cw[frame], se3_inv(gt_cw[0]))
        m.update_keyframe(k, pose_cw=pose, depth=gt_depth[frame], prior=gt_depth[frame],
                          valid=torch.ones(H, W, dtype=torch.bool))
        poses.append(pose)
        depths.append(gt_depth[frame])
    system.flows.drop(lambda f: False)
    return system, torch.stack(poses), torch.stack(depths)


def _translation_errors(system: SlamSystem, truth: torch.Tensor) -> torch.Tensor:
    got = torch.stack([k.pose_cw for k in system.map.keyframes(system.map.window())])
    return (got[:, :3] - truth[:, :3]).norm(dim=-1)


def _set_window_depths(system: SlamSystem, depths, priors) -> None:
    for k, d, p in zip(system.map.window(), depths, priors, strict=True):
        system.map.update_keyframe(k, depth=d, prior=p)


def test_bundle_adjustment_moves_window_depths_towards_the_truth(seq, model):
    """From true poses, each window keyframe's wrong depth is pulled to what the flow triangulates
    (up to the window's scale, which only the prior holds), and the poses stay near the truth (DIS
    flow at 96x128 leaves ~0.01, 4 % of the baseline, even when started there)."""
    system, truth, gt = _window_at_truth(seq, model, "slam.ba_iterations=5", "slam.ba_prior=0.5")
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    wrong = 1.0 + 0.45 * torch.sin(u / 9.0) * torch.cos(v / 7.0)  # a smooth shape error of up to 45 %
    _set_window_depths(system, [g * wrong for g in gt], [g * wrong for g in gt])
    system.mapper.bundle_adjust()
    before, after = [], []
    for kf, g in zip(system.map.keyframes(system.map.window()), gt, strict=True):
        assert torch.isfinite(kf.depth).all() and kf.depth.shape == (H, W)
        before.append(float(((g * wrong - g).abs() / g).median()))
        scaled = kf.depth * (g / kf.depth).median()
        after.append(float(((scaled - g).abs() / g).median()))
    assert np.mean(after) < 0.4 * np.mean(before), (before, after)
    err = _translation_errors(system, truth)
    assert float(err[0]) == 0.0 and float(err.max()) < 0.03, err  # the oldest is fixed (gauge)
    # the prior is the keyframe's `prior`, not its current depth: a tight prior wins over the flow
    tight_cfg = _cfg("slam.window=4", "slam.ba_iterations=5", "slam.ba_prior=1e-3")
    tight = Mapper(model, tight_cfg, system.map, system.flows, (H, W), True, system.device)
    _set_window_depths(system, [g * wrong for g in gt], [g * 1.1 for g in gt])
    tight.bundle_adjust()
    for kf in system.map.keyframes(system.map.window()):
        s = tight.sc.ba_stride  # exact on the adjusted pixels; between them the change is interpolated
        torch.testing.assert_close(kf.depth[::s, ::s], kf.prior[::s, ::s], rtol=2e-3, atol=0)


def test_bundle_adjustment_recovers_perturbed_poses(seq, model):
    """With the true depth as the prior, the window's free poses reach the same solution from the
    truth and from a start 0.054 away (near the truth: DIS flow at 96x128 is not exact)."""
    got = []
    for scale in (0.0, 1.0):
        system, truth, _ = _window_at_truth(seq, model)
        kick = scale * torch.tensor([0.04, -0.03, 0.02, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        for k in system.map.window()[1:]:  # the oldest is fixed
            system.map.update_keyframe(k, pose_cw=system.map.keyframe(k).pose_cw + kick)
        system.mapper.bundle_adjust()
        err = _translation_errors(system, truth)
        assert float(err[0]) == 0.0 and float(err.max()) < 0.03, (scale, err)
        got.append(torch.stack([k.pose_cw for k in system.map.keyframes(system.map.window())]))
    assert float((got[1][:, :3] - got[0][:, :3]).norm(dim=-1).max()) < 1e-3, got


def test_far_window_pairs_that_overlap_are_adjusted_with_guided_flow(seq, model):
    """With no pair within `edge_max_flow`, the keyframe pairs that still overlap are edges whose DIS
    is searched around the predicted flow: a keyframe moved 4 cm off comes back more than half way
    (measured 1.7 cm left after the window's 2 steps; the test above allows 3 cm with unguided flow)."""
    system, truth, _ = _window_at_truth(seq, model, "slam.edge_max_flow=1e-6")
    last = system.map.window()[-1]
    system.map.update_keyframe(last, pose_cw=truth[-1] + torch.tensor([0.04, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    system.mapper.bundle_adjust()
    assert float((system.map.keyframe(last).pose_cw[:3] - truth[-1][:3]).norm()) < 0.02
    assert len(system.flows) > 0 and system.flows.flows_computed > 0


def test_bundle_adjustment_leaves_the_window_when_no_pair_passes_the_flow_gate(seq, model):
    # no pair within edge_max_flow, and none overlaps enough for a guided edge
    system, truth, gt = _window_at_truth(seq, model, "slam.edge_max_flow=1e-6", "slam.global_ba_overlap=1")
    kick = torch.tensor([0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    last = system.map.window()[-1]
    system.map.update_keyframe(last, pose_cw=truth[-1] + kick)
    system.mapper.bundle_adjust()
    assert torch.equal(system.map.keyframe(last).pose_cw, truth[-1] + kick)
    assert all(torch.equal(kf.depth, g) for kf, g in zip(system.map.keyframes(system.map.window()), gt, strict=True))
    assert len(system.flows) == 0  # no flow computed for pairs that were left out


@pytest.mark.parametrize("overrides, expected", [((), ["window", "depth", "ba"]),
                                                 (("slam.ba_iterations=0",), ["window", "depth"]),
                                                 (("motion.flow_source=learned",), ["window", "depth", "ba"])])
def test_bundle_adjustment_runs_once_per_keyframe_after_the_depth_module(seq, model, monkeypatch, overrides,
                                                                         expected):
    """Each new keyframe: window optimisation, depth module, then the bundle adjustment (with either
    flow source: its targets are DIS flow); `slam.ba_iterations=0` turns it off."""
    calls: list[str] = []
    for cls, name, label in ((Mapper, "optimise_window", "window"), (KeyframeDepth, "compute", "depth"),
                             (Mapper, "bundle_adjust", "ba")):
        orig = getattr(cls, name)

        def wrapped(self, *args, _orig=orig, _label=label, _calls=calls):
            _calls.append(_label)
            return _orig(self, *args)

        monkeypatch.setattr(cls, name, wrapped)
    system = SlamSystem(model, _cfg("slam.keyframe_flow=6", *overrides), seq.intrinsics, (H, W))
    for f in np.asarray(seq.images)[::2][:10]:
        system.add_frame(np.ascontiguousarray(f))
    added = system.map.num_keyframes() - 1  # keyframes after initialisation
    assert added >= 2
    assert calls == expected * added, calls


# --------------------------------------------------------------------------------------------------
# modes, threads, failures, devices


def _mapper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "v2d-mapper"]


def test_synchronous_mode_is_reproducible(seq, model):
    frames = np.asarray(seq.images)[::2][:12]
    runs = []
    for _ in range(2):
        depths: list[np.ndarray] = []
        _, res = _run(model, _cfg("slam.keyframe_flow=6"), frames, seq.intrinsics,
                      on_keyframe=lambda f, d, p, im, n, _d=depths: _d.append(d))
        runs.append((res, depths))
    (a, da), (b, db) = runs
    assert len(a.keyframe_frames) >= 3
    assert torch.equal(a.poses_cw, b.poses_cw) and a.keyframe_frames == b.keyframe_frames
    assert all(np.array_equal(x, y) for x, y in zip(da, db, strict=True))


def test_concurrent_mode_tracks_in_a_background_thread(seq, model, monkeypatch):
    """The mapper runs in its own thread; a slow mapper gets the keyframes queued meanwhile as one
    batch, and every keyframe still gets its own depth, once."""
    frames = np.asarray(seq.images)[::2]
    threads_before = torch.get_num_threads()
    mapped_in: set[str] = set()
    batches: list[int] = []
    depths: list[int] = []
    orig, orig_depth = Mapper.map_keyframes, KeyframeDepth.compute

    def spy(self, jobs):
        mapped_in.add(threading.current_thread().name)
        batches.append(len(jobs))
        time.sleep(0.5)  # slower than tracking: keyframes queue up
        return orig(self, jobs)

    def depth_spy(self, kid, images):
        depths.append(kid)
        return orig_depth(self, kid, images)

    monkeypatch.setattr(Mapper, "map_keyframes", spy)
    monkeypatch.setattr(KeyframeDepth, "compute", depth_spy)
    system, res = _run(model, _cfg("slam.concurrent=true", "slam.keyframe_flow=6"), frames, seq.intrinsics)
    assert mapped_in == {"v2d-mapper"}
    assert max(batches) > 1  # a batch of keyframes queued while the mapper was busy
    assert sorted(depths) == list(range(1, len(res.keyframe_frames)))  # each keyframe's depth, once
    assert len(res.keyframe_frames) >= 3 and torch.isfinite(res.poses_cw).all()
    n = len(frames)
    ts = np.arange(n, dtype=np.float64)
    ate = trajectory_ate(ts, se3_inv(res.poses_cw).numpy(), ts, se3_inv(seq.poses_cw[::2]).numpy())
    assert ate["ate_rmse"] < 0.03 * ate["path_length"], ate
    assert not _mapper_threads() and torch.get_num_threads() == threads_before


def test_mapper_failure_stops_the_run_with_one_error(seq, model, monkeypatch):
    def broken(self, jobs):
        raise RuntimeError("cost volume exploded")

    monkeypatch.setattr(Mapper, "map_keyframes", broken)
    threads_before = torch.get_num_threads()
    with pytest.raises(MappingError, match="mapping failed: RuntimeError: cost volume exploded"):
        _run(model, _cfg("slam.concurrent=true", "slam.keyframe_flow=6"), np.asarray(seq.images)[::2],
             seq.intrinsics)
    assert not _mapper_threads() and torch.get_num_threads() == threads_before


def test_interrupt_stops_tracker_and_mapper(seq, model, monkeypatch):
    """Ctrl-C arrives in the tracking thread while the mapper works: both stop, no thread is left."""
    orig_map, orig_track = Mapper.map_keyframes, Tracker.track
    mapping = threading.Event()

    def slow_map(self, jobs):
        mapping.set()
        time.sleep(0.3)
        return orig_map(self, jobs)

    def track(self, f, *args):
        if mapping.is_set() and f >= 12:
            raise KeyboardInterrupt
        return orig_track(self, f, *args)

    monkeypatch.setattr(Mapper, "map_keyframes", slow_map)
    monkeypatch.setattr(Tracker, "track", track)
    with pytest.raises(KeyboardInterrupt):
        _run(model, _cfg("slam.concurrent=true", "slam.keyframe_flow=6"), np.asarray(seq.images)[::2],
             seq.intrinsics)
    assert mapping.is_set() and not _mapper_threads()


def test_global_motion_mode_is_refused(seq, model):
    with pytest.raises(ConfigError, match="motion.mode"):
        SlamSystem(model, _cfg("motion.mode=global"), seq.intrinsics, (H, W))


def test_every_tensor_follows_the_configured_device(seq, model):
    """With PyTorch's default device set to "meta", a tensor created without an explicit device
    lands there and fails (or shows) at once; the engine must run entirely on the device it was
    given (CPU here; the same plumbing places it on "cuda")."""
    frames = np.asarray(seq.images)[::2][:12]
    with torch.device("meta"):
        system, res = _run(model, _cfg("slam.keyframe_flow=6"), frames, seq.intrinsics)
    assert len(res.keyframe_frames) >= 3
    cpu = torch.device("cpu")
    assert res.poses_cw.device == cpu and res.intrinsics.device == cpu and res.keyframe_poses_cw.device == cpu
    assert all(s.rel_cw.device == cpu for s in res.frames)
    assert all(k.pose_cw.device == cpu for k in system.map.keyframes())


def test_temporal_fusion_and_normals_in_the_engine(seq, model):
    from v2d.checkpoint import load_weights
    from v2d.model import V2D

    cfg = _cfg("depth.temporal_fusion=true", "depth.normals=true")
    parts = V2D.from_config(cfg)
    load_weights(SHIPPED_WEIGHTS, parts, fine_tune=True)  # the update starts at zero, the normal head untrained
    parts.eval()
    frames = np.asarray(seq.images)[::2][:16]
    finals = []
    _, res = _run(parts, cfg, frames, seq.intrinsics, on_keyframe=lambda f, d, p, im, n: finals.append(n))
    _, ref = _run(model, _cfg(), frames, seq.intrinsics)
    # At initialisation neither part changes a pose or a depth; every keyframe gets unit normals.
    assert torch.equal(res.poses_cw, ref.poses_cw)
    assert len(finals) == len(res.keyframe_frames) >= 3
    for n in finals:
        assert n is not None and n.shape == (H, W, 3)
        np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-4)
    assert all(n is not None and n.shape == d.shape + (3,) for n, d in zip(res.cloud_normals, res.cloud_depths,
                                                                            strict=True))
    # The state is handed from keyframe to keyframe: a non-zero update changes the depth, hence the poses.
    with torch.no_grad():
        parts.depth.temporal.update.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    _, moved = _run(parts, cfg, frames, seq.intrinsics)
    assert not torch.equal(moved.poses_cw, ref.poses_cw)


def test_the_window_adjustment_fits_its_keyframes_tracks(seq, model, monkeypatch):
    """With `slam.window_tracks`, the window's keyframes' verified feature matches join its bundle
    adjustment as tracks (in network pixels, weighing `slam.track_weight` times the flow targets), and
    the free poses still come back from a perturbed start. (XFeat: ORB at 96x128 finds fewer than
    the 15 verified matches a pair needs.)"""
    features = "xfeat"
    import slam.mapper as mapper_module

    seen = []
    solve = mapper_module.bundle_adjust

    def spy(poses, inv, intr, ii, jj, targets, weights, *args):
        s = args[-2].stride  # the options' pixel stride
        seen.append((args[-1], float(weights[:, ::s, ::s].double().sum())))
        return solve(poses, inv, intr, ii, jj, targets, weights, *args)

    monkeypatch.setattr(mapper_module, "bundle_adjust", spy)
    system, truth, _ = _window_at_truth(seq, model, "slam.window_tracks=true", f"slam.features={features}")
    kick = torch.tensor([0.04, -0.03, 0.02, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for k in system.map.window()[1:]:
        system.map.update_keyframe(k, pose_cw=system.map.keyframe(k).pose_cw + kick)
    seen.clear()
    system.mapper.bundle_adjust()
    (tracks, dense), = seen
    assert tracks is not None and len(tracks) >= 20, features
    assert set(tracks.anchor.tolist()) | set(tracks.node.tolist()) <= set(range(len(system.map.window())))
    share = system.sc.track_weight * dense * min(1.0, tracks.track.numel() / 100)  # a full share from 100 on
    assert float(tracks.weight.sum()) == pytest.approx(share, rel=1e-6)
    err = _translation_errors(system, truth)
    assert float(err[0]) == 0.0 and float(err.max()) < 0.03, err
    system.close()

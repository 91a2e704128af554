"""The backend (`slam.backend.GlobalBA`): drift and loops corrected, the guard, frames following their
keyframes, the run's outputs corrected consistently, and its configuration.

The unit tests build a finished map by hand from a rendered sequence (120x160, the keyframes' small
copies at stride 1) whose keyframe poses carry an accumulated drift; the end-to-end tests run
`v2d run` on a small rendered image folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import slam.backend as backend
from slam.backend import GlobalBA, upsample_ratio
from slam.config import RunConfig
from slam.map import FrameState, Keyframe, Map
from slam.tracks import PairMatcher
from tools.cli import main
from v2d.config import load_config
from v2d.data.synthetic import render_sequence
from v2d.errors import ConfigError, V2DError
from v2d.geometry.lie import se3_exp, se3_identity, se3_inv, se3_mul
from v2d.geometry.window_ba import BAResult
from v2d.metrics import trajectory_ate
from v2d.model import SHIPPED_WEIGHTS

H, W = 120, 160
DRIFT = list(range(0, 48, 3))  # 16 keyframes along the path
LOOP = list(range(0, 48, 4)) + list(range(46, 0, -4)) + [1]  # 25 keyframes out and back to the start
_STEP_ERROR = torch.tensor([0.004, -0.003, 0.002, 0.004, 0.006, -0.003], dtype=torch.float64)  # per keyframe


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=3, num_frames=48, height=H, width=W, fps=10)


def _cfg(*overrides: str) -> RunConfig:
    return load_config(None, ["slam.cloud_stride=1", *overrides], root=RunConfig)


def _drifted(gt: torch.Tensor, scale_step: float, step_error: bool) -> tuple[torch.Tensor, list[float]]:
    """Chain the true relative poses with each translation scaled by a growing factor (scale drift)
    and, with `step_error`, a constant small rotation + translation error per step. Returns the
    drifted poses (K, 7) and each keyframe's accumulated scale."""
    poses, scales = [gt[0]], [1.0]
    for k in range(1, len(gt)):
        rel = se3_mul(gt[k], se3_inv(gt[k - 1])).clone()
        scales.append(scales[-1] * scale_step)
        rel[:3] *= scales[-1]
        if step_error:
            rel = se3_mul(se3_exp(_STEP_ERROR), rel)
        poses.append(se3_mul(rel, poses[-1]))
    return torch.stack(poses), scales


def _map(seq, frames: list[int], poses: torch.Tensor, depth_scales: list[float] | None = None,
         between: int = 0, retire: bool = True, stride: int = 1) -> Map:
    """A finished map: keyframes at `frames` with the given poses and the rendered depth (times
    `depth_scales`), retired at `stride` (with `retire`); with `between`, that many frames after each
    keyframe, tracked against it (their pose relative to it is the true one)."""
    m = Map(seq.intrinsics, torch.device("cpu"))
    ident = se3_identity(dtype=torch.float64)
    for k, f in enumerate(frames):
        depth = torch.from_numpy(seq.depths[f] * (depth_scales[k] if depth_scales else 1.0))
        m.add_frame(FrameState(keyframe=max(k - 1, 0), rel_cw=ident), seq.images[f])
        m.add_keyframe(Keyframe(frame=m.num_frames() - 1, pose_cw=poses[k], image=seq.images[f], depth=depth,
                                valid=torch.ones(H, W, dtype=torch.bool)), m.num_frames() - 1)
        for g in range(f + 1, f + 1 + between):
            m.add_frame(FrameState(keyframe=k, rel_cw=se3_mul(seq.poses_cw[g], se3_inv(seq.poses_cw[f]))),
                        seq.images[g])
        if retire:
            m.retire(k, stride)
    return m


def _ate(m: Map, gt: torch.Tensor) -> float:
    t = np.arange(len(gt), dtype=np.float64)
    est = torch.stack([k.pose_cw for k in m.keyframes()])
    return trajectory_ate(t, se3_inv(est).numpy(), t, se3_inv(gt).numpy(), align="sim3")["ate_rmse"]


def test_drift_is_corrected(seq):
    """Rotation, translation and scale drift (7.5 cm keyframe ATE over a 1 m path) against the true
    depth: the temporal edges pull the chain back (measured 9.6x lower)."""
    gt = seq.poses_cw[DRIFT]
    drifted, _ = _drifted(gt, 1.04, step_error=True)
    m = _map(seq, DRIFT, drifted)
    before = _ate(m, gt)
    report = GlobalBA(_cfg(), torch.device("cpu")).run(m)
    after = _ate(m, gt)
    assert report.kept and report.reason == "", report
    assert report.keyframes == len(DRIFT) and report.temporal_edges >= 2 * (len(DRIFT) - 1)  # every neighbour
    assert report.edges == report.temporal_edges + report.proximity_edges + report.loop_edges
    assert report.residual_after_px < report.residual_before_px
    assert after < before / 4, (before, after)
    assert torch.equal(m.keyframe(0).pose_cw, drifted[0])  # the gauge
    for k, kf in enumerate(m.keyframes()):  # the depth stays near the truth (it was right)
        assert kf.small_depth.shape == (H, W) and np.isfinite(kf.small_depth).all()
        rel = np.abs(kf.small_depth - seq.depths[DRIFT[k]]) / seq.depths[DRIFT[k]]
        assert np.median(rel) < 0.05, (k, np.median(rel))
        np.testing.assert_allclose(kf.small_depth * report.depth_ratio[k], seq.depths[DRIFT[k]], rtol=1e-5)


def test_a_loop_edge_closes_scale_drift(seq):
    """Out and back to the start with 3 % scale drift per keyframe (depth drifting with it, so each
    neighbouring pair agrees and only the revisit shows the error). Without proximity edges, the
    recorded loop between the first and the last keyframe makes the ATE clearly lower than without
    it; with them (the default), the revisit is found by predicted overlap even with no loop
    recorded (measured, keyframe ATE m: 0.236 drifted; 0.109 / 0.047 no proximity edges, without /
    with the loop; 0.005 with proximity edges)."""
    gt = seq.poses_cw[LOOP]
    drifted, scales = _drifted(gt, 1.03, step_error=False)
    results = {}
    for loop in (False, True):
        m = _map(seq, LOOP, drifted, depth_scales=scales)
        if loop:
            m.add_loop(len(LOOP) - 1, 0)
            assert m.loops() == {(0, len(LOOP) - 1)}
        before = _ate(m, gt)
        report = GlobalBA(_cfg("slam.global_ba_edges=0"), torch.device("cpu")).run(m)
        assert report.kept and report.loop_edges == (2 if loop else 0) and report.proximity_edges == 0, report
        results[loop] = _ate(m, gt)
    assert results[True] < 0.6 * results[False] and results[True] < before / 3, (before, results)
    m = _map(seq, LOOP, drifted, depth_scales=scales)
    report = GlobalBA(_cfg(), torch.device("cpu")).run(m)
    assert report.kept and report.proximity_edges > 0 and report.loop_edges == 0, report
    assert _ate(m, gt) < before / 10, (before, _ate(m, gt))


def test_add_loop_checks_its_keyframes(seq):
    m = _map(seq, DRIFT[:3], seq.poses_cw[DRIFT[:3]])
    m.add_loop(2, 0)
    m.add_loop(0, 2)
    assert m.loops() == {(0, 2)}
    for a, b in ((1, 1), (0, 3), (-1, 2)):
        with pytest.raises(V2DError, match=rf"\({a}, {b}\)"):
            m.add_loop(a, b)


@pytest.mark.parametrize("failure", ["nan", "worse", "singular"])
def test_the_guard_keeps_the_previous_estimate(seq, monkeypatch, caplog, failure):
    """A solver that returns non-finite values, a worse solution or fails on a singular system
    changes nothing in the map."""
    def broken(poses, inv, *args, **kwargs):
        none = torch.zeros(0, dtype=torch.float64)
        if failure == "singular":
            raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")
        if failure == "nan":
            return BAResult(torch.full_like(poses, float("nan")), inv, none)
        bad = poses.clone()
        bad[1:, :3] += 0.3  # every free keyframe 30 cm off
        return BAResult(bad, inv, none)

    monkeypatch.setattr(backend, "bundle_adjust", broken)
    gt = seq.poses_cw[DRIFT]
    drifted, _ = _drifted(gt, 1.04, step_error=True)
    m = _map(seq, DRIFT, drifted)
    depths = [k.small_depth.copy() for k in m.keyframes()]
    warnings: list[str] = []
    report = GlobalBA(_cfg(), torch.device("cpu"), warnings.append).run(m)
    assert not report.kept and report.depth_ratio == {}
    assert report.reason == {"nan": "non-finite values", "worse": "the robust residual grew",
                             "singular": "the solver failed (linalg.cholesky: The factorization could not be "
                                         "completed)"}[failure]
    assert warnings == [f"global bundle adjustment: {report.reason}; kept the previous estimate"]
    if failure == "worse":
        assert report.residual_after_px > report.residual_before_px
    assert torch.equal(torch.stack([k.pose_cw for k in m.keyframes()]), drifted)
    assert all(np.array_equal(k.small_depth, d) for k, d in zip(m.keyframes(), depths, strict=True))


def test_frames_follow_their_keyframes(seq):
    gt = seq.poses_cw[DRIFT]
    drifted, _ = _drifted(gt, 1.04, step_error=True)
    m = _map(seq, DRIFT, drifted, between=2)
    kf_of = [s.keyframe for s in m.frames()]
    rel = [s.rel_cw.clone() for s in m.frames()]
    before = m.frame_poses()
    GlobalBA(_cfg(), torch.device("cpu")).run(m)
    after = m.frame_poses()
    for f, st in enumerate(m.frames()):
        assert st.keyframe == kf_of[f] and torch.equal(st.rel_cw, rel[f])
        torch.testing.assert_close(after[f], se3_mul(rel[f], m.keyframe(kf_of[f]).pose_cw))
    moved = (after[:, :3] - before[:, :3]).norm(dim=-1)
    assert float(moved[0]) == 0.0 and float(moved[-1]) > 0.05  # the first keyframe is the gauge


def test_knobs_are_honoured(seq, monkeypatch):
    """Iterations, temporal neighbours, proximity edges per keyframe and overlap, and the depth stride."""
    calls: list[tuple] = []
    solve = backend.bundle_adjust

    def spy(poses, inv, intr, ii, jj, *args, **kwargs):
        calls.append((tuple(inv.shape), ii.tolist(), jj.tolist()))
        return solve(poses, inv, intr, ii, jj, *args, **kwargs)

    monkeypatch.setattr(backend, "bundle_adjust", spy)
    gt = seq.poses_cw[LOOP]
    K = len(LOOP)

    def run(*overrides: str):
        calls.clear()
        return GlobalBA(_cfg(*overrides), torch.device("cpu")).run(_map(seq, LOOP, gt))

    report = run("slam.global_ba_iterations=3", "slam.global_ba_neighbours=1", "slam.global_ba_edges=1")
    assert len(calls) == 3 and report.iterations == 3
    shape, ii, jj = calls[0]
    assert shape == (K, H // 2, W // 2)  # default depth stride 2
    pairs = {(min(a, b), max(a, b)) for a, b in zip(ii, jj, strict=True)}
    assert {(k, k + 1) for k in range(K - 1)} <= pairs and report.temporal_edges == 2 * (K - 1)
    proximity = pairs - {(k, k + 1) for k in range(K - 1)}
    assert report.proximity_edges == 2 * len(proximity) > 0
    assert max(sum(k in p for p in proximity) for k in range(K)) == 1  # at most one per keyframe
    report = run("slam.global_ba_neighbours=3", "slam.global_ba_edges=0", "slam.global_ba_stride=1")
    assert calls[0][0] == (K, H, W) and report.proximity_edges == 0
    gaps = [abs(a - b) for a, b in zip(calls[0][1], calls[0][2], strict=True)]
    assert max(gaps) <= 3 and 2 in gaps and report.temporal_edges == report.edges == len(gaps) > 2 * (K - 1)
    assert run("slam.global_ba_overlap=1.0").proximity_edges == 0


@pytest.mark.parametrize("override", ["slam.global_ba_iterations=0", "slam.global_ba_neighbours=0",
                                      "slam.global_ba_overlap=1.5", "slam.global_ba_overlap=-0.1",
                                      "slam.global_ba_edges=-1", "slam.global_ba_stride=0", "slam.global_ba=maybe",
                                      "slam.track_span=0", "slam.track_weight=-1", "slam.track_threshold=0",
                                      "slam.tracks=sometimes"])
def test_config_keys_are_checked(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override], root=RunConfig)


def test_upsample_ratio_interpolates_between_the_samples():
    ratio = np.array([[1.0, 3.0], [5.0, 7.0]], np.float32)
    up = upsample_ratio(ratio, 2, (4, 5))
    np.testing.assert_allclose(up[::2, :4:2], ratio)  # exact on the samples
    np.testing.assert_allclose(up[0, :], [1, 2, 3, 3, 3])  # between them linear, beyond the last constant
    np.testing.assert_allclose(up[:, 1], [2, 4, 6, 6])


def test_a_map_still_in_the_window_is_refused(seq):
    m = Map(seq.intrinsics, torch.device("cpu"))
    m.add_frame(FrameState(keyframe=0, rel_cw=se3_identity(dtype=torch.float64)), seq.images[0])
    m.add_keyframe(Keyframe(frame=0, pose_cw=se3_identity(dtype=torch.float64), image=seq.images[0],
                            depth=torch.ones(H, W), valid=torch.ones(H, W, dtype=torch.bool)), 0)
    with pytest.raises(V2DError, match="retired"):
        GlobalBA(_cfg(), torch.device("cpu")).run(m)


# ------------------------------------------------------------------------------------ end to end
RH, RW = 96, 128
needs_weights = pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason=f"shipped weights missing: {SHIPPED_WEIGHTS}")


def _folder(path: Path, seq) -> Path:
    path.mkdir(parents=True)
    for i, im in enumerate(seq.images):
        cv2.imwrite(str(path / f"{i:04d}.png"), np.ascontiguousarray(im[..., ::-1]))
    (path / "intrinsics.txt").write_text(" ".join(f"{v:.6f}" for v in seq.intrinsics.tolist()))
    return path


@needs_weights
def test_run_corrects_the_written_depth_and_reports_it(tmp_path, monkeypatch, caplog):
    """`v2d run` ends with the global BA: summary.json reports it, each keyframe's depth file is the
    depth written without it divided by the upsampled ratio (npy and png), the trajectory moved; and
    `--no-global-ba` skips it (the engine is synchronous, so both runs are identical before it)."""
    seq = render_sequence(seed=4, num_frames=24, height=RH, width=RW)
    src = _folder(tmp_path / "imgs", seq)
    reports, small = [], []
    run = GlobalBA.run

    def keep(self, m):
        reports.append(run(self, m))
        small.extend(k.small_depth for k in m.keyframes())
        return reports[-1]

    monkeypatch.setattr(GlobalBA, "run", keep)
    outs = {}
    for name, extra in (("on", []), ("off", ["--no-global-ba"])):
        outs[name] = tmp_path / name
        args = ["run", str(src), "--out", str(outs[name]), "--resize", f"{RH}x{RW}", "-q", *extra]
        with caplog.at_level(logging.WARNING):
            assert main(args) == 0
    assert len(reports) == 1  # not run with --no-global-ba
    on = json.loads((outs["on"] / "summary.json").read_text())
    off = json.loads((outs["off"] / "summary.json").read_text())
    assert off["global_ba"] == {"enabled": False} and off["config"]["slam"]["global_ba"] is False
    gba = on["global_ba"]
    for key in ("enabled", "seconds", "keyframes", "edges", "loop_edges", "iterations", "residual_before_px",
                "residual_after_px", "kept"):
        assert key in gba, key
    assert gba["enabled"] and gba["kept"] and gba["keyframes"] == on["keyframes"] == off["keyframes"] >= 3
    assert gba["residual_after_px"] < gba["residual_before_px"] and gba["seconds"] > 0
    assert on["seconds"] + gba["seconds"] <= on["seconds_total"]
    report = reports[0]
    assert sorted(report.depth_ratio) == list(range(on["keyframes"]))
    changed = 0
    for kid, name in enumerate(on["keyframe_files"]):
        before = np.load(outs["off"] / "depth" / f"{name}.npy")
        got = np.load(outs["on"] / "depth" / f"{name}.npy")
        expected = np.where(before > 0, before / upsample_ratio(report.depth_ratio[kid], 2, (RH, RW)), 0)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        np.testing.assert_allclose(got[::2, ::2], small[kid], rtol=1e-6)  # the cloud's depth is the same
        png = cv2.imread(str(outs["on"] / "depth" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.abs(png - got * 1000).max() <= 0.51
        changed += not np.allclose(got, before, rtol=1e-4)
    assert changed > 0
    traj = {k: np.loadtxt(outs[k] / "trajectory.txt") for k in outs}
    assert traj["on"].shape == traj["off"].shape and not np.allclose(traj["on"], traj["off"], atol=1e-6)


def test_edges_tens_of_pixels_long_are_fitted_with_a_guided_search(monkeypatch):
    """Three keyframes turning 12 deg each (flow of 30-70 px at 120x160), the last one's pose 1.7 deg
    and 4 cm off: the adjustment brings it back, because DIS searches around the flow the current
    estimate predicts; searched from zero flow, the same edges give nothing to fit."""
    import math

    from v2d.data.synthetic import default_intrinsics, make_scene, make_trajectory, render_views
    from v2d.geometry.lie import se3_log

    scene = make_scene(3)
    a = make_trajectory(scene, 3, 2)[0].double()
    poses = torch.stack([se3_mul(se3_exp(torch.tensor([0.06 * k, 0, 0, 0, math.radians(12 * k), 0],
                                                      dtype=torch.float64)), a) for k in range(3)])
    intr = default_intrinsics(H, W).double()
    images, depths = render_views(scene, poses, intr, H, W)
    off = se3_exp(torch.tensor([0.03, -0.02, 0.02, 0.02, -0.02, 0.01], dtype=torch.float64))
    start = poses.clone()
    start[2] = se3_mul(off, poses[2])

    def error_deg(m: Map) -> float:
        rel = se3_mul(m.keyframe(2).pose_cw, se3_inv(m.keyframe(0).pose_cw))
        return math.degrees(float(se3_log(se3_mul(rel, se3_inv(se3_mul(poses[2], se3_inv(poses[0])))))[3:].norm()))

    def adjusted(guided: bool) -> float:
        m = Map(intr, torch.device("cpu"))
        for k in range(3):
            m.add_frame(FrameState(keyframe=max(k - 1, 0), rel_cw=se3_identity(dtype=torch.float64)), images[k])
            m.add_keyframe(Keyframe(frame=k, pose_cw=start[k], image=images[k], depth=torch.from_numpy(depths[k]),
                                    valid=torch.ones(H, W, dtype=torch.bool)), k)
            m.retire(k, 1)
        assert error_deg(m) > 1.5
        if not guided:
            monkeypatch.setattr(backend, "dis_flow", lambda a, b, preset, init, finest_scale: _unguided(a, b))
        report = GlobalBA(_cfg("slam.edge_max_flow=1000"), torch.device("cpu")).run(m)
        monkeypatch.undo()
        assert report.temporal_edges == 6
        return error_deg(m) if report.kept else float("inf")

    def _unguided(x, y):
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        dis.setFinestScale(0)
        return dis.calc(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.cvtColor(y, cv2.COLOR_RGB2GRAY), None)

    guided = adjusted(True)
    assert guided < 0.3, guided
    assert adjusted(False) > 3 * guided


@pytest.fixture(scope="module")
def xfeat():
    from v2d.features import make_extractor

    return make_extractor("xfeat", 1000)


def test_tracks_correct_the_scale_drift_the_neighbouring_edges_keep(seq, xfeat):
    """A keyframe at every frame, 2 % scale drift per keyframe with the depth drifting along (each
    neighbouring pair agrees): with dense edges between neighbours only, the adjustment keeps most of
    the drift; the features' tracks, each with one depth across the keyframes that see it, correct it
    (measured keyframe ATE m: 0.110 drifted, 0.108 without tracks, 0.026 with)."""
    frames = list(range(0, 36))
    gt = seq.poses_cw[frames]
    drifted, scales = _drifted(gt, 1.02, step_error=False)
    feats = [xfeat.extract(seq.images[f]) for f in frames]
    results, reports = {}, {}
    for tracks in (False, True):
        m = _map(seq, frames, drifted, depth_scales=scales)
        for k, f in enumerate(feats):
            m.update_keyframe(k, features=f)
        before = _ate(m, gt)
        cfg = _cfg("slam.global_ba_edges=0", "slam.global_ba_neighbours=1", f"slam.tracks={str(tracks).lower()}",
                   "slam.track_span=6", "slam.track_weight=1")
        reports[tracks] = GlobalBA(cfg, torch.device("cpu"), matcher=PairMatcher(xfeat.match, 1.0, 15, 1)).run(m)
        assert reports[tracks].kept, reports[tracks]
        results[tracks] = _ate(m, gt)
    assert results[False] > 0.7 * before, (before, results)
    assert results[True] < 0.4 * results[False], (before, results)
    plain, tracked = reports[False], reports[True]
    assert plain.tracks == 0 and plain.reprojection_after_px is None
    assert tracked.tracks > 100 and tracked.track_length > 2.5 and tracked.track_observations > tracked.tracks
    assert tracked.track_pairs >= 6 * (len(frames) - 6)
    assert tracked.reprojection_after_px < 0.9 * tracked.reprojection_before_px < 1.5  # network px (160 wide)
    summary = tracked.as_dict()
    assert summary["tracks"] == tracked.tracks and summary["reprojection_after_px"] == tracked.reprojection_after_px


def test_no_tracks_without_a_matcher_or_features(seq, xfeat):
    """Tracks need the features' matcher and every keyframe's features; otherwise the adjustment runs
    on the flow alone, as before."""
    frames = DRIFT[:6]
    gt = seq.poses_cw[frames]
    for matcher, with_features in ((None, True), (PairMatcher(xfeat.match, 1.0, 15, 1), False)):
        m = _map(seq, frames, gt)
        if with_features:
            for k, f in enumerate(frames):
                m.update_keyframe(k, features=xfeat.extract(seq.images[f]))
        report = GlobalBA(_cfg(), torch.device("cpu"), matcher=matcher).run(m)
        assert report.kept and report.tracks == 0 and report.track_pairs == 0, report

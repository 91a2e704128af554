"""slam/filler.py: every frame between keyframes aligned again to the final map (the sawtooth after
the adjustments rescale the map is gone), lost frames and keyframes left alone, bad alignments kept
out by the guard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from slam.filler import FrameFiller
from slam.map import FrameState, Keyframe, Map
from v2d.data.synthetic import render_sequence
from v2d.geometry.lie import se3_identity, se3_inv, se3_mul

H, W = 120, 160
KEYFRAMES = [0, 8, 16, 24]


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=3, num_frames=25, height=H, width=W)


def _map(seq, scale: float = 1.0, lost: tuple[int, ...] = ()) -> Map:
    """A finished map: keyframes at KEYFRAMES with the true poses and depth (retired at stride 2),
    the frames between tracked against the keyframe before with their translation relative to it
    `scale` times too long (tracked against depth of the wrong scale: the sawtooth)."""
    m = Map(seq.intrinsics, torch.device("cpu"), thumb_stride=2)
    ident = se3_identity(dtype=torch.float64)
    kid = -1
    for f in range(len(seq.poses_cw)):
        if f in KEYFRAMES:
            m.add_frame(FrameState(keyframe=max(kid, 0), rel_cw=ident), seq.images[f])
            depth = torch.from_numpy(seq.depths[f])
            kid = m.add_keyframe(Keyframe(frame=f, pose_cw=seq.poses_cw[f], image=seq.images[f], depth=depth,
                                          valid=torch.ones(H, W, dtype=torch.bool)), f)
            continue
        rel = se3_mul(seq.poses_cw[f], se3_inv(seq.poses_cw[KEYFRAMES[kid]]))
        rel = torch.cat([rel[:3] * scale, rel[3:]])
        m.add_frame(FrameState(keyframe=kid, rel_cw=rel, lost=f in lost), seq.images[f])
    for k in range(m.num_keyframes()):
        m.retire(k, 2)
    return m


def _errors(m: Map, seq) -> np.ndarray:
    est = se3_inv(m.frame_poses())[:, :3]
    gt = se3_inv(seq.poses_cw)[:, :3]
    return (est - gt).norm(dim=-1).numpy()


def test_the_sawtooth_is_gone(seq):
    m = _map(seq, scale=1.4)
    before = _errors(m, seq)
    between = np.array([f not in KEYFRAMES for f in range(len(before))])
    report = FrameFiller(RunConfig(), torch.device("cpu")).run(m)
    after = _errors(m, seq)
    assert report.frames == between.sum() and report.moved == report.frames
    assert report.residual_after_px < report.residual_before_px
    assert np.median(before[between]) > 0.02  # metres: the sawtooth
    assert np.median(after[between]) < 0.1 * np.median(before[between]), (before, after)
    np.testing.assert_array_equal(after[~between], before[~between])  # keyframes are not moved


def test_lost_frames_are_left_alone_and_good_ones_barely_move(seq):
    m = _map(seq, scale=1.0, lost=(5,))
    before = _errors(m, seq)
    report = FrameFiller(RunConfig(), torch.device("cpu")).run(m)
    after = _errors(m, seq)
    assert report.frames == len(seq.poses_cw) - len(KEYFRAMES) - 1
    assert after[5] == before[5]  # it holds the last good pose, as the map gave it
    assert np.max(np.delete(after, 5)) < 0.005, after  # the true poses stay within a few millimetres


def test_a_run_ends_with_the_filler(seq):
    """SlamSystem.finish runs it after the global adjustment (and not with slam.fill_frames off)."""
    from slam.system import SlamSystem
    from v2d.config import load_config
    from v2d.model import SHIPPED_WEIGHTS, load_model

    if not SHIPPED_WEIGHTS.exists():
        pytest.skip(f"shipped weights missing: {SHIPPED_WEIGHTS}")
    results = {}
    for on in (True, False):
        cfg = load_config(None, ["slam.concurrent=false", f"slam.fill_frames={str(on).lower()}"], root=RunConfig)
        with SlamSystem(load_model(cfg), cfg, seq.intrinsics, (H, W)) as system:
            for f in np.asarray(seq.images):
                system.add_frame(np.ascontiguousarray(f))
            results[on] = system.finish()
    assert results[False].filler is None
    rep = results[True].filler
    kf = set(results[True].keyframe_frames)
    assert rep is not None and rep.frames == sum(1 for f, s in enumerate(results[True].frames)
                                                 if f not in kf and not s.lost)
    assert dataclasses.asdict(rep)["seconds"] >= 0

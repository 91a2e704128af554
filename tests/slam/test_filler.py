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
    # the true poses stay within a centimetre (the lost frame breaks the stretch: frames 1-7 are
    # aligned to keyframe 0 alone)
    assert np.max(np.delete(after, 5)) < 0.01, after


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
    assert rep.moved >= 1 and rep.residual_after_px <= rep.residual_before_px
    assert set(dataclasses.asdict(rep)) == {"frames", "moved", "residual_before_px", "residual_after_px", "seconds"}


def test_a_second_segment_trailing_frames_and_a_bridged_run(seq):
    """Keyframes 0 and 8 in one segment, 16 and 24 in another: frames after keyframe 8 up to 16 see
    only keyframe 8 (the next keyframe is another segment's); frames after the last keyframe are
    aligned to it alone; a bridged run is interpolated again between its refined neighbours."""
    m = _map(seq, scale=1.4)
    with m._lock:  # test set-up: keyframes 16 and 24 begin a second segment, frames 3-4 were bridged
        for k in (2, 3):
            m._keyframes[k] = dataclasses.replace(m._keyframes[k], segment=1)
        for f in (3, 4):
            m._frames[f] = dataclasses.replace(m._frames[f], interpolated=True)
    m._segments = 2
    extra = FrameState(keyframe=3, rel_cw=se3_identity(dtype=torch.float64))
    m.add_frame(dataclasses.replace(extra, rel_cw=se3_mul(seq.poses_cw[24], se3_inv(seq.poses_cw[24]))),
                seq.images[24])  # a trailing frame after the last keyframe
    report = FrameFiller(RunConfig(), torch.device("cpu")).run(m)
    assert report.frames == len(seq.poses_cw) + 1 - len(KEYFRAMES) - 2  # every non-keyframe but the bridged two
    c = se3_inv(m.frame_poses())[:, :3]
    # frames 3 and 4 lie between 2 and 5 again (SE(3) interpolation: on the line within a millimetre)
    assert float((c[3] - (2 * c[2] + c[5]) / 3).norm()) < 1e-3 and float((c[4] - (c[2] + 2 * c[5]) / 3).norm()) < 1e-3
    errors = (se3_inv(m.frame_poses())[:25, :3] - se3_inv(seq.poses_cw)[:, :3]).norm(dim=-1).numpy()
    between = [f for f in range(25) if f not in KEYFRAMES and f not in (3, 4)]
    assert np.median(errors[between]) < 0.01, errors


def test_unretired_keyframes_are_an_error(seq):
    from v2d.errors import V2DError

    m = Map(seq.intrinsics, torch.device("cpu"))
    m.add_frame(FrameState(keyframe=0, rel_cw=se3_identity(dtype=torch.float64)), seq.images[0])
    depth = torch.from_numpy(seq.depths[0])
    m.add_keyframe(Keyframe(frame=0, pose_cw=seq.poses_cw[0], image=seq.images[0], depth=depth,
                            valid=torch.ones(H, W, dtype=torch.bool)), 0)
    with pytest.raises(V2DError, match="retired"):
        FrameFiller(RunConfig(), torch.device("cpu")).run(m)

"""slam/tracks.py: the keyframes' features matched, verified and chained into multi-view tracks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from slam.tracks import PairMatcher, build_tracks
from tests.slam.test_backend import H, W, _map
from v2d.data.synthetic import render_sequence
from v2d.features import make_extractor
from v2d.geometry.window_ba import track_costs

FRAMES = list(range(0, 16, 2))


@pytest.fixture(scope="module")
def scene():
    seq = render_sequence(seed=5, num_frames=16, height=H, width=W, fps=10)
    xfeat = make_extractor("xfeat", 1000)
    return seq, xfeat, [xfeat.extract(seq.images[f]) for f in FRAMES]


def _keyframes(seq, feats, depthless: int | None = None, retire: bool = True):
    m = _map(seq, FRAMES, seq.poses_cw[FRAMES], retire=retire)
    for k, f in enumerate(feats):
        m.update_keyframe(k, features=f)
    if depthless is not None:
        m.update_keyframe(depthless, small_depth=np.zeros_like(m.keyframe(depthless).small_depth))
    return m.keyframes()


def _pairs(K: int, span: int = 3) -> list[tuple[int, int]]:
    return [(a, b) for a in range(K) for b in range(a + 1, min(K, a + 1 + span))]


def test_tracks_follow_the_true_geometry(scene):
    """With the true poses and depth, the tracks' observations reproject onto their keypoints: the
    checks let through no outlier; tracks span several keyframes, each keyframe at most once."""
    seq, xfeat, feats = scene
    kfs = _keyframes(seq, feats)
    built = build_tracks(kfs, FRAMES, _pairs(len(kfs)), PairMatcher(xfeat.match, 1.0, 15, 1), seq.intrinsics)
    assert built is not None and built.pairs == len(_pairs(len(kfs))) and built.verified > 100
    t = built.tracks
    assert len(t) > 100 and float(built.lengths.double().mean()) > 2.5 and int(built.lengths.max()) >= 4
    assert int(built.lengths.sum()) == len(t) + t.track.numel()  # the anchor plus the observations
    for i in range(len(t)):  # one observation per keyframe, never the anchor's
        nodes = t.node[t.track == i]
        assert len(set(nodes.tolist())) == len(nodes) and int(t.anchor[i]) not in nodes.tolist()
    err, _, valid = track_costs(seq.poses_cw[FRAMES].double(), t, t.inv_depth, seq.intrinsics.double(), 0.0, 0.1)
    assert bool(valid.all())
    assert float(err.median()) < 1.0 and float((err > 4).double().mean()) < 0.01, (err.median(), (err > 4).sum())
    # the anchor's depth is the keyframe's at the keypoint
    k, uv = int(t.anchor[0]), t.uv[0]
    depth = seq.depths[FRAMES[k]][int(round(float(uv[1]))), int(round(float(uv[0])))]
    assert float(t.inv_depth[0]) == pytest.approx(1.0 / depth, rel=1e-5)


def test_wrong_matches_make_no_track(scene):
    """Matches that no geometry explains (shuffled) are all rejected."""
    seq, xfeat, feats = scene
    kfs = _keyframes(seq, feats)
    rng = np.random.default_rng(0)

    def shuffled(a, b):
        idx = xfeat.match(a, b)
        idx[:, 1] = rng.permutation(idx[:, 1])
        return idx

    built = build_tracks(kfs, FRAMES, _pairs(len(kfs)), PairMatcher(shuffled, 1.0, 15, 1), seq.intrinsics)
    right = build_tracks(kfs, FRAMES, _pairs(len(kfs)), PairMatcher(xfeat.match, 1.0, 15, 1), seq.intrinsics)
    assert built is None or len(built.tracks) < 0.05 * len(right.tracks)


def test_a_keyframe_without_depth_anchors_nothing(scene):
    """Anchors need depth at their keypoint; a keyframe without depth still observes tracks (matched
    from the keyframes before it, whose depth the check uses)."""
    seq, xfeat, feats = scene
    kfs = _keyframes(seq, feats, depthless=2)
    built = build_tracks(kfs, FRAMES, _pairs(len(kfs)), PairMatcher(xfeat.match, 1.0, 15, 1), seq.intrinsics)
    assert built is not None
    assert 2 not in built.tracks.anchor.tolist() and 2 in built.tracks.node.tolist()
    assert torch.all(built.tracks.inv_depth > 0)


def test_pairs_are_matched_once_and_window_keyframes_use_their_full_depth(scene):
    """The matcher keeps each pair's verified matches (the window asks again at every keyframe); a
    keyframe still in the window is checked and anchored with its full depth."""
    seq, xfeat, feats = scene
    calls = []

    def counted(a, b):
        calls.append(1)
        return xfeat.match(a, b)

    matcher = PairMatcher(counted, 1.0, 15, 1)
    in_window = _keyframes(seq, feats, retire=False)
    assert all(k.depth is not None and k.small_depth is None for k in in_window)
    first = build_tracks(in_window, FRAMES, _pairs(len(in_window)), matcher, seq.intrinsics)
    assert first is not None and len(calls) == len(_pairs(len(in_window)))
    again = build_tracks(_keyframes(seq, feats), FRAMES, _pairs(len(in_window)), matcher, seq.intrinsics)
    assert len(calls) == len(_pairs(len(in_window)))  # nothing matched twice
    assert torch.equal(first.tracks.node, again.tracks.node) and torch.equal(first.tracks.target, again.tracks.target)
    torch.testing.assert_close(first.tracks.inv_depth, again.tracks.inv_depth, rtol=1e-6, atol=0)


def test_depth_lookup_in_the_window_and_after_retirement(scene):
    """Full depth (where valid) while in the window; after retirement the small copy, whose pixel
    (i, j) is frame pixel (stride i, stride j); 0 outside the image or where unknown."""
    from slam.tracks import _depths

    seq, _, _ = scene
    m = _map(seq, FRAMES[:1], seq.poses_cw[FRAMES[:1]], retire=False)
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[10, 20] = False
    m.update_keyframe(0, valid=valid)
    d = seq.depths[FRAMES[0]]
    pts = np.array([[30.0, 12.0], [20.0, 10.0], [31.4, 12.6], [-3.0, 5.0], [W + 2.0, 5.0]], np.float32)
    got = _depths(m.keyframe(0), pts, 2)
    np.testing.assert_allclose(got, [d[12, 30], 0.0, d[13, 31], 0.0, 0.0], rtol=1e-6)
    m.retire(0, 2)
    small = _depths(m.keyframe(0), pts, 2)
    # (30, 12) -> small (6, 15): frame pixel (12, 30); (31.4, 12.6) -> small (6, 16): frame (12, 32)
    np.testing.assert_allclose(small, [d[12, 30], 0.0, d[12, 32], 0.0, 0.0], rtol=1e-6)  # (10, 20) stays unknown


def test_the_weights_share_and_the_grid(scene):
    """`weighted`: pixel coordinates on the coarser grid, the share split evenly, a handful of
    observations not taking the whole share."""
    from slam.tracks import weighted

    seq, xfeat, feats = scene
    kfs = _keyframes(seq, feats)
    built = build_tracks(kfs, FRAMES, _pairs(len(kfs)), PairMatcher(xfeat.match, 1.0, 15, 1), seq.intrinsics)
    O = built.tracks.track.numel()
    assert O > 100
    t = weighted(built, 4.0, 1000.0, 0.5)
    torch.testing.assert_close(t.uv * 4.0, built.tracks.uv)
    torch.testing.assert_close(t.target * 4.0, built.tracks.target)
    assert float(t.weight.sum()) == pytest.approx(500.0) and float(t.weight.std()) < 1e-12
    few = dataclasses.replace(built, tracks=dataclasses.replace(built.tracks, track=built.tracks.track[:10],
                                                                node=built.tracks.node[:10],
                                                                target=built.tracks.target[:10],
                                                                weight=built.tracks.weight[:10]))
    assert float(weighted(few, 1.0, 1000.0, 0.5).weight.sum()) == pytest.approx(500.0 * 10 / 100)

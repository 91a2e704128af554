"""Sparse tracks in the joint bundle adjustment (v2d.geometry.window_ba.bundle_adjust with `Tracks`):
their Jacobians, one step against the full Gauss-Newton step formed by autograd without any Schur
complement, and the scale they hold where the dense edges alone cannot."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from v2d.errors import ShapeError
from v2d.geometry.camera import project, reproject, valid_reprojection
from v2d.geometry.lie import se3_act, se3_exp, se3_inv, se3_log, se3_mul
from v2d.geometry.window_ba import (
    _LM_SCALE,
    Tracks,
    WindowBAOptions,
    _prepared,
    _track_linearised,
    bundle_adjust,
    track_costs,
    window_bundle_adjust,
)

D = torch.float64
KI = torch.tensor([30.0, 30.0, 15.5, 11.5], dtype=D)
H, W = 24, 32
PLAIN = WindowBAOptions(robust_scale=0.0, stride=1, max_step=10.0, max_translation_step=10.0,
                        max_rotation_step=10.0)


def _line_scene(n_kf: int, step: float = 0.15, seed: int = 0, h: int = H, w: int = W):
    """Keyframes moving sideways along x with a small wobble, a smooth wall about 2-3 m away.
    Returns true poses (K, 7), inverse depths (K, h, w)."""
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(n_kf, 6, generator=g, dtype=D) * torch.tensor([0.01, 0.01, 0.01, 0.01, 0.01, 0.01], dtype=D)
    xi[:, 0] -= step * torch.arange(n_kf, dtype=D)  # world->camera: the camera at +x has t = -x
    xi[0] = 0.0
    poses = se3_exp(xi)
    v, u = torch.meshgrid(torch.linspace(0, 1, h, dtype=D), torch.linspace(0, 1, w, dtype=D), indexing="ij")
    inv = []
    for _ in range(n_kf):
        a = float(torch.rand(1, generator=g, dtype=D)) * 2 + 1
        inv.append(1.0 / (2.5 + 0.3 * torch.sin(a * u + 1) * torch.cos(2 * v)))
    return poses, torch.stack(inv)


def _points(n: int, seed: int = 1) -> torch.Tensor:
    """n world points in front of the first cameras, (n, 3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.rand(n, generator=g, dtype=D) * 1.6 - 0.3, torch.rand(n, generator=g, dtype=D) - 0.5,
                        2.0 + torch.rand(n, generator=g, dtype=D)], dim=-1)


def _tracks(poses: torch.Tensor, pts: torch.Tensor, anchor: int = 0, prior_weight: float = 1e-6,
            intr: torch.Tensor = KI, size: tuple[int, int] = (H, W)) -> Tracks:
    """Exact tracks of world points: anchored in keyframe `anchor`, observed in every other node that
    sees them in front (inside the image)."""
    N = poses.shape[0]
    Xa = se3_act(poses[anchor][None].expand(len(pts), 7), pts)
    uv = project(Xa, intr)
    track, node, target = [], [], []
    for k in range(N):
        if k == anchor:
            continue
        X = se3_act(poses[k][None].expand(len(pts), 7), pts)
        t = project(X, intr)
        ok = (X[:, 2] > 0.1) & (t[:, 0] > 0) & (t[:, 0] < size[1]) & (t[:, 1] > 0) & (t[:, 1] < size[0])
        idx = ok.nonzero()[:, 0]
        track.append(idx)
        node.append(torch.full_like(idx, k))
        target.append(t[idx])
    track, node, target = torch.cat(track), torch.cat(node), torch.cat(target)
    return Tracks(anchor=torch.full((len(pts),), anchor, dtype=torch.long), uv=uv, inv_depth=1.0 / Xa[:, 2],
                  prior_weight=torch.full((len(pts),), prior_weight, dtype=D), track=track, node=node,
                  target=target, weight=torch.ones(len(track), dtype=D))


def _edges(poses: torch.Tensor, inv: torch.Tensor, pairs: list[tuple[int, int]], intr: torch.Tensor = KI):
    """Dense edges over `pairs` with their exact targets and validity weights: ii, jj, targets, weights."""
    ii, jj = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    tgt, dj = reproject(inv[ii], poses[ii], poses[jj], intr)
    return ii, jj, tgt, valid_reprojection(inv[ii], tgt, dj, 0.1).to(D)


def _joined(parts: list[Tracks]) -> Tracks:
    """Several track sets as one (track indices offset)."""
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    return Tracks(anchor=torch.cat([p.anchor for p in parts]), uv=torch.cat([p.uv for p in parts]),
                  inv_depth=torch.cat([p.inv_depth for p in parts]),
                  prior_weight=torch.cat([p.prior_weight for p in parts]),
                  track=torch.cat([p.track + o for p, o in zip(parts, offsets, strict=False)]),
                  node=torch.cat([p.node for p in parts]), target=torch.cat([p.target for p in parts]),
                  weight=torch.cat([p.weight for p in parts]))


def _pose_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(se3_log(se3_mul(a, se3_inv(b))).norm(dim=-1).max())


def test_track_jacobians_match_finite_differences():
    poses, _ = _line_scene(3)
    g = torch.Generator().manual_seed(2)
    poses = se3_mul(se3_exp(torch.randn(3, 6, generator=g, dtype=D) * 0.05), poses)
    tr = _prepared(_tracks(poses, _points(12)), D, torch.device("cpu"))
    rho = tr.inv_depth * (1 + 0.1 * torch.rand(len(tr), generator=g, dtype=D))
    r, J_j, J_a, J_rho, valid = _track_linearised(poses, rho, tr, KI, 0.1)
    assert bool(valid.all()) and r.shape == (tr.track.numel(), 2)
    eps = 1e-6

    def res(p, rr):
        return _track_linearised(p, rr, tr, KI, 0.1)[0]

    a, j = tr.anchor[tr.track], tr.node
    for k in range(6):
        d = torch.zeros(6, dtype=D)
        d[k] = eps
        for node, J in ((0, J_a), (1, J_j), (2, J_j)):
            plus, minus = poses.clone(), poses.clone()
            plus[node], minus[node] = se3_mul(se3_exp(d), poses[node]), se3_mul(se3_exp(-d), poses[node])
            num = -(res(plus, rho) - res(minus, rho)) / (2 * eps)  # r = target - pi: J = d pi = -d r
            sel = (a == node) if J is J_a else (j == node)
            torch.testing.assert_close(J[sel][..., k], num[sel], rtol=1e-5, atol=1e-6)
    num = -(res(poses, rho + eps) - res(poses, rho - eps)) / (2 * eps)  # each observation sees only its track
    torch.testing.assert_close(J_rho, num, rtol=1e-5, atol=1e-6)
    assert float(J_a.abs().max()) > 1.0 and float(J_rho.abs().max()) > 0.1


def _residuals(params: torch.Tensor, poses0, inv0, ii, jj, targets, weights, prior, pw, tr: Tracks, free: int,
               intr: torch.Tensor):
    """Every weighted residual of the problem as a function of [xi of the free poses, pixel inverse
    depths, track inverse depths] (a perturbation of the start): the reference the Schur steps must
    reproduce."""
    N, (K, h, w), T = poses0.shape[0], inv0.shape, len(tr)
    xi = torch.cat([torch.zeros(N - free, 6, dtype=D), params[:6 * free].reshape(free, 6)])
    poses = se3_mul(se3_exp(xi), poses0)
    inv = inv0 + params[6 * free:6 * free + K * h * w].reshape(K, h, w)
    t_rho = tr.inv_depth + params[6 * free + K * h * w:]
    uv, _ = reproject(inv[ii], poses[ii], poses[jj], intr)
    dense = (weights.sqrt()[..., None] * (targets - uv)).reshape(-1)
    pri = (pw.sqrt() * (prior - inv)).reshape(-1)
    ray = torch.stack([(tr.uv[:, 0] - intr[2]) / intr[0], (tr.uv[:, 1] - intr[3]) / intr[1], torch.ones(T, dtype=D)],
                      -1)
    world = se3_act(se3_inv(poses)[tr.anchor], ray / t_rho[:, None])
    X = se3_act(poses[tr.node], world[tr.track])
    sparse = (tr.weight.sqrt()[:, None] * (tr.target - project(X, intr))).reshape(-1)
    tpri = tr.prior_weight.sqrt() * (tr.inv_depth - t_rho)
    return torch.cat([dense, pri, sparse, tpri])


@pytest.mark.parametrize("blocks", [1 << 16, 7, 1])
def test_one_step_equals_the_full_gauss_newton_step(monkeypatch, blocks):
    """With the Schur complements on the pixels and the tracks, one damped step equals the step solved
    from the full normal equations of every residual (autograd Jacobian, no elimination): tracks
    anchored in several keyframes, of mixed lengths, their Schur products formed in chunks of any
    size (`_GRAM_BLOCKS`)."""
    import v2d.geometry.window_ba as wba

    monkeypatch.setattr(wba, "_GRAM_BLOCKS", blocks)
    h, w = 6, 8
    intr = KI / 4
    poses, inv = _line_scene(3, h=h, w=w)
    N = 4  # 3 keyframes and one frame without depth
    poses = torch.cat([poses, se3_mul(se3_exp(torch.tensor([[-0.2, 0.05, 0.02, 0.01, -0.02, 0.01]], dtype=D)),
                                      poses[:1])])
    pairs = [(0, 1), (1, 0), (1, 2), (2, 3)]
    ii, jj = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    g = torch.Generator().manual_seed(4)
    tgt, dj = reproject(inv[ii], poses[ii], poses[jj], intr)
    wts = valid_reprojection(inv[ii], tgt, dj, 0.1).to(D) * (0.5 + torch.rand(dj.shape, generator=g, dtype=D))
    tgt = tgt + 0.05 * torch.randn(tgt.shape, generator=g, dtype=D)  # small: no pixel step hits the floor
    parts = [_tracks(poses, _points(6, seed=a), anchor=a, prior_weight=0.5, intr=intr, size=(h, w)) for a in range(3)]
    tr = _joined(parts)
    keep = torch.rand(tr.track.numel(), generator=g) > 0.3  # mixed lengths: some observations dropped
    tr = dataclasses.replace(tr, track=tr.track[keep], node=tr.node[keep], target=tr.target[keep],
                             weight=tr.weight[keep])
    assert len(set(torch.bincount(tr.track, minlength=len(tr)).tolist())) >= 3 and len(set(tr.anchor.tolist())) == 3
    tr = dataclasses.replace(tr, target=tr.target + 0.2 * torch.randn(tr.target.shape, generator=g, dtype=D),
                             inv_depth=tr.inv_depth * 1.1,
                             weight=0.5 + torch.rand(tr.weight.shape, generator=g, dtype=D))
    p0 = se3_mul(se3_exp(torch.randn(N, 6, generator=g, dtype=D) * 0.02 * (torch.arange(N) > 0)[:, None]), poses)
    i0 = inv * (1 + 0.05 * torch.randn(inv.shape, generator=g, dtype=D))
    prior, pw = inv.clone(), torch.full_like(inv, 0.3)
    opts = dataclasses.replace(PLAIN, iterations=1, damping=1e-3)
    out = bundle_adjust(p0, i0, intr, ii, jj, tgt, wts, prior, pw, opts, tr)

    free = N - 1
    n = 6 * free + inv.numel() + len(tr)
    zero = torch.zeros(n, dtype=D)
    J = torch.autograd.functional.jacobian(lambda x: _residuals(x, p0, i0, ii, jj, tgt, wts, prior, pw, tr, free,
                                                                intr), zero)
    r = _residuals(zero, p0, i0, ii, jj, tgt, wts, prior, pw, tr, free, intr)
    Hf = J.T @ J
    damp = torch.zeros(n, dtype=D)
    damp[:6 * free] = opts.damping + _LM_SCALE * torch.diagonal(Hf)[:6 * free]
    step = torch.linalg.solve(Hf + torch.diag(damp), -J.T @ r)
    xi = torch.cat([torch.zeros(1, 6, dtype=D), step[:6 * free].reshape(free, 6)])
    torch.testing.assert_close(out.poses_cw, se3_mul(se3_exp(xi), p0), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out.inv_depth, i0 + step[6 * free:6 * free + inv.numel()].reshape(inv.shape),
                               rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out.track_inv_depth, tr.inv_depth + step[6 * free + inv.numel():], rtol=1e-7,
                               atol=1e-9)
    assert float(step[6 * free + inv.numel():].abs().max()) > 1e-3  # the tracks moved


def _drifted(poses: torch.Tensor, inv: torch.Tensor, growth: float):
    """Scale drift: keyframe k's position relative to the one before and its depth scaled by growth^k
    (each neighbouring pair stays consistent to first order). Returns poses, inverse depths, scales."""
    out, scales = [poses[0]], [1.0]
    for k in range(1, poses.shape[0]):
        rel = se3_mul(poses[k], se3_inv(poses[k - 1])).clone()
        scales.append(scales[-1] * growth)
        rel[:3] *= scales[-1]
        out.append(se3_mul(rel, out[-1]))
    s = torch.tensor(scales, dtype=D)
    return torch.stack(out), inv / s[:, None, None], s


def _scale_error(est: torch.Tensor, gt: torch.Tensor) -> float:
    """Largest relative error of each keyframe's distance from the first, after fixing the overall scale
    on the second keyframe."""
    c_est = se3_inv(est)[:, :3] - se3_inv(est)[:1, :3]
    c_gt = se3_inv(gt)[:, :3] - se3_inv(gt)[:1, :3]
    d_est, d_gt = c_est[1:].norm(dim=-1), c_gt[1:].norm(dim=-1)
    ratio = (d_est / d_est[0]) / (d_gt / d_gt[0])
    return float((ratio - 1).abs().max())


def test_tracks_hold_the_scale_the_neighbouring_edges_cannot():
    """Six keyframes drifting 15 % in scale per keyframe, the depth (and its prior) drifting with them:
    the dense edges join neighbours only and the prior holds the drift. Tracks anchored in the first
    keyframe and seen in the others tie them all (scale error measured 0.36 drifted, 0.11 dense edges
    alone, 0.025 with the tracks)."""
    K = 6
    poses, inv = _line_scene(K, step=0.1)
    pairs = [(k, k + 1) for k in range(K - 1)] + [(k + 1, k) for k in range(K - 1)]
    ii, jj = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    p0, i0, _ = _drifted(poses, inv, 1.15)
    tgt, dj = reproject(inv[ii], poses[ii], poses[jj], KI)
    wts = valid_reprojection(inv[ii], tgt, dj, 0.1).to(D)
    prior, pw = i0.clone(), torch.full_like(i0, 1.0)  # the network's depth carries the drift
    opts = dataclasses.replace(WindowBAOptions(stride=1), iterations=6)
    without = window_bundle_adjust(p0, i0, KI, ii, jj, tgt, wts, prior, pw, opts)[0]
    tr = _tracks(poses, _points(80), anchor=0)
    tr = dataclasses.replace(tr, weight=torch.full_like(tr.weight, 20.0))
    out = bundle_adjust(p0, i0, KI, ii, jj, tgt, wts, prior, pw, opts, tr)
    before, plain, tracked = _scale_error(p0, poses), _scale_error(without, poses), _scale_error(out.poses_cw, poses)
    assert before > 0.3, before
    assert plain > 0.2 * before, (before, plain)  # measured: the neighbouring edges leave a third of it
    assert tracked < 0.1 * before and tracked < 0.35 * plain, (before, plain, tracked)  # measured 0.025
    err, cost, valid = track_costs(out.poses_cw, tr, out.track_inv_depth, KI, 2.0, 0.1)
    e0, _, _ = track_costs(p0, tr, tr.inv_depth, KI, 2.0, 0.1)
    assert bool(valid.all()) and float(err.median()) < 0.1 * float(e0.median()), (e0.median(), err.median())


def test_tracks_are_checked():
    poses, inv = _line_scene(3)
    ii, jj, tgt, wts = _edges(poses, inv, [(0, 1), (1, 2)])
    tr = _tracks(poses, _points(5))
    args = (poses, inv, KI, ii, jj, tgt, wts, inv, torch.ones_like(inv), PLAIN)
    for change, msg in (({"anchor": tr.anchor + 5}, "anchor"), ({"node": tr.node * 0}, "its track's anchor"),
                        ({"target": tr.target[:, :1]}, "target"), ({"track": tr.track.float()}, "track"),
                        ({"track": tr.track + 10}, "track")):
        with pytest.raises(ShapeError, match=msg):
            bundle_adjust(*args, tracks=dataclasses.replace(tr, **change))


def test_a_bad_observation_is_ignored_not_propagated():
    """A non-finite target or weight, a track behind a camera: no NaN anywhere, the others still solved."""
    poses, inv = _line_scene(3)
    ii, jj, tgt, wts = _edges(poses, inv, [(0, 1), (1, 2)])
    tr = _tracks(poses, _points(20))
    target, weight, start = tr.target.clone(), tr.weight.clone(), tr.inv_depth.clone()
    target[0] = float("nan")
    weight[1] = float("inf")
    start[2] = -1.0
    tr = dataclasses.replace(tr, target=target, weight=weight, inv_depth=start)
    out = bundle_adjust(poses, inv, KI, ii, jj, tgt, wts, inv, torch.ones_like(inv), PLAIN, tr)
    assert bool(torch.isfinite(out.poses_cw).all()) and bool(torch.isfinite(out.track_inv_depth).all())
    assert _pose_error(out.poses_cw, poses) < 1e-6  # the truth stays the solution
    ok = torch.ones(len(tr), dtype=torch.bool)
    ok[[int(tr.track[0]), int(tr.track[1]), 2]] = False
    torch.testing.assert_close(out.track_inv_depth[ok], tr.inv_depth[ok], rtol=1e-6, atol=1e-9)


def test_no_tracks_is_the_dense_adjustment():
    """An empty track set (or none) gives exactly the dense-only result."""
    poses, inv = _line_scene(3)
    ii, jj, tgt, wts = _edges(poses, inv, [(0, 1), (1, 2), (2, 0)])
    start = se3_mul(se3_exp(torch.full((3, 6), 0.01, dtype=D) * (torch.arange(3) > 0)[:, None]), poses)
    empty = _tracks(poses, _points(5))
    empty = Tracks(anchor=empty.anchor[:0], uv=empty.uv[:0], inv_depth=empty.inv_depth[:0],
                   prior_weight=empty.prior_weight[:0], track=empty.track[:0], node=empty.node[:0],
                   target=empty.target[:0], weight=empty.weight[:0])
    args = (start, inv, KI, ii, jj, tgt, wts, inv, torch.ones_like(inv), PLAIN)
    dense = window_bundle_adjust(*args)
    got = bundle_adjust(*args, tracks=empty)
    assert torch.equal(got.poses_cw, dense[0]) and torch.equal(got.inv_depth, dense[1])
    assert got.track_inv_depth.shape == (0,)


def test_track_depths_fitted_to_fixed_poses():
    """`fit_track_depths`: from 30 % off, each track's depth comes back to the one its exact
    observations give; the poses are not touched."""
    from v2d.geometry.window_ba import fit_track_depths

    poses, _ = _line_scene(4)
    tr = _tracks(poses, _points(30), anchor=1)
    truth = tr.inv_depth.clone()
    got = fit_track_depths(poses, dataclasses.replace(tr, inv_depth=truth * 1.3), KI, 2.0, 0.1, iterations=8)
    torch.testing.assert_close(got, truth, rtol=1e-4, atol=0)

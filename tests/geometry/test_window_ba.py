"""Joint pose + per-pixel inverse-depth Gauss-Newton over a window (v2d.geometry.window_ba)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import reference
from v2d.errors import ShapeError
from v2d.geometry.camera import pixel_rays, project, reproject, valid_reprojection
from v2d.geometry.gauss_newton import GNOptions, gauss_newton
from v2d.geometry.lie import quat_to_matrix, se3_adjoint, se3_exp, se3_inv, se3_log, se3_mul, skew
from v2d.geometry.window_ba import _LM_SCALE, WindowBAOptions, window_bundle_adjust

D = torch.float64
H, W = 24, 32
KI = torch.tensor([30.0, 30.0, 15.5, 11.5], dtype=D)
PLAIN = WindowBAOptions(robust_scale=0.0, stride=1)


def _scene(n_kf: int = 3, n_frames: int = 1, seed: int = 0, h: int = H, w: int = W, intr: torch.Tensor = KI):
    """True poses (N, 7) (node 0 the identity), smooth true inverse depth (K, h, w), all edges out of the
    keyframes and their exact targets and validity weights."""
    g = torch.Generator().manual_seed(seed)
    N = n_kf + n_frames
    xi = torch.randn(N, 6, generator=g, dtype=D) * torch.tensor([0.12, 0.12, 0.06, 0.04, 0.04, 0.04], dtype=D)
    xi[0] = 0.0
    poses = se3_exp(xi)
    v, u = torch.meshgrid(torch.linspace(0, 1, h, dtype=D), torch.linspace(0, 1, w, dtype=D), indexing="ij")
    depths = []
    for _ in range(n_kf):
        a, b, c = (torch.rand(3, generator=g, dtype=D) * 3 + 1).tolist()
        depths.append(2.0 + 0.4 * torch.sin(a * u + 1) * torch.cos(b * v) + 0.3 * (c * u * v))
    inv = 1.0 / torch.stack(depths)
    pairs = [(i, j) for i in range(n_kf) for j in range(N) if i != j]
    ii, jj = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    targets, depth_j = reproject(inv[ii], poses[ii], poses[jj], intr)
    weights = valid_reprojection(inv[ii], targets, depth_j, 0.1).to(D)
    return poses, inv, ii, jj, targets, weights


def _pose_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(se3_log(se3_mul(a, se3_inv(b))).norm(dim=-1).max())


def _scaled_start(poses: torch.Tensor, inv: torch.Tensor, scale: float = 1.2, noise: float = 0.0, seed: int = 3):
    """The scene seen at another scale (inverse depth * scale, translations / scale): every flow residual
    stays zero, only the depth prior tells the scales apart, so block coordinate descent crawls. Plus
    optional noise on the free poses and the depths."""
    g = torch.Generator().manual_seed(seed)
    p = poses.clone()
    p[:, :3] = p[:, :3] / scale
    xi = torch.randn(p.shape[0], 6, generator=g, dtype=D) * noise * 0.1
    xi[0] = 0.0
    p = se3_mul(se3_exp(xi), p)
    i = inv * scale * (1.0 + noise * torch.randn(inv.shape, generator=g, dtype=D)).clamp(0.7, 1.3)
    return p, i


# ------------------------------------------------------------------------------------------ Jacobians


def _edge_terms(rho: torch.Tensor, Ti: torch.Tensor, Tj: torch.Tensor, intr: torch.Tensor = KI):
    """The projection of keyframe i's pixels (inverse depth rho (h, w)) into camera j and its Jacobians as
    the solver's kernel defines them (kernels.reference.ba_jacobians): uv (h, w, 2), J_j (h, w, 2, 6),
    J_rho (h, w, 2), valid (h, w), Adj(T_ji) (6, 6)."""
    T = se3_mul(Tj, se3_inv(Ti))
    rel = torch.cat([quat_to_matrix(T[3:]), T[:3, None]], dim=-1)[None]
    zeros = torch.zeros(1, *rho.shape, 2, dtype=rho.dtype)
    J, J_rho, r, valid = reference.ba_jacobians(rho[None], rel, intr, zeros, 0.1)
    return -r[0], J[0], J_rho[0], valid[0], se3_adjoint(T)


def test_jacobians_match_finite_differences():
    poses, inv, *_ = _scene()
    g = torch.Generator().manual_seed(5)
    rays = pixel_rays(KI, H, W, D, torch.device("cpu"))
    rho = inv[0] * (1 + 0.1 * torch.rand(inv[0].shape, generator=g, dtype=D))
    Ti, Tj = poses[0] * 1, se3_mul(se3_exp(torch.tensor([0.1, -0.05, 0.2, 0.1, 0.2, -0.1], dtype=D)), poses[2])

    def uv_of(Ti_, Tj_, rho_):
        return _edge_terms(rho_, Ti_, Tj_)[0]

    uv, J_j, J_rho, valid, adj = _edge_terms(rho, Ti, Tj)
    assert bool(valid.all())
    J_i = -J_j @ adj  # the source pose's Jacobian, as the solver uses it
    # the brief's form: d pi / dX (-R_ji [rho I, -[x]x]) with X = R_ji x + rho t_ji
    T = se3_mul(Tj, se3_inv(Ti))
    R = quat_to_matrix(T[3:])
    X = rays @ R.T + rho[..., None] * T[:3]
    Jp = project(X, KI, jacobian=True)[1]
    dX_di = -R @ torch.cat([rho[..., None, None] * torch.eye(3, dtype=D), -skew(rays)], dim=-1)
    torch.testing.assert_close(J_i, Jp @ dX_di)
    torch.testing.assert_close(uv, project(X, KI))
    eps = 1e-6
    for k in range(6):
        d = torch.zeros(6, dtype=D)
        d[k] = eps
        num_i = (uv_of(se3_mul(se3_exp(d), Ti), Tj, rho) - uv_of(se3_mul(se3_exp(-d), Ti), Tj, rho)) / (2 * eps)
        num_j = (uv_of(Ti, se3_mul(se3_exp(d), Tj), rho) - uv_of(Ti, se3_mul(se3_exp(-d), Tj), rho)) / (2 * eps)
        torch.testing.assert_close(J_i[..., k], num_i, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(J_j[..., k], num_j, rtol=1e-6, atol=1e-6)
    num_rho = (uv_of(Ti, Tj, rho + eps) - uv_of(Ti, Tj, rho - eps)) / (2 * eps)
    torch.testing.assert_close(J_rho, num_rho, rtol=1e-6, atol=1e-6)
    assert float(J_i.abs().max()) > 1.0 and float(J_rho.abs().max()) > 0.1  # not trivially zero


# ------------------------------------------------------------------------------------------ convergence


def test_converges_to_the_truth_where_alternation_crawls():
    poses, inv, ii, jj, targets, weights = _scene()
    p0, i0 = _scaled_start(poses, inv, scale=1.2, noise=0.05)
    prior, pw = inv.clone(), torch.full_like(inv, 1e-2)  # weak prior at the true scale
    n = 4
    pj, ij = window_bundle_adjust(p0, i0, KI, ii, jj, targets, weights, prior, pw,
                                  dataclasses.replace(PLAIN, iterations=n))
    joint_pose, joint_depth = _pose_error(pj, poses), float((ij / inv - 1).abs().max())
    assert _pose_error(p0, poses) > 0.02 and float((i0 / inv - 1).abs().mean()) > 0.1  # the start was far off
    assert joint_pose < 1e-4 and joint_depth < 1e-3
    assert torch.equal(pj[0], p0[0])

    # block coordinate descent with the same number of rounds (each: 3 depth steps with every pose fixed,
    # then 2 pose steps with the depth fixed)
    pa, ia = p0.clone(), i0.clone()
    dopts = dataclasses.replace(PLAIN, iterations=3, fixed_poses=poses.shape[0])
    gopts = GNOptions(iterations=2, fixed_poses=1)
    w2 = weights[..., None].expand(-1, -1, -1, 2).contiguous()
    for _ in range(n):
        _, ia = window_bundle_adjust(pa, ia, KI, ii, jj, targets, weights, prior, pw, dopts)
        pa, _ = gauss_newton(pa, ia[ii].contiguous(), KI, targets, w2, ii, jj, gopts)
    alt_pose, alt_depth = _pose_error(pa, poses), float((ia / inv - 1).abs().max())
    assert alt_pose > 100 * joint_pose and alt_depth > 100 * joint_depth
    assert alt_depth > 0.05  # still near the wrong scale


def test_stride_carries_the_relative_change_to_every_pixel():
    poses, inv, ii, jj, targets, weights = _scene(seed=1)
    p0, i0 = _scaled_start(poses, inv, scale=0.85)  # exact up to scale: the ratio is constant
    pj, ij = window_bundle_adjust(p0, i0.float(), KI.float(), ii, jj, targets.float(), weights.float(), inv,
                                  torch.full_like(inv, 1e-2), dataclasses.replace(PLAIN, iterations=4, stride=2))
    assert ij.dtype == torch.float32 and ij.shape == inv.shape and pj.dtype == D
    assert float((ij.double() / inv - 1).abs().max()) < 1e-4
    assert _pose_error(pj, poses) < 1e-4


def test_stride_keeps_detail_finer_than_the_stride():
    """A pattern in the starting depth finer than the stride survives: the solved relative change is
    interpolated between the optimised pixels, not the depth itself."""
    poses, inv, ii, jj, targets, weights = _scene(seed=2)
    v, u = torch.meshgrid(torch.arange(H, dtype=D), torch.arange(W, dtype=D), indexing="ij")
    checker = 1.0 + 0.05 * ((u + v) % 2)
    opts = dataclasses.replace(PLAIN, iterations=4, stride=2, fixed_poses=poses.shape[0])
    weak = torch.full_like(inv, 1e-8)
    _, plain = window_bundle_adjust(poses, inv * 0.8, KI, ii, jj, targets, weights, inv * 0.8, weak, opts)
    _, detailed = window_bundle_adjust(poses, inv * 0.8 * checker, KI, ii, jj, targets, weights,
                                       inv * 0.8 * checker, weak, opts)
    assert float((plain / inv - 1).abs().median()) < 1e-3  # the flow corrected the scale of the start
    torch.testing.assert_close(detailed / plain, checker.expand_as(inv), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ behaviour


def test_tight_prior_holds_the_depth():
    poses, inv, ii, jj, targets, weights = _scene(seed=2)
    prior = inv * 1.1
    _, out = window_bundle_adjust(poses, inv, KI, ii, jj, targets, weights, prior, torch.full_like(inv, 1e10), PLAIN)
    torch.testing.assert_close(out, prior, rtol=1e-6, atol=0)


def test_inverse_depth_steps_are_limited():
    poses, inv, ii, jj, targets, weights = _scene(seed=2)
    start = inv * 0.5  # the prior says twice as much: the step is clamped to +10 %
    opts = dataclasses.replace(PLAIN, iterations=1, max_step=0.1)
    _, out = window_bundle_adjust(poses, start, KI, ii, jj, targets, weights, inv, torch.full_like(inv, 1e6), opts)
    torch.testing.assert_close(out, start * 1.1)
    opts = dataclasses.replace(opts, max_step=10.0, min_inv_depth=0.3)
    _, out = window_bundle_adjust(poses, start, KI, ii, jj, targets, weights, torch.full_like(inv, -1.0),
                                  torch.full_like(inv, 1e6), opts)
    torch.testing.assert_close(out, torch.full_like(inv, 0.3))  # the floor


def test_pose_steps_are_limited():
    """A pose step longer than max_translation_step / max_rotation_step is scaled down to it."""
    poses, inv, ii, jj, targets, weights = _scene(seed=4)
    p0 = poses.clone()
    p0[1] = se3_mul(se3_exp(torch.tensor([0.3, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=D)), poses[1])
    pw = torch.full_like(inv, 1e6)  # depth held: the step is the pose's
    one = dataclasses.replace(PLAIN, iterations=1)
    free, _ = window_bundle_adjust(p0, inv, KI, ii, jj, targets, weights, inv, pw, one)
    assert _pose_error(free, poses) < 0.03  # unconstrained, one step nearly undoes the 0.3 shift
    opts = dataclasses.replace(PLAIN, iterations=1, max_translation_step=0.05)
    out, _ = window_bundle_adjust(p0, inv, KI, ii, jj, targets, weights, inv, pw, opts)
    steps = se3_log(se3_mul(out, se3_inv(p0)))
    assert float(steps[:, :3].norm(dim=-1).max()) == pytest.approx(0.05, rel=1e-6)
    free_steps = se3_log(se3_mul(free, se3_inv(p0)))
    limit = 0.5 * float(free_steps[:, 3:].norm(dim=-1).max())
    opts = dataclasses.replace(PLAIN, iterations=1, max_rotation_step=limit)
    out, _ = window_bundle_adjust(p0, inv, KI, ii, jj, targets, weights, inv, pw, opts)
    steps = se3_log(se3_mul(out, se3_inv(p0)))
    assert float(steps[:, 3:].norm(dim=-1).max()) == pytest.approx(limit, rel=1e-6)
    # the whole step is scaled, its translation too
    assert float(steps[:, :3].norm(dim=-1).max()) < 0.6 * float(free_steps[:, :3].norm(dim=-1).max())


def test_fixed_poses_do_not_move():
    poses, inv, ii, jj, targets, weights = _scene(seed=3, n_kf=3, n_frames=2)
    p0, i0 = _scaled_start(poses, inv, scale=1.0, noise=0.1)
    p0[1] = se3_mul(se3_exp(torch.tensor([0.02, 0, 0, 0, 0.01, 0], dtype=D)), p0[1])
    out, _ = window_bundle_adjust(p0, i0, KI, ii, jj, targets, weights, inv, torch.full_like(inv, 1e-2),
                                  dataclasses.replace(PLAIN, fixed_poses=2))
    assert torch.equal(out[:2], p0[:2])
    assert float((out[2:] - p0[2:]).abs().max()) > 1e-3  # the free ones do


def test_zero_weights_change_nothing_and_stay_finite():
    poses, inv, ii, jj, targets, weights = _scene(seed=4)
    targets = targets.clone()
    targets[0, :3] = float("nan")
    p0, i0 = _scaled_start(poses, inv, noise=0.1)
    out_p, out_i = window_bundle_adjust(p0, i0, KI, ii, jj, targets, torch.zeros_like(weights), i0,
                                        torch.ones_like(i0), WindowBAOptions())
    assert bool(torch.isfinite(out_p).all()) and bool(torch.isfinite(out_i).all())
    torch.testing.assert_close(out_p, p0, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_i, i0, rtol=0, atol=1e-12)
    # NaN targets where the weight is positive are ignored too
    _, out_i = window_bundle_adjust(poses, inv, KI, ii, jj, targets, weights, inv, torch.ones_like(inv))
    assert bool(torch.isfinite(out_i).all())


def test_non_finite_depths_priors_and_prior_weights_give_finite_results():
    """A NaN starting depth starts at the prior; a NaN or inf prior (or weight) is no prior; nothing raises."""
    poses, inv, ii, jj, targets, weights = _scene(seed=6)
    p0, i0 = _scaled_start(poses, inv, scale=1.0, noise=0.05)
    prior, pw = inv.clone(), torch.full_like(inv, 1e-2)
    i0[0, 2, 3] = float("nan")
    prior[1, 4, 5] = float("nan")
    pw[2, 6, 7] = float("inf")
    out_p, out_i = window_bundle_adjust(p0, i0, KI, ii, jj, targets, weights, prior, pw, PLAIN)
    assert bool(torch.isfinite(out_p).all()) and bool(torch.isfinite(out_i).all())
    assert _pose_error(out_p, poses) < 1e-3  # the rest of the problem is solved as usual
    # a system that is not finite (here: NaN intrinsics) is not solved: the poses stay, nothing raises
    nan_k = KI.clone()
    nan_k[0] = float("nan")
    out_p, _ = window_bundle_adjust(p0, inv, nan_k, ii, jj, targets, weights, prior, pw, PLAIN)
    torch.testing.assert_close(out_p, p0, rtol=0, atol=1e-12)


def test_computing_the_couplings_again_gives_the_same_step():
    """keep_couplings=False (a global adjustment's memory) recomputes each keyframe's couplings for the
    back-substitution instead of holding them: the same poses and depths."""
    poses, inv, ii, jj, targets, weights = _scene(n_kf=3, n_frames=2, seed=8)
    p0, i0 = _scaled_start(poses, inv, scale=1.1, noise=0.05)
    prior, pw = inv * 1.02, torch.full_like(inv, 0.5)
    opts = WindowBAOptions(iterations=2, stride=2)
    kept = window_bundle_adjust(p0, i0, KI, ii, jj, targets.float(), weights.float(), prior, pw, opts)
    again = window_bundle_adjust(p0, i0, KI, ii, jj, targets.float(), weights.float(), prior, pw,
                                 dataclasses.replace(opts, keep_couplings=False))
    for a, b in zip(kept, again, strict=True):
        assert torch.equal(a, b)
    assert _pose_error(kept[0], p0) > 1e-3  # a real step


def test_cauchy_resists_outlier_targets():
    poses, inv, ii, jj, targets, weights = _scene(seed=5)
    g = torch.Generator().manual_seed(9)
    bad = torch.rand(weights.shape, generator=g) < 0.15  # 15 % of the targets off by ~10 px
    corrupt = targets + bad[..., None] * 10.0 * torch.randn(targets.shape, generator=g, dtype=D)
    p0, i0 = _scaled_start(poses, inv, scale=1.0, noise=0.05)
    prior, pw = inv.clone(), 1.0 / (0.3 * inv) ** 2  # a 30 % prior, as the SLAM front end uses
    opts = WindowBAOptions(iterations=5, stride=1, robust_scale=1.0)
    pr, ir = window_bundle_adjust(p0, i0, KI, ii, jj, corrupt, weights, prior, pw, opts)
    pl, il = window_bundle_adjust(p0, i0, KI, ii, jj, corrupt, weights, prior, pw,
                                  dataclasses.replace(opts, robust_scale=0.0))
    err_r, err_l = _pose_error(pr, poses), _pose_error(pl, poses)
    dep_r, dep_l = float((ir / inv - 1).abs().median()), float((il / inv - 1).abs().median())
    assert err_r < 0.01 and err_r < 0.1 * err_l
    assert dep_r < 0.005 and dep_r < 0.1 * dep_l


def test_shape_errors():
    poses, inv, ii, jj, targets, weights = _scene(n_kf=2, n_frames=1)
    args = dict(poses_cw=poses, inv_depth=inv, intrinsics=KI, ii=ii, jj=jj, targets=targets, weights=weights,
                prior=inv, prior_weight=torch.ones_like(inv))
    bad = [
        dict(poses_cw=poses[:, :6]),
        dict(inv_depth=inv[0]),
        dict(intrinsics=KI[:3]),
        dict(targets=targets[..., :1]),
        dict(weights=weights[:, :-1]),
        dict(prior=inv[:1]),
        dict(prior_weight=torch.ones(2, H, W + 1, dtype=D)),
        dict(ii=ii.int()),
        dict(ii=torch.full_like(ii, 2)),  # node 2 has no depth
        dict(jj=torch.full_like(jj, 7)),
        dict(jj=ii.clone()),  # self edges
        dict(ii=ii[:0], jj=jj[:0], targets=targets[:0], weights=weights[:0]),
    ]
    for change in bad:
        with pytest.raises(ShapeError):
            window_bundle_adjust(**{**args, **change})
    for opts in (WindowBAOptions(stride=0), WindowBAOptions(fixed_poses=4), WindowBAOptions(min_depth=0.0),
                 WindowBAOptions(robust_scale=-1.0)):
        with pytest.raises(ShapeError):
            window_bundle_adjust(**args, opts=opts)


# ------------------------------------------------------------------------------------------ Schur = dense


def test_schur_step_equals_the_dense_solve():
    """One step on a tiny problem equals solving the full (poses + pixels) damped normal equations."""
    h, w = 6, 8
    intr = torch.tensor([8.0, 8.0, 3.5, 2.5], dtype=D)
    poses, inv, ii, jj, targets, weights = _scene(n_kf=2, n_frames=1, seed=6, h=h, w=w, intr=intr)
    g = torch.Generator().manual_seed(2)
    targets = targets + 0.3 * torch.randn(targets.shape, generator=g, dtype=D)  # a non-zero residual
    weights = weights * (0.5 + torch.rand(weights.shape, generator=g, dtype=D))
    p0, i0 = _scaled_start(poses, inv, scale=1.05, noise=0.05)
    prior = inv * 1.03
    pw = 0.1 + torch.rand(inv.shape, generator=g, dtype=D)
    opts = WindowBAOptions(iterations=1, robust_scale=0.0, stride=1, max_step=1e9, damping=1e-3, fixed_poses=1)
    out_p, out_i = window_bundle_adjust(p0, i0, intr, ii, jj, targets, weights, prior, pw, opts)

    N, Kf, P = p0.shape[0], inv.shape[0], h * w
    nv = 6 * N + Kf * P
    rows_J, rows_r, rows_w = [], [], []
    for e in range(ii.shape[0]):
        i, j = int(ii[e]), int(jj[e])
        uv, J_j, J_rho, valid, adj = _edge_terms(i0[i], p0[i], p0[j], intr)
        J_j, J_rho, uv = J_j.reshape(P, 2, 6), J_rho.reshape(P, 2), uv.reshape(P, 2)
        ok = (weights[e].reshape(-1) > 0) & valid.reshape(-1)
        J = torch.zeros(P, 2, nv, dtype=D)
        J[:, :, 6 * i:6 * i + 6] = -J_j @ adj
        J[:, :, 6 * j:6 * j + 6] = J_j
        J[torch.arange(P), :, 6 * N + i * P + torch.arange(P)] = J_rho
        rows_J.append(J.reshape(2 * P, nv))
        rows_r.append((targets[e].reshape(-1, 2) - uv).reshape(-1))
        rows_w.append((weights[e].reshape(-1) * ok).repeat_interleave(2))
    Jp = torch.zeros(Kf * P, nv, dtype=D)
    Jp[:, 6 * N:] = torch.eye(Kf * P, dtype=D)
    Jall = torch.cat(rows_J + [Jp])
    r = torch.cat(rows_r + [(prior - i0).reshape(-1)])
    wt = torch.cat(rows_w + [pw.reshape(-1)])
    Hf = Jall.T @ (wt[:, None] * Jall)
    gf = Jall.T @ (wt * r)
    pose_diag = torch.arange(6 * N)
    Hf[pose_diag, pose_diag] += opts.damping + _LM_SCALE * Hf[pose_diag, pose_diag]
    free = torch.arange(6 * opts.fixed_poses, nv)
    x = torch.linalg.solve(Hf[free][:, free], gf[free])
    dxi = x[: 6 * (N - opts.fixed_poses)].reshape(-1, 6)
    drho = x[6 * (N - opts.fixed_poses):].reshape(Kf, h, w)
    expect_p = torch.cat([p0[:1], se3_mul(se3_exp(dxi), p0[1:])])
    assert float(dxi.abs().max()) > 1e-3 and float(drho.abs().max()) > 1e-3  # a real step
    torch.testing.assert_close(out_p, expect_p, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out_i, i0 + drho, rtol=1e-8, atol=1e-10)

"""The differentiable Gauss-Newton layer: blocks, convergence, robustness, gradients, bad input."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from kernels import ops
from kernels.errors import NumericalError, ShapeError
from v2d.geometry.gauss_newton import GNOptions, assemble_system, gauss_newton, gn_accumulate, gn_step
from v2d.geometry.lie import se3_exp, se3_inv, se3_log, se3_mul, se3_random

BACKENDS = [
    "reference",
    pytest.param(
        "extension", marks=pytest.mark.skipif(not ops.extension_available(), reason="kernels._C is not built")
    ),
]


def scene(H: int = 24, W: int = 32, N: int = 4, seed: int = 0, dtype=torch.float64):
    """A keyframe depth map (slanted plane with bumps, depth 2-4) and GT poses of N cameras.

    Returns inv_depth (H, W), intrinsics (4,), poses_cw (N, 7) with poses_cw[0] = identity.
    """
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(0, 1, H, dtype=dtype), torch.linspace(0, 1, W, dtype=dtype), indexing="ij")
    depth = 2.5 + 0.8 * u + 0.3 * torch.sin(6 * v) * torch.cos(5 * u)
    intr = torch.tensor([0.9 * W, 0.9 * W, (W - 1) / 2, (H - 1) / 2], dtype=dtype)
    poses = se3_random(N, rot_scale=math.radians(5), trans_scale=0.3, generator=g, dtype=dtype)
    poses[0] = torch.tensor([0, 0, 0, 0, 0, 0, 1.0], dtype=dtype)
    return 1.0 / depth, intr, poses


def project_targets(inv_depth, intr, poses_cw, ii, jj):
    """Exact target coordinates (E, H, W, 2) of keyframe pixels under the given poses."""
    from kernels.reference import gn_jacobians
    from v2d.geometry.camera import pose_to_rt

    E = ii.shape[0]
    rel = pose_to_rt(se3_mul(poses_cw[jj], se3_inv(poses_cw[ii])))
    zeros = torch.zeros(E, *inv_depth.shape, 2, dtype=inv_depth.dtype)
    _, r, valid = gn_jacobians(inv_depth.expand(E, -1, -1), rel, intr.expand(E, 4), zeros, 1e-3, False)
    assert valid.all()
    return -r  # r = 0 - pi(P)


def perturb(poses_cw, rot_deg: float, trans: float, seed: int, fixed: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = se3_random(
        poses_cw.shape[0], rot_scale=math.radians(rot_deg), trans_scale=trans, generator=g, dtype=poses_cw.dtype
    )
    out = se3_mul(noise, poses_cw)
    out[:fixed] = poses_cw[:fixed]
    return out


def pose_error(a, b):
    return se3_log(se3_mul(a, se3_inv(b))).norm(dim=-1).max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_focal", [False, True])
def test_blocks_equal_autograd_jacobians_of_the_residual(backend, with_focal):
    """H_ab = J_a^T W J_b and b_a = -J_a^T W r where J_a = d r / d xi_a by autograd."""
    inv_depth, intr, poses = scene(H=5, W=6, N=3)
    ii, jj = torch.tensor([1, 0]), torch.tensor([2, 2])
    E = 2
    g = torch.Generator().manual_seed(4)
    targets = project_targets(inv_depth, intr, poses, ii, jj) + torch.randn(
        E, 5, 6, 2, generator=g, dtype=torch.float64
    )
    weights = torch.rand(E, 5, 6, 2, generator=g, dtype=torch.float64)
    blocks = gn_accumulate(
        poses, inv_depth.expand(E, -1, -1), intr, targets, weights, ii, jj, with_focal=with_focal, backend=backend
    )
    from kernels.reference import gn_jacobians
    from v2d.geometry.camera import pose_to_rt

    for e in range(E):

        def residual(xi, e=e):
            Ti = se3_mul(se3_exp(xi[:6]), poses[ii[e]])
            Tj = se3_mul(se3_exp(xi[6:12]), poses[jj[e]])
            s = xi[12]
            k = intr * torch.stack([s.exp(), s.exp(), s.new_ones(()), s.new_ones(())])
            rel = pose_to_rt(se3_mul(Tj, se3_inv(Ti)))[None]
            _, r, _ = gn_jacobians(inv_depth[None], rel, k[None], targets[e : e + 1], 1e-3, False)
            return r[0].reshape(-1)

        x0 = torch.zeros(13, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(residual, x0)  # (HW*2, 13)
        r = residual(x0)
        w = weights[e].reshape(-1)
        Ji, Jj, Jf = J[:, :6], J[:, 6:12], J[:, 12:]
        assert torch.allclose(blocks.H_ii[e], Ji.T @ (w[:, None] * Ji), rtol=1e-8, atol=1e-6)
        assert torch.allclose(blocks.H_ij[e], Ji.T @ (w[:, None] * Jj), rtol=1e-8, atol=1e-6)
        assert torch.allclose(blocks.H_jj[e], Jj.T @ (w[:, None] * Jj), rtol=1e-8, atol=1e-6)
        assert torch.allclose(blocks.b_i[e], -Ji.T @ (w * r), rtol=1e-8, atol=1e-6)
        assert torch.allclose(blocks.b_j[e], -Jj.T @ (w * r), rtol=1e-8, atol=1e-6)
        if with_focal:
            assert torch.allclose(blocks.H_ff[e], (Jf.T @ (w[:, None] * Jf))[0, 0], rtol=1e-8)
            assert torch.allclose(blocks.H_fi[e], (Jf.T @ (w[:, None] * Ji))[0], rtol=1e-8, atol=1e-6)
            assert torch.allclose(blocks.H_fj[e], (Jf.T @ (w[:, None] * Jj))[0], rtol=1e-8, atol=1e-6)
            assert torch.allclose(blocks.b_f[e], -(Jf.T @ (w * r))[0], rtol=1e-8, atol=1e-6)
        else:
            assert blocks.H_ff is None


def test_assembled_system_is_symmetric_and_sums_duplicate_edges():
    inv_depth, intr, poses = scene(H=6, W=8, N=3)
    ii, jj = torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2])
    targets = project_targets(inv_depth, intr, poses, ii, jj) + 0.5
    weights = torch.ones(3, 6, 8, 2, dtype=torch.float64)
    blocks = gn_accumulate(
        poses[None], inv_depth.expand(1, 3, -1, -1), intr[None], targets[None], weights[None], ii, jj, with_focal=True
    )
    H, b = assemble_system(blocks, ii, jj, 3)
    assert H.shape == (1, 19, 19) and b.shape == (1, 19)
    assert torch.allclose(H, H.transpose(-1, -2))
    assert torch.allclose(H[0, 0:6, 6:12], blocks.H_ij[0, 0] + blocks.H_ij[0, 1])
    assert torch.allclose(H[0, 6:12, 6:12], blocks.H_jj[0, 0] + blocks.H_jj[0, 1] + blocks.H_ii[0, 2])
    assert torch.allclose(b[0, 18], blocks.b_f[0].sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recovers_perturbed_poses_from_exact_targets(backend, dtype):
    """Rotation up to 10 degrees and translation up to 20 % of the scene depth: < 1e-4 in <= 10 steps."""
    inv_depth, intr, gt = scene(N=4)
    ii, jj = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([1, 2, 3, 2, 3])  # keyframe edges + two more
    targets = project_targets(inv_depth, intr, gt, torch.zeros_like(ii), jj)  # all from the keyframe depth
    ii = torch.zeros_like(ii)
    weights = torch.ones_like(targets)
    mean_depth = (1 / inv_depth).mean().item()
    init = perturb(gt, 10.0, 0.2 * mean_depth, seed=1)
    assert pose_error(init, gt) > 0.05
    opts = GNOptions(iterations=10)
    est, _ = gauss_newton(
        init.to(dtype),
        inv_depth.expand(5, -1, -1).to(dtype),
        intr.to(dtype),
        targets.to(dtype),
        weights.to(dtype),
        ii,
        jj,
        opts,
        backend=backend,
    )
    tol = 1e-4 if dtype == torch.float64 else 2e-4
    assert pose_error(est.double(), gt) < tol
    assert torch.equal(est[0], init[0].to(dtype))  # the fixed pose does not move


def test_tolerance_stops_at_convergence_only_without_autograd(monkeypatch):
    """With a tolerance and no autograd the loop stops once a step is that small: fewer kernel calls,
    poses within the tolerance of running every step; with autograd (training) every step runs."""
    import importlib

    gn_mod = importlib.import_module("v2d.geometry.gauss_newton")
    inv_depth, intr, gt = scene(N=3, seed=4)
    ii, jj = torch.tensor([0, 0]), torch.tensor([1, 2])
    targets = project_targets(inv_depth, intr, gt, ii, jj)
    weights = torch.ones_like(targets)
    init = perturb(gt, 3.0, 0.05, seed=2)
    args = (inv_depth.expand(2, -1, -1).double(), intr.double(), targets.double(), weights.double(), ii, jj)
    calls = []
    real = gn_mod.gn_accumulate
    monkeypatch.setattr(gn_mod, "gn_accumulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    full = GNOptions(iterations=12)
    with torch.no_grad():
        every, _ = gauss_newton(init.double(), *args, full)
        assert len(calls) == 12
        calls.clear()
        early, _ = gauss_newton(init.double(), *args, dataclasses.replace(full, tolerance=1e-8))
        stopped_after = len(calls)
    assert 2 <= stopped_after < 12  # Gauss-Newton on exact targets converges quadratically
    assert pose_error(early, every) < 1e-8 and pose_error(early, gt) < 1e-6
    calls.clear()
    trained, _ = gauss_newton(init.double().requires_grad_(), *args, dataclasses.replace(full, tolerance=1e-8))
    assert len(calls) == 12 and trained.requires_grad


def test_converges_with_30_percent_downweighted_outliers():
    inv_depth, intr, gt = scene(N=3, seed=2)
    jj = torch.tensor([1, 2])
    ii = torch.zeros_like(jj)
    targets = project_targets(inv_depth, intr, gt, ii, jj)
    g = torch.Generator().manual_seed(7)
    outlier = torch.rand(targets.shape[:-1], generator=g) < 0.3
    junk = torch.rand(targets.shape, generator=g, dtype=torch.float64) * torch.tensor([32.0, 24.0], dtype=torch.float64)
    targets = torch.where(outlier[..., None], junk, targets)
    weights = torch.where(outlier[..., None], 1e-3, 1.0).expand_as(targets).to(torch.float64).contiguous()
    init = perturb(gt, 10.0, 0.5, seed=3)
    est, _ = gauss_newton(init, inv_depth.expand(2, -1, -1), intr, targets, weights, ii, jj, GNOptions(iterations=10))
    assert pose_error(est, gt) < 2e-3
    # Without down-weighting the outliers the same problem does not reach that accuracy.
    est_bad, _ = gauss_newton(
        init, inv_depth.expand(2, -1, -1), intr, targets, torch.ones_like(weights), ii, jj, GNOptions(iterations=10)
    )
    assert pose_error(est_bad, gt) > 10 * pose_error(est, gt)


def test_uncalibrated_mode_recovers_the_focal_length():
    inv_depth, intr_true, gt = scene(N=4, seed=5)
    jj = torch.tensor([1, 2, 3])
    ii = torch.zeros_like(jj)
    targets = project_targets(inv_depth, intr_true, gt, ii, jj)
    weights = torch.ones_like(targets)
    intr0 = intr_true * torch.tensor([0.9, 0.9, 1, 1], dtype=torch.float64)
    opts = GNOptions(iterations=15, optimize_focal=True)
    # The depth map is given in the true calibration; the focal error moves the back-projection.
    est, intr = gauss_newton(
        perturb(gt, 3.0, 0.1, seed=6), inv_depth.expand(3, -1, -1), intr0, targets, weights, ii, jj, opts
    )
    assert abs(intr[0].item() / intr_true[0].item() - 1) < 1e-4
    assert pose_error(est, gt) < 1e-4


def test_batched_equals_unbatched():
    inv_depth, intr, gt = scene(H=8, W=10, N=3)
    jj = torch.tensor([1, 2])
    ii = torch.zeros_like(jj)
    targets = project_targets(inv_depth, intr, gt, ii, jj)
    weights = torch.ones_like(targets)
    init = perturb(gt, 5.0, 0.2, seed=8)
    one, _ = gn_step(init, inv_depth.expand(2, -1, -1), intr, targets, weights, ii, jj)
    two, _ = gn_step(
        torch.stack([init, gt]),
        inv_depth.expand(2, 2, -1, -1),
        intr.expand(2, 4),
        targets.expand(2, -1, -1, -1, -1),
        weights.expand(2, -1, -1, -1, -1),
        ii,
        jj,
    )
    assert torch.allclose(two[0], one)
    assert pose_error(two[1], gt) < 1e-9  # already at the optimum: stays


def test_singular_system_takes_a_zero_step(caplog):
    inv_depth, intr, gt = scene(H=6, W=8, N=2)
    ii, jj = torch.tensor([0]), torch.tensor([1])
    targets = project_targets(inv_depth, intr, gt, ii, jj)
    opts = GNOptions(damping=0.0, damping_scale=0.0)
    with caplog.at_level(logging.WARNING):
        est, _ = gn_step(gt, inv_depth[None], intr, targets, torch.zeros_like(targets), ii, jj, opts)
    assert torch.isfinite(est).all() and torch.allclose(est, gt)
    assert "singular" in caplog.text


def test_steps_are_clipped():
    inv_depth, intr, gt = scene(H=8, W=10, N=2)
    ii, jj = torch.tensor([0]), torch.tensor([1])
    targets = project_targets(inv_depth, intr, gt, ii, jj)
    init = perturb(gt, 30.0, 1.0, seed=9)
    opts = GNOptions(max_translation_step=0.01, max_rotation_step=0.01)
    est, _ = gn_step(init, inv_depth[None], intr, targets, torch.ones_like(targets), ii, jj, opts)
    xi = se3_log(se3_mul(est, se3_inv(init)))[1]  # est = exp(xi) init exactly
    assert abs(xi[3:].norm().item() - 0.01) < 1e-9  # the rotation step was clipped
    assert abs(xi[:3].norm().item() - 0.01) < 1e-9  # and so was the translation step
    free = gn_step(init, inv_depth[None], intr, targets, torch.ones_like(targets), ii, jj)[0]
    assert se3_log(se3_mul(free, se3_inv(init)))[1, 3:].norm() > 0.05  # unclipped, the step is longer


def test_focal_step_is_clamped():
    inv_depth, intr_true, gt = scene(H=8, W=10, N=2)
    ii, jj = torch.tensor([0]), torch.tensor([1])
    targets = project_targets(inv_depth, intr_true, gt, ii, jj)
    intr0 = intr_true * torch.tensor([0.8, 0.8, 1, 1], dtype=torch.float64)
    opts = GNOptions(optimize_focal=True, max_focal_step=0.01)
    _, intr = gn_step(gt, inv_depth[None], intr0, targets, torch.ones_like(targets), ii, jj, opts)
    assert torch.allclose(intr[:2] / intr0[:2], torch.full((2,), math.exp(0.01), dtype=torch.float64))
    assert torch.equal(intr[2:], intr0[2:])


def test_damped_solve_levels_and_damping_scale():
    from v2d.geometry.gauss_newton import _damped_solve

    b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # Indefinite at the configured damping, positive definite one level (x10) up.
    H = torch.tensor([[[1.0, 0.0], [0.0, -1e-3]]], dtype=torch.float64)
    x = _damped_solve(H, b, GNOptions(damping=1e-4))
    lam = 10 * 1e-4 + 1e-5 * 0.5005  # level 1: 10 x damping + 1e-5 x mean |diag|
    assert torch.allclose(x, b / (torch.diagonal(H[0]) + lam))
    # damping_scale adds a multiple of diag(H): diagonal H, mu = 1 halves the step.
    Hd = torch.diag(torch.tensor([2.0, 5.0], dtype=torch.float64))[None]
    x = _damped_solve(Hd, b, GNOptions(damping=0.0, damping_scale=1.0))
    assert torch.allclose(x, b / (2 * torch.diagonal(Hd[0])))


def test_a_singular_batch_item_does_not_poison_the_others_gradients(caplog):
    inv_depth, intr, gt = scene(H=6, W=8, N=2, seed=21)
    ii, jj = torch.tensor([0]), torch.tensor([1])
    targets = project_targets(inv_depth, intr, gt, ii, jj) + 0.2
    init = perturb(gt, 3.0, 0.05, seed=22)
    opts = GNOptions(damping=0.0)
    w_good = torch.ones_like(targets, requires_grad=True)
    w_batch = torch.stack([torch.zeros_like(targets), w_good])  # item 0: no valid pixel, H = 0
    with caplog.at_level(logging.WARNING):
        est, _ = gn_step(init.expand(2, -1, -1), inv_depth.expand(2, 1, -1, -1), intr.expand(2, 4),
                         targets.expand(2, -1, -1, -1, -1), w_batch, ii, jj, opts)
    assert "singular" in caplog.text
    assert torch.equal(est[0], init)  # zero step
    (g_batch,) = torch.autograd.grad(est[1].sum(), w_good)
    w_one = torch.ones_like(targets, requires_grad=True)
    one, _ = gn_step(init, inv_depth[None], intr, targets, w_one, ii, jj, opts)
    (g_one,) = torch.autograd.grad(one.sum(), w_one)
    assert torch.isfinite(g_batch).all() and g_batch.abs().max() > 0
    assert torch.allclose(g_batch, g_one)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_unrolled_layer(backend):
    """Gradients of the poses after two steps w.r.t. targets, weights, inverse depth and initial poses."""
    inv_depth, intr, gt = scene(H=3, W=4, N=2, seed=11)
    ii, jj = torch.tensor([0, 0]), torch.tensor([1, 1])
    g = torch.Generator().manual_seed(12)
    targets = project_targets(inv_depth, intr, gt, ii, jj) + 0.3 * torch.randn(
        2, 3, 4, 2, generator=g, dtype=torch.float64
    )
    weights = 0.5 + torch.rand(2, 3, 4, 2, generator=g, dtype=torch.float64)
    init = perturb(gt, 3.0, 0.05, seed=13)
    opts = GNOptions(iterations=2)

    def fn(t, w, d, p):
        est, _ = gauss_newton(p, d.expand(2, -1, -1).contiguous(), intr, t, w, ii, jj, opts, backend=backend)
        return est

    leaves = [x.clone().requires_grad_(True) for x in (targets, weights, inv_depth, init)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("iterations", [1, 2])
def test_gradcheck_focal_mode_including_intrinsics(iterations):
    # Uncalibrated mode, gradients to the intrinsics too; with two steps the second step's gradient
    # flows back through the first step's focal change into the kernel's intrinsics gradient.
    inv_depth, intr, gt = scene(H=3, W=4, N=2, seed=14 + iterations)
    ii, jj = torch.tensor([0]), torch.tensor([1])
    g = torch.Generator().manual_seed(15)
    targets = project_targets(inv_depth, intr, gt, ii, jj) + 0.3 * torch.randn(
        1, 3, 4, 2, generator=g, dtype=torch.float64
    )
    weights = 0.5 + torch.rand(1, 3, 4, 2, generator=g, dtype=torch.float64)
    opts = GNOptions(iterations=iterations, optimize_focal=True)

    def fn(k, t, w, d):
        return gauss_newton(gt, d[None], k, t, w, ii, jj, opts)

    leaves = [x.clone().requires_grad_(True) for x in (intr, targets, weights, inv_depth)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixels_with_nonpositive_inverse_depth_are_ignored_even_if_in_front(backend):
    # d = -0.5 puts the point 2 m behind the source camera; t_z = 5 moves it in front of the target.
    # Both implementations ignore it (d <= 0 is invalid), rather than one of them using it.
    inv_depth = torch.full((1, 3, 4), -0.5, dtype=torch.float64)
    rel = torch.cat([torch.eye(3, dtype=torch.float64), torch.tensor([[0.0], [0.0], [5.0]], dtype=torch.float64)], -1)
    intr = torch.tensor([[4.0, 4.0, 1.5, 1.0]], dtype=torch.float64)
    t = torch.rand(1, 3, 4, 2, dtype=torch.float64)
    H, b = ops.gn_reduce(inv_depth, rel[None].contiguous(), intr, t, torch.ones_like(t), backend=backend)
    assert not H.any() and not b.any()


def test_bad_inputs_name_the_argument():
    inv_depth, intr, gt = scene(H=4, W=5, N=2)
    ii, jj = torch.tensor([0]), torch.tensor([1])
    t = torch.zeros(1, 4, 5, 2, dtype=torch.float64)
    w = torch.ones_like(t)
    d = inv_depth[None]
    with pytest.raises(ShapeError, match=r"jj: indices must lie in \[0, 2\), got range \[5, 5\]"):
        gn_step(gt, d, intr, t, w, ii, torch.tensor([5]))
    with pytest.raises(ShapeError, match="ii: expected an int64 tensor"):
        gn_step(gt, d, intr, t, w, ii.int(), jj)
    with pytest.raises(ShapeError, match=r"poses_cw: expected \(N, 7\) or \(B, N, 7\), got \(2, 6\)"):
        gn_step(gt[:, :6], d, intr, t, w, ii, jj)
    with pytest.raises(ShapeError, match=r"targets: expected \(1, 4, 5, 2\)"):
        gn_step(gt, d, intr, t[..., :1], w, ii, jj)
    with pytest.raises(ShapeError, match=r"intrinsics: expected \(4,\) or \(B, 4\)"):
        gn_step(gt, d, intr[:3], t, w, ii, jj)
    with pytest.raises(ShapeError, match="inv_depth: expected"):
        gn_step(gt, inv_depth, intr, t, w, ii, jj)
    with pytest.raises(ShapeError, match="fixed_poses: expected 0..2, got 3"):
        gn_step(gt, d, intr, t, w, ii, jj, dataclasses.replace(GNOptions(), fixed_poses=3))
    with pytest.raises(ShapeError, match="iterations: expected >= 1, got 0"):
        gauss_newton(gt, d, intr, t, w, ii, jj, GNOptions(iterations=0))
    with pytest.raises(ShapeError, match="intrinsics: expected positive focal lengths"):
        gn_step(gt, d, intr * torch.tensor([0.0, 1, 1, 1], dtype=torch.float64), t, w, ii, jj)
    with pytest.raises(NumericalError, match="targets: gn_reduce got 1 non-finite value"):
        gn_step(gt, d, intr, t.index_put((torch.tensor([0]),) * 4, torch.tensor(float("nan"), dtype=t.dtype)),
                w, ii, jj)

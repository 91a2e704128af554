"""Per-pixel inverse-depth refinement with fixed poses (v2d.geometry.depth_refine)."""

from __future__ import annotations

import pytest
import torch

from v2d.errors import ShapeError
from v2d.geometry.camera import reproject, valid_reprojection
from v2d.geometry.depth_refine import DepthRefineOptions, refine_inverse_depth
from v2d.geometry.lie import se3_exp, se3_identity

H, W = 24, 32
K = torch.tensor([30.0, 30.0, 15.5, 11.5], dtype=torch.float64)


def _problem(edges: int = 3, seed: int = 0, rotation_only: bool = False):
    """True inverse depth (H, W), edges' relative poses and their exact targets/weights."""
    g = torch.Generator().manual_seed(seed)
    true = 1.0 / (1.5 + torch.rand(H, W, generator=g, dtype=torch.float64))
    xi = torch.randn(edges, 6, generator=g, dtype=torch.float64) * 0.1
    if rotation_only:
        xi[:, :3] = 0.0
    rel = se3_exp(xi)
    inv = true[None].expand(edges, H, W)
    targets, depth_j = reproject(inv, se3_identity((edges,), dtype=torch.float64), rel, K)
    weights = valid_reprojection(inv, targets, depth_j, 0.1).double()
    return true, rel, targets, weights


def _perturbed(true: torch.Tensor, amount: float = 0.3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return true * (1.0 + amount * torch.randn(true.shape, generator=g, dtype=true.dtype)).clamp(0.6, 1.4)


def test_recovers_the_true_inverse_depth_where_observed():
    true, rel, targets, weights = _problem()
    init = _perturbed(true)
    weak = torch.full((H, W), 1e-8, dtype=torch.float64)
    out = refine_inverse_depth(init, rel, K, targets, weights, init, weak, DepthRefineOptions(iterations=10))
    seen = weights.sum(0) > 0
    assert seen.float().mean() > 0.8
    err = (out / true - 1.0).abs()
    assert float(err[seen].max()) < 1e-5
    assert float((init / true - 1.0).abs()[seen].mean()) > 0.1  # the start was far off


def test_without_observations_the_prior_is_the_answer():
    true, rel, targets, _ = _problem()
    prior = _perturbed(true)
    start = prior * 1.1
    pw = torch.full((H, W), 100.0, dtype=torch.float64)
    out = refine_inverse_depth(start, rel, K, targets, torch.zeros(3, H, W, dtype=torch.float64), prior, pw)
    torch.testing.assert_close(out, prior)


def test_no_parallax_goes_to_the_prior_and_stays_finite():
    true, rel, targets, weights = _problem(rotation_only=True)
    prior = _perturbed(true)
    pw = torch.full((H, W), 1e-3, dtype=torch.float64)
    out = refine_inverse_depth(prior * 1.1, rel, K, targets, weights, prior, pw)  # the flow says nothing
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, prior)


def test_prior_and_flow_are_weighted_by_their_information():
    """One edge, linear regime: the result is the information-weighted mean of the two estimates."""
    true, rel, targets, weights = _problem(edges=1)
    prior = true * 1.02
    # a tiny step from the truth: the problem is nearly linear, so one Gauss-Newton step on
    # (flow information a, prior information b) gives (a * true + b * prior) / (a + b)
    J = _d_uv_d_rho(true, rel[0])
    a = (J ** 2).sum(-1)
    b = a.clone()  # equal information: halfway
    out = refine_inverse_depth(true, rel, K, targets, weights, prior, b, DepthRefineOptions(iterations=20,
                                                                                         robust_scale=0.0))
    seen = weights[0] > 0
    torch.testing.assert_close(out[seen], ((true + prior) / 2)[seen], rtol=2e-4, atol=0)


def _d_uv_d_rho(rho: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Finite-difference d uv / d rho of the reprojection (H, W, 2)."""
    eps = 1e-7
    ident = se3_identity((), dtype=torch.float64)
    up, _ = reproject(rho + eps, ident, rel, K)
    down, _ = reproject(rho - eps, ident, rel, K)
    return (up - down) / (2 * eps)


def test_an_outlier_edge_is_down_weighted():
    true, rel, targets, weights = _problem(edges=4, seed=3)
    bad = targets.clone()
    bad[0] += torch.tensor([8.0, -6.0], dtype=torch.float64)  # one edge's flow is wrong everywhere
    weak = torch.full((H, W), 1e-6, dtype=torch.float64)
    seen = (weights[1:] > 0).sum(0) >= 2
    errs = {}
    for c in (0.0, 1.0):
        out = refine_inverse_depth(true, rel, K, bad, weights, true, weak,
                                   DepthRefineOptions(iterations=15, robust_scale=c, max_step=0.1))
        errs[c] = float((out / true - 1.0).abs()[seen].median())
    assert errs[1.0] < 0.3 * errs[0.0]
    assert errs[0.0] > 0.05  # the outlier matters without re-weighting


def test_steps_are_limited():
    true, rel, targets, weights = _problem()
    start = true * 0.5
    weak = torch.full((H, W), 1e-8, dtype=torch.float64)
    out = refine_inverse_depth(start, rel, K, targets, weights, start, weak,
                               DepthRefineOptions(iterations=1, max_step=0.1))
    assert float((out / start - 1.0).abs().max()) <= 0.1 + 1e-9


def test_non_finite_targets_are_ignored():
    true, rel, targets, weights = _problem()
    targets = targets.clone()
    targets[1, :5] = float("nan")
    weak = torch.full((H, W), 1e-8, dtype=torch.float64)
    out = refine_inverse_depth(_perturbed(true), rel, K, targets, weights, true, weak,
                               DepthRefineOptions(iterations=10))
    assert bool(torch.isfinite(out).all())
    seen = weights.sum(0) > 0
    assert float((out / true - 1.0).abs()[seen].max()) < 1e-5


@pytest.mark.parametrize("what", ["inv", "rel", "intrinsics", "targets", "weights", "prior", "prior_weight", "empty"])
def test_shape_errors(what):
    true, rel, targets, weights = _problem()
    args = dict(inv_depth=true, rel_poses=rel, intrinsics=K, targets=targets, weights=weights, prior=true,
                prior_weight=torch.ones(H, W, dtype=torch.float64))
    bad = {"inv": ("inv_depth", true[None]), "rel": ("rel_poses", rel[:, :6]), "intrinsics": ("intrinsics", K[:3]),
           "targets": ("targets", targets[:2]), "weights": ("weights", weights[..., None]),
           "prior": ("prior", true[:-1]), "prior_weight": ("prior_weight", torch.ones(W, H, dtype=torch.float64)),
           "empty": ("rel_poses", rel[:0])}
    key, value = bad[what]
    args[key] = value
    if what == "empty":
        args.update(targets=targets[:0], weights=weights[:0])
    with pytest.raises(ShapeError):
        refine_inverse_depth(**args)


def test_stride_refines_a_smooth_surface_and_keeps_the_starting_detail():
    """A tilted plane: stride 2 recovers it; a fine pattern in the start survives as a relative change."""
    edges = 3
    g = torch.Generator().manual_seed(5)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    true = 1.0 / (2.0 + 0.02 * u + 0.01 * v)
    rel = se3_exp(torch.randn(edges, 6, generator=g, dtype=torch.float64) * 0.1)
    inv = true[None].expand(edges, H, W)
    targets, depth_j = reproject(inv, se3_identity((edges,), dtype=torch.float64), rel, K)
    weights = valid_reprojection(inv, targets, depth_j, 0.1).double()
    weak = torch.full((H, W), 1e-8, dtype=torch.float64)
    start = true * 0.8
    opts = DepthRefineOptions(iterations=10, stride=2)
    out = refine_inverse_depth(start, rel, K, targets, weights, start, weak, opts)
    seen = weights.sum(0) > 0
    assert float((out / true - 1.0).abs()[seen].median()) < 1e-3
    checker = 1.0 + 0.05 * ((u + v) % 2)  # detail finer than the stride
    out2 = refine_inverse_depth(start * checker, rel, K, targets, weights, start * checker, weak,
                                DepthRefineOptions(iterations=10, stride=2))
    ratio = out2 / out
    assert float((ratio[seen] / checker[seen] - 1.0).abs().max()) < 1e-3  # the pattern is carried through


def test_stride_one_and_stride_agree_at_the_refined_pixels():
    true, rel, targets, weights = _problem()
    init = _perturbed(true)
    pw = torch.full((H, W), 1.0, dtype=torch.float64)
    full = refine_inverse_depth(init, rel, K, targets, weights, init, pw)
    strided = refine_inverse_depth(init, rel, K, targets, weights, init, pw, DepthRefineOptions(stride=3))
    torch.testing.assert_close(strided[::3, ::3], full[::3, ::3])
    with pytest.raises(ShapeError):
        refine_inverse_depth(init, rel, K, targets, weights, init, pw, DepthRefineOptions(stride=0))


def test_upsample_is_bilinear_on_the_strided_grid():
    from v2d.geometry.depth_refine import _upsample

    for s, (h, w) in [(2, (12, 16)), (3, (5, 7))]:
        Hf, Wf = (h - 1) * s + 1 + (s - 1), (w - 1) * s + 1 + (s - 1)  # pixels beyond the last sample too
        i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
        ramp = 1.0 + 0.1 * i - 0.05 * j  # linear in the sample index: bilinear reproduces it exactly
        up = _upsample(ramp, s, Hf, Wf)
        v, u = torch.meshgrid(torch.arange(Hf, dtype=torch.float64), torch.arange(Wf, dtype=torch.float64),
                              indexing="ij")
        expected = 1.0 + 0.1 * (v / s).clamp(max=h - 1) - 0.05 * (u / s).clamp(max=w - 1)
        torch.testing.assert_close(up, expected)


def test_edges_with_the_point_behind_camera_j_are_ignored():
    """Validity is depth in camera j (Z_j = X_z / rho) against min_depth, not the homogeneous X_z."""
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    true = torch.full((H, W), 0.5, dtype=torch.float64)  # a wall 2 m away
    xi = torch.tensor([[0.3, 0.0, -0.5, 0.0, 0.0, 0.0],  # sideways and 0.5 m closer: Z_j = 1.5 m, valid
                       [0.0, 0.0, -1.8, 0.0, 0.0, 0.0]], dtype=torch.float64)  # 1.8 m closer: Z_j = 0.2 m
    rel = se3_exp(xi)
    inv = true[None].expand(2, H, W)
    targets, _ = reproject(inv, se3_identity((2,), dtype=torch.float64), rel, K)
    targets = targets.clone()
    targets[1] += 5.0  # the second edge's targets are wrong: it must not count
    weights = torch.ones(2, H, W, dtype=torch.float64)
    weak = torch.full((H, W), 1e-8, dtype=torch.float64)
    start = true * 0.9
    # min_depth 1 m: edge 0 (1.5 m in camera j, homogeneous X_z = 0.75) counts, edge 1 (0.2 m) does not
    out = refine_inverse_depth(start, rel, K, targets, weights, start, weak,
                               DepthRefineOptions(iterations=10, min_depth=1.0, robust_scale=0.0))
    seen = (targets[0, ..., 0] > 0) & (targets[0, ..., 0] < W - 1)
    assert seen.float().mean() > 0.3
    torch.testing.assert_close(out[seen], true[seen], rtol=1e-6, atol=0)

"""ba_reduce: the fused window-BA kernel against the reference that materialises per-pixel Jacobians."""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from kernels.errors import NumericalError, ShapeError
from tests.kernels.test_gn_reduce import _rotation

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="kernels._C is not built")


def make_inputs(K: int, ii: list[int], h: int, w: int, stride: int = 1, dtype=torch.float64, seed: int = 0,
                behind: bool = False):
    """Keyframe inverse depths, edges ii -> some camera (random rel poses, their adjoint-like 6x6
    matrices: any matrix works for the kernel), targets partly outside the image, a band of zero weights."""
    g = torch.Generator().manual_seed(seed)
    E = len(ii)
    inv_depth = 0.2 + torch.rand(K, h, w, generator=g, dtype=dtype)
    R = _rotation(0.2 * torch.randn(E, 3, generator=g, dtype=dtype))
    t = 0.3 * torch.randn(E, 3, 1, generator=g, dtype=dtype)
    if behind:
        t[:, 2] = -3.0  # part of the scene ends up behind the target camera
    rel = torch.cat([R, t], -1).contiguous()
    adj = torch.randn(E, 6, 6, generator=g, dtype=dtype)
    W, H = w * stride, h * stride
    intr = torch.tensor([0.8 * W + 1.3, 0.85 * W + 0.7, W / 2 + 0.3, H / 2 - 0.2], dtype=dtype)
    targets = (1.4 * torch.rand(E, h, w, 2, generator=g, dtype=dtype) - 0.2) * torch.tensor([W, H], dtype=dtype)
    weights = torch.rand(E, h, w, generator=g, dtype=dtype)
    weights[:, : h // 3] = 0.0
    return inv_depth, torch.tensor(ii, dtype=torch.long), rel, adj, intr, targets, weights


# (K, ii, h, w, stride): one pixel; edges out of keyframe order; a keyframe with no edge (1 in the
# third); rows not multiples of the SIMD width; more than one 2048-pixel chunk per keyframe (67 x 73).
CASES = [
    (1, [0], 1, 1, 1),
    (2, [1, 0, 1], 4, 6, 2),
    (3, [2, 0, 2, 0, 0], 7, 5, 3),
    (2, [0, 0], 16, 20, 1),
    (3, [0, 2, 0, 2], 67, 73, 2),
]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-30))


@needs_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("robust_scale", [0.0, 2.0])
def test_matches_reference(case, dtype, robust_scale):
    K, ii, h, w, s = case
    inputs = make_inputs(K, ii, h, w, s, dtype=dtype, behind=len(ii) > 3)
    got = ops.ba_reduce(*inputs, stride=s, min_depth=0.1, robust_scale=robust_scale, backend="extension")
    want = reference.ba_reduce(*inputs, stride=s, min_depth=0.1, robust_scale=robust_scale)
    E = len(ii)
    shapes = [(E, 6, 6), (E, 6), (E, h, w, 6), (K, h, w, 6), (K, h, w), (K, h, w)]
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b, shape in zip(got._fields, got, want, shapes, strict=True):
        assert a.shape == shape and a.dtype == dtype, name
        _close(a, b, rtol)
    assert torch.equal(got.H_jj, got.H_jj.transpose(1, 2))
    assert float(got.H_jj.abs().max()) > 0 and float(got.c_own.abs().max()) > 0  # not trivially zero
    missing = sorted(set(range(K)) - set(ii))
    if missing:  # a keyframe without edges gets zeros
        assert not bool(got.h_pp[missing].any()) and not bool(got.c_own[missing].any())


def test_robust_weight_is_the_geometry_layers_cauchy_weight():
    """The kernel's Cauchy factor is `v2d.geometry.robust.cauchy_weight` of the residual: the robust
    reduction equals the plain one with the weights multiplied by it."""
    from v2d.geometry.robust import cauchy_weight

    inputs = make_inputs(2, [0, 1, 0], 9, 11, 2, seed=3)
    inv, ii, rel, adj, intr, targets, weights = inputs
    _, _, r, _ = reference.ba_jacobians(inv[ii], rel, intr, targets, 0.1, 2)
    scaled = weights * cauchy_weight((r**2).sum(-1), 1.5)
    for backend in ["reference"] + (["extension"] if ops.extension_available() else []):
        robust = ops.ba_reduce(*inputs, stride=2, robust_scale=1.5, backend=backend)
        plain = ops.ba_reduce(inv, ii, rel, adj, intr, targets, scaled, stride=2, backend=backend)
        for a, b in zip(robust, plain, strict=True):
            _close(a, b, 1e-12)
        assert not torch.allclose(robust.H_jj, ops.ba_reduce(*inputs, stride=2, backend=backend).H_jj)


def test_terms_follow_from_the_jacobians():
    """The reference's sums, written out for one pixel: H, g, c, h_pp, g_p and c_own from J, J_rho, r, w."""
    inv, ii, rel, adj, intr, targets, weights = make_inputs(1, [0, 0], 3, 4, 1, seed=1)
    out = ops.ba_reduce(inv, ii, rel, adj, intr, targets, weights, backend="reference")
    J, J_rho, r, valid = reference.ba_jacobians(inv[ii], rel, intr, targets, 0.1)
    w = weights * valid
    p = (2, 3)
    c = [w[e][p] * J[e][p].T @ J_rho[e][p] for e in range(2)]
    torch.testing.assert_close(out.c[0][p], c[0])
    torch.testing.assert_close(out.c_own[0][p], -(adj[0].T @ c[0] + adj[1].T @ c[1]))
    torch.testing.assert_close(out.h_pp[0][p], sum(w[e][p] * J_rho[e][p] @ J_rho[e][p] for e in range(2)))
    torch.testing.assert_close(out.g_p[0][p], sum(w[e][p] * J_rho[e][p] @ r[e][p] for e in range(2)))
    H0 = sum(w[0][q] * J[0][q].T @ J[0][q] for q in ((i, j) for i in range(3) for j in range(4)))
    torch.testing.assert_close(out.H_jj[0], H0)


@needs_ext
def test_invalid_pixels_contribute_nothing():
    """Pixels behind the target camera, or with zero weight, add nothing (their c is 0 too)."""
    inv, ii, rel, adj, intr, targets, weights = make_inputs(1, [0], 12, 10, behind=True, seed=4)
    _, _, _, valid = reference.ba_jacobians(inv[ii], rel, intr, targets, 0.1)
    assert 0 < int(valid.sum()) < valid.numel()
    out = ops.ba_reduce(inv, ii, rel, adj, intr, targets, weights, backend="extension")
    dead = ~valid | (weights == 0)
    assert not bool(out.c[dead].any()) and not bool(out.h_pp[dead].any())
    kept = ops.ba_reduce(inv, ii, rel, adj, intr, targets, weights * ~dead, backend="extension")
    for a, b in zip(out, kept, strict=True):
        assert torch.equal(a, b)


@needs_ext
def test_thread_count_does_not_change_result():
    inputs = make_inputs(3, [0, 2, 0, 2, 1], 67, 73, 2, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.ba_reduce(*inputs, stride=2, robust_scale=2.0, backend="extension")
        torch.set_num_threads(2)
        two = ops.ba_reduce(*inputs, stride=2, robust_scale=2.0, backend="extension")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", pytest.param("extension", marks=needs_ext)])
def test_bad_inputs_name_the_argument(backend):
    inv, ii, rel, adj, intr, targets, weights = make_inputs(2, [0, 1], 4, 5)
    args = dict(inv_depth=inv, ii=ii, rel_poses=rel, adjoints=adj, intrinsics=intr, targets=targets,
                weights=weights)
    nan = targets.clone()
    nan[0, 1, 1, 0] = float("nan")
    bad = [
        (dict(inv_depth=inv[0]), ShapeError, "inv_depth"),
        (dict(rel_poses=rel[:, :2]), ShapeError, "rel_poses"),
        (dict(adjoints=adj[:, :5]), ShapeError, "adjoints"),
        (dict(intrinsics=intr[None]), ShapeError, "intrinsics"),
        (dict(targets=targets[:, :, :4]), ShapeError, "targets"),
        (dict(weights=weights[..., None]), ShapeError, "weights"),
        (dict(weights=-weights), ShapeError, "weights"),
        (dict(ii=ii.int()), ShapeError, "ii"),
        (dict(ii=torch.tensor([0, 2])), ShapeError, "ii"),
        (dict(ii=torch.tensor([0])), ShapeError, "ii"),
        (dict(targets=nan), NumericalError, "targets"),
        (dict(intrinsics=intr * torch.tensor([-1.0, 1, 1, 1], dtype=intr.dtype)), ShapeError, "intrinsics"),
        (dict(rel_poses=rel.float()), ShapeError, "rel_poses"),
        (dict(inv_depth=inv.clone().requires_grad_()), ShapeError, "inv_depth"),
    ]
    for change, error, name in bad:
        with pytest.raises(error, match=name):
            ops.ba_reduce(**{**args, **change}, backend=backend)
    for kwargs, name in ((dict(stride=0), "stride"), (dict(min_depth=0.0), "min_depth"),
                         (dict(robust_scale=-1.0), "robust_scale")):
        with pytest.raises(ShapeError, match=name):
            ops.ba_reduce(**args, **kwargs, backend=backend)


@needs_ext
def test_extension_entry_point_checks_shapes_itself():
    """The C++ entry checks what it indexes with, even when called past ops.py's checks."""
    from kernels import _C

    inv, ii, rel, adj, intr, targets, weights = make_inputs(2, [0, 1], 4, 5)
    with pytest.raises(RuntimeError, match="ii must index keyframes"):
        _C.ba_reduce(inv, torch.tensor([0, 5]), rel, adj, intr, targets, weights, 1, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="weights must be"):
        _C.ba_reduce(inv, ii, rel, adj, intr, targets, weights[:, :3].contiguous(), 1, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="stride"):
        _C.ba_reduce(inv, ii, rel, adj, intr, targets, weights, 0, 0.1, 0.0)

"""gn_reduce: the fused kernel against the reference that materialises per-pixel Jacobians."""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from kernels.errors import NumericalError, ShapeError

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="kernels._C is not built")


def _rotation(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (E, 3, 3) from axis-angle (E, 3) by the matrix exponential."""
    x, y, z = axis_angle.unbind(-1)
    o = torch.zeros_like(x)
    hat = torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).view(-1, 3, 3)
    return torch.linalg.matrix_exp(hat)


def make_inputs(E: int, H: int, W: int, dtype=torch.float64, seed: int = 0, behind: bool = False):
    g = torch.Generator().manual_seed(seed)
    inv_depth = 0.2 + torch.rand(E, H, W, generator=g, dtype=dtype)
    R = _rotation(0.2 * torch.randn(E, 3, generator=g, dtype=dtype))
    t = 0.3 * torch.randn(E, 3, 1, generator=g, dtype=dtype)
    if behind:
        # Push the target camera far forward so part of the scene ends up behind it.
        t[:, 2] = -3.0
    rel = torch.cat([R, t], -1).contiguous()
    f = 0.8 * W + 2 * torch.rand(E, 1, generator=g, dtype=dtype)
    intr = torch.cat([f, f * 1.05, W / 2 + torch.rand(E, 1, generator=g, dtype=dtype), H / 2 + 0 * f], -1)
    # Targets spread beyond the image so that some fall outside it.
    scale = torch.tensor([W, H], dtype=dtype)
    targets = (1.4 * torch.rand(E, H, W, 2, generator=g, dtype=dtype) - 0.2) * scale
    weights = torch.rand(E, H, W, 2, generator=g, dtype=dtype)
    weights[:, : H // 3] = 0.0  # a band of zero weights
    return inv_depth, rel, intr.contiguous(), targets, weights


# (2, 67, 73): more than one 4096-pixel chunk per edge, rows and edges not multiples of the CPU
# kernel's SIMD width (vectors straddle rows; partial last vector).
SHAPES = [(1, 1, 1), (1, 4, 6), (3, 7, 5), (8, 16, 20), (2, 64, 80), (2, 67, 73)]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_focal", [False, True])
def test_forward_matches_reference(shape, dtype, with_focal):
    inputs = make_inputs(*shape, dtype=dtype, behind=shape[0] > 2)
    H1, b1 = ops.gn_reduce(*inputs, with_focal=with_focal, backend="extension")
    H2, b2 = reference.gn_reduce(*inputs, with_focal=with_focal)
    K = 7 if with_focal else 6
    assert H1.shape == (shape[0], K, K) and b1.shape == (shape[0], K)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(H1, H2, rtol=rtol, atol=rtol * H2.abs().max().item())
    assert torch.allclose(b1, b2, rtol=rtol, atol=rtol * b2.abs().max().item())
    assert torch.allclose(H1, H1.transpose(-1, -2))


@needs_ext
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_focal", [False, True])
def test_backward_matches_reference(shape, dtype, with_focal):
    inputs = make_inputs(*shape, dtype=dtype, behind=shape[0] > 1)
    inv_depth, rel, intr, targets, weights = inputs
    grads = []
    for backend, fn in (("extension", ops.gn_reduce), ("reference", reference.gn_reduce)):
        leaves = [x.clone().requires_grad_(True) for x in (inv_depth, rel, intr, targets, weights)]
        kwargs = {"backend": backend} if fn is ops.gn_reduce else {}
        H, b = fn(*leaves, with_focal=with_focal, **kwargs)
        g = torch.Generator().manual_seed(1)
        loss = (H * torch.randn(H.shape, generator=g, dtype=dtype)).sum() + (
            b * torch.randn(b.shape, generator=g, dtype=dtype)
        ).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for name, a, r in zip(("inv_depth", "rel_poses", "intrinsics", "targets", "weights"), *grads, strict=True):
        scale = r.abs().max().item()
        assert scale > 0, name
        assert torch.allclose(a, r, rtol=rtol, atol=rtol * scale), name


@needs_ext
@pytest.mark.parametrize("with_focal", [False, True])
def test_gradcheck_float64(with_focal):
    leaves = [x.clone().requires_grad_(True) for x in make_inputs(2, 3, 4, seed=3)]

    def fn(d, r, k, t, w):
        return ops.gn_reduce(d, r, k, t, w, with_focal=with_focal, backend="extension")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_ext
def test_invalid_pixels_contribute_nothing():
    inv_depth, rel, intr, targets, weights = make_inputs(2, 6, 8)
    inv_depth[0] = -1.0  # behind the source camera
    inv_depth[1, :3] = 0.0  # at infinity: no finite point
    H, b = ops.gn_reduce(inv_depth, rel, intr, targets, weights, backend="extension")
    assert H[0].abs().max() == 0 and b[0].abs().max() == 0
    keep = torch.zeros_like(weights)
    keep[1, 3:] = weights[1, 3:]
    H2, b2 = ops.gn_reduce(inv_depth, rel, intr, targets, keep, backend="extension")
    assert torch.allclose(H[1], H2[1]) and torch.allclose(b[1], b2[1])
    assert H[1].abs().max() > 0


@needs_ext
def test_all_points_behind_target_camera_give_zero_system():
    inv_depth, rel, intr, targets, weights = make_inputs(1, 5, 5)
    rel[:, 2, 3] = -100.0
    H, b = ops.gn_reduce(inv_depth, rel, intr, targets, weights, backend="extension")
    assert H.abs().max() == 0 and b.abs().max() == 0


@needs_ext
def test_thread_count_does_not_change_result():
    inputs = make_inputs(3, 70, 90, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        H1, b1 = ops.gn_reduce(*inputs, backend="extension")
        torch.set_num_threads(2)
        H2, b2 = ops.gn_reduce(*inputs, backend="extension")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(H1, H2) and torch.equal(b1, b2)


def test_jacobian_matches_autograd_of_projection():
    """The hand-written J (6 pose columns + focal) equals autograd of pi through exp(xi) and s."""
    E, H, W = 1, 3, 4
    inv_depth, rel, intr, targets, _ = make_inputs(E, H, W, seed=5)
    J, r, valid = reference.gn_jacobians(inv_depth, rel, intr, targets, 0.1, True)
    assert valid.all()
    R, t = rel[0, :, :3], rel[0, :, 3]
    fx, fy, cx, cy = intr[0]
    v, u = torch.meshgrid(torch.arange(H, dtype=R.dtype), torch.arange(W, dtype=R.dtype), indexing="ij")

    def project(params):
        xi, s = params[:6], params[6]
        x, y, z = xi[3:].unbind()
        o = torch.zeros_like(x)
        hat = torch.stack([torch.stack([o, -z, y, xi[0]]), torch.stack([z, o, -x, xi[1]]),
                           torch.stack([-y, x, o, xi[2]]), torch.stack([o, o, o, o])])
        T = torch.linalg.matrix_exp(hat)
        X = torch.stack([(u - cx) / (fx * s.exp()), (v - cy) / (fy * s.exp()), torch.ones_like(u)], -1)
        X = X / inv_depth[0, ..., None]
        P = X @ R.T + t
        P = P @ T[:3, :3].T + T[:3, 3]
        return torch.stack([fx * s.exp() * P[..., 0] / P[..., 2] + cx, fy * s.exp() * P[..., 1] / P[..., 2] + cy], -1)

    Jauto = torch.autograd.functional.jacobian(project, torch.zeros(7, dtype=R.dtype))  # (H, W, 2, 7)
    assert torch.allclose(J[0], Jauto, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", pytest.param("extension", marks=needs_ext)])
def test_bad_inputs_name_the_argument(backend):
    inv_depth, rel, intr, targets, weights = make_inputs(2, 4, 5)
    call = lambda **kw: ops.gn_reduce(**{**dict(inv_depth=inv_depth, rel_poses=rel, intrinsics=intr,  # noqa: E731
                                                targets=targets, weights=weights, backend=backend), **kw})
    with pytest.raises(ShapeError, match=r"targets: expected shape \(E, H, W, 2\).*got \(2, 4, 5\)"):
        call(targets=targets[..., 0])
    with pytest.raises(ShapeError, match=r"rel_poses: expected shape \(E, 3, 4\) with E=2, got \(3, 3, 4\)"):
        call(rel_poses=torch.cat([rel, rel[:1]]))
    with pytest.raises(ShapeError, match=r"intrinsics: expected shape \(E, 4\).*got \(2, 3, 3\)"):
        call(intrinsics=torch.zeros(2, 3, 3, dtype=intr.dtype))
    with pytest.raises(ShapeError, match="weights: expected dtype torch.float64"):
        call(weights=weights.float())
    with pytest.raises(ShapeError, match="inv_depth: expected float32 or float64, got torch.float16"):
        call(inv_depth=inv_depth.half(), rel_poses=rel.half(), intrinsics=intr.half(), targets=targets.half(),
             weights=weights.half())
    with pytest.raises(ShapeError, match="weights: expected a floating-point tensor"):
        call(weights=weights.long())
    with pytest.raises(ShapeError, match="targets: expected a contiguous tensor"):
        call(targets=targets.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ShapeError, match="intrinsics: expected positive focal lengths"):
        call(intrinsics=intr * torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=intr.dtype))
    for name, value in (("inv_depth", inv_depth), ("targets", targets), ("weights", weights), ("rel_poses", rel)):
        for bad in (float("nan"), float("inf")):
            broken = value.clone()
            broken.view(-1)[3] = bad
            with pytest.raises(NumericalError, match=f"{name}: gn_reduce got 1 non-finite value"):
                call(**{name: broken})
    with pytest.raises(ShapeError, match="min_depth: expected a positive number"):
        call(min_depth=0.0)
    with pytest.raises(ShapeError, match="inv_depth: expected a torch.Tensor, got ndarray"):
        call(inv_depth=inv_depth.numpy())
    with pytest.raises(ShapeError, match="backend: expected one of"):
        call(backend="gpu")


@needs_ext
def test_extension_entry_points_check_shapes_themselves():
    inv_depth, rel, intr, targets, weights = make_inputs(2, 4, 5)
    ext = ops._extension()
    with pytest.raises(RuntimeError, match=r"weights must be \(E, H, W, 2\)"):
        ext.gn_reduce_forward(inv_depth, rel, intr, targets, weights[:, :3].contiguous(), 0.1, False)
    H, b = ext.gn_reduce_forward(inv_depth, rel, intr, targets, weights, 0.1, False)
    with pytest.raises(RuntimeError, match=r"grad_H must be \(E, K, K\) = \(2, 7, 7\)"):
        ext.gn_reduce_backward(H, b, inv_depth, rel, intr, targets, weights, 0.1, True)


def test_finite_check_is_not_fooled_by_overflowing_sums():
    inv_depth, rel, intr, targets, weights = make_inputs(1, 4, 5, dtype=torch.float32)
    huge = torch.full_like(targets, 3e38)  # finite, but their sum overflows float32
    H, _ = ops.gn_reduce(inv_depth, rel, intr, huge, weights, backend="reference")
    assert H.shape == (1, 6, 6)
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = targets.clone()
        t[0, 1, 2, 0] = bad
        with pytest.raises(NumericalError, match="targets: gn_reduce got 1 non-finite"):
            ops.gn_reduce(inv_depth, rel, intr, t, weights)

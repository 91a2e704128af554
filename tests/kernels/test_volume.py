"""backproject_volume: the C++ kernel against the grid_sample reference."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.errors import NumericalError, ShapeError

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="kernels._C is not built")


def make_inputs(M, C, D, h, w, dtype=torch.float64, seed=0, behind=False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(M, C, h, w, generator=g, dtype=dtype)
    ang = 0.05 * torch.randn(M, 3, generator=g, dtype=dtype) + 0.01  # sub-pixel: away from tap boundaries
    x, y, z = ang.unbind(-1)
    o = torch.zeros_like(x)
    R = torch.linalg.matrix_exp(torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).view(M, 3, 3))
    t = 0.3 * torch.randn(M, 3, 1, generator=g, dtype=dtype)
    if behind:
        t[0, 2] = -1.5  # near hypotheses of neighbour 0 fall behind its camera
    rel = torch.cat([R, t], -1).contiguous()
    intr = torch.tensor([[1.1 * w, 1.1 * w, (w - 1) / 2, (h - 1) / 2]], dtype=dtype).repeat(M, 1)
    depths = torch.linspace(0.5, 4.0, D, dtype=dtype)
    return feats, rel, intr, depths


SHAPES = [(M, C, D, hw) for M in (1, 3) for C in (1, 4, 16) for D in (1, 5) for hw in ((4, 6), (7, 5), (16, 20))]


@needs_ext
@pytest.mark.parametrize("M,C,D,hw", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_match_reference(M, C, D, hw, dtype):
    feats, rel, intr, depths = make_inputs(M, C, D, *hw, dtype=dtype, behind=M > 1)
    outs, grads = [], []
    for backend in ("extension", "reference"):
        f, r = feats.clone().requires_grad_(True), rel.clone().requires_grad_(True)
        out = ops.backproject_volume(f, r, intr, depths, backend=backend)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        outs.append(out.detach())
        grads.append(torch.autograd.grad((out * g).sum(), [f, r]))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert outs[0].shape == (M, C, D, *hw)
    assert torch.allclose(outs[0], outs[1], atol=tol)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@needs_ext
def test_identity_pose_reproduces_the_features_at_every_depth():
    feats, _, intr, depths = make_inputs(2, 3, 4, 6, 7)
    rel = torch.eye(3, 4, dtype=feats.dtype).repeat(2, 1, 1).contiguous()
    vol = ops.backproject_volume(feats, rel, intr, depths)
    for k in range(4):
        assert torch.allclose(vol[:, :, k], feats, atol=1e-12)


@needs_ext
def test_behind_camera_and_outside_image_are_zero():
    feats, rel, intr, depths = make_inputs(1, 2, 3, 5, 6)
    rel[0, 2, 3] = -100.0  # everything behind
    assert ops.backproject_volume(feats, rel, intr, depths).abs().max() == 0
    rel[0, 2, 3] = 0.0
    rel[0, 0, 3] = 1000.0  # far to the side
    assert ops.backproject_volume(feats, rel, intr, depths).abs().max() == 0


@needs_ext
def test_gradcheck_float64():
    feats, rel, intr, depths = make_inputs(2, 2, 3, 4, 5, behind=True)
    leaves = [feats.requires_grad_(True), rel.requires_grad_(True)]
    assert torch.autograd.gradcheck(
        lambda f, r: ops.backproject_volume(f, r, intr, depths, backend="extension"), leaves, eps=1e-7, atol=1e-5
    )


@pytest.mark.parametrize("backend", ["reference", pytest.param("extension", marks=needs_ext)])
def test_bad_inputs_name_the_argument(backend):
    feats, rel, intr, depths = make_inputs(2, 3, 4, 5, 6)

    def call(**kw):
        args = dict(features=feats, rel_poses=rel, intrinsics=intr, depths=depths, backend=backend)
        return ops.backproject_volume(**{**args, **kw})

    with pytest.raises(ShapeError, match=r"rel_poses: expected shape \(M, 3, 4\) with M=2, got \(3, 3, 4\)"):
        call(rel_poses=torch.cat([rel, rel[:1]]))
    with pytest.raises(ShapeError, match=r"features: expected shape \(M, C, h, w\), got \(3, 5, 6\)"):
        call(features=feats[0])
    with pytest.raises(ShapeError, match="depths: expected dtype torch.float64"):
        call(depths=depths.float())
    with pytest.raises(ShapeError, match="features: expected float32 or float64, got torch.float16"):
        call(features=feats.half(), rel_poses=rel.half(), intrinsics=intr.half(), depths=depths.half())
    with pytest.raises(ShapeError, match="features: expected a contiguous tensor"):
        call(features=feats.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ShapeError, match="depths: backproject_volume does not differentiate"):
        call(depths=depths.clone().requires_grad_(True))
    with pytest.raises(ShapeError, match="depths: expected positive finite"):
        call(depths=torch.tensor([1.0, 0.0], dtype=depths.dtype))
    with pytest.raises(ShapeError, match="intrinsics: expected device cpu"):
        call(intrinsics=intr.to("meta"))
    with pytest.raises(ShapeError, match=r"features: expected h, w >= 2, got shape \(2, 3, 1, 6\)"):
        call(features=feats[:, :, :1].contiguous())
    with pytest.raises(ShapeError, match="intrinsics: expected positive focal lengths"):
        call(intrinsics=-intr)
    for name, value in (("rel_poses", rel), ("intrinsics", intr)):
        broken = value.clone()
        broken.view(-1)[2] = float("nan")
        with pytest.raises(NumericalError, match=f"{name}: backproject_volume got 1 non-finite value"):
            call(**{name: broken})


@needs_ext
def test_extension_entry_points_check_shapes_themselves():
    # The last line of defence under ops.py (bindings.cpp / checks.h): a wrong shape is an error, not a
    # read out of bounds, even when ops.py is bypassed.
    feats, rel, intr, depths = make_inputs(2, 3, 4, 5, 6)
    ext = ops._extension()
    with pytest.raises(RuntimeError, match=r"rel_poses must be \(M, 3, 4\) with M = 2"):
        ext.backproject_volume_forward(feats, rel[:1].contiguous(), intr, depths)
    out = ext.backproject_volume_forward(feats, rel, intr, depths)
    with pytest.raises(RuntimeError, match=r"grad_volume must be \(M, C, D, h, w\)"):
        ext.backproject_volume_backward(out[:, :2].contiguous(), feats, rel, intr, depths)

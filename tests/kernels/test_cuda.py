"""CUDA kernels against the CPU kernels (skipped here: no GPU; they run where one exists)."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.errors import ShapeError
from tests.kernels.test_ba_reduce import CASES as BA_CASES
from tests.kernels.test_ba_reduce import make_inputs as ba_inputs
from tests.kernels.test_gn_reduce import make_inputs as gn_inputs
from tests.kernels.test_volume import make_inputs as volume_inputs

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.extension_available() and ops._extension().with_cuda),
    reason="needs a CUDA device and kernels._C built with CUDA (FORCE_CUDA=1)",
)


@pytest.mark.parametrize("with_focal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gn_reduce_cuda_matches_cpu(with_focal, dtype):
    inputs = gn_inputs(4, 33, 47, dtype=dtype, behind=True)
    grads = []
    for device in ("cpu", "cuda"):
        leaves = [x.to(device).requires_grad_(True) for x in inputs]
        H, b = ops.gn_reduce(*leaves, with_focal=with_focal)
        grads.append([t.detach().cpu() for t in (H, b, *torch.autograd.grad(H.sum() + b.sum(), leaves))])
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for a, c in zip(*grads, strict=True):
        assert torch.allclose(a, c, rtol=tol, atol=tol * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backproject_volume_cuda_matches_cpu(dtype):
    feats, rel, intr, depths = volume_inputs(3, 8, 5, 16, 20, dtype=dtype, behind=True)
    results = []
    for device in ("cpu", "cuda"):
        f, r = feats.to(device).requires_grad_(True), rel.to(device).requires_grad_(True)
        out = ops.backproject_volume(f, r, intr.to(device), depths.to(device))
        results.append([t.detach().cpu() for t in (out, *torch.autograd.grad(out.square().sum(), [f, r]))])
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for a, c in zip(*results, strict=True):
        assert torch.allclose(a, c, rtol=tol, atol=tol * max(1.0, a.abs().max().item()))


# The CPU cases, plus no edges at all (every output is zeros or empty).
@pytest.mark.parametrize("case", [*BA_CASES, (2, [], 3, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("robust_scale", [0.0, 2.0])
def test_ba_reduce_cuda_matches_cpu(case, dtype, robust_scale):
    K, ii, h, w, s = case
    inputs = ba_inputs(K, ii, h, w, s, dtype=dtype, behind=len(ii) > 3)
    results = [
        ops.ba_reduce(
            *(x.to(device) for x in inputs), stride=s, min_depth=0.1, robust_scale=robust_scale, backend="extension"
        )
        for device in ("cpu", "cuda")
    ]
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for name, a, c in zip(results[0]._fields, results[0], results[1], strict=True):
        assert c.device.type == "cuda" and c.dtype == dtype and c.shape == a.shape, name
        c = c.cpu()
        scale = max(1.0, a.abs().max().item()) if a.numel() else 1.0
        assert torch.allclose(a, c, rtol=tol, atol=tol * scale), name
    cuda = results[1]
    assert torch.equal(cuda.H_jj, cuda.H_jj.transpose(1, 2))
    missing = sorted(set(range(K)) - set(ii))
    if missing:  # a keyframe without edges gets exact zeros
        for t in (cuda.c_own, cuda.h_pp, cuda.g_p):
            assert not bool(t[missing].any())


def test_ba_reduce_cuda_rejects_ii_out_of_range():
    from kernels import _C

    inv, ii, rel, adj, intr, targets, weights = (x.cuda() for x in ba_inputs(2, [0, 1], 4, 5))
    bad = torch.tensor([0, 5], device="cuda")
    with pytest.raises(ShapeError, match="ii"):
        ops.ba_reduce(inv, bad, rel, adj, intr, targets, weights, backend="extension")
    with pytest.raises(RuntimeError, match="ii must index keyframes"):
        _C.ba_reduce(inv, bad, rel, adj, intr, targets, weights, 1, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="ii must index keyframes"):
        _C.ba_reduce(inv, torch.tensor([-1, 0], device="cuda"), rel, adj, intr, targets, weights, 1, 0.1, 0.0)

"""CUDA kernels against the CPU kernels (skipped here: no GPU; they run where one exists)."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
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

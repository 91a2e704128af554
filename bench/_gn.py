"""gn_accumulate: fused kernel vs the torch reference that materialises per-pixel Jacobians."""

from __future__ import annotations

import math

import torch

from bench._common import median_ms, peak_mb


def _inputs(E: int, H: int, W: int, seed: int = 0):
    from v2d.geometry.lie import se3_random

    g = torch.Generator().manual_seed(seed)
    N = E + 1
    poses = se3_random(N, rot_scale=math.radians(5), trans_scale=0.2, generator=g)
    poses[0] = torch.tensor([0, 0, 0, 0, 0, 0, 1.0])
    inv_depth = 0.2 + 0.5 * torch.rand(E, H, W, generator=g)
    intr = torch.tensor([0.9 * W, 0.9 * W, W / 2, H / 2])
    targets = torch.rand(E, H, W, 2, generator=g) * torch.tensor([W, H], dtype=torch.float32)
    weights = torch.rand(E, H, W, 2, generator=g)
    ii = torch.zeros(E, dtype=torch.long)
    jj = torch.arange(1, E + 1)
    return poses, inv_depth, intr, targets, weights, ii, jj


def make_run(backend: str, E: str | int, H: str | int, W: str | int):
    """Set-up of one forward+backward of gn_accumulate; returns the callable to time."""
    from v2d.geometry.gauss_newton import gn_accumulate

    poses, inv_depth, intr, targets, weights, ii, jj = _inputs(int(E), int(H), int(W))
    leaves = [t.requires_grad_(True) for t in (poses, inv_depth, targets, weights)]

    def run():
        blocks = gn_accumulate(poses, inv_depth, intr, targets, weights, ii, jj, backend=backend)
        loss = sum(x.square().sum() for x in (blocks.H_ii, blocks.H_ij, blocks.H_jj, blocks.b_i, blocks.b_j))
        torch.autograd.grad(loss, leaves)

    return run


def bench_gn_accumulate(repeats: int, E: int = 8, sizes=((240, 320), (60, 80))) -> dict:
    """Median forward+backward time and peak memory, kernel vs reference, at each image size."""
    results = {}
    for H, W in sizes:
        t_ext = median_ms(make_run("extension", E, H, W), repeats)
        t_ref = median_ms(make_run("reference", E, H, W), repeats)
        m_ext = peak_mb("bench._gn:make_run", "extension", str(E), str(H), str(W))
        m_ref = peak_mb("bench._gn:make_run", "reference", str(E), str(H), str(W))
        results[f"{H}x{W}"] = {
            "kernel_ms": t_ext, "reference_ms": t_ref, "speedup": t_ref / t_ext,
            "kernel_peak_mb": m_ext, "reference_peak_mb": m_ref, "memory_ratio": m_ref / max(m_ext, 1e-3),
        }
    main = results[f"{sizes[0][0]}x{sizes[0][1]}"]
    return {"speedup": main["speedup"], "memory_ratio": main["memory_ratio"], "edges": E, "repeats": repeats,
            "sizes": results}

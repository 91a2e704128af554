"""ba_reduce: the fused window-BA kernel vs the torch reference that materialises per-pixel Jacobians.

The size is a SLAM window's bundle adjustment at 240x320 with `slam.ba_stride` 2: 10 keyframes,
38 edges (what the mapper builds on 7-Scenes), a 120x160 grid, float64 as the solver runs it.
"""

from __future__ import annotations

import math

import torch

from bench._common import median_ms, peak_mb

SHAPE = {"K": 10, "E": 38, "h": 120, "w": 160, "stride": 2}


def make_run(backend: str):
    """Set-up of one ba_reduce call at SHAPE; returns the callable to time."""
    from kernels import ops
    from v2d.geometry.camera import pose_to_rt
    from v2d.geometry.lie import se3_adjoint, se3_random

    K, E, h, w, s = (SHAPE[k] for k in ("K", "E", "h", "w", "stride"))
    f64 = torch.float64
    g = torch.Generator().manual_seed(0)
    T = se3_random(E, rot_scale=math.radians(5), trans_scale=0.2, generator=g).to(f64)
    rel, adj = pose_to_rt(T).contiguous(), se3_adjoint(T).contiguous()
    ii = torch.arange(E) % K
    inv = 0.2 + 0.5 * torch.rand(K, h, w, generator=g, dtype=f64)
    W, H = w * s, h * s
    intr = torch.tensor([0.9 * W, 0.9 * W, W / 2, H / 2], dtype=f64)
    targets = torch.rand(E, h, w, 2, generator=g, dtype=f64) * torch.tensor([W, H], dtype=f64)
    weights = torch.rand(E, h, w, generator=g, dtype=f64)

    def run():
        ops.ba_reduce(inv, ii, rel, adj, intr, targets, weights, stride=s, robust_scale=2.0, backend=backend)

    return run


def bench_ba_reduce(repeats: int) -> dict:
    t_ext = median_ms(make_run("extension"), repeats)
    t_ref = median_ms(make_run("reference"), repeats)
    m_ext = peak_mb("bench._ba:make_run", "extension")
    m_ref = peak_mb("bench._ba:make_run", "reference")
    return {"speedup": t_ref / t_ext, "memory_ratio": m_ref / max(m_ext, 1e-3), "kernel_ms": t_ext,
            "reference_ms": t_ref, "kernel_peak_mb": m_ext, "reference_peak_mb": m_ref, "shape": SHAPE,
            "repeats": repeats}

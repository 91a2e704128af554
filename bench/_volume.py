"""backproject_volume: fused kernel vs the reference (explicit coordinates + one grid_sample call)."""

from __future__ import annotations

import torch

from bench._common import median_ms, peak_mb

SHAPE = {"M": 4, "C": 32, "D": 32, "h": 60, "w": 80}


def make_run(backend: str):
    """Set-up of one forward+backward (features and rel_poses) at SHAPE; returns the callable to time."""
    from kernels import ops

    M, C, D, h, w = (SHAPE[k] for k in "MCDhw")
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(M, C, h, w, generator=g).requires_grad_(True)
    rel = torch.eye(3, 4).repeat(M, 1, 1)
    rel[:, :, 3] = 0.1 * torch.randn(M, 3, generator=g)
    rel = rel.contiguous().requires_grad_(True)
    intr = torch.tensor([[0.9 * w, 0.9 * w, (w - 1) / 2, (h - 1) / 2]]).repeat(M, 1)
    depths = torch.linspace(0.5, 8.0, D)

    def run():
        vol = ops.backproject_volume(feats, rel, intr, depths, backend=backend)
        torch.autograd.grad(vol.square().sum(), [feats, rel])

    return run


def bench_backproject_volume(repeats: int) -> dict:
    t_ext = median_ms(make_run("extension"), repeats)
    t_ref = median_ms(make_run("reference"), repeats)
    m_ext = peak_mb("bench._volume:make_run", "extension")
    m_ref = peak_mb("bench._volume:make_run", "reference")
    return {"speedup": t_ref / t_ext, "memory_ratio": m_ref / max(m_ext, 1e-3), "kernel_ms": t_ext,
            "reference_ms": t_ref, "kernel_peak_mb": m_ext, "reference_peak_mb": m_ref, "shape": SHAPE,
            "repeats": repeats}

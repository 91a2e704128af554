"""Robust weighting of residuals (iteratively re-weighted least squares).

The Cauchy (Lorentzian) loss rho(r) = c^2 / 2 log(1 + r^2 / c^2) grows only logarithmically, so a
few wrong flow vectors among many do not decide a solution. Gauss-Newton minimises it as a
sequence of weighted least-squares problems with the weight w(r) = rho'(r) / r = 1 / (1 + r^2 / c^2)
recomputed from each iteration's residuals: 1 for a residual of 0, 1/2 at r = c, ~ c^2 / r^2 far out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.errors import ShapeError

__all__ = ["cauchy_weight"]


def cauchy_weight(r2: Tensor, scale: float) -> Tensor:
    """The Cauchy IRLS weight 1 / (1 + r2 / scale^2) of each squared residual norm `r2`.

    `scale` is c in the residual's units (pixels for flow). A non-finite `r2` (NaN, inf: a point
    that did not project) gets weight 0, never NaN. Differentiable where `r2` is finite.

    Shapes: r2 (...) -> (...) in the dtype of r2.
    """
    if not scale > 0:
        raise ShapeError(f"scale: expected a positive Cauchy scale, got {scale!r}")
    finite = torch.isfinite(r2)
    safe = torch.where(finite, r2, torch.zeros_like(r2))
    return torch.where(finite, 1.0 / (1.0 + safe / scale**2), torch.zeros_like(r2))

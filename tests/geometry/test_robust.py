"""v2d.geometry.robust: the Cauchy IRLS weight."""

import math

import pytest
import torch

from v2d.errors import ShapeError
from v2d.geometry import cauchy_weight


def test_known_values():
    r2 = torch.tensor([0.0, 4.0, 36.0], dtype=torch.float64)  # r = 0, c, 3c with c = 2
    assert torch.allclose(cauchy_weight(r2, 2.0), torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64))


def test_is_the_irls_weight_of_the_cauchy_loss():
    """w(r) = rho'(r) / r for rho(r) = c^2 / 2 log(1 + r^2 / c^2)."""
    c = 1.5
    r = torch.linspace(0.1, 10.0, 50, dtype=torch.float64, requires_grad=True)
    rho = (c**2 / 2 * torch.log1p(r**2 / c**2)).sum()
    (grad,) = torch.autograd.grad(rho, r)
    assert torch.allclose(cauchy_weight(r.detach() ** 2, c), grad / r.detach())


def test_non_finite_residuals_get_weight_zero_and_no_nan_gradient():
    r2 = torch.tensor([float("nan"), float("inf"), 1.0], requires_grad=True)
    w = cauchy_weight(r2, 1.0)
    assert w.tolist() == [0.0, 0.0, 0.5]
    w.sum().backward()
    assert torch.isfinite(r2.grad).all() and r2.grad[:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_and_dtype(dtype):
    r2 = torch.rand(2, 3, 4, dtype=dtype) * 10
    w = cauchy_weight(r2, 2.0)
    assert w.shape == r2.shape and w.dtype == dtype
    assert bool(((w > 0) & (w <= 1)).all())


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan])
def test_rejects_a_scale_that_is_not_positive(scale):
    with pytest.raises(ShapeError, match="scale: expected a positive Cauchy scale"):
        cauchy_weight(torch.zeros(3), scale)

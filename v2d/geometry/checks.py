"""Argument checks shared by the geometry modules: a ShapeError that names the argument, what was
expected and what was received ("intrinsics: expected (..., 4), got (3, 3)")."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.errors import ShapeError

__all__ = ["check_broadcast", "check_trailing"]


def check_trailing(name: str, x: object, *trailing: int) -> Tensor:
    """`x` must be a floating-point tensor whose trailing dims are `trailing`; returns it.

    Shapes: x (..., *trailing) -> x
    """
    want = "(..., " + ", ".join(str(n) for n in trailing) + ")"
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor {want}, got {type(x).__name__}")
    if x.dim() < len(trailing) or tuple(x.shape[-len(trailing) :]) != trailing:
        raise ShapeError(f"{name}: expected {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_broadcast(name_a: str, a: Tensor, name_b: str, b: Tensor, ndim: int = 1) -> None:
    """The leading dims (all but the last `ndim`) of `a` and `b` must broadcast."""
    try:
        torch.broadcast_shapes(a.shape[:-ndim], b.shape[:-ndim])
    except RuntimeError:
        raise ShapeError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)}: leading dims do not broadcast"
        ) from None

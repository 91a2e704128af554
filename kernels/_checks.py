"""Argument validation shared by the ops: one clear `ShapeError` naming the argument and what was received."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.errors import NumericalError, ShapeError

Dim = int | str | None


def expect(name: str, t: object, shape: Sequence[Dim], dims: dict[str, int]) -> None:
    """Check that `t` is a floating tensor of the given symbolic shape.

    `shape` holds ints (exact sizes), letters (bound on first use in `dims`, then must agree) or None
    (any size). Raises ShapeError quoting the argument name, the expected and the received shape.
    """
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    want = "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"
    if t.dim() != len(shape):
        raise ShapeError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    for size, d in zip(t.shape, shape, strict=True):
        if isinstance(d, int) and size != d:
            raise ShapeError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
        if isinstance(d, str):
            if d in dims and dims[d] != size:
                raise ShapeError(f"{name}: expected shape {want} with {d}={dims[d]}, got {tuple(t.shape)}")
            dims.setdefault(d, size)
    if not t.is_floating_point():
        raise ShapeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def same_device_dtype(named: dict[str, torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    """All tensors on one device with one dtype (float32 or float64); returns them."""
    items = list(named.items())
    name0, t0 = items[0]
    if t0.dtype not in (torch.float32, torch.float64):
        raise ShapeError(f"{name0}: expected float32 or float64, got {t0.dtype}")
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ShapeError(f"{name}: expected device {t0.device} (as {name0}), got {t.device}")
        if t.dtype != t0.dtype:
            raise ShapeError(f"{name}: expected dtype {t0.dtype} (as {name0}), got {t.dtype}")
    return t0.device, t0.dtype


def expect_contiguous(named: dict[str, torch.Tensor]) -> None:
    """The kernels read raw memory: a non-contiguous argument is an error, not a silent copy."""
    for name, t in named.items():
        if not t.is_contiguous():
            raise ShapeError(
                f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)} "
                "(call .contiguous() first)"
            )


def expect_no_grad(named: dict[str, torch.Tensor], op: str) -> None:
    """Inputs the op does not differentiate must not ask for gradients (no silent zero gradient)."""
    for name, t in named.items():
        if t.requires_grad:
            raise ShapeError(f"{name}: {op} does not differentiate with respect to {name}; pass it detached")


def expect_finite(named: dict[str, torch.Tensor], op: str) -> None:
    """NaN or Inf in an input is an error: the extension and the reference would treat it differently
    (the kernels skip such pixels, grid_sample and autograd propagate them), and neither is right."""
    for name, t in named.items():
        # One sum is non-finite whenever an element is (NaN or Inf propagate), and costs one pass
        # instead of isfinite's several; a sum that merely overflows is checked element-wise.
        if t.numel() and not bool(torch.isfinite(t.sum())):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise NumericalError(f"{name}: {op} got {bad} non-finite value(s) (NaN or Inf)")


def expect_positive_focal(intrinsics: torch.Tensor) -> None:
    """intrinsics (..., 4) = fx, fy, cx, cy: the focal lengths must be positive."""
    if intrinsics.numel() and not bool((intrinsics[..., :2] > 0).all()):
        raise ShapeError(f"intrinsics: expected positive focal lengths fx, fy, got {intrinsics[..., :2].tolist()[:4]}")

"""Public entry of the custom ops: autograd Functions and device dispatch.

Each op runs the compiled extension `kernels._C` when it is built and supports the inputs' device,
else the pure-torch version from `kernels.reference`; which one is used is logged once per op. The
two compute the same thing (tests hold them to tolerance), so a missing extension changes speed and
memory, never results. `backend="reference"` or `backend="extension"` forces one (tests, benchmarks).

Nothing but this module imports `kernels._C`.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from kernels import reference
from kernels._checks import (
    expect,
    expect_contiguous,
    expect_finite,
    expect_no_grad,
    expect_positive_focal,
    same_device_dtype,
)
from kernels.errors import ShapeError

__all__ = ["extension_available", "gn_reduce", "backproject_volume", "ba_reduce", "BAReduction"]

_log = logging.getLogger(__name__)
_BACKENDS = ("auto", "extension", "reference")


@functools.cache
def _extension() -> ModuleType | None:
    try:
        from kernels import _C
    except ImportError as exc:
        _log.warning("kernels._C is not built (%s); using the pure-torch reference ops", exc)
        return None
    return _C


def extension_available() -> bool:
    """True when the compiled extension `kernels._C` can be imported."""
    return _extension() is not None


@functools.cache
def _announce(op: str, backend: str, device_type: str) -> None:
    _log.info("%s on %s: using the %s implementation", op, device_type, backend)


def _use_extension(op: str, device: torch.device, backend: str) -> bool:
    if backend not in _BACKENDS:
        raise ShapeError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    ext = _extension()
    supported = ext is not None and (device.type == "cpu" or (device.type == "cuda" and ext.with_cuda))
    if backend == "extension" and not supported:
        raise ShapeError(f"{op}: backend='extension' requested but kernels._C does not support {device}")
    _announce(op, "C++/CUDA extension" if supported else "pure-torch reference", device.type)
    return supported


# --------------------------------------------------------------------------------------------------
# Kernel A: Gauss-Newton normal equations
# --------------------------------------------------------------------------------------------------


class _GNReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inv_depth, rel_poses, intrinsics, targets, weights, min_depth, with_focal):
        ctx.save_for_backward(inv_depth, rel_poses, intrinsics, targets, weights)
        ctx.min_depth, ctx.with_focal = min_depth, with_focal
        H, b = _extension().gn_reduce_forward(
            inv_depth, rel_poses, intrinsics, targets, weights, min_depth, with_focal
        )
        return H, b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_H, grad_b):
        inv_depth, rel_poses, intrinsics, targets, weights = ctx.saved_tensors
        grads = _extension().gn_reduce_backward(
            grad_H.contiguous(), grad_b.contiguous(), inv_depth, rel_poses, intrinsics, targets, weights,
            ctx.min_depth, ctx.with_focal,
        )
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5], strict=True)]
        return (*grads, None, None)


def gn_reduce(
    inv_depth: torch.Tensor,
    rel_poses: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    min_depth: float = 0.1,
    with_focal: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-edge Gauss-Newton normal equations of the reprojection residual, fused over pixels.

    For edge e the keyframe pixel x = (u, v) (pixel centres at integer coordinates, u along W)
    with inverse depth d back-projects to X = K^-1 [u, v, 1] / d in the source camera, moves to
    P = R_e X + t_e in the target camera and projects to pi(P). The residual is
    r = targets - pi(P), weighted per coordinate by `weights`. With J = dr/d(-xi) the Jacobian of
    pi(P) with respect to a left perturbation exp(xi) of the target camera's world->camera pose
    (xi = [translation, rotation], lietorch's tangent order), the op returns

        H_e = sum_x J^T W J,   b_e = sum_x J^T W r,

    so that solving H xi = b gives the Gauss-Newton step T_j <- exp(xi) T_j. Pixels with d <= 0 or
    P_z <= min_depth contribute nothing. With `with_focal` a 7th column holds the derivative with
    respect to s, a shared log-scale of the focal lengths (fx, fy <- fx e^s, fy e^s), applied to both
    the back-projection and the projection (uncalibrated video).

    Gradients flow to all five tensors (the backward is first-order only: no double backward).
    NaN or Inf in any input raises `NumericalError`; non-positive focal lengths raise `ShapeError`.

    Shapes:
        inv_depth: (E, H, W); rel_poses: (E, 3, 4) = [R | t] source camera -> target camera;
        intrinsics: (E, 4) = fx, fy, cx, cy; targets, weights: (E, H, W, 2).
        Returns H: (E, K, K) and b: (E, K) with K = 6, or 7 when `with_focal`.
    """
    dims: dict[str, int] = {}
    expect("inv_depth", inv_depth, ("E", "H", "W"), dims)
    expect("rel_poses", rel_poses, ("E", 3, 4), dims)
    expect("intrinsics", intrinsics, ("E", 4), dims)
    expect("targets", targets, ("E", "H", "W", 2), dims)
    expect("weights", weights, ("E", "H", "W", 2), dims)
    named = dict(inv_depth=inv_depth, rel_poses=rel_poses, intrinsics=intrinsics, targets=targets, weights=weights)
    device, _ = same_device_dtype(named)
    expect_contiguous(named)
    expect_finite(named, "gn_reduce")
    expect_positive_focal(intrinsics)
    if not min_depth > 0:
        raise ShapeError(f"min_depth: expected a positive number, got {min_depth!r}")
    if _use_extension("gn_reduce", device, backend):
        return _GNReduce.apply(inv_depth, rel_poses, intrinsics, targets, weights, float(min_depth), bool(with_focal))
    return reference.gn_reduce(inv_depth, rel_poses, intrinsics, targets, weights, min_depth, with_focal)


# --------------------------------------------------------------------------------------------------
# Kernel B: cost-volume back-projection
# --------------------------------------------------------------------------------------------------


class _BackprojectVolume(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rel_poses, intrinsics, depths):
        ctx.save_for_backward(features, rel_poses, intrinsics, depths)
        return _extension().backproject_volume_forward(features, rel_poses, intrinsics, depths)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        features, rel_poses, intrinsics, depths = ctx.saved_tensors
        g_f, g_T = _extension().backproject_volume_backward(grad.contiguous(), features, rel_poses, intrinsics, depths)
        need_f, need_T = ctx.needs_input_grad[:2]
        return g_f if need_f else None, g_T if need_T else None, None, None


def backproject_volume(
    features: torch.Tensor,
    rel_poses: torch.Tensor,
    intrinsics: torch.Tensor,
    depths: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Neighbour features sampled at every keyframe pixel back-projected to every depth hypothesis.

    Keyframe pixel (u, v) (pixel centres at integer coordinates) at depth z_k goes to
    X = z_k K^-1 [u, v, 1], P = R_m X + t_m in neighbour m's camera, and is projected with the same
    intrinsics row for the back-projection and the projection (one camera for the whole video);
    neighbour m's features are sampled there bilinearly. Taps outside the image read zero
    (grid_sample's padding_mode="zeros", align_corners=True) and samples behind the camera
    (P_z <= `reference.VOLUME_MIN_DEPTH` = 1e-6) are zero. The keyframe grid has the size of the
    features, which must be at least 2 x 2 (with align_corners=True, grid_sample maps every
    coordinate of a 1-pixel axis onto that pixel, so the reference could not zero what falls outside).

    Gradients flow to features and rel_poses; intrinsics and depths are constants. NaN or Inf in
    rel_poses or intrinsics raises `NumericalError` (NaN features propagate to the samples reading them).

    Shapes:
        features: (M, C, h, w); rel_poses: (M, 3, 4) = [R | t] keyframe camera -> neighbour camera;
        intrinsics: (M, 4) = fx, fy, cx, cy at feature resolution; depths: (D,).
        Returns (M, C, D, h, w).
    """
    dims: dict[str, int] = {}
    expect("features", features, ("M", "C", "h", "w"), dims)
    expect("rel_poses", rel_poses, ("M", 3, 4), dims)
    expect("intrinsics", intrinsics, ("M", 4), dims)
    expect("depths", depths, ("D",), dims)
    named = dict(features=features, rel_poses=rel_poses, intrinsics=intrinsics, depths=depths)
    device, _ = same_device_dtype(named)
    expect_contiguous(named)
    expect_no_grad({"intrinsics": intrinsics, "depths": depths}, "backproject_volume")
    expect_finite({"rel_poses": rel_poses, "intrinsics": intrinsics}, "backproject_volume")
    expect_positive_focal(intrinsics)
    if features.shape[2] < 2 or features.shape[3] < 2:
        raise ShapeError(f"features: expected h, w >= 2, got shape {tuple(features.shape)}")
    if depths.numel() == 0 or not bool(torch.isfinite(depths).all() and (depths > 0).all()):
        raise ShapeError(f"depths: expected positive finite depth hypotheses, got {depths.tolist()[:8]}")
    if _use_extension("backproject_volume", device, backend):
        return _BackprojectVolume.apply(features, rel_poses, intrinsics, depths)
    return reference.backproject_volume(features, rel_poses, intrinsics, depths)


# --------------------------------------------------------------------------------------------------
# Kernel C: window bundle adjustment (joint poses + per-pixel inverse depth), per-edge and per-pixel terms
# --------------------------------------------------------------------------------------------------


class BAReduction(NamedTuple):
    """What `ba_reduce` returns (see its docstring for the formulas and shapes)."""

    H_jj: torch.Tensor  # (E, 6, 6)
    g_j: torch.Tensor  # (E, 6)
    c: torch.Tensor  # (E, h, w, 6)
    c_own: torch.Tensor  # (K, h, w, 6)
    h_pp: torch.Tensor  # (K, h, w)
    g_p: torch.Tensor  # (K, h, w)


def ba_reduce(
    inv_depth: torch.Tensor,
    ii: torch.Tensor,
    rel_poses: torch.Tensor,
    adjoints: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    stride: int = 1,
    min_depth: float = 0.1,
    robust_scale: float = 0.0,
    backend: str = "auto",
) -> BAReduction:
    """The terms of one joint Gauss-Newton step over poses and per-pixel inverse depths, fused over pixels.

    Used by `v2d.geometry.window_ba`, which eliminates the pixels by the Schur complement. Keyframe
    k's grid entry (i, j) is the full-resolution pixel (u, v) = (stride j, stride i) (pixel centres
    at integer coordinates) with inverse depth rho = inv_depth[k, i, j] and ray x = K^-1 [u, v, 1].
    Edge e runs from keyframe ii[e] to a camera j with rel_poses[e] = [R | t] (keyframe -> j) and
    sees the pixel at pi(X), X = R x + rho t. With r = targets - pi(X), J = d pi / d xi_j for a left
    perturbation exp(xi) of camera j's world->camera pose (xi = [translation, rotation], as
    `gn_reduce`), J_rho = d pi / d rho and the weight w = weights / (1 + |r|^2 / robust_scale^2)
    (Cauchy IRLS; robust_scale = 0: w = weights), over the valid pixels (rho > 0 and the depth in
    camera j, X_z / rho, > min_depth):

        H_jj[e] = sum_p w J^T J,   g_j[e] = sum_p w J^T r,   c[e, p] = w J^T J_rho,

    and per keyframe pixel, summed over the edges out of its keyframe,

        h_pp = sum_e w |J_rho|^2,   g_p = sum_e w J_rho . r,   c_own = -sum_e Adj_e^T c[e, p],

    with adjoints[e] = Adj(T_ji) so that the source pose's Jacobian is -J Adj (its blocks H_ij,
    H_ii, g_i follow from H_jj and g_j per edge). Keyframes without an edge get zeros.

    No autograd (a solver step): inputs must not require gradients. NaN or Inf raises
    `NumericalError` (the caller zeroes the weights of unobserved pixels and makes their targets
    finite); a negative weight or non-positive focal length raises `ShapeError`.

    Shapes:
        inv_depth: (K, h, w); ii: (E,) int64 in [0, K); rel_poses: (E, 3, 4); adjoints: (E, 6, 6);
        intrinsics: (4,) = fx, fy, cx, cy (full resolution); targets: (E, h, w, 2) full-resolution
        pixel coordinates; weights: (E, h, w) >= 0. Returns a `BAReduction`.
    """
    dims: dict[str, int] = {}
    expect("inv_depth", inv_depth, ("K", "h", "w"), dims)
    expect("rel_poses", rel_poses, ("E", 3, 4), dims)
    expect("adjoints", adjoints, ("E", 6, 6), dims)
    expect("intrinsics", intrinsics, (4,), dims)
    expect("targets", targets, ("E", "h", "w", 2), dims)
    expect("weights", weights, ("E", "h", "w"), dims)
    named = dict(inv_depth=inv_depth, rel_poses=rel_poses, adjoints=adjoints, intrinsics=intrinsics,
                 targets=targets, weights=weights)
    device, _ = same_device_dtype(named)
    expect_contiguous(named)
    expect_no_grad(named, "ba_reduce")
    expect_finite(named, "ba_reduce")
    expect_positive_focal(intrinsics)
    if not isinstance(ii, torch.Tensor) or ii.dtype != torch.long or tuple(ii.shape) != (dims["E"],):
        got = (tuple(ii.shape), ii.dtype) if isinstance(ii, torch.Tensor) else type(ii).__name__
        raise ShapeError(f"ii: expected an int64 tensor of shape ({dims['E']},), got {got}")
    if ii.device != device or not ii.is_contiguous():
        raise ShapeError(f"ii: expected a contiguous tensor on {device}, got {ii.device}")
    if ii.numel() and (int(ii.min()) < 0 or int(ii.max()) >= dims["K"]):
        raise ShapeError(f"ii: expected keyframe indices in [0, {dims['K']}), got [{int(ii.min())}, {int(ii.max())}]")
    if weights.numel() and bool((weights < 0).any()):
        raise ShapeError("weights: expected non-negative weights")
    if not (isinstance(stride, int) and stride >= 1):
        raise ShapeError(f"stride: expected an integer >= 1, got {stride!r}")
    if not min_depth > 0:
        raise ShapeError(f"min_depth: expected a positive number, got {min_depth!r}")
    if not robust_scale >= 0:
        raise ShapeError(f"robust_scale: expected >= 0 (0 = plain least squares), got {robust_scale!r}")
    if _use_extension("ba_reduce", device, backend):
        out = _extension().ba_reduce(inv_depth, ii, rel_poses, adjoints, intrinsics, targets, weights, stride,
                                     float(min_depth), float(robust_scale))
    else:
        out = reference.ba_reduce(inv_depth, ii, rel_poses, adjoints, intrinsics, targets, weights, stride,
                                  min_depth, robust_scale)
    return BAReduction(*out)

"""Multi-view refinement of a keyframe's inverse depth from flow targets, poses held fixed.

The depth half of a dense bundle adjustment (the pose half is `v2d.geometry.gauss_newton`; the
SLAM front end adjusts both jointly with `v2d.geometry.window_ba`, because alternating the two
halves creeps along the window's scale): with
the poses fixed, every pixel's inverse depth rho is an independent one-parameter least-squares
problem over the edges (keyframe i -> frame j) that observe it,

    min_rho  sum_j w_j |t_j - pi(R_ij x + rho t_ij)|^2 + w_p (rho - rho_prior)^2,

where x = K^-1 [u, v, 1], t_j is the flow target of the pixel in frame j and pi the pinhole
projection (homogeneous form, as `reproject`: scaling the point by rho does not move its
projection). The derivative is closed-form, d pi / d rho = (d pi / d X) t_ij, so each Gauss-Newton
step is one division per pixel: no linear system, nothing a kernel would speed up beyond what
vectorised torch does already. Pixels with little parallax (small |d pi / d rho|) stay at the prior;
pixels seen across a wide baseline move to their triangulated depth.

Robustness: each step re-weights each edge's residual r with a Cauchy factor 1 / (1 + (r / c)^2)
(`v2d.geometry.robust.cauchy_weight`; iteratively re-weighted least squares), so one bad flow
vector among several does not decide the pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.errors import ShapeError
from v2d.geometry.camera import _rays, project
from v2d.geometry.lie import quat_to_matrix
from v2d.geometry.robust import cauchy_weight

__all__ = ["DepthRefineOptions", "refine_inverse_depth"]


@dataclass(frozen=True)
class DepthRefineOptions:
    """Settings of `refine_inverse_depth`.

    Attributes:
        iterations: Gauss-Newton steps.
        robust_scale: Cauchy scale c (pixels) of the flow residuals; 0 = plain least squares.
        max_step: largest change of inverse depth per step, relative to the current value (0.25 =
            at most 25 %), so a pixel does not jump across the scene on one linearisation.
        min_depth: depth (scene units) in front of camera j below which an edge is ignored.
        min_inv_depth: inverse depth floor (1 / farthest depth), keeps every pixel in front.
        stride: refine every stride-th pixel (rows and columns) and carry the relative change to
            the pixels between by bilinear interpolation: the starting map keeps its detail, the
            flow corrects it at low frequency (stride 2 costs a quarter).
    """

    iterations: int = 3
    robust_scale: float = 2.0
    max_step: float = 0.25
    min_depth: float = 0.1
    min_inv_depth: float = 1e-3
    stride: int = 1


def _check_inputs(inv: Tensor, rel: Tensor, intrinsics: Tensor, targets: Tensor, weights: Tensor,
                  prior: Tensor, prior_weight: Tensor) -> None:
    if inv.ndim != 2:
        raise ShapeError(f"inv_depth: expected (H, W), got {tuple(inv.shape)}")
    H, W = inv.shape
    E = rel.shape[0] if rel.ndim == 2 else -1
    expected = {"rel_poses": (rel, (E, 7)), "intrinsics": (intrinsics, (4,)), "targets": (targets, (E, H, W, 2)),
                "weights": (weights, (E, H, W)), "prior": (prior, (H, W)), "prior_weight": (prior_weight, (H, W))}
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape or E < 1:
            raise ShapeError(f"{name}: expected {shape} with E >= 1 edges, got {tuple(x.shape)}")


def refine_inverse_depth(inv_depth: Tensor, rel_poses: Tensor, intrinsics: Tensor, targets: Tensor,
                         weights: Tensor, prior: Tensor, prior_weight: Tensor,
                         opts: DepthRefineOptions = DepthRefineOptions()) -> Tensor:
    """Gauss-Newton on every pixel's inverse depth of one keyframe, the poses fixed.

    Args:
        inv_depth: the starting inverse depth of the keyframe.
        rel_poses: T_j * T_i^-1 per edge (lietorch layout [t, q]): keyframe camera -> camera j.
        intrinsics: [fx, fy, cx, cy] of the keyframe and every frame j (one camera).
        targets: where each keyframe pixel is seen in frame j, pixel coordinates [u, v].
        weights: confidence of each target (0 = unobserved).
        prior: inverse depth the estimate is pulled towards (e.g. the depth network's).
        prior_weight: weight of (rho - prior)^2, in the flow residuals' units (px^2 per unit of
            inverse depth squared); > 0 everywhere keeps every pixel's problem well posed.
        opts: iterations, robust scale, step limit.

    Shapes: inv_depth, prior, prior_weight (H, W); rel_poses (E, 7); intrinsics (4,);
    targets (E, H, W, 2); weights (E, H, W) -> (H, W) refined inverse depth (detached: SLAM-side
    refinement, no gradient is defined through the re-weighting).
    """
    _check_inputs(inv_depth, rel_poses, intrinsics, targets, weights, prior, prior_weight)
    if opts.stride < 1:
        raise ShapeError(f"stride: expected >= 1, got {opts.stride}")
    H, W = inv_depth.shape
    dtype = inv_depth.dtype
    rel, K = rel_poses.to(dtype), intrinsics.to(dtype)
    s = opts.stride
    rays = _rays(K, H, W, dtype, inv_depth.device)[::s, ::s]  # (h, w, 3): the refined pixels
    start = inv_depth.detach().clamp_min(opts.min_inv_depth)
    rho = _solve(start[::s, ::s], rel.detach(), K.detach(), rays.detach(), targets[:, ::s, ::s].detach(),
                 weights[:, ::s, ::s].detach(), prior[::s, ::s].detach().to(dtype),
                 prior_weight[::s, ::s].detach().to(dtype), opts)
    if s == 1:
        return rho
    return start * _upsample(rho / start[::s, ::s], s, H, W)


def _upsample(x: Tensor, s: int, H: int, W: int) -> Tensor:
    """Bilinear interpolation of x sampled at pixels (s i, s j) onto every pixel of (H, W) (edge values beyond)."""
    h, w = x.shape
    v = (torch.arange(H, dtype=x.dtype, device=x.device) / s).clamp(max=h - 1)
    u = (torch.arange(W, dtype=x.dtype, device=x.device) / s).clamp(max=w - 1)
    grid = torch.stack(torch.meshgrid(u / max(w - 1, 1) * 2 - 1, v / max(h - 1, 1) * 2 - 1, indexing="xy"), dim=-1)
    return F.grid_sample(x[None, None], grid[None], mode="bilinear", align_corners=True)[0, 0]


def _solve(rho: Tensor, rel: Tensor, K: Tensor, rays: Tensor, targets: Tensor, weights: Tensor, prior: Tensor,
           pw: Tensor, opts: DepthRefineOptions) -> Tensor:
    """The Gauss-Newton iterations on the pixels whose rays (h, w, 3) are given (see refine_inverse_depth)."""
    dtype = rho.dtype
    R, t = quat_to_matrix(rel[:, 3:]), rel[:, :3]  # (E, 3, 3), (E, 3)
    Rx = torch.einsum("eij,hwj->ehwi", R, rays)  # (E, H, W, 3): fixed over the iterations
    tt = t[:, None, None, :]
    obs = (weights > 0) & torch.isfinite(targets).all(-1)
    tgt = torch.where(obs[..., None], targets, torch.zeros_like(targets)).to(dtype)
    w0 = torch.where(obs, weights, torch.zeros_like(weights)).to(dtype)
    f = K[:2]
    for _ in range(opts.iterations):
        X = Rx + tt * rho[None, ..., None]  # homogeneous point in camera j, Z_j = X_z / rho
        Z = X[..., 2:]
        uv = project(X, K)  # (E, h, w, 2)
        J_rho = f * (tt[..., :2] * Z - X[..., :2] * tt[..., 2:]) / (Z * Z)  # d uv / d rho = (d uv / d X) t
        ok = obs & (X[..., 2] > opts.min_depth * rho)  # targets need not be near: no image is sampled
        r = tgt - uv
        w = torch.where(ok, w0, torch.zeros_like(w0))
        if opts.robust_scale > 0:
            w = w * cauchy_weight((r ** 2).sum(-1), opts.robust_scale)
        J_rho = torch.where(ok[..., None], J_rho, torch.zeros_like(J_rho))
        r = torch.where(ok[..., None], r, torch.zeros_like(r))
        h = (w * (J_rho ** 2).sum(-1)).sum(0) + pw
        g = (w * (J_rho * r).sum(-1)).sum(0) + pw * (prior - rho)
        step = (g / h.clamp_min(1e-12)).clamp(-opts.max_step * rho, opts.max_step * rho)
        rho = torch.where(torch.isfinite(step), rho + step, rho).clamp_min(opts.min_inv_depth)
    return rho

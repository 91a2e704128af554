"""Differentiable Gauss-Newton over SE3 poses (and optionally a shared focal length).

The layer DeepV2D's motion module unrolls: given the keyframe inverse depth and, for every edge
i -> j, target pixel coordinates with per-coordinate confidence weights, it minimises

    sum_e sum_x  w_e(x) * || target_e(x) - pi(T_j T_i^-1 X_i(x)) ||^2

over the world->camera poses T (lietorch layout, left-multiplied updates T <- exp(xi) T with
xi = [translation, rotation]). The per-pixel work is fused in `kernels.ops.gn_reduce`, which returns
the normal equations in the target pose's perturbation; the source pose's blocks follow from the
adjoint, because perturbing T_i by xi moves the point like perturbing T_j by -Adj(T_j T_i^-1) xi.
Everything here is differentiable: gradients flow through the solve (Cholesky, as OptNet and
DeepV2D do), the retraction and back into the kernel (to targets, weights, inverse depth, poses
and intrinsics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kernels import ops
from kernels.errors import ShapeError
from v2d.geometry.camera import pose_to_rt
from v2d.geometry.lie import se3_adjoint, se3_exp, se3_inv, se3_mul

__all__ = ["GNOptions", "GNBlocks", "gn_accumulate", "gn_step", "gauss_newton", "assemble_system"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GNOptions:
    """Settings of the Gauss-Newton layer (the `gn` section of the v2d config).

    Attributes:
        iterations: Gauss-Newton steps per call of `gauss_newton`.
        damping: constant added to the diagonal of the free block (units of H: px^2 per unit^2).
        damping_scale: Levenberg-Marquardt style multiple of diag(H) added to the diagonal.
        max_translation_step: largest translation update per pose and step (scene units); longer
            steps are scaled down, which keeps early iterations from a bad start finite.
        max_rotation_step: largest rotation update per pose and step (radians).
        max_focal_step: largest change of the focal log-scale per step (0.1 = about 10 %).
        min_depth: points closer than this to the target camera (scene units) are ignored.
        fixed_poses: the first `fixed_poses` poses are held fixed (gauge freedom; 1 in keyframe mode).
        optimize_focal: also optimise a shared log-scale of fx, fy (uncalibrated video).
        tolerance: without autograd (inference), `gauss_newton` stops once a step changes no free
            pose parameter (translation in scene units, rotation in radians) nor the focal
            log-scale by more than this; 0 runs every iteration. With autograd every iteration
            runs (the unrolled layer a trainer differentiates stays fixed).
    """

    iterations: int = 2
    damping: float = 1e-4
    damping_scale: float = 0.0
    max_translation_step: float = 0.5
    max_rotation_step: float = 0.5
    max_focal_step: float = 0.1
    min_depth: float = 0.1
    fixed_poses: int = 1
    optimize_focal: bool = False
    tolerance: float = 0.0


@dataclass
class GNBlocks:
    """Normal-equation blocks per edge (see `gn_accumulate`).

    Shapes: H_ii, H_ij, H_jj: (B, E, 6, 6); b_i, b_j: (B, E, 6); with the focal column also
    H_ff: (B, E), H_fi, H_fj: (B, E, 6), b_f: (B, E); else those are None.
    """

    H_ii: torch.Tensor
    H_ij: torch.Tensor
    H_jj: torch.Tensor
    b_i: torch.Tensor
    b_j: torch.Tensor
    H_ff: torch.Tensor | None = None
    H_fi: torch.Tensor | None = None
    H_fj: torch.Tensor | None = None
    b_f: torch.Tensor | None = None


def _batched(
    poses_cw: torch.Tensor,
    inv_depth: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    ii: torch.Tensor,
    jj: torch.Tensor,
) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and add a leading batch dimension when the inputs have none."""
    if poses_cw.dim() not in (2, 3) or poses_cw.shape[-1] != 7:
        raise ShapeError(f"poses_cw: expected (N, 7) or (B, N, 7), got {tuple(poses_cw.shape)}")
    unbatched = poses_cw.dim() == 2
    if unbatched:
        poses_cw, inv_depth, intrinsics, targets, weights = (
            t.unsqueeze(0) for t in (poses_cw, inv_depth, intrinsics, targets, weights)
        )
    B, N = poses_cw.shape[:2]
    for name, idx in (("ii", ii), ("jj", jj)):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.long:
            got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ShapeError(f"{name}: expected an int64 tensor (E,), got {got}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= N):
            raise ShapeError(f"{name}: indices must lie in [0, {N}), got range [{int(idx.min())}, {int(idx.max())}]")
    E = ii.shape[0]
    if jj.shape[0] != E or E == 0:
        raise ShapeError(f"ii, jj: expected the same non-zero number of edges, got {ii.shape[0]} and {jj.shape[0]}")
    if inv_depth.dim() != 4 or inv_depth.shape[:2] != (B, E):
        raise ShapeError(
            f"inv_depth: expected (E, H, W) or (B, E, H, W) with B={B}, E={E}, got {tuple(inv_depth.shape)}"
        )
    H, W = inv_depth.shape[-2:]
    for name, t in (("targets", targets), ("weights", weights)):
        if t.shape != (B, E, H, W, 2):
            raise ShapeError(f"{name}: expected {(E, H, W, 2)} (batch {B}), got {tuple(t.shape)}")
    if intrinsics.shape != (B, 4):
        raise ShapeError(f"intrinsics: expected (4,) or (B, 4) with B={B}, got {tuple(intrinsics.shape)}")
    return unbatched, poses_cw, inv_depth, intrinsics, targets, weights


def gn_accumulate(
    poses_cw: torch.Tensor,
    inv_depth: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    ii: torch.Tensor,
    jj: torch.Tensor,
    min_depth: float = 0.1,
    with_focal: bool = False,
    backend: str = "auto",
) -> GNBlocks:
    """Per-edge Gauss-Newton blocks in the perturbations of both poses of each edge i -> j.

    Perturbation convention: T <- exp(xi) T for world->camera poses, xi = [translation, rotation].
    For edge e the residual is r = targets_e - pi(T_j T_i^-1 X), X the source pixels back-projected
    with `inv_depth[e]` (the inverse depth of frame ii[e]), and the blocks are
    H_ab = sum_x J_a^T W J_b, b_a = sum_x J_a^T W r for a, b in {i, j}; the step solving
    H xi = b decreases the weighted squared residual. With `with_focal`, f is a shared log-scale
    of fx and fy.

    Shapes:
        poses_cw: (N, 7) or (B, N, 7); inv_depth: (E, H, W) or (B, E, H, W);
        intrinsics: (4,) or (B, 4); targets, weights: (E, H, W, 2) or (B, E, H, W, 2);
        ii, jj: (E,) int64. Returns GNBlocks (batch dimension kept as given).
    """
    unbatched, poses_cw, inv_depth, intrinsics, targets, weights = _batched(
        poses_cw, inv_depth, intrinsics, targets, weights, ii, jj
    )
    B, E, H, W = inv_depth.shape
    T_ij = se3_mul(poses_cw[:, jj], se3_inv(poses_cw[:, ii]))  # (B, E, 7)
    rel = pose_to_rt(T_ij).reshape(B * E, 3, 4).contiguous()
    intr = intrinsics[:, None, :].expand(B, E, 4).reshape(B * E, 4).contiguous()
    Hm, bm = ops.gn_reduce(
        inv_depth.reshape(B * E, H, W).contiguous(),
        rel,
        intr,
        targets.reshape(B * E, H, W, 2).contiguous(),
        weights.reshape(B * E, H, W, 2).contiguous(),
        min_depth=min_depth,
        with_focal=with_focal,
        backend=backend,
    )
    K = Hm.shape[-1]
    Hm, bm = Hm.view(B, E, K, K), bm.view(B, E, K)
    adj = se3_adjoint(T_ij)  # (B, E, 6, 6)
    adj_t = adj.transpose(-1, -2)
    H_jj, b_j = Hm[..., :6, :6], bm[..., :6]
    blocks = GNBlocks(
        H_ii=adj_t @ H_jj @ adj,
        H_ij=-(adj_t @ H_jj),
        H_jj=H_jj,
        b_i=-(adj_t @ b_j[..., None])[..., 0],
        b_j=b_j,
    )
    if with_focal:
        H_fj = Hm[..., 6, :6]
        blocks.H_ff, blocks.H_fj, blocks.b_f = Hm[..., 6, 6], H_fj, bm[..., 6]
        blocks.H_fi = -(H_fj[..., None, :] @ adj)[..., 0, :]
    if unbatched:
        for name, value in vars(blocks).items():
            if value is not None:
                setattr(blocks, name, value[0])
    return blocks


def assemble_system(
    blocks: GNBlocks, ii: torch.Tensor, jj: torch.Tensor, num_poses: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the per-edge blocks into the dense system over all poses (and the focal variable last).

    Shapes:
        blocks: batched GNBlocks (B, E, ...). Returns H: (B, P, P) and b: (B, P) with
        P = 6 * num_poses (+ 1 with the focal column), pose k at rows 6k .. 6k+5.
    """
    B, E = blocks.H_jj.shape[:2]
    N = num_poses
    with_focal = blocks.H_ff is not None
    # Block matrix indexed (B, N, N, 6, 6); each edge adds to (i,i), (i,j), (j,i), (j,j).
    rows = torch.cat([ii, ii, jj, jj])
    cols = torch.cat([ii, jj, ii, jj])
    vals = torch.cat([blocks.H_ii, blocks.H_ij, blocks.H_ij.transpose(-1, -2), blocks.H_jj], dim=1)
    Hb = vals.new_zeros(B, N * N, 6, 6).index_add(1, rows * N + cols, vals)
    Hd = Hb.view(B, N, N, 6, 6).permute(0, 1, 3, 2, 4).reshape(B, 6 * N, 6 * N)
    bd = vals.new_zeros(B, N, 6).index_add(1, torch.cat([ii, jj]), torch.cat([blocks.b_i, blocks.b_j], dim=1))
    bd = bd.reshape(B, 6 * N)
    if not with_focal:
        return Hd, bd
    Hfp = vals.new_zeros(B, N, 6).index_add(1, torch.cat([ii, jj]), torch.cat([blocks.H_fi, blocks.H_fj], dim=1))
    Hfp = Hfp.reshape(B, 6 * N)
    Hff = blocks.H_ff.sum(dim=1)
    top = torch.cat([Hd, Hfp[:, :, None]], dim=2)
    bottom = torch.cat([Hfp, Hff[:, None]], dim=1)[:, None, :]
    return torch.cat([top, bottom], dim=1), torch.cat([bd, blocks.b_f.sum(dim=1, keepdim=True)], dim=1)


_FALLBACK_LEVELS = 4  # damping levels tried per system: boost 1, 10, 100, 1000


def _damped_solve(H: torch.Tensor, b: torch.Tensor, opts: GNOptions) -> torch.Tensor:
    """Solve (H + lambda I + mu diag(H)) x = b per batch item in float64 by Cholesky.

    lambda = `opts.damping`, mu = `opts.damping_scale`. An item whose system is not positive definite
    is retried with both multiplied by 10, 100, 1000 (plus 1e-5, 1e-4, 1e-3 of its mean diagonal, so
    that the fallback also works with zero damping); one that fails even then (no valid pixels,
    degenerate geometry) gets a zero step and zero gradients, with a warning. The level is chosen
    per item without gradients, then one differentiable Cholesky runs on the chosen systems, so a
    failing item never puts NaNs into the gradients of the others.

    Shapes: H: (B, P, P), b: (B, P) -> x: (B, P) in the dtype of b.
    """
    H64, b64 = H.double(), b.double()
    B, P = b64.shape
    eye = torch.eye(P, dtype=torch.float64, device=H.device)
    diag = torch.diagonal(H64, dim1=-2, dim2=-1)
    mean_diag = diag.detach().abs().mean(-1).nan_to_num(0.0)

    def damped(level: torch.Tensor) -> torch.Tensor:
        boost = 10.0 ** level.to(torch.float64)
        extra = torch.where(level > 0, boost * 1e-6, torch.zeros_like(boost)) * mean_diag
        lam = (boost * opts.damping + extra)[:, None, None]
        return H64 + lam * eye + (boost * opts.damping_scale)[:, None, None] * torch.diag_embed(diag)

    with torch.no_grad():
        level = torch.full((B,), -1, dtype=torch.int64, device=H.device)
        for k in range(_FALLBACK_LEVELS):
            todo = level < 0
            if not todo.any():
                break
            _, info = torch.linalg.cholesky_ex(damped(torch.full_like(level, k)))
            level = torch.where(todo & (info == 0), torch.full_like(level, k), level)
    ok = level >= 0
    if not ok.all():
        n_bad = int((~ok).sum())
        _log.warning("Gauss-Newton: %d system(s) singular even with extra damping; taking a zero step", n_bad)
    system = torch.where(ok[:, None, None], damped(level.clamp_min(0)), eye)
    rhs = torch.where(ok[:, None], b64, torch.zeros_like(b64))
    x = torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(system))[..., 0]
    return torch.where(ok[:, None], x, torch.zeros_like(x)).to(b.dtype)


def _clip(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale the last-dimension vectors down to norm <= max_norm (differentiable)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(max_norm / norm.clamp_min(1e-12), max=1.0)


def gn_step(
    poses_cw: torch.Tensor,
    inv_depth: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    ii: torch.Tensor,
    jj: torch.Tensor,
    opts: GNOptions = GNOptions(),
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One damped Gauss-Newton step; the first `opts.fixed_poses` poses stay fixed.

    Shapes: as `gn_accumulate`. Returns (poses_cw (.., N, 7), intrinsics (.., 4)); intrinsics only
    change with `opts.optimize_focal` (fx, fy <- fx e^s, fy e^s). Gradients flow to the input
    intrinsics too, so with `optimize_focal` an unrolled loop differentiates through every step's
    focal change.
    """
    P, K, _ = _step(poses_cw, inv_depth, intrinsics, targets, weights, ii, jj, opts, backend)
    return P, K


def _step(poses_cw: torch.Tensor, inv_depth: torch.Tensor, intrinsics: torch.Tensor, targets: torch.Tensor,
          weights: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, opts: GNOptions, backend: str
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gn_step`, also returning the largest absolute change of a free parameter (a 0-d tensor)."""
    unbatched, P, D, K, T, Wt = _batched(poses_cw, inv_depth, intrinsics, targets, weights, ii, jj)
    B, N = P.shape[:2]
    k = opts.fixed_poses
    if not 0 <= k <= N:
        raise ShapeError(f"fixed_poses: expected 0..{N}, got {k}")
    blocks = gn_accumulate(P, D, K, T, Wt, ii, jj, opts.min_depth, opts.optimize_focal, backend)
    H, b = assemble_system(blocks, ii, jj, N)
    free = slice(6 * k, H.shape[-1])
    dx = _damped_solve(H[:, free, free], b[:, free], opts)
    xi = dx[:, : 6 * (N - k)].reshape(B, N - k, 6)
    xi = torch.cat([_clip(xi[..., :3], opts.max_translation_step), _clip(xi[..., 3:], opts.max_rotation_step)], -1)
    P = torch.cat([P[:, :k], se3_mul(se3_exp(xi), P[:, k:])], dim=1)
    change = xi.detach().abs().amax() if xi.numel() else xi.new_zeros(())
    if opts.optimize_focal:
        s = dx[:, -1].clamp(-opts.max_focal_step, opts.max_focal_step)
        scale = torch.stack([s.exp(), s.exp(), torch.ones_like(s), torch.ones_like(s)], dim=-1)
        K = K * scale
        change = torch.maximum(change, s.detach().abs().amax())
    if unbatched:
        return P[0], K[0], change
    return P, K, change


def gauss_newton(
    poses_cw: torch.Tensor,
    inv_depth: torch.Tensor,
    intrinsics: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    ii: torch.Tensor,
    jj: torch.Tensor,
    opts: GNOptions = GNOptions(),
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`opts.iterations` Gauss-Newton steps (see `gn_step`), unrolled and differentiable; without
    autograd, fewer once a step is within `opts.tolerance` (steps after it would only move the poses
    by float rounding).

    Shapes: as `gn_accumulate`. Returns (poses_cw, intrinsics) after the last step.
    """
    if opts.iterations < 1:
        raise ShapeError(f"iterations: expected >= 1, got {opts.iterations}")
    early_exit = opts.tolerance > 0 and not torch.is_grad_enabled()
    for _ in range(opts.iterations):
        poses_cw, intrinsics, change = _step(poses_cw, inv_depth, intrinsics, targets, weights, ii, jj, opts,
                                             backend)
        if early_exit and float(change) <= opts.tolerance:
            break
    return poses_cw, intrinsics

"""Joint Gauss-Newton over a window's poses and per-pixel inverse depths (dense bundle adjustment).

`v2d.geometry.gauss_newton` optimises poses with the depth fixed; alternating it with a per-pixel
inverse-depth step with the poses fixed (this solver with every pose fixed) is block coordinate
descent, which creeps along the direction where depth and translation change together (the window's
scale: scaling every inverse depth by s and every translation by 1/s leaves the flow residuals
unchanged, only the depth prior notices). This module takes the Gauss-Newton step in both at once,
as DROID-SLAM's dense BA does, so that direction is solved for instead of crawled along.

Problem. Nodes 0..K-1 are keyframes with an inverse-depth map, nodes K..N-1 frames without one
(only targets of edges). Edge e goes from keyframe i = ii[e] to node j = jj[e]. For every (strided)
pixel p of keyframe i, with ray x = K^-1 [u, v, 1] (full-resolution pixel coordinates) and inverse
depth rho,

    X = R_ji x + rho t_ji          (homogeneous point in camera j, T_ji = T_j T_i^-1; Z_j = X_z / rho)
    r = target - pi(X)

and the objective is

    sum_e sum_p  w_ep c(r_ep) |r_ep|^2  +  sum_k sum_p  pw_kp (rho_kp - prior_kp)^2,

c the Cauchy factor 1 / (1 + |r|^2 / c^2) (`v2d.geometry.robust.cauchy_weight`; the kernel
computes the same factor, which a test holds it to), recomputed at every iteration (IRLS); an
edge/pixel counts only where its weight is > 0, its target finite and X_z > min_depth * rho.

Jacobians (poses world->camera, left-multiplied updates T <- exp(xi) T, xi = [v, w] as
`se3_exp`, [.]x the cross-product matrix):

    dX / dxi_j = [rho I, -[X]x]
    dX / dxi_i = -R_ji [rho I, -[x]x]  =  -(dX / dxi_j) Adj(T_ji)
    dX / drho  = t_ji

and d pi / dX the pinhole Jacobian. Only the target pose's 2 x 6 Jacobian is formed per pixel (in
closed form); the source pose's blocks follow from the adjoint per edge, as in `gauss_newton`.

Why the Schur complement. Writing the unknowns as c (the 6 M free pose parameters) and rho (one per
pixel), the normal equations are

    [ H_cc   C   ] [ dc   ]   [ g_c ]
    [ C^T    D   ] [ drho ] = [ g_p ]

where D is *diagonal*: a pixel's inverse depth appears only in its own residuals, so each pixel's
block is a scalar H_pp = sum_e w |J_rho|^2 + pw. Eliminating the pixels costs one division each:

    S = H_cc - sum_p C_p C_p^T / H_pp,   s = g_c - sum_p C_p g_p / H_pp,   S dc = s,
    drho_p = (g_p - C_p^T dc) / H_pp,

with C_p (6 M,) the pixel's coupling to the poses, non-zero only on its keyframe's pose and on the
targets of the keyframe's edges. So S is built per source keyframe: its pixels' couplings stacked
as a (P, 6 (1 + m)) matrix (the keyframe's own pose, summed over its m edges, then one 6-block per
edge target), rows scaled by 1 / sqrt(H_pp), whose Gram matrix is scattered into S. The reduced
system is 6 M x 6 M (M ~ 10 poses), solved by Cholesky with Levenberg-Marquardt damping
(lambda + mu diag(H_cc) on the pose diagonal, mu small: see `_LM_SCALE`; boosted 100x and 10^4x
if the factorisation fails, then least squares); the pixel steps are clamped to max_step * rho and
rho to >= min_inv_depth (where a clamp binds, that pixel's step no longer matches the pose step).

Where the work is done. Every per-pixel term (the projection, J_j, J_rho, the robust weight, H_jj
and g_j per edge, the couplings, H_pp and g_p) comes from one fused kernel, `kernels.ops.ba_reduce`
(C++/OpenMP, CUDA; its pure-torch reference materialises the Jacobians), called once per keyframe
on that keyframe's edges: no per-pixel Jacobian is stored, only the keyframe's couplings
(P, 6 (1 + m)), which its Gram matrix (torch, BLAS) and the back-substitution need. They are kept
between the two (`keep_couplings`, memory growing with edges x pixels: bounded in a window) or
computed again for the back-substitution (a global adjustment, whose edges grow with the video).
Everything runs in float64, without autograd (a SLAM-side solver).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.errors import ShapeError
from kernels.ops import ba_reduce
from v2d.geometry.camera import pose_to_rt
from v2d.geometry.lie import se3_adjoint, se3_exp, se3_inv, se3_mul

__all__ = ["WindowBAOptions", "window_bundle_adjust"]

# Levenberg-Marquardt multiple of diag(H_cc) added to the pose diagonal. Kept small on purpose: the
# scale direction's curvature in the reduced system comes from the depth prior alone and is orders of
# magnitude below diag(H_cc) (flow information), so a 1e-4 multiple already halves every step along it
# (measured on the synthetic test: error x0.47 per iteration instead of quadratic convergence).
_LM_SCALE = 1e-6
_FALLBACK_BOOSTS = (1.0, 1e2, 1e4)  # damping boosts tried before falling back to least squares


@dataclass(frozen=True)
class WindowBAOptions:
    """Settings of `window_bundle_adjust`.

    Attributes:
        iterations: joint Gauss-Newton steps.
        robust_scale: Cauchy scale c (pixels) of the flow residuals; 0 = plain least squares.
        damping: lambda added to the free poses' diagonal (px^2 per unit^2), plus `_LM_SCALE`
            times that diagonal.
        min_depth: depth (scene units) in front of camera j below which an edge/pixel is ignored.
        min_inv_depth: inverse-depth floor (1 / farthest depth).
        max_step: largest change of inverse depth per step, relative to its current value.
        stride: optimise every stride-th pixel (rows and columns); the relative change is carried to
            the pixels between by bilinear interpolation.
        fixed_poses: the first `fixed_poses` nodes keep their pose (gauge).
        max_translation_step, max_rotation_step: largest translation (scene units) and rotation
            (radians) update of one pose in one step. A longer pose step is scaled down as a whole,
            not clipped part by part as `GNOptions` does, so that it stays a multiple of the solved
            step and the pixels' back-substitution (which uses the scaled step) stays consistent.
        keep_couplings: keep each keyframe's pixel couplings (P, 6 (1 + m)) from the Schur
            complement to the back-substitution (memory grows with edges x pixels); False computes
            them again instead (twice the kernel work, memory of one keyframe's edges): for a
            global adjustment whose edges grow with the video.
    """

    iterations: int = 3
    robust_scale: float = 2.0
    damping: float = 1e-4
    min_depth: float = 0.1
    min_inv_depth: float = 1e-3
    max_step: float = 0.25
    stride: int = 2
    fixed_poses: int = 1
    max_translation_step: float = 0.5
    max_rotation_step: float = 0.5
    keep_couplings: bool = True


def _check_inputs(poses: Tensor, inv: Tensor, intrinsics: Tensor, ii: Tensor, jj: Tensor, targets: Tensor,
                  weights: Tensor, prior: Tensor, prior_weight: Tensor, opts: WindowBAOptions) -> None:
    if poses.ndim != 2 or poses.shape[-1] != 7 or poses.shape[0] < 1:
        raise ShapeError(f"poses_cw: expected (N, 7) with N >= 1, got {tuple(poses.shape)}")
    if inv.ndim != 3 or inv.shape[0] < 1:
        raise ShapeError(f"inv_depth: expected (K, H, W) with K >= 1, got {tuple(inv.shape)}")
    N = poses.shape[0]
    Kf, H, W = inv.shape
    if Kf > N:
        raise ShapeError(f"inv_depth: expected at most N={N} keyframes, got {Kf}")
    for name, idx in (("ii", ii), ("jj", jj)):
        if not isinstance(idx, Tensor) or idx.ndim != 1 or idx.dtype != torch.long:
            got = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
            raise ShapeError(f"{name}: expected an int64 tensor (E,), got {got}")
    E = ii.shape[0]
    if jj.shape[0] != E or E < 1:
        raise ShapeError(f"ii, jj: expected the same number E >= 1 of edges, got {ii.shape[0]} and {jj.shape[0]}")
    if int(ii.min()) < 0 or int(ii.max()) >= Kf:
        raise ShapeError(f"ii: sources must be keyframes in [0, {Kf}), got range [{int(ii.min())}, {int(ii.max())}]")
    if int(jj.min()) < 0 or int(jj.max()) >= N:
        raise ShapeError(f"jj: targets must lie in [0, {N}), got range [{int(jj.min())}, {int(jj.max())}]")
    if bool((ii == jj).any()):
        raise ShapeError(f"ii, jj: an edge joins a node to itself (edge {int((ii == jj).nonzero()[0])})")
    expected = {"intrinsics": (intrinsics, (4,)), "targets": (targets, (E, H, W, 2)), "weights": (weights, (E, H, W)),
                "prior": (prior, (Kf, H, W)), "prior_weight": (prior_weight, (Kf, H, W))}
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape:
            raise ShapeError(f"{name}: expected {shape}, got {tuple(x.shape)}")
    if opts.stride < 1:
        raise ShapeError(f"stride: expected >= 1, got {opts.stride}")
    if opts.iterations < 0:
        raise ShapeError(f"iterations: expected >= 0, got {opts.iterations}")
    if not opts.min_depth > 0:
        raise ShapeError(f"min_depth: expected > 0, got {opts.min_depth}")
    if not opts.robust_scale >= 0:
        raise ShapeError(f"robust_scale: expected >= 0 (0 = plain least squares), got {opts.robust_scale}")
    if not 0 <= opts.fixed_poses <= N:
        raise ShapeError(f"fixed_poses: expected 0..{N}, got {opts.fixed_poses}")


def window_bundle_adjust(poses_cw: Tensor, inv_depth: Tensor, intrinsics: Tensor, ii: Tensor, jj: Tensor,
                         targets: Tensor, weights: Tensor, prior: Tensor, prior_weight: Tensor,
                         opts: WindowBAOptions = WindowBAOptions()) -> tuple[Tensor, Tensor]:
    """Joint Gauss-Newton over the free poses and every keyframe's per-pixel inverse depth.

    Args:
        poses_cw: world->camera poses of the N nodes (lietorch layout [t, q]); the first K are the
            keyframes whose inverse depth is given, the rest frames that are only edge targets.
        inv_depth: the keyframes' starting inverse depth.
        intrinsics: [fx, fy, cx, cy] (one camera for every node).
        ii, jj: edge e runs from keyframe ii[e] (< K) to node jj[e] != ii[e].
        targets: where each pixel of keyframe ii[e] is seen in node jj[e], pixel coordinates [u, v].
        weights: confidence of each target (0 = unobserved).
        prior: inverse depth each keyframe is pulled towards (the depth network's).
        prior_weight: weight of (rho - prior)^2 in the flow residuals' units (px^2 per unit of
            inverse depth squared); > 0 everywhere keeps every pixel's scalar block invertible.
        opts: iterations, robust scale, damping, step limits, stride, fixed poses.

    Shapes: poses_cw (N, 7); inv_depth, prior, prior_weight (K, H, W); intrinsics (4,);
    ii, jj (E,) int64; targets (E, H, W, 2); weights (E, H, W)
    -> (poses_cw (N, 7), inv_depth (K, H, W)) in the dtypes given (detached; float64 inside).
    """
    _check_inputs(poses_cw, inv_depth, intrinsics, ii, jj, targets, weights, prior, prior_weight, opts)
    f64 = torch.float64
    Kf, H, W = inv_depth.shape
    s = opts.stride
    intr = intrinsics.detach().to(f64).contiguous()
    # non-finite inputs: a prior or prior weight that is not finite is no prior; a starting inverse
    # depth that is not finite starts at the prior (or the floor)
    pri_full = prior.detach().to(f64)
    pw_full = prior_weight.detach().to(f64)
    no_prior = ~(torch.isfinite(pri_full) & torch.isfinite(pw_full))
    pri_full = torch.where(no_prior, torch.zeros_like(pri_full), pri_full)
    pw_full = torch.where(no_prior, torch.zeros_like(pw_full), pw_full)
    start = inv_depth.detach().to(f64)
    start = torch.where(torch.isfinite(start), start, pri_full).clamp_min(opts.min_inv_depth)
    rho = start[:, ::s, ::s].contiguous()  # (K, h, w)
    # targets and weights stay in their dtype (float32 from the flow: half the memory of a global
    # adjustment's edges); each keyframe's edges are converted when reduced
    tgt = targets.detach()[:, ::s, ::s]
    wts = weights.detach()[:, ::s, ::s]
    obs = (wts > 0) & torch.isfinite(tgt).all(-1) & torch.isfinite(wts)
    tgt = torch.where(obs[..., None], tgt, torch.zeros_like(tgt)).contiguous()
    w0 = torch.where(obs, wts, torch.zeros_like(wts)).contiguous()
    pri = pri_full[:, ::s, ::s].contiguous()
    pw = pw_full[:, ::s, ::s].contiguous()
    poses = poses_cw.detach().to(f64).clone()
    for _ in range(opts.iterations):
        poses, rho = _step(poses, rho, intr, ii, jj, tgt, w0, pri, pw, opts)
    out_poses = poses.to(poses_cw.dtype)
    if s == 1:
        return out_poses, rho.to(inv_depth.dtype)
    up = torch.stack([_upsample(rho[k] / start[k, ::s, ::s], s, H, W) for k in range(Kf)])
    return out_poses, (start * up).to(inv_depth.dtype)


def _step(poses: Tensor, rho: Tensor, intr: Tensor, ii: Tensor, jj: Tensor, tgt: Tensor, w0: Tensor,
          pri: Tensor, pw: Tensor, opts: WindowBAOptions) -> tuple[Tensor, Tensor]:
    """One damped joint Gauss-Newton step (Schur complement on the pixels). Shapes as in the caller:
    poses (N, 7), rho (K, h, w), tgt (E, h, w, 2), w0 (E, h, w) (0 = unobserved), pri, pw (K, h, w)."""
    N, grid = poses.shape[0], rho.shape
    Kf, P = grid[0], grid[1] * grid[2]
    dev, f64 = rho.device, rho.dtype
    T_ji = se3_mul(poses[jj], se3_inv(poses)[ii])  # (E, 7)
    rel = pose_to_rt(T_ji).contiguous()
    adj = se3_adjoint(T_ji)
    if not (bool(torch.isfinite(rel).all()) and bool(torch.isfinite(intr).all())):
        return poses, rho  # nothing sound to linearise: the estimate stays (as in _damped_solve)
    edges_of = [(ii == k).nonzero()[:, 0] for k in range(Kf)]

    def reduce(k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keyframe k's edges through the kernel: (its H_jj (m, 6, 6), g_j (m, 6), and the pixels'
        couplings C (P, 6 (1 + m)): own pose (summed over the edges), then one block per edge target),
        adding its pixels' data terms into h_all[k], g_all[k] on the first call."""
        e = edges_of[k]
        red = ba_reduce(rho_grid[k:k + 1], torch.zeros_like(e), rel[e], adj[e], intr, tgt[e].to(f64), w0[e].to(f64),
                        opts.stride, opts.min_depth, opts.robust_scale)
        if k not in data_added:
            h_all[k] += red.h_pp.reshape(P)
            g_all[k] += red.g_p.reshape(P)
            data_added.add(k)
        m = e.numel()
        C = torch.cat([red.c_own.reshape(P, 6), red.c.reshape(m, P, 6).permute(1, 0, 2).reshape(P, 6 * m)], dim=1)
        return red.H_jj, red.g_j, C

    rho_grid, rho = rho, rho.reshape(Kf, P)
    h_all = pw.reshape(Kf, P).clone()
    g_all = (pw * (pri - rho_grid)).reshape(Kf, P)
    data_added: set[int] = set()
    H_jj = torch.zeros(ii.shape[0], 6, 6, dtype=f64, device=dev)
    g_j = torch.zeros(ii.shape[0], 6, dtype=f64, device=dev)
    gram = torch.zeros(N * N, 6, 6, dtype=f64, device=dev)  # sum_p C_p C_p^T / H_pp, block (a, b) at a * N + b
    g_schur = torch.zeros(N, 6, dtype=f64, device=dev)
    kept: dict[int, Tensor] = {}  # keyframe -> C, for the back-substitution (with opts.keep_couplings)
    # Schur complement: S = H_cc - sum_p C_p C_p^T / H_pp, s = g_c - sum_p C_p g_p / H_pp, one keyframe at a time
    for k in range(Kf):
        if edges_of[k].numel() == 0:
            continue
        H_jj[edges_of[k]], g_j[edges_of[k]], C = reduce(k)
        inv_h = 1.0 / h_all[k].clamp_min(1e-12)
        Cs = C * inv_h.sqrt()[:, None]
        nodes = torch.cat([torch.tensor([k], device=dev), jj[edges_of[k]]])
        n = nodes.numel()
        G = (Cs.T @ Cs).reshape(n, 6, n, 6).permute(0, 2, 1, 3).reshape(n * n, 6, 6)
        gram.index_add_(0, (nodes[:, None] * N + nodes[None, :]).reshape(-1), G)
        g_schur.index_add_(0, nodes, (C.T @ (g_all[k] * inv_h)).reshape(n, 6))
        if opts.keep_couplings:
            kept[k] = C
    # the pose blocks; the source pose's through the adjoint: J_i = -J_j Adj
    adj_t = adj.transpose(1, 2)
    H_ij = -(adj_t @ H_jj)
    H_ii = -(H_ij @ adj)
    g_i = -(adj_t @ g_j[..., None])[..., 0]
    Hb = torch.zeros(N * N, 6, 6, dtype=f64, device=dev)
    gc = torch.zeros(N, 6, dtype=f64, device=dev)
    Hb.index_add_(0, torch.cat([ii, ii, jj, jj]) * N + torch.cat([ii, jj, ii, jj]),
                  torch.cat([H_ii, H_ij, H_ij.transpose(1, 2), H_jj]))
    gc.index_add_(0, torch.cat([ii, jj]), torch.cat([g_i, g_j]))
    # H_cc's diagonal sets the Levenberg-Marquardt scaling (taken before the pixels are eliminated)
    diag_cc = torch.diagonal(Hb.reshape(N, N, 6, 6)[torch.arange(N), torch.arange(N)], dim1=-2, dim2=-1).reshape(-1)
    Hb -= gram
    gc -= g_schur
    S = Hb.reshape(N, N, 6, 6).permute(0, 2, 1, 3).reshape(6 * N, 6 * N)
    f = opts.fixed_poses
    dx = torch.zeros(N, 6, dtype=f64, device=dev)
    if f < N:
        dx[f:] = _damped_solve(S[6 * f:, 6 * f:], gc[f:].reshape(-1), diag_cc[6 * f:], opts.damping).reshape(N - f, 6)
        dx = dx * _step_scale(dx, opts)[:, None]
    new_rho = torch.empty_like(rho)
    for k in range(Kf):
        h = h_all[k].clamp_min(1e-12)
        rhs = g_all[k]
        if edges_of[k].numel():
            C = kept.pop(k) if opts.keep_couplings else reduce(k)[2]
            rhs = rhs - C @ dx[torch.cat([torch.tensor([k], device=dev), jj[edges_of[k]]])].reshape(-1)
        step = rhs / h
        lim = opts.max_step * rho[k]
        step = torch.maximum(torch.minimum(step, lim), -lim)
        new_rho[k] = torch.where(torch.isfinite(step), rho[k] + step, rho[k]).clamp_min(opts.min_inv_depth)
    new_rho = new_rho.view(grid)
    new_poses = poses.clone()
    if f < N:
        upd = se3_mul(se3_exp(dx[f:]), poses[f:])
        new_poses[f:] = torch.cat([upd[:, :3], upd[:, 3:] / upd[:, 3:].norm(dim=-1, keepdim=True)], dim=-1)
    return new_poses, new_rho


def _upsample(x: Tensor, s: int, H: int, W: int) -> Tensor:
    """Bilinear interpolation of x sampled at pixels (s i, s j) onto every pixel of (H, W) (edge values beyond).

    Shapes: x (h, w) -> (H, W)
    """
    h, w = x.shape
    v = (torch.arange(H, dtype=x.dtype, device=x.device) / s).clamp(max=h - 1)
    u = (torch.arange(W, dtype=x.dtype, device=x.device) / s).clamp(max=w - 1)
    grid = torch.stack(torch.meshgrid(u / max(w - 1, 1) * 2 - 1, v / max(h - 1, 1) * 2 - 1, indexing="xy"), dim=-1)
    return F.grid_sample(x[None, None], grid[None], mode="bilinear", align_corners=True)[0, 0]


def _step_scale(dx: Tensor, opts: WindowBAOptions) -> Tensor:
    """Per-pose factor <= 1 bringing each step within the translation and rotation limits. (N, 6) -> (N,)."""
    t, w = dx[:, :3].norm(dim=-1), dx[:, 3:].norm(dim=-1)
    scale = torch.minimum(opts.max_translation_step / t.clamp_min(1e-300), opts.max_rotation_step / w.clamp_min(1e-300))
    return scale.clamp(max=1.0)


def _damped_solve(S: Tensor, b: Tensor, diag: Tensor, damping: float) -> Tensor:
    """(S + lambda I + mu diag(H_cc)) x = b by Cholesky, boosting the damping if needed, else lstsq."""
    if not (bool(torch.isfinite(S).all()) and bool(torch.isfinite(b).all())):
        return torch.zeros_like(b)  # nothing sound to solve (lstsq would raise): the poses stay
    base = torch.diag_embed(damping + _LM_SCALE * diag.clamp_min(0.0))
    for boost in _FALLBACK_BOOSTS:
        A = S + boost * base
        A = 0.5 * (A + A.T)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            x = torch.cholesky_solve(b[:, None], L)[:, 0]
            if bool(torch.isfinite(x).all()):
                return x
    x = torch.linalg.lstsq(S + base, b[:, None]).solution[:, 0]
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

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

Sparse tracks. Dense flow ties a keyframe only to the nodes its flow reaches (neighbours in time and
revisits); a point matched by its features across many keyframes ties them all at once, which is what
holds the scale along a video. `bundle_adjust` takes such tracks (`Tracks`) besides the dense edges:
track t is a ray x_t through a pixel of its anchor keyframe a_t with its own inverse depth rho_t,
observed at `target` in other nodes, and each observation adds

    w_o c(r_o) |r_o|^2,   r_o = target_o - pi(R_ja x_t + rho_t t_ja)

(the same Jacobians as a pixel's, with the anchor as source), plus a weak prior
pw_t (rho_t - start_t)^2 that keeps a track seen once solvable. A track's inverse depth appears only
in its own observations, so it is eliminated exactly like a pixel's (a scalar block): its coupling
to the poses has one 6-block on the anchor and one per observing node, whose products (block pairs
within each track) are subtracted from the reduced system. The track terms are few (hundreds per
keyframe) and are formed in torch, vectorised over the observations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.errors import ShapeError
from kernels.ops import ba_reduce
from v2d.geometry.camera import pose_to_rt, project
from v2d.geometry.lie import se3_adjoint, se3_exp, se3_inv, se3_mul, skew
from v2d.geometry.robust import cauchy_weight

__all__ = ["BAResult", "Tracks", "WindowBAOptions", "bundle_adjust", "fit_track_depths", "track_costs",
           "window_bundle_adjust"]

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


@dataclass(frozen=True)
class Tracks:
    """Sparse multi-view tracks for `bundle_adjust` (see the module docstring).

    Attributes:
        anchor: keyframe (< K) whose pixel `uv` is each track's ray.
        uv: that pixel, in the pixel units of the adjustment's intrinsics.
        inv_depth: each track's starting inverse depth along its ray (> 0).
        prior_weight: weight of (rho_t - start_t)^2 (> 0 keeps every track solvable).
        track: the track of each observation.
        node: the node that makes it (never the track's anchor).
        target: where the node sees the track, pixel coordinates [u, v].
        weight: the observation's weight (0 = ignored).

    Shapes: anchor (T,) int64; uv (T, 2); inv_depth, prior_weight (T,); track, node (O,) int64;
    target (O, 2); weight (O,).
    """

    anchor: Tensor
    uv: Tensor
    inv_depth: Tensor
    prior_weight: Tensor
    track: Tensor
    node: Tensor
    target: Tensor
    weight: Tensor

    def __len__(self) -> int:
        return int(self.anchor.shape[0])


class BAResult(NamedTuple):
    """What `bundle_adjust` returns. Shapes: poses_cw (N, 7); inv_depth (K, H, W); track_inv_depth (T,)
    (empty without tracks)."""

    poses_cw: Tensor
    inv_depth: Tensor
    track_inv_depth: Tensor


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


def _check_tracks(tr: Tracks, N: int, Kf: int) -> None:
    T, O = tr.anchor.shape[0] if tr.anchor.ndim == 1 else -1, tr.track.shape[0] if tr.track.ndim == 1 else -1
    for name, idx in (("anchor", tr.anchor), ("track", tr.track), ("node", tr.node)):
        if idx.ndim != 1 or idx.dtype != torch.long:
            raise ShapeError(f"tracks.{name}: expected an int64 tensor (n,), got {tuple(idx.shape)} {idx.dtype}")
    expected = {"uv": (tr.uv, (T, 2)), "inv_depth": (tr.inv_depth, (T,)), "prior_weight": (tr.prior_weight, (T,)),
                "node": (tr.node, (O,)), "target": (tr.target, (O, 2)), "weight": (tr.weight, (O,))}
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape:
            raise ShapeError(f"tracks.{name}: expected {shape}, got {tuple(x.shape)}")
    if T and (int(tr.anchor.min()) < 0 or int(tr.anchor.max()) >= Kf):
        raise ShapeError(f"tracks.anchor: anchors must be keyframes in [0, {Kf})")
    if O and (int(tr.track.min()) < 0 or int(tr.track.max()) >= T):
        raise ShapeError(f"tracks.track: expected track indices in [0, {T})")
    if O and (int(tr.node.min()) < 0 or int(tr.node.max()) >= N):
        raise ShapeError(f"tracks.node: expected nodes in [0, {N})")
    if O and bool((tr.anchor[tr.track] == tr.node).any()):
        raise ShapeError("tracks: an observation is made by its track's anchor")


def window_bundle_adjust(poses_cw: Tensor, inv_depth: Tensor, intrinsics: Tensor, ii: Tensor, jj: Tensor,
                         targets: Tensor, weights: Tensor, prior: Tensor, prior_weight: Tensor,
                         opts: WindowBAOptions = WindowBAOptions()) -> tuple[Tensor, Tensor]:
    """`bundle_adjust` without tracks: (poses_cw (N, 7), inv_depth (K, H, W))."""
    result = bundle_adjust(poses_cw, inv_depth, intrinsics, ii, jj, targets, weights, prior, prior_weight, opts)
    return result.poses_cw, result.inv_depth


def bundle_adjust(poses_cw: Tensor, inv_depth: Tensor, intrinsics: Tensor, ii: Tensor, jj: Tensor,
                  targets: Tensor, weights: Tensor, prior: Tensor, prior_weight: Tensor,
                  opts: WindowBAOptions = WindowBAOptions(), tracks: Tracks | None = None) -> BAResult:
    """Joint Gauss-Newton over the free poses, every keyframe's per-pixel inverse depth and, given
    `tracks`, each track's inverse depth.

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
        tracks: sparse tracks whose reprojection terms join the flow terms (their robust scale, step
            limit and depth floor are the options'), in the pixel units of `intrinsics`.

    Shapes: poses_cw (N, 7); inv_depth, prior, prior_weight (K, H, W); intrinsics (4,);
    ii, jj (E,) int64; targets (E, H, W, 2); weights (E, H, W)
    -> BAResult(poses_cw (N, 7), inv_depth (K, H, W), track_inv_depth (T,)) in the dtypes given
    (detached; float64 inside).
    """
    _check_inputs(poses_cw, inv_depth, intrinsics, ii, jj, targets, weights, prior, prior_weight, opts)
    if tracks is not None:
        _check_tracks(tracks, poses_cw.shape[0], inv_depth.shape[0])
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
    trk = _prepared(tracks, f64, intr.device) if tracks is not None and len(tracks) else None
    t_rho = trk.inv_depth if trk is not None else torch.zeros(0, dtype=f64, device=intr.device)
    for _ in range(opts.iterations):
        poses, rho, t_rho = _step(poses, rho, intr, ii, jj, tgt, w0, pri, pw, opts, trk, t_rho)
    out_poses = poses.to(poses_cw.dtype)
    out_tracks = t_rho.to(tracks.inv_depth.dtype) if tracks is not None else t_rho.to(poses_cw.dtype)
    if s == 1:
        return BAResult(out_poses, rho.to(inv_depth.dtype), out_tracks)
    up = torch.stack([_upsample(rho[k] / start[k, ::s, ::s], s, H, W) for k in range(Kf)])
    return BAResult(out_poses, (start * up).to(inv_depth.dtype), out_tracks)


def _prepared(tr: Tracks, dtype: torch.dtype, device: torch.device) -> Tracks:
    """The tracks in `dtype` on `device`; an observation with a non-finite target or weight gets
    weight 0, a non-finite or non-positive start or prior weight is replaced (1, 0)."""
    cast = {f.name: getattr(tr, f.name).detach().to(device) for f in dataclasses.fields(tr)}
    for name in ("uv", "inv_depth", "prior_weight", "target", "weight"):
        cast[name] = cast[name].to(dtype)
    ok = torch.isfinite(cast["target"]).all(-1) & torch.isfinite(cast["weight"]) & (cast["weight"] > 0)
    cast["weight"] = torch.where(ok, cast["weight"], torch.zeros_like(cast["weight"]))
    cast["target"] = torch.where(ok[:, None], cast["target"], torch.zeros_like(cast["target"]))
    start = cast["inv_depth"]
    cast["inv_depth"] = torch.where(torch.isfinite(start) & (start > 0), start, torch.ones_like(start))
    pw = cast["prior_weight"]
    cast["prior_weight"] = torch.where(torch.isfinite(pw) & (pw > 0), pw, torch.zeros_like(pw))
    return Tracks(**cast)


def _step(poses: Tensor, rho: Tensor, intr: Tensor, ii: Tensor, jj: Tensor, tgt: Tensor, w0: Tensor,
          pri: Tensor, pw: Tensor, opts: WindowBAOptions, trk: Tracks | None, t_rho: Tensor
          ) -> tuple[Tensor, Tensor, Tensor]:
    """One damped joint Gauss-Newton step (Schur complement on the pixels and the tracks). Shapes as
    in the caller: poses (N, 7), rho (K, h, w), tgt (E, h, w, 2), w0 (E, h, w) (0 = unobserved),
    pri, pw (K, h, w), t_rho (T,)."""
    N, grid = poses.shape[0], rho.shape
    Kf, P = grid[0], grid[1] * grid[2]
    dev, f64 = rho.device, rho.dtype
    T_ji = se3_mul(poses[jj], se3_inv(poses)[ii])  # (E, 7)
    rel = pose_to_rt(T_ji).contiguous()
    adj = se3_adjoint(T_ji)
    if not (bool(torch.isfinite(rel).all()) and bool(torch.isfinite(intr).all())):
        return poses, rho, t_rho  # nothing sound to linearise: the estimate stays (as in _damped_solve)
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
    sparse = _track_system(poses, t_rho, trk, intr, opts, Hb, gc, gram, g_schur) if trk is not None else None
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
    new_t_rho = t_rho
    if sparse is not None:
        track, nodes, c, h_t, g_t = sparse
        rhs = g_t.clone()
        rhs.index_add_(0, track, -(c * dx[nodes]).sum(-1))
        step = rhs / h_t
        lim = opts.max_step * t_rho
        step = torch.maximum(torch.minimum(step, lim), -lim)
        new_t_rho = torch.where(torch.isfinite(step), t_rho + step, t_rho).clamp_min(opts.min_inv_depth)
    new_poses = poses.clone()
    if f < N:
        upd = se3_mul(se3_exp(dx[f:]), poses[f:])
        new_poses[f:] = torch.cat([upd[:, :3], upd[:, 3:] / upd[:, 3:].norm(dim=-1, keepdim=True)], dim=-1)
    return new_poses, new_rho, new_t_rho


def _track_linearised(poses: Tensor, t_rho: Tensor, trk: Tracks, intr: Tensor, min_depth: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every observation's residual and Jacobians at the current estimate.

    Shapes: poses (N, 7); t_rho (T,) -> r (O, 2) (0 where not valid), J_j, J_a (O, 2, 6) (target and
    anchor pose), J_rho (O, 2), valid (O,) bool (in front of the node, finite).
    """
    fx, fy, cx, cy = intr.unbind()
    a = trk.anchor[trk.track]
    T_ja = se3_mul(poses[trk.node], se3_inv(poses)[a])  # (O, 7)
    Rt = pose_to_rt(T_ja)
    R, t = Rt[..., :3], Rt[..., 3]
    uv = trk.uv[trk.track]
    ray = torch.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, torch.ones_like(uv[:, 0])], dim=-1)
    rho = t_rho[trk.track]
    X = (R @ ray[..., None])[..., 0] + rho[:, None] * t  # (O, 3), camera j, homogeneous (Z_j = X_z / rho)
    Z = X[:, 2]
    valid = (Z > min_depth * rho) & torch.isfinite(X).all(-1)
    Xs = torch.where(valid[:, None], X, torch.tensor([0.0, 0.0, 1.0], dtype=X.dtype, device=X.device))
    pi, dpi = project(Xs, intr, jacobian=True)  # (O, 2), (O, 2, 3)
    r = torch.where(valid[:, None], trk.target - pi, torch.zeros_like(pi))
    eye = torch.eye(3, dtype=X.dtype, device=X.device).expand(X.shape[0], 3, 3)
    dX = torch.cat([rho[:, None, None] * eye, -skew(Xs)], dim=-1)  # (O, 3, 6)
    J_j = dpi @ dX
    J_a = -(J_j @ se3_adjoint(T_ja))
    J_rho = (dpi @ t[..., None])[..., 0]
    keep = valid[:, None, None]
    return (r, torch.where(keep, J_j, torch.zeros_like(J_j)), torch.where(keep, J_a, torch.zeros_like(J_a)),
            torch.where(valid[:, None], J_rho, torch.zeros_like(J_rho)), valid)


def _track_weights(r: Tensor, valid: Tensor, trk: Tracks, scale: float) -> Tensor:
    """The observations' IRLS weights: weight x Cauchy factor, 0 where not valid. Shapes -> (O,)."""
    w = trk.weight * (cauchy_weight((r ** 2).sum(-1), scale) if scale > 0 else 1.0)
    return torch.where(valid, w, torch.zeros_like(w))


_GRAM_BLOCKS = 1 << 16  # (track, entry, entry) 6x6 blocks formed at once in the tracks' Schur products


def _track_system(poses: Tensor, t_rho: Tensor, trk: Tracks, intr: Tensor, opts: WindowBAOptions, Hb: Tensor,
                  gc: Tensor, gram: Tensor, g_schur: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Add the tracks' pose blocks into Hb, gc (block (a, b) at a * N + b) and their Schur products
    into gram, g_schur; return what the back-substitution needs: each coupling entry's track and node,
    its 6-vector, and each track's scalar block h_t and gradient g_t.

    Shapes: Hb, gram (N * N, 6, 6); gc, g_schur (N, 6) -> track, nodes (Q,) int64; c (Q, 6);
    h_t, g_t (T,).
    """
    N, T = poses.shape[0], t_rho.shape[0]
    r, J_j, J_a, J_rho, valid = _track_linearised(poses, t_rho, trk, intr, opts.min_depth)
    w = _track_weights(r, valid, trk, opts.robust_scale)[:, None, None]
    a, j = trk.anchor[trk.track], trk.node
    wJa, wJj = w * J_a, w * J_j
    Hb.index_add_(0, torch.cat([a * N + a, a * N + j, j * N + a, j * N + j]),
                  torch.cat([wJa.transpose(1, 2) @ J_a, wJa.transpose(1, 2) @ J_j, wJj.transpose(1, 2) @ J_a,
                             wJj.transpose(1, 2) @ J_j]))
    gc.index_add_(0, torch.cat([a, j]), torch.cat([(wJa.transpose(1, 2) @ r[..., None])[..., 0],
                                                  (wJj.transpose(1, 2) @ r[..., None])[..., 0]]))
    wv = w[:, 0, 0]
    h_t = trk.prior_weight.clone().index_add_(0, trk.track, wv * (J_rho ** 2).sum(-1)).clamp_min(1e-12)
    g_t = (trk.prior_weight * (trk.inv_depth - t_rho)).index_add_(0, trk.track, wv * (J_rho * r).sum(-1))
    c_obs = (wJj.transpose(1, 2) @ J_rho[..., None])[..., 0]  # (O, 6): the observer's block
    c_anchor = torch.zeros(T, 6, dtype=r.dtype, device=r.device).index_add_(
        0, trk.track, (wJa.transpose(1, 2) @ J_rho[..., None])[..., 0])
    track = torch.cat([torch.arange(T, device=r.device), trk.track])
    nodes = torch.cat([trk.anchor, j])
    c = torch.cat([c_anchor, c_obs])
    g_schur.index_add_(0, nodes, c * (g_t / h_t)[track, None])
    # sum_t C_t C_t^T / h_t: the entries of each track padded to (t, L, 6), block pairs formed for
    # tracks of similar length together (sorted by length; L the longest of a chunk)
    counts = torch.bincount(track, minlength=T)
    order = torch.argsort(track, stable=True)
    first = torch.cumsum(counts, 0) - counts  # each track's first entry in `order`
    cs = c[order] / h_t.sqrt()[track[order], None]
    ns = nodes[order]
    by_length = torch.argsort(counts)
    lengths = counts[by_length].tolist()
    lo = 0
    while lo < T:
        # as many tracks as fit the budget at the chunk's first length; then, at the longest of those,
        # as many as fit at that length (never more than the budget, at least one track)
        longest = lengths[min(T, lo + max(1, _GRAM_BLOCKS // max(lengths[lo], 1) ** 2)) - 1]
        hi = min(T, lo + max(1, _GRAM_BLOCKS // (longest * longest)))
        L = lengths[hi - 1]
        sel = by_length[lo:hi]
        slots = torch.arange(L, device=r.device)
        idx = first[sel, None] + slots[None, :]  # (t, L) positions in `order`
        ok = slots[None, :] < counts[sel, None]
        idx = torch.where(ok, idx, torch.zeros_like(idx))
        P = torch.where(ok[..., None], cs[idx], torch.zeros(1, 1, 6, dtype=r.dtype, device=r.device))
        n = torch.where(ok, ns[idx], torch.zeros_like(idx))
        G = torch.einsum("tli,tmk->tlmik", P, P).reshape(-1, 6, 6)
        gram.index_add_(0, (n[:, :, None] * N + n[:, None, :]).reshape(-1), G)
        lo = hi
    return track, nodes, c, h_t, g_t


def fit_track_depths(poses_cw: Tensor, tracks: Tracks, intrinsics: Tensor, scale: float, min_depth: float,
                     iterations: int = 3) -> Tensor:
    """Each track's inverse depth fitted to its observations with every pose fixed (Gauss-Newton on
    one scalar per track, Cauchy re-weighted, the tracks' prior towards their start): where the
    estimate stands before an adjustment moves the poses, so that a cost compared before and after
    does not credit the poses with what the tracks' depths alone gain.

    Shapes: poses_cw (N, 7); intrinsics (4,) -> (T,) float64.
    """
    f64 = torch.float64
    trk = _prepared(tracks, f64, poses_cw.device)
    poses, intr = poses_cw.detach().to(f64), intrinsics.detach().to(f64)
    rho = trk.inv_depth
    for _ in range(iterations):
        r, _, _, J_rho, valid = _track_linearised(poses, rho, trk, intr, min_depth)
        w = _track_weights(r, valid, trk, scale)
        h = trk.prior_weight.clone().index_add_(0, trk.track, w * (J_rho ** 2).sum(-1)).clamp_min(1e-12)
        g = (trk.prior_weight * (trk.inv_depth - rho)).index_add_(0, trk.track, w * (J_rho * r).sum(-1))
        step = g / h
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        rho = (rho + step.clamp(-0.25 * rho, 0.25 * rho)).clamp_min(1e-3)
    return rho


def track_costs(poses_cw: Tensor, tracks: Tracks, track_inv_depth: Tensor, intrinsics: Tensor, scale: float,
                min_depth: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each observation's reprojection error, Cauchy cost c^2 log(1 + r^2 / c^2) (plain r^2 for
    scale 0) and validity (in front of the node, finite) at the given estimate.

    Shapes: poses_cw (N, 7); track_inv_depth (T,); intrinsics (4,) -> error (O,) in pixels, cost (O,)
    (inf where not valid), valid (O,) bool; float64.
    """
    f64 = torch.float64
    trk = _prepared(tracks, f64, poses_cw.device)
    r, _, _, _, valid = _track_linearised(poses_cw.detach().to(f64), track_inv_depth.detach().to(f64), trk,
                                          intrinsics.detach().to(f64), min_depth)
    r2 = (r ** 2).sum(-1)
    cost = scale ** 2 * torch.log1p(r2 / scale ** 2) if scale > 0 else r2
    inf = torch.full_like(cost, float("inf"))
    return torch.where(valid, r2.sqrt(), inf), torch.where(valid, cost, inf), valid


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

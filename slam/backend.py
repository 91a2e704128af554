"""The backend: one global bundle adjustment over every keyframe at the end of a run (the idea of
DROID-SLAM's backend: the local window's dense adjustment, on the whole map at a reduced size).

    report = GlobalBA(cfg, device, warn).run(slam_map)   # after `Mapper.finish`: every keyframe retired
    report.depth_ratio[kid]                               # new / old inverse depth at the small size

What it adjusts: every keyframe's pose (the first one fixed: gauge) and inverse depth, on the
keyframes' retired copies (`Keyframe.small_depth` / `small_image`, every `slam.cloud_stride`-th
pixel), of which every `slam.global_ba_stride`-th pixel is an unknown (the relative change is
carried to the pixels between bilinearly). The solver is the window's
(`v2d.geometry.window_ba.window_bundle_adjust`: joint Gauss-Newton, pixels eliminated by the Schur
complement, Cauchy re-weighting), with the intrinsics scaled to that grid and each keyframe's
current depth as the prior (relative standard deviation `slam.ba_prior` against one pixel of flow
at the network size, as in the window).

Edges (each pair both ways):

1. temporal: each keyframe to the next `slam.global_ba_neighbours` keyframes;
2. proximity: any other pair whose predicted overlap (the fraction of one keyframe's pixels that its
   depth, moved by the relative pose, puts inside the other image; the smaller of the two
   directions) is at least `slam.global_ba_overlap`, the largest overlaps first, at most
   `slam.global_ba_edges` per keyframe;
3. loops: the pairs recorded with `Map.add_loop`, whatever the poses predict.

Targets are OpenCV DIS flow between the small images, forward and backward
(`v2d.flow.fb_targets`), weighted by the forward-backward consistency; the Cauchy re-weighting is
the solver's, its scale annealed from wide to `slam.robust_scale`.

DIS is guided: it searches around the flow that the current poses and depths predict
(`v2d.flow.dis_flow`'s `init`), as DROID-SLAM looks its correlations up around the current
reprojection. So edges are chosen by overlap alone, however far apart the two views are (the local
window, with DIS searched from zero flow, leaves out edges of more than `slam.edge_max_flow`).
Loop and proximity edges join views 20-30 deg and 0.3-1 m apart: tens of pixels of flow, which a
search from zero flow misses (median error 37-40 px on such synthetic pairs, 0.8-2.0 px guided).
Suite, ATE cm (no global BA / unguided, edges within `edge_max_flow` / guided, same edges /
guided, edges by overlap): 7-Scenes 0-499 stride 4 3.54 / 3.65 / 3.10 / 2.84, stride 8 3.73 / 4.14
/ 5.21 / 2.81, stride 12 14.4 / 13.9 / 13.9 / 8.18; synthetic fast motion 2.52 / 8.54 / 1.01 / 0.62.
Where the image is ambiguous (no texture) a guided search keeps the guess, and the
forward-backward check, guided the same way, cannot tell; the guard below and the robust weights
bound what that costs. (The same guided search in the tracker, from a constant-velocity or
feature-registration guess, made 7-Scenes stride 12 worse, 14.4 -> 31.3 cm: a frame's guess is
far less certain than the map's.)

DIS runs with its preset (`motion.dis.preset`) but down to the finest pyramid level: the presets
start refining at half the image size, which on half-size images throws the accuracy away. Median
end-point error of keyframe pairs 1 / 2 / 3 apart on a synthetic sequence, in pixels at the network
size: 0.11 / 0.16 / 0.21 at full size, 0.37 / 0.50 / 0.81 at half size with the preset, 0.14 / 0.19 /
0.26 at half size at the finest level. With the preset's level the adjustment fitted that error and
made 7-Scenes worse (0-499/2: ATE 3.86 -> 4.11 cm, AbsRel 0.118 -> 0.124); at the finest level it
gives 3.42 cm and 0.115.

Tracks (`slam.tracks`, with the features' matcher given): the keyframes' sparse features are
matched over the edges' pairs and each keyframe's next `slam.track_span` keyframes, verified and
chained into multi-view tracks (`slam.tracks`); each track has one inverse depth along its anchor
keyframe's ray, and its reprojection terms join the flow terms in the same solve (the tracks'
depths eliminated like the pixels'; `v2d.geometry.window_ba.bundle_adjust`). Dense flow joins a
keyframe to its neighbours, each with its own depth, so scale can creep along the chain; a track
has one depth in every keyframe that sees it. Weight: all observations together weigh
`slam.track_weight` times all flow targets together (each observation the same share), so neither
kind dominates whatever the number of pixels or keypoints; the same annealed Cauchy scale re-weights
both. The report gives COLMAP's figures for them: tracks, mean track length, mean reprojection error
before and after over the observations within 4 px (COLMAP's filter; network pixels), "before"
with the tracks' depths fitted to the poses before (`fit_track_depths`), as is the guard's cost.

Guard: the robust residual (Cauchy cost of the flow residuals and the track observations, as an RMS
in pixels at the network size) is measured before and after; if it grew, anything is not finite or the solver failed (a
singular system), the map keeps its previous estimate and the report (and a warning) says so.
Otherwise the new poses are written into the map (frames follow: their poses are stored relative
to their keyframe) with the new small depths.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slam.config import RunConfig
from slam.map import Keyframe, Map, normalized_pose
from slam.measurements import predicted_flow
from slam.tracks import PairMatcher, build_tracks, weighted
from v2d.errors import V2DError
from v2d.flow import dis_flow, fb_targets
from v2d.geometry.camera import backproject, project, reproject
from v2d.geometry.lie import se3_act, se3_inv, se3_mul
from v2d.geometry.window_ba import Tracks, WindowBAOptions, bundle_adjust, fit_track_depths, track_costs

__all__ = ["GlobalBA", "GlobalBAReport", "robust_residual", "upsample_ratio"]

_log = logging.getLogger(__name__)

_OVERLAP_STRIDE = 4  # pixel stride (of the small grid) of the predicted overlap that chooses edges
# The first iteration's Cauchy scale, as a multiple of `slam.robust_scale`; it falls to 1 by the last
# but one iteration. Edges the drifted poses explain badly (loops, proximity edges after a long
# detour) start with residuals of many pixels, which the plain Cauchy weight all but ignores; a
# wider scale first lets them pull (graduated non-convexity). Synthetic out-and-back loop with 2x
# scale drift, 4 iterations: keyframe ATE 0.236 -> 0.080 m with 1, 0.040 with 4, 0.041 with 16;
# 7-Scenes 0-299/1 the same with each (2.42 / 2.41 / 2.41 cm).
_ANNEAL = 4.0
# COLMAP's bundle adjustment drops observations reprojected farther than this (px, its
# `filter_max_reproj_error`); the tracks' mean reprojection error is reported over those within it.
_COLMAP_FILTER_PX = 4.0


@dataclass
class GlobalBAReport:
    """What the global bundle adjustment did. Residuals are Cauchy-robust RMS flow residuals in pixels
    at the network size; edges are counted one direction each (a pair makes two).

    Shapes: depth_ratio {keyframe id: (h, w) float32}, new / old inverse depth on the keyframe's small
    grid (1 where its depth is unknown); empty when the previous estimate was kept.
    """

    keyframes: int = 0
    edges: int = 0
    temporal_edges: int = 0
    proximity_edges: int = 0
    loop_edges: int = 0
    iterations: int = 0
    residual_before_px: float | None = None
    residual_after_px: float | None = None
    tracks: int = 0  # sparse multi-view tracks in the adjustment (`slam.tracks`)
    track_observations: int = 0  # their observations besides the anchors'
    track_length: float | None = None  # mean keyframes per track
    track_pairs: int = 0  # keyframe pairs whose features were matched
    reprojection_before_px: float | None = None  # mean reprojection error of the tracks' observations
    reprojection_after_px: float | None = None  # within 4 px (px at the network size), COLMAP's figure
    track_seconds: float = 0.0
    kept: bool = False  # the adjusted estimate was written into the map (False: the previous one stays)
    reason: str = ""  # why it was not kept (or not run)
    seconds: float = 0.0
    depth_ratio: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The report for summary.json (without the depth ratios)."""
        return {"enabled": True, "seconds": self.seconds, "keyframes": self.keyframes, "edges": self.edges,
                "temporal_edges": self.temporal_edges, "proximity_edges": self.proximity_edges,
                "loop_edges": self.loop_edges, "iterations": self.iterations,
                "residual_before_px": self.residual_before_px, "residual_after_px": self.residual_after_px,
                "tracks": self.tracks, "track_observations": self.track_observations,
                "track_length": self.track_length, "track_pairs": self.track_pairs,
                "reprojection_before_px": self.reprojection_before_px,
                "reprojection_after_px": self.reprojection_after_px, "track_seconds": self.track_seconds,
                "kept": self.kept, "reason": self.reason}


def upsample_ratio(ratio: np.ndarray, stride: int, size: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of values at every `stride`-th pixel (pixel (i, j) of `ratio` is pixel
    (stride i, stride j) of the output) onto every pixel; edge values beyond the last sample.

    Shapes: ratio (h, w) -> (H, W) = size, float32.
    """
    h, w = ratio.shape

    def axis(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.minimum(np.arange(n, dtype=np.float64) / stride, m - 1)
        lo = np.floor(x).astype(np.int64)
        return lo, np.minimum(lo + 1, m - 1), x - lo

    y0, y1, fy = axis(size[0], h)
    x0, x1, fx = axis(size[1], w)
    r = ratio.astype(np.float64)
    rows = r[y0] * (1 - fy)[:, None] + r[y1] * fy[:, None]
    return (rows[:, x0] * (1 - fx) + rows[:, x1] * fx).astype(np.float32)


class GlobalBA:
    """Global bundle adjustment of a finished map's keyframes (see the module docstring).

    Args:
        cfg: the configuration (`slam` and `gn` sections; `motion.dis` for the flow).
        device: where the adjustment runs.
        warn: reports a warning (the run's warning list).
        matcher: the keyframe pairs' verified feature matches (`slam.tracks.PairMatcher`, shared with
            the window's adjustment); with it and `slam.tracks`, sparse tracks join the adjustment.
    """

    def __init__(self, cfg: RunConfig, device: torch.device, warn: Callable[[str], None] = _log.warning,
                 matcher: PairMatcher | None = None) -> None:
        self.cfg, self.sc, self.device, self.warn = cfg, cfg.slam, torch.device(device), warn
        self.matcher = matcher

    @torch.no_grad()
    def run(self, slam_map: Map) -> GlobalBAReport:
        """Adjust every keyframe of `slam_map` (all retired) jointly and write the result into the map."""
        t0 = time.perf_counter()
        report = self._run(slam_map)
        report.seconds = time.perf_counter() - t0
        _log.info("global bundle adjustment: %d keyframes, %d edges (%d loop), residual %s -> %s px, %s, %.1f s",
                  report.keyframes, report.edges, report.loop_edges, _fmt(report.residual_before_px),
                  _fmt(report.residual_after_px), "kept" if report.kept else f"not kept ({report.reason})",
                  report.seconds)
        return report

    def _run(self, slam_map: Map) -> GlobalBAReport:
        kfs = slam_map.keyframes()
        report = GlobalBAReport(keyframes=len(kfs))
        if any(k.small_depth is None or k.small_image is None for k in kfs):
            raise V2DError("global bundle adjustment: every keyframe must be retired first (Mapper.finish)")
        if len(kfs) < 2:
            report.reason = "fewer than 2 keyframes"
            return report
        sc, dev = self.sc, self.device
        s1, s2 = sc.cloud_stride, sc.global_ba_stride
        depth = torch.from_numpy(np.stack([k.small_depth for k in kfs])).to(dev, torch.float64)  # (K, h, w)
        valid = depth > 0
        if not bool(valid.any()):
            report.reason = "no keyframe has depth"
            return report
        fill = depth[valid].median()
        inv = 1.0 / torch.where(valid, depth, fill)
        intr = slam_map.intrinsics.to(dev, torch.float64) / s1  # small pixel (i, j) = network pixel (s1 i, s1 j)
        base = kfs[0].pose_cw.to(dev, torch.float64)
        poses = se3_mul(torch.stack([k.pose_cw for k in kfs]).to(dev, torch.float64), se3_inv(base)[None])
        px = depth.shape[-1] * s1 / 320.0  # pixel thresholds are given for 320-wide frames
        overlap = _coverage(poses, inv, valid, intr)  # (K, K): the fraction of a's pixels seen in b
        both = torch.minimum(overlap, overlap.T)
        kinds = self._edges(kfs, both, slam_map.loops())
        pairs = [p for kind in kinds for p in kind]
        report.temporal_edges, report.proximity_edges, report.loop_edges = (2 * len(kind) for kind in kinds)
        report.edges = 2 * len(pairs)
        if not pairs:
            report.reason = "no keyframe pair overlaps"
            return report
        ii, jj, tgt, wts = self._targets(kfs, pairs, poses, inv, valid, intr, s2)
        inv_g, valid_g, intr_g = inv[:, ::s2, ::s2], valid[:, ::s2, ::s2], intr / s2
        grid_px = s1 * s2  # one pixel of the adjusted grid is grid_px pixels at the network size
        prior_w = torch.where(valid_g, 1.0 / (grid_px * sc.ba_prior * inv_g) ** 2, torch.zeros_like(inv_g))
        c = sc.robust_scale * px / grid_px
        gn = self.cfg.gn
        opts = WindowBAOptions(iterations=sc.global_ba_iterations, robust_scale=c, min_depth=gn.min_depth, stride=1,
                               fixed_poses=1, max_translation_step=gn.max_translation_step,
                               max_rotation_step=gn.max_rotation_step, keep_couplings=False)
        tracks = self._tracks(kfs, kinds, slam_map.intrinsics, grid_px, wts, report) if self.matcher else None

        def residual(p: torch.Tensor, i: torch.Tensor, t_rho: torch.Tensor) -> float:
            """The robust RMS of the flow and track residuals together (grid pixels)."""
            total, norm = _robust_sums(p, i, intr_g, ii, jj, tgt, wts, c, gn.min_depth)
            if tracks is not None:
                cost = track_costs(p, tracks, t_rho, intr_g, c, gn.min_depth)[1]
                cap = c ** 2 * np.log1p((i.shape[-1] ** 2 + i.shape[-2] ** 2) / c ** 2)
                w = tracks.weight.to(cost)
                total += float((w * torch.where(torch.isfinite(cost), cost, torch.full_like(cost, cap))).sum())
                norm += float(w.sum())
            return float(np.sqrt(total / norm)) if norm > 0 else float("nan")

        t_rho = torch.zeros(0, dtype=torch.float64, device=dev)
        if tracks is not None:  # the tracks' depths fitted to the current poses first: a fair "before"
            t_rho = fit_track_depths(poses, tracks, intr_g, c, gn.min_depth)
            tracks = dataclasses.replace(tracks, inv_depth=t_rho)
            err = track_costs(poses, tracks, t_rho, intr_g, 0.0, gn.min_depth)[0] * grid_px
            report.reprojection_before_px = _mean_within(err, _COLMAP_FILTER_PX)
        before = residual(poses, inv_g, t_rho)
        if not np.isfinite(before):
            report.reason = "no flow target passed the forward-backward check"
            return report
        new_poses, new_inv = poses, inv_g
        try:
            for scale in _annealed(c, sc.global_ba_iterations):
                step = dataclasses.replace(opts, iterations=1, robust_scale=scale)
                # the tracks' weak prior is centred on the previous iterate (damping, not a belief)
                current = dataclasses.replace(tracks, inv_depth=t_rho) if tracks is not None else None
                new_poses, new_inv, t_rho = bundle_adjust(new_poses, new_inv, intr_g, ii, jj, tgt, wts, inv_g,
                                                          prior_w, step, current)
        except (torch.linalg.LinAlgError, RuntimeError) as e:  # a singular system (e.g. a keyframe no edge sees)
            report.reason = f"the solver failed ({str(e).splitlines()[0][:120]})"
            self.warn(f"global bundle adjustment: {report.reason}; kept the previous estimate")
            return report
        after = residual(new_poses, new_inv, t_rho)
        report.iterations = sc.global_ba_iterations
        report.residual_before_px, report.residual_after_px = before * grid_px, after * grid_px
        finite = bool(torch.isfinite(new_poses).all()) and bool(torch.isfinite(new_inv).all()) and np.isfinite(after)
        if not finite:
            report.reason = "non-finite values"
        elif after > before:
            report.reason = "the robust residual grew"
        if report.reason:
            self.warn(f"global bundle adjustment: {report.reason}; kept the previous estimate")
            return report
        if tracks is not None:
            err = track_costs(new_poses, tracks, t_rho, intr_g, 0.0, gn.min_depth)[0] * grid_px
            report.reprojection_after_px = _mean_within(err, _COLMAP_FILTER_PX)
        ratio = torch.where(valid_g, new_inv / inv_g, torch.ones_like(inv_g)).float().cpu().numpy()
        self._write(slam_map, kfs, se3_mul(new_poses, base[None]), ratio, report)
        return report

    def _write(self, slam_map: Map, kfs: list[Keyframe], poses_cw: torch.Tensor, ratio: np.ndarray,
               report: GlobalBAReport) -> None:
        """The adjusted estimate into the map: each keyframe's small depth divided by its inverse-depth
        ratio (upsampled from the adjusted grid), the poses of all but the first (fixed) keyframe.

        Shapes: poses_cw (K, 7) world->camera; ratio (K, h', w') on the grid of every
        `slam.global_ba_stride`-th small pixel.
        """
        for k, kf in enumerate(kfs):
            r = upsample_ratio(ratio[k], self.sc.global_ba_stride, kf.small_depth.shape)
            report.depth_ratio[k] = np.where(kf.small_depth > 0, r, np.float32(1.0))
            slam_map.update_keyframe(k, small_depth=(kf.small_depth / report.depth_ratio[k]).astype(np.float32))
        slam_map.set_keyframe_poses({k: normalized_pose(poses_cw[k].to(kf.pose_cw.device))
                                     for k, kf in enumerate(kfs) if k > 0})
        report.kept = True

    def _edges(self, kfs: list[Keyframe], both: torch.Tensor, loops: set[tuple[int, int]]
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
        """Keyframe pairs (a < b): temporal, proximity and loop (each pair once, in the first kind it
        belongs to). Shapes: both (K, K) the predicted overlap of each pair (the smaller direction)."""
        sc = self.sc
        K = len(kfs)
        temporal = [(a, b) for a in range(K) for b in range(a + 1, min(K, a + 1 + sc.global_ba_neighbours))
                    if float(both[a, b]) > 0]
        taken = set(temporal) | loops
        count = [0] * K
        proximity = []
        cand = [(float(both[a, b]), a, b) for a in range(K) for b in range(a + 1 + sc.global_ba_neighbours, K)
                if float(both[a, b]) >= sc.global_ba_overlap and (a, b) not in taken]
        for _, a, b in sorted(cand, reverse=True):
            if count[a] < sc.global_ba_edges and count[b] < sc.global_ba_edges:
                proximity.append((a, b))
                count[a] += 1
                count[b] += 1
        loop = sorted(p for p in loops if p not in set(temporal))
        return temporal, proximity, loop

    def _tracks(self, kfs: list[Keyframe], kinds: tuple[list[tuple[int, int]], ...], intrinsics: torch.Tensor,
                grid_px: int, wts: torch.Tensor, report: GlobalBAReport) -> Tracks | None:
        """The sparse tracks (`slam.tracks`) over the edges' pairs and each keyframe's next
        `slam.track_span` keyframes, in the adjusted grid's pixels, weighted so that all observations
        together weigh `slam.track_weight` times the flow targets (see the module docstring)."""
        sc = self.sc
        if not sc.tracks:
            return None
        t0 = time.perf_counter()
        K = len(kfs)
        pairs = sorted({(a, b) for a in range(K) for b in range(a + 1, min(K, a + 1 + sc.track_span))}
                       | {p for kind in kinds for p in kind})
        # the map's keyframe ids are their positions in keyframes() (never reused): the matcher's keys
        built = build_tracks(kfs, list(range(K)), pairs, self.matcher, intrinsics)
        report.track_pairs = sum(kfs[a].features is not None and kfs[b].features is not None for a, b in pairs)
        if built is None:
            report.track_seconds = time.perf_counter() - t0
            return None
        tracks = weighted(built, grid_px, float(wts.double().sum()), sc.track_weight, self.device)
        t, O = built.tracks, built.tracks.track.numel()
        report.tracks, report.track_observations = len(t), O
        report.track_length = float(built.lengths.double().mean())
        report.track_seconds = time.perf_counter() - t0
        return tracks

    def _targets(self, kfs: list[Keyframe], pairs: list[tuple[int, int]], poses: torch.Tensor, inv: torch.Tensor,
                 valid: torch.Tensor, intr: torch.Tensor, stride: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both directions of every pair: DIS flow targets between the small images, guided by the flow
        the current poses and depths predict (`v2d.flow.dis_flow`'s init: revisits and loops are tens
        of pixels apart), forward-backward weights (0 where the source has no depth), on every
        `stride`-th pixel, in that grid's pixels.

        Shapes: poses (K, 7); inv, valid (K, h, w) on the small grid; intr (4,) on it ->
        ii, jj (E,) int64; targets (E, h', w', 2); weights (E, h', w').
        """
        dis = self.cfg.motion.dis
        ii, jj, ts, ws = [], [], [], []
        def guess(a: int, b: int) -> np.ndarray:
            return predicted_flow(inv[a], poses[a], poses[b], intr, self.cfg.gn.min_depth)

        for a, b in pairs:
            # the presets search from half the image size down; see the module docstring
            fwd = dis_flow(kfs[a].small_image, kfs[b].small_image, dis.preset, guess(a, b), finest_scale=0)
            bwd = dis_flow(kfs[b].small_image, kfs[a].small_image, dis.preset, guess(b, a), finest_scale=0)
            for src, dst, (t, wt) in ((a, b, fb_targets(fwd, bwd, dis)), (b, a, fb_targets(bwd, fwd, dis))):
                ii.append(src)
                jj.append(dst)
                ts.append(t[::stride, ::stride] / stride)
                ws.append(wt[::stride, ::stride, 0] * valid[src, ::stride, ::stride].cpu())
        dev = self.device
        return (torch.tensor(ii, device=dev), torch.tensor(jj, device=dev), torch.stack(ts).to(dev),
                torch.stack(ws).to(dev))


def _annealed(scale: float, iterations: int) -> list[float]:
    """The Cauchy scale of each iteration: `_ANNEAL` times `scale` first, falling geometrically to
    `scale` at the last but one iteration (graduated non-convexity); `scale` throughout for 1 or 2."""
    n = max(1, iterations - 2)
    return [scale * _ANNEAL ** (max(0, iterations - 2 - i) / n) for i in range(iterations)]


def _coverage(poses: torch.Tensor, inv: torch.Tensor, valid: torch.Tensor, intr: torch.Tensor) -> torch.Tensor:
    """For every ordered pair (a, b): the fraction of keyframe a's known pixels its depth puts in front
    of camera b and inside its image.

    Shapes: poses (K, 7); inv, valid (K, h, w); intr (4,) -> overlap (K, K) float32.
    """
    s = _OVERLAP_STRIDE
    K, h, w = inv.shape
    intr_s = (intr / s).float()
    overlap = torch.zeros(K, K, device=inv.device)
    for a in range(K):
        ok_a = valid[a, ::s, ::s]
        pts = backproject((1.0 / inv[a, ::s, ::s]).float(), intr_s)
        rel = se3_mul(poses, se3_inv(poses[a])[None]).float()  # (K, 7): camera a -> camera b
        q = se3_act(rel[:, None, None, :], pts)
        uv = project(q, intr_s)
        inside = (q[..., 2] > 1e-6) & (uv[..., 0] >= 0) & (uv[..., 0] <= (w - 1) / s) & (uv[..., 1] >= 0) \
            & (uv[..., 1] <= (h - 1) / s) & ok_a
        overlap[a] = inside.sum((-2, -1)) / ok_a.sum().clamp_min(1)
    return overlap


def _mean_within(err: torch.Tensor, gate: float) -> float | None:
    """Mean of the errors (O,) below `gate` (None where none is)."""
    ok = torch.isfinite(err) & (err < gate)
    return float(err[ok].mean()) if bool(ok.any()) else None


def _robust_sums(poses: torch.Tensor, inv: torch.Tensor, intr: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor,
                 targets: torch.Tensor, weights: torch.Tensor, scale: float, min_depth: float) -> tuple[float, float]:
    """sum w rho(r) and sum w of `robust_residual` (same arguments)."""
    h, w = inv.shape[-2:]
    cap = scale ** 2 * np.log1p((h * h + w * w) / scale ** 2)
    total, norm = 0.0, 0.0
    for lo in range(0, ii.numel(), 64):  # chunks bound the memory of the reprojection
        e = slice(lo, lo + 64)
        coords, depth_j = reproject(inv[ii[e]].double(), poses[ii[e]].double(), poses[jj[e]].double(), intr.double())
        wt = weights[e].double()
        obs = (wt > 0) & torch.isfinite(targets[e]).all(-1)
        wt = torch.where(obs, wt, torch.zeros_like(wt))
        r2 = ((torch.where(obs[..., None], targets[e].double(), coords) - coords) ** 2).sum(-1)
        cost = torch.where(depth_j > min_depth, scale ** 2 * torch.log1p(r2 / scale ** 2), torch.full_like(r2, cap))
        cost = torch.where(torch.isfinite(cost), cost, torch.full_like(cost, cap))
        total += float((wt * cost).sum())
        norm += float(wt.sum())
    return total, norm


def robust_residual(poses: torch.Tensor, inv: torch.Tensor, intr: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor,
                     targets: torch.Tensor, weights: torch.Tensor, scale: float, min_depth: float) -> float:
    """sqrt(sum w rho(r) / sum w) with rho(r) = c^2 log(1 + r^2 / c^2) the Cauchy cost (about r^2 for a
    small residual r, so the value reads as an RMS in pixels). A point that falls behind camera j
    costs rho at the grid's diagonal (the guard must not reward pushing points out of view).

    Shapes: poses (K, 7); inv (K, h, w); ii, jj (E,); targets (E, h, w, 2); weights (E, h, w) -> float.
    """
    total, norm = _robust_sums(poses, inv, intr, ii, jj, targets, weights, scale, min_depth)
    return float(np.sqrt(total / norm)) if norm > 0 else float("nan")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"

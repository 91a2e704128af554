"""The mapper: a new keyframe in; its depth, the local window's poses and depths, retired keyframes out.

    mapper = Mapper(model, cfg, slam_map, flows, (H, W), calibrated=True, device=device)
    kid = mapper.new_keyframe(f, image)        # caller's thread: splatted depth, tracking can go on
    mapper.map_keyframes([KeyframeJob(kid, ...)])  # the work (in the mapper thread when concurrent)

Per keyframe (`map_keyframes`), in this order:

1. Local window (`optimise_window`): global-mode Gauss-Newton over the last `slam.window`
   keyframes and up to `slam.window_frames` frames between the last two (every ordered keyframe
   pair an edge, the last two keyframes to each frame; edges whose predicted flow exceeds
   `slam.edge_max_flow` are left out, except that a keyframe with fewer than
   `slam.global_ba_neighbours` keyframe edges left (fast motion) keeps that many far pairs that
   still overlap by `slam.global_ba_overlap`, the largest overlaps first, their DIS searched around
   the flow the current estimate predicts; the oldest `slam.window_fixed` poses fixed; uncalibrated
   runs also optimise the focal length). Suite ATE cm, no far edges / every overlapping far pair /
   as many as needed: 7-Scenes 0-499 stride 12 8.18 / 3.19 / 3.22, stride 8 2.81 / 3.49 / 2.79,
   stride 2 3.28 / 3.15 / 3.20; every far pair cost a third of the frame rate at stride 1 (4.75
   frames/s), as many as needed runs at 7.08 (7.35 before the robustness work). Frames keep their
   pose relative to their keyframe.
2. Keyframe depth (`slam.keyframe_depth.KeyframeDepth`): the depth module on frames spread over
   the recorded ones, scale-locked to and fused with the window's splatted depth.
3. Dense bundle adjustment (`bundle_adjust`, `slam.ba_iterations`, DIS flow only): the window
   keyframes' poses and per-pixel inverse depths jointly (`v2d.geometry.window_ba`), the depth
   module's depth as the prior. Joint, not alternating: depth-then-poses (block coordinate
   descent) creeps along the direction where depth and translation change together, the scale
   that drifts (7-Scenes ATE 6.83 / 5.21 / 4.64 / 4.09 cm with 1 / 2 / 3 / 5 rounds of
   alternation; 3.9 cm jointly in 2 steps, faster).
4. Keyframes beyond the window are retired (`Map.retire`): their final depth is handed out and
   a strided copy kept for the point cloud; their flows are dropped.

The mapper also initialises the map (the V2D model on the first frames) and restarts it after a
long loss. It owns the depth module's feature cache; the map and the flow cache are shared.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slam.config import RunConfig
from slam.flowcache import FlowCache
from slam.fusion import splat_depth
from slam.keyframe_depth import KeyframeDepth
from slam.map import Keyframe, Map, normalized_pose, release_heap
from slam.measurements import images_to_tensor, induced_motion, predicted_flow
from slam.relocaliser import Registration
from slam.tracks import PairMatcher, build_tracks, weighted
from v2d.geometry.camera import reproject, valid_reprojection
from v2d.geometry.lie import quat_to_matrix, se3_identity, se3_inv, se3_mul
from v2d.geometry.window_ba import WindowBAOptions, bundle_adjust
from v2d.model import V2D
from v2d.refiner import robust_weights, subsample

__all__ = ["Mapper", "KeyframeJob"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyframeJob:
    """A keyframe to map, with the images recorded when it was made (frame index -> (H, W, 3) uint8)."""

    kid: int
    images: dict[int, np.ndarray]
    refine_previous: bool = False  # `slam.depth_timing: both`: also recompute the previous keyframe's depth


class Mapper:
    """Keyframe depth, local-window optimisation and bundle adjustment on a shared map.

    Args:
        model: the V2D model (eval mode): the depth module, the motion module's Gauss-Newton layer.
        cfg: the configuration (`slam`, `gn`, `motion`, `model` sections).
        slam_map: the map this mapper writes.
        flows: the DIS flow cache shared with the tracker.
        size: (H, W) of the frames.
        calibrated: False optimises the focal length (initialisation and window).
        device: where tensors are created.
        on_keyframe: called as on_keyframe(frame, depth (H, W) float32 ndarray, pose_cw (7,), image
            (H, W, 3) uint8, normal (H, W, 3) float32 or None) when a keyframe's depth is final (it
            left the window, or at the end).
        warn: reports a warning once (the run's warning list).
    """

    def __init__(self, model: V2D, cfg: RunConfig, slam_map: Map, flows: FlowCache, size: tuple[int, int],
                 calibrated: bool, device: torch.device,
                 on_keyframe: Callable[[int, np.ndarray, torch.Tensor, np.ndarray, np.ndarray | None], None]
                 | None = None,
                 warn: Callable[[str], None] = _log.warning, pairs: PairMatcher | None = None) -> None:
        self.model, self.cfg, self.sc = model, cfg, cfg.slam
        self.pairs = pairs  # verified feature matches of keyframe pairs (`slam.window_tracks`)
        self.map, self.flows = slam_map, flows
        self.H, self.W = size
        self.calibrated, self.device = calibrated, device
        self.on_keyframe, self.warn = on_keyframe, warn
        self.source = cfg.motion.flow_source
        self.px = self.W / 320.0  # pixel thresholds are given for 320-wide frames
        self.depth = KeyframeDepth(model, cfg, slam_map, size, device, warn)

    # ------------------------------------------------------------------------------------ map set-up
    @torch.no_grad()
    def initialise(self, frames: list[np.ndarray]
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """The V2D model on every `slam.init_rate`-th of `frames`: poses of the chosen frames and the
        first frame's depth (and normals, with `depth.normals`: the depth module once more with the
        poses found); the map's intrinsics are updated (uncalibrated: the focal length).

        Shapes: frames K x (H, W, 3) uint8 -> {chosen frame index: pose_cw (7,) float64} (world =
        frame 0), depth (H, W) float32, normal (3, H, W) float32 or None.
        """
        rate = self.sc.init_rate
        chosen = list(range(0, len(frames), rate))
        if len(chosen) < 2:
            chosen = list(range(len(frames)))
        x = images_to_tensor([frames[i] for i in chosen], self.device)
        out = self.model(x, self.map.intrinsics.float(), optimize_focal=not self.calibrated)
        poses, depth, intr = normalized_pose(out.poses[-1]), out.depths[-1][-1][0], out.intrinsics[-1].double()
        if not (torch.isfinite(poses).all() and torch.isfinite(depth).all() and torch.isfinite(intr).all()):
            self.warn("initialisation produced non-finite values; starting from identity poses and "
                      "single-image depth")
            poses = se3_identity(len(chosen), dtype=torch.float64, device=self.device)
            depth = self.depth.single_image(frames[0], None)
        else:
            self.map.set_intrinsics(intr)
        normal = None
        if self.model.depth.normal_head is not None:
            rel = torch.stack([se3_mul(poses[c], se3_inv(poses[0])) for c in range(1, len(chosen))])
            normal = self.depth.normals([frames[i] for i in chosen], rel)
        return {i: poses[c] for c, i in enumerate(chosen)}, depth.float(), normal

    def new_keyframe(self, f: int, image: np.ndarray, source: int | None = None) -> int:
        """Make tracked frame f a keyframe; its initial depth is a keyframe's depth splatted into it
        (the frame's own keyframe, or `source`, e.g. the keyframe it was relocalised against; a
        retired one gives its strided copy), holes filled with the median, so tracking can go on
        before it is mapped.

        Shapes: image (H, W, 3) uint8 -> keyframe id.
        """
        state = self.map.frame(f)
        src = self.map.keyframe(state.keyframe if source is None else source)
        if src.depth is not None:
            depth_src = src.depth
        else:  # retired: its strided copy, nearest-upsampled
            small = torch.as_tensor(src.small_depth, device=self.device)
            depth_src = F.interpolate(small[None, None], size=(self.H, self.W), mode="nearest")[0, 0]
        intr = self.map.intrinsics.float()
        rel = normalized_pose(se3_mul(self.map.frame_pose(f), se3_inv(src.pose_cw)))
        depth = splat_depth(depth_src, se3_identity(dtype=torch.float32, device=self.device), rel.float(), intr)
        valid = depth > 0
        fill = depth[valid].median() if bool(valid.any()) else depth_src[depth_src > 0].median()
        kf = Keyframe(frame=f, pose_cw=src.pose_cw, image=image, depth=torch.where(valid, depth, fill), valid=valid,
                      segment=src.segment)
        return self.map.add_keyframe(kf, f, at_frame_pose=True)  # the pose is read with the map locked

    @torch.no_grad()
    def restart(self, f: int, image: np.ndarray) -> int:
        """Re-initialise at frame f after a long loss: the window is retired and f becomes a keyframe
        with single-image depth scaled to the last keyframe's median, at f's (held) pose.

        Shapes: image (H, W, 3) uint8 -> keyframe id.
        """
        last = self.map.keyframe(self.map.window()[-1])
        depth = self.depth.single_image(image, float(last.depth.median()))
        pose = self.map.frame_pose(f)
        for k in self.map.window():
            self._retire(k)
        kf = Keyframe(frame=f, pose_cw=pose, image=image, depth=depth, prior=depth,
                      valid=torch.ones_like(depth, dtype=torch.bool),
                      segment=self.map.new_segment())
        return self.map.add_keyframe(kf, f)

    def merge(self, kid: int, reg: Registration) -> bool:
        """Keyframe `kid` (of a newer segment) was registered against keyframe `reg.kid` of an older
        one: move kid's segment into the older one's world and scale (a similarity) and join them.

        The scale is the median ratio, over the registration's inliers, of their depth in the older
        segment (the PnP points) to kid's own depth at those pixels. Returns False (nothing changed)
        when the ratio cannot be measured.
        """
        new, old = self.map.keyframe(kid), self.map.keyframe(reg.kid)
        if new.depth is None or new.segment == old.segment:
            return False
        h, w = new.depth.shape
        c = np.clip(np.round(reg.pixels[:, 0]).astype(int), 0, w - 1)
        r = np.clip(np.round(reg.pixels[:, 1]).astype(int), 0, h - 1)
        z_new = new.depth.cpu().numpy()[r, c]
        ok = (z_new > 0) & (reg.points[:, 2] > 0) & new.valid.cpu().numpy()[r, c]
        if ok.sum() < self.sc.reloc_min_inliers // 2:
            return False
        scale = float(np.median(reg.points[ok, 2] / z_new[ok]))
        pose_old = se3_mul(reg.rel_cw, old.pose_cw)  # kid's camera in the older segment's world
        R_n, R_o = quat_to_matrix(new.pose_cw[3:]), quat_to_matrix(pose_old[3:])
        R = R_o.T @ R_n
        t = R_o.T @ (scale * new.pose_cw[:3] - pose_old[:3])
        self.map.merge_segment(new.segment, old.segment, R, t, scale)
        self.map.add_loop(reg.kid, kid)
        self.depth.forget_states()  # the kept matching states are in the segment's old scale
        return True

    # ------------------------------------------------------------------------------------ per keyframe
    def map_keyframes(self, jobs: list[KeyframeJob]) -> None:
        """Map new keyframes: the window optimisation, each keyframe's depth, the bundle adjustment;
        then retire keyframes beyond the window.

        One job is the synchronous case. Several are keyframes the tracker made while the mapper
        was busy (concurrent mode): the window (up to the newest of them) is optimised once, each
        gets its depth, and one bundle adjustment follows, so the mapper's work per keyframe shrinks
        when it falls behind instead of holding tracking up.
        """
        last = jobs[-1]
        self.optimise_window(last)
        for job in jobs:
            window = self.map.window()
            if job.kid not in window:
                continue
            at = window.index(job.kid)
            self.depth.compute(job.kid, job.images)
            if job.refine_previous and at > 0:
                self.depth.compute(window[at - 1], job.images)
        if self.sc.ba_iterations > 0:
            self.bundle_adjust(last.kid)
        window = self.map.window()
        while len(window) > self.sc.window and window[0] < last.kid:  # never a keyframe not mapped yet
            self._retire(window.pop(0))
        newest = self.map.keyframe(last.kid).frame
        keep = self.map.window_frames()
        self.flows.drop(lambda f: f in keep or f > newest)  # frame flows before this keyframe served their edges
        self.depth.forget(lambda f: f in keep or f in last.images)

    @torch.no_grad()
    def finish(self, last_frame: int, images: dict[int, np.ndarray]) -> None:
        """The end of the video: with `slam.depth_timing: both` the last keyframe's depth again with
        the frames after it (then the bundle adjustment); then every window keyframe is retired."""
        window = self.map.window()
        if window and self.sc.depth_timing == "both" and last_frame > self.map.keyframe(window[-1]).frame:
            self.depth.compute(window[-1], images)
            if self.sc.ba_iterations > 0:
                self.bundle_adjust()
        for k in self.map.window():
            self._retire(k)

    def _retire(self, kid: int) -> None:
        frame = self.map.keyframe(kid).frame
        if self.map.retire(kid, self.sc.cloud_stride, self.on_keyframe):
            self.flows.drop(lambda f: f != frame)
            release_heap()

    # ------------------------------------------------------------------------------------ optimisation
    @torch.no_grad()
    def optimise_window(self, job: KeyframeJob) -> None:
        """Global-mode Gauss-Newton over the window's keyframes and recent frames.

        Nodes: the window's keyframes (the oldest `window_fixed` fixed) and up to `window_frames`
        frames recorded between the last two keyframes (free). Edges: every ordered keyframe pair,
        and each of the last two keyframes to each frame (frames have no depth, so they are only
        targets), except edges whose predicted flow exceeds `edge_max_flow` (a poorly connected
        keyframe keeps far pairs that still overlap, their flow searched around the prediction:
        `_gate_pairs`).
        """
        ids = self.map.window(job.kid)
        n = len(ids)
        if n < 2:
            return
        kfs = self.map.keyframes(ids)
        lo, hi = kfs[-2].frame, kfs[-1].frame
        between = [f for f in job.images if lo < f < hi and not self.map.frame(f).lost]
        extra = sorted({between[int(round(x))] for x in np.linspace(0, len(between) - 1, self.sc.window_frames)}) \
            if between and self.sc.window_frames else []
        base = kfs[0].pose_cw
        poses = torch.stack([se3_mul(k.pose_cw, se3_inv(base)) for k in kfs]
                            + [se3_mul(self.map.frame_pose(f), se3_inv(base)) for f in extra])
        frames = [k.frame for k in kfs] + extra
        images_np = [k.image for k in kfs] + [job.images[f] for f in extra]
        candidates = [(a, b) for a in range(n) for b in range(n) if a != b]
        candidates += [(a, n + e) for a in (n - 2, n - 1) for e in range(len(extra))]
        intr = self.map.intrinsics
        pairs, far = self._gate_pairs(kfs, poses, candidates, intr)
        if not pairs:
            return
        dev = self.device
        ii = torch.tensor([p[0] for p in pairs], device=dev)
        jj = torch.tensor([p[1] for p in pairs], device=dev)
        inv = torch.stack([1.0 / kfs[a].depth.clamp_min(1e-3) for a, _ in pairs])[None]
        images = images_to_tensor(images_np, dev)[None]
        ts, ws = [], []
        for a, b in pairs:
            t, w = self._pair_targets(kfs, poses, frames, images_np, a, b, far)
            ts.append(t)
            ws.append(w * kfs[a].valid[..., None])
        stride = self.sc.window_stride
        t, w, inv, intr_gn = subsample(torch.stack(ts)[None], torch.stack(ws)[None], inv, intr.float()[None], stride)
        w = robust_weights(t[0], w[0], inv[0], poses.float(), ii, jj, intr_gn[0],
                           self.sc.robust_scale * self.px / stride, self.cfg.gn.min_depth)
        t = t[0]
        if self.source == "learned":  # the learned update at the tracked poses (`v2d.refiner`)
            coords, depth_j = reproject(inv[0], poses.float()[ii], poses.float()[jj], intr_gn[0])
            valid = valid_reprojection(inv[0], coords, depth_j, self.cfg.gn.min_depth)
            enc = self.model.motion.refiner.encode(images[0])  # once per image, not per edge
            t, w = self.model.motion.refiner(enc[ii], enc[jj], t, w, coords, valid, stride)
        opts = dataclasses.replace(self.cfg.gn.options(fixed_poses=min(self.sc.window_fixed, n - 1),
                                                       optimize_focal=not self.calibrated),
                                   iterations=self.sc.window_iterations)
        steps = self.model.motion(images, poses.float()[None], inv, intr_gn, ii, jj, dis=(t[None], w[None]),
                                  flow_source="dis", gn=opts, iterations=1)
        new = normalized_pose(steps[-1].poses_cw[0])
        new_intr = steps[-1].intrinsics[0].double() * stride  # a strided problem's focal is 1/stride
        if not (torch.isfinite(new).all() and torch.isfinite(new_intr).all()):
            self.warn("window optimisation gave non-finite poses; kept the tracked poses")
            return
        self.map.set_keyframe_poses({kid: normalized_pose(se3_mul(new[k], base))
                                     for k, kid in enumerate(ids) if k >= opts.fixed_poses})
        for e, f in enumerate(extra):  # after the keyframes: a frame's pose is relative to its keyframe
            self.map.move_frame(f, se3_mul(new[n + e], base))
        self.map.set_edges((ids[a], ids[b]) for a, b in pairs if b < n)
        if not self.calibrated:
            self.map.set_intrinsics(new_intr)
            _log.debug("window ending at frame %d: focal length %.1f px", kfs[-1].frame, float(new_intr[0]))

    @torch.no_grad()
    def bundle_adjust(self, upto: int | None = None) -> None:
        """Joint Gauss-Newton over the window keyframes' poses and per-pixel inverse depths (the window
        up to keyframe `upto`, default all of it).

        Edges: every ordered pair of window keyframes whose predicted flow is within
        `slam.edge_max_flow`, and far pairs of poorly connected keyframes (`_gate_pairs`). The prior is each
        keyframe's depth as the depth module gave it (after the scale lock and fusion; the current
        depth where the depth module failed), with a relative standard deviation of `slam.ba_prior`;
        the oldest `slam.window_fixed` poses are held (gauge).
        """
        ids = self.map.window(upto)
        n = len(ids)
        if n < 2:
            return
        kfs = self.map.keyframes(ids)
        base = kfs[0].pose_cw
        poses = torch.stack([se3_mul(k.pose_cw, se3_inv(base)) for k in kfs])  # small numbers near the window
        intr = self.map.intrinsics
        pairs, far = self._gate_pairs(kfs, poses, [(a, b) for a in range(n) for b in range(n) if a != b], intr)
        if not pairs:
            return
        ts, ws = [], []
        frames, images_np = [k.frame for k in kfs], [k.image for k in kfs]
        for a, b in pairs:
            t, w = self._pair_targets(kfs, poses, frames, images_np, a, b, far)
            ts.append(t)
            ws.append(w[..., 0])
        inv = torch.stack([1.0 / k.depth.clamp_min(1e-3) for k in kfs])
        prior = torch.stack([1.0 / (k.depth if k.prior is None else k.prior).clamp_min(1e-3) for k in kfs])
        fixed = min(self.sc.window_fixed, n - 1)
        gn = self.cfg.gn
        opts = WindowBAOptions(iterations=self.sc.ba_iterations, robust_scale=self.sc.robust_scale * self.px,
                               min_depth=self.cfg.gn.min_depth, stride=self.sc.ba_stride, fixed_poses=fixed,
                               max_translation_step=gn.max_translation_step, max_rotation_step=gn.max_rotation_step)
        dev = self.device
        wts = torch.stack(ws)
        tracks = None
        if self.pairs is not None and self.sc.window_tracks:
            built = build_tracks(kfs, ids, [(a, b) for a in range(n) for b in range(a + 1, n)], self.pairs, intr)
            s = self.sc.ba_stride
            tracks = None if built is None else weighted(built, 1.0, float(wts[:, ::s, ::s].double().sum()),
                                                         self.sc.track_weight, dev)
        new, rho, _ = bundle_adjust(poses, inv, intr, torch.tensor([p[0] for p in pairs], device=dev),
                                    torch.tensor([p[1] for p in pairs], device=dev), torch.stack(ts), wts, prior,
                                    1.0 / (self.sc.ba_prior * prior) ** 2, opts, tracks)
        if not (bool(torch.isfinite(new).all()) and bool(torch.isfinite(rho).all())):
            self.warn("the window's bundle adjustment gave non-finite values; kept the previous estimate")
            return
        for k, (kid, kf) in enumerate(zip(ids, kfs, strict=True)):
            self.map.update_keyframe(kid, depth=(1.0 / rho[k]).float(), valid=torch.ones_like(kf.valid))
        self.map.set_keyframe_poses({kid: normalized_pose(se3_mul(new[k], base)) for k, kid in enumerate(ids)
                                     if k >= fixed})
        self.map.set_edges((ids[a], ids[b]) for a, b in pairs)

    def _gate_pairs(self, kfs: list[Keyframe], poses: torch.Tensor, candidates: list[tuple[int, int]],
                    intrinsics: torch.Tensor) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
        """The candidate edges (a, b) to use, and those of them that are far. Near: the flow predicted
        from keyframe a's depth is within `slam.edge_max_flow`. Far: keyframe a has fewer than
        `slam.global_ba_neighbours` near keyframe edges, so it takes that many of the keyframe pairs
        beyond `edge_max_flow` that still overlap by `slam.global_ba_overlap`, the largest overlaps
        first (their DIS is searched around the predicted flow, `_pair_targets`). The rest, and NaN,
        are left out. Shapes: poses (N, 7), kfs[a] for a < len(kfs)."""
        max_flow = self.sc.edge_max_flow * self.px
        need = self.sc.global_ba_neighbours
        pairs, far = [], set()
        for a in range(len(kfs)):
            mine = [b for a2, b in candidates if a2 == a]
            if mine:
                flows, overlap = induced_motion(kfs[a].depth, se3_mul(poses[mine], se3_inv(poses[a])[None]),
                                                intrinsics, self.cfg.gn.min_depth)
                fl_ov = list(zip(mine, flows.tolist(), overlap.tolist(), strict=True))
                near = [b for b, fl, _ in fl_ov if fl <= max_flow]
                pairs += [(a, b) for b in near]
                # a keyframe with fewer keyframe edges than that (fast motion) gets the far ones that
                # overlap most; slow motion has enough near edges and pays nothing for this
                have = sum(b < len(kfs) for b in near)
                extra = sorted(((ov, b) for b, fl, ov in fl_ov if b < len(kfs) and max_flow < fl < float("inf")
                                and ov >= self.sc.global_ba_overlap), reverse=True)[:max(0, need - have)]
                for _, b in extra:
                    pairs.append((a, b))
                    far.add((a, b))
        return pairs, far

    def _pair_targets(self, kfs: list[Keyframe], poses: torch.Tensor, frames: list[int], images: list[np.ndarray],
                      a: int, b: int, far: set[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """DIS targets of node a's pixels in node b: the pair's cached flow, or, for a far keyframe
        pair, DIS searched around the flows the current poses and both depths predict."""
        if (a, b) not in far and (b, a) not in far:
            return self.flows.targets(frames[a], frames[b], images[a], images[b])

        def guess() -> tuple[np.ndarray, np.ndarray]:
            return tuple(predicted_flow(1.0 / kfs[s].depth.clamp_min(1e-3), poses[s].float(), poses[d].float(),
                                        self.map.intrinsics.float(), self.cfg.gn.min_depth)
                         for s, d in ((a, b), (b, a)))

        return self.flows.guided_targets(frames[a], frames[b], images[a], images[b], guess)

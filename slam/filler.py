"""Every frame final: after the global bundle adjustment, each frame between keyframes is aligned
again to the final map (the idea of DROID-SLAM's trajectory filler).

    report = FrameFiller(cfg, device, warn).run(slam_map)   # after GlobalBA: every keyframe retired

A frame's pose comes from tracking against one keyframe, before the window and the global
adjustments moved the keyframes and rescaled their depth; the map then carries it along rigidly with
its keyframe (`Map` stores it relative to that keyframe). Where the adjustments changed the local
scale or bent the path, the frames between two keyframes keep the old geometry: they drift away and
snap back at the next keyframe (a sawtooth).

Here each such frame gets a motion-only Gauss-Newton alignment against the two keyframes around it
(the one before and the one after, in its map segment; the one after only when every frame between
the two was tracked in that segment: after a loss, a relocalisation or another segment's frames it
may not see them), with their final poses and depth held
fixed: DIS flow from each keyframe's small image to the frame's grey copy (`Map.thumb`, at the
keyframes' `slam.cloud_stride`), guided by the flow the current estimate predicts, on every
`slam.global_ba_stride`-th pixel (the global adjustment's grid), weighted by the Cauchy weight of its
residual (`v2d.refiner.motion_updates`; no forward-backward check, which would double the flow's
cost). The frames of one keyframe interval are solved together (one graph: the two keyframes fixed,
a node per frame, two edges each).

Guard: a frame keeps its pose unless its robust residual (the backend's measure) went down and the
result is finite; a failed solve keeps a whole interval's poses, with a warning. Keyframes and lost
frames are not touched (a lost frame keeps the pose it was given, the last good pose as it was
then); frames that were lost and then bridged (`FrameState.interpolated`: tracking could not use
their image, so neither can this) are interpolated again between the frames around them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slam.backend import robust_residual
from slam.config import RunConfig
from slam.map import Map, normalized_pose
from slam.measurements import predicted_flow
from v2d.errors import V2DError
from v2d.flow import dis_flow
from v2d.geometry.camera import pixel_grid
from v2d.geometry.lie import se3_inv, se3_mul
from v2d.refiner import motion_updates

__all__ = ["FillReport", "FrameFiller"]

_log = logging.getLogger(__name__)


@dataclass
class FillReport:
    """What the filler did: frames aligned again (moved) of those tried, residuals (Cauchy-robust RMS
    flow residual, pixels at the network size, medians over the tried frames) before and after."""

    frames: int = 0
    moved: int = 0
    residual_before_px: float | None = None
    residual_after_px: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FrameFiller:
    """Aligns every non-keyframe to its two neighbouring keyframes of the final map.

    Args:
        cfg: the configuration (`slam`, `gn`, `motion.dis`).
        device: where the alignment runs.
        warn: reports a warning.
    """

    def __init__(self, cfg: RunConfig, device: torch.device, warn: Callable[[str], None] = _log.warning) -> None:
        self.cfg, self.sc, self.device, self.warn = cfg, cfg.slam, torch.device(device), warn

    @torch.no_grad()
    def run(self, slam_map: Map) -> FillReport:
        t0 = time.perf_counter()
        report = FillReport()
        kfs = slam_map.keyframes()
        if any(k.small_depth is None or k.small_image is None for k in kfs):
            raise V2DError("frame filler: every keyframe must be retired first (Mapper.finish)")
        frames = slam_map.frames()
        by_frame = {k.frame: kid for kid, k in enumerate(kfs)}
        before, after = [], []
        for seg_kids in slam_map.segments().values():
            seg = kfs[seg_kids[0]].segment
            anchors = sorted(kfs[k].frame for k in seg_kids)
            for i, lo in enumerate(anchors):
                hi = anchors[i + 1] if i + 1 < len(anchors) else None
                stop = hi if hi is not None else len(frames)
                # frames of this segment tracked between the two keyframes (not lost, not bridged)
                ours = [f for f in range(lo + 1, stop) if kfs[frames[f].keyframe].segment == seg]
                todo = [f for f in ours if not (frames[f].lost or frames[f].interpolated or frames[f].is_keyframe)]
                if not todo:
                    continue
                # the keyframe after counts only across an unbroken tracked stretch: after a loss, a
                # relocalisation or another segment's frames it may not see these frames at all
                clean = hi is not None and len(todo) == len(ours) == hi - lo - 1
                ends = [by_frame[lo]] + ([by_frame[hi]] if clean else [])
                try:
                    b, a = self._align(slam_map, ends, todo)
                except (torch.linalg.LinAlgError, RuntimeError) as e:  # a singular system: keep these poses
                    why = str(e).splitlines()[0][:80]
                    self.warn(f"frame filler: frames {todo[0]}-{todo[-1]} kept their poses ({why})")
                    continue
                report.frames += len(todo)
                report.moved += sum(1 for x, y in zip(b, a, strict=True) if y < x)
                before += b
                after += [min(x, y) for x, y in zip(b, a, strict=True)]
        self._rebridge(slam_map)
        ok = [(x, y) for x, y in zip(before, after, strict=True) if np.isfinite(x) and np.isfinite(y)]
        if ok:
            px = self.sc.cloud_stride * self.sc.global_ba_stride
            report.residual_before_px = float(np.median([x for x, _ in ok])) * px
            report.residual_after_px = float(np.median([y for _, y in ok])) * px
        report.seconds = time.perf_counter() - t0
        _log.info("frame filler: %d of %d frames moved, median residual %s -> %s px, %.1f s", report.moved,
                  report.frames, report.residual_before_px, report.residual_after_px, report.seconds)
        return report

    @staticmethod
    def _rebridge(slam_map: Map) -> None:
        """Each run of bridged frames gets its poses interpolated again between the frames around it,
        which this may have moved."""
        frames = slam_map.frames()
        f = 0
        while f < len(frames):
            if not frames[f].interpolated:
                f += 1
                continue
            end = f
            while end < len(frames) and frames[end].interpolated:
                end += 1
            if f > 0 and end < len(frames):
                slam_map.interpolate(range(f, end), f - 1, end)
            f = end

    def _align(self, slam_map: Map, kids: list[int], frames: list[int]) -> tuple[list[float], list[float]]:
        """Align `frames` to keyframes `kids` (1 or 2, fixed); move each frame whose residual went down.
        Returns each frame's residual before and after (pixels of the grid adjusted: every
        `slam.global_ba_stride`-th small pixel)."""
        sc, gn, dev = self.sc, self.cfg.gn, self.device
        s = sc.cloud_stride
        kfs = slam_map.keyframes(kids)
        K = len(kfs)
        base = kfs[0].pose_cw.to(dev, torch.float64)
        poses = torch.stack([se3_mul(k.pose_cw.to(dev, torch.float64), se3_inv(base)) for k in kfs]
                            + [se3_mul(slam_map.frame_pose(f).to(dev, torch.float64), se3_inv(base)) for f in frames])
        depth = torch.from_numpy(np.stack([k.small_depth for k in kfs])).to(dev, torch.float64)
        valid = depth > 0
        inv = torch.where(valid, 1.0 / depth.clamp_min(1e-6), torch.zeros_like(depth))
        intr = slam_map.intrinsics.to(dev, torch.float64) / s
        grey = [_grey(k.small_image) for k in kfs]
        g = sc.global_ba_stride
        ii, jj, ts, ws = [], [], [], []
        for n, f in enumerate(frames):
            thumb = slam_map.thumb(f)
            for a in range(K):
                guess = predicted_flow(inv[a], poses[a], poses[K + n], intr, gn.min_depth)
                flow = dis_flow(grey[a], thumb, self.cfg.motion.dis.preset, guess, finest_scale=0)
                sub = torch.from_numpy(flow[::g, ::g]).to(dev)
                t = sub / g + pixel_grid(*sub.shape[:2], dtype=sub.dtype, device=dev)
                ii.append(a)
                jj.append(K + n)
                ts.append(t)
                ws.append(valid[a, ::g, ::g].float()[..., None].expand(-1, -1, 2))
        inv, intr = inv[:, ::g, ::g], intr / g
        ii_t, jj_t = torch.tensor(ii, device=dev), torch.tensor(jj, device=dev)
        t_all, w_all = torch.stack(ts).to(dev), torch.stack(ws).to(dev)
        inv_e = inv[ii_t]
        c = sc.robust_scale * (depth.shape[-1] * s / 320.0) / (s * g)  # pixel thresholds are for 320-wide frames
        opts = dataclasses.replace(gn.options(fixed_poses=K, optimize_focal=False),
                                   iterations=gn.iterations * self.cfg.motion.iterations)
        steps = motion_updates(poses.float(), inv_e.float(), intr.float(), t_all, w_all, ii_t, jj_t, opts, c,
                               self.cfg.motion.refiner.updates)
        new = normalized_pose(steps[-1].poses.double())
        before, after = [], []
        for n, f in enumerate(frames):
            e = [k for k in range(len(ii)) if jj[k] == K + n]
            sel = torch.tensor(e, device=dev)
            args = (inv, intr, ii_t[sel], jj_t[sel], t_all[sel], w_all[sel][..., 0], c, gn.min_depth)
            r0 = robust_residual(poses, *args)
            r1 = robust_residual(new, *args) if bool(torch.isfinite(new[K + n]).all()) else float("inf")
            before.append(r0)
            after.append(r1)
            if np.isfinite(r1) and r1 < r0:
                slam_map.move_frame(f, se3_mul(new[K + n], base))
        return before, after


def _grey(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


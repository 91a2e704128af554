"""DeepV2D's motion module (Flow-SE3): flow targets and confidences -> Gauss-Newton pose updates.

For every edge i -> j (source frame i has a depth map) the targets are OpenCV DIS optical flow i -> j
with a forward-backward confidence (`v2d.flow.dis_targets`, at full resolution), and then

- "dis": the Gauss-Newton layer (`v2d.geometry.gauss_newton`) runs `gn.iterations` steps per outer
  iteration on those targets (no weights needed; the baseline the learned update must beat);
- "learned": the first outer iteration as "dis", then each further one lets the learned update
  (`v2d.refiner.FlowRefiner`: residual flow and log-weight change from a correlation volume around
  each target, the photometric error and the residual) change the targets and runs the
  Gauss-Newton steps again (`v2d.refiner.motion_updates`); untrained, that is the "dis" mode
  exactly. (The SLAM tracker and mapper also re-weight by the residuals, Cauchy, in both modes.)

Modes: "keyframe" (edges 0 -> j) and "global" (edges between all frames with a depth map). Which
poses are held fixed and whether the focal length is optimised too (uncalibrated video) are
decided per call: the `GNOptions` given to `MotionModule.forward`, built from the `gn` section by
`GNConfig.options`. Poses are detached between outer iterations (each iteration's GN is
differentiable, and the first one back to the initial poses, e.g. the pose-regression network; the
chain across iterations is cut, as RAFT-style iterative models do, which keeps training stable).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from v2d.flow import DISOptions, dis_targets
from v2d.geometry.gauss_newton import GNOptions, gauss_newton
from v2d.geometry.lie import se3_exp, se3_mul
from v2d.nets.pose import PoseRegressor
from v2d.ranges import NON_NEGATIVE, POSITIVE, Ranges, at_least
from v2d.refiner import FlowRefiner, RefinerConfig, motion_updates

__all__ = ["GNConfig", "MotionConfig", "MotionModule", "MotionStep", "edges"]


@dataclass(frozen=True)
class GNConfig:
    """The user's settings of the Gauss-Newton layer (the `gn` section); defaults are `GNOptions`'.

    Each field means what the `GNOptions` field of the same name means (iteration count, damping,
    step limits); `min_depth` is also the motion module's validity test of a reprojection (one
    threshold: a point closer than this to the target camera is invalid for the flow network and
    ignored by the Gauss-Newton layer alike).

    The poses held fixed and whether the focal length is optimised are not settings but decisions of
    each call (keyframe tracking fixes the keyframe, the SLAM window its oldest poses; the focal
    length is optimised when the camera is not calibrated), so they are the arguments of `options`,
    the one way to build the layer's per-call options:

        opts = cfg.gn.options(fixed_poses=1, optimize_focal=False)  # a GNOptions
    """

    iterations: int = GNOptions.iterations
    damping: float = GNOptions.damping
    damping_scale: float = GNOptions.damping_scale
    max_translation_step: float = GNOptions.max_translation_step
    max_rotation_step: float = GNOptions.max_rotation_step
    max_focal_step: float = GNOptions.max_focal_step
    min_depth: float = GNOptions.min_depth
    # Inference stops a call once a step is below 1e-6 (scene units / radians): far below anything
    # measurable, and float32 poses move ~1e-7 per step after convergence (tracking on 7-Scenes
    # converges in 3 of its 6 steps). The layer's own default (0) keeps every step.
    tolerance: float = 1e-6

    RANGES: ClassVar[Ranges] = {
        "iterations": at_least(1),
        "damping": NON_NEGATIVE,
        "damping_scale": NON_NEGATIVE,
        "max_translation_step": POSITIVE,
        "max_rotation_step": POSITIVE,
        "max_focal_step": POSITIVE,
        "min_depth": POSITIVE,
        "tolerance": NON_NEGATIVE,
    }

    def options(self, *, fixed_poses: int, optimize_focal: bool) -> GNOptions:
        """The Gauss-Newton options of one call: these settings, the first `fixed_poses` poses held
        fixed, and the focal length optimised too when `optimize_focal`."""
        return GNOptions(**dataclasses.asdict(self), fixed_poses=fixed_poses, optimize_focal=optimize_focal)


@dataclass(frozen=True)
class MotionConfig:
    """Settings of the motion module (the `motion` section).

    Attributes:
        iterations: outer iterations (flow + GN) per motion update (the paper: 3).
        mode: "keyframe" (edges 0 -> j) or "global" (all ordered pairs of frames with depth).
        flow_source: "dis" (OpenCV DIS flow and Cauchy weights) or "learned" (DIS, then the learned
            update `v2d.refiner`; its weights are part of the model's).
        pose_init: "identity", "given" (the caller's poses) or "regress" (a small pose network).
        dis: DIS settings (the flow every source starts from).
        refiner: the learned update on top of DIS (`v2d.refiner`).
        norm: normalisation layers of the pose network.
    """

    iterations: int = 3
    mode: Literal["keyframe", "global"] = "keyframe"
    flow_source: Literal["learned", "dis"] = "dis"
    pose_init: Literal["identity", "given", "regress"] = "given"
    dis: DISOptions = field(default_factory=DISOptions)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    norm: Literal["group", "batch", "none"] = "group"

    RANGES: ClassVar[Ranges] = {"iterations": at_least(1)}


@dataclass
class MotionStep:
    """What one outer iteration used and produced (for losses and diagnostics).

    Shapes: targets, weights (B, E, h, w, 2) at the resolution the GN ran at; poses_cw (B, N, 7)
    after the GN steps; intrinsics (B, 4) at image resolution.
    """

    targets: torch.Tensor
    weights: torch.Tensor
    poses_cw: torch.Tensor
    intrinsics: torch.Tensor


def edges(num_frames: int, mode: str, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge lists (ii, jj): keyframe mode 0 -> 1..N-1; global mode every ordered pair i != j.

    Shapes: returns two (E,) int64 tensors.
    """
    if mode == "keyframe":
        jj = torch.arange(1, num_frames, device=device)
        return torch.zeros_like(jj), jj
    ii, jj = torch.meshgrid(torch.arange(num_frames, device=device), torch.arange(num_frames, device=device),
                            indexing="ij")
    keep = ii != jj
    return ii[keep], jj[keep]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) floats in [0, 1] -> (..., H, W, 3) uint8 (what OpenCV takes)."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


class MotionModule(nn.Module):
    """Pose updates for N frames from their images and the source frames' depth.

    `gn` is the `gn` config section: the Gauss-Newton options of a call that gives none.
    """

    def __init__(self, cfg: MotionConfig, gn: GNConfig | None = None) -> None:
        super().__init__()
        self.cfg, self.gn = cfg, gn or GNConfig()
        self.refiner = FlowRefiner(cfg.refiner)
        self.pose_net = PoseRegressor(norm=cfg.norm) if cfg.pose_init == "regress" else None

    def init_poses(self, images_n: torch.Tensor, poses_cw: torch.Tensor | None) -> torch.Tensor:
        """Initial poses by `cfg.pose_init` (frame 0 is the identity unless poses are given).

        Shapes: images_n (B, N, 3, H, W) normalised; poses_cw (B, N, 7) or None -> (B, N, 7).
        """
        B, N = images_n.shape[:2]
        identity = images_n.new_zeros(B, N, 7)
        identity[..., 6] = 1.0
        if self.cfg.pose_init == "given" and poses_cw is not None:
            return poses_cw
        if self.cfg.pose_init == "regress":
            key = images_n[:, :1].expand(B, N - 1, *images_n.shape[2:]).flatten(0, 1)
            xi = self.pose_net(key, images_n[:, 1:].flatten(0, 1)).view(B, N - 1, 6)
            return torch.cat([identity[:, :1], se3_mul(se3_exp(xi), identity[:, 1:])], dim=1)
        return identity

    def forward(self, images: torch.Tensor, poses_cw: torch.Tensor, inv_depth: torch.Tensor,
                intrinsics: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor,
                dis: tuple[torch.Tensor, torch.Tensor] | None = None, flow_source: str | None = None,
                gn: GNOptions | None = None, iterations: int | None = None) -> list[MotionStep]:
        """`cfg.iterations` outer iterations of flow + Gauss-Newton.

        Shapes: images (B, N, 3, H, W) in [0, 1]; poses_cw (B, N, 7) initial poses; inv_depth (B, E,
        H, W) of the source frame of each edge; intrinsics (B, 4); ii, jj (E,); dis:
        `dis_targets(images, ii, jj)` when already computed (DIS flow does not depend on poses or
        depth, so callers reuse it); flow_source overrides `cfg.flow_source`; gn: this call's
        Gauss-Newton options, fixed poses and focal length included (default
        `self.gn.options(fixed_poses=1, optimize_focal=False)`: frame 0 fixed, the focal length
        too; the SLAM front end optimises its window with several fixed poses); iterations
        overrides `cfg.iterations`. Returns one MotionStep per outer iteration.
        """
        source = flow_source or self.cfg.flow_source
        B, N, _, H, W = images.shape
        opts = self.gn.options(fixed_poses=1, optimize_focal=False) if gn is None else gn
        outer = self.cfg.iterations if iterations is None else iterations
        if dis is None:
            dis = self.dis_targets(images, ii, jj)
        targets, weights = (t.to(inv_depth.dtype) for t in dis)
        if source == "learned":
            return self._learned(images, poses_cw, inv_depth, intrinsics, targets, weights, ii, jj, opts, outer)
        steps: list[MotionStep] = []
        for it in range(outer):
            if it > 0:
                poses_cw = poses_cw.detach()
            poses_cw, intr_out = gauss_newton(poses_cw, inv_depth.contiguous(), intrinsics, targets.contiguous(),
                                              weights.contiguous(), ii, jj, opts)
            if opts.optimize_focal:
                ratio = intr_out[:, :1] / intrinsics[:, :1]
                intrinsics = torch.cat([intrinsics[:, :2] * ratio, intrinsics[:, 2:]], dim=1)
            steps.append(MotionStep(targets, weights, poses_cw, intrinsics))
        return steps

    def _learned(self, images: torch.Tensor, poses_cw: torch.Tensor, inv_depth: torch.Tensor,
                 intrinsics: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, ii: torch.Tensor,
                 jj: torch.Tensor, opts: GNOptions, outer: int) -> list[MotionStep]:
        per_batch = []
        for b in range(images.shape[0]):
            enc = self.refiner.encode(images[b])

            def refine(t, w, c, v, enc=enc):
                return self.refiner(enc[ii], enc[jj], t, w, c, v, 1)

            per_batch.append(motion_updates(poses_cw[b], inv_depth[b], intrinsics[b], targets[b], weights[b], ii, jj,
                                            opts, None, outer - 1, refine))
        def stacked(k: int, name: str) -> torch.Tensor:
            return torch.stack([getattr(s[k], name) for s in per_batch])

        return [MotionStep(stacked(k, "targets"), stacked(k, "weights"), stacked(k, "poses"), stacked(k, "intrinsics"))
                for k in range(outer)]

    def dis_targets(self, images: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DIS flow targets and forward-backward confidences of every edge (`v2d.flow.dis_targets`).

        Shapes: images (B, N, 3, H, W) in [0, 1]; ii, jj (E,) -> targets, weights (B, E, H, W, 2).
        """
        imgs = _to_uint8(images)  # (B, N, H, W, 3)
        targets, weights = [], []
        for b in range(imgs.shape[0]):
            for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
                t, w = dis_targets(imgs[b, i], imgs[b, j], self.cfg.dis)
                targets.append(t)
                weights.append(w)
        B, E = imgs.shape[0], ii.shape[0]
        t = torch.stack(targets).view(B, E, *targets[0].shape).to(images.device)
        w = torch.stack(weights).view(B, E, *weights[0].shape).to(images.device)
        return t, w

"""DeepV2D's motion module (Flow-SE3): flow targets and confidences -> Gauss-Newton pose updates.

For every edge i -> j (source frame i has a depth map), an outer iteration

1. reprojects frame i's pixels into frame j with the current depth and poses,
2. gets target coordinates and per-coordinate confidences, either
   - "learned": frame j's features are warped into frame i, and a U-Net on [features_i, warped_j]
     predicts a residual flow (added to the reprojected coordinates) and confidence logits
     (sigmoid, times the validity mask), at 1/4 resolution; or
   - "dis": OpenCV DIS optical flow i -> j with a forward-backward confidence, at full resolution
     (no weights needed; the baseline the learned flow must beat);
3. runs the differentiable Gauss-Newton layer (`v2d.geometry.gauss_newton`) for `gn.iterations`
   steps.

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
import torch.nn.functional as F
from torch import nn

from v2d.flow import DISOptions, dis_targets
from v2d.geometry.camera import reproject, scale_intrinsics, valid_reprojection
from v2d.geometry.gauss_newton import GNOptions, gauss_newton
from v2d.geometry.lie import se3_exp, se3_mul
from v2d.nets.encoder import Stem
from v2d.nets.unet import FlowUNet, PoseRegressor
from v2d.ranges import NON_NEGATIVE, POSITIVE, Ranges, at_least

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

    RANGES: ClassVar[Ranges] = {
        "iterations": at_least(1),
        "damping": NON_NEGATIVE,
        "damping_scale": NON_NEGATIVE,
        "max_translation_step": POSITIVE,
        "max_rotation_step": POSITIVE,
        "max_focal_step": POSITIVE,
        "min_depth": POSITIVE,
    }

    def options(self, *, fixed_poses: int, optimize_focal: bool) -> GNOptions:
        """The Gauss-Newton options of one call: these settings, the first `fixed_poses` poses held
        fixed, and the focal length optimised too when `optimize_focal`."""
        return GNOptions(**dataclasses.asdict(self), fixed_poses=fixed_poses, optimize_focal=optimize_focal)


@dataclass(frozen=True)
class MotionConfig:
    """Settings of the motion module (the `motion` section). Defaults are the `small` preset.

    Attributes:
        stem_channels, stem_out: widths of the encoder's two stages (the paper: 32, 64).
        feature_channels: feature width at 1/4 resolution (the paper: 64).
        unet_channels: width of the U-Net's first level (doubling per level).
        unet_levels: U-Net scales.
        iterations: outer iterations (flow + GN) per motion update (the paper: 3).
        mode: "keyframe" (edges 0 -> j) or "global" (all ordered pairs of frames with depth).
        flow_source: "learned" (the U-Net) or "dis" (OpenCV DIS flow; needs no weights).
        pose_init: "identity", "given" (the caller's poses) or "regress" (a small pose network).
        dis: DIS settings for flow_source = "dis".
        norm: normalisation layers.
    """

    stem_channels: int = 16
    stem_out: int = 32
    feature_channels: int = 32
    unet_channels: int = 16
    unet_levels: int = 3
    iterations: int = 3
    mode: Literal["keyframe", "global"] = "keyframe"
    flow_source: Literal["learned", "dis"] = "dis"
    pose_init: Literal["identity", "given", "regress"] = "given"
    dis: DISOptions = field(default_factory=DISOptions)
    norm: Literal["group", "batch", "none"] = "group"

    RANGES: ClassVar[Ranges] = {
        "stem_channels": at_least(1),
        "stem_out": at_least(1),
        "feature_channels": at_least(1),
        "unet_channels": at_least(1),
        "unet_levels": at_least(1),
        "iterations": at_least(1),
    }


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
    """Pose updates for N frames from their images, features and the source frames' depth.

    `gn` is the `gn` config section: the Gauss-Newton options of a call that gives none.
    """

    def __init__(self, cfg: MotionConfig, gn: GNConfig | None = None) -> None:
        super().__init__()
        self.cfg, self.gn = cfg, gn or GNConfig()
        self.stem = Stem(cfg.stem_channels, cfg.stem_out, norm=cfg.norm)
        self.proj = nn.Conv2d(cfg.stem_out, cfg.feature_channels, 1)
        self.unet = FlowUNet(2 * cfg.feature_channels, cfg.unet_channels, cfg.unet_levels, cfg.norm)
        self.pose_net = PoseRegressor(norm=cfg.norm) if cfg.pose_init == "regress" else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Shapes: images (B, 3, H, W) normalised -> (B, F, H/4, W/4)."""
        return self.proj(self.stem(images))

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

    def _learned_targets(self, feats: torch.Tensor, poses_cw: torch.Tensor, inv_depth: torch.Tensor,
                         intr_s: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, min_depth: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, Fc, h, w = feats.shape
        E = ii.shape[0]
        coords, depth_j = reproject(inv_depth, poses_cw[:, ii], poses_cw[:, jj], intr_s[:, None])
        coords = coords.detach()
        valid = valid_reprojection(inv_depth, coords, depth_j, min_depth).detach()
        scale = coords.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
        grid = (coords * scale - 1).nan_to_num(-2.0).flatten(0, 1)  # (B*E, h, w, 2); NaN -> outside
        warped = F.grid_sample(feats[:, jj].flatten(0, 1), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        out = self.unet(torch.cat([feats[:, ii].flatten(0, 1), warped], dim=1)).view(B, E, 4, h, w)
        flow = out[:, :, :2].permute(0, 1, 3, 4, 2)
        conf = torch.sigmoid(out[:, :, 2:]).permute(0, 1, 3, 4, 2) * valid[..., None].to(out.dtype)
        targets = torch.where(valid[..., None], coords, torch.zeros_like(coords)) + flow
        return targets, conf

    def forward(self, images: torch.Tensor, feats: torch.Tensor | None, poses_cw: torch.Tensor,
                inv_depth: torch.Tensor, intrinsics: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor,
                dis: tuple[torch.Tensor, torch.Tensor] | None = None, flow_source: str | None = None,
                gn: GNOptions | None = None, iterations: int | None = None) -> list[MotionStep]:
        """`cfg.iterations` outer iterations of flow + Gauss-Newton.

        Shapes: images (B, N, 3, H, W) in [0, 1] (used by "dis"); feats (B, N, F, H/4, W/4) (used
        by "learned"); poses_cw (B, N, 7) initial poses; inv_depth (B, E, H, W) of the source frame
        of each edge; intrinsics (B, 4); ii, jj (E,); dis: `dis_targets(images, ii, jj)` when
        already computed (DIS flow does not depend on poses or depth, so callers reuse it);
        flow_source overrides `cfg.flow_source` (training the flow network needs "learned"); gn:
        this call's Gauss-Newton options, fixed poses and focal length included (default
        `self.gn.options(fixed_poses=1, optimize_focal=False)`: frame 0 fixed, the focal length
        too; the SLAM front end optimises its window with several fixed poses); `gn.min_depth` is
        also the reprojection validity threshold of the learned flow; iterations overrides
        `cfg.iterations` (with "dis" flow the targets do not change between outer iterations).
        Returns one MotionStep per outer iteration.
        """
        source = flow_source or self.cfg.flow_source
        B, N, _, H, W = images.shape
        opts = self.gn.options(fixed_poses=1, optimize_focal=False) if gn is None else gn
        steps: list[MotionStep] = []
        if source == "dis" and dis is None:
            dis = self.dis_targets(images, ii, jj)
        for it in range(self.cfg.iterations if iterations is None else iterations):
            if it > 0:
                poses_cw = poses_cw.detach()
            if source == "dis":
                targets, weights = (t.to(inv_depth.dtype) for t in dis)
                d, intr_gn = inv_depth, intrinsics
            else:
                h, w = feats.shape[-2:]
                intr_gn = scale_intrinsics(intrinsics, w / W, h / H)
                d = F.interpolate(inv_depth, size=(h, w), mode="bilinear", align_corners=False)
                targets, weights = self._learned_targets(feats, poses_cw, d, intr_gn, ii, jj, opts.min_depth)
            poses_cw, intr_out = gauss_newton(poses_cw, d.contiguous(), intr_gn, targets.contiguous(),
                                              weights.contiguous(), ii, jj, opts)
            if opts.optimize_focal:
                ratio = intr_out[:, :1] / intr_gn[:, :1]
                intrinsics = torch.cat([intrinsics[:, :2] * ratio, intrinsics[:, 2:]], dim=1)
            steps.append(MotionStep(targets, weights, poses_cw, intrinsics))
        return steps

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

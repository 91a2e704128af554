"""DeepV2D's depth module: image features -> cost volume over depth hypotheses -> 3D matching.

For a keyframe and M neighbour frames with known poses:

1. a 2D encoder (stem + stacked 2D hourglasses + 1x1 head) gives C-d features at 1/4 resolution;
2. each neighbour's features are back-projected over D depth hypotheses into the keyframe
   (`kernels.ops.backproject_volume`), concatenated with the keyframe's features and reduced by 3D
   convolutions; the M views are fused by averaging ("avg") or by concatenation ("concat", a fixed
   number of views, as DeepV2D does on KITTI);
3. stacked 3D hourglasses match over (D, h, w); each has a head giving per-hypothesis logits, which
   are upsampled to the input size; depth = soft-argmax (expected depth under the softmax).

Every hourglass's depth is returned for deep supervision; the last is the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from v2d.geometry.camera import pose_to_rt, relative_pose, scale_intrinsics
from v2d.nets.blocks import Conv3dCL, ConvNormAct, StackedHourglass, norm_layer
from v2d.nets.encoder import FeatureEncoder
from v2d.nets.normal_head import NormalHead
from v2d.nets.temporal import TemporalFusion, warp_volume
from v2d.ranges import NON_NEGATIVE, POSITIVE, Ranges, Relation, Relations, at_least, one_of

__all__ = ["DepthConfig", "DepthModule", "DepthResult", "Previous", "depth_hypotheses"]

Norm = Literal["group", "batch", "none"]


@dataclass(frozen=True)
class DepthConfig:
    """Settings of the depth module (the `depth` section). Defaults are the `small` preset.

    Attributes:
        stem_channels, stem_out: widths of the stem's two stages (the paper: 32, 64).
        feature_channels: feature width after the 1x1 head (the paper: 32).
        feature_hourglasses: stacked 2D hourglasses in the encoder (the paper: 2).
        feature_levels: levels of each 2D hourglass (the paper: 4).
        hourglass_expand: channels added per hourglass level (2D and 3D).
        volume_channels: width of the cost volume after the 3D reduction (the paper: 32).
        reduce_kernel: kernel size of the 3D reduction: 3 (or 5) = two convolutions of that size on
            [key, warped] (the paper); 1 = one pointwise layer, applied without building the
            concatenated volume (cheap, for CPU).
        matching_hourglasses: stacked 3D hourglasses (the paper: 2), each with a depth head.
        matching_levels: levels of each 3D hourglass.
        hypotheses: number of depth hypotheses D (the paper: 32).
        min_depth, max_depth: hypothesis range in scene units (metres).
        spacing: "depth" spaces hypotheses uniformly in depth (the original), "inverse" in inverse depth.
        fusion: "avg" averages the per-view volumes; "concat" concatenates exactly `views` of them.
        views: neighbours per keyframe for "concat" fusion.
        correlation_groups: G > 0 adds group-wise correlation to each view's volume: the mean over
            each of G channel groups of key * warped features (GwcNet-style), a matching signal a
            small network picks up far sooner than from the concatenation alone (measured on CPU
            training: without it the small network ignored the poses for its first 350 depth steps).
            0 = the paper's concatenation only. C must be divisible by G.
        upsample: "logits" upsamples the per-hypothesis logits to the input size before the
            soft-argmax (the original); "depth" takes the soft-argmax at 1/4 resolution and upsamples
            the depth (cheaper, for CPU).
        norm: normalisation layers ("group" works with batch size 1).
        temporal_fusion: carry the last 3D hourglass's output from one keyframe to the next, warped
            by the camera motion, and fuse it into the next keyframe's cost volume (EST-style;
            `v2d.nets.temporal`). Used where keyframes come in order (`infer(..., previous=...)`):
            the SLAM engine and sequence training (`train.sequence_keyframes`).
        normals: a normal head (NAS-style; `v2d.nets.normal_head`) gives a unit surface normal per
            pixel beside the depth, trained with a depth-normal consistency loss.
    """

    stem_channels: int = 16
    stem_out: int = 32
    feature_channels: int = 16
    feature_hourglasses: int = 1
    feature_levels: int = 3
    hourglass_expand: int = 8
    volume_channels: int = 16
    reduce_kernel: int = 1
    matching_hourglasses: int = 1
    matching_levels: int = 2
    hypotheses: int = 32
    min_depth: float = 0.2
    max_depth: float = 10.0
    spacing: Literal["depth", "inverse"] = "depth"
    fusion: Literal["avg", "concat"] = "avg"
    views: int = 4
    correlation_groups: int = 4
    upsample: Literal["logits", "depth"] = "depth"
    norm: Norm = "group"
    temporal_fusion: bool = False
    normals: bool = False

    RANGES: ClassVar[Ranges] = {
        "stem_channels": at_least(1),
        "stem_out": at_least(1),
        "feature_channels": at_least(1),
        "feature_hourglasses": NON_NEGATIVE,
        "feature_levels": at_least(1),
        "hourglass_expand": NON_NEGATIVE,
        "volume_channels": at_least(1),
        "reduce_kernel": one_of(1, 3, 5),
        "matching_hourglasses": at_least(1),
        "matching_levels": at_least(1),
        "hypotheses": at_least(2),
        "min_depth": POSITIVE,
        "max_depth": POSITIVE,
        "views": at_least(1),
    }
    RELATIONS: ClassVar[Relations] = (
        Relation(lambda c: c.min_depth < c.max_depth, "min_depth must be smaller than max_depth"),
    )


@dataclass(frozen=True)
class Previous:
    """The previous keyframe's temporal state, for `DepthModule.infer`.

    Shapes: state (B, V, h, w, D) (`DepthResult.state`); key_to_prev (B, 7): the SE3 pose taking
    the new keyframe's camera coordinates to the previous keyframe's (T_prev * T_key^-1 for
    world->camera poses).
    """

    state: torch.Tensor
    key_to_prev: torch.Tensor

    @classmethod
    def between(cls, state: torch.Tensor, prev_pose_cw: torch.Tensor, key_pose_cw: torch.Tensor) -> Previous:
        """The state of the keyframe at world->camera pose `prev_pose_cw`, for the keyframe at
        `key_pose_cw` (both (B, 7) in one world)."""
        return cls(state, relative_pose(key_pose_cw, prev_pose_cw))


@dataclass(frozen=True)
class DepthResult:
    """What `DepthModule.infer` gives.

    Shapes: depths: one (B, H, W) per 3D hourglass, the last being the estimate; normals (B, 3, H, W)
    unit, camera frame, toward the camera (None without `normals`); state (B, V, h, w, D), the last
    hourglass's output to hand to the next keyframe (None without `temporal_fusion`).
    """

    depths: list[torch.Tensor]
    normals: torch.Tensor | None
    state: torch.Tensor | None


def depth_hypotheses(cfg: DepthConfig, like: torch.Tensor) -> torch.Tensor:
    """The D depth hypotheses, increasing, on `like`'s device and dtype.

    Shapes: returns (D,).
    """
    if cfg.spacing == "depth":
        return torch.linspace(cfg.min_depth, cfg.max_depth, cfg.hypotheses, dtype=like.dtype, device=like.device)
    inv = torch.linspace(1.0 / cfg.max_depth, 1.0 / cfg.min_depth, cfg.hypotheses, dtype=like.dtype,
                         device=like.device)
    return (1.0 / inv).flip(0)


class DepthModule(nn.Module):
    """Keyframe depth from features of the keyframe and its neighbours with known poses."""

    def __init__(self, cfg: DepthConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, V = cfg.feature_channels, cfg.volume_channels
        self.encoder = FeatureEncoder(cfg.stem_channels, cfg.stem_out, C, cfg.feature_hourglasses,
                                      cfg.feature_levels, cfg.hourglass_expand, cfg.norm)
        k = cfg.reduce_kernel
        G = cfg.correlation_groups
        if G and C % G:
            raise ValueError(f"depth.correlation_groups: {G} does not divide feature_channels {C}")
        self.reduce_corr = Conv3dCL(G, V, 1, bias=False) if (G and k == 1) else None
        if k == 1:
            # A 1x1x1 conv of [key, warped] is W_key key + W_vol warped: the key half is a 2D conv,
            # done once and broadcast over D, so the concatenated volume is never built.
            self.reduce_key = nn.Conv2d(C, V, 1, bias=False)
            self.reduce_vol = Conv3dCL(C, V, 1)
            self.reduce_post = nn.Sequential(norm_layer(3, V, cfg.norm), nn.ReLU(inplace=True))
        else:
            self.reduce_key = None
            self.reduce = nn.Sequential(ConvNormAct(3, 2 * C + G, V, k, 1, cfg.norm),
                                        ConvNormAct(3, V, V, k, 1, cfg.norm))
        self.fuse = ConvNormAct(3, cfg.views * V, V, 1, 1, cfg.norm) if cfg.fusion == "concat" else None
        self.matching = StackedHourglass(3, V, cfg.matching_hourglasses, cfg.matching_levels, cfg.hourglass_expand,
                                         cfg.norm)
        self.heads = nn.ModuleList(
            # No bias on the logits: the softmax over hypotheses is invariant to it (zero gradient).
            nn.Sequential(ConvNormAct(3, V, V, 3, 1, cfg.norm), Conv3dCL(V, 1, 3, padding=1, bias=False))
            for _ in range(cfg.matching_hourglasses)
        )
        self.temporal = TemporalFusion(V) if cfg.temporal_fusion else None
        self.normal_head = NormalHead(C, V, cfg.norm) if cfg.normals else None

    # Parameters a weights file may lack (`v2d.checkpoint.load_weights`): an absent temporal fusion
    # starts as the identity, so weights trained without it still compute what they did (a warning
    # says so); a trainer may also start the normal head untrained. PART_SWITCHES names the switch
    # of each part (for the messages); a part switched off ignores its weights in the file.
    OPTIONAL_PREFIXES: ClassVar[tuple[str, ...]] = ("temporal.",)
    FINE_TUNE_PREFIXES: ClassVar[tuple[str, ...]] = ("temporal.", "normal_head.")
    PART_SWITCHES: ClassVar[dict[str, str]] = {"temporal.": "depth.temporal_fusion", "normal_head.": "depth.normals"}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Shapes: images (B, 3, H, W) normalised -> (B, C, H/4, W/4)."""
        return self.encoder(images)

    def cost_volume(self, feats: torch.Tensor, poses_cw: torch.Tensor, intrinsics: torch.Tensor,
                    image_hw: tuple[int, int]) -> torch.Tensor:
        """Fused cost volume of the keyframe (frame 0) against frames 1..N-1.

        Shapes: feats (B, N, C, h, w); poses_cw (B, N, 7); intrinsics (B, 4) at image resolution
        `image_hw`. Returns (B, V, h, w, D), channels-last in memory.

        The depth axis is last: the 3x3x3 convolutions treat the three axes alike, and PyTorch's
        CPU heuristic sends a 3D convolution to oneDNN only when the product of its first four
        sizes (B * C * first spatial axis * second) is large, which (h, w) first satisfies at every
        hourglass level where (D, h) first does not (measured: the matching runs 2x faster).
        """
        B, N, C, h, w = feats.shape
        M = N - 1
        H, W = image_hw
        intr = scale_intrinsics(intrinsics.detach(), w / W, h / H)  # the kernel takes constant intrinsics
        rel = pose_to_rt(relative_pose(poses_cw[:, :1], poses_cw[:, 1:]))  # (B, M, 3, 4)
        depths = depth_hypotheses(self.cfg, feats)
        vol = ops.backproject_volume(
            feats[:, 1:].reshape(B * M, C, h, w).contiguous(),
            rel.reshape(B * M, 3, 4).to(feats.dtype).contiguous(),
            intr[:, None].expand(B, M, 4).reshape(B * M, 4).to(feats.dtype).contiguous(),
            depths,
        )  # (B*M, C, D, h, w)
        D = depths.shape[0]
        G = self.cfg.correlation_groups
        key_e = feats[:, :1].expand(B, M, C, h, w).reshape(B * M, C, 1, h, w)
        corr = (key_e * vol).view(B * M, G, C // G, D, h, w).mean(2) if G else None  # (B*M, G, D, h, w)
        if self.reduce_key is not None:
            # Pointwise reduction and view averaging in the kernel's (D, h, w) layout; only the fused
            # volume is moved to (h, w, D) (see the docstring).
            key = self.reduce_key(feats[:, 0])[:, None, :, None].expand(B, M, -1, 1, h, w)
            x = self.reduce_vol(vol) + key.reshape(B * M, -1, 1, h, w)
            if corr is not None:
                x = x + self.reduce_corr(corr)
            x = self.reduce_post(x).reshape(B, M, -1, D, h, w)
            x = x.mean(dim=1) if self.fuse is None else x.reshape(B, -1, D, h, w)
            x = x.permute(0, 1, 3, 4, 2)
            return x.contiguous(memory_format=torch.channels_last_3d) if self.fuse is None else self.fuse(x)
        parts = [key_e.expand(B * M, C, D, h, w), vol] + ([corr] if corr is not None else [])
        x = self.reduce(torch.cat(parts, dim=1).permute(0, 1, 3, 4, 2))  # (B*M, V, h, w, D)
        x = x.reshape(B, M, -1, h, w, D)
        if self.fuse is None:
            return x.mean(dim=1)
        return self.fuse(x.reshape(B, -1, h, w, D))

    def forward(self, feats: torch.Tensor, poses_cw: torch.Tensor, intrinsics: torch.Tensor,
                image_hw: tuple[int, int]) -> list[torch.Tensor]:
        """Depth of frame 0 given the features of all frames (frame 0 first) and their poses.

        Shapes: feats (B, N, C, h, w), N >= 2 (N - 1 = `views` for "concat" fusion);
        poses_cw (B, N, 7); intrinsics (B, 4) at image resolution `image_hw` = (H, W).
        Returns one depth map (B, H, W) per 3D hourglass, the last being the estimate.
        """
        return self.match(self.cost_volume(feats, poses_cw, intrinsics, image_hw), image_hw)

    def infer(self, feats: torch.Tensor, poses_cw: torch.Tensor, intrinsics: torch.Tensor,
              image_hw: tuple[int, int], previous: Previous | None = None) -> DepthResult:
        """`forward` with the optional parts: the previous keyframe's state fused into the cost
        volume (with `temporal_fusion`; without `previous` the volume is used as it is), the
        normals (with `normals`) and the state for the next keyframe.

        Shapes: as `forward`; `previous` as `Previous` with the same B, h, w, D.
        """
        vol = self.cost_volume(feats, poses_cw, intrinsics, image_hw)
        depths = depth_hypotheses(self.cfg, vol)
        if self.temporal is not None and previous is not None:
            h, w = vol.shape[2:4]
            H, W = image_hw
            intr = scale_intrinsics(intrinsics.detach(), w / W, h / H)
            rt = pose_to_rt(previous.key_to_prev.detach().to(vol.dtype))
            warped, valid = warp_volume(previous.state, rt, intr, depths, self.cfg.spacing)
            vol = self.temporal(vol, warped, valid)
        outs = self._matched(vol)  # (y, logits (B, h, w, D)) per hourglass
        preds = [self._depth(logits, depths, image_hw) for _, logits in outs]
        normals = None
        if self.normal_head is not None:
            y, logits = outs[-1]
            prob = logits.softmax(dim=-1)
            matched = torch.einsum("bvhwd,bhwd->bvhw", y, prob)
            log_depth = (prob * depths).sum(-1).clamp_min(1e-3).log()[:, None].detach()
            normals = self.normal_head(feats[:, 0], matched, log_depth, image_hw)
        state = outs[-1][0] if self.temporal is not None else None
        return DepthResult(preds, normals, state)

    def match(self, vol: torch.Tensor, image_hw: tuple[int, int]) -> list[torch.Tensor]:
        """The 3D matching and depth heads on a fused cost volume (`cost_volume`'s output).

        Shapes: vol (B, V, h, w, D) -> one depth map (B, H, W) per 3D hourglass, the last being the estimate.
        """
        depths = depth_hypotheses(self.cfg, vol)
        return [self._depth(logits, depths, image_hw) for _, logits in self._matched(vol)]

    def _matched(self, vol: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each 3D hourglass's output y (B, V, h, w, D) with its head's logits (B, h, w, D)."""
        return [(y, head(y)[:, 0]) for y, head in zip(self.matching(vol), self.heads, strict=True)]

    def _depth(self, logits: torch.Tensor, depths: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Soft-argmax depth (B, H, W) from per-hypothesis logits (B, h, w, D)."""
        logits = logits.permute(0, 3, 1, 2)  # (B, D, h, w)
        if self.cfg.upsample == "logits":
            logits = F.interpolate(logits, size=image_hw, mode="bilinear", align_corners=False)
        depth = (logits.softmax(dim=1) * depths[:, None, None]).sum(dim=1)
        if self.cfg.upsample == "depth":
            depth = F.interpolate(depth[:, None], size=image_hw, mode="bilinear", align_corners=False)[:, 0]
        return depth

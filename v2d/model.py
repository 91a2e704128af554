"""The V2D model: DeepV2D's alternation of motion updates and depth updates.

    model = V2D.from_config(cfg)          # cfg: v2d.config.V2DConfig
    out = model(frames, intrinsics)       # frames (N, 3, H, W) in [0, 1], keyframe first
    out.poses[-1], out.depths[-1][-1]     # final poses (N, 7) and keyframe depth (H, W)

Each round runs the motion module (poses from the current depth) and then the depth module
(depth from the new poses). The initial depth is a constant, or DeepV2D's trick: the depth module
run on the keyframe duplicated with identity poses (a cost volume with no parallax, so the network
falls back on single-image cues). In "global" motion mode every frame gets a depth map (each frame
is the keyframe of its own cost volume against the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from v2d.checkpoint import load_weights
from v2d.depth import DepthConfig, DepthModule
from v2d.errors import NumericalError, ShapeError
from v2d.geometry.camera import check_intrinsics
from v2d.motion import GNConfig, MotionConfig, MotionModule, MotionStep, edges
from v2d.ranges import POSITIVE, Ranges, at_least

__all__ = ["ModelConfig", "V2D", "V2DOutput", "normalize_images", "load_model", "SHIPPED_WEIGHTS"]

# The trained `small` weights that ship with v2d (docs/TRAINING.md says how they were made).
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "small.pt"

_MEAN, _STD = 0.45, 0.225  # image normalisation (inputs are RGB in [0, 1])


@dataclass(frozen=True)
class ModelConfig:
    """Settings of the alternation (the `model` section).

    Attributes:
        iters: rounds of (motion update, depth update) (the paper: 5).
        depth_init: "constant" or "network" (the depth module on the duplicated keyframe).
        init_depth: the constant initial depth (scene units) for depth_init = "constant".
        weights: "shipped" (the trained small model in v2d/weights/), "none" (random initialisation)
            or a path to a weights/checkpoint file; used by `load_model`.
    """

    iters: int = 5
    depth_init: Literal["constant", "network"] = "network"
    init_depth: float = 2.0
    weights: str = "shipped"

    RANGES: ClassVar[Ranges] = {"iters": at_least(1), "init_depth": POSITIVE}


@dataclass
class V2DOutput:
    """Per-round results.

    Shapes (unbatched input drops B): poses[r]: (B, N, 7) world->camera after round r;
    depths[r]: list of (B, K, H, W), one per 3D hourglass (last = estimate), K = 1 in keyframe
    mode (the keyframe) or N in global mode; intrinsics[r]: (B, 4); motion[r]: the round's
    MotionSteps (targets/weights for losses). init_depths: the initial depth maps (B, K, H, W).
    """

    poses: list[torch.Tensor] = field(default_factory=list)
    depths: list[list[torch.Tensor]] = field(default_factory=list)
    intrinsics: list[torch.Tensor] = field(default_factory=list)
    motion: list[list[MotionStep]] = field(default_factory=list)
    init_depths: torch.Tensor | None = None


def normalize_images(frames: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> zero-mean inputs of the networks. Shapes: (..., 3, H, W) -> same."""
    return (frames - _MEAN) / _STD


class V2D(nn.Module):
    """DeepV2D: depth module + motion module, alternated for `model.iters` rounds."""

    def __init__(self, depth: DepthConfig | None = None, motion: MotionConfig | None = None,
                 gn: GNConfig | None = None, model: ModelConfig | None = None) -> None:
        super().__init__()
        depth, motion = depth or DepthConfig(), motion or MotionConfig()
        gn, model = gn or GNConfig(), model or ModelConfig()
        self.cfg_depth, self.cfg_motion, self.cfg_gn, self.cfg_model = depth, motion, gn, model
        self.depth = DepthModule(depth)
        self.motion = MotionModule(motion, gn)

    @classmethod
    def from_config(cls, cfg) -> V2D:
        """Build from a `v2d.config.V2DConfig`."""
        return cls(cfg.depth, cfg.motion, cfg.gn, cfg.model)

    # ---------------------------------------------------------------- input checks
    def _check(self, frames, intrinsics, poses_cw, depth) -> tuple[bool, torch.Tensor, torch.Tensor]:
        if isinstance(frames, list | tuple):
            sizes = {tuple(f.shape) for f in frames}
            if len(sizes) > 1:
                raise ShapeError(f"frames: expected every frame of one size, got sizes {sorted(sizes)}")
            if not frames:
                raise ShapeError("frames: expected at least 2 frames, got 0")
            frames = torch.stack(list(frames))
        if not isinstance(frames, torch.Tensor) or frames.dim() not in (4, 5) or frames.shape[-3] != 3:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ShapeError(f"frames: expected (N, 3, H, W) or (B, N, 3, H, W) RGB, got {got}")
        if not frames.is_floating_point():
            raise ShapeError(f"frames: expected floats in [0, 1], got dtype {frames.dtype}")
        unbatched = frames.dim() == 4
        if unbatched:
            frames = frames[None]
        B, N, _, H, W = frames.shape
        if N < 2:
            raise ShapeError(f"frames: expected at least 2 frames, got {N}")
        if H % 4 or W % 4 or H < 32 or W < 32:
            raise ShapeError(f"frames: expected height and width multiples of 4 and >= 32, got {H}x{W}")
        if not bool(torch.isfinite(frames).all()):
            raise NumericalError("frames: NaN or Inf in the input images")
        if self.cfg_depth.fusion == "concat" and N - 1 != self.cfg_depth.views:
            raise ShapeError(f"frames: 'concat' fusion expects {self.cfg_depth.views + 1} frames, got {N}")
        if not isinstance(intrinsics, torch.Tensor) or intrinsics.shape not in ((4,), (B, 4)):
            got = tuple(intrinsics.shape) if isinstance(intrinsics, torch.Tensor) else type(intrinsics).__name__
            raise ShapeError(f"intrinsics: expected (4,) or (B, 4) = fx, fy, cx, cy, got {got}")
        intr = check_intrinsics(intrinsics).to(frames.dtype).expand(B, 4)
        if poses_cw is not None:
            p = poses_cw[None] if unbatched else poses_cw
            if not isinstance(p, torch.Tensor) or p.shape != (B, N, 7):
                raise ShapeError(f"poses_cw: expected {(N, 7) if unbatched else (B, N, 7)}, got "
                                 f"{tuple(poses_cw.shape)}")
            if not bool(torch.isfinite(p).all()):
                raise NumericalError("poses_cw: NaN or Inf in the initial poses")
        if depth is not None:
            K = N if self.cfg_motion.mode == "global" else 1
            want = (B, K, H, W)
            d = depth if depth.dim() == 4 else depth.reshape(B, K, H, W) if depth.numel() == B * K * H * W else None
            if d is None or d.shape != want:
                raise ShapeError(f"depth: expected {want} (or without the batch/view dims), got {tuple(depth.shape)}")
            if not bool(torch.isfinite(d).all() and (d > 0).all()):
                raise NumericalError("depth: expected finite positive initial depths")
        return unbatched, frames, intr

    # ---------------------------------------------------------------- forward
    def _depth_all(self, feats: torch.Tensor, poses: torch.Tensor, intr: torch.Tensor,
                   hw: tuple[int, int], keys: int) -> list[torch.Tensor]:
        """Depth of frames 0..keys-1, each as keyframe against all other frames.

        Shapes: feats (B, N, C, h, w); poses (B, N, 7); returns per hourglass (B, keys, H, W).
        """
        B, N = feats.shape[:2]
        outs = []
        for k in range(keys):
            order = [k] + [i for i in range(N) if i != k]
            outs.append(self.depth(feats[:, order], poses[:, order], intr, hw))
        return [torch.stack([o[s] for o in outs], dim=1) for s in range(len(outs[0]))]

    def forward(self, frames: torch.Tensor, intrinsics: torch.Tensor, poses_cw: torch.Tensor | None = None,
                depth: torch.Tensor | None = None, iters: int | None = None, optimize_focal: bool = False
                ) -> V2DOutput:
        """Alternate motion and depth updates.

        Shapes: frames (N, 3, H, W) or (B, N, 3, H, W) RGB in [0, 1], keyframe first (also a list
        of N (3, H, W) tensors); intrinsics (4,) or (B, 4) at image resolution; poses_cw (B, N, 7)
        optional initial world->camera poses; depth optional initial depth (B, K, H, W) (K = 1, or
        N in global mode). Returns V2DOutput (batch dimension dropped for unbatched input).

        The motion updates hold frame 0's pose fixed; with `optimize_focal` (an uncalibrated camera)
        they also optimise a shared focal length, starting from `intrinsics` (V2DOutput.intrinsics).
        """
        unbatched, frames, intr = self._check(frames, intrinsics, poses_cw, depth)
        if unbatched and poses_cw is not None:
            poses_cw = poses_cw[None]
        B, N, _, H, W = frames.shape
        iters = self.cfg_model.iters if iters is None else iters
        if iters < 1:
            raise ShapeError(f"iters: expected >= 1, got {iters}")
        global_mode = self.cfg_motion.mode == "global"
        K = N if global_mode else 1
        ii, jj = edges(N, self.cfg_motion.mode, frames.device)

        x = normalize_images(frames)
        flat = x.flatten(0, 1)
        dfeat = self.depth.features(flat).unflatten(0, (B, N))
        poses = self.motion.init_poses(x, None if poses_cw is None else poses_cw.to(x.dtype))

        out = V2DOutput()
        if depth is not None:
            cur = depth.reshape(B, K, H, W).to(x.dtype)
        elif self.cfg_model.depth_init == "constant":
            cur = x.new_full((B, K, H, W), self.cfg_model.init_depth)
        else:  # each depth map from its frame against copies of itself, identity poses
            identity = torch.zeros_like(poses)
            identity[..., 6] = 1.0
            cur = torch.stack([self.depth(dfeat[:, k : k + 1].expand_as(dfeat), identity, intr, (H, W))[-1]
                               for k in range(K)], dim=1)
        out.init_depths = cur

        dis = self.motion.dis_targets(frames, ii, jj)  # both flow sources start from DIS
        gn = self.cfg_gn.options(fixed_poses=1, optimize_focal=optimize_focal)
        for _ in range(iters):
            inv = (1.0 / cur.clamp_min(1e-3))[:, ii if global_mode else torch.zeros_like(ii)]
            steps = self.motion(frames, poses, inv, intr, ii, jj, dis, gn=gn)
            poses, intr = steps[-1].poses_cw, steps[-1].intrinsics
            depths = self._depth_all(dfeat, poses, intr, (H, W), K)
            cur = depths[-1]
            out.poses.append(poses)
            out.depths.append(depths)
            out.intrinsics.append(intr)
            out.motion.append(steps)

        if unbatched:
            out.poses = [p[0] for p in out.poses]
            out.depths = [[d[0] for d in ds] for ds in out.depths]
            out.intrinsics = [k[0] for k in out.intrinsics]
            out.init_depths = out.init_depths[0]
        return out


def load_model(cfg) -> V2D:
    """The model of a `v2d.config.V2DConfig` with the weights `cfg.model.weights` names, in eval mode.

    Raises InputError when the weights file is missing, corrupt or does not fit the configuration
    (e.g. shipped `small` weights with the `full` preset).
    """
    model = V2D.from_config(cfg)
    source = cfg.model.weights
    if source != "none":
        path = SHIPPED_WEIGHTS if source == "shipped" else Path(source)
        load_weights(path, model)
    return model.eval()

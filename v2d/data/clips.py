"""Training clips: a keyframe and its neighbours with depth, poses and intrinsics.

Every source of clips returns the same dict (the one interface of the data readers):

    images      (N, 3, H, W) float32 RGB in [0, 1], frame 0 the keyframe
    depths      (N, H, W) float32 metres, 0 where unknown
    poses_cw    (N, 7) float32 world->camera [tx, ty, tz, qx, qy, qz, qw]
    intrinsics  (4,) float32 fx, fy, cx, cy at (H, W)

`SyntheticClips` renders them on the fly with the project's renderer: clip k is drawn from scene
`seed + k`, so a run is reproducible from (seed, step) alone and resuming needs no loader state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from v2d.data.synthetic import default_intrinsics, make_scene, make_trajectory, render_views
from v2d.errors import ConfigError
from v2d.ranges import NON_NEGATIVE, Ranges, at_least, one_of

__all__ = ["ClipConfig", "SyntheticClips", "augment", "collate"]


@dataclass(frozen=True)
class ClipConfig:
    """How clips are cut (the `clips` section).

    Attributes:
        frames: frames per clip (keyframe + neighbours).
        stride: frames skipped between clip frames in the source sequence (the synthetic camera
            moves at 30 fps like a hand-held one; stride 3 gives 5-15 cm between clip frames).
        keyframe: "first" (frame 0) or "middle" (the centre frame, moved to index 0, as DeepV2D).
        flip: randomly mirror clips left-right (intrinsics and poses adjusted).
        jitter: colour jitter amplitude (brightness/contrast/per-channel gain), 0 = off.
    """

    frames: int = 5
    stride: int = 3
    keyframe: str = "middle"
    flip: bool = True
    jitter: float = 0.1

    RANGES: ClassVar[Ranges] = {
        "frames": at_least(2),
        "stride": at_least(1),
        "keyframe": one_of("first", "middle"),
        "jitter": NON_NEGATIVE,
    }


class SyntheticClips(torch.utils.data.Dataset):
    """Clips rendered from procedural scenes; item k comes from scene `seed + k` (deterministic)."""

    def __init__(self, cfg: ClipConfig, height: int, width: int, seed: int = 0, length: int = 10**9) -> None:
        if cfg.frames < 2:
            raise ConfigError(f"clips.frames: expected >= 2, got {cfg.frames}")
        if cfg.keyframe not in ("first", "middle"):
            raise ConfigError(f"clips.keyframe: expected 'first' or 'middle', got {cfg.keyframe!r}")
        self.cfg, self.height, self.width, self.seed, self.length = cfg, height, width, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.clip(k)

    def clip(self, k: int, flip: bool | None = None) -> dict[str, torch.Tensor]:
        """Clip k; `flip` forces the mirroring on or off (None: random when `cfg.flip`)."""
        cfg = self.cfg
        seed = self.seed + int(k)
        rng = np.random.default_rng([seed, 7])
        scene = make_scene(seed)
        span = (cfg.frames - 1) * cfg.stride + 1
        start = int(rng.integers(0, 60))
        poses = make_trajectory(scene, seed, start + span)[start::cfg.stride][: cfg.frames]
        order = list(range(cfg.frames))
        if cfg.keyframe == "middle":
            mid = cfg.frames // 2
            order = [mid] + [i for i in order if i != mid]
        poses = poses[order]
        intr = default_intrinsics(self.height, self.width)
        images, depths = render_views(scene, poses, intr, self.height, self.width)
        img = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        dep = torch.from_numpy(depths).float()
        poses, intr = poses.float(), intr.float()
        clip = {"images": img, "depths": dep, "poses_cw": poses, "intrinsics": intr}
        return augment(clip, cfg, rng, flip)


def augment(clip: dict[str, torch.Tensor], cfg: ClipConfig, rng: np.random.Generator, flip: bool | None = None
            ) -> dict[str, torch.Tensor]:
    """Random left-right mirroring (`cfg.flip`; `flip` forces it) and colour jitter (`cfg.jitter`).

    Mirroring flips images and depths, moves cx to W - 1 - cx and conjugates every pose by
    S = diag(-1, 1, 1) (x -> -x in the world and in every camera): t -> S t and, for the rotation,
    (qx, qy, qz, qw) -> (qx, -qy, -qz, qw). Geometry stays consistent (tested by reprojection).
    """
    img, dep, poses, intr = clip["images"], clip["depths"], clip["poses_cw"], clip["intrinsics"]
    coin = rng.random() < 0.5
    if (cfg.flip and coin) if flip is None else flip:
        W = img.shape[-1]
        img, dep = img.flip(-1), dep.flip(-1)
        intr = torch.stack([intr[0], intr[1], W - 1 - intr[2], intr[3]])
        poses = poses.clone()
        poses[:, [0, 4, 5]] = -poses[:, [0, 4, 5]]
    if cfg.jitter > 0:
        a = cfg.jitter
        gain = 1 + a * (2 * torch.from_numpy(rng.random(3)).to(img.dtype) - 1)
        bright = a * (2 * float(rng.random()) - 1)
        img = (img * gain[None, :, None, None] + bright).clamp(0, 1)
    return {"images": img, "depths": dep, "poses_cw": poses, "intrinsics": intr}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack clips into a batch: every field gets a leading B."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}

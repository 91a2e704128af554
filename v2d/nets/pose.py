"""DeepV2D's optional pose-regression network (the motion module's `pose_init: regress`)."""

from __future__ import annotations

import torch
from torch import nn

from v2d.nets.blocks import ConvNormAct

__all__ = ["PoseRegressor"]


class PoseRegressor(nn.Module):
    """DeepV2D's pose initialisation: a strided CNN on [keyframe, frame] regressing a twist.

    The output twist xi = [translation, rotation] is scaled by `scale` (small initial motions) and
    the head starts near zero, so the untrained network predicts almost the identity.

    Shapes: key, frame: (B, 3, H, W) normalised images -> xi (B, 6).
    """

    def __init__(self, channels: int = 32, stages: int = 5, scale: float = 0.01, norm: str = "group") -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvNormAct(2, 6, channels, 7, 2, norm)]
        c = channels
        for _ in range(stages - 1):
            layers.append(ConvNormAct(2, c, min(2 * c, 256), 3, 2, norm))
            c = min(2 * c, 256)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 6)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)
        self.scale = scale

    def forward(self, key: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.cat([key, frame], dim=1))
        return self.scale * self.head(x.mean(dim=(-2, -1)))

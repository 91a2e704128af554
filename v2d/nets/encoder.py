"""Image encoders: DeepV2D's stem (7x7 stride-2 conv, residual blocks, stride-2 stage) and the
depth module's feature network (the stem followed by stacked 2D hourglasses and a 1x1 head)."""

from __future__ import annotations

import torch
from torch import nn

from v2d.nets.blocks import ConvNormAct, ResidualBlock, StackedHourglass

__all__ = ["Stem", "FeatureEncoder"]


class Stem(nn.Module):
    """7x7 stride-2 conv to `c1` channels, `blocks` residual blocks, a stride-2 stage to `c2` channels.

    Shapes: (B, 3, H, W) -> (B, c2, H/4, W/4).
    """

    def __init__(self, c1: int = 32, c2: int = 64, blocks: int = 2, norm: str = "group") -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvNormAct(2, 3, c1, kernel=7, stride=2, norm=norm)]
        layers += [ResidualBlock(2, c1, c1, norm=norm) for _ in range(blocks)]
        layers += [ResidualBlock(2, c1, c2, stride=2, norm=norm)]
        layers += [ResidualBlock(2, c2, c2, norm=norm) for _ in range(blocks - 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class FeatureEncoder(nn.Module):
    """Stem, `stacks` 2D hourglasses of `levels` levels, 1x1 conv to `out_channels` (1/4 resolution).

    Shapes: (B, 3, H, W) -> (B, out_channels, H/4, W/4); H/4 and W/4 divisible by 2**levels.
    """

    def __init__(self, c1: int = 32, c2: int = 64, out_channels: int = 32, stacks: int = 2, levels: int = 4,
                 expand: int = 32, norm: str = "group") -> None:
        super().__init__()
        self.stem = Stem(c1, c2, norm=norm)
        self.hourglass = StackedHourglass(2, c2, stacks, levels, expand, norm) if stacks > 0 else None
        self.head = nn.Conv2d(c2, out_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        if self.hourglass is not None:
            x = self.hourglass(x)[-1]
        return self.head(x)

"""The motion module's flow network: a small 2D U-Net, and DeepV2D's optional pose-regression net."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v2d.nets.blocks import ConvNormAct, ResidualBlock

__all__ = ["FlowUNet", "PoseRegressor"]


class FlowUNet(nn.Module):
    """U-Net over `levels` scales predicting residual flow and confidence logits.

    Widths double per level from `channels`; the decoder upsamples (bilinear) and adds the encoder
    skip at each scale. Any spatial size works (upsampling goes to the skip's size). The head starts
    near zero (std 1e-3, not exactly zero so that gradients reach the layers below it), so an
    untrained network predicts almost no flow and confidence 0.5.

    Shapes: (B, c_in, h, w) -> (B, 4, h, w) = [flow_u, flow_v, conf_logit_u, conf_logit_v].
    """

    def __init__(self, c_in: int, channels: int = 32, levels: int = 3, norm: str = "group") -> None:
        super().__init__()
        widths = [channels * 2**k for k in range(levels)]
        self.inp = ConvNormAct(2, c_in, widths[0], 3, 1, norm)
        self.down = nn.ModuleList(ResidualBlock(2, widths[k - 1], widths[k], 2, norm) for k in range(1, levels))
        self.mid = ResidualBlock(2, widths[-1], widths[-1], 1, norm)
        self.up = nn.ModuleList(ConvNormAct(2, widths[k], widths[k - 1], 3, 1, norm) for k in range(levels - 1, 0, -1))
        self.head = nn.Conv2d(widths[0], 4, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inp(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.mid(skips.pop())
        for up in self.up:
            skip = skips.pop()
            y = skip + up(F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False))
        return self.head(y)


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

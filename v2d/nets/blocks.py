"""Residual blocks and stacked-hourglass modules in 2D and 3D (DeepV2D's building blocks).

An hourglass (Newell et al., 2016) pools down `levels` times, processes at each scale, and adds
the upsampled result back onto a skip branch at every scale, so its output has the input's shape.
DeepV2D uses 2D hourglasses for image features and 3D hourglasses over (depth, height, width) to
match its cost volume. Channel widths grow by `expand` per level, as in the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv3dCL", "ConvNormAct", "ResidualBlock", "Hourglass", "StackedHourglass", "norm_layer"]


class Conv3dCL(nn.Conv3d):
    """Conv3d that runs on channels-last input (converted if needed).

    On CPU, PyTorch picks oneDNN for channels-last 3D convolutions and a much slower generic path
    for many contiguous ones (measured 2-8x here); normalisation layers return contiguous tensors,
    so the conversion is done at each convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last_3d))


def _conv(dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: Conv3dCL}[dims]


def norm_layer(dims: int, channels: int, norm: str) -> nn.Module:
    """The normalisation of `channels` channels in 2D or 3D: "none" (identity), "group" (GroupNorm with
    min(8, channels // 4) groups, at least 1) or "batch" (BatchNorm2d/3d); ValueError otherwise.

    Shapes: (B, channels, *S) -> same, S = (H, W) or (D, H, W).
    """
    if norm == "none":
        return nn.Identity()
    if norm == "group":
        return nn.GroupNorm(max(1, min(8, channels // 4)), channels)
    if norm == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)
    raise ValueError(f"norm: expected 'none', 'group' or 'batch', got {norm!r}")


class ConvNormAct(nn.Sequential):
    """Convolution, normalisation, ReLU.

    Shapes: (B, C_in, *S) -> (B, C_out, *S / stride) with S = (H, W) or (D, H, W).
    """

    def __init__(
        self, dims: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, norm: str = "group", act: bool = True
    ) -> None:
        layers = [
            _conv(dims)(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none"),
            norm_layer(dims, c_out, norm),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (projected when the shape changes).

    Shapes: (B, C_in, *S) -> (B, C_out, *S / stride).
    """

    def __init__(self, dims: int, c_in: int, c_out: int, stride: int = 1, norm: str = "group") -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(dims, c_in, c_out, 3, stride, norm),
            ConvNormAct(dims, c_out, c_out, 3, 1, norm, act=False),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else ConvNormAct(dims, c_in, c_out, 1, stride, norm, act=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Hourglass(nn.Module):
    """One hourglass of `levels` levels (recursive); output shape equals input shape.

    Any spatial size works: stride-2 convolutions round up and the upsampling returns to the skip's
    size (sizes divisible by 2**levels keep every level aligned).

    Shapes: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, dims: int, channels: int, levels: int = 4, expand: int = 32, norm: str = "group") -> None:
        super().__init__()
        inner = channels + expand
        self.skip = ResidualBlock(dims, channels, channels, norm=norm)
        self.down = ResidualBlock(dims, channels, inner, stride=2, norm=norm)
        self.inner = (
            Hourglass(dims, inner, levels - 1, expand, norm)
            if levels > 1
            else ResidualBlock(dims, inner, inner, norm=norm)
        )
        self.up = ConvNormAct(dims, inner, channels, 3, 1, norm)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.up(self.inner(self.down(x)))
        return self.skip(x) + F.interpolate(low, size=x.shape[2:], mode="nearest")


class StackedHourglass(nn.Module):
    """`stacks` hourglasses in sequence; returns every hourglass's output (for deep supervision).

    Shapes: (B, C, *S) -> list of `stacks` tensors (B, C, *S).
    """

    def __init__(
        self, dims: int, channels: int, stacks: int = 2, levels: int = 4, expand: int = 32, norm: str = "group"
    ) -> None:
        super().__init__()
        self.hourglasses = nn.ModuleList(Hourglass(dims, channels, levels, expand, norm) for _ in range(stacks))
        self.merges = nn.ModuleList(ConvNormAct(dims, channels, channels, 1, 1, norm) for _ in range(stacks - 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for k, hg in enumerate(self.hourglasses):
            y = hg(x)
            outputs.append(y)
            if k < len(self.merges):
                x = x + self.merges[k](y)
        return outputs

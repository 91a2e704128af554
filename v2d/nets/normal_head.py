"""The depth module's normal head (Normal-Assisted Stereo).

NAS predicts surface normals from the matching volume together with depth and ties the two with a
depth-normal consistency loss (`v2d.losses.normal_loss`), which makes planar surfaces come out
flatter. Here the head reads, at 1/4 resolution, the keyframe's 2D features, the last 3D
hourglass's output averaged over the hypotheses under the depth softmax (the matched features at
the estimated depth) and the estimated log depth (detached), and gives a unit normal per pixel in
the camera frame (x right, y down, z forward; toward the camera), upsampled bilinearly to the
image size. The matched features and the softmax are not detached: the normal supervision also
shapes the 3D matching (NAS's point: normals make the matching see surfaces), and the depth learns
from the normals through the consistency loss as well. With the rest of the module frozen
(`train.frozen`) the head learns alone and the depth stays exactly as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v2d.nets.blocks import ConvNormAct

__all__ = ["NormalHead"]


class NormalHead(nn.Module):
    """Shapes: key_feats (B, C, h, w), matched (B, V, h, w), log_depth (B, 1, h, w) -> (B, 3, H, W) unit.

    The last layer's bias starts at (0, 0, -1): an untrained head says "facing the camera".
    """

    def __init__(self, feature_channels: int, volume_channels: int, norm: str, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            ConvNormAct(2, feature_channels + volume_channels + 1, hidden, 3, 1, norm),
            ConvNormAct(2, hidden, hidden, 3, 1, norm),
            nn.Conv2d(hidden, 3, 1),
        )
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.copy_(torch.tensor([0.0, 0.0, -1.0]))

    def forward(self, key_feats: torch.Tensor, matched: torch.Tensor, log_depth: torch.Tensor,
                image_hw: tuple[int, int]) -> torch.Tensor:
        n = self.net(torch.cat([key_feats, matched, log_depth], dim=1))
        n = F.interpolate(n, size=image_hw, mode="bilinear", align_corners=False)
        return F.normalize(n, dim=1, eps=1e-6)

"""Temporal fusion of the depth module's matching state across keyframes (EST-style).

Epipolar Spatio-Temporal networks carry a cost volume from one reference frame to the next, warped
by the camera motion. Here the carried state is the last 3D hourglass's output of the previous
keyframe (B, V, h, w, D): each voxel of the new keyframe's volume (pixel, depth hypothesis) is a 3D
point, which is moved into the previous keyframe's camera and looked up there (trilinearly over
pixel and hypothesis, `warp_volume`); `TemporalFusion` then adds a gated update of the warped state
to the new cost volume before the 3D matching. The update's last layer starts at zero, so a module
with fusion on computes exactly what it computes without it until it is trained (fine-tuning from
weights trained without it can only start where they are).

The lookups are pointwise (1x1x1): the hourglass output already has a wide receptive field, and a
3x3x3 update would cost about as much as one of the matching's convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v2d.geometry.camera import pixel_rays
from v2d.nets.blocks import Conv3dCL

__all__ = ["TemporalFusion", "warp_volume"]


def warp_volume(state: torch.Tensor, key_to_prev: torch.Tensor, intrinsics: torch.Tensor, depths: torch.Tensor,
                spacing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous keyframe's volume seen from the new keyframe's voxels.

    Voxel (v, u, k) of the new keyframe is the point depths[k] * K^-1 [u, v, 1]; `key_to_prev` =
    [R | t] moves it into the previous keyframe's camera, where it falls at pixel (u', v') and depth
    z'. The state is sampled there, trilinearly over (v', u', hypothesis index of z'); the index
    follows the hypotheses' spacing ("depth": linear in depth, "inverse": linear in inverse depth).
    Voxels that land outside the previous volume (behind its camera, off its image, outside its
    depth range) get 0 and valid False.

    Shapes: state (B, V, h, w, D); key_to_prev (B, 3, 4); intrinsics (B, 4) at (h, w); depths (D,)
    increasing. Returns warped (B, V, h, w, D) and valid (B, 1, h, w, D).
    """
    B, _, h, w, D = state.shape
    rays = pixel_rays(intrinsics.to(state.dtype), h, w)  # (B, h, w, 3)
    R, t = key_to_prev[..., :3].to(state.dtype), key_to_prev[..., 3].to(state.dtype)
    rr = torch.einsum("bij,bhwj->bhwi", R, rays)  # (B, h, w, 3): R applied to each ray
    pts = rr[..., None, :] * depths.to(state.dtype)[:, None] + t[:, None, None, None]  # (B, h, w, D, 3)
    z = pts[..., 2]
    zs = z.clamp_min(1e-6)
    fx, fy, cx, cy = (c[:, None, None, None].to(state.dtype) for c in intrinsics.unbind(-1))
    u = fx * pts[..., 0] / zs + cx
    v = fy * pts[..., 1] / zs + cy
    lo, hi = float(depths[0]), float(depths[-1])
    if spacing == "depth":
        idx = (z - lo) / (hi - lo) * (D - 1)
    else:  # hypothesis k has inverse depth 1/hi + (D-1-k) (1/lo - 1/hi) / (D-1)
        idx = (D - 1) - (1.0 / zs - 1.0 / hi) / (1.0 / lo - 1.0 / hi) * (D - 1)
    valid = (z > 0) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1) & (idx >= 0) & (idx <= D - 1)
    # grid_sample on (B, V, h, w, D) read as (N, C, D_in, H_in, W_in): grid (x, y, z) indexes (D, w, h).
    grid = torch.stack([idx / (D - 1), u / (w - 1), v / (h - 1)], dim=-1) * 2 - 1
    grid = torch.where(valid[..., None], grid, torch.full_like(grid, -2.0))
    warped = F.grid_sample(state, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return warped, valid[:, None]


class TemporalFusion(nn.Module):
    """Gated update of a cost volume with the warped previous state: vol + g * update([state, valid]).

    The gate g = sigmoid(W_g [vol, state, valid]) says where to trust the past; the update's weights
    start at zero (identity at initialisation).

    Shapes: vol, warped (B, V, h, w, D); valid (B, 1, h, w, D) bool -> (B, V, h, w, D).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        V = channels
        self.gate = Conv3dCL(2 * V + 1, V, 1)
        self.update = Conv3dCL(V + 1, V, 1)
        nn.init.zeros_(self.update.weight)
        nn.init.zeros_(self.update.bias)

    def forward(self, vol: torch.Tensor, warped: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        m = valid.to(vol.dtype)
        warped = warped * m
        gate = torch.sigmoid(self.gate(torch.cat([vol, warped, m], dim=1)))
        return vol + gate * self.update(torch.cat([warped, m], dim=1)) * m

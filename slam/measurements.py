"""What tracker and mapper both build from images, depth and poses: network inputs, predicted flow and
motion, and the image tests of the run (the Gauss-Newton measurements themselves, robust weights
and strided problems, are `v2d.refiner`'s).
"""

from __future__ import annotations

import numpy as np
import torch

from v2d.geometry.camera import backproject, pixel_grid, project, reproject
from v2d.geometry.lie import se3_act

__all__ = ["images_to_tensor", "induced_motion", "predicted_flow", "texture"]


def images_to_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """K x (H, W, 3) uint8 -> (K, 3, H, W) float32 in [0, 1] on `device`."""
    return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def texture(image: np.ndarray) -> float:
    """Mean absolute grey-level gradient per pixel (Sobel, normalised to grey levels per pixel)."""
    import cv2

    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.mean(np.abs(gx) + np.abs(gy)) / 8.0)


def predicted_flow(inv_depth: torch.Tensor, pose_i: torch.Tensor, pose_j: torch.Tensor, intrinsics: torch.Tensor,
                   min_depth: float) -> np.ndarray:
    """The flow from frame i to frame j that i's inverse depth and the two poses predict (the guess a
    guided DIS search starts from: `v2d.flow.dis_flow(init=...)`); 0 where the point falls behind
    camera j or is not finite.

    Shapes: inv_depth (H, W); pose_i, pose_j (7,) world->camera; intrinsics (4,) -> (H, W, 2) float32.
    """
    coords, depth_j = reproject(inv_depth, pose_i, pose_j, intrinsics)
    ok = (depth_j > min_depth) & torch.isfinite(coords).all(-1)
    grid = pixel_grid(*coords.shape[:2], dtype=coords.dtype, device=coords.device)
    return torch.where(ok[..., None], coords - grid, torch.zeros_like(coords)).float().cpu().numpy()


def induced_motion(depth: torch.Tensor, rel: torch.Tensor, intrinsics: torch.Tensor, min_depth: float, stride: int = 4
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """How far a keyframe's pixels move, and how many stay in view, under relative poses: the mean
    flow (px, over the pixels that stay in front) and the overlap (fraction of pixels in front and
    inside the image), estimated on every `stride`-th pixel (a mean needs no full resolution).

    Shapes: depth (H, W); rel (M, 7) = T_other T_keyframe^-1; intrinsics (4,) -> flow (M,) float32
    (inf where no point stays in front), overlap (M,) float32.
    """
    s = stride  # pixel (i, j) of the strided grid is (s i, s j), so fx/s, cx/s
    intr = intrinsics.float() / s
    d = depth[::s, ::s].float().clamp_min(1e-3)
    h, w = d.shape
    q = se3_act(rel.float()[..., None, None, :], backproject(d, intr))  # (M, h, w, 3)
    ok = q[..., 2] > min_depth
    uv = project(q, intr)
    dist = (uv - pixel_grid(h, w, dtype=d.dtype, device=d.device)).norm(dim=-1)
    n = ok.sum((-2, -1))
    mean = torch.where(ok, dist, torch.zeros_like(dist)).sum((-2, -1)) / n.clamp_min(1)
    inside = ok & (uv[..., 0] >= -0.5) & (uv[..., 0] <= w - 0.5) & (uv[..., 1] >= -0.5) & (uv[..., 1] <= h - 0.5)
    flow = torch.where(n > 0, mean * s, torch.full_like(mean, float("inf")))
    return flow, inside.float().mean((-2, -1))

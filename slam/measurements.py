"""What tracker and mapper both build from images and flow: network inputs and Gauss-Newton
measurements (robust weights, strided problems), and the image tests of the run.
"""

from __future__ import annotations

import numpy as np
import torch

from v2d.geometry import cauchy_weight
from v2d.geometry.camera import backproject, pixel_grid, project, reproject, valid_reprojection
from v2d.geometry.lie import se3_act
from v2d.model import V2D, normalize_images

__all__ = ["images_to_tensor", "induced_motion", "motion_features", "predicted_flow", "robust_weights", "subsample",
           "texture"]


def images_to_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """K x (H, W, 3) uint8 -> (K, 3, H, W) float32 in [0, 1] on `device`."""
    return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def motion_features(model: V2D, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """Learned-flow features of one image. Shapes: (H, W, 3) uint8 -> (F, H/4, W/4)."""
    return model.motion.features(normalize_images(images_to_tensor([image], device)))[0]


def texture(image: np.ndarray) -> float:
    """Mean absolute grey-level gradient per pixel (Sobel, normalised to grey levels per pixel)."""
    import cv2

    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.mean(np.abs(gx) + np.abs(gy)) / 8.0)


def robust_weights(targets: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, poses: torch.Tensor,
                   ii: torch.Tensor, jj: torch.Tensor, intrinsics: torch.Tensor, scale: float, min_depth: float
                   ) -> torch.Tensor:
    """Weights times a Cauchy factor 1 / (1 + (r / scale)^2) of each target's reprojection residual r.

    DIS flow has no learned confidence; its forward-backward check passes consistent but wrong
    matches (repeated texture, large displacements), which pull a least-squares solution away.
    Reprojections that are not valid get weight 0.

    Shapes: targets, weights (E, H, W, 2); inv (E, H, W); poses (N, 7) float32; ii, jj (E,);
    intrinsics (4,) -> (E, H, W, 2).
    """
    coords, depth_j = reproject(inv, poses[ii], poses[jj], intrinsics)
    valid = valid_reprojection(inv, coords, depth_j, min_depth)
    factor = cauchy_weight(((targets - coords) ** 2).sum(-1), scale) * valid
    return weights * factor[..., None]


def subsample(targets: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, intrinsics: torch.Tensor,
              stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every `stride`-th source pixel of flow targets, as a least-squares problem of its own.

    Pixel (i, j) of the strided grid is pixel (s i, s j) of the full one, so the intrinsics become
    (fx, fy, cx, cy) / s and the target coordinates are divided by s: the Gauss-Newton layer then
    solves the same problem on s^2 times fewer pixels (DIS flow, computed at full resolution, is
    smooth at that scale). Poses are unchanged; a focal length it returns is multiplied by s.

    Shapes: targets, weights (..., H, W, 2); inv (..., H, W); intrinsics (..., 4) ->
    (..., h, w, 2), (..., h, w, 2), (..., h, w), (..., 4) with h = ceil(H / s), w = ceil(W / s).
    """
    if stride == 1:
        return targets, weights, inv, intrinsics
    s = stride
    return (targets[..., ::s, ::s, :] / s, weights[..., ::s, ::s, :], inv[..., ::s, ::s], intrinsics / s)


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

"""Classical dense optical flow (OpenCV DIS) as Gauss-Newton targets.

The learned motion module predicts target coordinates and confidences; this module produces the
same two tensors from OpenCV's DIS optical flow with a forward-backward consistency check, so the
Gauss-Newton layer can run with no trained weights (and serves as the baseline the learned flow
must beat). OpenCV's DIS is a well-kept, fast CPU implementation: we do not write our own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from v2d.errors import ShapeError
from v2d.ranges import POSITIVE, Ranges

__all__ = ["DISOptions", "dis_flow", "dis_targets", "fb_targets"]


@dataclass(frozen=True)
class DISOptions:
    """Attributes:
    preset: OpenCV DIS preset (speed/accuracy trade-off).
    fb_sigma: forward-backward error (pixels) at which the confidence falls to exp(-1/2).
    fb_max: forward-backward error (pixels) beyond which the confidence is 0.
    """

    preset: Literal["ultrafast", "fast", "medium"] = "medium"
    fb_sigma: float = 1.0
    fb_max: float = 3.0

    RANGES: ClassVar[Ranges] = {"fb_sigma": POSITIVE, "fb_max": POSITIVE}


_PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}  # cv2.DISOPTICAL_FLOW_PRESET_* values


def _gray(image: np.ndarray, name: str) -> np.ndarray:
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ShapeError(f"{name}: expected a uint8 image (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def dis_flow(image0: np.ndarray, image1: np.ndarray, preset: str = "medium", init: np.ndarray | None = None,
             finest_scale: int | None = None) -> np.ndarray:
    """Dense flow from image0 to image1: pixel x of image0 moves to x + flow[x] in image1.

    `init` guides the search: DIS starts its coarsest level from it (downsampled) instead of zero
    flow and refines it level by level, so a good guess of a large displacement (e.g. the flow a
    pose and depth predict) is found where an unguided search of the pyramid gives up. Median
    end-point error at 120x160 on pairs 20-33 deg apart (synthetic, the guess from a pose 1.5 deg
    and 4 cm off and depth 5 % off): 37-40 px unguided, 0.8-2.0 px guided (the guess alone: 2.7-4.2
    px). `finest_scale` overrides the preset's finest pyramid level (0: full resolution; the
    presets stop at half the image size).

    Shapes: image0, image1: (H, W, 3) RGB or (H, W) uint8; init (H, W, 2) float32 or None ->
    flow (H, W, 2) float32 (du, dv).
    """
    import cv2

    g0, g1 = _gray(image0, "image0"), _gray(image1, "image1")
    if g0.shape != g1.shape:
        raise ShapeError(f"image1: expected the size of image0 {g0.shape}, got {g1.shape}")
    dis = cv2.DISOpticalFlow_create(_PRESETS[preset])
    if finest_scale is not None:
        dis.setFinestScale(finest_scale)
    if init is None:
        return dis.calc(g0, g1, None)
    if init.shape != (*g0.shape, 2):
        raise ShapeError(f"init: expected a flow {(*g0.shape, 2)}, got {init.shape}")
    flow = np.ascontiguousarray(np.nan_to_num(init, nan=0.0, posinf=0.0, neginf=0.0), dtype=np.float32)
    return dis.calc(g0, g1, flow)  # a flow of the right size and type passed in is DIS's initial guess


def dis_targets(
    keyframe: np.ndarray, frame: np.ndarray, opts: DISOptions = DISOptions()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target coordinates of the keyframe's pixels in `frame`, with forward-backward confidence.

    Computes both flows (`dis_flow`) and combines them with `fb_targets`; callers that meet the
    same image pair in both directions cache the two flows and call `fb_targets` themselves.

    Shapes: keyframe, frame: (H, W, 3) uint8 -> targets (H, W, 2) float32 pixel coordinates
    (u, v) in `frame`, weights (H, W, 2) float32 in [0, 1] (the same for u and v).
    """
    return fb_targets(dis_flow(keyframe, frame, opts.preset), dis_flow(frame, keyframe, opts.preset), opts)


def fb_targets(fwd: np.ndarray, bwd: np.ndarray, opts: DISOptions = DISOptions()
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and forward-backward confidences from the flow a -> b (`fwd`) and b -> a (`bwd`).

    The confidence is exp(-e^2 / (2 sigma^2)) of the forward-backward error e, zero beyond
    `fb_max` and where the target leaves the image.

    Shapes: fwd, bwd (H, W, 2) float32 -> targets (H, W, 2) float32 pixel coordinates (u, v) in
    image b, weights (H, W, 2) float32 in [0, 1] (the same for u and v).
    """
    import cv2

    if fwd.shape != bwd.shape or fwd.ndim != 3 or fwd.shape[2] != 2:
        raise ShapeError(f"fwd, bwd: expected two flows (H, W, 2) of one size, got {fwd.shape} and {bwd.shape}")
    H, W = fwd.shape[:2]
    u, v = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    tu, tv = u + fwd[..., 0], v + fwd[..., 1]
    back = cv2.remap(bwd, tu, tv, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    err = np.linalg.norm(fwd + back, axis=-1)
    conf = np.exp(-0.5 * (err / opts.fb_sigma) ** 2)
    inside = (tu >= 0) & (tu <= W - 1) & (tv >= 0) & (tv <= H - 1)
    conf = np.where(inside & (err < opts.fb_max), conf, 0.0).astype(np.float32)
    targets = torch.from_numpy(np.stack([tu, tv], axis=-1))
    weights = torch.from_numpy(np.repeat(conf[..., None], 2, axis=-1))
    return targets, weights

"""Sparse registration of a frame against keyframes: the classical fallback of tracking, relocalisation
after a loss, and loop detection.

    index = KeyframeIndex(cfg, (H, W))
    index.add(kid, image)                                      # every new keyframe
    reg = index.register(image, [map.keyframe(k) for k in kids], kids, map.intrinsics)
    similar = index.similar(image, exclude=recent, count=3)     # keyframes that look alike

Dense tracking (DIS flow + Gauss-Newton) is accurate while consecutive views overlap well; after a
fast turn, motion blur or a hand over the lens it has nothing to start from. Sparse features do:
ORB keypoints (OpenCV) of the frame are matched to a keyframe's (brute force, Hamming, Lowe's ratio
test), lifted to 3-D with the keyframe's depth (the full map in the window, the strided copy after),
and the frame's pose relative to the keyframe is found by PnP-RANSAC (OpenCV), refined on the inliers
(Levenberg-Marquardt). A registration counts when at least `slam.reloc_min_inliers` matches agree
within `slam.reloc_reprojection` px and they are at least `slam.reloc_min_inlier_ratio` of the matches.

Which keyframes to try besides the recent ones comes from appearance: each keyframe keeps a global
descriptor (a 32x24 grey thumbnail, blurred, zero-mean and unit-norm, so brightness and contrast
changes do not matter; a tiny-image descriptor), compared by cosine similarity. It is cheap (a dot
product per keyframe) and the geometric check rejects the look-alikes it lets through.

The index owns its features (per keyframe id); the keyframes themselves (pose, depth) are the map's
and are passed in by the caller.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from slam.config import RunConfig
from slam.map import Keyframe
from v2d.geometry.lie import matrix_to_quat

__all__ = ["KeyframeIndex", "Registration", "global_descriptor"]

_THUMB = (32, 24)  # (width, height) of the global descriptor's thumbnail


@dataclass(frozen=True)
class Registration:
    """A frame registered against keyframe `kid`.

    Shapes: rel_cw (7,) float64 = T_frame T_keyframe^-1 (at the keyframe's scale: the points are
    its depth).
    """

    kid: int
    rel_cw: torch.Tensor
    inliers: int
    matches: int
    reprojection_px: float  # RMS over the inliers
    pixels: np.ndarray  # (M, 2) the inliers' pixel coordinates in the frame
    points: np.ndarray  # (M, 3) the inliers' points in the frame's camera (the keyframe's scale)


@dataclass(frozen=True)
class _Features:
    keypoints: np.ndarray  # (P, 2) float32 pixel coordinates
    descriptors: np.ndarray  # (P, 32) uint8 ORB
    thumb: np.ndarray  # (24 * 32,) float32 unit norm


def global_descriptor(image: np.ndarray) -> np.ndarray:
    """The appearance descriptor of an image: a blurred grey thumbnail, zero mean, unit norm.

    Shapes: (H, W, 3) uint8 -> (768,) float32.
    """
    import cv2

    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    t = cv2.resize(g, _THUMB, interpolation=cv2.INTER_AREA).astype(np.float32)
    t = cv2.GaussianBlur(t, (3, 3), 0).ravel()
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-6)


class KeyframeIndex:
    """ORB features and appearance descriptors of the keyframes; thread-safe.

    Args:
        cfg: the configuration (`slam.reloc_*`).
        size: (H, W) of the frames.
    """

    def __init__(self, cfg: RunConfig, size: tuple[int, int]) -> None:
        import cv2

        self.sc = cfg.slam
        self.H, self.W = size
        self.px = self.W / 320.0  # pixel thresholds are given for 320-wide frames
        self._orb = cv2.ORB_create(nfeatures=self.sc.reloc_features, fastThreshold=10)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._lock = threading.Lock()
        self._features: dict[int, _Features] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._features)

    def features(self, image: np.ndarray) -> _Features:
        """ORB keypoints and descriptors and the global descriptor of an (H, W, 3) uint8 image."""
        import cv2

        g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        with self._lock:  # an ORB detector object is not safe to share between threads
            kps, desc = self._orb.detectAndCompute(g, None)
        pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        desc = np.zeros((0, 32), np.uint8) if desc is None else desc
        return _Features(pts, desc, global_descriptor(image))

    def add(self, kid: int, image: np.ndarray) -> _Features:
        """Index keyframe `kid` (its image, (H, W, 3) uint8); returns its features."""
        feats = self.features(image)
        with self._lock:
            self._features[kid] = feats
        return feats

    def similar(self, image: np.ndarray | _Features, exclude: set[int], count: int, min_similarity: float = -1.0
                ) -> list[tuple[int, float]]:
        """The `count` indexed keyframes (not in `exclude`) that look most like `image`, most similar
        first, with their cosine similarity (at least `min_similarity`)."""
        thumb = image.thumb if isinstance(image, _Features) else global_descriptor(image)
        with self._lock:
            ids = [k for k in self._features if k not in exclude]
            if not ids:
                return []
            sims = np.stack([self._features[k].thumb for k in ids]) @ thumb
        order = np.argsort(-sims)[:count]
        return [(ids[i], float(sims[i])) for i in order if sims[i] >= min_similarity]

    def register(self, image: np.ndarray | _Features, keyframes: list[Keyframe], kids: list[int],
                 intrinsics: torch.Tensor) -> Registration | None:
        """Register the frame against each keyframe in turn; the one with the most inliers, or None.

        Shapes: image (H, W, 3) uint8 (or its `features`); intrinsics (4,) at the frame size.
        """
        feats = image if isinstance(image, _Features) else self.features(image)
        best: Registration | None = None
        for kid, kf in zip(kids, keyframes, strict=True):
            reg = self._register_one(feats, kid, kf, intrinsics)
            if reg is not None and (best is None or reg.inliers > best.inliers):
                best = reg
        return best

    def _register_one(self, feats: _Features, kid: int, kf: Keyframe, intrinsics: torch.Tensor
                      ) -> Registration | None:
        import cv2

        with self._lock:
            ref = self._features.get(kid)
        s = self.sc
        if ref is None or len(ref.descriptors) < s.reloc_min_inliers or len(feats.descriptors) < s.reloc_min_inliers:
            return None
        pairs = self._matcher.knnMatch(ref.descriptors, feats.descriptors, k=2)
        good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < s.reloc_ratio * m[1].distance]
        if len(good) < s.reloc_min_inliers:
            return None
        src = ref.keypoints[[m.queryIdx for m in good]]
        dst = feats.keypoints[[m.trainIdx for m in good]]
        z = _depth_at(kf, src, s.cloud_stride)
        ok = np.isfinite(z) & (z > 0)
        if ok.sum() < s.reloc_min_inliers:
            return None
        fx, fy, cx, cy = intrinsics.tolist()
        obj = np.stack([(src[ok, 0] - cx) / fx * z[ok], (src[ok, 1] - cy) / fy * z[ok], z[ok]], axis=1)
        img = dst[ok].astype(np.float64)
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
        thr = s.reloc_reprojection * self.px
        found, rvec, tvec, inl = cv2.solvePnPRansac(obj, img, K, None, iterationsCount=200, reprojectionError=thr,
                                                    confidence=0.999, flags=cv2.SOLVEPNP_EPNP)
        if not found or inl is None or len(inl) < s.reloc_min_inliers:
            return None
        inl = inl[:, 0]
        rvec, tvec = cv2.solvePnPRefineLM(obj[inl], img[inl], K, None, rvec, tvec)
        proj, _ = cv2.projectPoints(obj, rvec, tvec, K, None)
        err = np.linalg.norm(proj[:, 0] - img, axis=1)
        inl = np.flatnonzero(err < thr)  # the refined pose's inliers
        if len(inl) < s.reloc_min_inliers or len(inl) < s.reloc_min_inlier_ratio * len(good):
            return None
        R = cv2.Rodrigues(rvec)[0]
        if not (np.isfinite(R).all() and np.isfinite(tvec).all()):
            return None
        q = matrix_to_quat(torch.from_numpy(R)).to(torch.float64)
        rel = torch.cat([torch.from_numpy(tvec[:, 0]).to(torch.float64), q]).to(intrinsics.device)
        points = obj[inl] @ R.T + tvec[:, 0]
        return Registration(kid, rel, len(inl), len(good), float(math.sqrt(np.mean(err[inl] ** 2))), img[inl],
                            points)


def _depth_at(kf: Keyframe, pts: np.ndarray, stride: int) -> np.ndarray:
    """The keyframe's depth at pixel positions (nearest; the full map in the window, else the copy at
    `stride` kept after it; NaN where unknown). Shapes: pts (P, 2) -> (P,)."""
    if kf.depth is not None:
        depth = kf.depth.cpu().numpy()
        valid = kf.valid.cpu().numpy() if kf.valid is not None else np.ones(depth.shape, bool)
        depth = np.where(valid, depth, np.nan)
        s = 1.0
    elif kf.small_depth is not None:
        depth = np.where(kf.small_depth > 0, kf.small_depth, np.nan)
        s = stride
    else:
        return np.full(len(pts), np.nan)
    h, w = depth.shape
    c = np.clip(np.round(pts[:, 0] / s).astype(int), 0, w - 1)
    r = np.clip(np.round(pts[:, 1] / s).astype(int), 0, h - 1)
    return depth[r, c]

"""Sparse registration of a frame against keyframes: the fallback of dense tracking, relocalisation
after a loss, and loop detection.

    index = KeyframeIndex(cfg, (H, W))
    feats = index.features(image)                     # every new keyframe: kept in the map (Keyframe.features)
    reg = index.register(feats, map.keyframes(kids), kids, map.intrinsics)
    similar = index.similar(feats, map.keyframes(ids), ids, count=3)   # keyframes that look alike

Dense tracking (DIS flow + Gauss-Newton) is accurate while consecutive views overlap well; after a
fast turn, motion blur or a hand over the lens it has nothing to start from. Sparse features do
(`v2d.features`, `slam.features`: XFeat, learned on real photos for wide baselines, or ORB): the
frame's keypoints are matched to a keyframe's, lifted to 3-D with the keyframe's depth (the full
map in the window, the strided copy after), and the frame's pose relative to the keyframe is found
by PnP-RANSAC (OpenCV), refined on the inliers (Levenberg-Marquardt). A registration counts when at
least `slam.reloc_min_inliers` matches agree within `slam.reloc_reprojection` px and they are at
least `slam.reloc_min_inlier_ratio` of the matches (ORB's, which passed a ratio test) or
`slam.reloc_min_inlier_ratio_nn` of them (XFeat's nearest neighbours and LighterGlue's, with more
outliers among them).

Which keyframes to try besides the recent ones comes from appearance: each keyframe's features
carry a global descriptor (`Features.global_desc`), compared by cosine similarity; the geometric
check rejects the look-alikes it lets through.

The keyframes (pose, depth, features) are the map's and are passed in by the caller; the index
holds only the extractor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from slam.config import RunConfig
from slam.map import Keyframe
from v2d.features import Features, make_extractor
from v2d.geometry.lie import matrix_to_quat

__all__ = ["KeyframeIndex", "Registration"]


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


class KeyframeIndex:
    """Extracts, matches and registers sparse features (`slam.features`); thread-safe.

    Args:
        cfg: the configuration (`slam.features`, `slam.reloc_*`).
        size: (H, W) of the frames.
        device: where a learned extractor runs.
    """

    def __init__(self, cfg: RunConfig, size: tuple[int, int], device: torch.device | str = "cpu") -> None:
        self.sc = cfg.slam
        self.H, self.W = size
        self.px = self.W / 320.0  # pixel thresholds are given for 320-wide frames
        self.extractor = make_extractor(self.sc.features, self.sc.reloc_features, self.sc.reloc_ratio,
                                        self.sc.feature_weights or None, device, careful=self.sc.reloc_careful > 0)

    def features(self, image: np.ndarray) -> Features:
        """The local features and global descriptor of an (H, W, 3) uint8 image."""
        return self.extractor.extract(image)

    def similar(self, query: Features, keyframes: list[Keyframe], kids: list[int], count: int,
                min_similarity: float = -1.0) -> list[tuple[int, float]]:
        """The `count` keyframes among `keyframes` (ids `kids`; those without features are skipped) that
        look most like the query, most similar first, with their cosine similarity (at least
        `min_similarity`)."""
        have = [(k, kf.features) for k, kf in zip(kids, keyframes, strict=True) if kf.features is not None]
        if not have:
            return []
        sims = self.extractor.similarity(query, [f for _, f in have])
        order = np.argsort(-sims, kind="stable")[:count]
        return [(have[i][0], float(sims[i])) for i in order if sims[i] >= min_similarity]

    def register(self, feats: Features, keyframes: list[Keyframe], kids: list[int],
                 intrinsics: torch.Tensor, careful: int = 0) -> Registration | None:
        """Register the frame (its `features`) against each keyframe in turn; the one with the most
        inliers, or None. When none registers, the first `careful` keyframes are tried again with the
        extractor's careful matcher (`FeatureExtractor.careful_match`: LighterGlue for XFeat), which
        finds the wide-baseline matches plain matching misses at a higher cost.

        Shapes: intrinsics (4,) at the frame size.
        """
        best: Registration | None = None
        for kid, kf in zip(kids, keyframes, strict=True):
            if kf.features is None:
                continue
            reg = self.register_matches(feats, self.extractor.match(kf.features, feats), kid, kf, intrinsics)
            if reg is not None and (best is None or reg.inliers > best.inliers):
                best = reg
        if best is not None or not self.extractor.has_careful_match:
            return best
        for kid, kf in list(zip(kids, keyframes, strict=True))[:careful]:
            if kf.features is None:
                continue
            pairs = self.extractor.careful_match(kf.features, feats, (self.H, self.W))
            reg = self.register_matches(feats, pairs, kid, kf, intrinsics)
            if reg is not None and (best is None or reg.inliers > best.inliers):
                best = reg
        return best

    def register_matches(self, feats: Features, good: np.ndarray, kid: int, kf: Keyframe,
                         intrinsics: torch.Tensor) -> Registration | None:
        """PnP-RANSAC of the frame against keyframe `kid` from the matches `good` ((M, 2): index in the
        keyframe's features, index in the frame's)."""
        import cv2

        ref, s = kf.features, self.sc
        if len(good) < s.reloc_min_inliers:
            return None
        src = ref.keypoints[good[:, 0]]
        dst = feats.keypoints[good[:, 1]]
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
        ratio = s.reloc_min_inlier_ratio if self.extractor.ratio_tested else s.reloc_min_inlier_ratio_nn
        if len(inl) < s.reloc_min_inliers or len(inl) < ratio * len(good):
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

"""Multi-view tracks: the keyframes' sparse features matched pairwise, verified, chained into tracks
for the bundle adjustments (`v2d.geometry.window_ba.Tracks`).

    matcher = PairMatcher(extractor.match, threshold, min_inliers, cloud_stride)   # one per run
    built = build_tracks(keyframes, ids, pairs, matcher, intrinsics)   # or None: no track
    built.tracks                       # anchors, rays, observations (network pixels)
    built.lengths                      # keyframes that see each track
    tracks = weighted(built, scale, dense_weight, share)   # for the adjustment's pixel grid

Dense flow joins a keyframe only to those near it in time or place, and each keyframe carries its
own depth: nothing stops the scale from creeping along a video (on hand-held video the first
keyframes sat at 1.2-1.5x the scale of the rest). A point matched by its features in many keyframes
has one depth for all of them, which ties their scales together (COLMAP's tracks).

How. For every keyframe pair given, the features (`v2d.features`, `slam.features`) are matched
(XFeat: mutual nearest neighbours; ORB: ratio test) and verified twice: a fundamental matrix
(OpenCV's USAC, 8-point samples: 1-2 ms a pair, where an essential matrix took 20 ms by USAC and
160 ms by RANSAC) drops what lies off the epipolar lines, then PnP-RANSAC of the second view on the
first keyframe's depth at the keypoints drops what lies off along them (a fundamental matrix
constrains a match to a line). Both are independent of the current poses, so drift does not bias
which matches survive. On a synthetic 120x160 pair with the true depth, XFeat matches that passed
the first check were 58 % within 1 px of the truth and 7 % beyond 4 px; after the second 83 % and
none. The verified matches join
(keyframe, keypoint) nodes; each connected component is a track (SciPy's connected components). A component that holds
two keypoints of one keyframe is inconsistent (a wrong match joined two points) and is dropped, as
COLMAP does. Each track's anchor is its earliest keyframe that has depth at the keypoint; the
track's starting inverse depth is that depth's, its other keypoints are its observations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from slam.map import Keyframe
from v2d.features import Features
from v2d.geometry.window_ba import Tracks

__all__ = ["TRACK_PRIOR", "BuiltTracks", "PairMatcher", "build_tracks", "weighted"]

_RANSAC_CONFIDENCE = 0.999
_MIN_MATCHES = 8  # the fundamental matrix's samples
_PNP_ITERATIONS = 100
# Weight of a track's (rho - previous iterate)^2, in px^2 per unit of inverse depth squared: a damping
# that keeps a track whose observations all fall out (behind a camera) solvable, not a belief.
TRACK_PRIOR = 1e-3
_FULL_SHARE = 100  # observations that take the tracks' whole share of the weight (`weighted`)


@dataclass(frozen=True)
class BuiltTracks:
    """Tracks over keyframes 0..K-1 (the map's keyframe ids), in pixels of the frames the features
    were extracted from (the network size).

    Attributes:
        tracks: the tracks (`uv`, `target` in those pixels; weight 1 per observation; prior weight 0).
        lengths: keyframes that see each track (anchor included).
        pairs: keyframe pairs matched.
        verified: matches that passed the geometric check, over all pairs.

    Shapes: lengths (T,) int64.
    """

    tracks: Tracks
    lengths: torch.Tensor
    pairs: int
    verified: int


def _verified(fa: Features, fb: Features, idx: np.ndarray, kf_a: Keyframe, stride: int, K: np.ndarray,
              threshold: float, min_inliers: int) -> np.ndarray:
    """The matches `idx` (M, 2) from keyframe a to b that a fundamental matrix (USAC) explains and then
    a pose of b (PnP-RANSAC on a's depth at the keypoints) reprojects within `threshold` px; none
    when fewer than `min_inliers` remain."""
    if len(idx) < max(_MIN_MATCHES, min_inliers):
        return idx[:0]
    pa = fa.keypoints[idx[:, 0]].astype(np.float64)
    pb = fb.keypoints[idx[:, 1]].astype(np.float64)
    try:
        F, inl = cv2.findFundamentalMat(pa, pb, cv2.USAC_FM_8PTS, threshold, _RANSAC_CONFIDENCE)
    except cv2.error:
        return idx[:0]
    if F is None or inl is None:
        return idx[:0]
    keep = inl.ravel().astype(bool)
    z = np.zeros(len(pa))
    z[keep] = _depths(kf_a, pa[keep], stride)
    keep &= z > 0
    if keep.sum() < min_inliers:
        return idx[:0]
    sel = np.flatnonzero(keep)
    rays = np.linalg.solve(K, np.concatenate([pa[sel], np.ones((len(sel), 1))], axis=1).T).T
    try:
        ok, _, _, inl = cv2.solvePnPRansac(rays * z[sel, None], pb[sel], K, None, iterationsCount=_PNP_ITERATIONS,
                                           reprojectionError=threshold, confidence=_RANSAC_CONFIDENCE,
                                           flags=cv2.SOLVEPNP_EPNP)
    except cv2.error:
        return idx[:0]
    if not ok or inl is None or len(inl) < min_inliers:
        return idx[:0]
    return idx[sel[inl.ravel()]]


class PairMatcher:
    """Verified feature matches between keyframe pairs, each pair matched and checked once and kept
    (the window adjustment asks for the same pairs at every new keyframe, the global one for them all
    again); thread-safe.

    Args:
        match: the features' matcher (`FeatureExtractor.match`).
        threshold: the geometric checks' inlier threshold, pixels.
        min_inliers: matches a pair needs after the checks to count.
        depth_stride: pixel (i, j) of a retired keyframe's `small_depth` is pixel (stride i, stride j)
            of the frame (while in the window its full depth is used).
    """

    def __init__(self, match: Callable[[Features, Features], np.ndarray], threshold: float, min_inliers: int,
                 depth_stride: int) -> None:
        self.match, self.threshold, self.min_inliers, self.stride = match, threshold, min_inliers, depth_stride
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def verified(self, kid_a: int, kid_b: int, kf_a: Keyframe, kf_b: Keyframe, intrinsics: torch.Tensor
                 ) -> np.ndarray:
        """The verified matches of keyframes kid_a -> kid_b (the check uses a's depth).
        Shapes: -> (M, 2) int64 (keypoint in a, keypoint in b)."""
        with self._lock:
            got = self._cache.get((kid_a, kid_b))
        if got is not None:
            return got
        fx, fy, cx, cy = intrinsics.detach().cpu().double().tolist()
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], np.float64)
        fa, fb = kf_a.features, kf_b.features
        if fa is None or fb is None:  # not cached: the features may come later
            return np.zeros((0, 2), np.int64)
        good = _verified(fa, fb, self.match(fa, fb), kf_a, self.stride, K, self.threshold, self.min_inliers)
        with self._lock:
            self._cache[(kid_a, kid_b)] = good
        return good


def build_tracks(keyframes: list[Keyframe], ids: list[int], pairs: list[tuple[int, int]], matcher: PairMatcher,
                 intrinsics: torch.Tensor) -> BuiltTracks | None:
    """Tracks over `keyframes` from their features matched across `pairs` (see the module docstring).

    Args:
        keyframes: the keyframes, each with `features` and depth (full in the window, or small).
        ids: their map ids (the matcher's cache keys).
        pairs: index pairs (a, b) into `keyframes` to match, a != b.
        matcher: matches and verifies a pair (cached).
        intrinsics: [fx, fy, cx, cy] of the frames the features come from.

    Returns None when no track has an observation.
    """
    K = len(keyframes)
    feats = [kf.features for kf in keyframes]
    offsets = np.cumsum([0] + [0 if f is None else len(f) for f in feats])
    verified, matched = 0, 0
    joined = []
    for a, b in pairs:
        if feats[a] is None or feats[b] is None or a == b:
            continue
        matched += 1
        good = matcher.verified(ids[a], ids[b], keyframes[a], keyframes[b], intrinsics)
        verified += len(good)
        joined.append(np.stack([offsets[a] + good[:, 0], offsets[b] + good[:, 1]], axis=1))
    if verified == 0:
        return None
    n = int(offsets[-1])  # one node per keypoint of every keyframe
    links = np.concatenate(joined)
    graph = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(n, n))
    roots = connected_components(graph, directed=False)[1]
    kf_of = np.repeat(np.arange(K), np.diff(offsets))
    kp_of = np.arange(n) - offsets[kf_of]
    keep = np.bincount(roots)[roots] >= 2  # keypoints matched to something
    order = np.flatnonzero(keep)[np.lexsort((kf_of[keep], roots[keep]))]  # by component, then keyframe
    roots, kf_of, kp_of = roots[order], kf_of[order], kp_of[order]
    starts = np.flatnonzero(np.r_[True, roots[1:] != roots[:-1]])
    comp = np.cumsum(np.r_[True, roots[1:] != roots[:-1]]) - 1  # each keypoint's component, 0..C-1
    # two keypoints of one keyframe in a component: a wrong match joined two points; drop it
    twice = np.zeros(len(starts), bool)
    twice[comp[1:][(comp[1:] == comp[:-1]) & (kf_of[1:] == kf_of[:-1])]] = True
    pts = np.zeros((len(order), 2), np.float32)
    depth = np.zeros(len(order))
    for k in np.unique(kf_of):
        at = kf_of == k
        pts[at] = feats[k].keypoints[kp_of[at]]
        depth[at] = _depths(keyframes[k], pts[at], matcher.stride)
    # the anchor: each component's first keypoint (earliest keyframe) that has depth
    pos = np.where(depth > 0, np.arange(len(order)), len(order))
    first = np.minimum.reduceat(pos, starts)
    ok = ~twice & (first < len(order))  # (a component without depth anywhere: len(order))
    if not ok.any():
        return None
    anchors = first[ok]
    t_of = np.full(len(starts), -1)
    t_of[ok] = np.arange(int(ok.sum()))
    obs = (t_of[comp] >= 0) & ~np.isin(np.arange(len(order)), anchors)
    f64 = torch.float64
    T, O = len(anchors), int(obs.sum())
    tracks = Tracks(anchor=torch.from_numpy(kf_of[anchors].astype(np.int64)),
                    uv=torch.from_numpy(pts[anchors]).to(f64), inv_depth=torch.from_numpy(1.0 / depth[anchors]),
                    prior_weight=torch.zeros(T, dtype=f64), track=torch.from_numpy(t_of[comp][obs].astype(np.int64)),
                    node=torch.from_numpy(kf_of[obs].astype(np.int64)), target=torch.from_numpy(pts[obs]).to(f64),
                    weight=torch.ones(O, dtype=f64))
    lengths = np.bincount(comp, minlength=len(starts))[ok]
    return BuiltTracks(tracks, torch.tensor(lengths), matched, verified)


def _depths(kf: Keyframe, pts: np.ndarray, stride: int) -> np.ndarray:
    """The keyframe's depth at frame pixels pts (nearest sample): its full depth while in the window
    (where valid), its small copy (pixel (i, j) = frame pixel (stride i, stride j)) after; 0 where
    unknown or outside. Shapes: pts (M, 2) (x, y) -> (M,) float64."""
    if kf.depth is not None:
        d = kf.depth.detach().cpu().numpy().astype(np.float64)
        if kf.valid is not None:
            d = np.where(kf.valid.detach().cpu().numpy(), d, 0.0)
        step = 1
    elif kf.small_depth is not None:
        d, step = kf.small_depth.astype(np.float64), stride
    else:
        return np.zeros(len(pts))
    j = np.round(pts[:, 0].astype(np.float64) / step).astype(np.int64)
    i = np.round(pts[:, 1].astype(np.float64) / step).astype(np.int64)
    inside = (i >= 0) & (i < d.shape[0]) & (j >= 0) & (j < d.shape[1])
    v = np.where(inside, d[np.clip(i, 0, d.shape[0] - 1), np.clip(j, 0, d.shape[1] - 1)], 0.0)
    return np.where(np.isfinite(v) & (v > 0), v, 0.0)

def weighted(built: BuiltTracks, scale: float, dense_weight: float, share: float, device: torch.device | str = "cpu"
             ) -> Tracks:
    """The tracks for an adjustment on a grid `scale` times coarser than the network size (pixel
    coordinates divided by it), their observations weighing together `share` times `dense_weight`
    (the flow targets' total weight), each the same share (`slam.track_weight`); with fewer than
    `_FULL_SHARE` observations each weighs what it would among that many (a handful of matches,
    outliers possibly among them, does not take the whole share)."""
    t = built.tracks
    O = t.track.numel()
    return Tracks(anchor=t.anchor.to(device), uv=(t.uv / scale).to(device), inv_depth=t.inv_depth.to(device),
                  prior_weight=torch.full_like(t.inv_depth, TRACK_PRIOR).to(device), track=t.track.to(device),
                  node=t.node.to(device), target=(t.target / scale).to(device),
                  weight=torch.full((O,), share * dense_weight / max(O, _FULL_SHARE), dtype=torch.float64,
                                     device=device))

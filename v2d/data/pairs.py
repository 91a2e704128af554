"""Frame pairs with exact relative pose and depth for training the motion update (`v2d.refiner`).

Pair k is a source frame i (with depth) and a target frame j = i +- gap from one of the sources:

- synthetic sequences rendered by the project (`v2d.data.scenarios`: the normal hand-held
  trajectory and the hard cases fast motion, pure rotation, motion blur, exposure changes and a
  blocked view), scene seeds from `seed_base` up (the validation suite renders seed 0; validation
  pairs use other seeds than training pairs);
- real RGB-D sequences with poses (`v2d.io.datasets` layouts), restricted to a frame range so
  that training and validation frames never mix (e.g. 7-Scenes redkitchen 0-249 for training,
  250-499 held apart).

Everything about pair k (source, frames, direction) comes from `numpy.random.default_rng([seed,
k])`, so a training run is reproducible from (seed, step) and resumes exactly. Sequences are
rendered or read once, on first use, and kept in memory (uint8 images, float16 depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from v2d.errors import InputError
from v2d.geometry.lie import matrix_to_quat, se3_inv, se3_mul

__all__ = ["Pair", "PairSource", "Pairs", "SYNTHETIC_CASES"]

SYNTHETIC_CASES = ("normal", "fast", "rotation", "blur", "exposure", "blocked")


@dataclass(frozen=True)
class PairSource:
    """One sequence pairs are drawn from: a synthetic case and scene seed, or a real folder and an
    inclusive frame range."""

    kind: str  # "synthetic" | "real"
    name: str  # case name or folder path
    seed: int = 0
    first: int = 0
    last: int = -1
    frames: int = 24
    max_gap: int = 1_000_000  # frames; a larger drawn gap is cut to this (e.g. fast motion)


@dataclass
class Pair:
    """A training pair. Shapes: images (2, H, W, 3) uint8 (source, target); depths (2, H, W) float32
    metres (0 = unknown); rel_cw (7,) float64 = T_target T_source^-1; intrinsics (4,) float64;
    frames: the two frames' indices in their source sequence (a real source: in the dataset)."""

    images: np.ndarray
    depths: np.ndarray
    rel_cw: torch.Tensor
    intrinsics: torch.Tensor
    real: bool
    frames: tuple[int, int]


class _Loaded:
    def __init__(self, images: np.ndarray, depths: np.ndarray, poses_cw: torch.Tensor, intrinsics: torch.Tensor,
                 real: bool, first: int = 0) -> None:
        self.images, self.depths, self.poses_cw, self.intrinsics, self.real = images, depths, poses_cw, intrinsics, real
        self.first = first  # the dataset index of the first frame kept


def _load(src: PairSource, height: int, width: int) -> _Loaded:
    if src.kind == "synthetic":
        from v2d.data.scenarios import render_scenario
        from v2d.data.synthetic import render_sequence

        seq = (render_sequence(src.seed, src.frames, height, width) if src.name == "normal"
               else render_scenario(src.name, src.frames, seed=src.seed, height=height, width=width).sequence)
        return _Loaded(np.asarray(seq.images), np.asarray(seq.depths).astype(np.float16),
                       torch.as_tensor(seq.poses_cw, dtype=torch.float64), torch.as_tensor(seq.intrinsics).double(),
                       False)
    import cv2

    from v2d.io.datasets import open_sequence, resize_intrinsics

    seq = open_sequence(src.name)
    last = len(seq) - 1 if src.last < 0 else min(src.last, len(seq) - 1)
    idx = list(range(src.first, last + 1))
    images, depths = [], []
    hw0 = None
    for i in idx:
        img = seq.image(i)
        hw0 = hw0 or img.shape[:2]
        images.append(cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA))
        depths.append(cv2.resize(seq.depth(i), (width, height), interpolation=cv2.INTER_NEAREST))
    T_cw = torch.from_numpy(np.linalg.inv(seq.poses_wc[idx]))
    poses = torch.cat([T_cw[:, :3, 3], matrix_to_quat(T_cw[:, :3, :3])], dim=-1)
    intr = resize_intrinsics(torch.from_numpy(seq.intrinsics), hw0, (height, width)).double()
    return _Loaded(np.stack(images), np.stack(depths).astype(np.float16), poses, intr, True, src.first)


def _check_real(src: PairSource) -> None:
    from v2d.io.datasets import open_sequence

    seq = open_sequence(src.name)
    if seq.depths is None or seq.poses_wc is None:
        raise InputError(f"{src.name}: training pairs need depth and poses")
    if src.first >= len(seq) - 1:
        raise InputError(f"{src.name}: frames {src.first}-{src.last} hold fewer than 2 of its {len(seq)} frames")


class Pairs:
    """Pairs drawn from `sources`: pair k from source (k-th draw), gap from `gaps` (frames).

    `real_fraction` of the pairs come from the real sources (when there are any).
    """

    def __init__(self, sources: list[PairSource], gaps: tuple[int, ...], height: int, width: int, seed: int,
                 real_fraction: float = 0.0) -> None:
        if not sources:
            raise InputError("training pairs: no sources")
        self.synthetic = [s for s in sources if s.kind == "synthetic"]
        self.real = [s for s in sources if s.kind == "real"]
        self.gaps, self.height, self.width, self.seed = tuple(gaps), height, width, seed
        self.real_fraction = real_fraction if self.real else 0.0
        if not self.synthetic:
            self.real_fraction = 1.0
        self._cache: dict[PairSource, _Loaded] = {}
        for src in self.real:  # a bad path or range fails here, before any training
            _check_real(src)

    def sequence(self, src: PairSource) -> _Loaded:
        if src not in self._cache:
            self._cache[src] = _load(src, self.height, self.width)
        return self._cache[src]

    def __getitem__(self, k: int) -> Pair:
        rng = np.random.default_rng([self.seed, int(k)])
        pool = self.real if rng.random() < self.real_fraction else self.synthetic
        src = pool[int(rng.integers(len(pool)))]
        seq = self.sequence(src)
        n = len(seq.images)
        gap = int(self.gaps[int(rng.integers(len(self.gaps)))])
        gap = min(gap, src.max_gap, n - 1)
        a = int(rng.integers(n - gap))
        i, j = (a, a + gap) if rng.random() < 0.5 else (a + gap, a)
        rel = se3_mul(seq.poses_cw[j], se3_inv(seq.poses_cw[i]))
        depths = np.stack([seq.depths[i], seq.depths[j]]).astype(np.float32)
        return Pair(np.stack([seq.images[i], seq.images[j]]), depths, rel, seq.intrinsics, seq.real,
                    (seq.first + i, seq.first + j))

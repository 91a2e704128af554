"""Depth consistency of a run without ground truth (`v2d eval consistency OUT_DIR`).

Keyframe i's depth is moved into keyframe j with the estimated poses and compared with j's depth
(`slam.fusion.relative_disagreement`), for each keyframe and its next `neighbours` keyframes, both
ways. Depth and poses that agree with each other give small relative differences; the measure is
free of the run's unknown scale, so it applies to any video. It checks self-consistency, not
accuracy: a depth map and trajectory that are wrong in the same way can still agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slam.fusion import relative_disagreement
from v2d.errors import InputError
from v2d.geometry.lie import se3_inv
from v2d.io.results import RunOutputs

__all__ = ["depth_consistency"]


def depth_consistency(run: RunOutputs, neighbours: int = 2, tolerance: float = 0.05, progress: bool = False
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Consistency summary and per-pair rows of a run's keyframe depths.

    Per ordered pair (i -> j): compared pixels, overlap (compared / valid pixels of i), median
    relative difference and the fraction within `tolerance`. The summary pools every compared
    pixel of every pair (median_rel_diff, within_tolerance) and also gives the pair means.
    """
    from tqdm import tqdm

    if neighbours < 1:
        raise InputError(f"neighbours: expected at least 1, got {neighbours}")
    if not (0 < tolerance < 1):
        raise InputError(f"tolerance: expected a fraction in (0, 1), got {tolerance}")
    K = len(run.keyframe_rows)
    if K < 2:
        raise InputError(f"{run.root}: {K} keyframe(s); the consistency check needs at least 2")
    poses_cw = se3_inv(torch.from_numpy(run.keyframe_poses_wc).float())
    intr = torch.from_numpy(run.intrinsics).float()
    cache: dict[int, torch.Tensor] = {}

    def depth(k: int) -> torch.Tensor:
        if k not in cache:
            cache[k] = torch.from_numpy(run.depth(k))
            cache.pop(k - neighbours - 1, None)  # only a window of depth maps is needed at a time
        return cache[k]

    rows, pooled = [], []
    pairs = [(i, j) for i in range(K) for j in range(i + 1, min(i + neighbours + 1, K))]
    for i, j in tqdm(pairs, desc="v2d eval consistency", unit="pair", disable=not progress):
        for a, b in ((i, j), (j, i)):
            rel, valid = relative_disagreement(depth(a), depth(b), poses_cw[a], poses_cw[b], intr)
            rel = rel.float().numpy()  # float32: a long run compares tens of millions of pixels
            pooled.append(rel)
            rows.append({"from": run.keyframe_files[a], "to": run.keyframe_files[b], "pixels": int(rel.size),
                         "overlap": rel.size / valid if valid else 0.0,
                         "median_rel_diff": float(np.median(rel)) if rel.size else None,
                         "within_tolerance": float(np.mean(rel < tolerance)) if rel.size else None})
    allrel = np.concatenate(pooled)
    if allrel.size == 0:
        raise InputError(f"{run.root}: no keyframe pixel lands on another keyframe's known depth; the keyframes "
                         "do not overlap (or their depth maps are empty)")
    used = [r for r in rows if r["pixels"]]
    summary = {
        "keyframes": K, "pairs": len(rows), "pairs_without_overlap": len(rows) - len(used), "neighbours": neighbours,
        "tolerance": tolerance, "pixels": int(allrel.size),
        "median_rel_diff": float(np.median(allrel)), "within_tolerance": float(np.mean(allrel < tolerance)),
        "mean_rel_diff": float(np.mean(allrel, dtype=np.float64)),
        "pair_mean_median_rel_diff": float(np.mean([r["median_rel_diff"] for r in used])),
        "pair_mean_within_tolerance": float(np.mean([r["within_tolerance"] for r in used])),
        "mean_overlap": float(np.mean([r["overlap"] for r in rows])),
        "run": str(run.root),
    }
    return summary, rows

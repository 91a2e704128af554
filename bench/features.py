"""Sparse features side by side: which extractor and matcher register wide-baseline pairs, and at what cost.

    python -m bench.features [--json bench_out/features.json] [--data ../shared/data] [--synthetic]

Each set is a sequence with ground-truth depth and poses at 240x320: `7s-s12` (7-Scenes redkitchen
0-499, every 12th frame), `scannet` and `tum-cabinet` (every frame: 12 deg / 19 cm and 7 deg / 16
cm apart), and the synthetic `jump` pairs (`v2d.data.scenarios`, the view turned by 60 deg). For
every pair of frames 1 and 2 apart, the later frame is registered against the earlier one as the
engine registers a frame against a keyframe (`slam.relocaliser.KeyframeIndex`, default settings: the
keyframe's ground-truth depth, PnP-RANSAC), with each of

- `orb`: OpenCV ORB, ratio test;
- `xfeat`: XFeat, mutual nearest neighbours;
- `xfeat+lg`: XFeat, LighterGlue's matches (the careful matcher the engine tries when plain
  matching registers nothing).

Per set and method: pairs registered, pairs registered within 10 cm and 5 deg of the truth, median
errors, median inliers, and the cost: extraction per image (= per keyframe) and matching +
registration per pair, medians in milliseconds. Timings need an otherwise idle machine.
`--synthetic` runs only the rendered set (the smoke run in `make test`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import ROOT, write_results

DATA = ROOT.parent / "shared" / "data"
SIZE = (240, 320)
TUM_FR3 = (535.4, 539.2, 320.1, 247.6)
METHODS = {"orb": ("orb", 0), "xfeat": ("xfeat", 0), "xfeat+lg": ("xfeat", 1)}  # kind, careful


@dataclasses.dataclass
class PairSet:
    name: str
    images: list[np.ndarray]  # (H, W, 3) uint8 at SIZE
    depths: list[np.ndarray]  # (H, W) float32 metres, 0 unknown
    poses_cw: torch.Tensor  # (N, 7) float64
    intrinsics: torch.Tensor  # (4,) at SIZE
    pairs: list[tuple[int, int]]


def _real(data: Path, folder: str, stride: int, intrinsics: tuple[float, ...] | None, last: int | None = None
          ) -> PairSet | None:
    import cv2

    from v2d.geometry.lie import matrix_to_quat
    from v2d.io.datasets import open_sequence

    if not (data / folder).is_dir():
        return None
    seq = open_sequence(data / folder, None if intrinsics is None else np.array(intrinsics))
    n = len(seq) if last is None else min(len(seq), last + 1)
    idx = list(range(0, n, stride))
    h, w = seq.image(0).shape[:2]
    images = [cv2.resize(seq.image(i), SIZE[::-1], interpolation=cv2.INTER_AREA) for i in idx]
    depths = [cv2.resize(seq.depth(i), SIZE[::-1], interpolation=cv2.INTER_NEAREST) for i in idx]
    cw = np.linalg.inv(seq.poses_wc[idx])
    poses = torch.cat([torch.from_numpy(cw[:, :3, 3]), matrix_to_quat(torch.from_numpy(cw[:, :3, :3]))], dim=1)
    intr = torch.tensor(seq.intrinsics, dtype=torch.float64) * torch.tensor([SIZE[1] / w, SIZE[0] / h] * 2)
    pairs = [(a, a + g) for g in (1, 2) for a in range(len(idx) - g)]
    return PairSet(folder, images, depths, poses, intr, pairs)


def _jump(seeds: range) -> PairSet:
    from v2d.data.scenarios import render_scenario

    images, depths, poses, pairs = [], [], [], []
    for seed in seeds:
        sc = render_scenario("jump", 30, seed=seed, height=SIZE[0], width=SIZE[1])
        a, b = sc.jump
        for k in (a, b):
            images.append(np.asarray(sc.sequence.images[k]))
            depths.append(np.asarray(sc.sequence.depths[k]))
            poses.append(sc.sequence.poses_cw[k])
        pairs.append((len(images) - 2, len(images) - 1))
    return PairSet("jump-60deg", images, depths, torch.stack(poses), sc.sequence.intrinsics, pairs)


def measure(ps: PairSet, method: str) -> dict:
    from slam.config import RunConfig
    from slam.map import Keyframe
    from slam.relocaliser import KeyframeIndex
    from v2d.geometry.lie import se3_inv, se3_log, se3_mul

    kind, careful = METHODS[method]
    cfg = RunConfig()
    index = KeyframeIndex(dataclasses.replace(cfg, slam=dataclasses.replace(cfg.slam, features=kind)), SIZE)
    extract_ms, feats = [], []
    for im in ps.images:
        t = time.perf_counter()
        feats.append(index.features(im))
        extract_ms.append(1000 * (time.perf_counter() - t))
    register_ms, ok, good, t_err, r_err, inliers = [], 0, 0, [], [], []
    for a, b in ps.pairs:
        d = torch.from_numpy(ps.depths[a]).float()
        kf = Keyframe(frame=a, pose_cw=ps.poses_cw[a], image=ps.images[a], depth=d, valid=d > 0, features=feats[a])
        t = time.perf_counter()
        if careful:  # the careful matcher alone, as the engine runs it after plain matching failed
            reg = index.register_matches(feats[b], index.extractor.careful_match(feats[a], feats[b], SIZE), a, kf,
                                      ps.intrinsics)
        else:
            reg = index.register(feats[b], [kf], [a], ps.intrinsics)
        register_ms.append(1000 * (time.perf_counter() - t))
        if reg is None:
            continue
        ok += 1
        xi = se3_log(se3_mul(reg.rel_cw, se3_inv(se3_mul(ps.poses_cw[b], se3_inv(ps.poses_cw[a])))))
        te, re = 100 * float(xi[:3].norm()), math.degrees(float(xi[3:].norm()))
        t_err.append(te)
        r_err.append(re)
        inliers.append(reg.inliers)
        good += te < 10 and re < 5
    def med(v: list[float]) -> float | None:
        return statistics.median(v) if v else None

    return {"pairs": len(ps.pairs), "registered": ok, "good": good, "median_t_cm": med(t_err),
            "median_r_deg": med(r_err), "median_inliers": med(inliers), "extract_ms": med(extract_ms),
            "register_ms": med(register_ms)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--data", type=Path, default=DATA, help="the shared real data (default ../shared/data)")
    ap.add_argument("--synthetic", action="store_true", help="only the rendered set (a smoke run)")
    args = ap.parse_args(argv)
    sets = [_jump(range(1) if args.synthetic else range(4))]
    if not args.synthetic:
        for real in (_real(args.data, "7scenes-redkitchen", 12, None, 499), _real(args.data, "scannet-scene0005_00", 1,
                     None), _real(args.data, "tum-fr3-cabinet-keyframes", 1, TUM_FR3)):
            if real is None:
                print(f"skipped a real set: {args.data} has no such folder")
            else:
                sets.append(real)
    results: dict[str, dict] = {}
    print(f"{'set':<28}{'method':<10}{'registered':>11}{'good':>6}{'t cm':>7}{'r deg':>7}{'inliers':>8}"
          f"{'extract ms':>11}{'register ms':>12}")
    def fmt(v: float | None, spec: str) -> str:
        return ("-" if v is None else format(v, spec[1:])).rjust(int(spec[:spec.index(".")]))

    for ps in sets:
        for method in METHODS:
            r = measure(ps, method)
            results[f"{ps.name}/{method}"] = r
            print(f"{ps.name:<28}{method:<10}{r['registered']:>6}/{r['pairs']:<4}{r['good']:>6}"
                  f"{fmt(r['median_t_cm'], '7.1f')}{fmt(r['median_r_deg'], '7.2f')}{fmt(r['median_inliers'], '8.0f')}"
                  f"{fmt(r['extract_ms'], '11.1f')}{fmt(r['register_ms'], '12.1f')}")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The learned motion update against the DIS mode, side by side: pose errors on held-out pairs and
the tracking cost per frame.

    python -m bench.motion --json bench_out/motion.json [--pairs 96] [--frames 60] [--weights FILE]

1. Accuracy: the validation pairs of `v2d train-motion` (synthetic scenes 500 and up, which
   training never renders, and ../shared/data/7scenes-redkitchen frames 250-499, which it never
   reads), aligned exactly as tracking aligns them (`v2d.train_motion.evaluate_pair`: DIS flow,
   noisy depth, a perturbed or identity start) in the DIS mode and with the learned update: median
   and mean rotation (deg) and translation (cm) errors, and the relative change.
2. Cost: `slam.tracker.Tracker.track` (DIS flow included, a fresh flow cache) on consecutive frames
   of 7-Scenes 250-499 (stride 4) against the previous frame as keyframe with its ground-truth
   depth, alternating the two modes frame by frame; median milliseconds per frame and the ratio.
   Timings need an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import ROOT, write_results

DATA = ROOT.parent / "shared" / "data" / "7scenes-redkitchen"


def _cfg(source: str, weights: str | None):
    from slam.config import RunConfig
    from v2d.config import load_config

    sets = [f"motion.flow_source={source}", f"motion_train.val_real=[{DATA}:250-499]"]
    if weights:
        sets.append(f"model.weights={weights}")
    return load_config(None, sets, root=RunConfig)


def accuracy(pairs: int, weights: str | None) -> dict:
    from v2d.model import load_model
    from v2d.train_motion import MotionTrainer, evaluate_pair

    cfg = _cfg("learned", weights)
    model = load_model(cfg)
    trainer = MotionTrainer(cfg, Path(ROOT / "bench_out" / "motion-val"))  # its validation pairs, nothing trained
    out = {}
    tc = cfg.motion_train
    for split, source in trainer.val.items():
        errs = {"dis": ([], []), "learned": ([], [])}
        with torch.no_grad():
            for k in range(pairs):
                for mode, ref in (("dis", None), ("learned", model.motion.refiner)):
                    r = evaluate_pair(ref, source[k], cfg, tc, np.random.default_rng([tc.seed, k, 2]),
                                      cfg.motion.refiner.updates)
                    errs[mode][0].append(r.rot_deg)
                    errs[mode][1].append(r.trans_cm)
        row = {}
        for mode, (rot, trans) in errs.items():
            row[mode] = {"rot_med": statistics.median(rot), "trans_med": statistics.median(trans),
                         "rot_mean": float(np.mean(rot)), "trans_mean": float(np.mean(trans))}
        row["change"] = {k: row["learned"][k] / row["dis"][k] - 1 for k in row["dis"]}
        out[split] = row
        print(f"{split:9s} {'':7s} {'rot med':>8s} {'trans med':>9s} {'rot mean':>8s} {'trans mean':>10s}")
        for mode in ("dis", "learned", "change"):
            r = row[mode]
            fmt = "{:+8.1%}" if mode == "change" else "{:8.3f}"
            print(f"{'':9s} {mode:7s} " + " ".join(fmt.format(r[k]).rjust(w) for k, w in
                                                    (("rot_med", 8), ("trans_med", 9), ("rot_mean", 8),
                                                     ("trans_mean", 10))))
    return out


def cost(frames: int, weights: str | None) -> dict:
    from slam.flowcache import FlowCache
    from slam.map import KeyframeView
    from slam.tracker import Tracker
    from v2d.data.pairs import Pairs, PairSource
    from v2d.geometry.lie import se3_identity
    from v2d.model import load_model

    seq = Pairs([PairSource("real", str(DATA), first=250, last=499)], (1,), 240, 320, 0).sequence(
        PairSource("real", str(DATA), first=250, last=499))
    idx = list(range(0, len(seq.images), 4))[: frames + 1]
    times = {"dis": [], "learned": []}
    trackers = {}
    for mode in times:
        cfg = _cfg(mode, weights)
        model = load_model(cfg)
        trackers[mode] = (Tracker(model, cfg, FlowCache(cfg.motion.dis, torch.device("cpu"), 2**28), (240, 320),
                                  torch.device("cpu")), seq.intrinsics.float())
    ident = se3_identity(dtype=torch.float64)
    for n, (a, b) in enumerate(zip(idx[:-1], idx[1:], strict=True)):
        depth = torch.from_numpy(seq.depths[a].astype(np.float32))
        valid = depth > 0
        depth = torch.where(valid, depth, depth[valid].median())
        ref = KeyframeView(0, 10 * a, ident, seq.images[a], depth, valid)
        order = ("dis", "learned") if n % 2 == 0 else ("learned", "dis")
        for mode in order:
            tracker, intr = trackers[mode]
            t = time.perf_counter()
            tracker.track(10 * b, seq.images[b], ref, ident, intr)
            times[mode].append((time.perf_counter() - t) * 1e3)
    med = {m: statistics.median(v[1:]) for m, v in times.items()}  # the first call warms up
    out = {"ms_dis": med["dis"], "ms_learned": med["learned"], "ratio": med["learned"] / med["dis"],
           "frames": len(idx) - 1}
    print(f"tracking per frame (median of {out['frames'] - 1}): DIS {med['dis']:.1f} ms, learned "
          f"{med['learned']:.1f} ms, ratio {out['ratio']:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--pairs", type=int, default=96, help="validation pairs per split")
    p.add_argument("--frames", type=int, default=60, help="frames timed per mode")
    p.add_argument("--weights", help="model weights (default: the shipped ones)")
    p.add_argument("--parts", nargs="+", default=["accuracy", "cost"], choices=["accuracy", "cost"])
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"needs {DATA}")
        return 1
    results = {}
    if "accuracy" in args.parts:
        results["accuracy"] = accuracy(args.pairs, args.weights)
    if "cost" in args.parts:
        results["cost"] = cost(args.frames, args.weights)
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(main())

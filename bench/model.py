"""Model benchmark: one full V2D inference on this CPU, per size preset and flow source.

    python -m bench.model --json bench_out/model.json [--repeats 3]   (from the repository root)

Input: 5 synthetic frames at 240x320 (the project's renderer), `model.iters` rounds (5). Reports the
median wall time of a full inference (no gradients), its peak resident memory (fresh process, see
bench/_common.py) and a breakdown of the median run: image features, cost volume, 3D matching
(hourglasses + heads), motion (flow network or DIS + Gauss-Newton). Untrained weights: the timing
does not depend on them. Target (issue 3): `small` <= 2 s and <= 3 GB per inference.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from bench._common import ROOT, peak_mb, write_results

PRESETS = ("small", "full")
SOURCES = ("dis", "learned")


def _build(preset: str, source: str):
    from v2d.config import load_config
    from v2d.data.synthetic import render_sequence
    from v2d.model import V2D

    cfg = load_config([ROOT / "configs" / f"{preset}.yaml"], [f"motion.flow_source={source}"])
    torch.manual_seed(0)
    model = V2D.from_config(cfg).eval()
    seq = render_sequence(0, 9)
    frames = torch.from_numpy(np.asarray(seq.images)[::2].copy()).permute(0, 3, 1, 2).float() / 255
    return model, frames, seq.intrinsics.float()


def setup(preset: str, source: str) -> Callable[[], object]:
    """For bench._common.peak_mb: a callable running one inference."""
    model, frames, intr = _build(preset, source)

    def run():
        with torch.no_grad():
            return model(frames, intr)

    return run


class _Timer:
    """Accumulates wall time per part by wrapping methods of the model's submodules."""

    def __init__(self, model) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self._wrap(model.depth, "features", "features")
        self._wrap(model.motion, "features", "features")
        self._wrap(model.depth, "cost_volume", "cost volume")
        self._wrap(model.depth.matching, "forward", "3D matching")
        for head in model.depth.heads:
            self._wrap(head, "forward", "3D matching")
        self._wrap(model.motion, "dis_targets", "motion: flow + GN")
        self._wrap(model.motion, "forward", "motion: flow + GN")

    def _wrap(self, obj, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[part] += time.perf_counter() - t

        setattr(obj, name, timed)


def bench(preset: str, source: str, repeats: int) -> dict:
    model, frames, intr = _build(preset, source)
    timer = _Timer(model)
    runs = []
    with torch.no_grad():
        model(frames, intr)  # warm-up
        for _ in range(repeats):
            timer.totals.clear()
            t = time.perf_counter()
            model(frames, intr)
            runs.append((time.perf_counter() - t, dict(timer.totals)))
    runs.sort(key=lambda r: r[0])
    total, parts = runs[len(runs) // 2]
    parts = {k: v * 1e3 for k, v in parts.items()}
    parts["other"] = total * 1e3 - sum(parts.values())
    return {
        "seconds": statistics.median(r[0] for r in runs),
        "peak_mb": peak_mb("bench.model:setup", preset, source),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "breakdown_ms": parts,
        "rounds": model.cfg_model.iters,
        "frames": int(frames.shape[0]),
        "size": list(frames.shape[-2:]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--repeats", type=int, default=3, help="timed inferences per variant (median reported)")
    args = p.parse_args(argv)
    results: dict = {"threads": torch.get_num_threads(), "repeats": args.repeats}
    for preset in PRESETS:
        results[preset] = {source: bench(preset, source, args.repeats) for source in SOURCES}
    print(f"threads: {results['threads']}, 5 frames at 240x320, 5 rounds, medians of {args.repeats}")
    parts = ["features", "cost volume", "3D matching", "motion: flow + GN", "other"]
    print(f"{'preset':<7}{'flow':<9}{'s':>7}{'peak MB':>9}{'params M':>9}" + "".join(f"{k:>19}" for k in parts))
    for preset in PRESETS:
        for source in SOURCES:
            r = results[preset][source]
            print(f"{preset:<7}{source:<9}{r['seconds']:>7.2f}{r['peak_mb']:>9.0f}{r['parameters_m']:>9.2f}"
                  + "".join(f"{r['breakdown_ms'].get(k, 0.0):>16.0f} ms" for k in parts))
    small = results["small"]
    ok = all(small[s]["seconds"] <= 2.0 and small[s]["peak_mb"] <= 3072 for s in SOURCES)
    print(f"target small <= 2 s and <= 3 GB: {'met' if ok else 'NOT met'}")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The depth module's optional parts (temporal fusion, normals) on the validation suite's sequences
with ground-truth depth: keyframe AbsRel, delta < 1.25, `v2d eval consistency`, the normals' angular
error and the run's wall time, per variant, side by side.

    python -m bench.depth_parts --variant none runs/seq-none/model.pt \\
        --variant tf runs/seq-tf/model.pt depth.temporal_fusion=true ... --json bench_out/depth_parts.json
        [--only NAME ...] [--work DIR]

A variant is a name, a weights file and config overrides. Each sequence (`bench.suite.SEQUENCES`,
the ones with depth ground truth) is run as a user runs it (`v2d run FOLDER --out OUT --resize
240x320 --set model.weights=W ...`, a fresh subprocess), the variants one after the other on the
same sequence so that their wall times are measured under the same conditions. The first variant
is the baseline of the summary's ratios (AbsRel and wall time, medians over the real sequences).

Metrics per sequence (keyframes with ground truth): AbsRel and delta < 1.25 median-scaled per
keyframe (`v2d.metrics.depth_metrics`) against the ground truth resized to 240x320 (nearest), their
mean over keyframes; `v2d eval consistency`'s pooled median relative difference; with normals
(normal/ written), the median angular error against the normals of the ground-truth depth
(`v2d.geometry.normals.normals_from_depth` at 240x320, where valid), pooled over the keyframes.

Timings need an otherwise idle machine; the depth figures do not (the runs are synchronous).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench._common import write_results
from bench.refine import DEPTH_SEQUENCES
from bench.suite import DATA, SEQUENCES, SIZE, prepared_sequences, run_v2d

REAL = ["7s-s2", "7s-late-s4", "7s-late-s8", "scannet", "tum-cabinet"]


def depth_figures(out: Path, prep) -> dict:
    """AbsRel, delta < 1.25, consistency and the normals' error of the run in `out`."""
    import cv2
    import torch

    from slam.consistency import depth_consistency
    from v2d.geometry.normals import angular_error, normals_from_depth
    from v2d.io.results import load_run
    from v2d.metrics import depth_metrics

    run = load_run(out)
    rows, errors = [], []
    intr = torch.from_numpy(run.intrinsics).double()
    for k, name in enumerate(run.keyframe_files):
        gt = prep.depth(int(name))
        if gt is None or not (gt > 0).any():
            continue
        gt = cv2.resize(gt, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_NEAREST)
        rows.append(depth_metrics(run.depth(k), gt))
        normal = run.normal(k)
        if normal is not None:
            n_gt, ok = normals_from_depth(torch.from_numpy(gt).double(), intr)
            n = torch.from_numpy(normal).double()
            ok &= n.norm(dim=-1) > 0.5
            errors.append(angular_error(n[ok], n_gt[ok]).numpy())
    consistency, _ = depth_consistency(run)
    return {
        "abs_rel": float(np.mean([r["abs_rel"] for r in rows])) if rows else None,
        "delta1": float(np.mean([r["delta1"] for r in rows])) if rows else None,
        "consistency": consistency["median_rel_diff"],
        "normal_deg": float(np.median(np.concatenate(errors))) if errors else None,
    }


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows: list[dict], variants: list[str]) -> str:
    head = f"{'sequence':12} " + " ".join(f"{v[:10]:>10} {'d1':>5} {'cons':>6} {'deg':>5} {'s':>5}" for v in variants)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for v in variants:
            x = r["variants"].get(v, {})
            cells.append(f"{_f(x.get('abs_rel'), '.4f'):>10} {_f(x.get('delta1'), '.3f'):>5} "
                         f"{_f(x.get('consistency'), '.4f'):>6} {_f(x.get('normal_deg'), '.1f'):>5} "
                         f"{_f(x.get('wall_s'), '.0f'):>5}")
        lines.append(f"{r['name']:12} " + " ".join(cells))
    return "\n".join(lines)


def summarise(rows: list[dict], variant: str, baseline: str) -> dict:
    """Medians over the real sequences of AbsRel and wall-time ratios against the baseline variant."""
    real = [r for r in rows if r["name"] in REAL and "abs_rel" in r["variants"].get(variant, {})
            and r["variants"][variant]["abs_rel"] is not None and r["variants"][baseline].get("abs_rel")]
    rel = [r["variants"][variant]["abs_rel"] / r["variants"][baseline]["abs_rel"] for r in real]
    time = [r["variants"][variant]["wall_s"] / r["variants"][baseline]["wall_s"] for r in real]
    return {"sequences": len(real),
            "median_abs_rel_ratio": statistics.median(rel) if rel else None,
            "worst_abs_rel_ratio": max(rel) if rel else None,
            "median_time_ratio": statistics.median(time) if time else None,
            "mean_abs_rel": statistics.fmean(r["variants"][variant]["abs_rel"] for r in real) if real else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME WEIGHTS [KEY=VALUE]",
                   help="a variant: a name, a weights file, config overrides (repeatable; the first is the baseline)")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--data", type=Path, default=DATA, help="the shared real data (default ../shared/data)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=DEPTH_SEQUENCES, help="these sequences only")
    p.add_argument("--work", type=Path, help="keep the runs here")
    args = p.parse_args(argv)
    if any(len(v) < 2 for v in args.variant):
        p.error("--variant needs a name and a weights file")
    variants = {v[0]: [f"model.weights={v[1]}", *v[2:]] for v in args.variant}
    names = list(variants)
    chosen = [s for s in SEQUENCES if s.name in (args.only or DEPTH_SEQUENCES)]
    rows = []
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="v2d-depth-parts-") as tmp:
        base = args.work or Path(tmp)
        for seq, prep, work in prepared_sequences(chosen, args.data, base):
            row = {"name": seq.name, "variants": {}}
            for name, overrides in variants.items():
                out = work / f"run-{name}"
                if out.exists():
                    shutil.rmtree(out)
                run = run_v2d(prep, out, root, overrides)
                if "error" in run:
                    print(f"{seq.name} {name}: v2d run failed: {run['error']}")
                    row["variants"][name] = {"error": run["error"]}
                    continue
                row["variants"][name] = {"wall_s": run["wall_s"], "fps": run["fps"], "keyframes": run["keyframes"],
                                         "ate_cm": run.get("ate_cm"), **depth_figures(out, prep)}
            rows.append(row)
            print(format_table([row], names).splitlines()[2])
    print()
    print(format_table(rows, names))
    results = {"sequences": rows, "variants": variants,
               "summary": {v: summarise(rows, v, names[0]) for v in names}}
    for v, s in results["summary"].items():
        print(f"{v}: {json.dumps(s)}")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(main())

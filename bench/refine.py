"""Test-time refinement on the validation suite's sequences with depth ground truth: AbsRel and
`v2d eval consistency` before and after, and the refinement's wall time beside the SLAM run's.

    python -m bench.refine --json bench_out/refine.json [--only NAME ...] [--variant NAME KEY=VALUE ...]
        [--work DIR]

Each sequence (`bench.suite.SEQUENCES`, the ones with ground-truth depth) is run once as a user runs
it (`v2d run FOLDER --out OUT --resize 240x320`, in a subprocess); then, for each variant (the
default configuration is "default"; `--variant lr3 refine.lr=3e-4` adds one), a copy of the output
is refined (`v2d refine COPY --set ...`, in a subprocess, timed). AbsRel is the suite's (median
scaled per keyframe, against the ground truth at 240x320). `--work DIR` keeps the runs and reuses
a finished one (its `summary.json` present) on the next call, so variants can be added later.

Timings need an otherwise idle machine; the AbsRel and consistency figures do not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench._common import v2d_usage, write_results
from bench.suite import DATA, SEQUENCES, _abs_rel, prepared_sequences, run_v2d

DEPTH_SEQUENCES = ["7s-s2", "7s-late-s4", "7s-late-s8", "scannet", "tum-cabinet", "syn-fast", "syn-loop"]


def refine_row(prep, out: Path, copy: Path, overrides: list[str]) -> dict:
    """Refine a copy of the run in `out`; AbsRel, consistency and seconds before and after."""
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(out, copy)
    args = ["refine", str(copy), *[a for o in overrides for a in ("--set", o)]]
    try:
        usage = v2d_usage(args)
    except RuntimeError as exc:
        return {"error": str(exc).strip().splitlines()[-1][:300]}
    r = json.loads((copy / "summary.json").read_text())["refine"]
    return {"abs_rel": _abs_rel(copy, prep), "wall_s": usage.wall_s, "kept": r["kept"], "steps": r["steps"],
            "consistency_before": r["consistency_before"]["median_rel_diff"],
            "consistency_after": r["consistency_after"]["median_rel_diff"],
            "error_network": r["error_network"], "error_adapted": r["error_adapted"]}


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows: list[dict], variants: list[str]) -> str:
    head = f"{'sequence':12} {'kf':>4} {'run s':>6} {'AbsRel':>7} " + " ".join(
        f"{v[:14]:>14} {'x':>4} {'cons':>11} {'s':>5}" for v in variants)
    lines = [head, "-" * len(head)]
    for r in rows:
        run = r["run"]
        line = f"{r['name']:12} {run['keyframes']:>4} {run['wall_s']:>6.0f} {_f(run['abs_rel'], '.4f'):>7} "
        for v in variants:
            x = r["refine"][v]
            if "error" in x:
                line += f" {'error':>14} {'':>4} {'':>11} {'':>5}"
                continue
            ratio = x["abs_rel"] / r["run"]["abs_rel"] if r["run"]["abs_rel"] else None
            cons = f"{x['consistency_before']:.3f}>{x['consistency_after']:.3f}"
            kept = "" if x["kept"] else "*"
            line += f" {_f(x['abs_rel'], '.4f') + kept:>14} {_f(ratio, '.2f'):>4} {cons:>11} {x['wall_s']:>5.0f}"
        lines.append(line)
    lines.append("(* = the held-out check kept the run's depth; x = AbsRel after / before; cons = `v2d eval "
                 "consistency` median relative difference before > after; s = seconds)")
    return "\n".join(lines)


def summarise(rows: list[dict], variant: str) -> dict:
    ok = [r for r in rows if "error" not in r["refine"][variant] and r["run"]["abs_rel"]]
    ratios = [r["refine"][variant]["abs_rel"] / r["run"]["abs_rel"] for r in ok]
    return {"median_abs_rel_ratio": statistics.median(ratios) if ratios else None,
            "worst_abs_rel_ratio": max(ratios) if ratios else None,
            "consistency_better": sum(r["refine"][variant]["consistency_after"]
                                      < r["refine"][variant]["consistency_before"] for r in ok),
            "sequences": len(ok),
            "time_ratio_median": statistics.median([r["refine"][variant]["wall_s"] / r["run"]["wall_s"] for r in ok])
            if ok else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--data", type=Path, default=DATA, help="the shared real data (default ../shared/data)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=DEPTH_SEQUENCES, help="these sequences only")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="a refinement variant: a name, then config overrides (repeatable)")
    p.add_argument("--no-default", action="store_true", help="leave out the default configuration")
    p.add_argument("--work", type=Path, help="keep (and reuse) the runs here")
    args = p.parse_args(argv)
    variants = ({} if args.no_default else {"default": []}) | {v[0]: v[1:] for v in args.variant}
    names = args.only or DEPTH_SEQUENCES
    chosen = [s for s in SEQUENCES if s.name in names]
    rows = []
    with tempfile.TemporaryDirectory(prefix="v2d-refine-") as tmp:
        base = args.work or Path(tmp)
        for seq, prep, work in prepared_sequences(chosen, args.data, base):
            out = work / "run"
            cached = work / "run.json"
            if (out / "summary.json").is_file() and cached.is_file():
                run = json.loads(cached.read_text())
            else:
                if out.exists():
                    shutil.rmtree(out)
                run = run_v2d(prep, out, Path(__file__).resolve().parents[1], [])
                cached.write_text(json.dumps(run))
            if "error" in run:
                print(f"{seq.name}: v2d run failed: {run['error']}")
                continue
            row = {"name": seq.name, "run": run, "refine": {}}
            for name, overrides in variants.items():
                row["refine"][name] = refine_row(prep, out, work / f"refined-{name}", overrides)
            rows.append(row)
            print("\n".join(format_table([row], list(variants)).splitlines()[2:3]))
    print()
    print(format_table(rows, list(variants)))
    results = {"sequences": rows, "variants": variants, "summary": {v: summarise(rows, v) for v in variants}}
    for v, s in results["summary"].items():
        print(f"{v}: {json.dumps(s)}")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(main())

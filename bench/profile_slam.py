"""Where a SLAM run's time goes: cProfile of `v2d run` in synchronous mode, by engine stage.

    python -m bench.profile_slam [--data ../shared/data/7scenes-redkitchen] [--stride 2]
        [--max-frames 150] [--set KEY=VALUE ...] [--json FILE] [--pstats FILE]

cProfile sees one thread, so the run is synchronous (`slam.concurrent=false`): the same work the
concurrent engine splits over two threads, stage by stage. The table gives each stage's
cumulative seconds, calls and seconds per call, and its share of the tracked time; it is the
table kept in docs/PERFORMANCE.md. Profiling slows Python-heavy code more than kernels: read the
shares, not the absolute seconds (the frames/s of a run are measured by bench/slam.py).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

from bench._common import ROOT, write_results

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "7scenes-redkitchen"

# (label, file suffix, function name): the engine's stages and the library calls inside them
STAGES = [
    ("whole run (tracking loop)", "slam/run.py", "track_frames"),
    ("  tracking a frame", "slam/tracker.py", "track"),
    ("    DIS flow (all callers)", "v2d/flow.py", "dis_flow"),
    ("    forward-backward targets", "v2d/flow.py", "fb_targets"),
    ("  new keyframe (splat)", "slam/mapper.py", "new_keyframe"),
    ("  mapping keyframes", "slam/mapper.py", "map_keyframes"),
    ("    window optimisation", "slam/mapper.py", "optimise_window"),
    ("    keyframe depth", "slam/keyframe_depth.py", "compute"),
    ("      depth network", "slam/keyframe_depth.py", "_network"),
    ("      window splats (scale lock, fusion)", "slam/keyframe_depth.py", "_window_depths"),
    ("    bundle adjustment", "slam/mapper.py", "bundle_adjust"),
    ("    edge gating (induced flow)", "slam/mapper.py", "_gate_pairs"),
    ("    retiring keyframes", "slam/mapper.py", "_retire"),
    ("  Gauss-Newton layer (all callers)", "v2d/geometry/gauss_newton.py", "gauss_newton"),
    ("  texture test", "slam/measurements.py", "texture"),
    ("writing outputs", "slam/run.py", "write_outputs"),
]


def stage_table(stats: pstats.Stats) -> list[dict]:
    """Cumulative time and calls of each stage found in the profile."""
    rows = []
    for label, suffix, name in STAGES:
        hits = [(k, v) for k, v in stats.stats.items() if k[0].endswith(suffix) and k[2] == name]
        calls = sum(v[1] for _, v in hits)
        cum = sum(v[3] for _, v in hits)
        rows.append({"stage": label, "calls": calls, "seconds": cum, "per_call_ms": 1e3 * cum / max(calls, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="input sequence (7-Scenes by default)")
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=150)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", metavar="FILE", help="write the table here")
    parser.add_argument("--pstats", metavar="FILE", help="keep the raw profile here")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"input not found: {args.data}")
        return 1
    from tools.cli import main as v2d

    sets = [a for o in ["slam.concurrent=false", *args.overrides] for a in ("--set", o)]
    with tempfile.TemporaryDirectory(prefix="v2d-profile-") as tmp:
        prof = cProfile.Profile()
        prof.enable()
        rc = v2d(["run", str(args.data), "--out", str(Path(tmp) / "out"), "--stride", str(args.stride),
                  "--max-frames", str(args.max_frames), "-q", *sets])
        prof.disable()
    if rc != 0:
        return rc
    if args.pstats:
        prof.dump_stats(args.pstats)
    rows = stage_table(pstats.Stats(prof))
    total = rows[0]["seconds"] or 1.0
    print(f"{'stage':44s} {'calls':>6s} {'seconds':>8s} {'ms/call':>8s} {'share':>6s}")
    for r in rows:
        print(f"{r['stage']:44s} {r['calls']:6d} {r['seconds']:8.1f} {r['per_call_ms']:8.1f} "
              f"{100 * r['seconds'] / total:5.1f}%")
    write_results(args.json, {"frames": args.max_frames, "stride": args.stride, "overrides": args.overrides,
                              "stages": rows})
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(main())

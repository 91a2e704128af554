"""Kernel benchmarks: the C++ extension vs the pure-torch references, side by side in one run.

    python -m bench.kernels --json bench_out/kernels.json [--repeats 7]   (from the repository root)

Forward + backward, median wall time of `--repeats` runs after a warm-up, and peak resident memory
of one run in a fresh process (see bench/_common.py). Prints a table and writes
{"gn_accumulate": {"speedup": x, "memory_ratio": y, ...}, "backproject_volume": {...}, "ba_reduce": {...}}.
Targets (issue 2): gn_accumulate at 240x320, E=8: >= 10x faster and >= 10x less peak memory;
backproject_volume at C=32, D=32, 60x80, M=4: not slower and >= 2x less peak memory.
ba_reduce (the window bundle adjustment's per-pixel terms): a SLAM window at 240x320, stride 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench._ba import bench_ba_reduce
from bench._common import write_results
from bench._gn import bench_gn_accumulate
from bench._volume import bench_backproject_volume


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per variant (median reported)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kernels import ops

    if not ops.extension_available():
        print("kernels._C is not built: nothing to compare (run `make bench`, which builds it)", file=sys.stderr)
        return 1
    results = {
        "threads": torch.get_num_threads(),
        "gn_accumulate": bench_gn_accumulate(args.repeats),
        "backproject_volume": bench_backproject_volume(args.repeats),
        "ba_reduce": bench_ba_reduce(args.repeats),
    }
    print(f"threads: {results['threads']}, repeats: {args.repeats} (medians)")
    print(f"{'op':<22}{'size':<12}{'kernel ms':>11}{'torch ms':>11}{'speedup':>9}{'kernel MB':>11}{'torch MB':>10}"
          f"{'mem ratio':>11}")
    for size, r in results["gn_accumulate"]["sizes"].items():
        print(f"{'gn_accumulate':<22}{size:<12}{r['kernel_ms']:>11.1f}{r['reference_ms']:>11.1f}{r['speedup']:>9.1f}"
              f"{r['kernel_peak_mb']:>11.1f}{r['reference_peak_mb']:>10.1f}{r['memory_ratio']:>11.1f}")
    v = results["backproject_volume"]
    print(f"{'backproject_volume':<22}{'60x80':<12}{v['kernel_ms']:>11.1f}{v['reference_ms']:>11.1f}{v['speedup']:>9.2f}"
          f"{v['kernel_peak_mb']:>11.1f}{v['reference_peak_mb']:>10.1f}{v['memory_ratio']:>11.2f}")
    b = results["ba_reduce"]
    print(f"{'ba_reduce (float64)':<22}{'120x160':<12}{b['kernel_ms']:>11.1f}{b['reference_ms']:>11.1f}"
          f"{b['speedup']:>9.1f}{b['kernel_peak_mb']:>11.1f}{b['reference_peak_mb']:>10.1f}{b['memory_ratio']:>11.1f}")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

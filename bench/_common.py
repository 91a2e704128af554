"""Measurement helpers shared by the benchmarks: median wall time, peak resident memory, and the
wall time, peak memory and CPU time of a child process (`run_child`, `v2d_usage`).

Peak memory on CPU: torch has no allocator statistics for the CPU, so each variant runs once in a
fresh subprocess that builds its inputs, runs once to warm up, resets the kernel's resident-memory high-water mark
(writing 5 to /proc/self/clear_refs, Linux >= 4.0), runs, and reports VmHWM minus the resident
size before the run. A fresh process keeps one variant's freed-but-cached memory from hiding the
other's.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "ChildUsage", "median_ms", "peak_mb", "run_child", "v2d_usage", "write_results"]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def write_results(path: str | None, results: dict) -> None:
    """Write a benchmark's results as JSON to `path` (if given) and say so."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


class ChildUsage(NamedTuple):
    """What a child process cost (see `run_child`)."""

    wall_s: float  # end to end, start-up included
    peak_rss_mb: float  # the child's ru_maxrss
    cpu_s: float  # the child's user + system time (all threads): steadier than wall time on a busy machine


def run_child(module: str, args: list[str], what: str, root: Path = ROOT) -> ChildUsage:
    """Run `python -m MODULE ARGS` in a subprocess and measure it.

    Raises RuntimeError("WHAT failed (exit code C):\n<stderr>") when the child exits with a non-zero code.
    """
    t = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=root,
                                stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        log.seek(0)
        err = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}):\n{err}")
    return ChildUsage(wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime)  # KiB -> MiB


def v2d_usage(args: list[str], root: Path = ROOT) -> ChildUsage:
    """Run `v2d ARGS` in a subprocess (the code of the checkout `root`) and measure it. Raises
    RuntimeError on failure."""
    return run_child("tools.cli", [*args, "-q"], f"v2d {' '.join(args)}", root)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(target: str, *args: str) -> float:
    """Peak extra resident memory (MB) of one run of the callable returned by `target(*args)`.

    `target` is "module:function"; the function does the set-up (not counted) and returns a
    zero-argument callable, whose run is measured in a fresh subprocess.
    """
    out = subprocess.run(
        [sys.executable, "-m", "bench._common", target, *args],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _child(target: str, *args: str) -> None:
    module, func = target.split(":")
    run = getattr(importlib.import_module(module), func)(*args)
    run()  # warm-up: one-time costs (lazy library loading, thread pools) are not the op's memory
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM") - before
    print(json.dumps({"peak_mb": peak / 1024.0}))


if __name__ == "__main__":
    _child(*sys.argv[1:])

"""`make cuda-check`: check that every CUDA source of kernels._C *compiles* (not that it works).

This machine class has nvcc but no GPU and a CPU build of torch, so the CUDA extension cannot be
linked or run here (NOTES.md). What can be checked honestly:

1. every `kernels/csrc/*.cu` compiles with `nvcc -c` and the flags a CUDA build of the extension
   uses (NOTES.md), into a temporary directory;
2. `tools/cuda_check_broken.cu`, a deliberately broken file (a `__device__` function calling a
   host function), is rejected by nvcc with that diagnostic, so a pass above means something;
3. each `<op>_cuda.cu` (and its `<op>_cpu.cpp` twin) includes the shared `<op>.h`, so the
   per-pixel math that the CPU tests cover is the math the GPU compiles, not a fork of it.

Correctness of the CUDA kernels (parity with the CPU ops, gradcheck) is covered by the CUDA-only
tests, which run only on a machine with a GPU.

Prints one line per file with its verdict and seconds; on a failure prints the compiler's output.
Exit code 0 only if everything passed, 1 otherwise (including when nvcc is not on PATH).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "kernels" / "csrc"
BROKEN = Path(__file__).resolve().parent / "cuda_check_broken.cu"
# What nvcc must say about BROKEN: being rejected for another reason (a bad flag, a missing
# include) would make the self-test pass without testing anything.
BROKEN_DIAGNOSTIC = "calling a __host__ function"

NVCC_FLAGS = [
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-Xcompiler",
    "-fPIC",
    "-gencode",
    "arch=compute_90,code=sm_90",
    "-D_GLIBCXX_USE_CXX11_ABI=1",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C",
    "-DV2D_WITH_CUDA",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


@dataclass
class Result:
    name: str
    ok: bool
    verdict: str
    seconds: float = 0.0
    output: str = ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cuda_check",
        description="Check that the CUDA sources in kernels/csrc compile with nvcc (compiles, not works: "
        "nothing is linked or run). Also requires nvcc to reject tools/cuda_check_broken.cu and each "
        "<op>_cuda.cu to include its shared <op>.h.",
    )
    parser.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=1,
        metavar="N",
        help="parallel nvcc processes (default 1: one compile takes 1-2 min and ~3 GB of memory)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="compile only this source of kernels/csrc (e.g. gn_cuda or gn_cuda.cu); repeatable. "
        "The broken-file self-test always runs (it takes about a second).",
    )
    return parser


def include_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths  # imported here: torch is slow to import

    dirs = [*include_paths(), sysconfig.get_paths()["include"], str(CSRC)]
    return [f"-I{d}" for d in dirs]


def select_sources(only: list[str] | None) -> list[Path]:
    sources = sorted(CSRC.glob("*.cu"))
    if not only:
        return sources
    by_name = {p.name: p for p in sources} | {p.stem: p for p in sources}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        names = ", ".join(p.name for p in sources) or "none"
        raise ValueError(f"--only: no source named {', '.join(unknown)} in {CSRC} (have: {names})")
    return sorted({by_name[n] for n in only})


def check_shared_header(source: Path) -> Result | None:
    """`<op>_cuda.cu` and `<op>_cpu.cpp` must both include `<op>.h`; None for other file names."""
    if not source.name.endswith("_cuda.cu"):
        return None
    op = source.name.removesuffix("_cuda.cu")
    header = f"{op}.h"
    name = f"{source.name} includes {header}"
    if not (CSRC / header).is_file():
        return Result(name, False, f"FAILED: {header} does not exist (the per-pixel math belongs in it)")
    pattern = re.compile(rf'^\s*#\s*include\s*"{re.escape(header)}"', re.MULTILINE)
    missing = [p.name for p in (source, CSRC / f"{op}_cpu.cpp") if p.is_file() and not pattern.search(p.read_text())]
    if missing:
        return Result(name, False, f'FAILED: {", ".join(missing)} do(es) not #include "{header}" (forked math?)')
    return Result(name, True, "ok")


def compile_one(nvcc: str, source: Path, flags: list[str], out_dir: Path, must_fail: bool) -> Result:
    cmd = [nvcc, "-c", str(source), *flags, "-o", str(out_dir / f"{source.stem}.o")]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - start
    output = (proc.stdout + proc.stderr).strip()
    if not must_fail:
        if proc.returncode == 0:
            return Result(source.name, True, "compiled", seconds)
        return Result(source.name, False, f"FAILED (nvcc exit {proc.returncode})", seconds, output)
    if proc.returncode == 0:
        return Result(source.name, False, "FAILED: compiled, but nvcc must reject it", seconds, output)
    if BROKEN_DIAGNOSTIC not in output:
        verdict = f"FAILED: rejected, but without the expected diagnostic {BROKEN_DIAGNOSTIC!r}"
        return Result(source.name, False, verdict, seconds, output)
    return Result(source.name, True, "rejected, as required", seconds)


def report(result: Result) -> None:
    timing = f"{result.seconds:7.1f} s" if result.seconds else " " * 9
    print(f"{result.name:<40} {timing}  {result.verdict}", flush=True)
    if not result.ok and result.output:
        print(result.output, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        print(f"cuda_check: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 1
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print(
            "cuda_check: nvcc is not on PATH; install the CUDA toolkit (CI has it) or add its bin/ to PATH",
            file=sys.stderr,
        )
        return 1
    try:
        sources = select_sources(args.only)
    except ValueError as err:
        print(f"cuda_check: {err}", file=sys.stderr)
        return 1
    if not sources:
        print(f"cuda_check: no .cu files in {CSRC}", file=sys.stderr)
        return 1

    results = [r for r in map(check_shared_header, sources) if r is not None]
    for r in results:
        report(r)

    flags = [*NVCC_FLAGS, *include_flags()]
    jobs = [(BROKEN, True), *((s, False) for s in sources)]  # the broken file first: it is fast
    with tempfile.TemporaryDirectory(prefix="v2d-cuda-check-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(compile_one, nvcc, src, flags, Path(tmp), must_fail) for src, must_fail in jobs]
        for future in futures:
            result = future.result()
            report(result)
            results.append(result)

    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"cuda_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"cuda_check: ok ({len(sources)} CUDA source(s) compile; the broken file is rejected)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

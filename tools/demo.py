"""`v2d demo`: run v2d on the embedded synthetic sequence and write the results."""

from __future__ import annotations

import argparse
import json

from v2d.config import V2DConfig


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", parents=parents, help="run on the embedded synthetic sequence (no data or weights needed)",
        description="Render the embedded synthetic sequence, run the V2D model (shipped weights; flow source "
        "from the config) on a clip of it with no pose or depth given, and write trajectory.txt, depth/ and "
        "summary.json with errors against the synthetic ground truth.",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: demo_out)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: V2DConfig) -> int:
    from v2d.demo import run_demo

    summary = run_demo(cfg, args.out)
    brief = {k: summary[k] for k in ("frames", "tracking", "depth", "seconds")}
    print(json.dumps(brief, indent=2))
    print(f"outputs written to {args.out}/")
    return 0

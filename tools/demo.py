"""`v2d demo`: run v2d on the embedded synthetic sequence and write the results."""

from __future__ import annotations

import argparse
import json

from slam.config import RunConfig


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", parents=parents, help="run SLAM on the embedded synthetic sequence (no data needed)",
        description="Render the embedded synthetic sequence, run SLAM on it (shipped weights, flow source from "
        "the config) and write trajectory.txt, depth/, cloud.ply and summary.json with the errors against the "
        "synthetic ground truth (ate_rmse after Sim3 alignment, path_length, keyframe depth AbsRel), and demo.png, an "
        "offscreen Open3D view of the cloud, keyframe cameras and both trajectories (skipped with a warning where "
        "Open3D cannot render).",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: demo_out)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    from slam.demo import run_demo

    summary = run_demo(cfg, args.out, progress=not args.quiet)
    brief = {k: summary[k] for k in ("frames", "keyframes", "ate_rmse", "path_length", "ate_percent_of_path",
                                     "fps", "seconds")}
    brief["depth_abs_rel"] = summary["depth"]["abs_rel"]
    print(json.dumps(brief, indent=2))
    print(f"outputs written to {args.out}/")
    return 0

"""`v2d refine DIR`: test-time refinement of a finished run's keyframe depth (see slam/refine.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from slam.config import RunConfig


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """--refine-steps / --refine-minutes / --weights, shared by `v2d run --refine` and `v2d refine`."""
    p.add_argument("--refine-steps", type=int, default=None, metavar="N",
                   help="refinement steps (default refine.steps of the config)")
    p.add_argument("--refine-minutes", type=float, default=None, metavar="M",
                   help="stop the refinement after M minutes (default refine.minutes; 0 = no limit)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="start from these weights (e.g. an earlier run's adapted.pt) instead of the configured ones")


def with_budget(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The config with --refine-steps / --refine-minutes applied (validated like any other value)."""
    from v2d.config import validate

    changes = {}
    if args.refine_steps is not None:
        changes["steps"] = args.refine_steps
    if args.refine_minutes is not None:
        changes["minutes"] = args.refine_minutes
    cfg = dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, **changes))
    validate(cfg)
    return cfg


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "refine", parents=parents, help="fine-tune the depth module on a finished run's video and rewrite its depth",
        description="Test-time refinement (SfM-TTR, Consistent Video Depth): fine-tune a copy of the depth module "
        "on the run's own keyframes (triangulated points, multi-view consistency, a pull toward the run's depth; no "
        "ground truth), predict every keyframe's depth again and rewrite depth/, cloud.ply and summary.json (its "
        "'refine' entry: steps, seconds, held-out error and `v2d eval consistency` before and after); the adapted "
        "weights go to DIR/adapted.pt. If the held-out error says the network got worse, the run's depth is kept. "
        "DIR is rewritten all at once when refinement succeeds.",
    )
    p.add_argument("run_dir", metavar="DIR", help="output directory of `v2d run`")
    add_budget_arguments(p)
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu (default), cuda or cuda:N")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    from slam.refine import refine_run
    from tools.run import _device
    from v2d.io.results import load_run
    from v2d.io.writers import staged_output

    device = _device(args.device)
    cfg = with_budget(cfg, args)
    load_run(args.run_dir)  # a folder that is not a run fails before a stage is made
    with staged_output(args.run_dir) as stage:
        summary = refine_run(args.run_dir, stage, cfg, weights=args.weights, progress=not args.quiet, device=device)
    r = summary["refine"]
    brief = {k: r[k] for k in ("kept", "steps", "seconds_total", "error_network", "error_adapted")}
    brief["consistency"] = [r["consistency_before"]["median_rel_diff"], r["consistency_after"]["median_rel_diff"]]
    print(json.dumps(brief))
    print(f"outputs rewritten in {args.run_dir}/")
    return 0

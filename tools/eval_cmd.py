"""`v2d eval traj|depth|consistency`: trajectory error (evo), depth error, depth consistency."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Any

from slam.config import RunConfig
from v2d.errors import InputError
from v2d.io.trajectory import FORMATS
from v2d.metrics import ALIGNMENTS, CROPS


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval", help="evaluate trajectories, depth maps and depth consistency",
        description="Evaluate a trajectory against ground truth (evo), depth maps against ground truth, or the "
        "consistency of a run's keyframe depths with its poses (no ground truth needed).",
    )
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True, parser_class=type(p))

    t = what.add_parser(
        "traj", parents=parents, help="ATE and RPE of a trajectory against ground truth (evo)",
        description="Associate timestamps, align (Sim3 by default, the monocular convention) and report ATE "
        "(RMSE, mean, median, max) and RPE (per frame and per metre), computed with evo. Formats: TUM, KITTI, "
        "EuRoC CSV, 7-Scenes pose folders, or a `v2d run` output directory (its trajectory.txt).",
    )
    t.add_argument("est", metavar="EST", help="estimated trajectory (file, 7-Scenes folder or v2d output dir)")
    t.add_argument("gt", metavar="GT", help="ground-truth trajectory")
    t.add_argument("--align", choices=ALIGNMENTS, default="sim3",
                   help="alignment before the errors (default sim3: rotation, translation and scale)")
    t.add_argument("--est-format", choices=FORMATS, default="auto")
    t.add_argument("--gt-format", choices=FORMATS, default="auto")
    t.add_argument("--max-diff", type=float, default=0.01, metavar="S",
                   help="largest timestamp difference of associated poses in seconds (default 0.01, as evo)")
    t.add_argument("--json", metavar="FILE", help="write the results as JSON")
    t.add_argument("--plot", metavar="FILE.png", help="write a top view and the error over time")
    t.set_defaults(handler=run_traj)

    d = what.add_parser(
        "depth", parents=parents, help="AbsRel, RMSE, delta<1.25, ... of depth maps against ground truth",
        description="Match depth maps to ground truth by the frame number in their names and report AbsRel, SqRel, "
        "RMSE, RMSE log, log10, SI log and delta < 1.25^k (mean over frames). PRED/GT: a v2d output directory, a "
        "folder of .npy / 16-bit .png depth maps, a 7-Scenes sequence, or single files.",
    )
    d.add_argument("pred", metavar="PRED", help="predicted depth (folder, v2d output directory or file)")
    d.add_argument("gt", metavar="GT", help="ground-truth depth (folder, 7-Scenes sequence or file)")
    d.add_argument("--scaling", choices=("median", "global", "none"), default="median",
                   help="median: per-frame median scaling (monocular default); global: one scale for the sequence; "
                   "none: metric depth")
    d.add_argument("--min-depth", type=float, default=1e-3, metavar="M", help="ignore ground truth below M")
    d.add_argument("--max-depth", type=float, default=math.inf, metavar="M", help="ignore ground truth above M")
    d.add_argument("--crop", choices=("none", *CROPS), default="none",
                   help="evaluation crop (fractions of the image, any resolution)")
    d.add_argument("--resize-pred", action="store_true",
                   help="resize predictions to the ground truth's size (nearest pixel) instead of refusing")
    d.add_argument("--gt-png-scale", type=float, default=1000.0, metavar="S",
                   help="16-bit PNG ground truth in a plain folder is divided by S (default 1000: mm); dataset "
                   "sequences (7-Scenes, TUM, ScanNet) use their own unit")
    d.add_argument("--pred-png-scale", type=float, default=1000.0, metavar="S",
                   help="16-bit PNG predictions are divided by S (default 1000, as v2d writes them)")
    d.add_argument("--out", metavar="DIR", help="write per_frame.csv, summary.json and errors/*.png here")
    d.add_argument("--error-images", type=int, default=4, metavar="N",
                   help="colour-mapped error images for N frames spread over the sequence (with --out; default 4)")
    d.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    d.set_defaults(handler=run_depth)

    c = what.add_parser(
        "consistency", parents=parents, help="agreement of a run's keyframe depths across keyframes (no GT)",
        description="Move each keyframe's depth into its next keyframes with the estimated poses and compare with "
        "their depth: median relative difference and the fraction within the tolerance (pooled over pixels).",
    )
    c.add_argument("run_dir", metavar="OUT_DIR", help="output directory of `v2d run` or `v2d demo`")
    c.add_argument("--neighbours", type=int, default=2, metavar="N", help="compare each keyframe with the next N")
    c.add_argument("--tolerance", type=float, default=0.05, metavar="F", help="relative tolerance (default 0.05)")
    c.add_argument("--json", metavar="FILE", help="write the summary and the per-pair rows as JSON")
    c.set_defaults(handler=run_consistency)


def _fmt(v: Any, scale: float = 1.0, digits: int = 4) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def run_traj(args: argparse.Namespace, cfg: RunConfig) -> int:
    from v2d.evaluation import plot_trajectory, trajectory_report
    from v2d.io.writers import check_output_path, write_json

    # Output paths are checked before any work, so a typo leaves nothing behind.
    if args.plot:
        check_output_path(args.plot, ".png", "--plot")
    if args.json:
        check_output_path(args.json, None, "--json")
    res, arrays = trajectory_report(args.est, args.gt, args.est_format, args.gt_format, args.align, args.max_diff)
    if args.plot:
        plot_trajectory(arrays, res, args.plot)
    if args.json:
        write_json(args.json, res)
    rf, rm = res["rpe_frame"], res["rpe_metre"]
    lines = [
        f"{'estimate':<22}{res['estimate']} ({res['estimate_poses']} poses)",
        f"{'ground truth':<22}{res['ground_truth']} ({res['ground_truth_poses']} poses)",
        f"{'pairs':<22}{res['pairs']} (timestamps within {res['max_diff']} s)",
        f"{'alignment':<22}{res['alignment']} (scale {res['scale']:.4f})",
        f"{'path length [m]':<22}{res['path_length']:.3f}",
        f"{'ATE rmse [m]':<22}{res['ate_rmse']:.4f}",
        f"{'ATE mean [m]':<22}{res['ate_mean']:.4f}",
        f"{'ATE median [m]':<22}{res['ate_median']:.4f}",
        f"{'ATE max [m]':<22}{res['ate_max']:.4f}",
        f"{'RPE/frame [m, deg]':<22}{_fmt(rf['trans_rmse'])}, {_fmt(rf['rot_deg_rmse'], digits=3)} (rmse)",
        f"{'RPE/metre [m, deg]':<22}{_fmt(rm['trans_rmse'])}, {_fmt(rm['rot_deg_rmse'], digits=3)} (rmse)"
        + (f" ({rm['note']})" if rm.get("note") else ""),
    ]
    print("\n".join(lines))
    return 0


def run_depth(args: argparse.Namespace, cfg: RunConfig) -> int:
    from v2d.evaluation import DepthEvalOptions, evaluate_depth_folders, write_depth_outputs
    from v2d.io.writers import check_output_path, staged_output, write_json
    from v2d.metrics import DEPTH_METRICS

    if args.error_images < 0:
        raise InputError(f"--error-images: expected 0 or more, got {args.error_images}")
    opts = DepthEvalOptions(scaling=args.scaling, min_depth=args.min_depth, max_depth=args.max_depth, crop=args.crop,
                            resize_pred=args.resize_pred, pred_png_scale=args.pred_png_scale,
                            gt_png_scale=args.gt_png_scale)
    if args.json:
        check_output_path(args.json, None, "--json")
    keep = args.error_images if args.out else 0
    # The staging directory exists from the start: an unwritable --out fails before the evaluation.
    with staged_output(args.out) if args.out else contextlib.nullcontext() as stage:
        summary, rows, kept = evaluate_depth_folders(args.pred, args.gt, opts, progress=not args.quiet, keep=keep)
        if stage is not None:
            write_depth_outputs(Path(stage), summary, rows, kept, opts)
    if args.json:
        write_json(args.json, summary)
    scaling = f"global {summary['global_scale']:.4f}" if args.scaling == "global" else args.scaling
    print(f"{summary['frames']} frames ({summary['frames_without_pixels']} without valid pixels), scaling: "
          f"{scaling}, crop: {args.crop}")
    print("  ".join(f"{k:>8}" for k in (*DEPTH_METRICS, "coverage")))
    print("  ".join(f"{summary[k]:8.4f}" for k in (*DEPTH_METRICS, "coverage")))
    return 0


def run_consistency(args: argparse.Namespace, cfg: RunConfig) -> int:
    from slam.consistency import depth_consistency
    from v2d.io.results import load_run
    from v2d.io.writers import check_output_path, write_json

    if args.json:
        check_output_path(args.json, None, "--json")
    summary, rows = depth_consistency(load_run(args.run_dir), args.neighbours, args.tolerance,
                                      progress=not args.quiet)
    if args.json:
        write_json(args.json, summary | {"per_pair": rows})
    tol = f"{100 * summary['tolerance']:g} %"
    print("\n".join([
        f"{'keyframes':<34}{summary['keyframes']} ({summary['pairs']} ordered pairs, next {summary['neighbours']})",
        f"{'compared pixels':<34}{summary['pixels']} (mean overlap {100 * summary['mean_overlap']:.1f} %)",
        f"{'median relative difference':<34}{100 * summary['median_rel_diff']:.2f} %",
        f"{'within ' + tol:<34}{100 * summary['within_tolerance']:.1f} %",
    ]))
    return 0

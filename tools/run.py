"""`v2d run INPUT --out DIR`: SLAM on a video, an image folder or a dataset sequence."""

from __future__ import annotations

import argparse
import dataclasses
import json

from slam.config import RunConfig
from tools.refine import add_budget_arguments, with_budget


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run", parents=parents, help="run SLAM on a video, image folder, 7-Scenes or TUM sequence",
        description="Track the camera through the input, estimate keyframe depth and fuse a point cloud. Writes "
        "trajectory.txt (TUM, camera->world, every frame), depth/ (16-bit PNG in mm + float .npy per keyframe), "
        "cloud.ply and summary.json into --out, all at once when the run succeeds.",
    )
    p.add_argument("input", metavar="INPUT", help="video file (mp4/avi/...), image folder, or 7-Scenes/TUM/ScanNet "
                   "sequence folder (layout detected)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--stride", type=int, default=1, metavar="K", help="use every K-th input frame (default 1)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N used frames")
    p.add_argument("--resize", default=None, metavar="HxW",
                   help="network input size, e.g. 240x320 (default: data.height x data.width of the config)")
    p.add_argument("--intrinsics", default=None, metavar="FILE|fx,fy,cx,cy",
                   help="camera intrinsics at the input's size: a file (3x3 K or 'fx fy cx cy') or four numbers; "
                   "overrides the dataset's")
    p.add_argument("--uncalibrated", action="store_true",
                   help="ignore any intrinsics; start from fx = fy = 1.2 * width and optimise the focal length "
                   "(also the behaviour when no intrinsics are found)")
    p.add_argument("--no-global-ba", action="store_true",
                   help="skip the global bundle adjustment of every keyframe at the end of the run "
                   "(same as --set slam.global_ba=false)")
    p.add_argument("--save-confidence", action="store_true",
                   help="write each frame's tracking confidence (the weight of each keyframe pixel's flow target, "
                   "what the motion module down-weights) to OUT/confidence/NAME.png")
    p.add_argument("--refine", action="store_true",
                   help="after SLAM, fine-tune the depth module on the video's own keyframes and predict their depth "
                   "again (test-time refinement, as `v2d refine OUT` does on a finished run)")
    add_budget_arguments(p)
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the networks and the map run: cpu (default), cuda or cuda:N")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    from slam.run import RunOptions, run_slam
    from v2d.errors import InputError
    from v2d.io.datasets import parse_intrinsics, parse_size

    device = _device(args.device)
    if args.no_global_ba:
        cfg = dataclasses.replace(cfg, slam=dataclasses.replace(cfg.slam, global_ba=False))
    if args.weights is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=args.weights))
    if not args.refine and (args.refine_steps is not None or args.refine_minutes is not None):
        raise InputError("--refine-steps and --refine-minutes need --refine")
    cfg = with_budget(cfg, args)
    if args.intrinsics is not None and args.uncalibrated:
        raise InputError("--intrinsics and --uncalibrated exclude each other")
    opts = RunOptions(
        stride=args.stride, max_frames=args.max_frames,
        size=parse_size(args.resize) if args.resize else None,
        intrinsics=parse_intrinsics(args.intrinsics) if args.intrinsics else None,
        uncalibrated=args.uncalibrated, progress=not args.quiet, device=device,
        save_confidence=args.save_confidence, refine=args.refine,
    )
    summary = run_slam(args.input, args.out, cfg, opts)
    brief = {k: summary[k] for k in ("frames", "keyframes", "lost_frames", "restarts", "points", "fps")}
    if "refine" in summary:
        brief["refine_kept"] = summary["refine"]["kept"]
    print(json.dumps(brief))
    print(f"outputs written to {args.out}/")
    return 0


def _device(name: str) -> str:
    """Validate --device: "cpu", or "cuda[:N]" on a machine with that GPU."""
    import torch

    from v2d.errors import InputError

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--device {name}: no such CUDA device on this machine "
                         f"(torch.cuda.is_available() = {torch.cuda.is_available()})")
    return name

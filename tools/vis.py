"""`v2d vis OUT_DIR`: show a run's outputs in Open3D, render them offscreen to a PNG, or fuse a TSDF mesh."""

from __future__ import annotations

import argparse
import json

from slam.config import RunConfig
from v2d.io.trajectory import FORMATS

GT_DEFAULT_NAME = "trajectory_gt.txt"  # what `v2d demo` writes next to trajectory.txt


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "vis", parents=parents, help="show a run's cloud, keyframe cameras and trajectory (Open3D)",
        description="Show the output directory of `v2d run` / `v2d demo`: the fused point cloud, a frustum per "
        "keyframe, the estimated trajectory (red) and a ground-truth trajectory (blue) Sim3-aligned to it. With a "
        "display, an interactive window opens (N/P or right/left: next/previous keyframe, V: overview, Q: quit). "
        "--headless renders the same scene offscreen to a PNG (no display needed); --mesh fuses the keyframe depths "
        "into a TSDF mesh. With --headless or --mesh no window opens.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory of `v2d run` or `v2d demo`")
    p.add_argument("--headless", metavar="FILE.png", default=None,
                   help="render offscreen to this PNG instead of opening a window")
    p.add_argument("--mesh", metavar="FILE.ply", default=None,
                   help="fuse the keyframe depths (and colours) into a TSDF mesh and write it as PLY")
    p.add_argument("--voxel", type=float, default=None, metavar="SIZE",
                   help="TSDF voxel size in the run's units (default: 1/200 of the median keyframe depth, at least "
                   "one pixel's footprint there)")
    p.add_argument("--gt", metavar="FILE", default=None,
                   help="ground-truth trajectory (TUM, KITTI, EuRoC CSV or a 7-Scenes folder), matched by timestamp "
                   f"and Sim3-aligned to the estimate (default: OUT_DIR/{GT_DEFAULT_NAME} when it exists)")
    p.add_argument("--gt-format", choices=FORMATS, default="auto",
                   help="format of --gt (default: detected from its layout and first line)")
    p.add_argument("--no-gt", action="store_true", help=f"do not show OUT_DIR/{GT_DEFAULT_NAME}")
    p.add_argument("--keyframe", type=int, default=None, metavar="K",
                   help="with --headless: view from behind keyframe K (0-based) with its frustum highlighted, "
                   "instead of the overview")
    p.add_argument("--width", type=int, default=960, metavar="PX", help="image / window width (default 960)")
    p.add_argument("--height", type=int, default=720, metavar="PX", help="image / window height (default 720)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    from slam import vis_mesh, vis_render
    from v2d.errors import InputError
    from v2d.io.results import load_run
    from v2d.io.trajectory import read_trajectory
    from v2d.io.writers import check_output_path

    if args.gt is not None and args.no_gt:
        raise InputError("--gt and --no-gt exclude each other")
    if args.keyframe is not None and args.headless is None:
        raise InputError("--keyframe needs --headless (in the window, N/P step through the keyframes)")
    if args.voxel is not None and args.mesh is None:
        raise InputError("--voxel needs --mesh")
    # Cheap checks first, so that a typo costs no rendering or TSDF fusion and leaves no partial outputs.
    vis_render.check_image_size(args.width, args.height)
    if args.headless is not None:
        check_output_path(args.headless, ".png", "--headless")
    if args.mesh is not None:
        check_output_path(args.mesh, ".ply", "--mesh")
        if args.voxel is not None and not args.voxel > 0:
            raise InputError(f"--voxel {args.voxel}: expected a positive size")
    interactive = args.headless is None and args.mesh is None
    if interactive:
        vis_render.require_display()
    gt = None
    if args.gt is not None:
        try:
            gt = read_trajectory(args.gt, args.gt_format)
        except InputError as exc:
            raise InputError(f"--gt: {exc}".replace("give --format", "give --gt-format")) from None
    outputs = load_run(args.out_dir)
    if args.gt is None and not args.no_gt and (outputs.root / GT_DEFAULT_NAME).is_file():
        gt = outputs.root / GT_DEFAULT_NAME

    if interactive:
        vis_render.show_interactive(outputs, gt, args.width, args.height)
        return 0
    report = {}
    if args.headless is not None:  # first: it is the cheaper one, and it checks --keyframe and the ground truth
        report["render"] = vis_render.render_headless(outputs, args.headless, args.width, args.height, gt,
                                                      args.keyframe)
    if args.mesh is not None:
        mesh, report["mesh"] = vis_mesh.tsdf_mesh(outputs, args.voxel)
        vis_mesh.write_mesh(mesh, args.mesh)
        report["mesh"]["ply"] = args.mesh
    print(json.dumps(report, indent=2))
    return 0

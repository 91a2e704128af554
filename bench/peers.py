"""Peer comparison: COLMAP (incremental SfM through pycolmap) and v2d on the same frames, side by side.

    python -m bench.peers --json bench_out/peers.json [--data ../shared/data/7scenes-redkitchen]
        [--start 0] [--end 199] [--stride 2] [--v2d-size 240x320] [--colmap-size 240x320]
        [--colmap-overlap 5] [--known-only] [--skip-v2d] [--skip-colmap] [--repeats 1] [--keep DIR]

Both methods see the same 7-Scenes frames (frames start..end inclusive at the stride) and are
evaluated by the same code: `v2d.metrics.trajectory_ate` (evo, Sim3 alignment) against the dataset's
poses, over the frames each method registered. The table shows, per method, registered frames,
ATE RMSE, end-to-end wall and CPU time, their ratios to the v2d row with the same calibration, and
peak resident memory.

- v2d: `v2d run` on a folder of symlinks to the selected frames, at --v2d-size, with the dataset's
  intrinsics ("calibrated") and with `--uncalibrated` (focal length optimised). A frame counts as
  registered when the run did not mark it lost.
- COLMAP: feature extraction (SIFT, CPU), sequential matching, incremental mapping of a single
  PINHOLE camera at --colmap-size (default 240x320, see below), with the dataset's intrinsics
  held fixed ("known intrinsics", what the issue asks for) and with the focal length refined (the
  dataset's f = 585 fits the colour images poorly: see ../shared/data/README.md; a single focal
  length, SIMPLE_PINHOLE, starting from the dataset's). The largest model is evaluated; its
  registered images are the registered frames. Sequential matching pairs each image with the next
  --colmap-overlap images (plus COLMAP's quadratic overlap); no loop detection (it needs a vocabulary tree).

COLMAP's resolution: 240x320 by default, the size it did best with on the default input. With known
intrinsics it gave 2.30-2.31 cm in 6 of 6 runs at 240x320 against 2.27-2.28 cm in 3 of 5 runs and
8.9-10.4 cm in the other 2 at 480x640 (its bundle adjustment, held at the poor f = 585, sometimes
settles elsewhere); focal refined 2.76 vs 2.81 cm; and it needs ~3.5x less CPU time (24 s vs 84-87 s).

Every run is one fresh subprocess (`python -m tools.cli run ...`, or this module's COLMAP worker),
so wall time is end to end (start-up, reading and resizing images, the whole pipeline) and the CPU
time (user + system, all threads) and peak memory are the child's own (wait4). Other load on the
machine inflates wall times more than CPU times: use --repeats to report medians. A method that
fails shows as missing with the reason (the JSON keeps the child's error output); one that registers
fewer than 3 frames gets no ATE, and the reason is printed. --known-only skips the uncalibrated /
focal-refined rows.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import ROOT, run_child, v2d_usage, write_results

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "7scenes-redkitchen"
MIN_REGISTERED = 3  # evo's Sim3 alignment needs at least 3 associated poses


def select_frames(data: Path, start: int, end: int, stride: int) -> list[int]:
    """The 7-Scenes frame numbers start, start + stride, ... <= end; each must have a colour image and a pose.

    Raises InputError for a missing folder, a bad range or a selected frame with a file missing.
    """
    from v2d.errors import InputError

    if not data.is_dir():
        raise InputError(f"{data}: no such data folder (expected a 7-Scenes sequence: frame-NNNNNN.color.jpg, "
                         "frame-NNNNNN.pose.txt, camera-intrinsics.txt)")
    if start < 0 or stride < 1 or end < start:
        raise InputError(f"frame range: expected 0 <= start <= end and stride >= 1, got start={start} end={end} "
                         f"stride={stride}")
    if not (data / "camera-intrinsics.txt").is_file():
        raise InputError(f"{data}: no camera-intrinsics.txt")
    frames = list(range(start, end + 1, stride))
    if len(frames) < MIN_REGISTERED:
        raise InputError(f"frame range: {len(frames)} frame(s) selected, need at least {MIN_REGISTERED}")
    for f in frames:
        for name in (color_path(data, f).name, f"frame-{f:06d}.pose.txt"):
            if not (data / name).is_file():
                raise InputError(f"{data}: frame {f} is selected but {name} is missing")
    return frames


def color_path(data: Path, frame: int) -> Path:
    """frame-NNNNNN.color.jpg, or .png when only that exists."""
    jpg = data / f"frame-{frame:06d}.color.jpg"
    png = jpg.with_suffix(".png")
    return png if png.is_file() and not jpg.is_file() else jpg


def pose_wc_from_cam_from_world(cam_from_world) -> np.ndarray:
    """camera->world [tx, ty, tz, qx, qy, qz, qw] of a pycolmap Rigid3d holding world->camera.

    pycolmap's `Rotation3d.quat` is [x, y, z, w] (the order of its constructor and of scipy).
    Shapes: returns (7,) float64.
    """
    wc = cam_from_world.inverse()
    return np.concatenate([np.asarray(wc.translation, dtype=np.float64).reshape(3),
                           np.asarray(wc.rotation.quat, dtype=np.float64).reshape(4)])


def reconstruction_poses(rec) -> tuple[list[str], np.ndarray]:
    """Names and camera->world poses (N, 7) of the registered images of a pycolmap Reconstruction, by name."""
    images = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: im.name)
    poses = [pose_wc_from_cam_from_world(im.cam_from_world()) for im in images]
    return [im.name for im in images], np.asarray(poses, dtype=np.float64).reshape(-1, 7)


def colmap_intrinsics(intrinsics: np.ndarray, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """fx, fy, cx, cy for COLMAP at new_hw from v2d intrinsics (pixel centres at integers) at old_hw.

    v2d's convention (and the dataset's, as v2d reads it) puts the centre of the first pixel at 0,
    COLMAP's at 0.5; so both methods get the same camera. Resizing scales the focal lengths and maps
    cx to (cx + 0.5) sx - 0.5 in v2d's convention, (cx + 0.5) sx in COLMAP's.
    """
    sy, sx = new_hw[0] / old_hw[0], new_hw[1] / old_hw[1]
    fx, fy, cx, cy = np.asarray(intrinsics, dtype=np.float64)
    return np.array([fx * sx, fy * sy, (cx + 0.5) * sx, (cy + 0.5) * sy])


def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or min(int(m.group(1)), int(m.group(2))) < 16:
        raise argparse.ArgumentTypeError(f"expected HxW with sides >= 16, e.g. 240x320, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _reason(err: str) -> str:
    """The last non-empty line of a child's error output (the exception or the CLI's one-line error)."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    line = lines[-1] if lines else "failed without a message"
    return line if len(line) <= 160 else line[:157] + "..."


# ------------------------------------------------------------------------------------------------ evaluation


def _ground_truth(data: Path) -> tuple[np.ndarray, np.ndarray]:
    from v2d.io.trajectory import read_trajectory

    return read_trajectory(data, "7scenes")  # timestamps = frame numbers


def evaluate(frames: np.ndarray, poses_wc: np.ndarray, gt: tuple[np.ndarray, np.ndarray]) -> dict:
    """ATE (Sim3) of camera->world poses (N, 7) at 7-Scenes frame numbers (N,) against the ground truth.

    Returns trajectory_ate's numbers, or {"error": ...} when it cannot be computed (too few or
    degenerate poses).
    """
    from v2d.errors import V2DError
    from v2d.metrics import trajectory_ate

    if len(frames) < MIN_REGISTERED:
        return {"error": f"{len(frames)} registered frame(s): too few to align"}
    try:
        return trajectory_ate(np.asarray(frames, dtype=np.float64), poses_wc, gt[0], gt[1], align="sim3")
    except V2DError as exc:
        return {"error": str(exc)}


# ------------------------------------------------------------------------------------------------ v2d


def _link_sequence(data: Path, frames: list[int], dst: Path) -> None:
    """A 7-Scenes folder of symlinks to the selected frames, renumbered 0..N-1.

    Renumbered so that a trajectory timestamp k means the k-th selected frame whether `v2d run` stamps
    7-Scenes frames with their position in the folder or with the number in the name.
    """
    dst.mkdir(parents=True)
    for k, f in enumerate(frames):
        src = color_path(data, f)
        (dst / f"frame-{k:06d}.color{src.suffix}").symlink_to(src.resolve())
        for kind in ("depth.png", "pose.txt"):
            if (data / f"frame-{f:06d}.{kind}").is_file():
                (dst / f"frame-{k:06d}.{kind}").symlink_to((data / f"frame-{f:06d}.{kind}").resolve())
    (dst / "camera-intrinsics.txt").symlink_to((data / "camera-intrinsics.txt").resolve())


def run_v2d(data: Path, frames: list[int], size: tuple[int, int], calibrated: bool, work: Path,
            gt: tuple[np.ndarray, np.ndarray]) -> dict:
    """One `v2d run` on the selected frames; returns a result row (with "error" when it failed)."""
    from v2d.errors import V2DError
    from v2d.io.trajectory import read_trajectory

    row: dict = {"method": "v2d", "calibrated": calibrated, "size_hw": list(size), "total": len(frames)}
    seq, out = work / "input", work / "out"
    if not seq.exists():
        _link_sequence(data, frames, seq)
    args = ["run", str(seq), "--out", str(out), "--resize", f"{size[0]}x{size[1]}"]
    if not calibrated:
        args.append("--uncalibrated")
    try:
        row["wall_s"], row["peak_rss_mb"], row["cpu_s"] = v2d_usage(args)
        summary = json.loads((out / "summary.json").read_text())
        t, poses = read_trajectory(out / "trajectory.txt", "tum")
    except (RuntimeError, OSError, ValueError, V2DError) as exc:  # ValueError: a broken summary.json
        row.update(error=_reason(str(exc)), error_detail=str(exc)[-4000:])
        return row
    if not np.array_equal(t, np.arange(len(t))):  # the renumbered input: timestamps 0, 1, ...
        row["error"] = f"unexpected timestamps in trajectory.txt: {t[:4].tolist()}... (expected 0, 1, 2, ...)"
        return row
    lost = set(summary.get("marked_frames", {}).get("lost", []))  # rows of trajectory.txt
    keep = np.array([k not in lost for k in range(len(t))], dtype=bool)
    row.update(registered=int(keep.sum()), lost=len(lost), keyframes=summary.get("keyframes"),
               intrinsics=summary.get("intrinsics"), fps_tracking=summary.get("fps"))
    row["ate"] = evaluate(np.asarray(frames)[: len(t)][keep], poses[keep], gt)
    return row


# ------------------------------------------------------------------------------------------------ COLMAP


def run_colmap(data: Path, frames: list[int], size: tuple[int, int] | None, refine_focal: bool, overlap: int,
               work: Path, gt: tuple[np.ndarray, np.ndarray]) -> dict:
    """The COLMAP pipeline on the selected frames in a worker subprocess; returns a result row."""
    import cv2

    from v2d.errors import InputError
    from v2d.io.datasets import read_intrinsics

    first = cv2.imread(str(color_path(data, frames[0])))
    if first is None:
        raise InputError(f"{color_path(data, frames[0])}: not a readable image")
    in_hw = first.shape[:2]
    size = tuple(size or in_hw)
    intr = colmap_intrinsics(read_intrinsics(data / "camera-intrinsics.txt"), in_hw, size)
    row: dict = {"method": "colmap", "calibrated": not refine_focal, "size_hw": list(size), "total": len(frames),
                 "intrinsics_given": intr.tolist(), "overlap": overlap}
    work.mkdir(parents=True, exist_ok=True)
    spec = {"images": {f"{f:06d}{'.png' if size != in_hw else color_path(data, f).suffix}": str(color_path(data, f))
                       for f in frames},
            "size_hw": list(size), "intrinsics": intr.tolist(), "refine_focal": refine_focal, "overlap": overlap,
            "work": str(work)}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    try:
        row["wall_s"], row["peak_rss_mb"], row["cpu_s"] = run_child("bench.peers", ["_colmap", str(work / "spec.json")],
                                                                 "COLMAP worker")
        result = json.loads((work / "result.json").read_text())
    except (RuntimeError, OSError, ValueError) as exc:
        row.update(error=_reason(str(exc)), error_detail=str(exc)[-4000:])
        return row
    row.update({k: result[k] for k in ("stages_s", "models", "model_sizes", "camera")})
    row["registered"] = len(result["names"])
    names_frames = np.array([int(Path(n).stem) for n in result["names"]], dtype=np.int64)
    row["ate"] = evaluate(names_frames, np.asarray(result["poses_wc"], dtype=np.float64).reshape(-1, 7), gt)
    return row


def _colmap_worker(spec_path: str) -> int:
    """Child process: prepare the images, extract, match, map; write result.json next to the spec."""
    import cv2
    import pycolmap

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    img_dir, db, sparse = work / "images", work / "database.db", work / "sparse"
    for p in (img_dir, sparse):
        shutil.rmtree(p, ignore_errors=True)
    db.unlink(missing_ok=True)
    img_dir.mkdir(parents=True)
    sparse.mkdir()
    h, w = spec["size_hw"]
    stages: dict[str, float] = {}
    t = time.perf_counter()
    for name, src in spec["images"].items():
        if name.endswith(".png"):  # resized: written losslessly, so only the resampling differs
            im = cv2.imread(src, cv2.IMREAD_COLOR)
            cv2.imwrite(str(img_dir / name), cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA))
        else:
            (img_dir / name).symlink_to(Path(src).resolve())
    stages["prepare"] = time.perf_counter() - t

    pycolmap.set_random_seed(0)
    t = time.perf_counter()
    refine = bool(spec["refine_focal"])
    fx, fy, cx, cy = spec["intrinsics"]
    # Refining: one focal length (square pixels), as v2d's uncalibrated mode; a PINHOLE camera would
    # let fx and fy drift apart.
    model, params = ("SIMPLE_PINHOLE", [(fx + fy) / 2, cx, cy]) if refine else ("PINHOLE", [fx, fy, cx, cy])
    reader = pycolmap.ImageReaderOptions(camera_model=model, camera_params=",".join(f"{v:.6f}" for v in params))
    pycolmap.extract_features(db, img_dir, camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                              device=pycolmap.Device.cpu)
    stages["extract"] = time.perf_counter() - t
    t = time.perf_counter()
    pycolmap.match_sequential(db, pairing_options=pycolmap.SequentialPairingOptions(overlap=spec["overlap"]),
                              device=pycolmap.Device.cpu)
    stages["match"] = time.perf_counter() - t
    opts = pycolmap.IncrementalPipelineOptions()
    opts.random_seed = 0
    # Known intrinsics: the camera stays fixed in bundle adjustment and when an image is registered.
    # Refined: only the focal length moves. (PINHOLE and SIMPLE_PINHOLE have no extra parameters;
    # the flags are cleared anyway, so that a change of model cannot quietly add some.)
    opts.ba_refine_focal_length = refine
    opts.ba_refine_principal_point = False
    opts.ba_refine_extra_params = False
    opts.mapper.abs_pose_refine_focal_length = refine
    opts.mapper.abs_pose_refine_extra_params = False
    t = time.perf_counter()
    models = pycolmap.incremental_mapping(db, img_dir, sparse, options=opts)
    stages["map"] = time.perf_counter() - t
    sizes = sorted((rec.num_reg_images() for rec in models.values()), reverse=True)
    result: dict = {"stages_s": stages, "models": len(models), "model_sizes": sizes, "names": [], "poses_wc": [],
                    "camera": None}
    if models:
        rec = max(models.values(), key=lambda r: r.num_reg_images())
        names, poses = reconstruction_poses(rec)
        cam = next(iter(rec.cameras.values()))
        result.update(names=names, poses_wc=poses.tolist(), points=int(rec.num_points3D()),
                      track_length=float(rec.compute_mean_track_length()),
                      reprojection_px=float(rec.compute_mean_reprojection_error()),
                      camera={"model": cam.model_name, "fx": float(cam.focal_length_x),
                              "fy": float(cam.focal_length_y), "cx": float(cam.principal_point_x),
                              "cy": float(cam.principal_point_y), "width": cam.width, "height": cam.height})
    (work / "result.json").write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------ report


def _label(row: dict) -> str:
    if row["method"] == "v2d":
        return "v2d (dataset intrinsics)" if row["calibrated"] else "v2d (uncalibrated, focal optimised)"
    return "COLMAP (known intrinsics)" if row["calibrated"] else "COLMAP (focal refined)"


def aggregate(runs: list[dict]) -> dict:
    """One row from repeated runs of one method: medians of wall time, memory, registered frames and ATE.

    A row is missing (has "error") when any run failed; the runs are kept under "runs".
    """
    row = {k: v for k, v in runs[0].items() if k not in ("wall_s", "cpu_s", "peak_rss_mb", "ate", "registered")}
    row["runs"] = runs
    failed = [r for r in runs if "error" in r]
    if failed:
        row["error"] = failed[0]["error"]
        return row
    row["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    row["wall_s_min"] = min(r["wall_s"] for r in runs)  # the least disturbed by other load
    row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    row["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    row["registered"] = int(statistics.median(r["registered"] for r in runs))
    ates = [r["ate"] for r in runs]
    bad = [a for a in ates if "error" in a]
    if bad:
        row["ate_error"] = bad[0]["error"]
    else:
        row["ate_rmse_cm"] = 100 * statistics.median(a["ate_rmse"] for a in ates)
        row["ate_rmse_cm_range"] = [100 * min(a["ate_rmse"] for a in ates), 100 * max(a["ate_rmse"] for a in ates)]
        row["ate_scale"] = statistics.median(a["scale"] for a in ates)
        row["ate_pairs"] = int(statistics.median(a["pairs"] for a in ates))
    return row


def add_ratios(rows: list[dict]) -> None:
    """time_ratio (cpu_ratio) = wall (CPU) time / that of the v2d row with the same calibration, or None."""
    base = {r["calibrated"]: r for r in rows if r["method"] == "v2d" and "wall_s" in r}
    for r in rows:
        ref = base.get(r["calibrated"])
        for key, ratio in (("wall_s", "time_ratio"), ("cpu_s", "cpu_ratio")):
            r[ratio] = r[key] / ref[key] if ref and key in r else None


def format_table(rows: list[dict]) -> str:
    """The side-by-side table (one line per row; a failed method shows 'missing' and the reason)."""
    head = (f"{'method':38s} {'size':>8s} {'registered':>10s} {'ATE RMSE cm (Sim3)':>18s} {'wall s':>7s} "
            f"{'(min)':>7s} {'x v2d':>6s} {'CPU s':>7s} {'x v2d':>6s} {'peak MB':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['size_hw'][0]}x{r['size_hw'][1]}"
        if "error" in r:
            lines.append(f"{_label(r):38s} {size:>8s} missing: {r['error']}")
            continue
        ate = "n/a"
        if "ate_rmse_cm" in r:
            lo, hi = r["ate_rmse_cm_range"]  # COLMAP is not deterministic on 2 threads even with a fixed seed
            ate = f"{r['ate_rmse_cm']:.2f}" + (f" ({lo:.2f}-{hi:.2f})" if hi - lo >= 0.005 else "")
        ratio, cpu_ratio = (f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("time_ratio", "cpu_ratio"))
        lines.append(f"{_label(r):38s} {size:>8s} {r['registered']:>4d}/{r['total']:<5d} {ate:>18s} "
                     f"{r['wall_s']:>7.1f} {'(' + format(r['wall_s_min'], '.1f') + ')':>7s} {ratio:>6s} "
                     f"{r['cpu_s']:>7.1f} {cpu_ratio:>6s} {r['peak_rss_mb']:>7.0f}")
        if "ate_error" in r:
            lines.append(f"{'':38s} ATE not computed: {r['ate_error']}")
    lines.append("Medians over the runs; (min) wall time; (min-max) of the ATE when the runs differ. "
                 "ATE is over each method's registered frames only (Sim3-aligned to the dataset's poses); "
                 "x v2d = time / the v2d row's with the same calibration; times are end to end, CPU = user + "
                 "system of all threads.")
    return "\n".join(lines)


def _versions() -> dict:
    from v2d import __version__

    try:
        colmap = importlib.metadata.version("pycolmap")
    except importlib.metadata.PackageNotFoundError:
        colmap = None
    return {"v2d": __version__, "pycolmap": colmap, "python": sys.version.split()[0]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="7-Scenes sequence folder")
    p.add_argument("--start", type=int, default=0, help="first frame number (default 0)")
    p.add_argument("--end", type=int, default=199, help="last frame number, inclusive (default 199)")
    p.add_argument("--stride", type=int, default=2, help="use every K-th frame (default 2)")
    p.add_argument("--v2d-size", type=_parse_size, default=(240, 320), metavar="HxW", help="default 240x320")
    p.add_argument("--colmap-size", type=_parse_size, default=(240, 320), metavar="HxW",
                   help="images resized to this for COLMAP (default 240x320: on the default input COLMAP was as "
                   "accurate, steadier and used ~3.5x less CPU than at 480x640)")
    p.add_argument("--colmap-overlap", type=int, default=5, metavar="K",
                   help="sequential matching: each image against the next K (plus quadratic overlap); default 5")
    p.add_argument("--known-only", action="store_true",
                   help="only the rows with the dataset's intrinsics (no uncalibrated v2d, no focal-refined COLMAP)")
    p.add_argument("--skip-v2d", action="store_true", help="no v2d rows")
    p.add_argument("--skip-colmap", action="store_true", help="no COLMAP rows")
    p.add_argument("--repeats", type=int, default=1, help="runs per method; the table shows medians (default 1)")
    p.add_argument("--json", metavar="FILE", help="write all numbers and settings here")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep the work folders (inputs, outputs) in DIR")
    return p


def run(args: argparse.Namespace, work: Path) -> dict:
    """Run the selected methods; returns the results (settings, rows) and prints the table."""
    frames = select_frames(args.data, args.start, args.end, args.stride)
    gt = _ground_truth(args.data)
    print(f"{args.data.name}: frames {frames[0]}-{frames[-1]} at stride {args.stride} ({len(frames)} frames)")
    modes = [True] if args.known_only else [True, False]
    rows = []
    for calibrated in modes:
        jobs = []
        if not args.skip_v2d:
            jobs.append(("v2d", lambda d, c=calibrated: run_v2d(args.data, frames, args.v2d_size, c, d, gt)))
        if not args.skip_colmap:
            jobs.append(("colmap", lambda d, c=calibrated: run_colmap(args.data, frames, args.colmap_size, not c,
                                                                      args.colmap_overlap, d, gt)))
        for name, job in jobs:
            runs = []
            for k in range(args.repeats):
                job_dir = work / f"{name}-{'known' if calibrated else 'free'}-{k}"
                shutil.rmtree(job_dir, ignore_errors=True)  # a --keep folder from an earlier run
                runs.append(job(job_dir))
                r = runs[-1]
                print(f"  {name} {'known' if calibrated else 'free'} run {k + 1}/{args.repeats}: "
                      + (f"missing: {r['error']}" if "error" in r else
                         f"{r['registered']}/{r['total']} registered, {r['wall_s']:.1f} s"))
            rows.append(aggregate(runs))
    add_ratios(rows)
    print(format_table(rows))
    return {"data": str(args.data), "frames": frames, "start": args.start, "end": args.end, "stride": args.stride,
            "v2d_size_hw": list(args.v2d_size), "colmap_size_hw": list(args.colmap_size),
            "colmap_overlap": args.colmap_overlap, "repeats": args.repeats, "versions": _versions(),
            "evaluation": "v2d.metrics.trajectory_ate, Sim3 (evo), on each method's registered frames",
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from v2d.errors import V2DError

    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.colmap_overlap < 1:
        print(f"error: --repeats and --colmap-overlap must be >= 1, got {args.repeats} and {args.colmap_overlap}",
              file=sys.stderr)
        return 1
    try:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            results = run(args, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="v2d-peers-") as tmp:
                results = run(args, Path(tmp))
    except V2DError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    if sys.argv[1:2] == ["_colmap"]:  # the worker run_colmap starts
        raise SystemExit(_colmap_worker(sys.argv[2]))
    raise SystemExit(main())

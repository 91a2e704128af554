"""SLAM benchmark: accuracy, speed and memory of `v2d run` / `v2d demo` against the issue's targets.

    python -m bench.slam --json bench_out/slam.json [--data ../shared/data/7scenes-redkitchen]
        [--skip-memory] [--sources dis learned]

Every measurement is one `v2d` command in a fresh subprocess (what a user runs), so wall time is
end to end (reading and resizing images, tracking, depth, fusion, writing) and the peak resident
memory is the child's own (`ru_maxrss` from wait4). Accuracy is evaluated from the files the run
wrote, with the same code as everywhere else (evo for ATE after Sim3 alignment; per-keyframe
median-scaled AbsRel against the dataset's depth).

1. demo: `v2d demo` (the embedded synthetic sequence): ATE as a percentage of the path length.
2. 7-Scenes redkitchen, frames 0-499 at stride 2, 240x320, with the dataset's intrinsics and
   uncalibrated, for each flow source: ATE RMSE (Sim3), keyframe depth AbsRel, frames/s.
3. speed: a 300-frame synthetic run (rendered to PNGs first, 240x320, default config): frames/s.
4. memory: the same renderer's 1000-frame run vs the 300-frame run: peak RSS and their ratio.
5. speed (`--parts speed`): the engine issue's targets, 7-Scenes frames 0-499 at stride 2 and
   0-299 at stride 1, 240x320, default config: frames/s end to end, ATE, keyframe AbsRel, peak RSS,
   each the median of `--repeats` runs; with `--baseline DIR` (a checkout of an earlier commit,
   with its extension built) the same runs of that code alternate with these, and the table gives
   the ratios measured side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench._common import ROOT, v2d_usage, write_results

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "7scenes-redkitchen"


def _v2d(args: list[str]) -> tuple[float, float]:
    """Run `v2d ARGS` in a subprocess; returns (wall seconds, peak RSS in MB). Raises on failure."""
    usage = v2d_usage(args)
    return usage.wall_s, usage.peak_rss_mb


def _render_folder(path: Path, frames: int, seed: int) -> np.ndarray:
    """Render the synthetic sequence into a PNG folder with intrinsics.txt; returns GT poses_wc (N, 7)."""
    import cv2

    from v2d.data.synthetic import default_intrinsics, make_scene, make_trajectory, render_views
    from v2d.geometry.lie import se3_inv

    path.mkdir(parents=True, exist_ok=True)
    intr = default_intrinsics(240, 320)
    scene = make_scene(seed)
    poses = make_trajectory(scene, seed, frames)
    for lo in range(0, frames, 50):  # in chunks: 1000 frames at once would hold 230 MB of images
        images, _ = render_views(scene, poses[lo:lo + 50], intr, 240, 320)
        for k, im in enumerate(np.asarray(images)):
            cv2.imwrite(str(path / f"{lo + k:06d}.png"), np.ascontiguousarray(im[..., ::-1]))
    (path / "intrinsics.txt").write_text(" ".join(f"{v:.6f}" for v in intr.tolist()))
    return se3_inv(poses).numpy()


def _trajectory(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, comments="#")
    return rows[:, 0], rows[:, 1:]


def _ate(out: Path, gt_t: np.ndarray, gt_wc: np.ndarray) -> dict:
    from v2d.metrics import trajectory_ate

    t, p = _trajectory(out / "trajectory.txt")
    return trajectory_ate(t, p, gt_t, gt_wc, align="sim3")


def _seven_scenes(data: Path, out: Path, source: str, calibrated: bool, overrides: list[str]) -> dict:
    import cv2
    import torch

    from v2d.geometry.lie import matrix_to_quat
    from v2d.io.datasets import open_sequence
    from v2d.metrics import depth_metrics

    args = ["run", str(data), "--out", str(out), "--stride", "2", "--max-frames", "250", "--resize", "240x320",
            "--set", f"motion.flow_source={source}", *_sets(overrides)]
    if not calibrated:
        args.append("--uncalibrated")
    wall, rss = _v2d(args)
    summary = json.loads((out / "summary.json").read_text())
    seq = open_sequence(data)
    idx = np.arange(0, 500, 2)
    gt = seq.poses_wc[idx]
    gt_wc = np.concatenate([gt[:, :3, 3], matrix_to_quat(torch.from_numpy(gt[:, :3, :3])).numpy()], axis=1)
    from v2d.errors import NumericalError

    try:
        ate = _ate(out, idx.astype(np.float64), gt_wc)
    except NumericalError as exc:  # e.g. a trajectory that never moved
        ate = {"ate_rmse": float("nan"), "path_length": float("nan"), "scale": float("nan"), "error": str(exc)}
    rels = []
    for f in sorted((out / "depth").glob("*.npy")):
        g = cv2.resize(seq.depth(int(f.stem)), (320, 240), interpolation=cv2.INTER_NEAREST)
        rels.append(depth_metrics(np.load(f), g)["abs_rel"])
    return {"flow_source": source, "calibrated": calibrated, "ate_rmse_cm": 100 * ate["ate_rmse"],
            "path_length_m": ate["path_length"], "scale": ate["scale"], "depth_abs_rel": float(np.mean(rels)),
            "keyframes": summary["keyframes"], "lost_frames": summary["lost_frames"],
            "fps_tracking": summary["fps"], "fps_end_to_end": summary["frames"] / wall, "peak_rss_mb": rss,
            "focal_px_240x320": summary["intrinsics"]["fx"], "ate_error": ate.get("error"),
            "restarts": summary["restarts"], "warnings": summary["warnings"]}


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _demo(tmp: Path, results: dict, overrides: list[str]) -> None:
    wall, rss = _v2d(["demo", "--out", str(tmp / "demo"), *_sets(overrides)])
    demo = json.loads((tmp / "demo" / "summary.json").read_text())
    results["demo"] = {"ate_rmse": demo["ate_rmse"], "path_length": demo["path_length"],
                       "ate_percent_of_path": demo["ate_percent_of_path"], "depth_abs_rel": demo["depth"]["abs_rel"],
                       "frames": demo["frames"], "keyframes": demo["keyframes"], "fps_tracking": demo["fps"],
                       "wall_s": wall, "peak_rss_mb": rss}
    print(f"demo: ATE {demo['ate_percent_of_path']:.2f}% of {demo['path_length']:.2f} path, "
          f"depth AbsRel {demo['depth']['abs_rel']:.3f}")


def _seven_scenes_all(tmp: Path, results: dict, data: Path, sources: list[str], overrides: list[str]) -> None:
    if not data.exists():
        print(f"7-Scenes skipped: {data} not found")
        return
    results["7scenes"] = []
    for source in sources:
        for calibrated in (True, False):
            r = _seven_scenes(data, tmp / f"7s-{source}-{calibrated}", source, calibrated, overrides)
            r["overrides"] = overrides
            results["7scenes"].append(r)
            print(f"7-Scenes {source:7s} {'calibrated' if calibrated else 'uncalibrated'}: "
                  f"ATE {r['ate_rmse_cm']:.2f} cm {r['ate_error'] or ''}, depth AbsRel {r['depth_abs_rel']:.3f}, "
                  f"{r['fps_end_to_end']:.2f} frames/s end to end, {r['keyframes']} keyframes, "
                  f"{r['lost_frames']} lost")


def _synthetic(tmp: Path, results: dict, skip_memory: bool, overrides: list[str]) -> None:
    frames = 300 if skip_memory else 1000
    gt_wc = _render_folder(tmp / "synthetic", frames, seed=7)
    t_gt = np.arange(frames, dtype=np.float64)
    runs = {}
    for n in [300] if skip_memory else [300, 1000]:
        out = tmp / f"syn{n}"
        wall, rss = _v2d(["run", str(tmp / "synthetic"), "--out", str(out), "--max-frames", str(n), *_sets(overrides)])
        summary = json.loads((out / "summary.json").read_text())
        ate = _ate(out, t_gt[:n], gt_wc[:n])
        runs[n] = {"frames": n, "wall_s": wall, "fps_end_to_end": n / wall, "fps_tracking": summary["fps"],
                   "peak_rss_mb": rss, "keyframes": summary["keyframes"], "lost_frames": summary["lost_frames"],
                   "ate_percent_of_path": 100 * ate["ate_rmse"] / ate["path_length"]}
        print(f"synthetic {n} frames: {n / wall:.2f} frames/s end to end, peak RSS {rss:.0f} MB, "
              f"ATE {runs[n]['ate_percent_of_path']:.2f}% of path")
    results["synthetic_runs"] = list(runs.values())
    if 1000 in runs:
        results["rss_1000_over_300"] = runs[1000]["peak_rss_mb"] / runs[300]["peak_rss_mb"]
        print(f"peak RSS 1000 / 300 frames: {results['rss_1000_over_300']:.3f}")


def _seven_scenes_depth(data: Path, out: Path) -> float:
    import cv2

    from v2d.io.datasets import open_sequence
    from v2d.metrics import depth_metrics

    seq = open_sequence(data)
    rels = []
    for f in sorted((out / "depth").glob("*.npy")):
        g = cv2.resize(seq.depth(int(f.stem)), (320, 240), interpolation=cv2.INTER_NEAREST)
        rels.append(depth_metrics(np.load(f), g)["abs_rel"])
    return float(np.mean(rels))


def _speed(tmp: Path, results: dict, data: Path, overrides: list[str], repeats: int, baseline: Path | None
           ) -> None:
    """The engine's speed targets on 7-Scenes; this code and (optionally) a baseline checkout, alternating."""
    import statistics

    import torch

    from v2d.geometry.lie import matrix_to_quat
    from v2d.io.datasets import open_sequence

    if not data.exists():
        print(f"speed skipped: {data} not found")
        return
    seq = open_sequence(data)
    roots = {"this": ROOT} | ({"baseline": baseline} if baseline else {})
    table = []
    for stride, frames in ((2, 250), (1, 300)):
        idx = np.arange(0, stride * frames, stride)
        gt = seq.poses_wc[idx]
        gt_wc = np.concatenate([gt[:, :3, 3], matrix_to_quat(torch.from_numpy(gt[:, :3, :3])).numpy()], axis=1)
        runs: dict[str, list[dict]] = {name: [] for name in roots}
        for r in range(repeats):
            for name, root in roots.items():
                out = tmp / f"speed-{name}-{stride}-{r}"
                usage = v2d_usage(["run", str(data), "--out", str(out), "--stride", str(stride), "--max-frames",
                                    str(frames), "--resize", "240x320", *_sets(overrides if name == "this" else [])],
                                   root)
                ate = _ate(out, idx.astype(np.float64), gt_wc)
                summary = json.loads((out / "summary.json").read_text())
                # summary.json's fps leaves out model loading, writing and the global bundle adjustment
                runs[name].append({"fps_end_to_end": frames / usage.wall_s, "fps_run": summary["fps"],
                                   "ate_cm": 100 * ate["ate_rmse"],
                                   "abs_rel": _seven_scenes_depth(data, out), "peak_rss_mb": usage.peak_rss_mb,
                                   "keyframes": summary["keyframes"], "lost": summary["lost_frames"]})
                print(f"  {name:8s} stride {stride}, {frames} frames, run {r + 1}: "
                      f"{runs[name][-1]['fps_end_to_end']:.2f} frames/s, ATE {runs[name][-1]['ate_cm']:.2f} cm, "
                      f"AbsRel {runs[name][-1]['abs_rel']:.3f}, {usage.peak_rss_mb:.0f} MB")
        for name, rs in runs.items():
            row = {"code": name, "stride": stride, "frames": frames, "runs": rs}
            for key in ("fps_end_to_end", "fps_run", "ate_cm", "abs_rel", "peak_rss_mb"):
                row[key] = statistics.median(r[key] for r in rs)
            table.append(row)
    results["speed"] = table
    print(f"{'code':9s} {'run':>16s} {'frames/s':>9s} {'tracking':>9s} {'ATE cm':>7s} {'AbsRel':>7s} {'RSS MB':>7s}"
          f"  (medians of {repeats}; frames/s end to end, and summary.json's without loading, writing and the"
          " global bundle adjustment)")
    for row in table:
        run = f"stride {row['stride']}, {row['frames']} fr"
        print(f"{row['code']:9s} {run:>16s} {row['fps_end_to_end']:9.2f} {row['fps_run']:9.2f} {row['ate_cm']:7.2f} "
              f"{row['abs_rel']:7.3f} {row['peak_rss_mb']:7.0f}")
    if baseline:
        for this, base in zip(table[::2], table[1::2], strict=True):
            print(f"stride {this['stride']}: frames/s ratio this / baseline = "
                  f"{this['fps_end_to_end'] / base['fps_end_to_end']:.2f} end to end, "
                  f"{this['fps_run'] / base['fps_run']:.2f} without the global bundle adjustment")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="7-Scenes redkitchen folder")
    parser.add_argument("--sources", nargs="+", default=["dis", "learned"], choices=["dis", "learned"])
    parser.add_argument("--parts", nargs="+", default=["demo", "7scenes", "synthetic"],
                        choices=["demo", "7scenes", "synthetic", "speed"], help="which measurements to run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration of the speed part (median)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="speed part: a checkout of an earlier commit to measure side by side")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 1000-frame run (about 5 minutes)")
    args = parser.parse_args(argv)
    results: dict = {"targets": {"demo_ate_percent": 1.0, "7scenes_ate_cm": 5.0, "fps": 5.0, "peak_rss_mb": 4096,
                                 "rss_1000_over_300": 1.10}}
    with tempfile.TemporaryDirectory(prefix="v2d-bench-") as tmp:
        tmp = Path(tmp)
        if "demo" in args.parts:
            _demo(tmp, results, args.overrides)
        if "7scenes" in args.parts:
            _seven_scenes_all(tmp, results, args.data, args.sources, args.overrides)
        if "synthetic" in args.parts:
            _synthetic(tmp, results, args.skip_memory, args.overrides)
        if "speed" in args.parts:
            _speed(tmp, results, args.data, args.overrides, args.repeats, args.baseline)
    results["overrides"] = args.overrides
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(main())

"""Evaluation of files: trajectories (evo) and depth maps against ground truth, with plots and images.

`v2d eval traj` and `v2d eval depth` are thin wrappers around `trajectory_report` / `plot_trajectory`
and `evaluate_depth_folders`; the metrics themselves are in `v2d.metrics`.

Depth maps are paired by frame number:
- a dataset sequence (7-Scenes, TUM RGB-D, ScanNet; the layouts `v2d run` reads) numbers its frames
  by position, as `v2d run` does, and its depth unit comes from the dataset (TUM's depth is
  associated to the colour frames through its timestamps, as when running);
- a `v2d run` output directory's depth/NNNNNN files are numbered by input frame;
- in any other folder a file's number is the last run of digits in its name (names that are
  timestamps, such as TUM's `1305031102.160407.png`, are refused: give the sequence folder).
Readable depth files (`v2d.io.datasets.read_depth_map`): `.npy` (used as is) and 16-bit `.png`,
divided by a scale (1000 = millimetres, v2d's unit), where 0 and 65535 are unknown. Two single
files are evaluated as one frame.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from v2d.errors import InputError
from v2d.metrics import CROPS, DEPTH_METRICS, crop_mask, depth_metrics, depth_valid, evaluate_trajectory

__all__ = ["DepthEvalOptions", "depth_files", "error_image", "evaluate_depth_folders", "plot_trajectory",
           "trajectory_report", "write_depth_outputs"]

_log = logging.getLogger(__name__)
_DIGITS = re.compile(r"(\d+)(?!.*\d)")
_TIMESTAMP_NAME = re.compile(r"^\d+\.\d+$")
SCALE_SAMPLES_PER_FRAME = 20_000  # global scale: median over at most this many pixels of each frame


# --------------------------------------------------------------------------------------------------
# trajectories


def trajectory_report(est: str | Path, gt: str | Path, est_format: str = "auto", gt_format: str = "auto",
                      align: str = "sim3", max_diff: float = 0.01) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read two trajectory files (see v2d.io.trajectory) and evaluate the first against the second.

    Returns (results, arrays) as `v2d.metrics.evaluate_trajectory`, the results also naming the inputs
    and the ground truth's time unit ("s", or "index" for KITTI and 7-Scenes).
    """
    from v2d.errors import ShapeError
    from v2d.io.trajectory import TIME_UNITS, detect_format, read_trajectory

    if not (np.isfinite(max_diff) and max_diff >= 0):
        raise InputError(f"max_diff: expected a time difference >= 0, got {max_diff}")
    t_est, p_est = read_trajectory(est, est_format)
    t_gt, p_gt = read_trajectory(gt, gt_format)
    try:
        results, arrays = evaluate_trajectory(t_est, p_est, t_gt, p_gt, align=align, max_diff=max_diff)
    except ShapeError as exc:  # the trajectories do not overlap: name the files and their time ranges
        raise InputError(f"{exc}; {est} spans t = {t_est.min():.3f}..{t_est.max():.3f} ({len(t_est)} poses), "
                         f"{gt} spans t = {t_gt.min():.3f}..{t_gt.max():.3f} ({len(t_gt)} poses)") from None
    unit = TIME_UNITS[detect_format(gt) if gt_format == "auto" else gt_format]
    return {"estimate": str(est), "ground_truth": str(gt), "estimate_poses": len(t_est),
            "ground_truth_poses": len(t_gt), "max_diff": max_diff, "time_unit": unit} | results, arrays


def plot_trajectory(arrays: dict[str, np.ndarray], results: dict[str, Any], path: str | Path) -> Path:
    """PNG with two panels: top view of ground truth and aligned estimate, and ATE over time.

    The top view shows the two axes along which the ground truth extends most (cameras look along
    their z axis, so "up" differs between datasets). Drawn on a matplotlib Figure of its own (Agg
    canvas): the caller's pyplot state and backend are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from v2d.io.writers import write_bytes

    gt, est, err, t = arrays["gt_xyz"], arrays["est_xyz"], arrays["ate_errors"], arrays["timestamps"]
    a, b = sorted(np.argsort(np.ptp(gt, axis=0))[-2:])
    names = "xyz"
    fig = Figure(figsize=(12, 5))
    FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    ax0.plot(gt[:, a], gt[:, b], "-", color="0.3", lw=1.5, label="ground truth")
    ax0.plot(est[:, a], est[:, b], "-", color="tab:red", lw=1.2, label=f"estimate ({results['alignment']} aligned)")
    ax0.plot(gt[0, a], gt[0, b], "o", color="0.3", ms=5)
    ax0.set_xlabel(f"{names[a]} [m]")
    ax0.set_ylabel(f"{names[b]} [m]")
    ax0.set_aspect("equal", adjustable="datalim")
    ax0.set_title("top view")
    ax0.legend(loc="best", fontsize=8)
    ax0.grid(alpha=0.3)
    ax1.plot(t - t[0], err * 100, color="tab:blue", lw=1)
    rmse_cm = results["ate_rmse"] * 100
    ax1.axhline(rmse_cm, color="tab:red", ls="--", lw=1, label=f"RMSE {rmse_cm:.2f} cm")
    index = results.get("time_unit") == "index"
    ax1.set_xlabel("frames since the first pose" if index else "time since the first pose [s]")
    ax1.set_ylabel("position error [cm]")
    ax1.set_title(f"ATE over time ({results['pairs']} poses)")
    ax1.legend(loc="best", fontsize=8)
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# depth


@dataclass(frozen=True)
class DepthEvalOptions:
    """How to evaluate depth. scaling: "median" (per frame), "global" (one scale) or "none" (metric)."""

    scaling: str = "median"
    min_depth: float = 1e-3
    max_depth: float = float("inf")
    crop: str = "none"
    resize_pred: bool = False
    pred_png_scale: float = 1000.0
    gt_png_scale: float = 1000.0

    def check(self) -> None:
        if self.scaling not in ("median", "global", "none"):
            raise InputError(f"scaling: expected median, global or none, got {self.scaling!r}")
        if not (0 <= self.min_depth < self.max_depth):
            raise InputError(f"depth range: expected 0 <= min < max, got {self.min_depth}..{self.max_depth}")
        for name in ("pred_png_scale", "gt_png_scale"):
            if not (getattr(self, name) > 0 and np.isfinite(getattr(self, name))):
                raise InputError(f"{name}: expected a positive number, got {getattr(self, name)}")
        if self.crop != "none" and self.crop not in CROPS:
            raise InputError(f"crop: expected none, {', '.join(CROPS)}, got {self.crop!r}")


def _is_dataset(folder: Path) -> bool:  # the layouts v2d.io.datasets.open_sequence detects
    return (any(folder.glob("frame-*.color.*")) or (folder / "rgb.txt").is_file()
            or ((folder / "color").is_dir() and (folder / "intrinsic").is_dir()))


def depth_files(path: str | Path, png_scale: float = 1000.0) -> tuple[dict[int, Path], float]:
    """Depth files under `path` by frame number, and the PNG scale to read them with (the dataset's,
    else `png_scale`); see the module docstring. InputError when there are none."""
    from v2d.io.datasets import open_sequence

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        m = _DIGITS.search(path.stem)
        return {int(m.group(1)) if m else 0: path}, png_scale
    if _is_dataset(path):
        seq = open_sequence(path, require_intrinsics=False)
        if not seq.depths:
            raise InputError(f"{path}: a {seq.layout} sequence without depth maps")
        return dict(enumerate(seq.depths)), 1.0 / seq.depth_scale
    folder = path / "depth" if (path / "summary.json").is_file() and (path / "depth").is_dir() else path
    files: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in (".npy", ".png") or not p.is_file():
            continue
        if _TIMESTAMP_NAME.match(p.stem):
            raise InputError(f"{p}: the name is a timestamp, not a frame number; for TUM RGB-D give the sequence "
                             "folder (with rgb.txt and depth.txt) so frames are associated as `v2d run` does")
        m = _DIGITS.search(p.stem)
        if m is None:
            continue
        key = int(m.group(1))
        if key in files and files[key].suffix == ".npy":
            continue  # v2d writes both; the .npy keeps full precision
        files[key] = p
    if not files:
        raise InputError(f"{folder}: no depth maps (.npy or 16-bit .png with a frame number in the name)")
    return files, png_scale


def _resize_nearest(depth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    # nearest, not bilinear: interpolating would mix unknown (0) pixels and depths across edges
    return cv2.resize(depth, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


@dataclass(frozen=True)
class _Pair:
    frame: int
    pred: Path
    gt: Path
    pred_scale: float  # PNG divisors
    gt_scale: float


def _pairs(pred: str | Path, gt: str | Path, opts: DepthEvalOptions) -> list[_Pair]:
    (pred_files, ps), (gt_files, gs) = depth_files(pred, opts.pred_png_scale), depth_files(gt, opts.gt_png_scale)
    if Path(pred).is_file() != Path(gt).is_file():
        raise InputError(f"{pred}, {gt}: give two folders or two files, not a folder and a file")
    if Path(pred).is_file():
        return [_Pair(next(iter(pred_files)), Path(pred), Path(gt), ps, gs)]
    keys = sorted(set(pred_files) & set(gt_files))
    if not keys:
        raise InputError(f"no frame of {pred} ({len(pred_files)} maps, frames {min(pred_files)}..{max(pred_files)}) "
                         f"has ground truth in {gt} ({len(gt_files)} maps, frames {min(gt_files)}..{max(gt_files)})")
    missing = len(pred_files) - len(keys)
    if missing:
        _log.warning("%d of %d predicted depth maps have no ground truth and are not evaluated", missing,
                     len(pred_files))
    return [_Pair(k, pred_files[k], gt_files[k], ps, gs) for k in keys]


def _load_pair(pair: _Pair, opts: DepthEvalOptions) -> tuple[np.ndarray, np.ndarray]:
    from v2d.io.datasets import read_depth_map

    p, g = read_depth_map(pair.pred, pair.pred_scale), read_depth_map(pair.gt, pair.gt_scale)
    if p.shape != g.shape:
        if not opts.resize_pred:
            raise InputError(f"{pair.pred}: depth of size {p.shape[0]}x{p.shape[1]} but the ground truth {pair.gt} "
                             f"is {g.shape[0]}x{g.shape[1]} (pass --resize-pred to resize predictions, nearest pixel)")
        p = _resize_nearest(p, g.shape)
    return p, g


def _global_scale(pairs: list[_Pair], opts: DepthEvalOptions) -> float:
    """median(gt) / median(pred) over the valid pixels of all frames (at most SCALE_SAMPLES_PER_FRAME
    evenly strided pixels of each frame, so memory stays small on long sequences)."""
    ps, gs = [], []
    for pair in pairs:
        p, g = _load_pair(pair, opts)
        v = depth_valid(p, g, opts.min_depth, opts.max_depth, crop_mask(opts.crop, *g.shape))
        step = max(1, int(v.sum()) // SCALE_SAMPLES_PER_FRAME)
        ps.append(p[v][::step])
        gs.append(g[v][::step])
    p, g = np.concatenate(ps), np.concatenate(gs)
    if p.size == 0:
        raise InputError("no pixel with both a prediction and ground truth in range: cannot compute a global scale")
    return float(np.median(g.astype(np.float64)) / np.median(p.astype(np.float64)))


def evaluate_depth_folders(pred: str | Path, gt: str | Path, opts: DepthEvalOptions = DepthEvalOptions(),
                           progress: bool = False, keep: int = 0
                           ) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[int, np.ndarray, np.ndarray]]]:
    """Evaluate every predicted depth map that has ground truth.

    Returns the summary (the mean over frames with valid pixels of each metric in DEPTH_METRICS,
    frames, frames_without_pixels, coverage: the mean share of ground-truth pixels that have a
    prediction (metrics skip holes, so compare methods at similar coverage), settings), the
    per-frame rows, and (frame, pred scaled, gt) for
    `keep` frames spread evenly over the sequence (for error images).
    """
    from tqdm import tqdm

    opts.check()
    pairs = _pairs(pred, gt, opts)
    scale = _global_scale(pairs, opts) if opts.scaling == "global" else 1.0 if opts.scaling == "none" else None
    picks = set(np.linspace(0, len(pairs) - 1, keep).round().astype(int).tolist()) if keep > 0 else set()
    rows, kept = [], []
    for i, pair in enumerate(tqdm(pairs, desc="v2d eval depth", unit="frame", disable=not progress)):
        p, g = _load_pair(pair, opts)
        mask = crop_mask(opts.crop, *g.shape)
        m = depth_metrics(p, g, min_depth=opts.min_depth, max_depth=opts.max_depth, scale=scale, mask=mask)
        gt_pixels = int(depth_valid(np.ones_like(g), g, opts.min_depth, opts.max_depth, mask).sum())
        m["coverage"] = m["pixels"] / gt_pixels if gt_pixels else 0.0  # predicted share of the GT pixels
        rows.append({"frame": pair.frame, "pred": str(pair.pred), "gt": str(pair.gt)} | m)
        if i in picks:
            kept.append((pair.frame, p * (m["scale"] if m["pixels"] else 1.0), g))
    good = [r for r in rows if r["pixels"] > 0]
    if not good:
        raise InputError(f"no frame has a pixel with both a prediction and ground truth in "
                         f"({opts.min_depth}, {opts.max_depth})")
    summary: dict[str, Any] = {k: float(np.mean([r[k] for r in good])) for k in DEPTH_METRICS}
    summary |= {"frames": len(good), "frames_without_pixels": len(rows) - len(good),
                "pixels": int(sum(r["pixels"] for r in good)),
                "coverage": float(np.mean([r["coverage"] for r in rows])), "scaling": opts.scaling,
                "global_scale": scale if opts.scaling == "global" else None,
                "median_scale_of_frames": float(np.median([r["scale"] for r in good])),
                "min_depth": opts.min_depth, "max_depth": opts.max_depth if np.isfinite(opts.max_depth) else None,
                "crop": opts.crop, "resize_pred": opts.resize_pred, "prediction": str(pred), "ground_truth": str(gt),
                "average": "mean over frames of the per-frame metric"}
    return summary, rows, kept


def _colour(values: np.ndarray, valid: np.ndarray, lo: float, hi: float, cmap: int) -> np.ndarray:
    import cv2

    x = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    img = cv2.applyColorMap((x * 255).astype(np.uint8), cmap)
    img[~valid] = 0
    return img  # BGR


def error_image(pred: np.ndarray, gt: np.ndarray, opts: DepthEvalOptions, max_error: float = 0.25) -> np.ndarray:
    """BGR uint8 (H, 3W, 3) panel: scaled prediction | ground truth (same colour range, turbo) |
    absolute relative error |p - g| / g (inferno, black = 0, yellow >= max_error; black where unknown)."""
    import cv2

    valid = depth_valid(pred, gt, opts.min_depth, opts.max_depth, crop_mask(opts.crop, *gt.shape))
    g_ok = gt > 0
    lo, hi = (np.percentile(gt[g_ok], [2, 98]) if g_ok.any() else (0.0, 1.0))
    err = np.where(valid, np.abs(pred - gt) / np.where(gt > 0, gt, 1), 0)
    panel = np.concatenate([_colour(pred, pred > 0, lo, hi, cv2.COLORMAP_TURBO),
                            _colour(gt, g_ok, lo, hi, cv2.COLORMAP_TURBO),
                            _colour(err, valid, 0.0, max_error, cv2.COLORMAP_INFERNO)], axis=1)
    for i, label in enumerate(("prediction", "ground truth", f"abs rel error (0..{max_error})")):
        cv2.putText(panel, label, (i * gt.shape[1] + 6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return panel


def write_depth_outputs(out: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                        kept: list[tuple[int, np.ndarray, np.ndarray]], opts: DepthEvalOptions) -> None:
    """Write per_frame.csv, summary.json and errors/NNNNNN.png into `out` (a staging directory)."""
    import cv2

    from v2d.io.writers import ensure_dir, write_bytes, write_json, write_text

    buf = io.StringIO()
    fields = ["frame", "pixels", "coverage", "scale", *DEPTH_METRICS, "pred", "gt"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "per_frame.csv", buf.getvalue())
    write_json(out / "summary.json", summary)
    if kept:
        folder = ensure_dir(out / "errors")
        for key, p, g in kept:
            ok, png = cv2.imencode(".png", error_image(p, g, opts))
            if not ok:
                raise InputError(f"cannot encode the error image of frame {key}")
            write_bytes(folder / f"{key:06d}.png", png.tobytes())

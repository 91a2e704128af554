"""The validation suite: v2d on many sequences (real and synthetic hard cases) beside COLMAP.

    python -m bench.suite --json bench_out/suite.json [--only NAME ...] [--held-out] [--skip-colmap]
        [--baseline DIR] [--baseline-set KEY=VALUE ...] [--repeats 1] [--set KEY=VALUE ...] [--data ../shared/data]
    python -m bench.suite --held-out --skip-colmap --set motion.flow_source=learned \
        --baseline-set motion.flow_source=dis        # learned vs DIS motion, same code
    make suite

One threshold tuned to one sequence is what this suite exists to prevent: every change to the
engine reports this table before and after (`--baseline DIR`, a checkout of the earlier commit
with its extension built, runs the same sequences alternating with this code, in the same run).

Sequences (`SEQUENCES`; `--only` picks some by name):
- `7s-sK`: `../shared/data/7scenes-redkitchen`, frames 0-499 at stride K = 1, 2, 4, 8, 12 (stride 8
  moves about as fast as a hand-held phone turning in an office: ~3-4 cm and ~2 deg per frame;
  the dev set, so the table shows, not tunes, it); `7s-s2-rev`: stride 2 played backwards.
- `7s-late-sK`: frames 250-499 only, at the same strides: held apart from the learned motion
  update's training (`v2d train-motion` trains on frames 0-249).
- `scannet`, `tum-cabinet`: every other real sequence in `../shared/data` (wide baselines: 16-19 cm
  and 7-12 deg between frames).
- `syn-<case>`: the synthetic hard cases of `v2d.data.scenarios` (fast motion, pure rotation,
  motion blur, exposure changes, a blocked view, a loop back to the start), rendered here.

Each sequence is materialised once as an image folder (symlinks to the real frames, renumbered
0..N-1 so a trajectory timestamp is the position in the sequence; rendered PNGs for the synthetic
ones) with `intrinsics.txt`, and run as a user runs it: `v2d run FOLDER --out OUT --resize 240x320`
in a fresh subprocess, the dataset's intrinsics given. Per sequence: ATE RMSE after Sim3 alignment
over every frame of trajectory.txt (a lost frame counts with the pose the run wrote for it), RPE
per frame (translation cm, rotation deg; evo, after the same alignment), the RMS orientation error
relative to the first frame (rot deg: what remains measurable under pure rotation, where no Sim3
alignment exists), lost frames, map segments
(`summary.json`), frames/s end to end (wall time of the whole command, global optimisation
included), keyframe depth AbsRel (median-scaled, against the ground truth resized to 240x320,
where there is ground truth), and COLMAP (pycolmap: SIFT, sequential matching, incremental
mapping, the same frames at 240x320, known intrinsics; `bench.peers`' worker) as the peer column:
its registered frames and ATE over them. COLMAP's results do not depend on v2d's code, so they are
cached (`--colmap-cache`, keyed by the images' content, the intrinsics and pycolmap's version).

`--held-out` keeps the sequences that hold no frame the shipped learned weights were trained on
(7s-late-*, the other real sequences, the synthetic scene 0; training scenes are 1000 and up).
`--baseline-set` runs a second configuration of this code (or of `--baseline`) alternately, and the
summary compares the two (`compare`: median ATE ratio, sequences improved, lost frames).

Timings need an otherwise idle machine; ATE, lost frames and segments are deterministic (the
engine's synchronous mode) and do not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench._common import ROOT, run_child, v2d_usage, write_results

DATA = ROOT.parent / "shared" / "data"
SIZE = (240, 320)
TUM_FR3 = (535.4, 539.2, 320.1, 247.6)  # TUM fr3's colour camera (the dataset's README; TUM ships no file)
COLMAP_OVERLAP = 5  # sequential matching: each image with the next 5 (bench.peers' default)


@dataclass(frozen=True)
class Prepared:
    """A sequence ready to run: `folder` holds 000000.ext ... and intrinsics.txt (at the images' size).

    Shapes: gt_wc (N, 7) camera->world [t, qx, qy, qz, qw]; depth(k) -> (h, w) float32 metres (0 =
    unknown) or None.
    """

    folder: Path
    gt_wc: np.ndarray
    depth: Callable[[int], np.ndarray | None]
    kind: str  # "real" or "synthetic"


@dataclass(frozen=True)
class SuiteSequence:
    name: str
    kind: str
    describe: str
    prepare: Callable[[Path, Path], Prepared]  # (data root, work folder) -> Prepared
    needs: str | None = None  # the data folder it reads (skipped when absent)
    held_out: bool = False  # holds no frame the shipped learned weights were trained on (`--held-out`)


def _wc_from_matrices(m: np.ndarray) -> np.ndarray:
    import torch

    from v2d.geometry.lie import matrix_to_quat

    q = matrix_to_quat(torch.from_numpy(np.ascontiguousarray(m[:, :3, :3]))).numpy()
    return np.concatenate([m[:, :3, 3], q], axis=1)


def _write_intrinsics(folder: Path, intrinsics: np.ndarray) -> None:
    (folder / "intrinsics.txt").write_text(" ".join(f"{v:.6f}" for v in np.asarray(intrinsics).tolist()) + "\n")


def _real(folder_name: str, stride: int = 1, last: int | None = None, reverse: bool = False,
          intrinsics: tuple[float, ...] | None = None, first: int = 0) -> Callable[[Path, Path], Prepared]:
    def prepare(data: Path, work: Path) -> Prepared:
        from v2d.io.datasets import open_sequence

        seq = open_sequence(data / folder_name, None if intrinsics is None else np.array(intrinsics))
        n = len(seq) if last is None else min(len(seq), last + 1)
        idx = list(range(first, n, stride))
        if reverse:
            idx = idx[::-1]
        folder = work / "input"
        folder.mkdir(parents=True)
        for k, i in enumerate(idx):
            src = Path(seq.images[i]).resolve()
            (folder / f"{k:06d}{src.suffix.lower()}").symlink_to(src)
        _write_intrinsics(folder, seq.intrinsics)
        return Prepared(folder, _wc_from_matrices(seq.poses_wc[idx]), lambda k: seq.depth(idx[k]), "real")

    return prepare


def _synthetic(case: str, frames: int) -> Callable[[Path, Path], Prepared]:
    def prepare(data: Path, work: Path) -> Prepared:
        import cv2
        import torch

        from v2d.data.scenarios import render_scenario
        from v2d.geometry.lie import se3_inv

        seq = render_scenario(case, frames, seed=0, height=SIZE[0], width=SIZE[1]).sequence
        folder = work / "input"
        folder.mkdir(parents=True)
        for k, im in enumerate(np.asarray(seq.images)):
            cv2.imwrite(str(folder / f"{k:06d}.png"), np.ascontiguousarray(im[..., ::-1]))
        _write_intrinsics(folder, np.asarray(seq.intrinsics))
        depths = np.asarray(seq.depths)
        return Prepared(folder, se3_inv(torch.as_tensor(seq.poses_cw)).numpy(), lambda k: depths[k], "synthetic")

    return prepare


SYNTHETIC_FRAMES = {"fast": 100, "rotation": 100, "blur": 100, "exposure": 120, "blocked": 120, "loop": 240,
                    "jump": 60}

SEQUENCES: list[SuiteSequence] = [
    *(SuiteSequence(f"7s-s{k}", "real", f"7-Scenes redkitchen 0-499, stride {k}", _real("7scenes-redkitchen", k, 499),
                    "7scenes-redkitchen") for k in (1, 2, 4, 8, 12)),
    SuiteSequence("7s-s2-rev", "real", "7-Scenes redkitchen 0-499, stride 2, backwards",
                  _real("7scenes-redkitchen", 2, 499, reverse=True), "7scenes-redkitchen"),
    *(SuiteSequence(f"7s-late-s{k}", "real", f"7-Scenes redkitchen 250-499, stride {k}",
                    _real("7scenes-redkitchen", k, 499, first=250), "7scenes-redkitchen", held_out=True)
      for k in (1, 2, 4, 8, 12)),
    SuiteSequence("scannet", "real", "ScanNet scene0005_00, 58 frames 20 apart", _real("scannet-scene0005_00"),
                  "scannet-scene0005_00", held_out=True),
    SuiteSequence("tum-cabinet", "real", "TUM fr3/cabinet, 57 keyframes",
                  _real("tum-fr3-cabinet-keyframes", intrinsics=TUM_FR3), "tum-fr3-cabinet-keyframes",
                  held_out=True),
    *(SuiteSequence(f"syn-{c}", "synthetic", f"synthetic {c}, {n} frames", _synthetic(c, n), held_out=True)
      for c, n in SYNTHETIC_FRAMES.items()),
]


# ------------------------------------------------------------------------------------------------ evaluation


def _trajectory_metrics(out: Path, gt_wc: np.ndarray) -> dict:
    from v2d.errors import V2DError
    from v2d.io.trajectory import read_trajectory
    from v2d.metrics import evaluate_trajectory

    t, p = read_trajectory(out / "trajectory.txt", "tum")
    orient = {"rot_deg": _rotation_error_deg(p, gt_wc[: len(p)])}
    try:
        res, _ = evaluate_trajectory(t, p, np.arange(len(gt_wc), dtype=np.float64), gt_wc, align="sim3")
    except V2DError as exc:  # a degenerate (e.g. static) estimate
        return {"ate_cm": float("nan"), "rpe_cm": float("nan"), "rpe_deg": float("nan"), "ate_error": str(exc)} | orient
    rpe = res["rpe_frame"]
    trans, rot = rpe.get("trans_rmse"), rpe.get("rot_deg_rmse")
    return {"ate_cm": 100 * res["ate_rmse"], "rpe_cm": float("nan") if trans is None else 100 * trans,
            "rpe_deg": float("nan") if rot is None else rot, "path_m": res["path_length"],
            "scale": res["scale"]} | orient


def _rotation_error_deg(est_wc: np.ndarray, gt_wc: np.ndarray) -> float:
    """RMS angle (deg) between estimated and true orientations, each relative to its first frame: the
    measure that remains when the camera does not move (pure rotation: no Sim3 alignment exists).
    Shapes: (N, 7) camera->world [t, qx, qy, qz, qw]."""
    from scipy.spatial.transform import Rotation

    e, g = Rotation.from_quat(est_wc[:, 3:]), Rotation.from_quat(gt_wc[:, 3:])
    err = (g[0].inv() * g).inv() * (e[0].inv() * e)
    return float(np.degrees(np.sqrt(np.mean(err.magnitude() ** 2))))


def _abs_rel(out: Path, prep: Prepared) -> float | None:
    import cv2

    from v2d.metrics import depth_metrics

    rels = []
    for f in sorted((out / "depth").glob("*.npy")):
        gt = prep.depth(int(f.stem))
        if gt is None or not (gt > 0).any():
            continue
        gt = cv2.resize(gt, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_NEAREST)
        rels.append(depth_metrics(np.load(f), gt)["abs_rel"])
    return float(np.mean(rels)) if rels else None


def run_v2d(prep: Prepared, out: Path, root: Path, overrides: list[str]) -> dict:
    """One `v2d run` of the prepared folder (the code of checkout `root`); a result row ("error" on failure)."""
    args = ["run", str(prep.folder), "--out", str(out), "--resize", f"{SIZE[0]}x{SIZE[1]}",
            *[a for o in overrides for a in ("--set", o)]]
    try:
        usage = v2d_usage(args, root)
    except RuntimeError as exc:
        return {"error": str(exc).strip().splitlines()[-1][:300]}
    summary = json.loads((out / "summary.json").read_text())
    n = summary["frames"]
    row = {"frames": n, "fps": n / usage.wall_s, "wall_s": usage.wall_s, "cpu_s": usage.cpu_s,
           "peak_rss_mb": usage.peak_rss_mb, "keyframes": summary["keyframes"], "lost": summary["lost_frames"],
           "segments": summary.get("segments", summary.get("restarts", 0) + 1),
           **_trajectory_metrics(out, prep.gt_wc[:n])}
    row["abs_rel"] = _abs_rel(out, prep)
    if "global_ba" in summary:
        gba = summary["global_ba"]
        row["global_ba_s"] = gba.get("seconds")
        row["track_length"], row["reprojection_px"] = gba.get("track_length"), gba.get("reprojection_after_px")
    return row


def _images_key(folder: Path, intrinsics: list[float]) -> str:
    import pycolmap

    h = hashlib.sha1()
    for p in sorted(folder.iterdir()):
        if p.name != "intrinsics.txt":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(json.dumps([intrinsics, SIZE, COLMAP_OVERLAP, pycolmap.__version__]).encode())
    return h.hexdigest()


def run_colmap(prep: Prepared, work: Path, cache: dict) -> dict:
    """COLMAP (bench.peers' worker) on the same frames at 240x320 with known intrinsics; a result row."""
    import cv2

    from bench.peers import colmap_intrinsics
    from v2d.io.datasets import read_intrinsics
    from v2d.metrics import trajectory_ate

    images = sorted(p for p in prep.folder.iterdir() if p.name != "intrinsics.txt")
    in_hw = cv2.imread(str(images[0])).shape[:2]
    intr = colmap_intrinsics(read_intrinsics(prep.folder / "intrinsics.txt"), in_hw, SIZE).tolist()
    key = _images_key(prep.folder, intr)
    if key not in cache:
        work.mkdir(parents=True, exist_ok=True)
        spec = {"images": {f"{p.stem}.png": str(p) for p in images}, "size_hw": list(SIZE), "intrinsics": intr,
                "refine_focal": False, "overlap": COLMAP_OVERLAP, "work": str(work)}
        (work / "spec.json").write_text(json.dumps(spec))
        try:
            usage = run_child("bench.peers", ["_colmap", str(work / "spec.json")], "COLMAP worker")
            result = json.loads((work / "result.json").read_text())
            cache[key] = {"names": result["names"], "poses_wc": result["poses_wc"], "wall_s": usage.wall_s,
                          **{k: result[k] for k in ("track_length", "reprojection_px") if k in result}}
        except (RuntimeError, OSError, ValueError) as exc:
            cache[key] = {"error": str(exc).strip().splitlines()[-1][:300]}
    got = cache[key]
    if "error" in got:
        return {"error": got["error"]}
    frames = np.array([int(Path(n).stem) for n in got["names"]], dtype=np.int64)
    row = {"registered": len(frames), "frames": len(images), "wall_s": got["wall_s"],
           **{k: got[k] for k in ("track_length", "reprojection_px") if k in got}}
    if len(frames) < 3:
        return row | {"ate_cm": float("nan")}
    poses = np.asarray(got["poses_wc"], dtype=np.float64).reshape(-1, 7)
    ate = trajectory_ate(frames.astype(np.float64), poses, np.arange(len(prep.gt_wc), dtype=np.float64), prep.gt_wc)
    return row | {"ate_cm": 100 * ate["ate_rmse"]}


# ------------------------------------------------------------------------------------------------ report


def _median_row(runs: list[dict]) -> dict:
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    out = dict(runs[-1])
    for key in ("fps", "wall_s", "cpu_s", "ate_cm", "rpe_cm", "rpe_deg", "rot_deg", "abs_rel"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = statistics.median(vals)
    return out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def format_table(rows: list[dict], codes: list[str]) -> str:
    """One line per sequence and code: v2d's figures, then COLMAP's (registered / frames, ATE); then
    the COLMAP-style figures of both: mean track length (v2d: keyframes per track; COLMAP: images per
    point) and mean reprojection error in pixels at the network size (v2d: its tracks' observations
    within 4 px after the global adjustment, as COLMAP's bundle adjustment keeps only those)."""
    head = (f"{'sequence':12s} {'code':8s} {'frames':>6s} {'ATE cm':>8s} {'RPE cm':>7s} {'RPE deg':>7s} "
            f"{'rot deg':>7s} {'lost':>5s} {'segs':>4s} {'kf':>4s} {'fr/s':>6s} {'AbsRel':>7s} {'COLMAP reg':>10s} "
            f"{'COLMAP ATE':>10s} {'track':>5s} {'reproj':>6s} {'C track':>7s} {'C reproj':>8s}")
    lines = [head, "-" * len(head)]
    for row in rows:
        cm = row.get("colmap", {})
        reg = f"{cm['registered']}/{cm['frames']}" if "registered" in cm else ("fail" if "error" in cm else "-")
        for code in codes:
            r = row["v2d"].get(code, {})
            if "error" in r:
                lines.append(f"{row['name']:12s} {code:8s} error: {r['error']}")
                continue
            lines.append(
                f"{row['name']:12s} {code:8s} {r.get('frames', 0):6d} {_f(r.get('ate_cm'), '8.2f')} "
                f"{_f(r.get('rpe_cm'), '7.2f')} {_f(r.get('rpe_deg'), '7.2f')} {_f(r.get('rot_deg'), '7.2f')} "
                f"{r.get('lost', 0):5d} "
                f"{r.get('segments', 0):4d} {r.get('keyframes', 0):4d} {_f(r.get('fps'), '6.2f')} "
                f"{_f(r.get('abs_rel'), '7.3f')} {reg:>10s} {_f(cm.get('ate_cm'), '10.2f')} "
                f"{_f(r.get('track_length'), '5.2f')} {_f(r.get('reprojection_px'), '6.2f')} "
                f"{_f(cm.get('track_length'), '7.2f')} {_f(cm.get('reprojection_px'), '8.2f')}")
    return "\n".join(lines)


def summarise(rows: list[dict], code: str) -> dict:
    """The issue's targets for one code: lost frames and segments on the real and the must-survive
    synthetic sequences, stride 8 vs 2, and wins against COLMAP on the real sequences."""
    by = {r["name"]: r["v2d"].get(code, {}) for r in rows}
    real = [r for r in rows if r["kind"] == "real"]
    wins = [r["name"] for r in real if "ate_cm" in r.get("colmap", {}) and "ate_cm" in r["v2d"].get(code, {})
            and r["v2d"][code]["ate_cm"] <= r["colmap"]["ate_cm"]]
    compared = [r["name"] for r in real if np.isfinite(r.get("colmap", {}).get("ate_cm", np.nan))]
    must = [n for n in by if n in {r["name"] for r in real} or n in ("syn-fast", "syn-blur", "syn-blocked")]
    out = {"lost_total": sum(by[n].get("lost", 0) for n in must),
           "multi_segment": [n for n in must if by[n].get("segments", 1) > 1],
           "wins_vs_colmap": f"{len(wins)}/{len(compared)}", "wins": wins,
           "median_ate_cm": statistics.median([r.get("ate_cm", np.nan) for r in by.values()]) if by else None}
    if "7s-s8" in by and "7s-s2" in by and by["7s-s2"].get("ate_cm"):
        out["stride8_over_stride2"] = by["7s-s8"].get("ate_cm", np.nan) / by["7s-s2"]["ate_cm"]
    return out


def compare(rows: list[dict], before: str, after: str) -> dict:
    """Two codes on the same sequences: median ATE of each and their ratio, on how many sequences
    `after` has the lower ATE, lost frames of each (the learned-motion issue's targets)."""
    pairs = [(r["v2d"].get(before, {}).get("ate_cm"), r["v2d"].get(after, {}).get("ate_cm")) for r in rows]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)]
    if not pairs:
        return {}
    med_a, med_b = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
    return {"median_ate_before": med_a, "median_ate_after": med_b, "ratio": med_b / med_a if med_a else None,
            "better": f"{sum(b < a for a, b in pairs)}/{len(pairs)}",
            "lost_before": sum(r["v2d"].get(before, {}).get("lost", 0) for r in rows),
            "lost_after": sum(r["v2d"].get(after, {}).get("lost", 0) for r in rows)}


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--data", type=Path, default=DATA, help="the shared real data (default ../shared/data)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=[s.name for s in SEQUENCES],
                   help="run these sequences only")
    p.add_argument("--skip-colmap", action="store_true", help="no COLMAP column")
    p.add_argument("--colmap-cache", type=Path, default=ROOT / "bench_out" / "suite-colmap-cache.json",
                   help="COLMAP results by input content (default bench_out/suite-colmap-cache.json)")
    p.add_argument("--baseline", type=Path, help="a checkout of an earlier commit, run alternately (before/after)")
    p.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the baseline's runs (repeatable); without --baseline the baseline is "
                   "this code with these overrides (e.g. --baseline-set motion.flow_source=dis)")
    p.add_argument("--held-out", action="store_true",
                   help="only the sequences that hold no frame the shipped learned weights were trained on")
    p.add_argument("--repeats", type=int, default=1, help="runs per sequence and code (medians)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for this code's runs (repeatable)")
    p.add_argument("--keep", type=Path, help="keep the prepared inputs and outputs here")
    return p


def prepared_sequences(chosen: list[SuiteSequence], data: Path, base: Path
                       ) -> Iterator[tuple[SuiteSequence, Prepared, Path]]:
    """Each sequence materialised in base/NAME/input (made afresh) with its work folder base/NAME;
    one whose data is missing is skipped with a line saying so."""
    for seq in chosen:
        if seq.needs and not (data / seq.needs).is_dir():
            print(f"{seq.name}: skipped, {data / seq.needs} not found")
            continue
        work = base / seq.name
        if (work / "input").exists():
            shutil.rmtree(work / "input")
        yield seq, seq.prepare(data, work), work


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = [s for s in SEQUENCES if (args.only is None or s.name in args.only) and (s.held_out or not args.held_out)]
    before = args.baseline.resolve() if args.baseline else ROOT if args.baseline_overrides else None
    roots = {"this": ROOT} | ({"before": before} if before else {})
    cache = json.loads(args.colmap_cache.read_text()) if args.colmap_cache.is_file() else {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="v2d-suite-") as tmp:
        base = args.keep or Path(tmp)
        for seq, prep, work in prepared_sequences(chosen, args.data, base):
            row = {"name": seq.name, "kind": seq.kind, "describe": seq.describe, "v2d": {}}
            runs: dict[str, list[dict]] = {c: [] for c in roots}
            for r in range(args.repeats):
                for code, root in roots.items():
                    runs[code].append(run_v2d(prep, work / f"out-{code}-{r}", root,
                                              args.overrides if code == "this" else args.baseline_overrides))
            row["v2d"] = {c: _median_row(rs) for c, rs in runs.items()}
            if not args.skip_colmap:
                row["colmap"] = run_colmap(prep, work / "colmap", cache)
                args.colmap_cache.parent.mkdir(parents=True, exist_ok=True)
                args.colmap_cache.write_text(json.dumps(cache))
            rows.append(row)
            print("\n".join(format_table([row], list(roots)).splitlines()[2:]))
    print()
    print(format_table(rows, list(roots)))
    results = {"sequences": rows, "overrides": args.overrides, "baseline_overrides": args.baseline_overrides,
               "codes": {c: str(r) for c, r in roots.items()}, "summary": {c: summarise(rows, c) for c in roots}}
    if "before" in roots:
        results["summary"]["this_vs_before"] = compare(rows, "before", "this")
    for c, s in results["summary"].items():
        print(f"{c}: {json.dumps(s)}")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(main())

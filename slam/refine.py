"""Test-time refinement of a finished run's keyframe depth (`v2d run --refine`, `v2d refine DIR`).

    summary = refine_run("out/", "out/", cfg)          # in place (inside `v2d run`'s stage)
    with staged_output("out/") as stage:               # `v2d refine out/`: the changed files only
        refine_run("out/", stage, cfg)

A copy of the depth module the run used is fine-tuned on the run's own keyframes
(`v2d.adapt.DepthAdapter`: sparse multi-view points, geometric consistency, a regulariser toward
the run's depth), then every keyframe's depth is predicted again (and averaged with its
neighbours' where they agree, as the run does with its window: `slam.fuse_tolerance`) and
`depth/`, `cloud.ply` and
`summary.json` are rewritten, with the adapted weights in `adapted.pt` (a second run of the same
scene can start from them: `--weights OUT/adapted.pt`). `summary.json`'s `refine` entry holds the
steps, the seconds, the losses, the held-out error before and after and `v2d eval consistency`'s
figures before and after.

If the held-out error says the adapted network is not better than the run's depth, the run's depth
is kept (no `depth/`, `cloud.ply` or `adapted.pt` is written), a warning says so and the summary's
`refine.kept` is false.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slam.config import RunConfig
from slam.consistency import depth_consistency
from v2d.adapt import AdaptScene, DepthAdapter
from v2d.config import merge, to_dict
from v2d.errors import ConfigError, InputError
from v2d.geometry.lie import se3_inv
from v2d.io.results import RunOutputs, load_run
from v2d.io.writers import atomic_write, ensure_dir, write_depth_png, write_json, write_npy
from v2d.model import load_model

__all__ = ["refine_run", "run_config"]

_log = logging.getLogger(__name__)

_CONSISTENCY_KEYS = ("median_rel_diff", "within_tolerance", "pair_mean_median_rel_diff")


def run_config(run: RunOutputs, cfg: RunConfig, weights: str | None = None) -> RunConfig:
    """The configuration the run was made with (its summary's `config`), with the `refine` section of
    `cfg` and, when given, other starting weights."""
    saved = run.summary.get("config")
    if not isinstance(saved, dict):
        raise InputError(f"{run.root}/summary.json: no `config` entry; not an output of `v2d run`")
    try:
        base = merge(RunConfig(), saved)
    except ConfigError as exc:
        raise InputError(f"{run.root}/summary.json: its config does not fit this version of v2d ({exc})") from None
    base = dataclasses.replace(base, refine=cfg.refine)
    if weights is not None:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, weights=str(weights)))
    return base


def _scene(run: RunOutputs) -> AdaptScene:
    K = len(run.keyframe_rows)
    if K < 2:
        raise InputError(f"{run.root}: {K} keyframe(s); refinement needs at least 2")
    images = []
    for k in range(K):
        image = run.image(k)
        if image is None:
            raise InputError(f"{run.root}/images/{run.keyframe_files[k]}.jpg: keyframe image missing; "
                             "refinement needs every keyframe's image")
        images.append(image)
    depths = np.stack([run.depth(k) for k in range(K)])
    row_to_kf = {row: k for k, row in enumerate(run.keyframe_rows)}
    segments = [[row_to_kf[r] for r in seg if r in row_to_kf] for seg in run.summary.get("segment_keyframes", [])]
    segments = [s for s in segments if s]
    if sorted(k for s in segments for k in s) != list(range(K)):
        segments = [list(range(K))]
    poses_cw = se3_inv(torch.from_numpy(run.keyframe_poses_wc).double())
    return AdaptScene(np.stack(images), poses_cw, torch.from_numpy(run.intrinsics), depths, segments)


def _consistency(run: RunOutputs) -> dict[str, Any]:
    summary, _ = depth_consistency(run)
    return {k: summary[k] for k in _CONSISTENCY_KEYS}


def refine_run(src: str | Path, dst: str | Path, cfg: RunConfig, weights: str | None = None,
               progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Refine the run in `src`; write the changed outputs (depth/, cloud.ply, summary.json, adapted.pt)
    into `dst` (`src` itself, or a stage to be committed over it). Returns the new summary.

    `cfg.refine` sets the refinement; the model is the run's (`run_config`), from `weights` when given.
    Raises InputError for a folder that is not a finished run (or lacks keyframe images).
    """
    from slam.run import fuse_cloud

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    run = load_run(src)
    scene = _scene(run)
    rcfg = run_config(run, cfg, weights)
    model = load_model(rcfg)
    before = _consistency(run)
    adapter = DepthAdapter(model.depth.to(device), scene, rcfg.refine)
    report = adapter.fit(progress=progress)
    summary = dict(run.summary)
    warnings = list(summary.get("warnings", []))
    entry: dict[str, Any] = {"kept": report.improved, **report.as_dict(), "weights_from": rcfg.model.weights,
                             "consistency_before": before}
    if report.improved:
        new = _fused(adapter.predict(), adapter.views, scene, rcfg.slam.fuse_tolerance)
        depth_dir = ensure_dir(dst / "depth")
        depths = []
        for k in range(len(scene)):
            d = new[k].numpy() if k in new else scene.depths[k]
            d = np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)
            depths.append(d)
            write_npy(depth_dir / f"{run.keyframe_files[k]}.npy", d)
            write_depth_png(depth_dir / f"{run.keyframe_files[k]}.png", d)
        sc = rcfg.slam
        s = sc.cloud_stride
        cloud = fuse_cloud(dst / "cloud.ply", [d[::s, ::s] for d in depths],
                           [im[::s, ::s] for im in scene.images], scene.poses_cw.float(),
                           torch.from_numpy(run.intrinsics), s, sc,
                           normals=[None if (n := run.normal(k)) is None else n[::s, ::s] for k in range(len(scene))])
        summary.update(cloud)
        state = {"model": {**model.state_dict(), **{f"depth.{k}": v for k, v in adapter.state_dict().items()}}}
        atomic_write(dst / "adapted.pt", lambda f: torch.save(state, f))
        entry["weights"] = "adapted.pt"
        entry["consistency_after"] = _consistency(dataclasses.replace(run, root=dst))
    else:
        message = (f"refinement kept the run's depth: the adapted network's held-out error "
                   f"{_fmt(report.error_adapted)} is not below the original's {_fmt(report.error_original)}")
        _log.warning(message)
        warnings.append(message)
        entry["consistency_after"] = before
    entry["seconds_total"] = time.perf_counter() - t0
    summary["warnings"] = warnings
    summary["refine"] = entry
    summary["config"] = {**summary.get("config", {}), "refine": to_dict(rcfg.refine)}
    write_json(dst / "summary.json", summary)
    return summary


def _fused(depths: dict[int, torch.Tensor], views: dict[int, list[int]], scene: AdaptScene, tolerance: float
           ) -> dict[int, torch.Tensor]:
    """Each keyframe's new depth averaged, in inverse depth, with its neighbour views' new depth splatted
    into it where they agree within `tolerance` (`slam.keyframe_depth.fuse_depths`, as the run does
    with its window; 0 = no averaging).

    Shapes: depths {k: (H, W)} -> the same.
    """
    if tolerance <= 0:
        return depths
    from slam.fusion import splat_depth
    from slam.keyframe_depth import fuse_depths
    from v2d.geometry.lie import se3_identity, se3_mul

    identity = se3_identity(dtype=torch.float32)
    intr = scene.intrinsics.float()
    out = {}
    for k, d in depths.items():
        refs = [splat_depth(depths[j], identity, se3_mul(scene.poses_cw[k], se3_inv(scene.poses_cw[j])).float(), intr)
                for j in views[k] if j in depths]
        out[k] = fuse_depths(d, [r for r in refs if float((r > 0).float().mean()) > 0.1], tolerance)
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"

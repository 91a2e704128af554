"""Keyframe depth on real data: trained model vs untrained network vs a classical plane sweep.

    python -m bench.depth_eval --weights runs/small-synth/model.pt --json bench_out/depth_7scenes.json
        [--data ../shared/data/7scenes-redkitchen] [--keyframes 50]

Protocol (issue 4): every 2nd frame of frames 0-499, resized to 240x320, 5-frame clips (keyframe in
the middle, neighbours 1 and 2 steps away in the subsampled sequence), ground-truth poses given to
the depth estimators but `estimated_poses`, which estimates them. Metrics per keyframe with median
scaling, averaged: AbsRel, RMSE, delta < 1.25. The estimators see exactly the same clips:
- `trained`: the depth module with the given weights;
- `untrained`: the same network freshly initialised (seed 0);
- `trained_no_poses`: the trained network given identity poses (a diagnostic: equal to `trained`
  means the network ignores the multi-view cost volume and predicts from the keyframe alone);
- `estimated_poses`: the trained model's whole alternation (`V2D.forward`: motion updates with the
  configured flow source from identity poses, then depth, `model.iters` rounds), no poses given:
  what joint training optimises;
- `plane_sweep`: winner-take-all plane sweep of raw RGB patches (`v2d.planesweep`, built on the
  cost-volume kernel), 64 hypotheses spaced in inverse depth over the depth module's range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import ROOT, write_results

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "7scenes-redkitchen"


def evaluate(data: Path, weights: Path | None, keyframes: int, config: list[str]) -> dict:
    from slam.config import RunConfig
    from v2d.checkpoint import load_weights
    from v2d.config import load_config
    from v2d.data.clips import ClipConfig
    from v2d.geometry.camera import pose_to_rt, relative_pose
    from v2d.io.datasets import SequenceClips, open_sequence
    from v2d.metrics import depth_metrics
    from v2d.model import V2D, normalize_images
    from v2d.planesweep import inverse_depth_hypotheses, plane_sweep_depth

    cfg = load_config(config[:1] or None, config[1:], root=RunConfig)  # any file in configs/
    seq = open_sequence(data)
    keep = list(range(0, min(len(seq), 500), 2))
    seq.images = [seq.images[k] for k in keep]
    seq.depths = [seq.depths[k] for k in keep]
    seq.poses_wc = seq.poses_wc[keep]
    seq.timestamps = seq.timestamps[keep]
    clips = SequenceClips(seq, ClipConfig(frames=5, stride=1, keyframe="middle", flip=False, jitter=0.0), 240, 320)
    picks = np.linspace(0, len(clips) - 1, keyframes).round().astype(int)

    torch.manual_seed(0)
    untrained = V2D.from_config(cfg).eval()
    trained = None
    if weights is not None:
        torch.manual_seed(0)
        trained = V2D.from_config(cfg).eval()
        load_weights(weights, trained)
    models = {"trained": trained, "untrained": untrained, "trained_no_poses": trained}
    names = ("trained", "untrained", "trained_no_poses", "estimated_poses", "plane_sweep")
    per: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    seconds: dict[str, float] = {k: 0.0 for k in per}
    with torch.no_grad():
        for k in picks:
            c = clips[int(k)]
            gt = c["depths"][0].numpy()
            for name, model in models.items():
                if model is None:
                    continue
                t = time.perf_counter()
                x = normalize_images(c["images"])
                feats = model.depth.features(x)[None]
                poses = c["poses_cw"][None]
                if name == "trained_no_poses":
                    poses = torch.zeros_like(poses)
                    poses[..., 6] = 1.0
                depth = model.depth(feats, poses, c["intrinsics"][None], (240, 320))[-1][0]
                seconds[name] += time.perf_counter() - t
                per[name].append(depth_metrics(depth.numpy(), gt))
            if trained is not None:
                t = time.perf_counter()
                depth = trained(c["images"], c["intrinsics"]).depths[-1][-1][0]
                seconds["estimated_poses"] += time.perf_counter() - t
                per["estimated_poses"].append(depth_metrics(depth.numpy(), gt))
            t = time.perf_counter()
            rel = pose_to_rt(relative_pose(c["poses_cw"][:1].expand(4, 7), c["poses_cw"][1:]))
            hyp = inverse_depth_hypotheses(cfg.depth.min_depth, cfg.depth.max_depth, 64, c["images"])
            depth, _ = plane_sweep_depth(c["images"][0], c["images"][1:], rel.contiguous(), c["intrinsics"], hyp)
            seconds["plane_sweep"] += time.perf_counter() - t
            per["plane_sweep"].append(depth_metrics(depth.numpy(), gt))
    out: dict = {"data": str(data), "keyframes": len(picks), "size": [240, 320], "frames_per_clip": 5,
                 "weights": str(weights) if weights else None}
    for name, rows in per.items():
        if rows:
            out[name] = {m: statistics.fmean(r[m] for r in rows if np.isfinite(r[m]))
                         for m in ("abs_rel", "rmse", "delta1", "sq_rel", "rmse_log")}
            out[name]["seconds_per_keyframe"] = seconds[name] / len(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="7-Scenes-layout folder")
    p.add_argument("--weights", type=Path, help="trained weights (model.pt or checkpoint.pt)")
    p.add_argument("--keyframes", type=int, default=50, help="keyframes evaluated (spread over the sequence)")
    p.add_argument("--config", nargs="*", default=[], metavar="FILE_THEN_OVERRIDES",
                   help="a config file then key=value overrides (the model the weights were trained with)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder not found: {args.data}", file=sys.stderr)
        return 1
    r = evaluate(args.data, args.weights, args.keyframes, args.config)
    print(f"{r['keyframes']} keyframes of {args.data.name}, 240x320, 5-frame clips, GT poses (but "
          f"estimated_poses), median scaling")
    print(f"{'method':<18}{'AbsRel':>8}{'RMSE':>8}{'d<1.25':>8}{'s/kf':>8}")
    for name in ("trained", "untrained", "trained_no_poses", "estimated_poses", "plane_sweep"):
        if name in r:
            m = r[name]
            print(f"{name:<18}{m['abs_rel']:>8.3f}{m['rmse']:>8.3f}{m['delta1']:>8.3f}{m['seconds_per_keyframe']:>8.2f}")
    write_results(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""bench.depth_parts' figures on a run whose depth and normals are the ground truth's (no SLAM)."""

from __future__ import annotations

import numpy as np
import torch

from bench.depth_parts import depth_figures, summarise
from bench.suite import SIZE, Prepared
from tests.fake_run import write_fake_run
from v2d.data.synthetic import render_sequence
from v2d.geometry.lie import se3_inv
from v2d.geometry.normals import normals_from_depth
from v2d.io.results import keyframe_name
from v2d.io.writers import ensure_dir, write_normal_png


def test_figures_of_a_perfect_run_and_a_tilted_one(tmp_path):
    seq = render_sequence(4, 6, *SIZE)
    keyframes = [0, 2, 4]
    prep = Prepared(tmp_path, se3_inv(seq.poses_cw).numpy(), lambda k: np.asarray(seq.depths[k]), "synthetic")
    run = write_fake_run(tmp_path / "run", seq, keyframes)
    normal_dir = ensure_dir(run / "normal")
    for f in keyframes:
        n, _ = normals_from_depth(torch.from_numpy(np.asarray(seq.depths[f])).double(), seq.intrinsics)
        write_normal_png(normal_dir / f"{keyframe_name(f)}.png", n.numpy())
    perfect = depth_figures(run, prep)
    assert perfect["abs_rel"] < 1e-3 and perfect["delta1"] > 0.999 and perfect["normal_deg"] < 0.1
    assert perfect["consistency"] < 0.01
    # Depth 10 % too far on the right half, normals all facing the camera: both figures see it.
    bad = write_fake_run(tmp_path / "bad", seq, keyframes,
                         depths={f: np.asarray(seq.depths[f]) * np.where(np.arange(SIZE[1]) < SIZE[1] // 2, 1.0, 1.1)
                                 .astype(np.float32) for f in keyframes})
    facing = np.zeros((*SIZE, 3))
    facing[..., 2] = -1
    ensure_dir(bad / "normal")
    for f in keyframes:
        write_normal_png(bad / "normal" / f"{keyframe_name(f)}.png", facing)
    worse = depth_figures(bad, prep)
    assert worse["abs_rel"] > 0.03 and worse["normal_deg"] > 5 * max(perfect["normal_deg"], 0.5)
    rows = [{"name": "scannet", "variants": {"a": {**worse, "wall_s": 10.0}, "b": {**perfect, "wall_s": 12.0}}}]
    s = summarise(rows, "b", "a")
    assert s["sequences"] == 1 and s["median_time_ratio"] == 1.2 and s["median_abs_rel_ratio"] < 0.03

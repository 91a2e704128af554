"""Depth consistency without ground truth: agreeing depth and poses score near 0, wrong ones do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from slam.consistency import depth_consistency
from slam.fusion import relative_disagreement
from tests.fake_run import write_fake_run
from v2d.data.synthetic import render_sequence
from v2d.errors import InputError, ShapeError
from v2d.io.results import load_run

KEYFRAMES = [0, 3, 6, 9]


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=5, num_frames=10, height=60, width=80)


def test_relative_disagreement_by_hand():
    # Two cameras looking down z, the second 1 m further back; a wall at 4 m seen from the first.
    intr = torch.tensor([50.0, 50.0, 15.5, 11.5])
    d_i = torch.full((24, 32), 4.0)
    d_j = torch.full((24, 32), 5.0)  # the same wall seen from 1 m further back
    pose_i = torch.tensor([0.0, 0, 0, 0, 0, 0, 1])
    pose_j = torch.tensor([0.0, 0, 1, 0, 0, 0, 1])  # world->camera: z_cam = z_world + 1
    rel, valid = relative_disagreement(d_i, d_j, pose_i, pose_j, intr)
    assert valid == 24 * 32 and rel.numel() == valid  # moving back keeps every pixel in view
    assert float(rel.abs().max()) < 1e-6
    rel, _ = relative_disagreement(d_i, torch.full((24, 32), 6.0), pose_i, pose_j, intr)
    assert torch.allclose(rel, torch.full_like(rel, 1 / 6))
    d_j[:12] = 0  # unknown depth in j: those pixels are not compared
    rel, _ = relative_disagreement(d_i, d_j, pose_i, pose_j, intr)
    assert 0 < rel.numel() < valid
    with pytest.raises(ShapeError):
        relative_disagreement(d_i, torch.ones(3, 3), pose_i, pose_j, intr)


def test_ground_truth_depth_and_poses_are_consistent(tmp_path, seq):
    run = load_run(write_fake_run(tmp_path / "run", seq, KEYFRAMES))
    summary, rows = depth_consistency(run, neighbours=2)
    assert summary["keyframes"] == 4 and summary["pairs"] == 2 * (2 + 2 + 1) == len(rows)
    assert summary["median_rel_diff"] < 0.01 and summary["within_tolerance"] > 0.9
    assert 0.3 < summary["mean_overlap"] <= 1.0
    assert {(r["from"], r["to"]) for r in rows} >= {("000000", "000003"), ("000003", "000000"), ("000000", "000006")}


def test_a_wrong_depth_map_shows_in_its_pairs(tmp_path, seq):
    depths = {3: 1.3 * np.asarray(seq.depths[3], dtype=np.float32)}
    run = load_run(write_fake_run(tmp_path / "run", seq, KEYFRAMES, depths=depths))
    summary, rows = depth_consistency(run, neighbours=1)
    bad = [r for r in rows if "000003" in (r["from"], r["to"])]
    good = [r for r in rows if "000003" not in (r["from"], r["to"])]
    assert all(r["median_rel_diff"] > 0.15 for r in bad) and all(r["median_rel_diff"] < 0.01 for r in good)
    assert summary["within_tolerance"] < 0.7


def test_wrong_poses_are_inconsistent(tmp_path, seq):
    root = write_fake_run(tmp_path / "run", seq, KEYFRAMES)
    lines = (root / "trajectory.txt").read_text().splitlines()
    vals = np.array(lines[4].split(), dtype=np.float64)  # keyframe 3 (line 0 is the header)
    axis = Rotation.from_quat(vals[4:]).as_matrix()[:, 2]
    median_depth = float(np.median(seq.depths[3]))
    vals[1:4] += 0.2 * median_depth * axis  # moved forward by a fifth of what it sees
    lines[4] = " ".join(f"{v:.9f}" for v in vals)
    (root / "trajectory.txt").write_text("\n".join(lines) + "\n")
    summary, rows = depth_consistency(load_run(root), neighbours=1)
    bad = [r for r in rows if "000003" in (r["from"], r["to"])]
    assert all(r["median_rel_diff"] > 0.1 for r in bad) and summary["within_tolerance"] < 0.7


def test_bad_runs(tmp_path, seq):
    with pytest.raises(InputError, match="at least 2"):
        depth_consistency(load_run(write_fake_run(tmp_path / "one", seq, [0])))
    run = load_run(write_fake_run(tmp_path / "two", seq, [0, 3]))
    with pytest.raises(InputError, match="neighbours"):
        depth_consistency(run, neighbours=0)
    with pytest.raises(InputError, match="tolerance"):
        depth_consistency(run, tolerance=5)
    empty = {0: np.zeros((60, 80), np.float32), 3: np.zeros((60, 80), np.float32)}
    with pytest.raises(InputError, match="do not overlap"):
        depth_consistency(load_run(write_fake_run(tmp_path / "empty", seq, [0, 3], depths=empty)))

"""The demo (`v2d demo`): SLAM with the shipped weights on the embedded synthetic sequence."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from evo.tools import file_interface

from tools.cli import main
from v2d.model import SHIPPED_WEIGHTS

# The target: ATE RMSE (Sim3) <= 1% of the path length. Depth: a regression bound on the
# keyframes' AbsRel (measured about 0.04 at 240x320).
ATE_FRACTION = 0.01
ABS_REL = 0.08


@pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason=f"shipped weights missing: {SHIPPED_WEIGHTS}")
def test_demo_tracks_the_sequence_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["path_length"] > 1.0  # the camera really moves
    assert summary["ate_rmse"] <= ATE_FRACTION * summary["path_length"], summary["trajectory"]
    assert summary["depth"]["abs_rel"] < ABS_REL
    assert summary["lost_frames"] == 0 and summary["keyframes"] >= 5
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    gt = file_interface.read_tum_trajectory_file(str(out / "trajectory_gt.txt"))
    assert traj.num_poses == gt.num_poses == summary["frames"] == 60
    pngs = sorted((out / "depth").glob("*.png"))
    assert len(pngs) == summary["keyframes"]
    png = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (240, 320)
    assert np.allclose(np.load(pngs[0].with_suffix(".npy")) * 1000, png, atol=0.51)
    assert (out / "cloud.ply").stat().st_size > 10000
    view = cv2.imread(str(out / "demo.png"), cv2.IMREAD_COLOR)  # the `v2d vis --headless` picture
    assert view is not None and view.shape == (480, 640, 3)
    assert view.std() > 20 and (np.abs(view.astype(int) - 255).max(-1) > 8).mean() > 0.1  # not blank
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporaries
    assert not list(tmp_path.glob(".*partial-*"))


def test_demo_unwritable_output_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "sub"), "--set", "model.weights=none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


def test_demo_missing_weights_is_one_line_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", f"model.weights={tmp_path / 'none.pt'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights file not found" in err[0]
    assert not out.exists()

"""The demo (`v2d demo`): the V2D model with the shipped weights on the synthetic sequence."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from evo.tools import file_interface

from tools.cli import main
from v2d.model import SHIPPED_WEIGHTS

# Regression bounds for the shipped weights on the default demo (240x320, the training size):
# measured 0.12 deg mean rotation error (true rotations up to 14 deg) and AbsRel 0.038.
ROTATION_DEG = 0.5
ABS_REL = 0.1


@pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason=f"shipped weights missing: {SHIPPED_WEIGHTS}")
def test_demo_recovers_poses_and_depth_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    track, depth = summary["tracking"], summary["depth"]
    assert track["rotation_error_deg"]["true_max"] > 5.0  # the camera really turns
    assert track["rotation_error_deg"]["mean"] < ROTATION_DEG
    assert depth["abs_rel"] < ABS_REL
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    assert traj.num_poses == 5
    png = cv2.imread(str(out / "depth" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (240, 320)
    assert np.allclose(np.load(out / "depth" / "000000.npy") * 1000, png, atol=0.51)
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporaries


def test_demo_unwritable_output_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "sub"), "--set", "model.weights=none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create output directory" in err[0]


def test_demo_missing_weights_is_one_line_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", f"model.weights={tmp_path / 'none.pt'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights file not found" in err[0]
    assert not out.exists()

"""The demo (`v2d demo`): runs on the synthetic sequence, recovers poses and depth, writes outputs."""

from __future__ import annotations

import json

import cv2
import numpy as np
from evo.tools import file_interface

from tools.cli import main


def test_demo_recovers_poses_and_depth_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--set", "demo.num_frames=5", "--set", "demo.height=120",
            "--set", "demo.width=160", "--set", "demo.feature_scale=1"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    track = summary["tracking"]
    assert track["rotation_error_deg"]["initial_mean"] > 1.0
    assert track["rotation_error_deg"]["max"] < 0.5  # the networks issue's DIS target
    assert track["translation_error"]["max"] < 0.02
    assert summary["depth"]["abs_rel"] < 0.15
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    assert traj.num_poses == 5
    depth = cv2.imread(str(out / "depth" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert depth.dtype == np.uint16 and depth.shape == (120, 160)
    assert np.allclose(np.load(out / "depth" / "000000.npy") * 1000, depth, atol=0.51)
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporaries


def test_demo_unwritable_output_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create output directory" in err[0]

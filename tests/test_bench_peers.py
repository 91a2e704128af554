"""bench/peers.py: frame selection, pose and intrinsics conventions, both methods on a tiny synthetic
7-Scenes folder, missing methods, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from bench import peers
from v2d.data.synthetic import render_sequence
from v2d.errors import InputError
from v2d.geometry.lie import se3_inv

pycolmap = pytest.importorskip("pycolmap")

FRAMES = 12


def _write_7scenes(path: Path, seed: int) -> np.ndarray:
    """A 7-Scenes layout folder of the synthetic sequence; returns the GT camera->world poses (N, 7)."""
    # fps=5: 30 cm/s at 5 frames/s gives the baselines SfM needs on 12 frames of 96x128
    seq = render_sequence(seed=seed, num_frames=FRAMES, height=96, width=128, fps=5.0)
    path.mkdir(parents=True)
    poses_wc = se3_inv(torch.as_tensor(seq.poses_cw)).numpy()
    for k in range(FRAMES):
        stem = path / f"frame-{k:06d}"
        cv2.imwrite(f"{stem}.color.png", np.ascontiguousarray(np.asarray(seq.images[k])[..., ::-1]))
        cv2.imwrite(f"{stem}.depth.png", (np.asarray(seq.depths[k]) * 1000).astype(np.uint16))
        m = np.eye(4)
        m[:3, :3] = Rotation.from_quat(poses_wc[k, 3:]).as_matrix()  # lietorch and scipy: [x, y, z, w]
        m[:3, 3] = poses_wc[k, :3]
        np.savetxt(f"{stem}.pose.txt", m)
    fx, fy, cx, cy = np.asarray(seq.intrinsics, dtype=np.float64).tolist()
    np.savetxt(path / "camera-intrinsics.txt", [[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    return poses_wc


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("peers") / "seq"
    return path, _write_7scenes(path, seed=3)


def _path_length(poses_wc: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(poses_wc[:, :3], axis=0), axis=1).sum())


def test_pose_conversion_inverts_cam_from_world():
    r_cw = Rotation.from_rotvec([0.4, -0.9, 0.2])
    t_cw = np.array([0.5, -1.0, 2.0])
    pose = peers.pose_wc_from_cam_from_world(pycolmap.Rigid3d(pycolmap.Rotation3d(r_cw.as_matrix()), t_cw))
    r_wc = r_cw.inv()
    np.testing.assert_allclose(pose[:3], -r_wc.apply(t_cw), atol=1e-12)  # the camera centre in the world
    q = r_wc.as_quat()  # [x, y, z, w]
    assert min(np.abs(pose[3:] - q).max(), np.abs(pose[3:] + q).max()) < 1e-12


def test_reconstruction_poses_sorted_by_name():
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera(camera_id=1, model=pycolmap.CameraModelId.PINHOLE, width=128, height=96,
                          params=[100.0, 100.0, 64.0, 48.0])
    rec.add_camera_with_trivial_rig(cam)
    centres = {"000004.png": [1.0, 0.0, 0.0], "000002.png": [0.0, 2.0, 0.0]}
    for image_id, (name, c) in enumerate(centres.items(), start=1):
        im = pycolmap.Image(name=name, image_id=image_id, camera_id=cam.camera_id)
        rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(pycolmap.Rotation3d(), -np.asarray(c)))
    names, poses = peers.reconstruction_poses(rec)
    assert names == ["000002.png", "000004.png"]
    np.testing.assert_allclose(poses[:, :3], [centres[n] for n in names], atol=1e-12)
    np.testing.assert_allclose(poses[:, 3:], [[0, 0, 0, 1]] * 2, atol=1e-12)


def test_colmap_intrinsics_shift_to_pixel_corners_and_scale():
    k = np.array([585.0, 585.0, 319.5, 239.5])  # image centre of 640x480, pixel centres at integers
    np.testing.assert_allclose(peers.colmap_intrinsics(k, (480, 640), (480, 640)), [585, 585, 320, 240])
    np.testing.assert_allclose(peers.colmap_intrinsics(k, (480, 640), (240, 320)), [292.5, 292.5, 160, 120])


def test_select_frames(scene, tmp_path):
    path, _ = scene
    assert peers.select_frames(path, 1, 10, 3) == [1, 4, 7, 10]
    with pytest.raises(InputError, match="frame 12 is selected"):
        peers.select_frames(path, 0, 12, 2)
    with pytest.raises(InputError, match="no such data folder"):
        peers.select_frames(tmp_path / "nope", 0, 10, 1)
    with pytest.raises(InputError, match="at least 3"):
        peers.select_frames(path, 0, 2, 2)


def test_colmap_on_synthetic_frames(scene, tmp_path):
    """Frames 1..11 (not from 0): a wrong name -> frame mapping would associate the wrong poses."""
    path, poses_wc = scene
    frames = list(range(1, FRAMES))
    row = peers.run_colmap(path, frames, None, False, 5, tmp_path / "colmap", peers._ground_truth(path))
    assert "error" not in row
    assert row["registered"] >= 9 and row["ate"]["pairs"] == row["registered"]
    assert row["camera"]["fx"] == pytest.approx(row["intrinsics_given"][0])  # known intrinsics stay fixed
    assert row["ate"]["ate_rmse"] < 0.02 * _path_length(poses_wc[1:])


def test_v2d_on_synthetic_frames(scene, tmp_path):
    path, poses_wc = scene
    frames = list(range(2, FRAMES))
    row = peers.run_v2d(path, frames, (96, 128), True, tmp_path / "v2d", peers._ground_truth(path))
    assert "error" not in row
    assert row["registered"] == len(frames) - row["lost"] and row["ate"]["pairs"] == row["registered"]
    assert row["ate"]["ate_rmse"] < 0.05 * _path_length(poses_wc[2:])


def test_failed_methods_show_as_missing(scene, tmp_path, monkeypatch, capsys):
    path, _ = scene

    def fail(*args, **kwargs):
        raise RuntimeError("child failed:\nTraceback ...\nerror: no model weights")

    monkeypatch.setattr(peers, "v2d_usage", fail)
    monkeypatch.setattr(peers, "run_child", fail)
    out = tmp_path / "peers.json"
    assert peers.main(["--data", str(path), "--end", "11", "--stride", "1", "--known-only", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("v2d (dataset intrinsics)", "COLMAP (known intrinsics)"):
        row = next(ln for ln in printed.splitlines() if ln.startswith(label))
        assert row.endswith("missing: error: no model weights")
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["error"]) for r in rows] == [("v2d", "error: no model weights"),
                                                          ("colmap", "error: no model weights")]
    assert "Traceback" in rows[0]["runs"][0]["error_detail"]


def test_skipping_both_methods_prints_an_empty_table(scene, tmp_path, capsys):
    path, _ = scene
    out = tmp_path / "peers.json"
    assert peers.main(["--data", str(path), "--end", "11", "--skip-v2d", "--skip-colmap", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["rows"] == [] and results["frames"] == [0, 2, 4, 6, 8, 10]
    assert "registered frames only" in capsys.readouterr().out


def test_aggregate_medians_and_time_ratio():
    def run(wall, cpu, ate):
        return {"method": "colmap", "calibrated": True, "size_hw": [480, 640], "total": 10, "wall_s": wall,
                "cpu_s": cpu, "peak_rss_mb": 100.0, "registered": 10,
                "ate": {"ate_rmse": ate, "scale": 1.0, "pairs": 10}}

    colmap = peers.aggregate([run(30.0, 50.0, 0.02), run(50.0, 90.0, 0.04), run(40.0, 60.0, 0.03)])
    v2d = peers.aggregate([dict(run(10.0, 15.0, 0.05), method="v2d")])
    free = peers.aggregate([dict(run(20.0, 30.0, 0.05), calibrated=False)])  # no v2d row to compare with
    peers.add_ratios([v2d, colmap, free])
    assert colmap["wall_s"] == 40.0 and colmap["wall_s_min"] == 30.0 and colmap["cpu_s"] == 60.0
    assert colmap["ate_rmse_cm"] == pytest.approx(3.0) and colmap["ate_rmse_cm_range"] == pytest.approx([2.0, 4.0])
    assert colmap["time_ratio"] == pytest.approx(4.0) and colmap["cpu_ratio"] == pytest.approx(4.0)
    assert v2d["time_ratio"] == 1.0 and free["time_ratio"] is None


def test_missing_data_folder_is_one_line_and_exit_1(tmp_path, capsys):
    assert peers.main(["--data", str(tmp_path / "nope"), "--skip-colmap"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope" in err

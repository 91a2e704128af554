"""`v2d run`: inputs (image folder, video, 7-Scenes), outputs, and one-line errors on bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from evo.tools import file_interface

from tests.io.test_frames import count_decoding
from tests.tools.cli_errors import one_line_error
from tools.cli import main
from v2d.data.synthetic import render_sequence
from v2d.model import SHIPPED_WEIGHTS

H, W = 96, 128
SEVEN_SCENES = Path(__file__).resolve().parents[3] / "shared" / "data" / "7scenes-redkitchen"
needs_weights = pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason=f"shipped weights missing: {SHIPPED_WEIGHTS}")


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=4, num_frames=24, height=H, width=W)


def _folder(path: Path, images, intrinsics=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        cv2.imwrite(str(path / f"{i:04d}.png"), np.ascontiguousarray(np.asarray(im)[..., ::-1]))
    if intrinsics is not None:
        (path / "intrinsics.txt").write_text(" ".join(f"{v:.6f}" for v in intrinsics))
    return path


def _no_leftovers(parent: Path) -> None:
    assert not list(parent.glob(".*partial-*")), "a staging directory was left behind"


@needs_weights
def test_run_image_folder_writes_every_output(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images, seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "--stride", "2", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    n = 12
    assert summary["frames"] == n and summary["lost_frames"] == 0
    for key in ("keyframes", "seconds", "fps", "config", "version", "marked_frames", "intrinsics", "warnings"):
        assert key in summary
    assert summary["intrinsics"]["calibrated"] is True
    files = summary["keyframe_files"]
    assert len(files) == summary["keyframes"] and all(int(f) % 2 == 0 for f in files)  # input indices, stride 2
    assert sorted(p.stem for p in (out / "depth").glob("*.npy")) == files
    assert sorted(p.stem for p in (out / "images").glob("*.jpg")) == files
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    assert traj.num_poses == n
    assert np.allclose(traj.timestamps, np.arange(0, 24, 2))  # input frame indices (image folders have no times)
    kf = summary["keyframe_frames"]
    pngs = sorted((out / "depth").glob("*.png"))
    assert [p.stem for p in pngs] == [f"{2 * f:06d}" for f in kf]  # named by input frame index
    png = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (H, W)
    assert np.allclose(np.load(pngs[0].with_suffix(".npy")) * 1000, png, atol=0.51)
    import open3d as o3d

    cloud = o3d.io.read_point_cloud(str(out / "cloud.ply"))
    assert len(cloud.points) > 1000 and cloud.has_colors()
    assert summary["points"] == len(cloud.points)
    assert not list(out.rglob(".*.tmp"))
    _no_leftovers(tmp_path)


@needs_weights
def test_save_confidence_writes_one_map_per_tracked_frame(tmp_path, seq):
    """`--save-confidence`: the learned motion module's weights per tracked frame, as PNG on the
    tracking grid; low where the view is occluded, high where it matches. Without it: no folder."""
    images = np.asarray(seq.images)[:12].copy()
    images[7, :, : W // 2] = 0  # a black (occluded) left half: nothing there matches the keyframe
    src = _folder(tmp_path / "imgs", images, seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q", "--save-confidence",
                 "--set", "motion.flow_source=learned"]) == 0
    maps = {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (out / "confidence").glob("*.png")}
    assert len(maps) >= 8 and "000007" in maps  # every frame tracked densely (the initial ones by the model)
    grid = (H // 2, W // 2)  # slam.track_stride 2
    assert all(m.dtype == np.uint8 and m.shape == grid for m in maps.values())
    occluded = maps["000007"].astype(float)
    assert occluded[:, : W // 4 - 4].mean() < 0.3 * occluded[:, W // 4 + 4:].mean()
    assert main(["run", str(src), "--out", str(tmp_path / "plain"), "--resize", f"{H}x{W}", "-q"]) == 0
    assert not (tmp_path / "plain" / "confidence").exists()


def test_normals_are_written_per_keyframe_and_orient_the_cloud(tmp_path, seq):
    """`depth.normals`: normal/NAME.png beside each keyframe's depth, unit normals facing the camera,
    and cloud.ply with normals; without it neither."""
    import open3d as o3d

    from v2d.io.results import load_run

    src = _folder(tmp_path / "imgs", np.asarray(seq.images)[:12], seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q", "--set", "depth.normals=true"]) == 0
    run = load_run(out)
    for k in range(len(run.keyframe_rows)):
        n = run.normal(k)
        assert n is not None and n.shape == (H, W, 3)
        np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-3)
        assert np.median(n[..., 2]) < 0  # toward the camera
    cloud = o3d.io.read_point_cloud(str(out / "cloud.ply"))
    assert cloud.has_normals() and json.loads((out / "summary.json").read_text())["cloud_normals"]
    plain = tmp_path / "plain"
    assert main(["run", str(src), "--out", str(plain), "--resize", f"{H}x{W}", "-q"]) == 0
    assert not (plain / "normal").exists() and not o3d.io.read_point_cloud(str(plain / "cloud.ply")).has_normals()


def _video(path: Path, images) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (W, H))
    for im in images:
        writer.write(np.ascontiguousarray(np.asarray(im)[..., ::-1]))
    writer.release()
    return path


@needs_weights
def test_run_video_uncalibrated_warns(tmp_path, seq, caplog):
    video = _video(tmp_path / "clip.avi", seq.images)
    out = tmp_path / "out"
    assert main(["run", str(video), "--out", str(out), "--resize", f"{H}x{W}", "--max-frames", "10"]) == 0
    assert any("uncalibrated" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 10 and summary["intrinsics"]["calibrated"] is False
    assert file_interface.read_tum_trajectory_file(str(out / "trajectory.txt")).num_poses == 10


@needs_weights
def test_run_video_decodes_each_frame_once(tmp_path, seq, monkeypatch):
    """Opening the video decodes nothing and the run streams it once, learning its length at the end
    (no counting pass); the stride is honoured and the timestamps are frame indices."""
    video = _video(tmp_path / "clip.avi", seq.images)
    counts = count_decoding(monkeypatch)
    out = tmp_path / "out"
    assert main(["run", str(video), "--out", str(out), "--resize", f"{H}x{W}", "--stride", "3", "-q"]) == 0
    assert counts == [0, len(seq.images)]  # one opening to check the file, one decoding pass
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 8 and summary["input"]["input_frames"] == len(seq.images)
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    assert np.allclose(traj.timestamps, np.arange(0, 24, 3))


@needs_weights
@pytest.mark.skipif(not SEVEN_SCENES.exists(), reason=f"development data not found: {SEVEN_SCENES}")
def test_run_7scenes_uses_dataset_timestamps_and_intrinsics(tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(SEVEN_SCENES), "--out", str(out), "--stride", "3", "--max-frames", "12",
                 "--resize", f"{H}x{W}", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["layout"] == "7scenes" and summary["frames"] == 12
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    assert np.allclose(traj.timestamps, np.arange(0, 36, 3))


@needs_weights
def test_run_tum_layout_uses_its_timestamps(tmp_path, seq):
    root = tmp_path / "tum"
    _folder(root / "rgb", seq.images[:8])
    stamps = 1305031102.175304 + 0.0333 * np.arange(8)
    (root / "rgb.txt").write_text("# timestamp filename\n" + "".join(
        f"{t:.6f} rgb/{i:04d}.png\n" for i, t in enumerate(stamps)))
    out = tmp_path / "out"
    fx, fy, cx, cy = seq.intrinsics.tolist()
    assert main(["run", str(root), "--out", str(out), "--resize", f"{H}x{W}", "-q",
                 "--intrinsics", f"{fx},{fy},{cx},{cy}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["layout"] == "tum" and summary["intrinsics"]["calibrated"] is True
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    assert np.allclose(traj.timestamps, stamps, atol=1e-6)


@needs_weights
def test_run_marks_static_frames_in_summary(tmp_path, seq):
    images = list(seq.images[:8]) + [seq.images[7]] * 12
    src = _folder(tmp_path / "imgs", images, seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(range(9, 20)) <= set(summary["marked_frames"]["static"])
    assert summary["marked_frames"]["lost"] == [] and any("static" in w for w in summary["warnings"])


@needs_weights
def test_uncalibrated_keeps_the_pixel_aspect_when_resizing(tmp_path):
    wide = render_sequence(seed=4, num_frames=8, height=72, width=128)  # 16:9, resized to 96x128 (4:3)
    src = _folder(tmp_path / "imgs", wide.images)
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q"]) == 0
    intr = json.loads((out / "summary.json").read_text())["intrinsics"]
    assert intr["calibrated"] is False
    assert intr["fy"] / intr["fx"] == pytest.approx(96 / 72, rel=1e-6)  # square pixels at the input size
    assert any("uncalibrated" in w for w in json.loads((out / "summary.json").read_text())["warnings"])


def test_missing_input(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "nope"), "--out", str(out)]) == 1
    one_line_error(capsys, "input not found")
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "empty"), "--out", str(out)]) == 1
    one_line_error(capsys, "no images")
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"not a video at all"])
def test_unreadable_or_empty_video(tmp_path, capsys, content):
    video = tmp_path / "bad.mp4"
    video.write_bytes(content)
    out = tmp_path / "out"
    assert main(["run", str(video), "--out", str(out)]) == 1
    one_line_error(capsys, "cannot read any frame")
    assert not out.exists()
    _no_leftovers(tmp_path)


@needs_weights
def test_mixed_sizes_leave_no_partial_output(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images[:12], seq.intrinsics.tolist())
    cv2.imwrite(str(src / "0010.png"), np.zeros((H + 8, W, 3), np.uint8))  # found mid-run
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q"]) == 1
    one_line_error(capsys, "mixed sizes")
    assert not out.exists()
    _no_leftovers(tmp_path)


@needs_weights
def test_missing_feature_weights_are_one_line(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images[:6], seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q", "--set", "slam.features=xfeat",
                 "--set", f"slam.feature_weights={tmp_path / 'no-weights'}"]) == 1
    one_line_error(capsys, str(tmp_path / "no-weights" / "xfeat.pt"), "missing", "requirements-weights.txt")
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_one_frame_is_too_few(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images[:1], seq.intrinsics.tolist())
    assert main(["run", str(src), "--out", str(tmp_path / "out")]) == 1
    one_line_error(capsys, "at least 2")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("text", ["1 2 3", "0 0 10 10", "a b c d"])
def test_malformed_intrinsics_file(tmp_path, seq, capsys, text):
    src = _folder(tmp_path / "imgs", seq.images[:3])
    (src / "intrinsics.txt").write_text(text)
    assert main(["run", str(src), "--out", str(tmp_path / "out")]) == 1
    one_line_error(capsys, "intrinsics.txt")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("args, needle", [
    (["--intrinsics", "1,2,3"], "fx,fy,cx,cy"),
    (["--resize", "100x13"], "100x13"),
    (["--stride", "0"], "stride"),
    (["--max-frames", "0"], "max_frames"),
    (["--set", "slam.windw=3"], "slam.windw"),
    (["--set", "slam.window=1"], "slam.window"),
])
def test_bad_options(tmp_path, seq, capsys, args, needle):
    src = _folder(tmp_path / "imgs", seq.images[:3], seq.intrinsics.tolist())
    assert main(["run", str(src), "--out", str(tmp_path / "out"), *args]) == 1
    one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_unwritable_output(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images[:3], seq.intrinsics.tolist())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", str(src), "--out", str(blocker / "sub")]) == 1
    one_line_error(capsys, "not a directory")
    _no_leftovers(tmp_path)


def test_write_error_is_one_line_and_leaves_nothing(tmp_path, seq, capsys, monkeypatch):
    import os

    import v2d.io.writers as writers

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.os, "fsync", full_disk)
    src = _folder(tmp_path / "imgs", seq.images[:6], seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q"]) == 1
    one_line_error(capsys, "No space left on device")
    assert not out.exists() and os.listdir(tmp_path) == ["imgs"]


@needs_weights
def test_run_trajectory_matches_ground_truth(tmp_path, seq):
    """End to end with the default engine: the written trajectory.txt, compared with the rendered
    ground truth by evo after Sim3 alignment."""
    from v2d.geometry.lie import se3_inv
    from v2d.metrics import trajectory_ate

    src = _folder(tmp_path / "imgs", seq.images, seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q"]) == 0
    traj = file_interface.read_tum_trajectory_file(str(out / "trajectory.txt"))
    gt_wc = se3_inv(seq.poses_cw).numpy()
    t = np.arange(len(gt_wc), dtype=np.float64)
    est = np.concatenate([traj.positions_xyz, traj.orientations_quat_wxyz[:, [1, 2, 3, 0]]], axis=1)
    ate = trajectory_ate(traj.timestamps, est, t, gt_wc, align="sim3")
    assert ate["pairs"] == 24 and ate["ate_rmse"] < 0.03 * ate["path_length"], ate


@needs_weights
def test_mapper_failure_is_one_line_and_leaves_nothing(tmp_path, seq, capsys, monkeypatch):
    from slam.mapper import Mapper

    def broken(self, jobs):
        raise RuntimeError("cost volume exploded")

    monkeypatch.setattr(Mapper, "map_keyframes", broken)
    src = _folder(tmp_path / "imgs", seq.images, seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--resize", f"{H}x{W}", "-q", "--set",
                 "slam.concurrent=true"]) == 1
    one_line_error(capsys, "mapping failed: RuntimeError: cost volume exploded")
    assert not out.exists()
    _no_leftovers(tmp_path)
    assert not [t for t in threading.enumerate() if t.name == "v2d-mapper"]


@needs_weights
def test_ctrl_c_stops_the_run_and_leaves_no_output(tmp_path, seq):
    """A real SIGINT to `v2d run` in the middle of a run: exit code 130, no output, no staging folder."""
    images = list(seq.images) * 8  # long enough to be interrupted
    src = _folder(tmp_path / "imgs", images, seq.intrinsics.tolist())
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "run", str(src), "--out", str(out),
                             "--resize", f"{H}x{W}", "--set", "slam.concurrent=true"], cwd=root,
                            stderr=subprocess.PIPE, text=True,
                            # a test run started in the background (`make test &`) inherits SIGINT
                            # ignored, and so would the child: give it the default a user's shell gives
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".*partial-*/depth/*.npy")):
        time.sleep(0.05)  # the first keyframe left the window: tracking and mapping are both running
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_unknown_device_is_one_line(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images[:3], seq.intrinsics.tolist())
    for device, needle in (("cuda", "no such CUDA device"), ("tpu", "expected cpu, cuda or cuda:N")):
        if device == "cuda" and __import__("torch").cuda.is_available():
            continue
        assert main(["run", str(src), "--out", str(tmp_path / "out"), "--device", device]) == 1
        one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()

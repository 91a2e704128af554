"""Trajectory and depth evaluation of files: formats, evo parity, hand-computed values, outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from v2d.errors import InputError, NumericalError, ShapeError
from v2d.evaluation import (
    DepthEvalOptions,
    evaluate_depth_folders,
    plot_trajectory,
    trajectory_report,
    write_depth_outputs,
)
from v2d.io.datasets import read_depth_map
from v2d.io.trajectory import detect_format, read_trajectory
from v2d.io.writers import write_tum
from v2d.metrics import evaluate_trajectory

TRAJECTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "trajectories"
needs_trajectories = pytest.mark.skipif(not TRAJECTORIES.is_dir(),
                                        reason=f"real data not found at {TRAJECTORIES} (see ../shared/data/README.md)")


def curved_trajectory(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A curved camera->world trajectory with turning orientations: timestamps (n,), poses (n, 7)."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0, 2 * np.pi, n)
    xyz = np.stack([np.cos(s), 0.5 * np.sin(2 * s), 0.2 * s], axis=1) + 0.001 * rng.normal(size=(n, 3))
    q = Rotation.from_rotvec(np.stack([0.3 * np.sin(s), s, 0.1 * s], axis=1)).as_quat()  # xyzw
    return 100.0 + 0.1 * np.arange(n), np.concatenate([xyz, q], axis=1)


def _same_poses(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    dots = np.abs(np.sum(a[:, 3:] * b[:, 3:], axis=1))  # q and -q are the same rotation
    np.testing.assert_allclose(dots, 1.0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# trajectory formats


def test_every_format_reads_back_the_same_trajectory(tmp_path):
    t, p = curved_trajectory()
    write_tum(tmp_path / "traj.txt", t, p)
    R = Rotation.from_quat(p[:, 3:]).as_matrix()
    rt = np.concatenate([R, p[:, :3, None]], axis=2).reshape(len(p), 12)
    np.savetxt(tmp_path / "kitti.txt", rt, fmt="%.12f")
    with open(tmp_path / "euroc.csv", "w") as f:
        f.write("#timestamp, p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], q_RS_w [], q_RS_x [], q_RS_y [], q_RS_z []\n")
        for ti, pi in zip(t, p, strict=True):
            f.write(",".join([str(int(round(ti * 1e9)))] + [f"{v:.12f}" for v in (*pi[:3], pi[6], *pi[3:6])]) + "\n")
    seven = tmp_path / "seq-01"
    seven.mkdir()
    for i, (Ri, pi) in enumerate(zip(R, p, strict=True)):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = Ri, pi[:3]
        np.savetxt(seven / f"frame-{i:06d}.pose.txt", m)
        (seven / f"frame-{i:06d}.color.png").write_bytes(b"")  # other files of the sequence are ignored
    run = tmp_path / "run"
    run.mkdir()
    write_tum(run / "trajectory.txt", t, p)

    expected = {"traj.txt": ("tum", t), "kitti.txt": ("kitti", np.arange(len(t))), "euroc.csv": ("euroc", t),
                "seq-01": ("7scenes", np.arange(len(t))), "run": ("tum", t)}
    for name, (fmt, stamps) in expected.items():
        assert detect_format(tmp_path / name) == fmt, name
        ts, ps = read_trajectory(tmp_path / name)
        np.testing.assert_allclose(ts, stamps, atol=1e-6, err_msg=name)
        _same_poses(ps, p)


@pytest.mark.parametrize("content, match", [
    ("", "no poses"),
    ("# only a comment\n", "no poses"),
    ("1 2 3 4 5\n", "5 numbers"),
    ("1 2 3 4 5 6 7 x\n", "not a valid tum"),
    ("0 0 0 0 0 0 0 nan\n", "NaN"),
])
def test_malformed_trajectory_files_are_input_errors(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        read_trajectory(f)


def test_invalid_rotations_are_refused_and_rough_quaternions_normalised(tmp_path):
    t, p = curved_trajectory(10)
    R = Rotation.from_quat(p[:, 3:]).as_matrix()
    R[4] *= 1.2  # not a rotation
    np.savetxt(tmp_path / "kitti.txt", np.concatenate([R, p[:, :3, None]], axis=2).reshape(10, 12))
    with pytest.raises(InputError, match="pose 4 .* not a rotation"):
        read_trajectory(tmp_path / "kitti.txt")
    q = p.copy()
    q[3, 3:] = 0.0
    write_tum(tmp_path / "zero.txt", t, q)
    with pytest.raises(InputError, match="pose 3 .* quaternion of length 0"):
        read_trajectory(tmp_path / "zero.txt")
    q = p.copy()
    q[:, 3:] = np.round(q[:, 3:], 4)  # as published ground truth: 4 decimals, |q| = 1 +- 1e-4
    write_tum(tmp_path / "rough.txt", t, q)
    _, read = read_trajectory(tmp_path / "rough.txt")
    np.testing.assert_allclose(np.linalg.norm(read[:, 3:], axis=1), 1.0, atol=1e-12)
    seven = tmp_path / "seven"
    seven.mkdir()
    np.savetxt(seven / "frame-000000.pose.txt", np.diag([1.0, 1.0, -1.0, 1.0]))  # a reflection
    with pytest.raises(InputError, match="frame-000000.pose.txt: the rotation part is not a rotation"):
        read_trajectory(seven)


def test_time_order_and_repeated_timestamps(tmp_path, caplog):
    t, p = curved_trajectory(10)
    order = np.r_[5:10, 0:5, 2]  # shuffled, with frame 2 twice (second copy moved away)
    q = p[order].copy()
    q[-1, :3] += 1.0
    write_tum(tmp_path / "dup.txt", t[order], q)
    ts, ps = read_trajectory(tmp_path / "dup.txt")
    np.testing.assert_allclose(ts, t)
    _same_poses(ps, p)
    assert "1 repeated timestamp" in caplog.text


def test_7scenes_folders_number_poses_by_position(tmp_path):
    for i in (100, 101, 102):
        np.savetxt(tmp_path / f"frame-{i:06d}.pose.txt", np.eye(4))
    ts, _ = read_trajectory(tmp_path)
    np.testing.assert_array_equal(ts, [0, 1, 2])  # as `v2d run` numbers a 7-Scenes sequence's frames


def test_missing_and_binary_files_and_bad_folders(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_trajectory(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match="bin.txt"):
        read_trajectory(tmp_path / "bin.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither trajectory.txt"):
        read_trajectory(tmp_path / "empty")
    with pytest.raises(InputError, match="format"):
        read_trajectory(tmp_path / "bin.txt", "g2o")


# --------------------------------------------------------------------------------------------------
# trajectory metrics


def _evo(tool: str, args: list[str], tmp_path: Path) -> dict[str, float]:
    """Statistics of evo's own command-line tool (`evo_ape` / `evo_rpe`), read from its results file."""
    from evo.tools import file_interface

    zip_path = tmp_path / f"{tool}-{len(list(tmp_path.glob('*.zip')))}.zip"
    exe = Path(sys.executable).parent / tool
    subprocess.run([str(exe), "tum", *args, "--no_warnings", "--save_results", str(zip_path)], check=True,
                   capture_output=True, cwd=tmp_path)
    return file_interface.load_res_file(str(zip_path)).stats


@needs_trajectories
def test_ate_equals_evo_ape_command_on_fr1_xyz(tmp_path):
    gt, est = TRAJECTORIES / "freiburg1_xyz-groundtruth.txt", TRAJECTORIES / "freiburg1_xyz-ORB_kf_mono.txt"
    stats = _evo("evo_ape", [str(gt), str(est), "-as"], tmp_path)
    ours, _ = trajectory_report(est, gt)
    assert ours["alignment"] == "sim3" and ours["pairs"] == 32
    for key in ("rmse", "mean", "median", "max", "std"):
        assert ours[f"ate_{key}"] == pytest.approx(stats[key], rel=1e-9), key
    assert ours["ate_rmse"] == pytest.approx(0.009755, abs=1e-6)  # what `evo_ape ... -as` prints


@needs_trajectories
@pytest.mark.parametrize("align, flags", [("se3", ["-a"]), ("scale", ["-s"])])
def test_other_alignments_equal_evo_ape(tmp_path, align, flags):
    gt, est = TRAJECTORIES / "freiburg1_xyz-groundtruth.txt", TRAJECTORIES / "freiburg1_xyz-ORB_kf_mono.txt"
    stats = _evo("evo_ape", [str(gt), str(est), *flags], tmp_path)
    ours, _ = trajectory_report(est, gt, align=align)
    assert ours["ate_rmse"] == pytest.approx(stats["rmse"], rel=1e-9)


@needs_trajectories
@pytest.mark.parametrize("key, flags", [
    ("rpe_frame", ["-d", "1", "-u", "f"]),
    ("rpe_metre", ["-d", "1", "-u", "m", "--pairs_from_reference"]),
])
def test_rpe_equals_evo_rpe(tmp_path, key, flags):
    gt, est = TRAJECTORIES / "freiburg1_xyz-groundtruth.txt", TRAJECTORIES / "freiburg1_xyz-ORB_kf_mono.txt"
    trans = _evo("evo_rpe", [str(gt), str(est), "-as", *flags], tmp_path)
    rot = _evo("evo_rpe", [str(gt), str(est), "-as", *flags, "-r", "angle_deg"], tmp_path)
    ours, _ = trajectory_report(est, gt)
    assert ours[key]["trans_rmse"] == pytest.approx(trans["rmse"], rel=1e-9)
    assert ours[key]["rot_deg_rmse"] == pytest.approx(rot["rmse"], rel=1e-9)


def test_sim3_alignment_removes_a_similarity_and_reports_its_scale():
    t, p = curved_trajectory()
    R = Rotation.from_rotvec([0.2, -0.5, 1.0])
    est = p.copy()
    est[:, :3] = 0.37 * R.apply(p[:, :3]) + [1.0, -2.0, 0.5]
    est[:, 3:] = (R * Rotation.from_quat(p[:, 3:])).as_quat()
    res, arrays = evaluate_trajectory(t, est, t, p, align="sim3")
    assert res["ate_rmse"] < 1e-9 and res["scale"] == pytest.approx(1 / 0.37) and res["pairs"] == len(t)
    assert res["rpe_frame"]["trans_rmse"] < 1e-9 and res["rpe_frame"]["rot_deg_rmse"] < 1e-6
    se3, _ = evaluate_trajectory(t, est, t, p, align="se3")
    assert se3["scale"] == 1.0 and se3["ate_rmse"] > 0.1
    scale_only, _ = evaluate_trajectory(t, est, t, p, align="scale")
    assert scale_only["ate_rmse"] > 0.1 and scale_only["scale"] != 1.0
    assert arrays["est_xyz"].shape == arrays["gt_xyz"].shape == (len(t), 3)
    np.testing.assert_allclose(arrays["est_xyz"], p[:, :3], atol=1e-9)


def test_ate_and_rpe_by_hand_without_alignment():
    # Identity rotations along x, frame 3 displaced by 0.5 m in y.
    t = np.arange(5, dtype=np.float64)
    gt = np.zeros((5, 7))
    gt[:, 0], gt[:, 6] = np.arange(5), 1.0
    est = gt.copy()
    est[3, 1] = 0.5
    res, arrays = evaluate_trajectory(t, est, t, gt, align="none")
    np.testing.assert_allclose(arrays["ate_errors"], [0, 0, 0, 0.5, 0])
    assert res["ate_rmse"] == pytest.approx(np.sqrt(0.25 / 5)) and res["ate_max"] == 0.5
    # relative motions 2->3 and 3->4 are each off by 0.5 m
    assert res["rpe_frame"]["trans_rmse"] == pytest.approx(np.sqrt(2 * 0.25 / 4))
    assert res["rpe_frame"]["pairs"] == 4 and res["rpe_frame"]["rot_deg_rmse"] == pytest.approx(0)
    assert res["path_length"] == pytest.approx(4.0)


def test_association_uses_timestamps_within_max_diff():
    t, p = curved_trajectory()
    res, _ = evaluate_trajectory(t[::2] + 0.004, p[::2], t, p, align="none")
    assert res["pairs"] == len(t[::2]) and res["ate_rmse"] < 1e-9
    with pytest.raises(ShapeError, match="within 0.001 s"):
        evaluate_trajectory(t[::2] + 0.004, p[::2], t, p, max_diff=0.001)


def test_no_overlapping_timestamps_names_both_files(tmp_path):
    t, p = curved_trajectory()
    write_tum(tmp_path / "est.txt", t + 1000, p)
    write_tum(tmp_path / "gt.txt", t, p)
    with pytest.raises(InputError, match=r"est.txt spans t = 1100.000.*gt.txt spans t = 100.000"):
        trajectory_report(tmp_path / "est.txt", tmp_path / "gt.txt")


def test_degenerate_alignment_is_a_numerical_error():
    t = np.arange(6, dtype=np.float64)
    p = np.zeros((6, 7))
    p[:, 6] = 1.0  # the camera never moves
    with pytest.raises(NumericalError, match="degenerate"):
        evaluate_trajectory(t, p, t, p, align="sim3")


def test_plot_is_a_png_with_both_panels(tmp_path):
    t, p = curved_trajectory()
    res, arrays = evaluate_trajectory(t, p + [0.01, 0, 0, 0, 0, 0, 0], t, p, align="none")
    path = plot_trajectory(arrays, res, tmp_path / "plot.png")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] > img.shape[0] > 300
    red = (img[..., 2] > 180) & (img[..., 1] < 100) & (img[..., 0] < 100)  # the estimate and the RMSE line
    assert red.sum() > 200 and img.std() > 10


# --------------------------------------------------------------------------------------------------
# depth


def _png_mm(path: Path, depth_m: np.ndarray) -> None:
    cv2.imwrite(str(path), np.round(depth_m * 1000).astype(np.uint16))


def test_depth_folders_match_by_frame_number(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    g0 = np.array([[1.0, 2.0], [4.0, 0.0]])
    g1 = np.array([[1.0, 1.0], [2.0, 2.0]])
    np.save(pred / "000003.npy", np.array([[1.0, 2.5], [2.0, 7.0]], dtype=np.float32))
    np.save(pred / "000005.npy", np.array([[2.0, 2.0], [4.0, 0.0]], dtype=np.float32))  # twice, one hole
    np.save(pred / "000009.npy", np.ones((2, 2), np.float32))  # no ground truth: skipped with a warning
    _png_mm(gt / "depth_0003.png", g0)
    raw = np.round(g1 * 1000).astype(np.uint16)
    raw[0, 0] = 65535  # "no reading"
    cv2.imwrite(str(gt / "depth_0005.png"), raw)
    summary, rows, _ = evaluate_depth_folders(pred, gt, DepthEvalOptions(scaling="none"))
    assert [r["frame"] for r in rows] == [3, 5] and [r["pixels"] for r in rows] == [3, 2]
    assert [r["coverage"] for r in rows] == pytest.approx([1.0, 2 / 3])  # frame 5: one of 3 GT pixels is a hole
    # frame 3 as in test_metrics (abs_rel 0.25); frame 5: prediction twice the depth (abs_rel 1)
    assert rows[0]["abs_rel"] == pytest.approx(0.25) and rows[1]["abs_rel"] == pytest.approx(1.0)
    assert summary["abs_rel"] == pytest.approx(0.625) and summary["frames"] == 2
    assert summary["delta1"] == pytest.approx((1 / 3 + 0) / 2) and summary["coverage"] == pytest.approx(5 / 6)
    median, median_rows, _ = evaluate_depth_folders(pred, gt)
    assert median["scaling"] == "median" and median_rows[1]["scale"] == pytest.approx(0.5)
    assert median_rows[1]["abs_rel"] == pytest.approx(0.0)


def test_dataset_folders_number_frames_by_position_with_their_depth_unit(tmp_path):
    seven = tmp_path / "seq"  # a 7-Scenes sequence that starts at frame 100, as `v2d run` numbers it: 0, 1, 2
    seven.mkdir()
    (seven / "camera-intrinsics.txt").write_text("585 0 320\n0 585 240\n0 0 1\n")
    gts = [np.full((4, 4), 1.0 + k) for k in range(3)]
    for k, g in enumerate(gts):
        stem = seven / f"frame-{100 + k:06d}"
        cv2.imwrite(str(stem) + ".color.jpg", np.zeros((4, 4, 3), np.uint8))
        _png_mm(Path(str(stem) + ".depth.png"), g)
        np.savetxt(str(stem) + ".pose.txt", np.eye(4))
    pred = tmp_path / "pred"
    pred.mkdir()
    for k in range(3):
        np.save(pred / f"{k:06d}.npy", gts[k].astype(np.float32) * (1.1 if k == 1 else 1.0))
    summary, rows, _ = evaluate_depth_folders(pred, seven, DepthEvalOptions(scaling="none"))
    assert [r["frame"] for r in rows] == [0, 1, 2]
    assert [r["abs_rel"] for r in rows] == pytest.approx([0.0, 0.1, 0.0], abs=1e-6)
    tum = tmp_path / "tum_depth"  # TUM's depth files are named by timestamp: refused, with the way out
    tum.mkdir()
    _png_mm(tum / "1305031102.160407.png", gts[0])
    with pytest.raises(InputError, match="timestamp.*give the sequence folder"):
        evaluate_depth_folders(pred, tum)


def test_global_scaling_uses_one_scale_for_all_frames(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    g = [np.array([[1.0, 2.0, 3.0]]), np.array([[2.0, 4.0, 6.0]])]
    p = [2 * g[0], 4 * g[1]]
    for i in range(2):
        np.save(pred / f"{i:06d}.npy", p[i])
        np.save(gt / f"{i:06d}.npy", g[i])
    summary, rows, _ = evaluate_depth_folders(pred, gt, DepthEvalOptions(scaling="global"))
    s = np.median(np.concatenate(g)) / np.median(np.concatenate(p))  # 3 / 8
    assert summary["global_scale"] == pytest.approx(s)
    assert [r["scale"] for r in rows] == pytest.approx([s, s])
    assert summary["abs_rel"] == pytest.approx(np.mean([abs(2 * s - 1), abs(4 * s - 1)]))
    per_frame, _, _ = evaluate_depth_folders(pred, gt)
    assert per_frame["abs_rel"] == pytest.approx(0.0)


def test_mismatched_sizes_are_refused_unless_resizing(tmp_path):
    np.save(tmp_path / "p.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "g.npy", np.ones((4, 6), np.float32))
    with pytest.raises(InputError, match=r"2x3 but the ground truth .* is 4x6 \(pass --resize-pred"):
        evaluate_depth_folders(tmp_path / "p.npy", tmp_path / "g.npy")
    summary, _, _ = evaluate_depth_folders(tmp_path / "p.npy", tmp_path / "g.npy", DepthEvalOptions(resize_pred=True))
    assert summary["pixels"] == 24 and summary["abs_rel"] == 0.0


def test_bad_depth_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match="no depth maps"):
        evaluate_depth_folders(tmp_path / "a", tmp_path / "a")
    np.save(tmp_path / "p.npy", np.ones((2, 2, 3)))
    with pytest.raises(InputError, match="2-D real-valued"):
        read_depth_map(tmp_path / "p.npy")
    (tmp_path / "x.npy").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable"):
        read_depth_map(tmp_path / "x.npy")
    cv2.imwrite(str(tmp_path / "c.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(InputError, match="16-bit"):
        read_depth_map(tmp_path / "c.png")
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "000001.npy", np.ones((2, 2)))
    np.save(tmp_path / "a" / "000002.npy", np.ones((2, 2)))
    with pytest.raises(InputError, match="no frame of"):
        evaluate_depth_folders(tmp_path / "a", tmp_path / "b")
    with pytest.raises(InputError, match="scaling"):
        evaluate_depth_folders(tmp_path / "b", tmp_path / "b", DepthEvalOptions(scaling="mean"))
    with pytest.raises(InputError, match="two folders or two files"):
        evaluate_depth_folders(tmp_path / "b", tmp_path / "b" / "000001.npy")
    np.save(tmp_path / "z.npy", np.ones((2, 2), np.complex64))
    with pytest.raises(InputError, match="real-valued"):
        read_depth_map(tmp_path / "z.npy")


def test_depth_outputs_csv_json_and_error_images(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        g = rng.uniform(1, 4, (24, 32))
        np.save(gt / f"{i:06d}.npy", g)
        np.save(pred / f"{i:06d}.npy", 1.5 * g * rng.uniform(0.9, 1.1, g.shape))
    opts = DepthEvalOptions(crop="eigen_nyu")
    summary, rows, kept = evaluate_depth_folders(pred, gt, opts, keep=3)
    out = tmp_path / "out"
    out.mkdir()
    write_depth_outputs(out, summary, rows, kept, opts)
    with open(out / "per_frame.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["frame"]) for r in table] == list(range(7))
    assert float(table[2]["abs_rel"]) == pytest.approx(rows[2]["abs_rel"])
    saved = json.loads((out / "summary.json").read_text())
    for key in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "si_log", "delta1", "delta2", "delta3"):
        assert saved[key] == pytest.approx(np.mean([r[key] for r in rows]))
    assert saved["crop"] == "eigen_nyu" and rows[0]["pixels"] < 24 * 32
    images = sorted((out / "errors").glob("*.png"))
    assert [p.stem for p in images] == ["000000", "000003", "000006"]
    img = cv2.imread(str(images[0]))
    assert img.shape == (24, 96, 3) and img[:, 64:].std() > 5

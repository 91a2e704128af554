"""bench/suite.py: sequences are materialised as renumbered image folders with the right ground truth
(strides, played backwards), and the summary counts what the robustness targets count."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from bench import suite
from v2d.data.synthetic import render_sequence
from v2d.geometry.lie import se3_inv

FRAMES = 9


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 7-Scenes layout folder under DATA/seq; returns (DATA, GT camera->world (N, 7))."""
    root = tmp_path_factory.mktemp("suite")
    path = root / "seq"
    path.mkdir()
    seq = render_sequence(seed=1, num_frames=FRAMES, height=48, width=64)
    wc = se3_inv(torch.as_tensor(seq.poses_cw)).numpy()
    for k in range(FRAMES):
        stem = path / f"frame-{k:06d}"
        cv2.imwrite(f"{stem}.color.png", np.ascontiguousarray(np.asarray(seq.images[k])[..., ::-1]))
        cv2.imwrite(f"{stem}.depth.png", (np.asarray(seq.depths[k]) * 1000).astype(np.uint16))
        m = np.eye(4)
        m[:3, :3] = Rotation.from_quat(wc[k, 3:]).as_matrix()
        m[:3, 3] = wc[k, :3]
        np.savetxt(f"{stem}.pose.txt", m)
    fx, fy, cx, cy = np.asarray(seq.intrinsics).tolist()
    np.savetxt(path / "camera-intrinsics.txt", [[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    return root, wc


@pytest.mark.parametrize("reverse", [False, True])
def test_real_sequences_are_renumbered_folders_with_their_ground_truth(data, tmp_path, reverse):
    root, wc = data
    prep = suite._real("seq", stride=2, reverse=reverse)(root, tmp_path)
    chosen = list(range(0, FRAMES, 2))[:: -1 if reverse else 1]
    images = sorted(p.name for p in prep.folder.iterdir() if p.name != "intrinsics.txt")
    assert images == [f"{k:06d}.png" for k in range(len(chosen))]
    for k, f in enumerate(chosen):  # the k-th image is source frame f, with f's pose and depth
        src = cv2.imread(str(root / "seq" / f"frame-{f:06d}.color.png"))
        assert np.array_equal(cv2.imread(str(prep.folder / f"{k:06d}.png")), src)
        assert np.allclose(prep.gt_wc[k, :3], wc[f, :3], atol=1e-6)
        assert prep.depth(k).shape == (48, 64) and (prep.depth(k) > 0).all()
    assert len(np.loadtxt(prep.folder / "intrinsics.txt")) == 4


def _row(name: str, kind: str, ate: float, colmap: float | None, lost: int = 0, segments: int = 1) -> dict:
    row = {"name": name, "kind": kind, "v2d": {"this": {"ate_cm": ate, "lost": lost, "segments": segments}}}
    if colmap is not None:
        row["colmap"] = {"ate_cm": colmap, "registered": 5, "frames": 5}
    return row


def test_summary_counts_wins_losses_and_segments():
    rows = [_row("7s-s2", "real", 2.0, 3.0), _row("7s-s8", "real", 3.0, 2.0, lost=2),
            _row("scannet", "real", 10.0, 20.0, segments=3), _row("syn-fast", "synthetic", 1.0, None, lost=4),
            _row("syn-rotation", "synthetic", 9.0, None, lost=7)]
    s = suite.summarise(rows, "this")
    assert s["wins_vs_colmap"] == "2/3" and s["wins"] == ["7s-s2", "scannet"]
    assert s["lost_total"] == 6  # the real sequences and syn-fast; syn-rotation is not a must-survive case
    assert s["multi_segment"] == ["scannet"]
    assert s["stride8_over_stride2"] == pytest.approx(1.5)
    table = suite.format_table(rows + [{"name": "x", "kind": "real", "v2d": {"this": {"error": "boom"}}}], ["this"])
    assert "error: boom" in table and table.count("\n") == len(rows) + 2


def test_the_table_shows_colmap_style_figures_beside_colmaps():
    row = _row("7s-s2", "real", 2.0, 3.0)
    row["v2d"]["this"] |= {"track_length": 3.456, "reprojection_px": 0.789}
    row["colmap"] |= {"track_length": 5.432, "reprojection_px": 0.612}
    line = suite.format_table([row, _row("7s-s8", "real", 3.0, None)], ["this"]).splitlines()
    assert "track" in line[0] and "C reproj" in line[0]
    assert line[2].split()[-4:] == ["3.46", "0.79", "5.43", "0.61"]
    assert line[3].split()[-4:] == ["-", "-", "-", "-"]  # not measured: no figure, no zero


def test_a_late_range_starts_at_its_first_frame(data, tmp_path):
    root, wc = data
    prep = suite._real("seq", stride=3, first=2)(root, tmp_path)
    assert len(prep.gt_wc) == 3 and np.allclose(prep.gt_wc[:, :3], wc[[2, 5, 8], :3], atol=1e-6)


def test_held_out_sequences_share_no_frame_with_the_training_range():
    """v2d train-motion trains on 7-Scenes 0-249 and synthetic scenes 1000+: the held-out set is the
    late 7-Scenes range, the other real sequences and the suite's synthetic scene 0."""
    held = {s.name for s in suite.SEQUENCES if s.held_out}
    assert {"7s-late-s1", "7s-late-s8", "scannet", "tum-cabinet", "syn-fast"} <= held
    assert not held & {"7s-s1", "7s-s2", "7s-s8", "7s-s2-rev"}


def test_compare_counts_better_sequences_and_the_median_ratio():
    rows = [_row(n, "real", a, None, lost=1) for n, a in (("a", 2.0), ("b", 4.0), ("c", 6.0))]
    for r, b in zip(rows, (1.0, 5.0, 3.0), strict=True):
        r["v2d"]["after"] = {"ate_cm": b, "lost": 0}
    c = suite.compare(rows, "this", "after")
    assert c["better"] == "2/3" and c["median_ate_before"] == 4.0 and c["median_ate_after"] == 3.0
    assert c["ratio"] == pytest.approx(0.75) and c["lost_before"] == 3 and c["lost_after"] == 0


def test_rotation_error_is_relative_to_the_first_frame():
    gt = Rotation.from_rotvec(np.outer(np.linspace(0, 0.5, 5), [0, 1, 0]))
    world = Rotation.from_rotvec([0.3, -0.2, 1.0])  # another world frame: no error

    def poses(rot):
        return np.concatenate([np.zeros((len(rot), 3)), rot.as_quat()], axis=1)

    assert suite._rotation_error_deg(poses(world * gt), poses(gt)) < 1e-6
    off = [world * r for r in gt]
    off[4] = off[4] * Rotation.from_rotvec([np.radians(10.0), 0, 0])  # the last frame 10 deg off
    est = Rotation.from_quat(np.stack([r.as_quat() for r in off]))
    assert suite._rotation_error_deg(poses(est), poses(gt)) == pytest.approx(10.0 / np.sqrt(5), rel=1e-6)


def test_trajectory_metrics_of_a_written_trajectory(data, tmp_path):
    from v2d.io.writers import write_tum

    _, wc = data
    est = wc.copy()
    est[:, :3] = 2.0 * est[:, :3] + 0.5  # another scale and origin: Sim3 alignment removes both
    write_tum(tmp_path / "trajectory.txt", np.arange(FRAMES, dtype=np.float64), est)
    m = suite._trajectory_metrics(tmp_path, wc)
    assert m["ate_cm"] < 1e-3 and m["rot_deg"] < 1e-4 and m["scale"] == pytest.approx(0.5, rel=1e-6)
    est[FRAMES - 1, :3] += 1.0  # one frame 1 unit off : a clear error
    write_tum(tmp_path / "trajectory.txt", np.arange(FRAMES, dtype=np.float64), est)
    assert suite._trajectory_metrics(tmp_path, wc)["ate_cm"] > 1.0

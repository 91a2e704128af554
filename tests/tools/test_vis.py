"""`v2d vis`: offscreen render and mesh through the CLI, the default ground truth, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.slam.test_vis import FRAMES, make_fake_run, sequence
from tests.tools.cli_errors import one_line_error
from tools.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("cli_vis") / "run", sequence(), gt_bump=0.15)


def test_vis_headless_and_mesh_write_both_files(run_dir, tmp_path, capsys):
    import open3d as o3d

    png, ply = tmp_path / "view.png", tmp_path / "mesh.ply"
    assert main(["vis", str(run_dir), "--headless", str(png), "--mesh", str(ply), "--width", "320",
                 "--height", "240", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    img = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert img.shape == (240, 320, 3) and img.std() > 20
    assert report["render"]["object_fraction"] > 0.05
    assert report["render"]["gt_poses"] == FRAMES  # trajectory_gt.txt in the run directory is used by default
    mesh = o3d.io.read_triangle_mesh(str(ply))
    assert len(mesh.triangles) == report["mesh"]["triangles"] > 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.ply", "view.png"]  # no temporaries left


def test_vis_headless_in_a_fresh_process_prints_nothing_on_stderr(run_dir, tmp_path):
    # Open3D's windowing libraries print "error: XDG_RUNTIME_DIR is invalid ..." straight to fd 2 the
    # first time a process opens a context without a display; users must not see that on success.
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "DISPLAY", "WAYLAND_DISPLAY")}
    png = tmp_path / "view.png"
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "vis", str(run_dir), "--headless", str(png), "-q",
                           "--width", "160", "--height", "120"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and png.is_file()
    assert proc.stderr == ""


def test_vis_no_gt_and_keyframe_view(run_dir, tmp_path, capsys):
    png = tmp_path / "kf.png"
    assert main(["vis", str(run_dir), "--headless", str(png), "--no-gt", "--keyframe", "1", "--width", "200",
                 "--height", "150", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["render"]["gt_poses"] == 0 and "mesh" not in report
    rgb = cv2.imread(str(png), cv2.IMREAD_COLOR)[..., ::-1] / 255.0
    assert ((np.abs(rgb - [1.0, 0.0, 1.0]) < 0.08).all(-1)).sum() > 20  # the highlighted frustum


def test_vis_without_display_asks_for_headless(run_dir, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["vis", str(run_dir)]) == 1
    one_line_error(capsys, "no display", "--headless FILE.png")


def _bad_inputs(root: Path, run_dir: Path) -> dict[str, tuple[list[str], str]]:
    empty = root / "empty"
    empty.mkdir()
    other = root / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a run")
    corrupt = Path(shutil.copytree(run_dir, root / "corrupt"))
    data = (corrupt / "cloud.ply").read_bytes()
    (corrupt / "cloud.ply").write_bytes(data[: len(data) // 3])
    blocker = root / "file"
    blocker.write_text("x")
    png = str(root / "out.png")
    unmatched = root / "gt_unmatched.txt"
    unmatched.write_text("".join(f"{100 + i} 0 0 {i} 0 0 0 1\n" for i in range(5)))
    (root / "dir.png").mkdir()
    return {
        "missing": ([str(root / "nope"), "--headless", png], "not a directory"),
        "empty": ([str(empty), "--headless", png], "no summary.json"),
        "not a run": ([str(other), "--headless", png], "no summary.json"),
        "corrupt cloud": ([str(corrupt), "--headless", png], "truncated"),
        "png suffix": ([str(run_dir), "--headless", str(root / "out.jpg")], "ending in .png"),
        "png dir missing": ([str(run_dir), "--headless", str(root / "no" / "out.png")], "does not exist"),
        "png under a file": ([str(run_dir), "--headless", str(blocker / "out.png")], "not a directory"),
        "png is a directory": ([str(run_dir), "--headless", str(root / "dir.png")], "is a directory"),
        "mesh suffix": ([str(run_dir), "--mesh", str(root / "mesh.obj")], "ending in .ply"),
        "gt missing": ([str(run_dir), "--headless", png, "--gt", str(root / "gt.txt")], "--gt"),
        "gt not a trajectory": ([str(run_dir), "--headless", png, "--gt", str(run_dir / "summary.json")],
                                "--gt-format"),
        "gt unmatched": ([str(run_dir), "--headless", png, "--gt", str(unmatched)], "none of its timestamps"),
        "gt and no-gt": ([str(run_dir), "--headless", png, "--gt", png, "--no-gt"], "exclude"),
        "keyframe range": ([str(run_dir), "--headless", png, "--keyframe", "7"], "keyframe 7"),
        "keyframe needs headless": ([str(run_dir), "--mesh", str(root / "m.ply"), "--keyframe", "0"], "--headless"),
        "size": ([str(run_dir), "--headless", png, "--width", "0"], "image size"),
        "voxel": ([str(run_dir), "--mesh", str(root / "m.ply"), "--voxel", "-1"], "--voxel -1.0"),
        "voxel needs mesh": ([str(run_dir), "--headless", png, "--voxel", "0.1"], "--voxel needs --mesh"),
        "keyframe range with mesh": ([str(run_dir), "--headless", png, "--mesh", str(root / "m.ply"), "--keyframe",
                                      "7"], "keyframe 7"),
    }


def test_vis_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    for name, (args, needle) in _bad_inputs(tmp_path, run_dir).items():
        assert main(["vis", *args]) == 1, name
        one_line_error(capsys, needle)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "m.ply").exists()

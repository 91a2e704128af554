"""Reading a run's output directory back: what it gives, and one clear error for each defect."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fake_run import write_fake_run
from v2d.data.synthetic import render_sequence
from v2d.errors import InputError
from v2d.geometry.lie import se3_inv
from v2d.io.results import keyframe_name, load_run, read_normal_png
from v2d.io.writers import write_normal_png


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=2, num_frames=5, height=24, width=32)


def test_load_run_gives_poses_depth_and_images(tmp_path, seq):
    run = load_run(write_fake_run(tmp_path / "r", seq, [0, 2, 4]))
    assert run.image_size == (24, 32) and run.keyframe_files == ["000000", "000002", "000004"]
    np.testing.assert_allclose(run.keyframe_poses_wc[:, :3], se3_inv(seq.poses_cw).numpy()[[0, 2, 4], :3], atol=1e-6)
    np.testing.assert_allclose(run.depth(1), seq.depths[2], rtol=1e-6)
    assert run.image(2).shape == (24, 32, 3) and abs(float(run.image(2).mean()) - float(seq.images[4].mean())) < 3
    np.testing.assert_allclose(run.intrinsics, seq.intrinsics.numpy())
    (tmp_path / "r" / "depth" / "000002.npy").unlink()  # the 16-bit PNG (mm) is the fallback
    np.testing.assert_allclose(run.depth(1), seq.depths[2], atol=6e-4)
    (tmp_path / "r" / "images" / "000000.jpg").unlink()
    assert run.image(0) is None
    assert keyframe_name(12) == "000012"


@pytest.mark.parametrize("defect, match", [
    ("no_dir", "not a directory"),
    ("no_summary", "no summary.json"),
    ("bad_json", "malformed"),
    ("missing_key", "malformed"),
    ("count", "3 keyframes in summary.json but 2 depth maps"),
    ("rows", "outside the 5-pose trajectory"),
    ("intrinsics", "bad intrinsics"),
    ("no_trajectory", "trajectory.txt"),
])
def test_defective_output_directories(tmp_path, seq, defect, match):
    root = write_fake_run(tmp_path / "r", seq, [0, 2, 4])
    summary = json.loads((root / "summary.json").read_text())
    if defect == "no_dir":
        root = tmp_path / "nope"
    elif defect == "no_summary":
        (root / "summary.json").unlink()
    elif defect == "bad_json":
        (root / "summary.json").write_text("{")
    elif defect == "missing_key":
        del summary["image_size"]
    elif defect == "count":
        summary["keyframe_files"] = summary["keyframe_files"][:2]
    elif defect == "rows":
        summary["keyframe_frames"] = [0, 2, 9]
    elif defect == "intrinsics":
        summary["intrinsics"]["fx"] = -1
    else:
        (root / "trajectory.txt").unlink()
    if defect in ("missing_key", "count", "rows", "intrinsics"):
        (root / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match=match):
        load_run(root)


def test_depth_of_the_wrong_size_or_missing(tmp_path, seq):
    root = write_fake_run(tmp_path / "r", seq, [0, 2])
    np.save(root / "depth" / "000002.npy", np.ones((5, 5), np.float32))
    run = load_run(root)
    with pytest.raises(InputError, match="image size is"):
        run.depth(1)
    for f in (root / "depth").glob("000000.*"):
        f.unlink()
    with pytest.raises(InputError, match="depth is missing"):
        run.depth(0)


def test_normal_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = rng.normal(size=(6, 8, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[0, 0] = 0  # unknown
    n[1, 1] = np.nan
    write_normal_png(tmp_path / "n.png", n)
    back = read_normal_png(tmp_path / "n.png")
    assert back.shape == (6, 8, 3) and back.dtype == np.float32
    assert not back[0, 0].any() and not back[1, 1].any()
    ok = np.ones((6, 8), bool)
    ok[0, 0] = ok[1, 1] = False
    np.testing.assert_allclose(back[ok], n[ok], atol=1e-4)
    (tmp_path / "grey.png").write_bytes((tmp_path / "n.png").read_bytes()[:50])
    with pytest.raises(InputError, match="not a normal map"):
        read_normal_png(tmp_path / "grey.png")

"""`v2d refine DIR` and `v2d run --refine`: outputs rewritten all at once, the fallback, the adapted
weights reused, and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from tests.fake_run import write_fake_run
from tests.tools.cli_errors import one_line_error
from tests.tools.test_run import _folder, _no_leftovers, needs_weights
from tools.cli import main
from v2d.config import to_dict
from v2d.data.synthetic import render_sequence
from v2d.metrics import depth_metrics

KEYFRAMES = [0, 2, 4, 6, 8, 10, 12]


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=3, num_frames=13, height=96, width=128)


@pytest.fixture
def run_dir(tmp_path, seq) -> Path:
    """A finished run: the ground-truth trajectory, and keyframe depth 25 % too near on the left half
    (what a poor depth module gives; the trajectory carries the true scale)."""
    depths = {}
    for f in KEYFRAMES:
        d = np.asarray(seq.depths[f], dtype=np.float32).copy()
        d[:, : d.shape[1] // 2] *= 0.75
        depths[f] = d
    root = write_fake_run(tmp_path / "run", seq, KEYFRAMES, depths=depths, config=to_dict(RunConfig()))
    (root / "cloud.ply").write_text("old cloud")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _abs_rel(root: Path, seq) -> float:
    return float(np.mean([depth_metrics(np.load(root / "depth" / f"{f:06d}.npy"), np.asarray(seq.depths[f]))["abs_rel"]
                          for f in KEYFRAMES]))


@needs_weights
def test_refine_rewrites_the_run_and_its_adapted_weights_load(run_dir, seq, capsys):
    before_files = _files(run_dir)
    before = _abs_rel(run_dir, seq)
    assert main(["refine", str(run_dir), "--refine-steps", "30", "-q"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    r = summary["refine"]
    assert r["kept"] and r["steps"] == 30 and r["weights"] == "adapted.pt"
    assert r["error_adapted"] < r["error_network"]
    assert set(r["consistency_before"]) == set(r["consistency_after"]) >= {"median_rel_diff", "within_tolerance"}
    after_files = _files(run_dir)
    assert after_files["trajectory.txt"] == before_files["trajectory.txt"]  # untouched
    assert after_files["images/000004.jpg"] == before_files["images/000004.jpg"]
    assert after_files["cloud.ply"] != b"old cloud" and summary["points"] > 0
    assert all(after_files[f"depth/{f:06d}.npy"] != before_files[f"depth/{f:06d}.npy"] for f in KEYFRAMES)
    assert _abs_rel(run_dir, seq) < before  # the left half's error is gone where there is signal
    _no_leftovers(run_dir.parent)
    # the adapted weights load (weights_only) and start a second refinement
    state = torch.load(run_dir / "adapted.pt", weights_only=True)["model"]
    assert any(k.startswith("depth.matching.") for k in state)
    assert main(["refine", str(run_dir), "--refine-steps", "2", "--weights", str(run_dir / "adapted.pt"), "-q"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["refine"]["weights_from"] == str(run_dir / "adapted.pt")


@needs_weights
def test_a_refinement_that_fails_keeps_the_original(run_dir, capsys):
    before_files = _files(run_dir)
    # a learning rate this large wrecks the network: the held-out check must catch it
    assert main(["refine", str(run_dir), "--refine-steps", "10", "--set", "refine.lr=1.0", "-q"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["refine"]["kept"] is False
    assert summary["refine"]["error_adapted"] >= summary["refine"]["error_network"]
    assert any("kept the run's depth" in w for w in summary["warnings"])
    after_files = _files(run_dir)
    assert not (run_dir / "adapted.pt").exists()
    assert {k: v for k, v in after_files.items() if k != "summary.json"} == \
        {k: v for k, v in before_files.items() if k != "summary.json"}


@needs_weights
def test_an_interrupted_refinement_leaves_the_run_untouched(run_dir, capsys, monkeypatch):
    from v2d.adapt import DepthAdapter

    before_files = _files(run_dir)

    def interrupted(self, progress=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(DepthAdapter, "fit", interrupted)
    assert main(["refine", str(run_dir), "-q"]) == 130
    assert _files(run_dir) == before_files
    _no_leftovers(run_dir.parent)


def test_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["refine", str(tmp_path / "missing")]) == 1
    one_line_error(capsys, "not a directory")
    (tmp_path / "empty").mkdir()
    assert main(["refine", str(tmp_path / "empty")]) == 1
    one_line_error(capsys, "no summary.json")


def test_missing_keyframe_image_is_one_line(run_dir, capsys):
    (run_dir / "images" / "000006.jpg").unlink()
    before_files = _files(run_dir)
    assert main(["refine", str(run_dir)]) == 1
    one_line_error(capsys, "000006.jpg", "keyframe image missing")
    assert _files(run_dir) == before_files
    _no_leftovers(run_dir.parent)


def test_a_run_without_its_config_is_one_line(tmp_path, seq, capsys):
    root = write_fake_run(tmp_path / "run", seq, KEYFRAMES)
    assert main(["refine", str(root)]) == 1
    one_line_error(capsys, "no `config` entry")


@pytest.mark.parametrize("args, needle", [
    (["--refine-steps", "-1"], "refine.steps"),
    (["--refine-minutes", "-2"], "refine.minutes"),
    (["--set", "refine.views=0"], "refine.views"),
    (["--set", "refine.nope=1"], "nope"),
])
def test_bad_refine_settings_are_one_line(run_dir, capsys, args, needle):
    assert main(["refine", str(run_dir), *args]) == 1
    one_line_error(capsys, needle)


@needs_weights
def test_run_with_refine(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images, seq.intrinsics.tolist())
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--refine", "--refine-steps", "5", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refine"]["steps"] == 5
    assert summary["config"]["refine"]["steps"] == 5
    assert (out / "adapted.pt").exists() == summary["refine"]["kept"]
    _no_leftovers(tmp_path)


def test_refine_budget_needs_refine(tmp_path, seq, capsys):
    src = _folder(tmp_path / "imgs", seq.images[:3], seq.intrinsics.tolist())
    assert main(["run", str(src), "--out", str(tmp_path / "out"), "--refine-steps", "5"]) == 1
    one_line_error(capsys, "--refine")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(src)

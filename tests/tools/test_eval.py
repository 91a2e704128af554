"""`v2d eval traj|depth|consistency`: outputs, and one error line + exit 1 on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fake_run import write_fake_run
from tests.test_evaluation import curved_trajectory
from tests.tools.cli_errors import one_line_error
from tools.cli import main
from v2d.data.synthetic import render_sequence
from v2d.io.writers import write_tum


@pytest.fixture
def trajs(tmp_path):
    t, p = curved_trajectory()
    est = p.copy()
    est[:, :3] = 2.0 * p[:, :3] + 0.01 * np.random.default_rng(0).normal(size=(len(p), 3))
    write_tum(tmp_path / "est.txt", t, est)
    write_tum(tmp_path / "gt.txt", t, p)
    return tmp_path / "est.txt", tmp_path / "gt.txt"


def test_traj_table_json_and_plot(tmp_path, trajs, capsys):
    est, gt = trajs
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["eval", "traj", str(est), str(gt), "--json", str(out_json), "--plot", str(out_png)]) == 0
    table = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert {"ate_rmse", "alignment", "scale", "pairs", "rpe_frame", "rpe_metre"} <= set(res)
    assert res["alignment"] == "sim3" and res["scale"] == pytest.approx(0.5, rel=0.01) and res["pairs"] == 40
    assert f"{res['ate_rmse']:.4f}" in table and "ATE rmse" in table and "RPE/frame" in table
    assert out_png.stat().st_size > 10_000
    assert main(["eval", "traj", str(est), str(gt), "--align", "se3", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["ate_rmse"] > 10 * res["ate_rmse"]


@pytest.mark.parametrize("case", ["garbage", "missing", "no_overlap", "bad_plot", "bad_format", "json_is_dir",
                                  "json_no_parent", "max_diff", "bad_rotation"])
def test_traj_bad_inputs(tmp_path, trajs, capsys, case):
    est, gt = trajs
    args = ["eval", "traj", str(est), str(gt), "--plot", str(tmp_path / "plot.png")]
    needle = {"garbage": "cannot tell the trajectory format", "missing": "no such file", "no_overlap": "spans t",
              "bad_plot": "ending in .png", "bad_format": "invalid choice", "json_is_dir": "is a directory",
              "json_no_parent": "does not exist", "max_diff": "max_diff", "bad_rotation": "quaternion"}[case]
    if case == "garbage":
        est.write_text("hello world\n")
    elif case == "missing":
        args[2] = str(tmp_path / "nope.txt")
    elif case == "no_overlap":
        t, p = curved_trajectory()
        write_tum(est, t + 500, p)
    elif case == "bad_plot":
        args[-1] = str(tmp_path / "plot.jpg")
    elif case == "bad_format":
        args += ["--gt-format", "g2o"]
    elif case == "json_is_dir":
        (tmp_path / "out.json").mkdir()
        args += ["--json", str(tmp_path / "out.json")]
    elif case == "json_no_parent":
        args += ["--json", str(tmp_path / "nope" / "r.json")]
    elif case == "max_diff":
        args += ["--max-diff", "-1"]
    else:
        t, p = curved_trajectory()
        p[3, 3:] *= 3
        write_tum(est, t, p)
    assert main(args) == 1
    one_line_error(capsys, needle)
    assert not list(tmp_path.glob("plot.*")), "a failed evaluation left a plot behind"


def test_depth_cli_writes_outputs(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        g = rng.uniform(1, 3, (12, 16))
        np.save(gt / f"{i:06d}.npy", g)
        np.save(pred / f"{i:06d}.npy", 3 * g)
    out = tmp_path / "out"
    assert main(["eval", "depth", str(pred), str(gt), "--out", str(out), "--error-images", "2", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "abs_rel" in printed and "5 frames" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["abs_rel"] == pytest.approx(0.0, abs=1e-6) and summary["delta1"] == 1.0
    assert len(list((out / "errors").glob("*.png"))) == 2 and (out / "per_frame.csv").is_file()
    assert main(["eval", "depth", str(pred), str(gt), "--scaling", "none", "--json", str(tmp_path / "s.json"),
                 "-q"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["abs_rel"] == pytest.approx(2.0)


def test_depth_cli_bad_inputs_leave_nothing(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    np.save(pred / "000001.npy", np.ones((4, 4)))
    np.save(gt / "000001.npy", np.ones((8, 8)))
    out = tmp_path / "out"
    assert main(["eval", "depth", str(pred), str(gt), "--out", str(out), "-q"]) == 1
    one_line_error(capsys, "--resize-pred")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    (tmp_path / "afile").write_text("")
    assert main(["eval", "depth", str(pred), str(gt), "--resize-pred", "--out", str(tmp_path / "afile" / "o"),
                 "-q"]) == 1
    one_line_error(capsys, "afile")
    assert main(["eval", "depth", str(pred), str(tmp_path / "none"), "-q"]) == 1
    one_line_error(capsys, "no such file")
    assert main(["eval", "depth", str(pred), str(gt), "--min-depth", "5", "--max-depth", "1", "-q"]) == 1
    one_line_error(capsys, "depth range")


def test_consistency_cli(tmp_path, capsys):
    seq = render_sequence(seed=5, num_frames=7, height=48, width=64)
    run = write_fake_run(tmp_path / "run", seq, [0, 3, 6])
    assert main(["eval", "consistency", str(run), "--json", str(tmp_path / "c.json"), "-q"]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["keyframes"] == 3 and len(res["per_pair"]) == 6 and res["median_rel_diff"] < 0.01
    table = capsys.readouterr().out
    assert f"{100 * res['within_tolerance']:.1f} %" in table and "median relative difference" in table
    (tmp_path / "empty").mkdir()
    assert main(["eval", "consistency", str(tmp_path / "empty"), "-q"]) == 1
    one_line_error(capsys, "no summary.json")
    (run / "summary.json").write_text("{not json")
    assert main(["eval", "consistency", str(run), "-q"]) == 1
    one_line_error(capsys, "malformed")

"""Training: losses, synthetic clips, checkpoints, exact resume after SIGKILL, weight loading."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools.cli import main
from v2d.checkpoint import load_weights
from v2d.config import load_config
from v2d.data.clips import ClipConfig, SyntheticClips, collate
from v2d.errors import InputError
from v2d.geometry.camera import reproject
from v2d.geometry.lie import se3_inv, se3_mul
from v2d.losses import LossConfig, depth_loss, motion_loss
from v2d.model import V2D
from v2d.motion import MotionStep, edges
from v2d.train import Trainer, _stage_loss

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.height=64", "data.width=96", "clips.frames=3", "train.steps=6", "train.motion_steps=2",
        "train.gt_pose_steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.rounds=1",
        "motion.iterations=2"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_depth_loss_by_hand():
    gt = torch.tensor([[[1.0, 2.0], [0.0, 4.0]]])  # one pixel without ground truth
    pred = torch.tensor([[[1.5, 2.0], [9.0, 3.0]]])
    image = torch.zeros(1, 3, 2, 2)
    loss, parts = depth_loss([pred], gt, image, LossConfig(depth_weights=(1.0,), smoothness=0.0))
    assert loss.item() == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # mean |error| over the 3 valid pixels
    assert parts["depth_l1"] == pytest.approx(0.5)
    two, _ = depth_loss([pred, gt.clamp_min(0.5)], gt, image, LossConfig(depth_weights=(0.5, 1.0), smoothness=0.0))
    assert two.item() == pytest.approx(0.5 * 0.5)  # the second (exact on valid pixels) adds nothing


def test_motion_loss_is_least_at_the_ground_truth_and_grows_with_pose_and_flow_error():
    clip = SyntheticClips(ClipConfig(frames=3, flip=False, jitter=0.0), 48, 64, seed=4)[0]
    poses = se3_mul(clip["poses_cw"], se3_inv(clip["poses_cw"][:1]))[None]
    depths, intr = clip["depths"][None], clip["intrinsics"][None]
    ii, jj = edges(3, "keyframe")
    cfg = LossConfig()
    # targets on a stride-2 grid, as tracking's Gauss-Newton runs
    inv = (1 / depths[:, :1, ::2, ::2]).expand(1, 2, 24, 32)
    intr_s = intr / 2  # v2d.refiner.subsample's grid
    coords, _ = reproject(inv, poses[:, ii], poses[:, jj], intr_s[:, None])
    exact = MotionStep(coords, torch.ones_like(coords), poses, intr)
    best, parts = motion_loss([exact], poses, depths, intr, ii, jj, cfg)
    assert parts["flow_epe"] < 1e-4 and parts["flow_l1"] < 1e-4
    assert best.item() == pytest.approx(math.log(cfg.epe_floor), abs=1e-3)
    moved = poses.clone()
    moved[:, 1:, 0] += 0.05
    off, parts = motion_loss([MotionStep(coords, torch.ones_like(coords), moved, intr)], poses, depths, intr, ii, jj,
                             cfg)
    assert parts["flow_epe"] > 0.5 and off.item() > best.item() + 2.0
    wrong, parts = motion_loss([MotionStep(coords + 1.0, torch.ones_like(coords), poses, intr)], poses, depths, intr,
                               ii, jj, cfg)
    assert parts["flow_l1"] == pytest.approx(4.0, rel=1e-3)  # 1 grid px in x and y = 2 + 2 image px
    assert wrong.item() == pytest.approx(best.item() + cfg.flow_weight * 4.0, rel=1e-3)
    unsupervised, parts = motion_loss([MotionStep(coords + 1.0, torch.ones_like(coords), poses, intr)], poses, depths,
                                      intr, ii, jj, cfg, flow=False)
    assert "flow_l1" not in parts and unsupervised.item() == pytest.approx(best.item(), abs=1e-5)


def test_synthetic_clips_are_deterministic_and_flips_stay_consistent():
    cfg = ClipConfig(frames=3, stride=2, jitter=0.0, flip=False)
    a, b = SyntheticClips(cfg, 48, 64, seed=11)[5], SyntheticClips(cfg, 48, 64, seed=11)[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["images"].shape == (3, 3, 48, 64) and a["depths"].shape == (3, 48, 64) and a["poses_cw"].shape == (3, 7)
    # A flipped clip is the mirror image: reprojecting the keyframe with its depth lands on the
    # mirrored coordinates of the unflipped reprojection.
    data = SyntheticClips(ClipConfig(frames=3, stride=2, jitter=0.0, flip=True), 48, 64, seed=11)
    flipped, plain = data.clip(5, flip=True), data.clip(5, flip=False)
    assert torch.equal(flipped["images"], plain["images"].flip(-1))
    for clip in (flipped, plain):
        clip["coords"] = reproject(1 / clip["depths"][:1], clip["poses_cw"][:1], clip["poses_cw"][1:],
                                   clip["intrinsics"])[0]
    mirrored = plain["coords"].flip(-2)
    mirrored[..., 0] = 63 - mirrored[..., 0]
    assert torch.allclose(flipped["coords"], mirrored, atol=1e-3)


@pytest.mark.parametrize("focal", [False, True])
def test_train_optimize_focal_decides_the_motion_updates(focal):
    """`train.optimize_focal` (not a gn setting) reaches every motion update of training, keyframe fixed."""
    cfg = load_config(None, [*TINY, f"train.optimize_focal={str(focal).lower()}"])
    model = V2D.from_config(cfg)
    seen = []
    forward = model.motion.forward
    model.motion.forward = lambda *a, **k: seen.append(k["gn"]) or forward(*a, **k)
    batch = collate([SyntheticClips(cfg.clips, 64, 96, seed=1)[0]])
    for stage in ("motion", "joint"):
        _stage_loss(model, cfg, batch, stage, rounds=1)
    assert len(seen) == 2
    assert all(gn.optimize_focal == focal and gn.fixed_poses == 1 and gn.iterations == cfg.gn.iterations
               for gn in seen)


def _train(out: Path, *extra: str) -> list[dict[str, str]]:
    assert main(["train", "--out", str(out), *[a for s in TINY for a in ("--set", s)], *extra]) == 0
    return _rows(out / "metrics.csv")


def test_training_runs_every_stage_and_writes_outputs(tmp_path):
    rows = _train(tmp_path / "run")
    assert [r["stage"] for r in rows] == ["motion"] * 2 + ["depth"] * 2 + ["joint"] * 2
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # finite numbers
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    model = V2D.from_config(load_config(None, TINY))
    meta = load_weights(tmp_path / "run" / "model.pt", model)
    assert meta["step"] == 6 and set(weights["model"]) == set(model.state_dict())
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    reference = _train(tmp_path / "ref")
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "tools.cli", "train", "--out", str(out), *[a for s in TINY for a in ("--set", s)]]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpt = out / "checkpoint.pt"
    while time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= step < 6, "the run should be killed mid-way"
    resumed = _train(out, "--resume")
    assert [r["step"] for r in resumed] == [str(s) for s in range(1, 7)]  # no duplicated or missing rows
    for a, b in zip(reference, resumed, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5, abs=1e-6), a["step"]


def test_bad_weights_and_resume_errors(tmp_path, capsys):
    model = V2D.from_config(load_config(None, TINY))
    with pytest.raises(InputError, match="weights file not found"):
        load_weights(tmp_path / "none.pt", model)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot load weights"):
        load_weights(junk, model)
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="do not fit this model"):
        load_weights(tmp_path / "other.pt", model)
    assert main(["train", "--out", str(tmp_path / "fresh"), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_trainer_rejects_global_mode(tmp_path):
    from v2d.errors import ConfigError

    with pytest.raises(ConfigError, match="keyframe"):
        Trainer(load_config(None, [*TINY, "motion.mode=global"]), tmp_path)


def test_ddp_two_processes_with_gloo(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tools.cli", "train", "--out", str(out),
           *[a for s in TINY for a in ("--set", s)], "--set", "train.steps=5",
           "--set", "motion.flow_source=learned"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out / "metrics.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 6)]  # rank 0 logs each step once
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 5


def test_training_on_a_dataset_folder(tmp_path):
    from tests.io.test_datasets import write_7scenes
    from v2d.data.synthetic import render_sequence

    root = write_7scenes(tmp_path / "scene", render_sequence(1, 8, height=64, width=96))
    rows = _train(tmp_path / "run", "--set", f"train.data={root}", "--set", "train.steps=3",
                  "--set", "train.motion_steps=1", "--set", "train.gt_pose_steps=1")
    assert [r["stage"] for r in rows] == ["motion", "depth", "joint"]


def test_export_weights_from_a_checkpoint(tmp_path):
    _train(tmp_path / "run", "--set", "train.steps=4")
    out = tmp_path / "exported.pt"
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--until", "4", "--export", str(out),
                 *[a for s in TINY for a in ("--set", s)], "--set", "train.steps=4"]) == 0
    data = torch.load(out, weights_only=True)
    assert data["step"] == 4 and "optimizer" not in data
    model = V2D.from_config(load_config(None, TINY))
    load_weights(out, model)
    ref = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())


def test_init_from_weights_fine_tunes(tmp_path):
    _train(tmp_path / "a", "--set", "train.steps=2")
    trainer = Trainer(load_config(None, [*TINY, f"train.init={tmp_path / 'a' / 'model.pt'}", "train.seed=5"]),
                      tmp_path / "b")
    ref = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    assert trainer.step == 0 and all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in ref.items())


def test_plot_metrics_writes_a_png_without_warnings(tmp_path):
    """A stage-1-only log (no depth L1 yet) plots without legend warnings or touching pyplot's state."""
    import warnings

    import cv2

    from v2d.train import plot_metrics

    csv_path = tmp_path / "metrics.csv"
    rows = ["step,stage,loss,depth_l1,flow_epe"] + [f"{i},motion,{1.0 / (i + 1):.4f},,{5 - i / 100:.3f}"
                                                    for i in range(1, 120)]
    csv_path.write_text("\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plot_metrics(csv_path, tmp_path / "loss.png")
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 200 and image.std() > 5
    (tmp_path / "empty.csv").write_text("step,stage,loss\n")
    with pytest.raises(InputError, match="no rows"):
        plot_metrics(tmp_path / "empty.csv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

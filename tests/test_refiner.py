"""The learned motion update (v2d.refiner) and its training (v2d.train_motion)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slam.config import RunConfig
from v2d.config import load_config
from v2d.data.pairs import Pairs, PairSource
from v2d.data.synthetic import render_sequence
from v2d.errors import ShapeError
from v2d.flow import dis_targets
from v2d.geometry.lie import se3_identity, se3_inv, se3_mul
from v2d.refiner import FlowRefiner, RefinerConfig, motion_updates, subsample
from v2d.train_motion import MotionTrainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
H, W = 96, 128


@pytest.fixture(scope="module")
def pair():
    seq = render_sequence(3, 8, height=H, width=W)
    images = np.asarray(seq.images)
    t, w = dis_targets(images[0], images[4])
    rel = se3_mul(seq.poses_cw[4], se3_inv(seq.poses_cw[0]))
    depth = torch.from_numpy(np.asarray(seq.depths)[0]).float()
    img = torch.from_numpy(images[[0, 4]]).permute(0, 3, 1, 2).float() / 255.0
    return img, t, w, depth, rel, seq.intrinsics.float()


def _align(refiner, pair, stride=2, updates=1):
    img, t, w, depth, rel, intr = pair
    t, w, inv, k = subsample(t[None], w[None], (1.0 / depth)[None], intr, stride)
    poses = torch.stack([se3_identity(dtype=torch.float64), se3_identity(dtype=torch.float64)]).float()
    ii, jj = torch.tensor([0]), torch.tensor([1])
    opts = load_config(None, [], root=RunConfig).gn.options(fixed_poses=1, optimize_focal=False)
    refine = None if refiner is None else (lambda t_, w_, c_, v_: refiner(img[:1], img[1:], t_, w_, c_, v_, stride))
    return motion_updates(poses, inv, k, t, w, ii, jj, opts, 1.0, updates, refine)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_the_untrained_refiner_is_the_dis_mode_exactly(pair, stride):
    torch.manual_seed(0)
    refiner = FlowRefiner()
    dis = _align(None, pair, stride, updates=2)
    learned = _align(refiner, pair, stride, updates=2)
    assert len(dis) == len(learned) == 3
    for a, b in zip(dis, learned, strict=True):
        assert torch.equal(a.poses, b.poses) and torch.equal(a.targets, b.targets) and torch.equal(a.weights, b.weights)
    # and the DIS mode itself recovers the motion (a 4-frame gap)
    rel = pair[4].float()
    err, motion = (dis[-1].poses[1] - rel)[:3].norm(), rel[:3].norm()
    assert err < 0.25 * motion, (err, motion)


def test_refiner_outputs_change_targets_and_weights_once_trained(pair):
    torch.manual_seed(0)
    refiner = FlowRefiner(RefinerConfig(radius=2, hidden=16))
    with torch.no_grad():
        refiner.head.weight.normal_(std=0.01)
        refiner.head.bias.copy_(torch.tensor([0.5, -0.25, -1.0]))
    img, t, w, depth, _, intr = pair
    t2, w2, inv, _ = subsample(t[None], w[None], (1.0 / depth)[None], intr, 2)
    valid = torch.ones(t2.shape[:-1], dtype=torch.bool)
    nt, nw = refiner(img[:1], img[1:], t2, w2, t2, valid, 2)
    assert nt.shape == t2.shape and nw.shape == w2.shape
    d = (nt - t2).mean((0, 1, 2))
    assert d[0] > 0.2 and d[1] < -0.05  # bias 0.5, -0.25 full-resolution px -> grid px at stride 2: x2/2
    ratio = (nw / w2.clamp_min(1e-6))[w2 > 1e-3]
    assert ratio.max() < 1.0 and ratio.min() > 0.1  # weights scaled by about exp(-1)
    enc = refiner.encode(img)  # encoded once and indexed per edge: the same result
    et, ew = refiner(enc[[0]], enc[[1]], t2, w2, t2, valid, 2)
    assert torch.equal(et, nt) and torch.equal(ew, nw)


def test_refiner_rejects_bad_strides_and_shapes(pair):
    refiner = FlowRefiner()
    img, t, w, depth, _, intr = pair
    t2, w2, _, _ = subsample(t[None], w[None], (1.0 / depth)[None], intr, 2)
    valid = torch.ones(t2.shape[:-1], dtype=torch.bool)
    with pytest.raises(ShapeError, match="stride"):
        refiner(img[:1], img[1:], t2, w2, t2, valid, 3)
    with pytest.raises(ShapeError, match="does not fit"):
        refiner(img[:1], img[1:], t2, w2, t2, valid, 1)


def test_the_pose_loss_reaches_every_refiner_parameter_through_gauss_newton(pair):
    torch.manual_seed(0)
    refiner = FlowRefiner()
    with torch.no_grad():
        refiner.head.weight.normal_(std=1e-3)  # after a first training step
    steps = _align(refiner, pair)
    rel = pair[4].float()
    loss = (steps[-1].poses[1] - rel).abs().sum()
    loss.backward()
    missing = [n for n, p in refiner.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def _tiny(tmp_path, *extra):
    sets = [f"data.height={H}", f"data.width={W}", "motion_train.scenes=2", "motion_train.frames=13",
            "motion_train.batch_size=1", "motion_train.val_pairs=0", "motion_train.checkpoint_every=2",
            "motion_train.log_every=1", "motion_train.gaps=[2, 4]", *extra]
    return load_config(None, sets, root=RunConfig)


def test_training_lowers_the_loss_on_a_pair_it_sees_again(tmp_path):
    """Through the unrolled Gauss-Newton layer: 25 steps on one repeated pair fit it."""
    cfg = _tiny(tmp_path, "motion_train.lr=0.003", "motion_train.identity_fraction=0", "motion_train.steps=25")
    trainer = MotionTrainer(cfg, tmp_path / "run")
    trainer.pairs = _Repeat(trainer.pairs[3])
    rows = trainer.train(progress=False)
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)


class _Repeat:
    def __init__(self, item):
        self.item = item

    def __getitem__(self, k):
        return self.item


def test_resumed_training_computes_the_same_losses(tmp_path):
    cfg = _tiny(tmp_path, "motion_train.steps=4")
    full = MotionTrainer(cfg, tmp_path / "full")
    rows_full = full.train(progress=False)
    half = MotionTrainer(cfg, tmp_path / "half")
    half.train(until=2, progress=False)
    again = MotionTrainer(cfg, tmp_path / "half")
    again.resume()
    rows = again.train(progress=False)
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_full[2:]]
    for a, b in zip(full.refiner.state_dict().values(), again.refiner.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with (tmp_path / "half" / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_export_is_a_model_file_that_runs_and_restarts_training(tmp_path):
    from v2d.model import load_model

    cfg = _tiny(tmp_path, "motion_train.steps=2", "motion_train.lr=0.01")
    trainer = MotionTrainer(cfg, tmp_path / "run")
    trainer.train(progress=False)
    path = trainer.export(tmp_path / "model.pt")
    model = load_model(load_config(None, [f"model.weights={path}"], root=RunConfig))
    trained = trainer.refiner.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.motion.refiner.state_dict().items())
    assert not torch.equal(trained["head.weight"], torch.zeros_like(trained["head.weight"]))
    again = MotionTrainer(_tiny(tmp_path, f"motion_train.init={path}"), tmp_path / "again")
    assert all(torch.equal(v, trained[k]) for k, v in again.refiner.state_dict().items())


def test_synthetic_pairs_are_deterministic_and_respect_the_gap_limit():
    pairs = Pairs([PairSource("synthetic", "fast", seed=7, frames=13, max_gap=2)], (1, 8), H, W, seed=3)
    a, b = pairs[5], Pairs([PairSource("synthetic", "fast", seed=7, frames=13, max_gap=2)], (1, 8), H, W, seed=3)[5]
    assert np.array_equal(a.images, b.images) and torch.equal(a.rel_cw, b.rel_cw)
    assert all(abs(pairs[k].frames[0] - pairs[k].frames[1]) <= 2 for k in range(10))


@pytest.mark.skipif(not (DATA / "7scenes-redkitchen").exists(), reason=f"real data not found: {DATA}")
def test_real_pairs_never_leave_their_frame_range():
    pairs = Pairs([PairSource("real", str(DATA / "7scenes-redkitchen"), first=240, last=259)], (1, 12), H, W, seed=0)
    drawn = [pairs[k].frames for k in range(40)]
    assert all(240 <= i <= 259 and 240 <= j <= 259 for i, j in drawn)
    assert min(min(d) for d in drawn) < 245 and max(max(d) for d in drawn) > 254


def test_cli_bad_real_source_is_one_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "tools.cli", "train-motion", "--out", str(tmp_path / "r"),
           "--set", "motion_train.scenes=0", "--set", "motion_train.real=[/nonexistent/seq:0-9]"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "/nonexistent/seq" in res.stderr

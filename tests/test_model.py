"""The networks: depth module, motion module, the V2D alternation, presets, the DIS flow mode."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from v2d.config import V2DConfig, load_config
from v2d.data.synthetic import render_sequence
from v2d.depth import DepthConfig, depth_hypotheses
from v2d.errors import NumericalError, ShapeError
from v2d.geometry.camera import scale_intrinsics
from v2d.geometry.lie import se3_inv, se3_log, se3_mul
from v2d.model import V2D
from v2d.motion import edges

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"small": ROOT / "configs" / "small.yaml", "full": ROOT / "configs" / "full.yaml"}


def _cfg(preset: str = "small", *overrides: str) -> V2DConfig:
    return load_config([PRESETS[preset]], list(overrides))


def _model(cfg: V2DConfig, seed: int = 0) -> V2D:
    torch.manual_seed(seed)
    return V2D.from_config(cfg)


@pytest.fixture(scope="module")
def clip():
    """5 synthetic frames at 64x96 (every 3rd frame of a sequence), float in [0, 1], with GT."""
    seq = render_sequence(3, 13, height=64, width=96)
    idx = [0, 3, 6, 9, 12]
    frames = torch.from_numpy(np.asarray(seq.images)[idx]).permute(0, 3, 1, 2).float() / 255
    return frames, seq.intrinsics.float(), seq.poses_cw[idx].float(), torch.from_numpy(np.asarray(seq.depths)[idx])


@pytest.mark.parametrize("preset", ["small", "full"])
@pytest.mark.parametrize("flow_source", ["learned", "dis"])
def test_shapes_and_dtypes_for_both_presets(clip, preset, flow_source):
    frames, intr, _, _ = clip
    cfg = _cfg(preset, f"motion.flow_source={flow_source}", "model.iters=2")
    with torch.no_grad():
        out = _model(cfg)(frames, intr)
    N, H, W = frames.shape[0], frames.shape[2], frames.shape[3]
    stacks = cfg.depth.matching_hourglasses
    assert len(out.poses) == len(out.depths) == len(out.intrinsics) == 2
    for poses, depths in zip(out.poses, out.depths, strict=True):
        assert poses.shape == (N, 7) and poses.dtype == torch.float32
        assert len(depths) == stacks and all(d.shape == (1, H, W) and d.dtype == torch.float32 for d in depths)
        assert torch.isfinite(poses).all() and all(torch.isfinite(d).all() for d in depths)
        lo, hi = cfg.depth.min_depth, cfg.depth.max_depth
        assert all(((d >= lo - 1e-4) & (d <= hi + 1e-4)).all() for d in depths)  # soft-argmax stays in range
        assert torch.allclose(poses[0], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]))  # keyframe fixed
    assert len(out.motion[0]) == cfg.motion.iterations
    assert out.init_depths.shape == (1, H, W)


def test_batched_input_and_deterministic_with_a_seed(clip):
    frames, intr, _, _ = clip
    cfg = _cfg("small", "motion.flow_source=learned", "model.iters=1")
    batch = torch.stack([frames, frames.flip(0)])
    with torch.no_grad():
        a = _model(cfg, seed=7)(batch, intr.expand(2, 4))
        b = _model(cfg, seed=7)(batch, intr.expand(2, 4))
        c = _model(cfg, seed=8)(batch, intr.expand(2, 4))
    assert a.poses[-1].shape == (2, 5, 7) and a.depths[-1][-1].shape == (2, 1, 64, 96)
    assert torch.equal(a.poses[-1], b.poses[-1]) and torch.equal(a.depths[-1][-1], b.depths[-1][-1])
    assert not torch.equal(a.depths[-1][-1], c.depths[-1][-1])


def _assert_all_grads(module: torch.nn.Module, name: str) -> None:
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"{name}: no gradient for {missing[:5]} ({len(missing)} parameters)"


@pytest.mark.parametrize("preset", ["small", "full"])
def test_depth_loss_reaches_every_depth_parameter(clip, preset):
    frames, intr, poses, depths = clip
    model = _model(_cfg(preset))
    feats = model.depth.features((frames - 0.45) / 0.225)[None]
    pred = model.depth(feats, poses[None], intr[None], frames.shape[-2:])
    loss = sum((p - depths[None, 0]).abs().mean() for p in pred)
    loss.backward()
    _assert_all_grads(model.depth, "depth module")


def test_motion_loss_reaches_every_motion_parameter(clip):
    frames, intr, poses, depths = clip
    cfg = _cfg("small", "motion.flow_source=learned", "motion.pose_init=regress", "model.iters=1",
               "model.depth_init=constant")
    model = _model(cfg)
    # the learned update's last layer starts at zero (the DIS mode) and gets the only gradient at
    # first; after a training step it is not zero any more, and everything below it learns
    with torch.no_grad():
        model.motion.refiner.head.weight.normal_(std=1e-3)
    out = model(frames, intr, depth=depths[:1])
    gt_rel = se3_mul(poses, se3_inv(poses[:1]))
    loss = sum(se3_log(se3_mul(s.poses_cw[0], se3_inv(gt_rel))).norm(dim=-1).sum() for s in out.motion[0])
    loss.backward()
    _assert_all_grads(model.motion, "motion module")


def test_dis_mode_recovers_the_relative_pose_of_a_synthetic_triple():
    seq = render_sequence(5, 21)
    idx = [0, 10, 20]
    frames = torch.from_numpy(np.asarray(seq.images)[idx]).permute(0, 3, 1, 2).float() / 255
    gt = seq.poses_cw[idx].float()
    depth = torch.from_numpy(np.asarray(seq.depths)[0])[None]
    cfg = load_config(None, ["motion.flow_source=dis", "model.iters=1"])
    with torch.no_grad():
        out = _model(cfg)(frames, seq.intrinsics.float(), depth=depth)
    est = out.poses[-1]
    gt_rel = se3_mul(gt, se3_inv(gt[:1]))
    for j in (1, 2):
        err = se3_log(se3_mul(est[j], se3_inv(gt_rel[j])))
        assert math.degrees(err[3:].norm()) < 0.5, j
        t_est, t_gt = se3_inv(est[j])[:3], se3_inv(gt_rel[j])[:3]  # camera centres in the keyframe
        cos = torch.dot(t_est, t_gt) / (t_est.norm() * t_gt.norm())
        assert t_gt.norm() > 0.05 and math.degrees(math.acos(min(1.0, cos.item()))) < 5.0, j


def test_global_mode_uncalibrated_mode_and_concat_fusion_run(clip):
    frames, intr, _, _ = clip
    with torch.no_grad():
        out = _model(_cfg("small", "motion.mode=global", "model.iters=1", "motion.iterations=1"))(frames[:3], intr)
        assert out.depths[-1][-1].shape == (3, 64, 96)  # every frame has a depth map
        ii, jj = edges(3, "global")
        assert len(ii) == 6 and out.motion[0][0].targets.shape[:2] == (1, 6)
        model = _model(_cfg("small", "model.iters=1"))
        out = model(frames, intr * 1.1, optimize_focal=True)
        assert not torch.allclose(out.intrinsics[-1][:2], intr[:2] * 1.1)
        assert torch.equal(out.intrinsics[-1][2:], intr[2:] * 1.1)
        assert torch.equal(model(frames, intr * 1.1).intrinsics[-1], intr * 1.1)  # calibrated by default
        out = _model(_cfg("small", "depth.fusion=concat", "depth.views=4", "model.iters=1"))(frames, intr)
        assert out.depths[-1][-1].shape == (1, 64, 96)


def test_hypotheses_spacing():
    like = torch.zeros(())
    lin = depth_hypotheses(DepthConfig(hypotheses=5, min_depth=1.0, max_depth=5.0), like)
    assert torch.allclose(lin, torch.tensor([1.0, 2, 3, 4, 5]))
    inv = depth_hypotheses(DepthConfig(hypotheses=3, min_depth=1.0, max_depth=4.0, spacing="inverse"), like)
    assert torch.allclose(1 / inv, torch.tensor([1.0, 0.625, 0.25]))


def test_bad_inputs_give_clear_errors(clip):
    frames, intr, _, _ = clip
    model = _model(_cfg("small", "model.iters=1"))
    with pytest.raises(ShapeError, match="frames: expected every frame of one size"):
        model([frames[0], frames[1, :, :60]], intr)
    with pytest.raises(ShapeError, match="frames: expected at least 2 frames, got 1"):
        model(frames[:1], intr)
    with pytest.raises(ShapeError, match=r"intrinsics: expected \(4,\) or \(B, 4\).*got \(3, 3\)"):
        model(frames, torch.eye(3))
    with pytest.raises(ShapeError, match="intrinsics: expected fx > 0"):
        model(frames, intr * torch.tensor([-1.0, 1, 1, 1]))
    bad = frames.clone()
    bad[2, 0, 5, 5] = float("nan")
    with pytest.raises(NumericalError, match="frames: NaN or Inf"):
        model(bad, intr)
    with pytest.raises(ShapeError, match=r"frames: expected \(N, 3, H, W\)"):
        model(frames[:, :1], intr)
    with pytest.raises(ShapeError, match="multiples of 4"):
        model(frames[..., :62, :], intr)
    with pytest.raises(ShapeError, match="'concat' fusion expects 5 frames, got 3"):
        _model(_cfg("small", "depth.fusion=concat"))(frames[:3], intr)
    with pytest.raises(NumericalError, match="depth: expected finite positive"):
        model(frames, intr, depth=torch.zeros(1, 64, 96))


def test_feature_intrinsics_follow_the_pixel_centre_convention():
    # The depth and motion modules scale intrinsics to 1/4 resolution with scale_intrinsics; a
    # principal point at the image centre stays at the feature map's centre.
    intr = torch.tensor([100.0, 100.0, 47.5, 31.5])  # centre of a 96 x 64 image
    small = scale_intrinsics(intr, 24 / 96, 16 / 64)
    assert torch.allclose(small[2:], torch.tensor([11.5, 7.5]))


def test_dataset_configs_compose_with_presets():
    cfg = load_config([PRESETS["full"], ROOT / "configs" / "kitti.yaml"])
    assert cfg.depth.volume_channels == 32 and cfg.depth.fusion == "concat" and cfg.data.width == 1088
    assert dataclasses.asdict(load_config([PRESETS["small"]])) == dataclasses.asdict(V2DConfig())

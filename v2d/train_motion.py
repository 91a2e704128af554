"""Training the learned motion update (`v2d.refiner.FlowRefiner`) end to end through the Gauss-Newton layer.

    v2d train-motion --out runs/motion [--resume] [--set motion_train.steps=3000 ...]

Each step draws `batch_size` pairs (`v2d.data.pairs`): a source frame with (noisy) depth, a target
frame, DIS flow between them with its forward-backward weights, an initial pose near the true one
(or the identity: tracking's retry). It runs exactly what tracking runs (`v2d.refiner.motion_updates`:
Gauss-Newton, then robust re-weighting + the refiner + Gauss-Newton, `motion.refiner.updates`
times) and back-propagates the motion loss of `v2d.losses` (the log of the induced-flow error,
and the flow targets' L1 error on synthetic pairs; `update_loss`) through the unrolled Gauss-Newton
layer (`gn_reduce`) into the refiner.

Validation pairs (other scenes, held-apart real frames) are evaluated in the DIS mode and with the
refiner every `val_every` steps: `val.csv`. Checkpoints are atomic; `--resume` continues with the
same step, optimizer and RNG state, and pair k depends only on (seed, k), so an interrupted run
computes the same next losses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from v2d.checkpoint import load_model_state, read_checkpoint, resume_training, save_training
from v2d.data.pairs import SYNTHETIC_CASES, Pair, Pairs, PairSource
from v2d.errors import InputError
from v2d.flow import dis_flow, fb_targets
from v2d.geometry.camera import reproject, valid_reprojection
from v2d.geometry.lie import se3_exp, se3_identity, se3_inv, se3_mul, so3_log
from v2d.io.writers import append_csv, atomic_write, ensure_dir, truncate_csv
from v2d.losses import update_loss, visible_in_target
from v2d.ranges import NON_NEGATIVE, POSITIVE, Ranges, at_least
from v2d.refiner import FlowRefiner, UpdateStep, motion_updates, subsample

__all__ = ["MotionTrainConfig", "MotionTrainer", "PairResult", "evaluate_pair"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MotionTrainConfig:
    """Training of the learned motion update (the `motion_train` section).

    Attributes:
        steps, batch_size: optimizer steps and pairs per step.
        lr, lr_decay, lr_decay_steps, weight_decay, grad_clip: AdamW and its schedule (the lr is
            multiplied by lr_decay every lr_decay_steps).
        seed: model initialisation and pair draws.
        init: weights to start from ("" = the untrained refiner, i.e. the DIS mode).
        scenes, frames: synthetic sequences (each a case of SYNTHETIC_CASES in turn) and their length.
        scene_seed: first scene seed of the training sequences (the suite renders seed 0).
        real: real sequences with depth and poses as "PATH:FIRST-LAST" (inclusive frame range).
        real_fraction: share of pairs drawn from the real sequences.
        gaps: frame gaps between source and target.
        stride: the Gauss-Newton grid (every n-th pixel; tracking's `slam.track_stride`).
        robust_scale: Cauchy scale (px at 320 wide; `slam.robust_scale`).
        depth_noise: std of the smooth log-depth noise on the input depth. Kept small: the pose error
            that depth error causes is one no flow can remove and drowns the signal (at 0.1, exact
            flow still leaves 0.23 deg / 1.4 cm median on the synthetic validation pairs where DIS
            leaves 0.29 deg / 1.8 cm; at 0, 0 where DIS leaves 0.08 deg / 0.41 cm).
        rot_noise_deg, trans_noise: std of the initial pose's error per axis (deg, scene units).
        identity_fraction: share of pairs started from the identity (tracking's retry).
        val_pairs: validation pairs per split; val_scene_seed: their first synthetic scene seed.
        val_real: held-apart real sequences ("PATH:FIRST-LAST").
        val_every, checkpoint_every, log_every: in steps.
    """

    steps: int = 3000
    batch_size: int = 4
    lr: float = 3e-4
    lr_decay: float = 0.5
    lr_decay_steps: int = 1500
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    init: str = ""
    scenes: int = 48
    frames: int = 24
    scene_seed: int = 1000
    real: tuple[str, ...] = ()
    real_fraction: float = 0.2
    gaps: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)
    stride: int = 2
    robust_scale: float = 2.0
    depth_noise: float = 0.02
    rot_noise_deg: float = 1.0
    trans_noise: float = 0.02
    identity_fraction: float = 0.2
    val_pairs: int = 48
    val_scene_seed: int = 500
    val_real: tuple[str, ...] = ()
    val_every: int = 250
    checkpoint_every: int = 25
    log_every: int = 5

    RANGES: ClassVar[Ranges] = {
        "steps": at_least(1),
        "batch_size": at_least(1),
        "lr": POSITIVE,
        "lr_decay": POSITIVE,
        "lr_decay_steps": at_least(1),
        "weight_decay": NON_NEGATIVE,
        "grad_clip": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "scenes": NON_NEGATIVE,
        "frames": at_least(13),
        "scene_seed": NON_NEGATIVE,
        "real_fraction": NON_NEGATIVE,
        "stride": at_least(1),
        "robust_scale": POSITIVE,
        "depth_noise": NON_NEGATIVE,
        "rot_noise_deg": NON_NEGATIVE,
        "trans_noise": NON_NEGATIVE,
        "identity_fraction": NON_NEGATIVE,
        "val_pairs": NON_NEGATIVE,
        "val_every": at_least(1),
        "checkpoint_every": at_least(1),
        "log_every": at_least(1),
    }


def _real_sources(specs: tuple[str, ...]) -> list[PairSource]:
    out = []
    for spec in specs:
        path, sep, rng = spec.rpartition(":")
        try:
            first, last = (int(x) for x in rng.split("-"))
        except ValueError:
            raise InputError(f"real sequence {spec!r}: expected PATH:FIRST-LAST") from None
        if not sep or first < 0 or last < first:
            raise InputError(f"real sequence {spec!r}: expected PATH:FIRST-LAST with 0 <= FIRST <= LAST")
        out.append(PairSource("real", path, first=first, last=last))
    return out


# largest gap per case: beyond it, tracking does not see such pairs (fast motion: 4 deg, 8 cm per frame)
_MAX_GAP = {"fast": 3, "blur": 6}


def _synthetic_sources(count: int, first_seed: int, frames: int) -> list[PairSource]:
    cases = [SYNTHETIC_CASES[k % len(SYNTHETIC_CASES)] for k in range(count)]
    return [PairSource("synthetic", case, seed=first_seed + k, frames=frames, max_gap=_MAX_GAP.get(case, 1_000_000))
            for k, case in enumerate(cases)]


@dataclass
class PairResult:
    """What one pair's alignment gave: the loss (with gradients) and its parts, the pose errors of
    the last update (deg, cm)."""

    loss: torch.Tensor
    parts: dict[str, float]
    rot_deg: float
    trans_cm: float


def _smooth_noise(rng: np.random.Generator, h: int, w: int, std: float) -> np.ndarray:
    import cv2

    coarse = rng.normal(0.0, std, size=(4, 5)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _geodesic(rel: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation (deg) and translation (cm) of rel gt^-1. Shapes: (7,), (7,) -> two scalars."""
    d = se3_mul(rel.double(), se3_inv(gt.double()))
    # the rotation angle, and the translation of the error motion (not the twist's v: clearer units)
    return so3_log(d[3:]).norm() * (180.0 / math.pi), d[:3].norm() * 100.0


def evaluate_pair(refiner: FlowRefiner | None, pair: Pair, cfg, tc: MotionTrainConfig, rng: np.random.Generator,
                  updates: int) -> PairResult:
    """Align one pair as tracking does and score it (see the module docstring). refiner None: the DIS mode."""
    H, W = pair.images.shape[1:3]
    dis = cfg.motion.dis
    t, w = fb_targets(dis_flow(pair.images[0], pair.images[1], dis.preset),
                      dis_flow(pair.images[1], pair.images[0], dis.preset), dis)
    depth_gt = torch.from_numpy(pair.depths[0])
    noisy = depth_gt * torch.from_numpy(np.exp(_smooth_noise(rng, H, W, tc.depth_noise)))
    known = depth_gt > 0
    inv_in = torch.where(known, 1.0 / noisy.clamp_min(1e-3), torch.zeros_like(noisy))
    inv_gt = torch.where(known, 1.0 / depth_gt.clamp_min(1e-3), torch.zeros_like(depth_gt))
    w = w * known[..., None]
    intr = pair.intrinsics.float()
    s = tc.stride
    t, w, inv, intr_s = subsample(t[None], w[None], inv_in[None], intr, s)
    inv_gt_s = inv_gt[::s, ::s][None]
    gt = pair.rel_cw
    if rng.random() < tc.identity_fraction:
        init = se3_identity(dtype=torch.float64)
    else:
        noise = torch.from_numpy(np.concatenate([rng.normal(0, tc.trans_noise, 3),
                                                 np.radians(rng.normal(0, tc.rot_noise_deg, 3))]))
        init = se3_mul(se3_exp(noise), gt)
    poses = torch.stack([se3_identity(dtype=torch.float64), init]).float()
    ii, jj = torch.tensor([0]), torch.tensor([1])
    opts = cfg.gn.options(fixed_poses=1, optimize_focal=False)
    opts = dataclasses.replace(opts, iterations=cfg.gn.iterations * cfg.motion.iterations)
    scale = tc.robust_scale * (W / 320.0) / s
    refine = None
    if refiner is not None:
        img = torch.from_numpy(pair.images).permute(0, 3, 1, 2).float() / 255.0

        def refine(t_, w_, c_, v_):
            return refiner(img[:1], img[1:], t_, w_, c_, v_, s)

    steps: list[UpdateStep] = motion_updates(poses, inv, intr_s, t, w, ii, jj, opts, scale, updates, refine)
    # ground truth on the grid: where the source pixels land, and whether they are seen there
    c_gt, z_gt = reproject(inv_gt_s, poses[0], gt.float(), intr_s)
    valid = valid_reprojection(inv_gt_s, c_gt, z_gt, opts.min_depth)
    seen = None if pair.real else valid & visible_in_target(c_gt, z_gt, torch.from_numpy(pair.depths[1])[None], s)
    total = torch.zeros(())
    parts: dict[str, float] = {}
    K = len(steps) - 1
    for k, step in enumerate(steps[1:], start=1):
        c, _ = reproject(inv_gt_s, step.poses[0], step.poses[1], intr_s)
        loss, epe, fl = update_loss(c, c_gt, valid, step.targets, seen, s, cfg.loss)
        total = total + cfg.loss.iteration_decay ** (K - k) * loss
        rot, trans = _geodesic(step.poses[1], gt)
        if fl is not None and bool(seen.any()):
            parts["flow_l1"] = float(fl.detach().mean())
        parts.update(epe=float(epe.detach().mean()), rot_deg=float(rot.detach()), trans_cm=float(trans.detach()))
    return PairResult(total, parts, parts["rot_deg"], parts["trans_cm"])


class MotionTrainer:
    """Runs the training, logs metrics.csv and val.csv, writes checkpoints to `out_dir`."""

    def __init__(self, cfg, out_dir: str | Path) -> None:
        self.cfg, self.tc = cfg, cfg.motion_train
        tc = self.tc
        self.out = ensure_dir(out_dir)
        torch.manual_seed(tc.seed)
        self.refiner = FlowRefiner(cfg.motion.refiner)
        if tc.init:
            self._load_init(tc.init)
        self.opt = torch.optim.AdamW(self.refiner.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.step = 0
        H, W = cfg.data.height, cfg.data.width
        self.pairs = Pairs(_synthetic_sources(tc.scenes, tc.scene_seed, tc.frames) + _real_sources(tc.real),
                           tc.gaps, H, W, tc.seed, tc.real_fraction)
        self.val = {}
        if tc.val_pairs:
            if tc.scenes:
                self.val["synthetic"] = Pairs(_synthetic_sources(max(6, tc.scenes // 4), tc.val_scene_seed, tc.frames),
                                              tc.gaps, H, W, tc.seed + 1)
            if tc.val_real:
                self.val["real"] = Pairs(_real_sources(tc.val_real), tc.gaps, H, W, tc.seed + 2, 1.0)
        self._dis_val: dict[str, dict[str, float]] = {}
        self._logged = 0  # last step written to metrics.csv

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> Path:
        return save_training(self.checkpoint_path, self.step, self.refiner, self.opt, self.cfg)

    def _load_init(self, path: str) -> None:
        """Start from a refiner checkpoint of this trainer or from a model file's refiner."""
        data = read_checkpoint(path)
        prefix = "motion.refiner."
        if any(k.startswith(prefix) for k in data["model"]):
            data = {"model": {k[len(prefix):]: v for k, v in data["model"].items() if k.startswith(prefix)}}
        load_model_state(path, data, self.refiner)

    def export(self, path: str | Path) -> Path:
        """A model file (what `model.weights` loads): the model of `model.weights` (the shipped one
        by default: the depth module) with this refiner."""
        from v2d.model import load_model

        model = load_model(self.cfg)
        model.motion.refiner.load_state_dict(self.refiner.state_dict())
        state = {"model": model.state_dict(), "step": self.step,
                 "config": json.dumps(dataclasses.asdict(self.cfg))}  # as v2d.config.to_dict
        return atomic_write(Path(path), lambda f: torch.save(state, f))

    def resume(self) -> None:
        self.step = int(resume_training(self.checkpoint_path, self.refiner, self.opt)["step"])
        for name in ("metrics.csv", "val.csv"):  # rows after the resumed step are computed again
            truncate_csv(self.out / name, self.step)
        self._logged = self.step

    def _lr(self, step: int) -> float:
        return self.tc.lr * self.tc.lr_decay ** (step // self.tc.lr_decay_steps)

    def train_step(self) -> dict[str, Any]:
        tc = self.tc
        for g in self.opt.param_groups:
            g["lr"] = self._lr(self.step)
        self.refiner.train()
        total = torch.zeros(())
        parts: dict[str, list[float]] = {}
        for b in range(tc.batch_size):
            k = self.step * tc.batch_size + b
            res = evaluate_pair(self.refiner, self.pairs[k], self.cfg, tc, np.random.default_rng([tc.seed, k, 1]),
                                self.cfg.motion.refiner.updates)
            if torch.isfinite(res.loss):
                total = total + res.loss / tc.batch_size
            for key, v in res.parts.items():
                parts.setdefault(key, []).append(v)
        self.opt.zero_grad(set_to_none=True)
        norm = 0.0
        if total.requires_grad and torch.isfinite(total):
            total.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(self.refiner.parameters(), tc.grad_clip)) \
                if tc.grad_clip > 0 else 0.0
            self.opt.step()
        self.step += 1
        return {"step": self.step, "loss": float(total.detach()), **{k: float(np.mean(v)) for k, v in parts.items()},
                "grad_norm": norm, "lr": self._lr(self.step - 1)}

    @torch.no_grad()
    def validate(self) -> list[dict[str, Any]]:
        """DIS mode and refiner on the validation pairs: median/mean rotation (deg) and translation (cm) errors."""
        rows = []
        self.refiner.eval()
        for split, pairs in self.val.items():
            modes = {"refiner": self.refiner}
            if split not in self._dis_val:
                modes = {"dis": None, **modes}
            for mode, ref in modes.items():
                rot, trans = [], []
                for k in range(self.tc.val_pairs):
                    res = evaluate_pair(ref, pairs[k], self.cfg, self.tc, np.random.default_rng([self.tc.seed, k, 2]),
                                        self.cfg.motion.refiner.updates)
                    rot.append(res.rot_deg)
                    trans.append(res.trans_cm)
                row = {"step": self.step, "split": split, "mode": mode, "rot_med": float(np.median(rot)),
                       "trans_med": float(np.median(trans)), "rot_mean": float(np.mean(rot)),
                       "trans_mean": float(np.mean(trans))}
                if mode == "dis":
                    self._dis_val[split] = row
                rows.append(row)
        return rows

    def train(self, until: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
        until = self.tc.steps if until is None else min(until, self.tc.steps)
        rows: list[dict[str, Any]] = []
        bar = tqdm(total=until, initial=self.step, desc="train-motion", unit="step", disable=not progress)
        t0 = time.perf_counter()
        if self.step == 0 and self.val:
            self._append("val.csv", self.validate())
        while self.step < until:
            row = self.train_step()
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", rot=f"{row.get('rot_deg', float('nan')):.3f}")
            if self.step % self.tc.log_every == 0 or self.step == until:
                self._append("metrics.csv", [r for r in rows if r["step"] > self._logged])
                self._logged = self.step
            if self.step % self.tc.checkpoint_every == 0 or self.step == until:
                self.save()
            if self.val and (self.step % self.tc.val_every == 0 or self.step == until):
                self._append("val.csv", self.validate())
        bar.close()
        return rows

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        keys = {"metrics.csv": ["step", "loss", "epe", "rot_deg", "trans_cm", "flow_l1", "grad_norm", "lr", "seconds"],
                "val.csv": ["step", "split", "mode", "rot_med", "trans_med", "rot_mean", "trans_mean"]}[name]
        append_csv(self.out / name, keys, rows)

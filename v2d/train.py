"""End-to-end training of V2D (DeepV2D's schedule) with atomic, exactly resumable checkpoints.

Schedule (step counts are config fields):
1. `motion_steps`: motion module only, ground-truth depth as its input (motion loss on the learned
   update `v2d.refiner`, whatever `motion.flow_source` says; `v2d.train_motion` trains it
   alone, with pose supervision, as the shipped weights were);
2. `gt_pose_steps`: depth module only, ground-truth poses as its input (depth loss);
3. up to `steps`: joint, the full alternation for `rounds` rounds with the configured flow source
   (depth loss, plus the motion loss when the flow is learned). With `dis`, the depth module learns
   from the poses it will be given at inference.

Resuming: a checkpoint holds the model, the optimizer, the step and every RNG state; clip k of the
synthetic data depends only on (seed, k), so a run killed at any point and resumed from its last
checkpoint computes the same next losses as an uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from tqdm import tqdm

from v2d.checkpoint import load_weights, resume_training, save_training
from v2d.data.clips import SyntheticClips, collate
from v2d.depth import Previous
from v2d.errors import ConfigError, InputError
from v2d.geometry.lie import se3_inv, se3_mul
from v2d.io.datasets import SequenceClips, open_sequence
from v2d.io.writers import append_csv, atomic_write, ensure_dir, truncate_csv
from v2d.losses import depth_loss, motion_loss, normal_loss
from v2d.model import V2D, normalize_images
from v2d.motion import edges
from v2d.ranges import NON_NEGATIVE, POSITIVE, Ranges, at_least

__all__ = ["TrainConfig", "Trainer", "plot_metrics"]

_log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the `train` section).

    Attributes:
        steps: total optimizer steps.
        motion_steps: steps of stage 1 (motion only, GT depth as input).
        gt_pose_steps: steps after stage 1 that train the depth module with GT poses as input.
        rounds: alternation rounds in joint training (inference uses model.iters).
        optimize_focal: the motion updates also optimise a shared focal length (training for
            uncalibrated video; the clips' intrinsics are the start). A training decision, not a
            property of the Gauss-Newton layer (formerly `gn.optimize_focal`); the keyframe's pose
            is always the one held fixed (keyframe mode).
        batch_size: clips per step (per process under DDP).
        optimizer: "rmsprop" (as the original) or "adamw".
        lr: learning rate; lr_decay: multiply the lr by this every lr_decay_steps steps.
        weight_decay: L2 (rmsprop) or decoupled (adamw) weight decay.
        grad_clip: clip the global gradient norm to this (0 = off).
        seed: seeds the model initialisation, the data and every RNG.
        init: weights to start from (a model.pt or checkpoint.pt; fine-tuning), "" = random
            initialisation from `seed`. Only the model is taken, not the optimizer or the step.
        data: "synthetic" (clips rendered on the fly) or a dataset path (any layout `v2d.io.datasets`
            reads, with depth and poses); clips are taken in order, cycling.
        checkpoint_every: write a checkpoint every this many steps (and at the end).
        log_every: append rows to metrics.csv every this many steps.
        sequence_keyframes: K > 1 trains the depth stage on sequences: the clip's frames, in their
            temporal order (`clips.keyframe: first`), give K keyframes spread over the clip, each
            matched against its `depth.views` nearest frames, in order, with the temporal state
            handed from one to the next (`depth.temporal_fusion`); the loss is the mean over the
            keyframes. 1 = one keyframe per clip (frame 0 against all the others).
        frozen: parameter-name prefixes held fixed (e.g. "depth.encoder." fine-tunes the depth
            module's 3D part on features it does not change); a prefix naming nothing is an error.
            Only the parameters are held: with `norm: batch` the running statistics still move.
    The image size is `data.height` x `data.width`; clips are cut as the `clips` section says.
    """

    steps: int = 2000
    motion_steps: int = 400
    gt_pose_steps: int = 400
    rounds: int = 2
    optimize_focal: bool = False
    batch_size: int = 1
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    lr: float = 2.5e-4
    lr_decay: float = 0.5
    lr_decay_steps: int = 1000
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    init: str = ""
    data: str = "synthetic"
    checkpoint_every: int = 50
    log_every: int = 10
    sequence_keyframes: int = 1
    frozen: tuple[str, ...] = ()

    RANGES: ClassVar[Ranges] = {
        "steps": at_least(1),
        "motion_steps": NON_NEGATIVE,
        "gt_pose_steps": NON_NEGATIVE,
        "rounds": at_least(1),
        "batch_size": at_least(1),
        "lr": POSITIVE,
        "lr_decay": POSITIVE,
        "lr_decay_steps": at_least(1),
        "weight_decay": NON_NEGATIVE,
        "grad_clip": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "checkpoint_every": at_least(1),
        "log_every": at_least(1),
        "sequence_keyframes": at_least(1),
    }


class _TrainStep(torch.nn.Module):
    """The loss of one step as a module, so that DistributedDataParallel wraps every stage."""

    def __init__(self, model: V2D, cfg) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, torch.Tensor], stage: str, rounds: int) -> tuple[torch.Tensor, dict]:
        return _stage_loss(self.model, self.cfg, batch, stage, rounds)


class Trainer:
    """Runs the schedule, logs metrics (CSV + JSON lines) and writes checkpoints to `out_dir`."""

    def __init__(self, cfg, out_dir: str | Path, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.tc = cfg, cfg.train
        if cfg.motion.mode != "keyframe":
            raise ConfigError("train: only motion.mode 'keyframe' is supported for training")
        K = cfg.train.sequence_keyframes
        if K > 1 and (cfg.clips.keyframe != "first" or cfg.clips.frames < K + 2):
            raise ConfigError(f"train.sequence_keyframes: {K} keyframes need clips in temporal order "
                              f"(clips.keyframe: first, got {cfg.clips.keyframe}) of at least {K + 2} frames "
                              f"(clips.frames: {cfg.clips.frames})")
        self.out = ensure_dir(out_dir)
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(self.tc.seed)
        self.model = V2D.from_config(cfg)
        if self.tc.init:
            load_weights(self.tc.init, self.model, fine_tune=True)
        for prefix in self.tc.frozen:
            named = [p for name, p in self.model.named_parameters() if name.startswith(prefix)]
            if not named:
                raise ConfigError(f"train.frozen: {prefix!r} names no parameter of the model")
            for p in named:
                p.requires_grad_(False)
        self.step_module: torch.nn.Module = _TrainStep(self.model, cfg)
        if world_size > 1:  # gradients are averaged over processes (DDP; gloo on CPU)
            self.step_module = torch.nn.parallel.DistributedDataParallel(self.step_module,
                                                                         find_unused_parameters=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.tc.optimizer == "rmsprop":
            self.opt = torch.optim.RMSprop(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        self.step = 0
        if self.tc.data == "synthetic":
            self.data = SyntheticClips(cfg.clips, cfg.data.height, cfg.data.width, seed=self.tc.seed * 1_000_003)
        else:
            self.data = SequenceClips(open_sequence(self.tc.data), cfg.clips, cfg.data.height, cfg.data.width)
        self.skipped = 0
        self._logged = 0  # last step written to metrics.csv

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> Path:
        """Write out_dir/checkpoint.pt atomically (rank 0 only)."""
        if self.rank != 0:
            return self.checkpoint_path
        return save_training(self.checkpoint_path, self.step, self.model, self.opt, self.cfg,
                             version=CHECKPOINT_VERSION, skipped=self.skipped)

    def resume(self, path: str | Path | None = None) -> None:
        """Restore model, optimizer, step and RNG states from a checkpoint (weights_only load)."""
        path = Path(path) if path is not None else self.checkpoint_path
        data = resume_training(path, self.model, self.opt)
        self.step = int(data["step"])
        self.skipped = int(data.get("skipped", 0))
        if self.rank == 0:  # rows after the resumed step are computed again, identically
            truncate_csv(self.out / "metrics.csv", self.step)
        self._logged = self.step
        _log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ steps
    def _stage(self, step: int) -> str:
        if step < self.tc.motion_steps:
            return "motion"
        if step < self.tc.motion_steps + self.tc.gt_pose_steps:
            return "depth"
        return "joint"

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        B = self.tc.batch_size
        first = (step * self.world_size + self.rank) * B
        return collate([self.data[(first + b) % len(self.data)] for b in range(B)])

    def _lr(self, step: int) -> float:
        return self.tc.lr * self.tc.lr_decay ** (step // max(self.tc.lr_decay_steps, 1))

    def train(self, until: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
        """Run from the current step to `until` (default: train.steps); returns the logged rows."""
        until = self.tc.steps if until is None else min(until, self.tc.steps)
        rows: list[dict[str, Any]] = []
        bar = tqdm(total=until, initial=self.step, desc="train", unit="step", disable=not progress or self.rank != 0)
        self.model.train()
        t0 = time.perf_counter()
        while self.step < until:
            stage = self._stage(self.step)
            for g in self.opt.param_groups:
                g["lr"] = self._lr(self.step)
            batch = self._batch(self.step)
            loss, parts = self.step_module(batch, stage, self.tc.rounds)
            if not torch.isfinite(loss):
                # A diverging step is skipped (counted, logged), never applied.
                self.skipped += 1
                _log.warning("step %d: non-finite loss in stage %s; step skipped (%d so far)", self.step, stage,
                             self.skipped)
                self.opt.zero_grad(set_to_none=True)
            else:
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
                        if self.tc.grad_clip > 0 else torch.tensor(0.0))
                self.opt.step()
                parts = {**parts, "grad_norm": float(norm)}
            self.step += 1
            row = {"step": self.step, "stage": stage, "loss": float(loss.detach()), "lr": self._lr(self.step - 1),
                   "seconds": time.perf_counter() - t0, **parts}
            rows.append(row)
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{row['loss']:.4f}")
            if self.rank == 0 and (self.step % self.tc.log_every == 0 or self.step == until):
                self._log_rows([r for r in rows if r["step"] > self._logged])
                self._logged = self.step
            if self.step % self.tc.checkpoint_every == 0 or self.step == until:
                self.save()
        bar.close()
        return rows

    def _log_rows(self, rows: list[dict[str, Any]]) -> None:
        append_csv(self.out / "metrics.csv", ["step", "stage", "loss", "depth_l1", "flow_epe", "flow_l1", "normal_deg",
                                              "depth_normal", "grad_norm", "lr", "seconds"], rows)


def _stage_loss(model: V2D, cfg, batch: dict[str, torch.Tensor], stage: str, rounds: int
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one training stage ("motion", "depth" or "joint") on a batch of clips."""
    images, depths, poses, intr = batch["images"], batch["depths"], batch["poses_cw"], batch["intrinsics"]
    B, N, _, H, W = images.shape
    ii, jj = edges(N, "keyframe")
    lc = cfg.loss
    gt_rel = _relative_to_key(poses)
    focal = cfg.train.optimize_focal
    synthetic = cfg.train.data == "synthetic"  # depth registered to the colour image: the flow is supervised
    if stage == "motion":
        x = normalize_images(images)
        init = model.motion.init_poses(x, _identity_like(gt_rel))
        inv = (1.0 / depths[:, :1].clamp_min(1e-3)).expand(B, len(ii), H, W)
        steps = model.motion(images, init, inv, intr, ii, jj, flow_source="learned",
                             gn=cfg.gn.options(fixed_poses=1, optimize_focal=focal))
        return motion_loss(steps, gt_rel, depths, intr, ii, jj, lc, flow=synthetic)
    if stage == "depth":
        return _depth_stage_loss(model, cfg, batch)
    out = model(images, intr, iters=rounds, optimize_focal=focal)
    total = images.new_zeros(())
    parts: dict[str, float] = {}
    learned = cfg.motion.flow_source == "learned"
    for r in range(len(out.poses)):
        ld, pd = depth_loss([d[:, 0] for d in out.depths[r]], depths[:, 0], images[:, 0], lc)
        lm, pm = motion_loss(out.motion[r], gt_rel, depths, intr, ii, jj, lc, flow=synthetic)
        # With DIS flow the motion loss has no trainable input; it is still logged (flow_epe).
        total = total + ld + (lc.motion * lm if learned else 0.0)
        parts = {**pd, **pm}
    return total / len(out.poses), parts


def sequence_keyframes(frames: int, keyframes: int, views: int) -> list[list[int]]:
    """The keyframes of a sequence clip and the frames each is matched against: K = `keyframes`
    keyframes spread evenly over frames 1 .. N-2 (K = 1: frame 0 against all others, the ordinary
    clip), each with its `views` nearest other frames (the earlier first on ties), keyframe first.
    ValueError when the K keyframes would not be distinct (N < K + 2).

    >>> sequence_keyframes(9, 3, 4)
    [[1, 0, 2, 3, 4], [4, 3, 5, 2, 6], [7, 6, 8, 5, 4]]
    """
    if keyframes == 1:
        return [list(range(frames))]
    keys = [int(round(x)) for x in np.linspace(1, frames - 2, keyframes)]
    if len(set(keys)) != keyframes:
        raise ValueError(f"sequence_keyframes: {keyframes} distinct keyframes need at least {keyframes + 2} frames, "
                         f"got {frames}")
    return [[i, *sorted((j for j in range(frames) if j != i), key=lambda j: (abs(j - i), j))[:views]] for i in keys]


def _depth_stage_loss(model: V2D, cfg, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The depth stage (ground-truth poses in): each keyframe of the clip (`sequence_keyframes`) in
    order, with the temporal state handed on and the normal loss when the module has those parts."""
    images, depths, poses, intr = batch["images"], batch["depths"], batch["poses_cw"], batch["intrinsics"]
    B, N, _, H, W = images.shape
    feats = model.depth.features(normalize_images(images).flatten(0, 1)).unflatten(0, (B, N))
    total = images.new_zeros(())
    parts: dict[str, float] = {}
    state, prev_key = None, None
    groups = sequence_keyframes(N, cfg.train.sequence_keyframes, cfg.depth.views)
    for idx in groups:
        i = idx[0]
        previous = None if state is None else Previous.between(state, poses[:, prev_key], poses[:, i])
        res = model.depth.infer(feats[:, idx], poses[:, idx], intr, (H, W), previous)
        loss, parts_k = depth_loss(res.depths, depths[:, i], images[:, i], cfg.loss)
        if res.normals is not None:
            ln, pn = normal_loss(res.normals, res.depths[-1], depths[:, i], intr, cfg.loss)
            loss, parts_k = loss + ln, {**parts_k, **pn}
        total = total + loss
        parts = {k: parts.get(k, 0.0) + v / len(groups) for k, v in parts_k.items()}
        state, prev_key = res.state, i
    return total / len(groups), parts


def _identity_like(poses: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(poses)
    out[..., 6] = 1.0
    return out


def _relative_to_key(poses: torch.Tensor) -> torch.Tensor:
    """World->camera poses re-expressed with the keyframe (frame 0) at the identity. Shapes: (B, N, 7)."""
    return se3_mul(poses, se3_inv(poses[:, :1]))


def plot_metrics(csv_path: str | Path, png_path: str | Path, window: int = 50) -> Path:
    """Loss curves of a run (metrics.csv) as a PNG: per-stage loss, depth L1 and flow EPE (moving means)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(f"{csv_path}: no rows to plot")
    fig = Figure(figsize=(13, 3.6))  # no pyplot: the global backend and figure registry stay untouched
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, ("loss", "depth_l1", "flow_epe"),
                              ("loss", "depth L1 (m)", "induced-flow EPE (px)"), strict=True):
        for stage in ("motion", "depth", "joint"):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r["stage"] == stage and r.get(key)]
            if not pts:
                continue
            x, y = np.array(pts).T
            k = min(window, len(y))
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            (line,) = ax.plot(x[k - 1:], smooth, label=stage)
            ax.plot(x, y, alpha=0.2, lw=0.5, color=line.get_color())
        ax.set_xlabel("step")
        ax.set_title(label)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=90))
    return png_path

"""`v2d train`: train V2D end to end (synthetic clips), with checkpoints and `--resume`.

    v2d train --out runs/small [--resume] [--config FILE] [--set train.steps=2000 ...]
    torchrun --nproc_per_node 2 -m tools.cli train --out runs/ddp     (DDP; gloo on CPU)

Writes to OUT: checkpoint.pt (every train.checkpoint_every steps, atomically), metrics.csv, loss.png,
and at the end model.pt (weights + config, what `v2d run` loads).
"""

from __future__ import annotations

import argparse
import json
import os

from slam.config import RunConfig


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", parents=parents, help="train the networks end to end",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, metrics, model.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--until", type=int, metavar="STEP", help="stop at this step (default: train.steps)")
    p.add_argument("--export", metavar="FILE",
                   help="write the weights (model + config, no optimizer state) to FILE when done; with --resume "
                   "and --until equal to the checkpoint's step this exports a checkpoint without training")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    import torch

    from v2d.config import to_dict
    from v2d.errors import InputError
    from v2d.io.writers import atomic_write
    from v2d.train import Trainer, plot_metrics

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    try:
        trainer = Trainer(cfg, args.out, rank=rank, world_size=world)
        if args.resume:
            if not trainer.checkpoint_path.exists():
                raise InputError(f"--resume: no checkpoint at {trainer.checkpoint_path}")
            trainer.resume()
        rows = trainer.train(until=args.until)
        state = {"model": trainer.model.state_dict(), "step": trainer.step, "config": json.dumps(to_dict(cfg))}
        if rank == 0 and trainer.step >= cfg.train.steps:
            atomic_write(trainer.out / "model.pt", lambda f: torch.save(state, f))
        if rank == 0 and args.export:
            atomic_write(args.export, lambda f: torch.save(state, f))
            print(f"weights of step {trainer.step} written to {args.export}")
        if rank == 0 and rows:
            plot_metrics(trainer.out / "metrics.csv", trainer.out / "loss.png")
            last = rows[-1]
            print(f"step {last['step']} ({last['stage']}): loss {last['loss']:.4f}; outputs in {args.out}/")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0

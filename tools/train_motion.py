"""`v2d train-motion`: train the learned motion update (`v2d.refiner`) through the Gauss-Newton layer.

    v2d train-motion --out runs/motion [--resume] [--until STEP] [--export FILE]
        [--set motion_train.real=[../shared/data/7scenes-redkitchen:0-249] ...]

Writes to OUT: checkpoint.pt (every motion_train.checkpoint_every steps, atomically), metrics.csv
(training losses), val.csv (validation pose errors, DIS mode and refiner), and at the end model.pt:
the model of `model.weights` (the shipped depth module by default) with the trained update, what
`--set model.weights=OUT/model.pt` runs. docs/TRAINING.md has the shipped run.
"""

from __future__ import annotations

import argparse

from slam.config import RunConfig


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train-motion", parents=parents, help="train the learned motion update",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoint, metrics, model.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--until", type=int, metavar="STEP", help="stop at this step (default: motion_train.steps)")
    p.add_argument("--export", metavar="FILE", help="also write the model (as OUT/model.pt) to FILE when done; "
                   "with --resume and --until equal to the checkpoint's step this exports without training")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    from v2d.train_motion import MotionTrainer

    trainer = MotionTrainer(cfg, args.out)
    if args.resume:
        trainer.resume()
    rows = trainer.train(until=args.until)
    if trainer.step >= cfg.motion_train.steps:
        trainer.export(trainer.out / "model.pt")
    if args.export:
        trainer.export(args.export)
        print(f"weights of step {trainer.step} written to {args.export}")
    if rows:
        print(f"step {rows[-1]['step']}: loss {rows[-1]['loss']:.4f}; outputs in {args.out}/")
    return 0

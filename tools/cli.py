"""The `v2d` command: one console script with subcommands.

Each subcommand lives in its own module under tools/ with `add_parser(subparsers)` and
`run(args, cfg) -> int`. `main()` loads the configuration (`--config FILE`, `--set key=value`;
the root `slam.config.RunConfig` for every subcommand, so one file serves them all), dispatches,
and turns every `V2DError` into one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence

from v2d import __version__
from v2d.errors import ConfigError, V2DError

_log = logging.getLogger("v2d")


class _UsageError(ConfigError):
    """A command line argparse rejects (unknown option, missing argument, bad choice)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become one line and exit code 1 (through `main`), not usage + 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _subcommands() -> dict:
    # Imported here, not at module level: `v2d --help` must not import torch-heavy code twice.
    from tools import config_cmd, demo, eval_cmd, refine, run, train, train_motion, vis

    return {"run": run, "refine": refine, "demo": demo, "eval": eval_cmd, "vis": vis, "train": train,
            "train-motion": train_motion, "config": config_cmd}


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", action="append",
        help="YAML file overriding the defaults (see configs/); repeatable, later files win (e.g. a size preset "
        "then a dataset config)",
    )
    common.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="override one config value, e.g. --set gn.iterations=3 (repeatable; applied after --config)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")

    parser = _Parser(
        prog="v2d",
        description="Differentiable structure from motion and SLAM (DeepV2D line): video in, "
        "camera trajectory, depth maps and a point cloud out.",
    )
    parser.add_argument("--version", action="version", version=f"v2d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for module in _subcommands().values():
        module.add_parser(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from slam.config import RunConfig
    from v2d.config import load_config

    try:
        cfg = load_config(args.config, args.overrides, root=RunConfig)
        return int(args.handler(args, cfg))
    except V2DError as exc:
        print(f"v2d {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"v2d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

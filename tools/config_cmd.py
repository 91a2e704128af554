"""`v2d config`: print the resolved configuration (defaults + --config + --set) as YAML."""

from __future__ import annotations

import argparse

import yaml

from slam.config import RunConfig
from v2d.config import to_dict


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", parents=parents, help="print the resolved configuration as YAML",
                       description=__doc__)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0

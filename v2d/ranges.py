"""Value ranges of configuration fields: what config classes declare theirs with.

Types are checked from a config class's annotations; which values of the right type make sense,
and how its fields must relate, the class declares beside its fields:

    @dataclass(frozen=True)
    class DepthConfig:
        min_depth: float = 0.2
        max_depth: float = 10.0
        hypotheses: int = 32

        RANGES: ClassVar[Ranges] = {"min_depth": POSITIVE, "max_depth": POSITIVE, "hypotheses": at_least(2)}
        RELATIONS: ClassVar[Relations] = (
            Relation(lambda c: c.min_depth < c.max_depth, "min_depth must be smaller than max_depth"),
        )

`v2d.config.validate` checks them after every load (ConfigError naming the dotted key). This module
imports nothing from v2d, so any module defining a config class can use it, including the ones
`v2d.config` imports to assemble the root.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["IMAGE_SIZE", "NON_NEGATIVE", "POSITIVE", "Range", "Ranges", "Relation", "Relations", "at_least", "one_of"]


@dataclass(frozen=True)
class Range:
    """The values a field accepts: `ok(value)`; `expected` completes "key: expected ..." in errors."""

    ok: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True)
class Relation:
    """A condition on several fields of one section: `ok(section)`, else ConfigError with `message`."""

    ok: Callable[[Any], bool]
    message: str


Ranges = Mapping[str, Range]  # field name -> its range
Relations = tuple[Relation, ...]


def at_least(n: float) -> Range:
    return Range(lambda v: v >= n, f"a value >= {n}")


def one_of(*values: Any) -> Range:
    names = [repr(v) for v in values]
    return Range(lambda v: v in values, f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0])


POSITIVE = Range(lambda v: v > 0, "a positive value")
NON_NEGATIVE = Range(lambda v: v >= 0, "a value >= 0")
IMAGE_SIZE = Range(lambda v: v >= 32 and v % 4 == 0, "a multiple of 4, >= 32")  # pixels, as the networks need

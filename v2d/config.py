"""The one configuration system of v2d.

Typed defaults live in code as frozen dataclasses; a YAML file (`--config FILE`) overrides some of
them and `--set section.key=value` overrides override the file. Unknown or duplicate keys, wrong
types, values out of range and malformed overrides raise `ConfigError` naming the dotted key. The
result is frozen and passed explicitly: nothing reads a global config.

    cfg = load_config("configs/default.yaml", ["gn.iterations=3"])
    cfg.gn.iterations  # 3

This module holds the machinery (`load_config`, `merge`, `validate`, `to_dict`, strict YAML) and
the root of the model's configuration, `V2DConfig` (networks, Gauss-Newton, training). Each section
is defined beside the code it configures, with its value ranges (`v2d.ranges`). Layers above
extend the root with their own sections and load that: `slam.config.RunConfig` adds `slam` and
`demo`, and is what the `v2d` command loads.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from v2d.data.clips import ClipConfig
from v2d.depth import DepthConfig
from v2d.errors import ConfigError
from v2d.losses import LossConfig
from v2d.model import ModelConfig
from v2d.motion import GNConfig, MotionConfig
from v2d.ranges import IMAGE_SIZE, Ranges
from v2d.train import TrainConfig
from v2d.train_motion import MotionTrainConfig

__all__ = ["V2DConfig", "DataConfig", "load_config", "merge", "to_dict", "validate"]


@dataclass(frozen=True)
class DataConfig:
    """Input images (the `data` section): the size frames are resized to before the networks.

    Attributes:
        height, width: network input size in pixels (multiples of 4; intrinsics are scaled to it).
    """

    height: int = 240
    width: int = 320

    RANGES: ClassVar[Ranges] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


@dataclass(frozen=True)
class V2DConfig:
    """Root of the model's configuration; each field is one section."""

    gn: GNConfig = field(default_factory=GNConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    motion_train: MotionTrainConfig = field(default_factory=MotionTrainConfig)


Root = TypeVar("Root", bound=V2DConfig)


def validate(cfg: Any, prefix: str = "") -> None:
    """Check the dataclass tree `cfg` against each class's declared `RANGES` and `RELATIONS`
    (`v2d.ranges`); ConfigError names the key (or the section, for a relation)."""
    ranges = getattr(type(cfg), "RANGES", {})
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        check = ranges.get(f.name)
        if check is not None and not check.ok(value):
            raise ConfigError(f"{key}: expected {check.expected}, got {value!r}")
    for relation in getattr(type(cfg), "RELATIONS", ()):
        if not relation.ok(cfg):
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {relation.message}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain nested dicts (for summary.json and YAML dumps)."""
    return dataclasses.asdict(cfg)


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return merge(tp(), value, prefix=key + ".")
    # bool is a subclass of int: refuse True for an int field and 1 for a bool field.
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as text; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # a bug in a config class, not user input


def merge(cfg: Any, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Return a copy of the frozen dataclass `cfg` with nested `values` applied (strict keys/types)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + str(k) for k in unknown)}"
            f" (valid keys in {prefix.rstrip('.') or 'the root'}: {', '.join(sorted(names))})"
        )
    changes = {}
    for k, v in values.items():
        current = getattr(cfg, k)
        if dataclasses.is_dataclass(current) and isinstance(v, Mapping):
            changes[k] = merge(current, v, prefix + k + ".")
        else:
            changes[k] = _check_value(prefix + k, v, hints[k])
    return dataclasses.replace(cfg, **changes)


def _parse_override(text: str) -> dict[str, Any]:
    """'a.b=3' -> {'a': {'b': 3}}; the value is parsed as YAML (numbers, true/false, lists)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: expected key=value (e.g. gn.iterations=3), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping reports unhashable keys itself
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(
    path: str | Path | Iterable[str | Path] | None = None, overrides: Iterable[str] = (), *,
    root: type[Root] = V2DConfig,
) -> Root:
    """Defaults of `root`, then the YAML file(s) at `path` in order, then `key=value` overrides, validated.

    Several files compose: e.g. a size preset then a dataset config (`configs/full.yaml`,
    `configs/kitti.yaml`); later files override earlier ones key by key. `root` is the root class:
    `V2DConfig` (the model's sections) or a subclass with more sections (`slam.config.RunConfig`,
    which the files in configs/ may need: a section the root does not have is an unknown key).
    """
    cfg = root()
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if data is not None:
            if not isinstance(data, Mapping):
                raise ConfigError(f"config file {path}: expected a mapping at the top, got {type(data).__name__}")
            cfg = merge(cfg, data)
    for text in overrides:
        cfg = merge(cfg, _parse_override(text))
    validate(cfg)
    return cfg

"""The one configuration system of v2d.

Typed defaults live in code as frozen dataclasses; a YAML file (`--config FILE`) overrides some of
them and `--set section.key=value` overrides override the file. Unknown or duplicate keys, wrong
types, values out of range and malformed overrides raise `ConfigError` naming the dotted key. The
result is frozen and passed explicitly: nothing reads a global config.

    cfg = load_config("configs/default.yaml", ["gn.iterations=3"])
    cfg.gn.iterations  # 3

Each section is defined beside the code it configures, with its value ranges (`v2d.ranges`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from v2d.data.clips import ClipConfig
from v2d.depth import DepthConfig
from v2d.errors import ConfigError
from v2d.losses import LossConfig
from v2d.model import ModelConfig
from v2d.motion import GNConfig, MotionConfig
from v2d.ranges import IMAGE_SIZE, NON_NEGATIVE, POSITIVE, Ranges, Relation, Relations, at_least
from v2d.train import TrainConfig

__all__ = ["V2DConfig", "DataConfig", "SlamConfig", "DemoConfig", "load_config", "merge", "to_dict", "validate"]


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
class SlamConfig:
    """Settings of the SLAM front end (the `slam` section; `slam.frontend`).

    Pixel quantities are given for 320-pixel-wide frames and scale with the network input width
    (`data.width`), so one configuration serves every input size.

    Attributes:
        init_frames: frames in the initialisation set (the first keyframe plus neighbours).
        init_rate: input frames between consecutive initialisation frames.
        keyframe_flow: mean flow (px) the keyframe's depth induces in the tracked frame at which the
            frame becomes a new keyframe (a scale-free pose distance: baseline over depth, rotation).
        min_confidence: mean flow confidence over the keyframe's visible pixels below which tracking
            quality has dropped: the previous frame becomes a keyframe and the frame is tracked
            again against it (a poorly tracked frame never becomes a keyframe itself).
        min_overlap: fraction of the keyframe's pixels visible in the frame below which tracking
            quality has dropped (as for min_confidence).
        promote_flow: fraction of keyframe_flow the induced flow must reach before a quality drop
            promotes the previous frame to keyframe.
        min_keyframe_gap: frames between a keyframe and a frame promoted after a quality drop (a
            long hard stretch must not make every other frame a keyframe).
        window: keyframes in the local window optimised together (10: with the window's dense
            depth a longer window carries the scale further; 7-Scenes at f = 545, measured with the
            alternating depth refinement: 4 / 8 / 10 / 12 keyframes 6.88 / 5.83 / 5.35 / 5.22 cm).
        window_fixed: oldest window poses held fixed (gauge).
        window_frames: frames between the last two keyframes optimised with the window.
        window_iterations: Gauss-Newton steps of the window optimisation.
        edge_max_flow: window edges whose predicted mean flow exceeds this (px) are left out (wide
            baselines make classical flow unreliable).
        robust_scale: Cauchy scale (px) of the flow residual used to re-weight DIS targets.
        depth_views: frames besides the keyframe in a keyframe's cost volume.
        scale_lock: rescale each keyframe depth from the depth module (median ratio) to agree with
            the other window keyframes' depth splatted into it, so the map keeps one scale (7-Scenes
            ATE 10.0 vs 13.6 cm calibrated, 10.9 vs 17.5 cm uncalibrated; depth AbsRel 0.203 vs
            0.190: the network's own scale is noisier than the chained one but less biased).
        fuse_tolerance: average each keyframe depth from the depth module, in inverse depth, with
            the window keyframes' depth splatted into it where they agree within this relative
            tolerance (0 = off; fewer noisy depths, less biased tracking).
        depth_timing: "immediate": the depth module computes a keyframe's depth when it is added
            (from the frames before it); "both": and again when the next keyframe is added (frames
            on both sides; more accurate, slower: measured on 7-Scenes 12.1 vs 13.6 cm ATE at 4.4
            vs 5.7 frames/s). Tracking against the splatted depth alone until the next keyframe
            ("delayed") was measured too and drifts badly (53 cm), so it is not offered.
        ba_iterations: joint Gauss-Newton steps over the window keyframes' poses and per-pixel
            inverse depths after the depth module (a dense bundle adjustment, the pixels eliminated
            by the Schur complement, `v2d.geometry.window_ba`); 0 = off. Only with
            `motion.flow_source: dis` (its targets are DIS flow). 7-Scenes, dataset K: 8.2 -> 3.9 cm
            ATE; 1 / 2 / 3 steps 3.97 / 3.86 / 3.89 cm.
        ba_prior: relative standard deviation of the depth module's inverse depth, the prior the
            adjustment is pulled towards (against one pixel of flow residual).
        ba_stride: adjust every n-th pixel's depth and carry the relative change to the others
            (bilinear); 2 costs a quarter.
        buffer_frames: most recent frames whose images are kept for cost volumes (memory bound).
        lost_confidence, lost_overlap: tracking is lost below this mean confidence or overlap.
        lost_residual: tracking is lost above this confidence-weighted RMS flow residual (px).
        relocalise_after: frames lost in a row before re-initialising at the current frame.
        static_flow: frames whose flow w.r.t. the previous frame is below this (px) are static.
        static_run: static frames in a row that make a warning (so does half the video).
        min_texture: mean image gradient (grey levels per pixel) below which a frame is textureless.
        cloud_stride: pixel stride of the fused point cloud.
        cloud_neighbours: keyframes on each side a point is checked against.
        cloud_tolerance: relative depth disagreement still counted as consistent.
        cloud_min_views: consistent neighbours a point needs to be kept.
        cloud_voxel: voxel size of the cloud's downsampling (scene units); 0 = automatic, the
            footprint of one cloud pixel at the median keyframe depth (overlapping keyframes then
            add no duplicate points, and the cloud's memory follows the scene, not the video).
    """

    init_frames: int = 5
    init_rate: int = 2
    keyframe_flow: float = 16.0
    min_confidence: float = 0.3
    min_overlap: float = 0.6
    promote_flow: float = 0.25
    min_keyframe_gap: int = 3
    window: int = 10
    window_fixed: int = 1
    window_frames: int = 2
    window_iterations: int = 4
    edge_max_flow: float = 40.0
    robust_scale: float = 2.0
    depth_views: int = 4
    scale_lock: bool = True
    fuse_tolerance: float = 0.5
    depth_timing: Literal["immediate", "both"] = "immediate"
    ba_iterations: int = 2
    ba_prior: float = 0.3
    ba_stride: int = 2
    buffer_frames: int = 48
    lost_confidence: float = 0.1
    lost_overlap: float = 0.15
    lost_residual: float = 6.0
    relocalise_after: int = 8
    static_flow: float = 0.3
    static_run: int = 10
    min_texture: float = 2.0
    cloud_stride: int = 2
    cloud_neighbours: int = 2
    cloud_tolerance: float = 0.05
    cloud_min_views: int = 1
    cloud_voxel: float = 0.0

    RANGES: ClassVar[Ranges] = {
        "init_frames": at_least(2),
        "init_rate": at_least(1),
        "keyframe_flow": POSITIVE,
        "min_confidence": NON_NEGATIVE,
        "min_overlap": NON_NEGATIVE,
        "promote_flow": NON_NEGATIVE,
        "min_keyframe_gap": at_least(1),
        "window": at_least(2),
        "window_fixed": at_least(1),
        "window_frames": NON_NEGATIVE,
        "window_iterations": at_least(1),
        "edge_max_flow": POSITIVE,
        "robust_scale": POSITIVE,
        "depth_views": at_least(1),
        "fuse_tolerance": NON_NEGATIVE,
        "ba_iterations": NON_NEGATIVE,
        "ba_prior": POSITIVE,
        "ba_stride": at_least(1),
        "buffer_frames": at_least(2),
        "lost_confidence": NON_NEGATIVE,
        "lost_overlap": NON_NEGATIVE,
        "lost_residual": POSITIVE,
        "relocalise_after": at_least(1),
        "static_flow": NON_NEGATIVE,
        "static_run": at_least(1),
        "min_texture": NON_NEGATIVE,
        "cloud_stride": at_least(1),
        "cloud_neighbours": at_least(1),
        "cloud_tolerance": POSITIVE,
        "cloud_min_views": NON_NEGATIVE,
        "cloud_voxel": NON_NEGATIVE,
    }
    RELATIONS: ClassVar[Relations] = (
        Relation(lambda c: c.window_fixed < c.window, "window_fixed must be smaller than window"),
        Relation(lambda c: c.lost_confidence <= c.min_confidence and c.lost_overlap <= c.min_overlap,
                 "the lost_* thresholds must not exceed the keyframe thresholds min_confidence / min_overlap"),
    )


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `v2d demo` (the embedded synthetic sequence).

    Attributes:
        seed: scene and trajectory seed.
        num_frames: frames given to SLAM.
        stride: rendered frames between consecutive SLAM frames (30 fps hand-held motion).
        height, width: image size in pixels (multiples of 4).
    """

    seed: int = 0
    num_frames: int = 60
    stride: int = 2
    height: int = 240
    width: int = 320

    RANGES: ClassVar[Ranges] = {
        "seed": NON_NEGATIVE,
        "num_frames": at_least(2),
        "stride": at_least(1),
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
    }


@dataclass(frozen=True)
class V2DConfig:
    """Root of the configuration; each field is one section."""

    gn: GNConfig = field(default_factory=GNConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    slam: SlamConfig = field(default_factory=SlamConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


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
    path: str | Path | Iterable[str | Path] | None = None, overrides: Iterable[str] = ()
) -> V2DConfig:
    """Defaults, then the YAML file(s) at `path` in order, then `key=value` overrides, validated.

    Several files compose: e.g. a size preset then a dataset config (`configs/full.yaml`,
    `configs/kitti.yaml`); later files override earlier ones key by key.
    """
    cfg = V2DConfig()
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

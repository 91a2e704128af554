"""The config system: typed defaults, strict YAML and --set overrides, frozen result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slam.config import RunConfig
from v2d.config import V2DConfig, load_config, to_dict
from v2d.errors import ConfigError
from v2d.geometry.gauss_newton import GNOptions
from v2d.motion import GNConfig

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_spells_out_the_code_defaults():
    assert load_config(ROOT / "configs" / "default.yaml", root=RunConfig) == RunConfig()


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path, root=RunConfig)


def test_run_config_is_the_model_config_plus_slam_demo_and_refine():
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert names == [f.name for f in dataclasses.fields(V2DConfig)] + ["slam", "demo", "refine"]
    assert isinstance(RunConfig(), V2DConfig)


def test_the_model_root_has_no_slam_sections():
    assert load_config(ROOT / "configs" / "small.yaml") == V2DConfig()
    with pytest.raises(ConfigError, match=r"unknown config key slam \(valid keys in the root: clips, "):
        load_config(None, ["slam.window=4"])
    with pytest.raises(ConfigError, match="unknown config keys demo, refine, slam"):
        load_config(ROOT / "configs" / "default.yaml")


def _sections(cls: type) -> list[type]:
    """`cls` and every config class below it."""
    nested = [f.default_factory for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING]
    return [cls] + [c for n in nested for c in _sections(n)]


def test_every_declared_range_names_a_field():
    classes = _sections(RunConfig)
    assert GNConfig in classes and len(classes) >= 11
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(getattr(cls, "RANGES", {})) <= names, cls.__name__


def test_gn_options_are_the_section_plus_the_decisions_of_the_call():
    # the section's one default that differs from the layer's: inference stops at convergence
    assert GNConfig().options(fixed_poses=1, optimize_focal=False) == dataclasses.replace(GNOptions(), tolerance=1e-6)
    cfg = load_config(None, ["gn.iterations=7", "gn.min_depth=0.5", "gn.tolerance=0"])
    opts = cfg.gn.options(fixed_poses=3, optimize_focal=True)
    got = (opts.iterations, opts.min_depth, opts.fixed_poses, opts.optimize_focal, opts.tolerance)
    assert got == (7, 0.5, 3, True, 0)
    with pytest.raises(TypeError):
        cfg.gn.options(3, True)  # type: ignore[misc]  # keywords only: the call site says what it decides


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gn:\n  iterations: 4\n  damping: 1e-3\n")
    cfg = load_config(f, ["gn.iterations=7", "demo.num_frames=3"], root=RunConfig)
    assert cfg.gn.iterations == 7 and cfg.gn.damping == 1e-3 and cfg.demo.num_frames == 3
    assert cfg.gn.max_rotation_step == V2DConfig().gn.max_rotation_step
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gn.iterations = 1  # type: ignore[misc]


def test_int_is_accepted_for_float_fields_and_converted():
    cfg = load_config(None, ["gn.damping=1"])
    assert cfg.gn.damping == 1.0 and isinstance(cfg.gn.damping, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("gn.iteratons=3", r"unknown config key gn.iteratons \(valid keys in gn: .*iterations"),
        ("nope.x=1", "unknown config key nope"),
        ("gn.iterations=2.5", "gn.iterations: expected an integer, got float 2.5"),
        ("gn.iterations=true", "gn.iterations: expected an integer, got bool True"),
        ("train.optimize_focal=1", "train.optimize_focal: expected true/false, got int 1"),
        ("gn.optimize_focal=true", "unknown config key gn.optimize_focal"),  # per call: GNConfig.options
        ("gn.fixed_poses=1", "unknown config key gn.fixed_poses"),
        ("motion.min_depth=0.1", "unknown config key motion.min_depth"),  # one min_depth: gn.min_depth
        ("gn.damping=abc", "gn.damping: expected a number, got str 'abc'"),
        ("gn=3", "gn: expected a mapping"),
        ("gn.iterations", "--set: expected key=value"),
        ("=3", "--set: expected key=value"),
        ("gn..x=3", "--set: expected key=value"),
        ("gn.iterations=0", r"gn.iterations: expected a value >= 1, got 0"),
        ("gn.damping=-1e-3", r"gn.damping: expected a value >= 0, got -0.001"),
        ("gn.min_depth=0", r"gn.min_depth: expected a positive value, got 0.0"),
        ("gn.damping=.nan", r"gn.damping: expected a finite number, got nan"),
        ("gn.max_rotation_step=.inf", r"gn.max_rotation_step: expected a finite number, got inf"),
        ("demo.num_frames=1", r"demo.num_frames: expected a value >= 2, got 1"),
        ("demo.width=322", r"demo.width: expected a multiple of 4, >= 32, got 322"),
        ("depth.min_depth=11", r"depth: min_depth must be smaller than max_depth"),
        ("depth.reduce_kernel=2", r"depth.reduce_kernel: expected 1, 3 or 5, got 2"),
        ("clips.keyframe=last", r"clips.keyframe: expected 'first' or 'middle', got 'last'"),
        ("motion.dis.fb_max=0", r"motion.dis.fb_max: expected a positive value, got 0.0"),
        ("slam.window=1", r"slam.window: expected a value >= 2, got 1"),
        ("slam.window_fixed=10", r"slam: window_fixed must be smaller than window"),
        ("slam.lost_overlap=0.9", r"slam: the lost_\* thresholds must not exceed"),
        ("slam.depth_timing=later", r"slam.depth_timing: expected one of \['immediate', 'both'\], got 'later'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], root=RunConfig)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gn: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top"):
        load_config(top)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("gn:\n  damping: 1.0\n  dampign: 2.0\n")
    with pytest.raises(ConfigError, match="unknown config key gn.dampign"):
        load_config(unknown)
    twice = tmp_path / "twice.yaml"
    twice.write_text("gn:\n  damping: 1.0\n  iterations: 3\n  damping: 2.0\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: duplicate key 'damping' \(line 4\)"):
        load_config(twice)
    numeric = tmp_path / "numeric.yaml"
    numeric.write_text("gn:\n  1: 2\n  damping: 1.0\n")
    with pytest.raises(ConfigError, match="unknown config key gn.1"):
        load_config(numeric)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("gn:\n  damping: 1.0 # d\xe9faut\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml is not UTF-8 text"):
        load_config(latin)


def test_to_dict_round_trips():
    cfg = load_config(None, ["gn.iterations=5"])
    assert to_dict(cfg)["gn"]["iterations"] == 5

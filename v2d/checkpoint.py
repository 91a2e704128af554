"""Reading the weights and checkpoint files `v2d.train` writes (torch.load with weights_only=True).

A file is a dict with a "model" state dict; a training checkpoint adds "optimizer", "rng", "step"
and "config". `v2d.model.load_model` loads weights with it; the trainers (`v2d.train`,
`v2d.train_motion`) write and resume theirs with `save_training` and `resume_training`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from v2d.errors import InputError
from v2d.io.writers import atomic_write

_log = logging.getLogger(__name__)

__all__ = ["load_model_state", "load_weights", "read_checkpoint", "resume_training", "save_training"]


def load_weights(path: str | Path, model: torch.nn.Module, fine_tune: bool = False) -> dict[str, Any]:
    """Load model weights from a checkpoint or a weights file.

    Parts a module declares optional (`OPTIONAL_PREFIXES`: identity at initialisation) may be absent
    (a warning names the switch); with `fine_tune` (a trainer's starting point) so may the parts it
    declares new (`FINE_TUNE_PREFIXES`), which then keep their initialisation. The weights of a
    switchable part (`PART_SWITCHES`) that the model's configuration leaves out are ignored. Returns the file's metadata
    (everything but the tensors). Raises InputError for a missing, corrupt or mismatching file.
    """
    data = read_checkpoint(path)
    load_model_state(path, data, model, fine_tune)
    return {k: v for k, v in data.items() if k not in ("model", "optimizer", "rng")}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a v2d weights/checkpoint file; InputError when it is not one."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"weights file not found: {path}") from None
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise InputError(f"cannot load weights from {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict) or "model" not in data:
        raise InputError(f"{path}: not a v2d checkpoint or weights file (no 'model' entry)")
    return data


def load_model_state(path: str | Path, data: dict[str, Any], model: torch.nn.Module, fine_tune: bool = False
                     ) -> None:
    """Load `data["model"]` (read from `path`) into `model`; InputError when it does not fit
    (`load_weights` says which parts may be absent)."""
    try:
        missing, unexpected = model.load_state_dict(data["model"], strict=False)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit this model configuration: {str(exc).splitlines()[0]}") from None
    optional = _optional_prefixes(model, "OPTIONAL_PREFIXES") + (
        _optional_prefixes(model, "FINE_TUNE_PREFIXES") if fine_tune else ())
    switches = _part_switches(model)
    absent = sorted({s for k in missing for p, s in switches.items() if k.startswith(p)})
    missing = [k for k in missing if not k.startswith(optional)]
    # A trained optional part that this configuration switches off is not used: its weights are left
    # aside (one weights file serves both settings of the switch).
    unexpected = [k for k in unexpected if not k.startswith(tuple(switches))]
    if missing or unexpected:
        parts = sorted({s for k in missing for p, s in switches.items() if k.startswith(p)})
        if parts:
            raise InputError(f"{path}: these weights have no trained part for {', '.join(parts)}; set it to false "
                             "or give weights trained with it (docs/TRAINING.md)")
        what = (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") + (
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise InputError(f"{path}: weights do not fit this model configuration ({what})")
    if absent and not fine_tune:
        _log.warning("%s: these weights have no trained part for %s; it starts as the identity (no effect)", path,
                     ", ".join(absent))


def _optional_prefixes(model: torch.nn.Module, attribute: str) -> tuple[str, ...]:
    """Parameter-name prefixes that each submodule lists in `attribute`, made absolute."""
    return tuple(f"{name}.{p}" if name else p for name, m in model.named_modules()
                 for p in getattr(m, attribute, ()))


def _part_switches(model: torch.nn.Module) -> dict[str, str]:
    """Absolute parameter-name prefix -> config switch of each optional part (`PART_SWITCHES`)."""
    return {f"{name}.{p}" if name else p: s for name, m in model.named_modules()
            for p, s in getattr(m, "PART_SWITCHES", {}).items()}


def _rng_state() -> dict[str, Any]:
    """torch, NumPy and Python RNG states as tensors and lists (what weights_only loading accepts)."""
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [list(py[1]), py[0], py[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[1], tuple(p[0]), p[2]))


def save_training(path: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
                  **extra: Any) -> Path:
    """Write a resumable training checkpoint atomically: the model, optimizer and RNG states, the step,
    the configuration (a dataclass, as JSON) and `extra` entries (plain values or tensors)."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
             "config": json.dumps(dataclasses.asdict(cfg)), **extra}
    return atomic_write(Path(path), lambda f: torch.save(state, f))


def resume_training(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what `save_training` wrote into `model` and `optimizer`, and the RNG states; returns
    the file's contents (its "step" and extra entries). InputError when the file is missing, is not
    a training checkpoint (weights only) or does not fit the model."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--resume: no checkpoint at {path}")
    data = read_checkpoint(path)  # read once: model, optimizer and RNG come from the same file
    if "optimizer" not in data or "rng" not in data:
        raise InputError(f"{path}: holds weights only, not a resumable training checkpoint")
    load_model_state(path, data, model)
    optimizer.load_state_dict(data["optimizer"])
    _set_rng_state(data["rng"])
    return data

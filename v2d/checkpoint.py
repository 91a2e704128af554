"""Reading the weights and checkpoint files `v2d.train` writes (torch.load with weights_only=True).

A file is a dict with a "model" state dict; a training checkpoint adds "optimizer", "rng", "step"
and "config". `v2d.model.load_model` loads weights with it, `v2d.train.Trainer` resumes with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from v2d.errors import InputError

__all__ = ["load_model_state", "load_weights", "read_checkpoint"]


def load_weights(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load model weights from a checkpoint or a weights file.

    Returns the file's metadata (everything but the tensors). Raises InputError for a missing,
    corrupt or mismatching file.
    """
    data = read_checkpoint(path)
    load_model_state(path, data, model)
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


def load_model_state(path: str | Path, data: dict[str, Any], model: torch.nn.Module) -> None:
    """Load `data["model"]` (read from `path`) into `model`; InputError when it does not fit."""
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit this model configuration: {str(exc).splitlines()[0]}") from None

"""The one error hierarchy of v2d.

Every error a user can cause (bad input, bad configuration, missing files) is a `V2DError`
subclass whose message quotes what was received. The CLI turns these into one line and exit code 1;
anything else is a bug and keeps its traceback. `V2DError`, `ShapeError` and `NumericalError` are defined in
`kernels.errors` (the lowest layer, which validates arguments too) and re-exported here.
"""

from kernels.errors import NumericalError, ShapeError, V2DError

__all__ = ["ConfigError", "InputError", "NumericalError", "RenderError", "ShapeError", "V2DError"]


class ConfigError(V2DError):
    """Unknown configuration key, wrong type, or malformed override."""


class InputError(V2DError):
    """Input data (files, videos, intrinsics) is missing, unreadable or inconsistent."""


class RenderError(V2DError):
    """Open3D could not open a window or an offscreen rendering context (no display and no EGL, say)."""

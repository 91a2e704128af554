"""Root of v2d's error hierarchy.

It lives here, in the lowest layer, because the kernels validate their arguments too and may not
import `v2d` (dependency direction: kernels <- v2d.geometry <- v2d). `v2d.errors` re-exports these
classes and adds the rest of the hierarchy; user code should import from `v2d.errors`.
"""


class V2DError(Exception):
    """Base class of all errors v2d raises on purpose."""


class ShapeError(V2DError, ValueError):
    """A tensor argument has the wrong shape, dtype, device or layout, or values outside its domain."""


class NumericalError(V2DError, ValueError):
    """NaN/Inf in the input or a numerical failure that cannot be recovered from."""

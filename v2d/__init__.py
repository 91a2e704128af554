"""v2d: differentiable structure from motion and SLAM (DeepV2D line) in PyTorch."""

from v2d.errors import ConfigError, InputError, NumericalError, ShapeError, V2DError

__version__ = "0.1.0"

__all__ = ["ConfigError", "InputError", "NumericalError", "ShapeError", "V2DError", "__version__"]

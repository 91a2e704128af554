"""Data sources of v2d: the project's own synthetic scenes (more readers follow with training)."""

from v2d.data.synthetic import SyntheticSequence, render_sequence

__all__ = ["SyntheticSequence", "render_sequence"]

"""Data sources of v2d: the project's own synthetic scenes and their hard cases (more readers follow
with training)."""

from v2d.data.scenarios import SCENARIOS, Scenario, render_scenario
from v2d.data.synthetic import SyntheticSequence, render_sequence

__all__ = ["SCENARIOS", "Scenario", "SyntheticSequence", "render_scenario", "render_sequence"]

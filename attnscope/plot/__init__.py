"""Figures of captured attention and its statistics; every function returns a ``matplotlib.figure.Figure``.

Figures are built without pyplot's global state, so they work on any backend (Agg included) and are
shown by Jupyter when returned (with ``%matplotlib inline``). See docs/analysis-plots.md.
"""

from ._heatmaps import heatmaps, site_step_grid
from ._lines import convergence, dominance_lines
from ._violins import violins

__all__ = ["convergence", "dominance_lines", "heatmaps", "site_step_grid", "violins"]

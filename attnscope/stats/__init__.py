"""Attention-dominance statistics (DESIGN §5): ``ats.stats.dominance``, ``ats.stats.convergence`` and
``ats.stats.suggest_gate_step``.

>>> import attnscope as ats
>>> ats.stats.dominance, ats.stats.convergence  # doctest: +ELLIPSIS
(<function dominance at ...>, <function convergence at ...>)
"""

from .dominance_dataset import dominance
from .formulas import argmax_coverage, dominance_ratio, entropy, gini, map_sums, mass_share, sink_share, target_share
from .report import convergence_table, dominance_json, dominance_table
from .step_convergence import convergence, stable_step, suggest_gate_step

__all__ = ["argmax_coverage", "convergence", "convergence_table", "dominance", "dominance_json", "dominance_ratio", "dominance_table", "entropy", "gini", "map_sums",
           "mass_share", "sink_share", "stable_step", "suggest_gate_step", "target_share"]

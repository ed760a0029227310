"""Figures of captured attention and its statistics; every function returns a ``matplotlib.figure.Figure``
(``word_maps``: the numbers a heat map draws, as a DataArray; ``report``: a self-contained HTML file of them all,
see docs/report.md; ``view``: the Jupyter viewer, docs/viewer.md).

Figures are built without pyplot's global state, so they work on any backend (Agg included) and are
shown by Jupyter when returned (with ``%matplotlib inline``). See docs/analysis-plots.md.
matplotlib (and seaborn, for the violins) load on first use of a figure function, not with
``import attnscope``.

>>> import attnscope as ats
>>> sorted(ats.plot.__all__)
['TraceViewer', 'comparison', 'convergence', 'dominance_lines', 'heatmaps', 'report', 'report_words', 'site_step_grid', 'view', 'violins', 'word_maps']
"""

from .._lazy import lazy_exports

__all__ = ["TraceViewer", "comparison", "convergence", "dominance_lines", "heatmaps", "report", "report_words", "site_step_grid",
           "view", "violins", "word_maps"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "comparison": "._compare", "convergence": "._lines", "dominance_lines": "._lines", "heatmaps": "._heatmaps",
    "report": "._report", "report_words": "._report", "site_step_grid": "._heatmaps", "violins": "._violins",
    "word_maps": "._heatmaps", "view": "._view", "TraceViewer": "._view",
}, globals())

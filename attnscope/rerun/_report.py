"""``ats.report``: the HTML report of a trace, compared with another trace when given (``attnscope report``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..store import Trace, as_trace
from ._compare import Comparison
from ._compare import compare as compare_runs

__all__ = ["report"]


def report(trace: Trace | str | Path, path: str | os.PathLike = "report.html", *,
           compare: Trace | str | Path | Comparison | None = None, words: Sequence[str | int] | str | None = None,
           sites: str | Sequence[str] | None = None, sample: int = 0, tol: float = 0.05,
           overwrite: bool = False) -> Path:
    """Write one self-contained HTML file about a trace — manifest, image, heat maps per word with a step slider,
    the step × site grid, dominance, convergence — and, with ``compare``, a before/after section.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> d = tempfile.mkdtemp()
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=d + "/a.zarr", num_inference_steps=3)
    >>> reg = ats.rerun(tr, [ats.regulate.AttentionRegulation(["circle", "square"])], store=d + "/reg.zarr")
    >>> path = ats.report(tr, d + "/report.html", compare=reg)
    >>> path.name, path.stat().st_size < 2_000_000
    ('report.html', True)

    The images are PNGs inlined as ``data:`` URIs and the page loads nothing from the network: it opens
    offline in any browser and can be shared as one file (docs/report.md). The same as
    :func:`attnscope.plot.report`, except that ``compare`` may be the other trace itself.

    Parameters
    ----------
    trace : Trace or path
        The trace to report on; an incomplete one is reported with a note at the top.
    path : str or path-like
        The ``.html`` file to write (not a directory); an existing file is an error unless ``overwrite``.
    compare : Trace, path or Comparison, optional
        Another run of the same generation (typically :func:`attnscope.rerun` of ``trace`` with
        interventions): compared with ``ats.compare(trace, compare, words, sites=sites)``. A trace of
        another prompt or image size is an error, and so is a Comparison of such runs.
    words : str, int or sequence of them, optional
        Words or phrases to draw and measure (also the compared targets); one given twice counts once. Default: the prompt's phrases
        between stop-words (:func:`attnscope.plot.report_words`; a shapes prompt's object phrases).
    sites : str or sequence of str, optional
        Site names or globs (default all).
    sample : int
        Which generated image the figures show.
    tol : float
        Tolerance of the suggested TGATE gate step of the convergence section.
    overwrite : bool
        Replace an existing file at ``path``.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    from .. import plot  # matplotlib loads with the first report, not with ``import attnscope``

    tr = as_trace(trace, "trace")
    if compare is not None and not isinstance(compare, Comparison):  # a Comparison is checked by plot.report
        targets = words if words is not None else plot.report_words(tr, sample)
        compare = compare_runs(tr, as_trace(compare, "compare"), targets, sites=sites)
    return plot.report(tr, path, compare=compare, words=words, sites=sites, sample=sample, tol=tol, overwrite=overwrite)

"""``compare``: the dominance statistics of two runs of one generation and their difference (``Comparison``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..selection import run_steps, select_site_names, select_steps, step_ranges
from ..stats import dominance
from ..store import Trace, as_trace, check_same_generation, check_same_schedule
from ..tokens import target_list, token_words

__all__ = ["Comparison", "compare"]

_STAT_DIMS = ("step", "site", "sample", "token", "target")


@dataclass
class Comparison:
    """Before/after dominance statistics of two runs of one generation; made by :func:`compare`.

    Attributes
    ----------
    a, b : Trace
        The run before (usually the parent) and after (usually the rerun with interventions).
    targets : list of str
        The target labels of the statistics.
    before, after : xarray.Dataset
        ``ats.stats.dominance`` of ``a`` and of ``b``.
    stats : xarray.Dataset
        ``after - before``, aligned on the common steps and sites; same dims and variables. Its attrs
        ``compared_steps`` and ``gated_steps`` say which steps the statistics cover and which steps
        either run gated (TGATE: attention reused from the cache, no maps, so left out).
    """

    a: Trace
    b: Trace
    targets: list[str]
    before: Any
    after: Any
    stats: Any
    sites: Any = field(default=None, repr=False)
    steps: Any = field(default=None, repr=False)
    target_spec: list = field(default_factory=list, repr=False)  # as given (words, phrases, positions)

    def shares(self, sample: Any = None) -> Any:
        """Mean target share per target (over steps, sites and samples, or of one ``sample``): a DataFrame with
        ``before``, ``after``, ``change`` columns. Both means are taken over the same entries: where a share is
        NaN in either run (no attention to divide), it is left out of both."""
        import pandas as pd

        samples = self.before["sample"].values.tolist()
        if sample is not None and (isinstance(sample, bool) or sample not in samples):
            raise AttnscopeError(f"sample={sample!r} is not in the compared runs; their samples are {samples}")
        mean = ["step", "site"] + (["sample"] if sample is None else [])
        pick = {} if sample is None else {"sample": sample}
        before, after = self.before.target_share.sel(pick), self.after.target_share.sel(pick)
        both = before.notnull() & after.notnull()  # a share NaN in one run (no attention there) leaves both means
        before, after = before.where(both).mean(mean).to_series(), after.where(both).mean(mean).to_series()
        return pd.DataFrame({"before": before, "after": after, "change": after - before})

    def table(self) -> str:
        """The targets' mean shares before and after as a text table; when a run gated steps (TGATE) or a trace is
        incomplete, a last line says which steps were compared and why not all (see :meth:`steps_note`)."""
        df = self.shares()
        width = max([6, *(len(t) for t in df.index)])
        lines = [f"{'target':<{width}}  {'before':>7}  {'after':>7}  {'change':>7}"]
        for target, row in df.iterrows():
            lines.append(f"{target:<{width}}  {row.before:7.3f}  {row.after:7.3f}  {row.change:+7.3f}")
        if self.stats.attrs.get("gated_steps") or not all(getattr(t, "complete", True) for t in (self.a, self.b)):
            lines.append(self.steps_note())
        return "\n".join(lines)

    def steps_note(self) -> str:
        """Which steps the statistics compare, which were left out because a run gated them (TGATE), and whether a
        trace is incomplete (its capture stopped: only the steps it wrote are compared).

        >>> import tempfile, attnscope as ats
        >>> d = tempfile.mkdtemp()
        >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0, store=d + "/a.zarr",
        ...                  num_inference_steps=4)
        >>> ats.compare(tr, ats.rerun(tr, [ats.regulate.TGate(2)]), ["circle"]).steps_note()
        'compared steps 0–1 (steps 2–3 gated: attention reused from the cache, no maps to compare)'
        """
        compared, gated = self.stats.attrs.get("compared_steps", []), self.stats.attrs.get("gated_steps", [])
        note = f"compared {_plural('step', compared)} {step_ranges(compared)}"
        if gated:
            note += (f" ({_plural('step', gated)} {step_ranges(gated)} gated: attention reused from the cache, "
                     f"no maps to compare)")
        stopped = [f"trace {label} is incomplete: {tr.written}" for label, tr in (("a", self.a), ("b", self.b))
                   if getattr(tr, "complete", True) is False]
        return note + (f" ({'; '.join(stopped)})" if stopped else "")

    def image_change(self) -> float | None:
        """Mean absolute difference of the two runs' images, per pixel and channel in [0, 1] (None when a trace
        has no images). The change a TGATE rerun makes shows here rather than in the shares of the steps
        before its gate, which are the parent's."""
        a, b = self.a.images, self.b.images
        if not a or not b or len(a) != len(b):
            return None
        diffs = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).mean() / 255 for x, y in zip(a, b)]
        return float(np.mean(diffs))

    def figure(self, sample: int = 0, cmap: str = "viridis") -> Any:
        """The two images side by side with each target's heat map, and the mean target shares before/after.

        The same as :func:`attnscope.plot.comparison` ``(self, sample, cmap)``: see there.
        """
        from ..plot import comparison

        return comparison(self, sample=sample, cmap=cmap)


def _plural(word: str, items: Sequence[Any]) -> str:
    return word if len(items) == 1 else word + "s"


def _each_once(items: list[Any]) -> list[Any]:
    """The items in order, each once (a target named twice would be two rows of one target).

    >>> _each_once(["circle", "square", "circle"])
    ['circle', 'square']
    """
    try:
        return list(dict.fromkeys(items))
    except TypeError:  # an unhashable item: left to the statistics' error for a bad target
        return items


def _read_branch(trace: Trace) -> str:
    """The classifier-free guidance branch whose maps the statistics of ``trace`` read: ``"uncond"`` for a trace
    captured with ``branch="uncond"``, else ``"cond"`` (``"both"`` stores it too; ``Trace.attention``'s default)."""
    spec = trace.manifest.get("capture") if isinstance(trace.manifest.get("capture"), dict) else {}
    return "uncond" if spec.get("branch") == "uncond" else "cond"


def _check_same_branch(a: Trace, b: Trace) -> None:
    """Two traces whose maps come from different branches (the prompt's and the negative prompt's) are no
    before/after of one generation: their difference would show a change that no intervention made.

    >>> from types import SimpleNamespace as Run
    >>> cond, uncond = (Run(path=f"{b}.zarr", manifest={"capture": {"branch": b}}) for b in ("cond", "uncond"))
    >>> _check_same_branch(cond, Run(path="both.zarr", manifest={"capture": {"branch": "both"}}))
    >>> _check_same_branch(cond, uncond)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: cannot compare 'cond.zarr' and 'uncond.zarr': trace a holds the maps of the cond branch (the prompt's), trace b those of the uncond branch only (the negative prompt's, branch='uncond'); a before/after needs the maps of one branch: capture or rerun both with the same branch=
    """
    branches = {"cond": "the cond branch (the prompt's)", "uncond": "the uncond branch only (the negative prompt's, "
                                                                     "branch='uncond')"}
    ba, bb = _read_branch(a), _read_branch(b)
    if ba != bb:
        raise AttnscopeError(f"cannot compare {str(a.path)!r} and {str(b.path)!r}: trace a holds the maps of "
                             f"{branches[ba]}, trace b those of {branches[bb]}; a before/after needs the maps of one "
                             f"branch: capture or rerun both with the same branch=")


def _chosen_sites(a: Trace, b: Trace, sites: Any) -> list[str]:
    """The site names ``sites`` chooses (default: every site both traces recorded); each must be in both traces."""
    where = f"cannot compare {str(a.path)!r} and {str(b.path)!r}"
    common = [s for s in a.sites if s in set(b.sites)]
    if sites is None:
        if not common:
            raise AttnscopeError(f"{where}: they recorded no site in common ({a.sites} vs {b.sites})")
        return common
    every = list(dict.fromkeys([*a.sites, *b.sites]))
    described = ({n: (a if n in a.sites else b).site_description(n) for n in every} if callable(sites)
                 else None)  # a predicate sees each site's stored description, as in capture
    names = select_site_names(sites, every, described)
    lacking = [f"trace {label} ({str(tr.path)!r}) did not record {', '.join(missing)}"
               for label, tr in (("a", a), ("b", b)) if (missing := [n for n in names if n not in set(tr.sites)])]
    if lacking:
        raise AttnscopeError(f"{where} at sites={sites!r}: {'; '.join(lacking)}; the sites both recorded: "
                             f"{', '.join(common) or 'none'}")
    return names


def _computed_in_both(a: Trace, b: Trace, site: str) -> list[int]:
    """The steps both traces captured and computed (not gated by TGATE): ``before`` and ``after`` are taken over
    the same steps, so their means compare like ``stats`` does."""
    gated = set(a.gated_steps) | set(b.gated_steps)
    have = set(b.attention(site)["step"].values.tolist())
    captured = a.attention(site)["step"].values.tolist()
    steps = [s for s in captured if s in have and s not in gated]
    if not steps:
        why = f" (gated steps: {sorted(gated)})" if gated else f" ({captured} vs {sorted(have)})"
        raise AttnscopeError(f"cannot compare {str(a.path)!r} and {str(b.path)!r}: no step was captured and "
                             f"computed in both{why}")
    return steps


def _check_not_gated(a: Trace, b: Trace, site: str, steps: Any) -> None:
    """Steps named by the caller must have been captured and computed in both runs (an error names the trace that
    lacks one): a gated step's maps are NaN (TGATE reused its cache), so its shares would drop out of one mean only
    and show a change the runs did not make."""
    chosen = set(select_steps(steps, run_steps(a, [a.attention(site)])))
    captured = {label: set(tr.attention(site)["step"].values.tolist()) for label, tr in (("a", a), ("b", b))}
    lacking = [f"trace {label} ({str(tr.path)!r}) did not capture {_plural('step', m)} {step_ranges(m)}"
               for label, tr in (("a", a), ("b", b)) if (m := sorted(chosen - captured[label]))]
    if lacking:
        both = sorted(captured["a"] & captured["b"])
        raise AttnscopeError(f"cannot compare {str(a.path)!r} and {str(b.path)!r} at steps={steps!r}: "
                             f"{'; '.join(lacking)}; the steps both captured: {step_ranges(both)}")
    gated = [f"trace {label} ({str(tr.path)!r}) gated {_plural('step', g)} {step_ranges(g)}"
             for label, tr in (("a", a), ("b", b)) if (g := sorted(chosen & set(tr.gated_steps)))]
    if gated:
        raise AttnscopeError(f"cannot compare {str(a.path)!r} and {str(b.path)!r} at steps={steps!r}: "
                             f"{'; '.join(gated)} (TGATE: attention reused from the cache, no maps to compare); "
                             f"leave them out of steps=, or pass steps=None for every step both runs computed")


def compare(a: Trace | str | Path, b: Trace | str | Path, targets: Sequence[str | int] | str | None = None, *,
            sites: Any = None, steps: Any = None) -> Comparison:
    """Dominance statistics of two runs of the same generation, and their difference ``b - a``.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> d = tempfile.mkdtemp()
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=d + "/a.zarr", num_inference_steps=2)
    >>> c = ats.compare(tr, ats.rerun(tr), ["circle", "square"])
    >>> c.stats.target_share.dims, float(abs(c.stats.target_share).max())   # a plain rerun changes nothing
    (('step', 'site', 'sample', 'target'), 0.0)
    >>> fig = c.figure()                            # images, heat maps, mean shares before/after

    Parameters
    ----------
    a, b : Trace or path
        Before and after: two traces of the same prompts, image size and schedule (steps at the same timesteps:
        not a text-to-image run and an img2img run of as many steps) whose maps are of the same
        classifier-free guidance branch (typically a trace and its :func:`rerun` with interventions).
    targets : list of words, phrases or token positions, optional
        Default: every distinct word of ``a``'s first prompt (``ats.stats.dominance``'s default).
    sites : glob, list of names/globs or predicate (as in capture), optional
        Which sites (default all that both traces recorded); every site chosen must be in both traces
        (an error names the trace that lacks one).
    steps : int, list of int or slice, optional
        Which steps of the run (an int, list or slice over the run's steps, like ``capture``; all
        must be captured, and none gated by either run: an error names them). Default: every step
        both traces captured, less the steps either one gated (TGATE: not computed, stored as NaN).

    Returns
    -------
    Comparison
        ``.before``/``.after`` (:func:`attnscope.stats.dominance` of ``a``/``b``), ``.stats`` (their
        difference, aligned on the common steps and sites; attrs ``compared_steps`` and ``gated_steps``),
        ``.table()``, ``.steps_note()``, ``.image_change()`` and ``.figure()``.
    """
    ta, tb = as_trace(a, "a"), as_trace(b, "b")
    check_same_generation(ta, tb)
    check_same_schedule(ta, tb)
    _check_same_branch(ta, tb)
    if targets is None:
        targets = list(dict.fromkeys(w for w in token_words(ta.tokens, ta.token_roles) if w))
    targets = _each_once(target_list(targets))
    sites = _chosen_sites(ta, tb, sites)
    if steps is None:
        steps = _computed_in_both(ta, tb, sites[0])
    else:
        _check_not_gated(ta, tb, sites[0], steps)
    before = dominance(ta, targets, sites=sites, steps=steps)
    after = dominance(tb, targets, sites=sites, steps=steps)
    with np.errstate(invalid="ignore"):
        stats = (after - before).transpose(*(d for d in _STAT_DIMS if d in before.dims))
    if any(stats.sizes[d] == 0 for d in ("step", "site")):
        raise AttnscopeError(f"cannot compare {str(ta.path)!r} and {str(tb.path)!r}: no captured step in common "
                             f"({before['step'].values.tolist()} vs {after['step'].values.tolist()})")
    gated = sorted(set(ta.gated_steps) | set(tb.gated_steps))
    stats.attrs.update({**before.attrs, "difference": "after - before (b - a)",
                        "compared_steps": [int(s) for s in stats["step"].values], "gated_steps": gated})
    return Comparison(ta, tb, [str(t) for t in before["target"].values.tolist()], before, after, stats,
                      sites=sites, steps=steps, target_spec=targets)

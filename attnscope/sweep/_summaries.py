"""Ready-made per-trace reductions for :func:`map_stats` (picklable, so they run on any dask worker)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DominanceRow", "Targets", "targets_of"]

_SCALARS = ("dominance_ratio", "entropy", "gini", "sink_share")

Targets = Sequence[str] | str | Callable[[str], Sequence[str]]


def targets_of(targets: Targets, trace: Any) -> list[str]:
    """The targets for one trace: a fixed list, ``"objects"`` (the shapes prompt's object phrases) or ``fn(prompt)``."""
    prompt = (trace.manifest.get("run", {}).get("prompts") or [""])[0]
    if isinstance(targets, str) and targets == "objects":
        from ..models import object_phrases

        return list(object_phrases(prompt))
    if callable(targets):
        return list(targets(prompt))
    return [targets] if isinstance(targets, str) else list(targets)


@dataclass(frozen=True)
class DominanceRow:
    """``ats.stats.dominance`` of one trace reduced to one row: the means over the chosen steps, sites and samples.

    Parameters
    ----------
    targets : list of str, or "objects"
        The same words or phrases for every trace, or ``"objects"``: each shapes-world prompt's own
        object phrases (``"red circle"``, ``"blue square"``).
    steps, sites
        As for :func:`attnscope.stats.dominance` (default: all captured).

    Returns
    -------
    dict
        Called on a trace: ``target_<i>`` (the i-th target) and ``share_<i>`` (its mean mass share)
        for each target, then ``dominance_ratio``, ``entropy``, ``gini`` and ``sink_share``.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2, height=32, width=32)
    >>> row = DominanceRow(["circle", "square"], steps=[0])(tr)
    >>> list(row)[:4], round(row["share_0"] + row["share_1"], 6) <= 1
    (['target_0', 'share_0', 'target_1', 'share_1'], True)
    """

    targets: Sequence[str] | str
    steps: Any = None
    sites: Any = None

    def __call__(self, trace: Any) -> dict[str, Any]:
        from .. import stats

        targets = targets_of(self.targets, trace)
        ds = stats.dominance(trace, targets=targets, steps=self.steps, sites=self.sites)
        row: dict[str, Any] = {}
        shares = ds["target_share"].mean(["step", "site", "sample"]).values
        for i, (target, share) in enumerate(zip(targets, shares)):
            row[f"target_{i}"] = target
            row[f"share_{i}"] = float(share)
        for name in _SCALARS:
            row[name] = float(ds[name].mean().values)
        return row

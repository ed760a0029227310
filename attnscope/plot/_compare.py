"""The compare figure: two runs of one generation side by side (``ats.compare(...).figure()``)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..errors import AttnscopeError
from ..tokens import resolve_targets
from ._heatmaps import word_maps
from ._select import sample_index, sample_prompt, sample_roles, sample_tokens

__all__ = ["comparison"]


def comparison(result: Any, sample: int = 0, cmap: str = "viridis") -> Figure:
    """The two images of a :class:`~attnscope.Comparison` side by side with each target's heat map, and the
    mean target shares before/after.

    Heat maps: for each trace, each site's map of a target (its pieces summed) averaged over heads
    and the compared steps, upsampled to the image size and averaged over the compared sites; the
    before and after maps of one target share a colour scale from 0 (so a change of strength shows),
    drawn as one colour bar under the target's two maps.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
    >>> fig = ats.plot.comparison(ats.compare(tr, tr, ["circle", "square"]))
    >>> len(fig.axes)  # two images, two heat maps per row, the bars, a colour bar per target
    9

    Parameters
    ----------
    result : Comparison
        What :func:`attnscope.compare` returned.
    sample : int
        Which generated image.
    cmap : str
        Matplotlib colour map of the heat maps.

    Returns
    -------
    matplotlib.figure.Figure
        Two rows (before, after) of ``1 + len(targets)`` panels, a colour bar under each target's
        column (axes labelled ``"<colorbar>"``), and one bar-chart axes at the right.
    """
    spec, targets, missing = _targets_in_sample(result, sample)
    maps = [word_maps(tr, spec, result.sites, result.steps, sample).transpose("word", "y", "x").values
            for tr in (result.a, result.b)]
    n = len(targets)
    fig = Figure(figsize=(2.2 * (n + 1) + 3.6, 4.8), layout="constrained")
    grid = fig.add_gridspec(2, n + 2, width_ratios=[1.0] * (n + 1) + [1.8])
    columns: list[list[Any]] = [[] for _ in range(n)]
    for row, (tr, label, m) in enumerate(zip((result.a, result.b), ("before", "after"), maps)):
        images = tr.images
        picture = np.asarray(images[sample_index(tr, sample)]) if images else None
        ax = fig.add_subplot(grid[row, 0])
        if picture is not None:
            ax.imshow(picture)
        else:
            ax.text(0.5, 0.5, "no image stored", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{label}: {PurePosixPath(str(tr.path)).name}", fontsize=8)  # a Path or a URL
        ax.set_axis_off()
        for k, target in enumerate(targets):
            ax = fig.add_subplot(grid[row, k + 1])
            top = max(float(np.nanmax(mm[k])) for mm in maps) or 1.0
            columns[k].append(ax.imshow(m[k], cmap=cmap, vmin=0.0, vmax=top))
            ax.set_title(f"{target} ({label})", fontsize=8)
            ax.set_axis_off()
    for target, shown in zip(targets, columns):
        bar = fig.colorbar(shown[0], ax=[im.axes for im in shown], location="bottom", shrink=0.9, aspect=12)
        bar.set_label(f"attention on {target}", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    bars = fig.add_subplot(grid[:, -1])
    # the table's shares: before and after averaged over the same entries (a share NaN in one run leaves both)
    shares = result.shares(result.before["sample"].values[sample_index(result.a, sample)]).loc[targets]
    x = np.arange(n)
    for offset, label in zip((-0.2, 0.2), ("before", "after")):
        bars.bar(x + offset, shares[label].to_numpy(), width=0.4, label=label)
    slot = fig.get_figwidth() * 1.8 / (n + 2.8) / n  # inches of bar chart per target
    crowded = max(len(str(t)) for t in targets) * 0.07 > 0.9 * slot  # an 8-pt label is wider than its slot
    bars.set_xticks(x, targets, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    bars.set_ylabel("mean target share (0–1)")
    bars.set_title("share of the prompt's attention, mean over steps and sites", fontsize=8)
    bars.legend(fontsize=8)
    if missing:
        fig.suptitle(f"not in this sample's prompt: {', '.join(missing)}", fontsize=8)
    return fig


def _targets_in_sample(result: Any, sample: int) -> tuple[list[Any], list[str], list[str]]:
    """The comparison's targets (as given, and their labels) that ``sample``'s prompt has, and the labels of those it
    lacks (a batch of prompts: the default targets are the first prompt's words); an error when it has none."""
    spec = list(result.target_spec or result.targets)
    tokens, roles = sample_tokens(result.a, sample), sample_roles(result.a, sample)
    kept, missing = [], []
    for given, label in zip(spec, result.targets):
        try:
            resolve_targets(tokens, [given], roles)
        except AttnscopeError:
            missing.append(label)
        else:
            kept.append((given, label))
    if not kept:
        raise AttnscopeError(f"sample {sample}'s prompt {sample_prompt(result.a, sample)!r} has none of the targets "
                             f"{list(result.targets)}; compare with targets= its prompt has")
    return [g for g, _ in kept], [lab for _, lab in kept], missing



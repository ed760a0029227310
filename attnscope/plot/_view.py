"""``ats.view``: an interactive Jupyter widget over a lazy trace (anywidget; the front end is ``_view.js``).

The widget shows the generated image with each chosen word's heat map over it, sliders for the site and the
step (each with an "all" position: the mean), a head and a sample selector where the trace has several, the
overlay's opacity, one colour bar for all panels, and the dominance statistics of the selection; given a second
trace (``compare=``) it shows both runs for the same selection. Python reads only what a selection needs: one
site's chunks of the chosen step (every step, chunk by chunk, when the step is "all"), one site at a time, and
keeps recent results; the front end receives small PNGs and the numbers.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import traitlets
import xarray as xr

try:
    import anywidget
except ImportError as exc:  # an optional dependency: the notebooks extra
    raise ImportError("ats.view needs anywidget: pip install 'attnscope[notebooks]' (or pip install anywidget)") from exc

from ..errors import AttnscopeError, AttnscopeWarning
from ..selection import step_ranges
from ..stats import dominance, dominance_ratio, image_size, upsample_maps
from ..store import as_trace, check_same_generation, check_same_schedule
from ..tokens import resolve_targets, word_alignment
from ._layout import colour_map, short_site, step_label
from ._report import plural, report_words
from ._select import (
    crop_box,
    cropped_generation,
    forward_order,
    in_crop_box,
    sample_index,
    sample_prompt,
    sample_roles,
    sample_tokens,
)

__all__ = ["ALL", "TraceViewer", "view"]

#: the slider position (and trait value) of the mean over every site or every step
ALL = "all"
HEAD_MEAN = "mean"
PANEL_SIDE = 256  # maps and images larger than this are shrunk for the browser (the numbers stay at image size)
CACHE_BYTES = 256 << 20  # read and reduced maps kept per trace, most recent first
STATISTICS = (("dominance_ratio", "dominance ratio (top-1 / top-2 of these shares)"), ("entropy", "entropy (nats)"),
              ("gini", "Gini of the shares"), ("sink_share", "sink share (SOT, EOT, padding)"))


class _Recent:
    """A least-recently-used mapping bounded by the bytes of its numpy values."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used, self._items = max_bytes, 0, OrderedDict()

    def get(self, key: Hashable) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        return None

    def put(self, key: Hashable, value: Any, nbytes: int) -> Any:
        self._items[key] = (value, nbytes)
        self.used += nbytes
        while self.used > self.max_bytes and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            self.used -= dropped
        return value


class _NanMean:
    """A running mean that skips NaN (a step TGATE gated, or a map the model made NaN); NaN where all were."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count: np.ndarray | None = None

    def add(self, values: np.ndarray, axis: int | None = None) -> None:
        finite = np.isfinite(values)
        total, count = np.where(finite, values, 0.0), finite.astype(np.int32)
        if axis is not None:
            total, count = total.sum(axis), count.sum(axis)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.total / self.count).astype(np.float32)


class _Run:
    """One trace on screen: reads its maps lazily, reduces them and keeps the recent results."""

    def __init__(self, trace: Any, role: str):
        self.trace, self.role = trace, role
        self.samples = [int(s) for s in trace.coords["sample"].values.tolist()]
        self._recent = _Recent(CACHE_BYTES)
        self._heads: dict[str, int] = {}
        self._images: dict[int, Any] = {}

    def heads(self, site: str) -> int:
        if site not in self._heads:
            self._heads[site] = int(self.trace.attention(site).sizes["head"])
        return self._heads[site]

    def captured_steps(self, site: str) -> list[int]:
        return [int(s) for s in self.trace.attention(site)["step"].values.tolist()]

    def tokens(self, sample: int) -> tuple[list[str], list[str] | None]:
        return sample_tokens(self.trace, sample), sample_roles(self.trace, sample)

    def prompt(self, sample: int) -> str:
        return sample_prompt(self.trace, sample)

    def image(self, sample: int) -> Any:
        """The sample's generated image (PIL), or None when the trace stores none."""
        if sample not in self._images:
            images = self.trace.images
            self._images[sample] = images[sample_index(self.trace, sample)] if images else None
        return self._images[sample]

    def size(self, sample: int) -> tuple[int, int]:
        image = self.image(sample)
        return image_size(image if image is not None else self.trace)

    def site_map(self, site: str, steps: tuple[int, ...], sample: int, head: Any) -> xr.DataArray:
        """One site's map ``(y, x, token)`` of one sample, averaged over ``steps`` (NaN skipped) and over the heads
        or at one head, in memory. Reads only those steps, one stored chunk at a time."""
        key = ("site", site, steps, sample, head)
        found = self._recent.get(key)
        if found is not None:
            return found
        da = self.trace.attention(site).sel(sample=sample)
        held = set(da["step"].values.tolist())  # a trace opened with missing="skip" may lack steps at a site: NaN
        da = da.sel(step=[s for s in steps if s in held]).transpose("step", "head", "y", "x", "token")
        mean, start = _NanMean(), 0
        for size in (da.chunks[0] if da.chunks is not None else (da.sizes["step"],)):
            block = np.asarray(da.isel(step=slice(start, start + size)).values, dtype=np.float32)
            start += size
            block = block.mean(axis=1) if head == HEAD_MEAN else block[:, head]
            mean.add(block, axis=0)
        if mean.total is None:  # none of the steps at this site: no value, not a zero map
            mean.add(np.full((1, *(da.sizes[d] for d in ("y", "x", "token"))), np.nan, np.float32), axis=0)
        coords = {name: da.coords[name] for name in ("token", "token_text", "token_role") if name in da.coords}
        out = xr.DataArray(mean.mean(), dims=("y", "x", "token"), coords=coords, name=site)
        return self._recent.put(key, out, out.nbytes)

    def maps(self, words: tuple[str, ...], sites: tuple[str, ...], steps: tuple[int, ...], sample: int,
             head: Any) -> np.ndarray:
        """Each word's map ``(word, y, x)`` at image size: per site, the words' tokens summed and upsampled
        bilinearly; then the mean over the sites (NaN skipped). One site is read and reduced at a time. An
        inpainting crop's maps (:func:`crop_box`) are upsampled to the crop's box and placed there, NaN (drawn
        transparent) around it."""
        key = ("maps", words, sites, steps, sample, head)
        found = self._recent.get(key)
        if found is not None:
            return found
        size, mean, box = self.size(sample), _NanMean(), crop_box(self.trace)
        for site in sites:
            native = self.site_map(site, steps, sample, head)
            per_word = native.attn.words(list(words)).transpose("word", "y", "x").values
            per_word[:, np.isnan(native.values).all(-1)] = np.nan  # not computed (gated): no map, not a zero one
            mean.add(upsample_maps(per_word, size) if box is None else in_crop_box(per_word, box, size))
        out = mean.mean()
        out.setflags(write=False)
        return self._recent.put(key, out, out.nbytes)

    def statistics(self, words: tuple[str, ...], sites: tuple[str, ...], steps: tuple[int, ...],
                   sample: int) -> dict[str, Any]:
        """:func:`attnscope.stats.dominance` of the selection for one sample: each target's share, entropy, Gini and
        sink share averaged over the selected sites and steps, and the dominance ratio of those mean shares (so
        the table reads consistently; one site and step give dominance's own ratio):
        ``{"target_share": {word: share}, "dominance_ratio": …, …}`` (NaN and infinity as None)."""
        key = ("stats", words, sites, steps, sample)
        found = self._recent.get(key)
        if found is not None:
            return found
        groups: dict[tuple[int, ...], list[str]] = {}  # sites by the selected steps they hold (all, unless a trace
        for site in sites:                              # opened with missing="skip" lacks some at a site)
            captured = set(self.captured_steps(site))
            held = tuple(s for s in steps if s in captured)
            if held:
                groups.setdefault(held, []).append(site)
        if not groups:
            out = {"target_share": {w: None for w in words}, **{name: None for name, _ in STATISTICS}}
            return self._recent.put(key, out, 0)
        parts = [dominance(self.trace, targets=list(words), sites=group, steps=list(held))
                 for held, group in groups.items()]
        ds = parts[0] if len(parts) == 1 else xr.concat(parts, dim="site", join="outer")
        ds = ds.sel(sample=sample).mean(("step", "site"))
        shares = ds.target_share.transpose("target").values
        out = {"target_share": {str(t): _number(v) for t, v in zip(ds["target"].values.tolist(), shares)},
               "dominance_ratio": _number(dominance_ratio(shares)),
               **{name: _number(ds[name]) for name, _ in STATISTICS if name != "dominance_ratio"}}
        return self._recent.put(key, out, 0)


def _number(value: Any) -> float | None:
    """A float for JSON: NaN and infinities become None."""
    value = float(value)
    return value if np.isfinite(value) else None


def _png(pixels: np.ndarray) -> str:
    """``pixels`` (uint8, ``(h, w, 3 or 4)``) as a base64 PNG, shrunk to :data:`PANEL_SIDE` if larger."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels))
    if max(image.size) > PANEL_SIDE:
        scale = PANEL_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _format(value: float | None) -> str:
    """Three significant digits, as the front end's ``number``: a Gini of 0.00263 is not "0.003", a difference of
    -0.0004 not "-0.000".

    >>> [_format(v) for v in (None, 0.0, 0.01304, 0.3046, 2.1498, 100.0, 0.00042, -0.00042, 12345.0)]
    ['—', '0', '0.0130', '0.305', '2.15', '100', '4.20e-4', '-4.20e-4', '1.23e+4']
    """
    if value is None:
        return "—"
    if value == 0:
        return "0"
    text = f"{value:#.3g}" if 1e-3 <= abs(value) < 1e3 else f"{value:.2e}"
    if "e" in text:  # 4.20e-04 as the browser writes it: 4.20e-4
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent):+d}"
    return text.rstrip(".")


class TraceViewer(anywidget.AnyWidget):
    """An interactive view of a trace in Jupyter: word heat maps over the image, by site, step, head and sample,
    with the dominance statistics of the selection; :func:`view` creates it.

    Changing a control (in the browser, or a trait from Python: ``v.step = 1``) reads only what the new
    selection needs and updates the panels and the numbers below.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=3, height=32, width=32)
    >>> v = ats.view(tr, words=["circle", "blue square"], site=tr.sites[0])
    >>> v.step = 1
    >>> v.words, v.current_map().shape          # one map per word, at image size
    (['circle', 'blue square'], (2, 32, 32))
    >>> da = tr.attention(tr.sites[0]).sel(step=1, sample=0).isel(token=tr.words["circle"]).astype("float64")
    >>> abs(v.word_means["circle"] - float(da.sum("token").mean())) < 1e-6   # mean over heads and pixels
    True
    >>> v.step = 7
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: step=7: expected 'all' or one of the captured steps [0, 1, 2]

    Attributes
    ----------
    words : list of str
        The words or phrases drawn, one panel each (a phrase sums its words' tokens; every occurrence counts).
    site : str
        A site name of the trace, or ``"all"`` (the mean over every site, each upsampled to the image first).
    step : int or str
        A captured step, or ``"all"`` (the mean over the captured steps TGATE did not gate; with ``compare``,
        those computed in both runs). ``step_mean_count`` says how many that is.
    head : str or int
        ``"mean"``, or a head index when the trace kept heads (``capture(..., heads="all")``).
    sample : int
        Which generated image (and its prompt).
    opacity : float
        Opacity of the heat map over the image, 0 to 1.
    map_min, map_max : float
        The colour scale shared by every panel (of both traces with ``compare``): the smallest and largest
        value of the maps shown.
    word_means : dict
        Word → the mean over the image of its map (of the first trace).
    statistics : dict
        ``{"columns": [...], "rows": [{"label", "key", "target", "values"}]}``: the dominance table as numbers,
        one value per trace (and the difference with ``compare``); None where not defined.
    """

    _esm = Path(__file__).with_name("_view.js")

    words = traitlets.Any([]).tag(sync=True)
    word_options = traitlets.List(traitlets.Unicode()).tag(sync=True)
    site = traitlets.Any(ALL).tag(sync=True)
    site_options = traitlets.List(traitlets.Unicode()).tag(sync=True)
    site_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    step = traitlets.Any(ALL).tag(sync=True)
    step_options = traitlets.List(traitlets.Int()).tag(sync=True)
    step_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    step_mean_count = traitlets.Int(0).tag(sync=True)  # the steps the "all" position averages (gated ones left out)
    head = traitlets.Any(HEAD_MEAN).tag(sync=True)
    head_count = traitlets.Int(1).tag(sync=True)
    sample = traitlets.Any(0).tag(sync=True)
    sample_options = traitlets.List(traitlets.Int()).tag(sync=True)
    opacity = traitlets.Any(0.6).tag(sync=True)
    panels = traitlets.List(traitlets.Dict()).tag(sync=True)
    colorbar = traitlets.Unicode("").tag(sync=True)
    map_min = traitlets.Float(0.0).tag(sync=True)
    map_max = traitlets.Float(0.0).tag(sync=True)
    word_means = traitlets.Dict().tag(sync=True)
    statistics = traitlets.Dict().tag(sync=True)
    table_html = traitlets.Unicode("").tag(sync=True)
    summary = traitlets.Unicode("").tag(sync=True)

    def __init__(self, trace: Any, compare: Any = None, *, words: Sequence[str] | str | None = None,
                 site: str = ALL, step: int | str = ALL, head: int | str = HEAD_MEAN, sample: int = 0,
                 opacity: float = 0.6, cmap: str = "viridis"):
        self._ready = False
        first = as_trace(trace, "trace")
        self._runs = [_Run(first, "before" if compare is not None else "trace")]
        if compare is not None:
            second = as_trace(compare, "compare")
            check_same_generation(first, second, f"compare={str(second.path)!r}")  # as ats.compare checks
            check_same_schedule(first, second, f"compare={str(second.path)!r}")
            self._runs.append(_Run(second, "after"))
        for run in self._runs:  # an inpainting crop's maps: the panels would show them stretched over the whole image
            if (cropped := cropped_generation(run.trace)) is not None:
                warnings.warn(f"view of {str(run.trace.path)!r}: {cropped}", AttnscopeWarning, stacklevel=3)
        self._cmap = cmap
        colour_map([0.0], 0.0, 1.0, cmap)  # an unknown colour map is an error now
        sites = forward_order(first, [s for s in first.sites if all(s in run.trace.sites for run in self._runs[1:])])
        if not sites:
            raise AttnscopeError(f"compare={str(self._runs[1].trace.path)!r}: it recorded none of the sites of "
                                 f"{str(first.path)!r} ({first.sites}); the before/after needs common sites")
        # every site's captured steps (a trace opened with missing="skip" may lack some at a site), in both runs
        held = [{s for site in sites for s in run.captured_steps(site)} for run in self._runs]
        steps = sorted(set.intersection(*held))
        if not steps:
            raise AttnscopeError(f"compare={str(self._runs[1].trace.path)!r}: no captured step in common with "
                                 f"{str(first.path)!r}; the before/after needs common steps")
        # "all" steps: those computed (a TGATE run's gated steps have no maps) — before and after, those computed in
        # both runs, as ats.compare takes them; a map the model made NaN is skipped in the mean
        gated = {int(s) for run in self._runs for s in run.trace.gated_steps}
        self._all_steps = tuple(s for s in steps if s not in gated) or tuple(steps)
        super().__init__()
        try:
            with self.hold_sync():  # one message with the whole first state
                self.site_options, self.site_labels = sites, [short_site(s) for s in sites]
                timed = xr.Dataset(coords={"step": first.coords["step"].values,  # each step's timestep
                                           "timestep": ("step", first.coords["timestep"].values)})
                self.step_options, self.step_labels = steps, [step_label(timed, s) for s in steps]
                self.step_mean_count = len(self._all_steps)
                self.sample_options = [s for s in self._runs[0].samples if all(s in r.samples for r in self._runs[1:])]
                self.sample = sample
                self.site = site
                self.step = step
                self._update_heads()
                self.head = head
                self.word_options = self._word_options()
                self.words = self._default_words() if words is None else words
                self.opacity = opacity
                self.colorbar = _png(colour_map(np.linspace(0.0, 1.0, 256)[None, :], 0.0, 1.0, cmap)[..., :3])
                self._ready = True
                self._refresh()
        except BaseException:
            self.close()  # no half-made widget left open in the kernel
            raise

    # --- checks of what is set, from Python or the browser ---------------------------------------------------------

    @traitlets.validate("words")
    def _check_words(self, proposal: Any) -> list[str]:
        value = proposal["value"]
        words = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise AttnscopeError(f"words={value!r}: expected one or more words or phrases of the prompt")
        words = list(dict.fromkeys(words))
        tokens, roles = self._runs[0].tokens(self.sample)  # a compared run has the same prompts (checked when made)
        try:
            resolve_targets(tokens, words, roles)
        except AttnscopeError as exc:
            raise AttnscopeError(f"words={value!r}: {exc}") from None
        return words

    @traitlets.validate("site")
    def _check_site(self, proposal: Any) -> str:
        value = proposal["value"]
        if value == ALL or (isinstance(value, str) and value in self.site_options):
            return value
        raise AttnscopeError(f"site={value!r}: expected 'all' or one of the sites " + ", ".join(self.site_options))

    @traitlets.validate("step")
    def _check_step(self, proposal: Any) -> int | str:
        value = proposal["value"]
        if isinstance(value, str) and value == ALL:
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) in self.step_options:
            return int(value)
        raise AttnscopeError(f"step={value!r}: expected 'all' or one of the captured steps {list(self.step_options)}")

    @traitlets.validate("head")
    def _check_head(self, proposal: Any) -> int | str:
        value = proposal["value"]
        if isinstance(value, str) and value == HEAD_MEAN:
            return value
        if (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and self.head_count > 1
                and 0 <= int(value) < self.head_count):
            return int(value)
        kept = (f"a head index 0..{self.head_count - 1}" if self.head_count > 1 else
                "no head index: this trace stores the mean over heads (capture with heads='all' to keep them)")
        raise AttnscopeError(f"head={value!r}: expected 'mean' or {kept}")

    @traitlets.validate("sample")
    def _check_sample(self, proposal: Any) -> int:
        value = proposal["value"]
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) in self.sample_options:
            return int(value)
        both = " (in both traces)" if len(self._runs) > 1 else ""
        raise AttnscopeError(f"sample={value!r}: expected one of the samples{both} {list(self.sample_options)}")

    @traitlets.validate("opacity")
    def _check_opacity(self, proposal: Any) -> float:
        value = proposal["value"]
        if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and 0 <= value <= 1:
            return float(value)
        raise AttnscopeError(f"opacity={value!r}: expected a number from 0 (image only) to 1 (map only)")

    @traitlets.observe("words", "site", "step", "head", "sample")
    def _changed(self, change: Any) -> None:
        if not self._ready:
            return
        self._ready = False
        try:
            if change["name"] in ("site", "sample"):
                self._update_heads()
            if change["name"] == "sample":
                self.word_options = self._word_options()
                try:
                    self.words = list(self.words)
                except AttnscopeError:  # the new sample's prompt lacks a word: its own default words
                    self.words = self._default_words()
        finally:
            self._ready = True
        self._refresh()

    # --- what is shown -----------------------------------------------------------------------------------------

    def current_map(self, compare: bool = False) -> np.ndarray:
        """The maps shown, one per word, at image size: a float32 array ``(word, y, x)`` (a copy).

        ``compare=True``: those of the compare trace. Each is the mean over the selected sites of the word's
        map (its tokens summed; heads averaged or the chosen head; the selected step or the mean over the
        captured steps), upsampled bilinearly to the image size (an inpainting crop's: to the crop's box, at its
        place in the image, NaN around it).
        """
        if compare and len(self._runs) < 2:
            raise AttnscopeError("compare=True: this viewer shows one trace; create it with view(trace, compare=other)")
        run = self._runs[1 if compare else 0]
        return np.array(run.maps(*self._selection(), self.head))

    def _selection(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], int]:
        sites = tuple(self.site_options) if self.site == ALL else (self.site,)
        steps = self._all_steps if self.step == ALL else (self.step,)
        return tuple(self.words), sites, steps, self.sample

    def _update_heads(self) -> None:
        sites = self.site_options if self.site == ALL else [self.site]
        counts = {run.heads(s) for run in self._runs for s in sites}
        self.head_count = min(counts)
        if self.head != HEAD_MEAN and (self.head_count <= 1 or self.head >= self.head_count):
            self.head = HEAD_MEAN

    def _word_options(self) -> list[str]:
        tokens, roles = self._runs[0].tokens(self.sample)
        return list(dict.fromkeys([*self._default_words(), *word_alignment(tokens, roles)]))

    def _default_words(self) -> list[str]:
        """The prompt's content phrases (:func:`attnscope.plot.report_words`), those in every trace's prompt."""
        words = report_words(self._runs[0].trace, self.sample)
        shared = [w for w in words if all(_has(run, self.sample, w) for run in self._runs[1:])]
        return shared or words

    def _refresh(self) -> None:
        words, sites, steps, sample = self._selection()
        maps = [run.maps(words, sites, steps, sample, self.head) for run in self._runs]
        finite = [m[np.isfinite(m)] for m in maps]
        values = np.concatenate(finite) if any(f.size for f in finite) else np.zeros(1, np.float32)
        low, high = float(values.min()), float(values.max())
        panels = [self._panel(run, m, words, steps, low, high) for run, m in zip(self._runs, maps)]
        statistics = self._statistics([run.statistics(words, sites, steps, sample) for run in self._runs], words)
        with self.hold_sync():
            self.map_min, self.map_max = low, high
            self.word_means = {w: _number(np.nanmean(m)) if np.isfinite(m).any() else None
                               for w, m in zip(words, maps[0])}
            self.panels = panels
            self.statistics = statistics
            self.table_html = _table_html(statistics)
            self.summary = self._describe(sites, steps)

    def _panel(self, run: _Run, maps: np.ndarray, words: Sequence[str], steps: Sequence[int], low: float,
               high: float) -> dict[str, Any]:
        image = run.image(self.sample)
        trace = run.trace
        gated = set(steps) <= {int(s) for s in trace.gated_steps}
        empty = "not computed here (a gated step)" if gated else "no value here (the stored map is NaN)"
        return {
            "role": run.role,
            "label": (f"{run.role}: " if len(self._runs) > 1 else "") + Path(str(trace.path)).name,
            "prompt": run.prompt(self.sample),
            "image": _png(np.asarray(image.convert("RGB"))) if image is not None else "",
            "maps": [{"word": w, "png": _png(colour_map(m, low, high, self._cmap)),
                      "mean": _number(np.nanmean(m)) if np.isfinite(m).any() else None,
                      "note": "" if np.isfinite(m).any() else empty}
                     for w, m in zip(words, maps)],
        }

    def _statistics(self, per_run: list[dict[str, Any]], words: Sequence[str]) -> dict[str, Any]:
        columns = [run.role for run in self._runs]
        rows = [{"label": f"share of {w!r}", "key": "target_share", "target": w,
                 "values": [stats["target_share"].get(w) for stats in per_run]} for w in words]
        rows += [{"label": label, "key": key, "target": None, "values": [stats[key] for stats in per_run]}
                 for key, label in STATISTICS]
        if len(per_run) > 1:
            columns.append("after − before")
            for row in rows:
                a, b = row["values"][:2]
                row["values"].append(None if a is None or b is None else b - a)
        return {"columns": columns, "rows": rows}

    def _describe(self, sites: Sequence[str], steps: Sequence[int]) -> str:
        where = (f"mean of {plural(len(sites), 'site')}" if self.site == ALL else short_site(self.site))
        when = (f"mean of {plural(len(steps), 'step')}" if self.step == ALL
                else self.step_labels[self.step_options.index(self.step)])
        if self.step == ALL and len(steps) < len(self.step_options):
            left_out = step_ranges(sorted(set(self.step_options) - set(steps)))
            when += f" computed{' in both runs' if len(self._runs) > 1 else ''} (gated {left_out} left out)"
        heads = "heads averaged" if self.head == HEAD_MEAN else f"head {self.head}"
        return f"{where} · {when} · {heads} · sample {self.sample}"


def _has(run: _Run, sample: int, word: str) -> bool:
    tokens, roles = run.tokens(sample)
    try:
        resolve_targets(tokens, [word], roles)
    except AttnscopeError:
        return False
    return True


def _table_html(statistics: dict[str, Any]) -> str:
    """The dominance table as HTML (every string escaped: the trace is untrusted input); the largest share
    of each column in bold."""
    rows, runs = statistics["rows"], len(statistics["columns"]) - (len(statistics["columns"]) > 1)
    shares = [[r["values"][col] for r in rows if r["key"] == "target_share" and r["values"][col] is not None]
              for col in range(runs)]
    tops = [max(found) if found else None for found in shares] + [None]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in statistics["columns"])
    body = []
    for row in rows:
        cells = []
        for col, value in enumerate(row["values"]):
            text = _format(value)
            bold = row["key"] == "target_share" and value is not None and value == tops[col]
            cells.append(f"<td>{'<b>' + text + '</b>' if bold else text}</td>")
        body.append(f"<tr><th>{html.escape(row['label'])}</th>{''.join(cells)}</tr>")
    return (f"<table class=\"atv-stats\"><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table>")


def view(trace: Any, compare: Any = None, **options: Any) -> TraceViewer:
    """An interactive Jupyter widget over a trace, read lazily: word heat maps over the generated image by site,
    step, head and sample, one colour scale for all, and the dominance statistics of the selection.

    Show it by leaving it as the last expression of a cell (needs ``anywidget``: ``pip install
    'attnscope[notebooks]'``). With ``compare=`` (e.g. a :func:`attnscope.rerun` with regulation) both runs are
    shown for the same selection, one above the other, and the table gets a column each and their difference.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=3, height=32, width=32)
    >>> v = ats.view(tr)                       # in a notebook: the widget
    >>> v.words, v.site, v.step                # the prompt's object phrases; every site and step averaged
    (['red circle', 'blue square'], 'all', 'all')
    >>> v.step = 1                             # reads step 1 of each site, one site at a time
    >>> v.map_min <= v.word_means["red circle"] <= v.map_max
    True
    >>> [row["label"] for row in v.statistics["rows"]][:3]
    ["share of 'red circle'", "share of 'blue square'", 'dominance ratio (top-1 / top-2 of these shares)']
    >>> v.words = ["green triangle"]
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: words=['green triangle']: target 'green triangle' is not in the prompt; its words are: a, red, circle, and, blue, square

    Parameters
    ----------
    trace : Trace or path
        The trace (a path or URL is opened with :func:`attnscope.open_trace`).
    compare : Trace or path, optional
        A second run of the same generation (typically ``ats.rerun(trace, interventions=[...])``): the same
        prompts, image size, number of samples and schedule (number of steps), as :func:`attnscope.compare`
        requires, and sites and captured steps in common with ``trace``.
    **options
        Initial state: ``words`` (list of words/phrases; default :func:`attnscope.plot.report_words`),
        ``site`` (a site name or ``"all"``), ``step`` (a captured step or ``"all"``), ``head`` (``"mean"``
        or an index, for traces that kept heads), ``sample``, ``opacity`` (0 to 1), ``cmap`` (a matplotlib
        colour map; default ``"viridis"``, colour-blind safe).

    Returns
    -------
    TraceViewer
        The widget; its traits (``words``, ``site``, ``step``, ``head``, ``sample``, ``opacity``) can be set
        from Python, and ``map_min``, ``map_max``, ``word_means``, ``statistics`` and :meth:`TraceViewer.current_map`
        say what it shows.
    """
    return TraceViewer(trace, compare, **options)

"""The shareable report: one self-contained HTML file of a trace (``ats.plot.report``; ``ats.report`` on top).

The page holds the run's manifest, its image, each word's heat map over the whole run and step by step
(a slider swaps pre-rendered PNGs), the step × site grid, dominance and convergence, and — given an
:class:`attnscope.Comparison` — the before/after of a rerun. Every image is a PNG inlined as a ``data:``
URI and the Content-Security-Policy forbids loading anything else, so the file opens offline in any
browser and can be mailed as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from ..errors import AttnscopeError
from ..selection import check_tol, index_positions, step_ranges
from ..stats import convergence, dominance, dominance_ratio, dominance_table, suggest_gate_step
from ..store import as_trace, check_same_generation
from ..tokens import prompt_text, resolve_targets, target_list
from ._heatmaps import heatmaps, site_step_grid, word_maps, word_panels
from ._layout import missing_glyphs_quiet, step_label
from ._lines import convergence as convergence_figure
from ._lines import dominance_lines
from ._select import (
    crop_box,
    cropped_generation,
    sample_index,
    sample_prompt,
    sample_roles,
    sample_tokens,
    site_names,
    token_positions,
)

__all__ = ["STOP_WORDS", "report", "report_words"]

#: what the default words of a report leave out: articles, conjunctions, prepositions, the shapes world's relations
STOP_WORDS = frozenset(
    "a an the and or but nor of to in on at by for with from into onto over under above below near next beside "
    "behind between left right is are was were be being its it this that these those".split())
MAX_WORDS = 6  # default words drawn at most; more are given with words=
GRID_ROWS = 6  # steps shown in the step × site grid (every step is on the slider)
DPI = {"maps": 100, "grid": 80, "lines": 90, "compare": 85}
IMAGE_SIDE = 256  # generated images larger than this are shrunk to it
SUFFIXES = (".html", ".htm")

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


class Section(NamedTuple):
    """One ``<section>`` of the page: its anchor, its heading (also the link in the navigation) and its HTML body."""

    anchor: str
    title: str
    body: str


def report(trace: Any, path: str | os.PathLike = "report.html", *, compare: Any = None,
           words: Sequence[str | int] | str | None = None, sites: str | Sequence[str] | None = None, sample: int = 0,
           tol: float = 0.05, overwrite: bool = False) -> Path:
    """Write one self-contained HTML report of a trace: manifest, image, heat maps (with a step slider), the
    step × site grid, dominance, convergence, and a before/after section for a comparison.

    ``ats.report`` is this function taking, as ``compare``, the other trace itself.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> d = tempfile.mkdtemp()
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=d + "/a.zarr", num_inference_steps=3)
    >>> ats.plot.report_words(tr)
    ['red circle', 'blue square']
    >>> path = ats.plot.report(tr, d + "/report.html", compare=ats.compare(tr, ats.rerun(tr), ["circle", "square"]))
    >>> text = path.read_text()
    >>> text.count('<section id="'), 'type="range"' in text, "http://" in text
    (7, True, False)

    Everything is computed before the file is written; the file appears whole or not at all.

    Parameters
    ----------
    trace : Trace or path
        The trace to report on (a path or URL is opened with :func:`attnscope.open_trace`). An
        incomplete trace is reported with a note at the top; one with no step written is an error.
    path : str or path-like
        The ``.html`` file to write; its folder is created. An existing file is an error unless
        ``overwrite``.
    compare : Comparison, optional
        ``ats.compare(trace, other, targets)``: adds the before/after section (target shares, images and
        heat maps of both runs, which steps were compared).
    words : str, int or sequence of them, optional
        Words, phrases or token positions of the sample's prompt to draw and measure. Default:
        :func:`report_words` (the prompt's phrases between stop-words, at most six).
    sites : str or sequence of str, optional
        Site names or globs (default: every recorded site).
    sample : int
        Which generated image (and its prompt) the figures show.
    tol : float
        Tolerance of the convergence curve's suggested gate step.
    overwrite : bool
        Replace an existing file at ``path``.

    Returns
    -------
    pathlib.Path
        The file written. Sections (``<section id=…>``): ``summary``, ``images``, ``steps`` (the slider),
        ``grid``, ``dominance``, ``convergence``, and ``compare`` when given.
    """
    out = _output_path(path, overwrite)
    check_tol(tol)
    tr = as_trace(trace, "trace")
    if not tr.complete and tr.steps_written == 0:
        raise AttnscopeError(f"trace {str(tr.path)!r} has no step written (its capture stopped before the first step "
                             f"was stored): there is nothing to report; capture it again")
    sample_index(tr, sample)
    chosen = _chosen_words(tr, words, sample)
    names = site_names(tr, sites)
    _check_comparison(compare, tr)
    sections = [_summary(tr), _images(tr, chosen, names, sample), _steps(tr, chosen, names, sample),
                _grid(tr, chosen, names, sample), _dominance(tr, chosen, names, sample),
                _convergence(tr, names, sample, tol)]
    if compare is not None:
        sections.append(_comparison(compare, sample))
    _write(out, _page(tr, sections, sample))
    return out


def report_words(trace: Any, sample: int = 0) -> list[str]:
    """The words a report draws by default: the phrases of the sample's prompt between stop-words (:data:`STOP_WORDS`)
    and punctuation, the first six; for the shapes world, its object phrases. A prompt of stop-words only gives its words.

    >>> _phrases("a red circle to the left of a blue square".split())
    ['red circle', 'blue square']
    >>> _phrases("a photo of an astronaut , riding a horse on mars".split())
    ['photo', 'astronaut', 'riding', 'horse', 'mars']
    """
    tr = as_trace(trace, "trace")
    words = prompt_text(sample_tokens(tr, sample), sample_roles(tr, sample)).split()
    phrases = _phrases(words) or list(dict.fromkeys(words))
    if not phrases:
        raise AttnscopeError(f"trace {str(tr.path)!r}: the prompt of sample {sample} has no words (an empty prompt, or "
                             f"one given as embeddings); give words= as token positions")
    return phrases[:MAX_WORDS]


def _phrases(words: list[str]) -> list[str]:
    """Runs of consecutive content words, each joined by spaces, without repeats."""
    runs: list[list[str]] = [[]]
    for word in words:
        if word.lower() in STOP_WORDS or not any(c.isalnum() for c in word):
            runs.append([])
        else:
            runs[-1].append(word)
    return list(dict.fromkeys(" ".join(run) for run in runs if run))


def _output_path(path: Any, overwrite: bool) -> Path:
    """``path`` as a Path, after checking it names an ``.html`` file that may be written."""
    if not isinstance(path, (str, os.PathLike)):
        raise AttnscopeError(f"path={path!r}: expected the path of an .html file to write")
    if not isinstance(overwrite, (bool, np.bool_)):  # "no" is truthy: it must not replace a file
        raise AttnscopeError(f"overwrite={overwrite!r}: expected True or False")
    out = Path(path)
    if out.is_dir():
        raise AttnscopeError(f"path={str(out)!r} is a directory; expected the path of an .html file to write")
    if out.suffix.lower() not in SUFFIXES:
        raise AttnscopeError(f"path={str(out)!r}: expected a file name ending in .html (or .htm)")
    if out.exists() and not overwrite:
        raise AttnscopeError(f"path={str(out)!r} exists; pass overwrite=True to replace it")
    above = next(p for p in out.absolute().parents if p.exists())
    if not above.is_dir():
        raise AttnscopeError(f"path={str(out)!r}: {str(above)!r} is a file, not a directory to write into")
    return out


def _chosen_words(tr: Any, words: Any, sample: int) -> list[str | int]:
    """``words`` as a list without repeats (in their order), each checked against the sample's prompt; the default
    when None."""
    if words is None:
        return list(report_words(tr, sample))
    chosen = target_list(words)
    if not chosen:
        raise AttnscopeError("words=[]: expected at least one word or phrase of the prompt")
    # names a word not in the prompt, or a position not on the token axis
    resolve_targets(sample_tokens(tr, sample), index_positions(chosen, token_positions(tr)), sample_roles(tr, sample))
    return list(dict.fromkeys(chosen))  # a word given twice is drawn and measured once


def _check_comparison(compare: Any, tr: Any) -> None:
    """``compare`` is None or a Comparison whose runs are of ``tr``'s generation (its before/after goes in ``tr``'s report)."""
    if compare is None:
        return
    if not all(hasattr(compare, name) for name in ("a", "b", "shares", "steps_note", "figure")):
        raise AttnscopeError(f"compare={compare!r}: expected an attnscope Comparison (ats.compare(trace, other, "
                             f"words)); ats.report and 'attnscope report --compare' take the other trace itself")
    check_same_generation(tr, compare.a, f"compare=Comparison({str(compare.a.path)!r}, {str(compare.b.path)!r})")


# --- pieces of the page -------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    """Any value as escaped HTML text (``None`` as a dash): the trace is untrusted input."""
    return "—" if value is None else html.escape(str(value))


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(fig: Any, dpi: int) -> tuple[str, tuple[int, int]]:
    """A figure as a PNG data URI (at ``dpi``, its colours reduced to a 256-colour palette) and its pixel size."""
    raw = io.BytesIO()
    with missing_glyphs_quiet():  # an emoji of the prompt: a box in the title, not a warning per figure
        fig.savefig(raw, format="png", dpi=dpi)
    picture = Image.open(raw).convert("RGB")
    small = io.BytesIO()
    picture.quantize(256, method=Image.Quantize.FASTOCTREE).save(small, format="PNG", optimize=True)  # no banding
    return _png(small.getvalue()), picture.size


def _img(uri: str, size: tuple[int, int], alt: str, **attrs: str) -> str:
    extra = "".join(f' {k.rstrip("_")}="{_esc(v)}"' for k, v in attrs.items())
    return f'<img src="{uri}" width="{size[0]}" height="{size[1]}" alt="{_esc(alt)}"{extra}>'


def _figure(fig: Any, kind: str, alt: str) -> str:
    uri, size = _figure_uri(fig, DPI[kind])
    return f"<figure>{_img(uri, size, alt)}</figure>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; the columns at ``numeric`` right-aligned. Cells are escaped."""
    def cells(tag: str, values: Sequence[Any]) -> str:
        kinds = [' class="num"' if i in numeric else "" for i in range(len(values))]
        return "".join(f"<{tag}{kind}>{_esc(v)}</{tag}>" for kind, v in zip(kinds, values))

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><thead><tr>{cells('th', header)}</tr></thead><tbody>{body}</tbody></table>"


def _share(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{100 * value:.1f} %"


def _number(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.3g}"


def plural(n: int, word: str) -> str:
    """``"1 site"``, ``"3 sites"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- sections -----------------------------------------------------------------------------------------------------


def _notes(tr: Any) -> list[str]:
    """What a reader must know before trusting the figures: an incomplete capture, NaN maps, maps of an inpainting
    crop, gated steps."""
    notes = []
    if not tr.complete:
        notes.append(f"<strong>Incomplete trace.</strong> Its capture stopped after {tr.steps_written} of "
                     f"{tr.num_steps} steps: the figures show the steps written"
                     f"{'' if tr.images else ', and no image was stored'}.")
    nan = tr.nan_maps
    if nan:
        steps = sorted({s for v in nan.values() for s in v})
        notes.append(f"<strong>NaN attention.</strong> The model produced NaN maps at {plural(len(nan), 'site')}, "
                     f"steps {_esc(step_ranges(steps))} (NaN weights or an overflow): statistics over these steps are "
                     f"NaN and the image is likely blank.")
    if (cropped := cropped_generation(tr)) is not None:
        notes.append(f"<strong>Maps of a crop.</strong> {_esc(cropped[0].upper() + cropped[1:])}.")
    elif (box := crop_box(tr)) is not None:
        notes.append(f"<strong>Maps of a crop.</strong> The pipeline generated only the box x {box[0]}–{box[2]}, "
                     f"y {box[1]}–{box[3]} px of the image (inpainting with padding_mask_crop) and pasted it back: "
                     f"the heat maps are drawn inside that box, the image around it uncovered.")
    if tr.gated_steps:
        notes.append(f"<strong>Gated steps.</strong> Steps {_esc(step_ranges(tr.gated_steps))} reused cached "
                     f"attention (TGATE): they have no maps and are left out of the statistics.")
    return notes


def _interventions(manifest: Any, params: bool = True) -> str:
    """The manifest's interventions, by name, with their parameters as JSON when ``params``; ``"none"``."""
    found = manifest.get("interventions") if isinstance(manifest, dict) else None
    if not isinstance(found, list) or not found:
        return "none"
    return "; ".join((f"{i.get('name')} {json.dumps(i.get('params', {}), sort_keys=True)}" if params else
                      str(i.get("name"))) if isinstance(i, dict) else str(i) for i in found)


def _steps_row(tr: Any, run: dict) -> str:
    """The run's denoiser steps and their timesteps, and the guidance: an img2img run starts mid-schedule,
    Heun runs 2N−1 steps for N, a run without guidance records the prompt's rows alone.

    >>> from types import SimpleNamespace as Run
    >>> _steps_row(Run(timesteps=[499.0, 374.0]), {"num_steps": 2, "num_inference_steps": 4, "guidance_scale": 7.5,
    ...                                            "pipeline_kwargs": {"strength": 0.5}, "guidance": True})
    '2 (num_inference_steps 4, strength 0.5), t = 499 … 374; guidance scale 7.5'
    """
    kwargs = run.get("pipeline_kwargs") if isinstance(run.get("pipeline_kwargs"), dict) else {}
    asked = [f"num_inference_steps {run['num_inference_steps']}"] if run.get("num_inference_steps") not in (
        None, run.get("num_steps")) else []
    asked += [f"{k} {kwargs[k]}" for k in ("strength", "denoising_start", "denoising_end") if k in kwargs]
    times = np.asarray(getattr(tr, "timesteps", []), dtype=np.float64)
    known = times[np.isfinite(times)]
    span = f", t = {known[0]:g} … {known[-1]:g}" if known.size > 1 else f", t = {known[0]:g}" if known.size else ""
    off = " (guidance off: the prompt's rows alone)" if run.get("guidance") is False else ""
    return (f"{run.get('num_steps')}{' (' + ', '.join(asked) + ')' if asked else ''}{span}; guidance scale "
            f"{run.get('guidance_scale')}{off}")


_SHOWN_ELSEWHERE = ("num_inference_steps", "guidance_scale", "height", "width", "strength", "denoising_start",
                    "denoising_end", "negative_prompt", "num_images_per_prompt")


def _arguments_row(run: dict) -> str:
    """The pipeline's other arguments as recorded (a CFG cutoff callback, ``padding_mask_crop``, …) and the names
    of those the manifest could not hold (an init image, a mask, a callback function)."""
    kwargs = run.get("pipeline_kwargs") if isinstance(run.get("pipeline_kwargs"), dict) else {}
    shown = [f"{k}={json.dumps(v, sort_keys=True)}" for k, v in kwargs.items() if k not in _SHOWN_ELSEWHERE]
    unrecorded = run.get("unrecorded_kwargs") if isinstance(run.get("unrecorded_kwargs"), list) else []
    if unrecorded:
        shown.append(f"not recorded: {', '.join(map(str, unrecorded))}")
    return "; ".join(shown)


def _summary_rows(tr: Any) -> list[tuple[str, Any]]:
    m = tr.manifest if isinstance(tr.manifest, dict) else {}
    run, model, capture = (m.get(k) if isinstance(m.get(k), dict) else {} for k in ("run", "model", "capture"))
    scheduler = m.get("scheduler") if isinstance(m.get("scheduler"), dict) else {}
    config = scheduler.get("config") if isinstance(scheduler.get("config"), dict) else {}
    versions = m.get("versions") if isinstance(m.get("versions"), dict) else {}
    captured = capture.get("steps")
    parent = m.get("parent") if isinstance(m.get("parent"), dict) else None
    state = "complete" if tr.complete else f"incomplete: {tr.written}"
    return [
        ("trace", str(tr.path)),
        ("model", f"{model.get('reference')} ({model.get('pipeline_class')}, {model.get('denoiser_class')})"),
        ("prompts" if len(run.get("prompts") or []) > 1 else "prompt", " | ".join(map(str, run.get("prompts") or []))),
        ("negative prompt", run.get("negative_prompt") or "none"),
        ("seed", f"{run.get('seed')} (generator on {run.get('generator_device')})"),
        ("steps", _steps_row(tr, run)),
        *([("pipeline arguments", arguments)] if (arguments := _arguments_row(run)) else []),
        ("scheduler", f"{scheduler.get('class')} (prediction {config.get('prediction_type')}, "
                      f"spacing {config.get('timestep_spacing')})"),
        ("size", f"{run.get('height')} × {run.get('width')} px, {run.get('samples')} image(s)"),
        ("dtype, device", f"{m.get('dtype')}, {m.get('device')}"),
        ("capture", f"{len(tr.sites)} sites; steps {step_ranges(captured) if isinstance(captured, list) else captured}; "
                    f"heads {capture.get('heads')}; tokens {capture.get('tokens')}; branch {capture.get('branch')}; "
                    f"stored as {capture.get('dtype')}"),
        ("interventions", _interventions(m)),
        *([("rerun of", parent.get("path"))] if parent else []),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "python") + f"; python "
                     f"{versions.get('python')}"),
        ("completeness", state),
        ("NaN maps", "; ".join(f"{s}: steps {step_ranges(v)}" for s, v in tr.nan_maps.items()) or "none"),
        ("gated steps", step_ranges(tr.gated_steps) if tr.gated_steps else "none"),
    ]


def _summary(tr: Any) -> Section:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _summary_rows(tr))
    return Section("summary", "Run", f'<table class="summary">{rows}</table>')


def _image_tag(image: Any, label: str) -> str:
    """A generated image as a lossless PNG (shrunk to ``IMAGE_SIDE`` when larger), small ones shown enlarged."""
    picture = image.copy()
    picture.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    data = io.BytesIO()
    picture.save(data, format="PNG", optimize=True)
    scale = max(1, 192 // max(picture.size))
    shown = (picture.size[0] * scale, picture.size[1] * scale)
    return (f"<figure>{_img(_png(data.getvalue()), shown, label, class_='pixels' if scale > 1 else 'photo')}"
            f"<figcaption>{_esc(label)}</figcaption></figure>")


def _images(tr: Any, words: list, names: list[str], sample: int) -> Section:
    images = tr.images
    shown = "".join(_image_tag(image, f"sample {i}") for i, image in enumerate(images)) if images else \
        '<p class="muted">No image stored (the capture did not finish).</p>'
    fig = heatmaps(tr, words, names, None, sample)
    text = ("<p>Each word's map, averaged over heads, every captured step and the sites, upsampled to the image and "
            "scaled to [0, 1], over the image.</p>")
    return Section("images", "Image and heat maps", f'<div class="row">{shown}</div>{text}'
                   + _figure(fig, "maps", "heat maps of " + ", ".join(map(str, words))))


def _steps(tr: Any, words: list, names: list[str], sample: int) -> Section:
    """The per-step heat maps: one PNG per captured step, swapped by the slider's script."""
    maps = word_maps(tr, words, names, None, sample, per_step=True)
    steps = [int(s) for s in maps["step"].values]
    gated = set(tr.gated_steps)
    fig, axes = word_panels(tr, maps.sel(step=steps[0]).attn.normalize("minmax"), sample)
    overlays = [ax.images[-1] for ax in axes[1:]]  # each word panel's map, drawn last
    frames, labels = [], []
    for i, step in enumerate(steps):  # one figure, its maps swapped: the frames line up and drawing is cheap
        for overlay, values in zip(overlays, maps.sel(step=step).attn.normalize("minmax").values):
            overlay.set_data(values)
        uri, size = _figure_uri(fig, DPI["maps"])
        fig.set_layout_engine("none")  # keep the first frame's layout
        frames.append(uri)
        labels.append(step_label(maps, step) + (" — gated, no maps" if step in gated else "")
                      + f"  ·  {i + 1} of {len(steps)}")
    data = json.dumps({"frames": frames, "labels": labels}).replace("</", "<\\/")
    body = (f"<p>Each word's map at one denoising step (heads and sites averaged, scaled to [0, 1] per step). Drag "
            f"the slider or use the arrow keys.</p>"
            f'<div class="stepper"><input type="range" id="step-slider" min="0" max="{len(steps) - 1}" value="0" '
            f'step="1" aria-label="denoising step"><output id="step-label" for="step-slider">{_esc(labels[0])}'
            f"</output></div>"
            f'<div id="step-view">{_img(frames[0], size, "heat maps at " + labels[0], id="step-map")}</div>'
            f'<script type="application/json" id="step-frames">{data}</script>')
    return Section("steps", "Step by step", body)


def _grid_steps(tr: Any, names: list[str]) -> list[int]:
    """At most ``GRID_ROWS`` captured steps with maps, evenly spread from the first to the last."""
    captured = [int(s) for s in tr.attention(names[0])["step"].values]
    captured = [s for s in captured if s not in set(tr.gated_steps)] or captured
    if len(captured) <= GRID_ROWS:
        return captured
    return [captured[i] for i in np.unique(np.linspace(0, len(captured) - 1, GRID_ROWS).round().astype(int))]


def _grid(tr: Any, words: list, names: list[str], sample: int) -> Section:
    steps = _grid_steps(tr, names)
    figures = "".join(f"<h3>{_esc(word)}</h3>" + _figure(site_step_grid(tr, word, names, steps, sample), "grid",
                                                          f"step × site grid of {word}") for word in words)
    text = (f"<p>Each word's map at each site's own resolution (columns) and at {plural(len(steps), 'step')} "
            f"({_esc(', '.join(map(str, steps)))}; rows), heads averaged, one colour scale per word. Every step is "
            f"on the slider above.</p>")
    return Section("grid", "Step × site grid", text + figures)


def _dominance(tr: Any, words: list, names: list[str], sample: int) -> Section:
    ds = dominance(tr, targets=words, sites=names)
    one = ds.sel(sample=ds["sample"].values[sample_index(tr, sample)]).mean("site")
    computed = one["step"].values[one.target_share.notnull().any("target").values]  # gated steps have no maps
    first, last = (computed[0], computed[-1]) if computed.size else (one["step"].values[0], one["step"].values[-1])

    def summary(da: Any) -> list[float]:
        return [float(da.mean()), float(da.sel(step=first)), float(da.sel(step=last))]

    columns = ["mean over steps", f"step {first}", f"step {last}"]
    targets = [str(t) for t in one["target"].values]
    values = np.array([summary(one.target_share.sel(target=t)) for t in targets])  # (target, column)
    shares = [[t, *map(_share, row)] for t, row in zip(targets, values)]
    ratios = dominance_ratio(values.T)  # of the shares shown, column by column: the table agrees with itself
    stats = [["dominance ratio", *map(_number, ratios)]]
    stats += [[name.replace("_", " "), *map(fmt, summary(one[name]))] for name, fmt in
              (("entropy", _number), ("gini", _number), ("sink_share", _share))]
    text = ("<p>Target share: each word's part of the attention on the prompt's words, per step (sites averaged). "
            "Dominance ratio: the largest target share in the table over the second; sink share: attention on the "
            "start/end tokens.</p>")
    fig = dominance_lines(ds, "target_share", sample=sample)
    return Section("dominance", "Dominance", text + _figure(fig, "lines", "target shares over the steps")
                   + _table(["target share", *columns], shares, (1, 2, 3))
                   + _table(["statistic", *columns], stats, (1, 2, 3))
                   + f"<details><summary>Per token (text table, every sample)</summary><pre>"
                     f"{_esc(dominance_table(ds))}</pre></details>")


def _convergence(tr: Any, names: list[str], sample: int, tol: float) -> Section:
    try:
        conv = convergence(tr, sites=names, tol=tol)
    except AttnscopeError as exc:
        return Section("convergence", "Convergence", f'<p class="muted">Not available: {_esc(exc)}</p>')
    try:
        gate = f"Suggested TGATE gate step: <strong>{suggest_gate_step(conv, tol=tol)}</strong> (tolerance {tol:g})."
    except AttnscopeError as exc:
        gate = f"No suggested gate step: {_esc(exc)}"
    text = f"<p>Step-to-step change of the cross-attention ({_esc(conv.attrs.get('of', 'maps'))}). {gate}</p>"
    return Section("convergence", "Convergence", text + _figure(convergence_figure(conv, sample), "lines",
                                                                 "convergence over the steps"))


def _comparison(c: Any, sample: int) -> Section:
    df = c.shares(sample)
    rows = [[str(t), _share(r.before), _share(r.after), f"{100 * r.change:+.1f} pt" if np.isfinite(r.change) else "—"]
            for t, r in df.iterrows()]
    change = c.image_change()
    text = (f"<p>Before: <code>{_esc(c.a.path)}</code> (interventions: {_esc(_interventions(c.a.manifest, False))});"
            f" after: <code>{_esc(c.b.path)}</code> (interventions: {_esc(_interventions(c.b.manifest, False))}). "
            f"Mean target shares over the {_esc(c.steps_note())} and the sites"
            + (f"; the images differ by {change:.4f} per pixel and channel (mean absolute difference, 0–1)"
               if change is not None else "") + ".</p>")
    after = _interventions(c.b.manifest)
    params = "" if after == "none" else (f"<details><summary>Parameters of the interventions after</summary><pre>"
                                         f"{_esc(after)}</pre></details>")
    return Section("compare", "Before / after", text + _table(["target", "before", "after", "change"], rows, (1, 2, 3))
                   + params + _figure(c.figure(sample), "compare", "before and after"))


# --- the page -----------------------------------------------------------------------------------------------------


_STYLE = """
:root{--ink:#1d2330;--muted:#5b6475;--line:#dde1e8;--link:#2554a8}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:#f5f6f8}
header,main,footer{max-width:1100px;margin:0 auto;padding:0 20px}
header{padding-top:22px}
h1{font-size:1.45rem;margin:0}
.prompt{font-size:1.2rem;margin:.1rem 0 .6rem}
nav{margin:.4rem 0 0}
nav a{color:var(--link);margin-right:1rem;text-decoration:none}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 20px;margin:14px 0}
h2{font-size:1.15rem;margin:0 0 .5rem}
h3{font-size:1rem;margin:.8rem 0 .2rem}
p{margin:.3rem 0 .7rem}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:8px 12px;border-radius:4px;margin:8px 0}
table{border-collapse:collapse;font-size:.9rem;margin:6px 24px 12px 0;display:inline-table;vertical-align:top}
th,td{text-align:left;padding:3px 14px 3px 0;border-bottom:1px solid var(--line);vertical-align:top}
table.summary th{color:var(--muted);font-weight:500;white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}
img.pixels{image-rendering:pixelated}
figure{margin:0 16px 10px 0;display:inline-block;vertical-align:top}
figcaption{color:var(--muted);font-size:.85rem}
.stepper{display:flex;align-items:center;gap:14px;margin:4px 0 8px}
.stepper input{flex:1;max-width:520px}
output{font-variant-numeric:tabular-nums;font-weight:600}
details{margin-top:4px}
pre{background:#f3f4f7;padding:10px;overflow-x:auto;font-size:.8rem;white-space:pre-wrap}
code{font-size:.85rem}
.muted,footer{color:var(--muted)}
footer{font-size:.85rem;padding-bottom:24px}
"""

_SCRIPT = """
(() => {
  const data = JSON.parse(document.getElementById("step-frames").textContent);
  const slider = document.getElementById("step-slider");
  const image = document.getElementById("step-map");
  const label = document.getElementById("step-label");
  slider.addEventListener("input", () => {
    const i = Number(slider.value);
    image.src = data.frames[i];
    image.alt = "heat maps at " + data.labels[i];
    label.textContent = data.labels[i];
  });
})();
"""


def _page(tr: Any, sections: list[Section], sample: int) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        writer = version("attnscope")
    except PackageNotFoundError:
        writer = "(not installed)"
    prompt = sample_prompt(tr, sample)
    notes = "".join(f'<p class="note">{n}</p>' for n in _notes(tr))
    nav = "".join(f'<a href="#{s.anchor}">{_esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.anchor}"><h2>{_esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>attnscope report — {_esc(prompt)}</title><style>{_STYLE}</style></head><body>"
            f'<header><h1>attnscope report</h1><p class="prompt">“{_esc(prompt)}”</p>{notes}<nav>{nav}</nav></header>'
            f"<main>{body}</main>"
            f"<footer>Written by attnscope {_esc(writer)} from <code>{_esc(tr.path)}</code>. One self-contained file: "
            f"every image is inline and nothing is loaded from the network.</footer>"
            f"<script>{_SCRIPT}</script></body></html>\n")


def _write(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` through a temporary file beside it, so a reader never sees half a report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, out)

"""``ats.stats.dominance``: the attention-dominance statistics of a trace as one ``xarray.Dataset``."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..selection import index_positions, run_steps, select_captured_steps, select_site_names, site_descriptions
from ..tokens import (
    prompt_text,
    resolve_targets,
    segment_occurrences,
    target_list,
    token_roles,
    token_words,
)
from . import _formulas as f
from ._sites import reduce_sites, sites_dataset

__all__ = ["ROW_PRESERVING", "dominance", "row_editing_interventions", "site_arrays", "sites_and_text", "special_prompt", "target_positions", "token_role_rows", "token_texts"]

_MAP_DIMS = ("head", "y", "x", "token")
#: interventions that leave each recorded row of probabilities summing to 1 at a cross-attention site: they edit the
#: latents (AttendAndExcite) or a site's output (SpatialTemporal, TGate; a call TGate bypasses is stored as NaN).
#: Reweight scales probabilities after the softmax and AttentionRegulation gives back the unedited SOT/EOT
#: probabilities after its softmax, so their rows do not sum to 1; an unknown intervention is not trusted either.
ROW_PRESERVING = ("AttendAndExcite", "SpatialTemporal", "TGate")


def site_arrays(source: Any, sites: Any = None, steps: Any = None) -> tuple[dict[str, Any], dict[str, bool]]:
    """The attention arrays to analyse, by site name, and per site whether its token axis was cut to the prompt
    (the array's ``tokens`` attribute, which :meth:`Trace.attention` sets: ``"prompt"``).

    ``source`` is a :class:`~attnscope.Trace`, one ``xarray.DataArray`` (dims ``step, sample, head, y, x,
    token``; its ``name`` names the site) or a mapping of site name → DataArray.
    """
    import xarray as xr

    if isinstance(source, xr.DataArray):
        arrays = {str(source.name or "site"): source}
    elif isinstance(source, Mapping):
        arrays = dict(source)
    elif hasattr(source, "attention") and hasattr(source, "sites"):
        described = {n: source.site_description(n) for n in source.sites} if callable(sites) else None
        arrays = {n: source.attention(n) for n in select_site_names(sites, source.sites, described)}
        sites = None
    else:
        raise AttnscopeError(f"source of type {type(source).__name__}: expected a Trace, an xarray.DataArray "
                             "or a mapping of site name to DataArray")
    if sites is not None:
        arrays = {n: arrays[n] for n in select_site_names(sites, list(arrays), site_descriptions(arrays))}
    for name, da in arrays.items():
        if not isinstance(da, xr.DataArray):
            raise AttnscopeError(f"site {name!r}: a {type(da).__name__}; expected an xarray.DataArray with dims "
                                 "(step, sample, head, y, x, token)")
        missing = [d for d in ("step", "sample", *_MAP_DIMS) if d not in da.dims]
        if missing:
            raise AttnscopeError(f"site {name!r}: array with dims {da.dims} lacks {missing}; expected "
                                 "(step, sample, head, y, x, token)")
    if steps is not None:
        total = run_steps(source, arrays.values())
        arrays = {n: da.sel(step=select_captured_steps(steps, da["step"].values.tolist(), total, n))
                  for n, da in arrays.items()}
    return arrays, {n: getattr(da, "attrs", {}).get("tokens") == "prompt" for n, da in arrays.items()}


def _is_joint(da: Any) -> bool:
    return da.attrs.get("site", {}).get("kind") == "joint"


def row_editing_interventions(source: Any) -> list[str]:
    """Names of the interventions in ``source``'s manifest (a rerun records them) after which a cross-attention row
    of the stored probabilities need not sum to 1 (all but :data:`ROW_PRESERVING`); ``[]`` for arrays without
    their trace, whose manifest is not at hand.

    >>> class Run:
    ...     manifest = {"interventions": [{"name": "TGate", "params": {}}, {"name": "Reweight", "params": {}}]}
    >>> row_editing_interventions(Run()), row_editing_interventions(None)
    (['Reweight'], [])
    """
    manifest = getattr(source, "manifest", None)
    listed = manifest.get("interventions") if isinstance(manifest, dict) else None
    names = [d.get("name") if isinstance(d, dict) else None for d in listed] if isinstance(listed, list) else []
    return [str(n) for n in names if n not in ROW_PRESERVING]


def _text_mass_total(source: Any, name: str, da: Any) -> np.ndarray:
    """A joint site's total text mass per (step, sample), heads averaged (its rows sum to it, not to 1); NaN where
    ``source`` is not a trace that stores it."""
    if not hasattr(source, "text_mass"):
        return np.full((da.sizes["step"], da.sizes["sample"]), np.nan)
    mass = source.text_mass(name).sel(step=da["step"].values)
    return np.asarray(mass.astype("float64").mean("head").sum(("y", "x")).transpose("step", "sample").values)


def token_texts(da: Any, tokens: Sequence[str] | None) -> list[list[str]]:
    """Per sample, the token strings of ``da``'s token axis: ``tokens`` if given, else its ``token_text`` coordinate."""
    if tokens is not None:
        if len(tokens) != da.sizes["token"]:
            raise AttnscopeError(f"tokens: {len(tokens)} strings for a token axis of {da.sizes['token']}")
        return [list(tokens)] * da.sizes["sample"]
    if "token_text" not in da.coords:
        raise AttnscopeError("the attention array has no 'token_text' coordinate; pass tokens=[...] (the token strings)")
    text = np.asarray(da["token_text"].values)
    text = np.broadcast_to(text, (da.sizes["sample"], da.sizes["token"])) if text.ndim == 1 else text
    return [[str(t) for t in row] for row in text]


def token_role_rows(da: Any, texts: list[list[str]], tokens: Sequence[str] | None) -> list[list[str]]:
    """Per sample, each position's role: the stored ``token_role`` coordinate, else read from the strings."""
    if tokens is None and "token_role" in da.coords:
        roles = np.asarray(da["token_role"].values)
        roles = np.broadcast_to(roles, (da.sizes["sample"], da.sizes["token"])) if roles.ndim == 1 else roles
        return [[str(r) for r in row] for row in roles]
    return [token_roles(t) for t in texts]


def target_positions(texts: list[list[str]], roles: list[list[str]], targets: Any,
                     stored: Sequence[int] | None = None) -> tuple[list[str], list[list[list[int]]]]:
    """Target labels and, per sample, each target's indices along the token axis (empty where a sample's prompt
    lacks it). An int target is a token position, a value of the ``token`` coordinate (``stored``: the positions
    the trace kept, ``0…k, 77…m`` on SD3 with ``tokens="prompt"``), as the statistics report it.

    A word or phrase listed once covers every occurrence; one listed ``n`` times (case ignored: two identical
    objects, ``["red circle", "red circle"]``) is its occurrences one by one, the k-th listing the k-th occurrence
    (in each text segment: both copies of SD3's prompt), labelled ``"red circle #1"``, ``"red circle #2"``. A
    position listed twice is an error.

    >>> texts = [["<|startoftext|>", "red</w>", "<|endoftext|>", "▁red", "</s>"]]   # CLIP, then T5 from 77
    >>> target_positions(texts, [["sot", "word", "eot", "word", "eot"]], ["red", 78], stored=[0, 1, 2, 77, 78])
    (['red', '78'], [[[1, 3], [4]]])
    >>> target_positions([["<|startoftext|>", "red</w>", "and</w>", "red</w>", "<|endoftext|>"]],
    ...                  [["sot", "word", "word", "word", "eot"]], ["red", "red"])
    (['red #1', 'red #2'], [[[1], [3]]])
    """
    if targets is None:
        targets = list(dict.fromkeys(w for w in token_words(texts[0], roles[0]) if w))
    items = target_list(targets)
    if not items:
        raise AttnscopeError(f"targets={targets!r}: no word to measure (by default every word of the prompt: an empty "
                             "prompt has none); give words, phrases or token positions")
    indexed = index_positions(items, stored) if stored is not None else items
    mention, listed = _mentions(items)
    per_sample: list[list[list[int]]] = []
    errors: dict[int, AttnscopeError] = {}
    for text, text_roles in zip(texts, roles):
        row = []
        for k, t in enumerate(indexed):
            try:
                cols = next(iter(resolve_targets(text, [t], text_roles).values()))
                if listed[k] > 1:
                    cols = _nth_occurrence(text, text_roles, str(t), mention[k], listed[k])
                row.append(cols)
            except AttnscopeError as exc:
                errors.setdefault(k, exc)
                row.append([])
        per_sample.append(row)
    for k in range(len(items)):
        if all(not row[k] for row in per_sample):
            raise errors[k]
    labels = [f"{t} #{mention[k] + 1}" if listed[k] > 1 else str(t) for k, t in enumerate(items)]
    return labels, per_sample


def _mentions(items: list[Any]) -> tuple[list[int], list[int]]:
    """Per target, which mention of its word or phrase it is (from 0; case and spacing ignored) and how many times
    it is listed. A token position listed twice is an error: it names one token."""
    key: list[Any] = [" ".join(t.lower().split()) if isinstance(t, str) else int(t)
                      if isinstance(t, numbers.Integral) and not isinstance(t, bool) else ("not a target", i)
                      for i, t in enumerate(items)]  # a bad target is refused by resolve_targets, naming it
    counts = {k: key.count(k) for k in key}
    twice = [k for k, n in counts.items() if isinstance(k, int) and n > 1]
    if twice:
        raise AttnscopeError(f"target {twice[0]} is listed {counts[twice[0]]} times: a token position names one token; "
                             f"list it once (a word or phrase listed k times is its occurrences one by one)")
    return [key[:i].count(k) for i, k in enumerate(key)], [counts[k] for k in key]


def _nth_occurrence(text: list[str], roles: list[str], target: str, k: int, listed: int) -> list[int]:
    """The positions of the ``k``-th occurrence (from 0) of ``target`` in each text segment of one prompt (SD3
    spells it twice: CLIP, then T5); an error when no segment has that many."""
    per_segment = segment_occurrences(text, target, roles)
    cols = [p for occ in per_segment if k < len(occ) for p in occ[k]]
    if not cols:
        most = max(map(len, per_segment))
        raise AttnscopeError(f"target {target!r} is listed {listed} times but occurs {most} time(s) in the "
                             f"prompt {prompt_text(text, roles)!r}: the k-th listing is the k-th occurrence; list it "
                             f"at most {most} time(s), or name the objects apart (\"red circle\", \"blue circle\")")
    return sorted(cols)


def dominance(source: Any, targets: Sequence[str | int] | str | None = None, *, sites: Any = None,
              steps: Any = None, include_special: bool = False, tokens: Sequence[str] | None = None) -> Any:
    """Attention-dominance statistics per step, site and sample (definitions in docs/analysis.md), as an ``xarray.Dataset``.

    Heads are averaged first. Every statistic comes from one pass over the maps (a small site read
    whole, a large one chunk by chunk with dask: stores larger than memory are fine); one function per formula in :mod:`attnscope.stats` (``mass_share``, ``entropy``, …).

    Parameters
    ----------
    source : Trace, xarray.DataArray or mapping of site name → DataArray
        Usually ``ats.open_trace(path)``; arrays have dims ``(step, sample, head, y, x, token)``.
    targets : list of words, phrases or token positions, optional
        The candidates of the dominance ratio, e.g. ``["circle", "blue square"]``. Default: every
        distinct word of the first prompt. Resolved on each sample's own prompt; a target in no
        prompt is an error that lists the prompt's words. A word or phrase listed once covers every
        occurrence; listed k times, the k-th listing is its k-th occurrence (``["red circle", "red
        circle"]`` in "a red circle and a red circle"), labelled ``"red circle #1"``, ``"red circle #2"``.
    sites : glob, list of names/globs or predicate, optional
        Which sites (default all). A predicate gets each site as capture's does (``lambda site: site.level
        == 1``): its stored description, :class:`~attnscope.selection.RecordedSite`.
    steps : int, list of int or slice, optional
        Which steps of the run (an int, list or slice over the run's steps, like ``capture``; all
        must be captured; default every captured step).
    include_special : bool
        Count SOT, EOT and padding among the prompt tokens ``P`` (default: word pieces only). On a token axis cut
        to the prompt (``tokens="prompt"``) the padding is left out: there it is only the columns a longer prompt
        of the batch kept, and a sample's numbers do not depend on its batch.
    tokens : list of str, optional
        Token strings, for arrays without a ``token_text`` coordinate.

    Returns
    -------
    xarray.Dataset
        Dims ``step, site, sample, token`` (the positions in ``P``; coordinates ``token_text`` and
        ``word`` on them) and ``target``. Variables ``mass_share`` and ``argmax_coverage`` (step, site,
        sample, token); ``target_share`` (step, site, sample, target); ``dominance_ratio``,
        ``entropy``, ``gini`` and ``sink_share`` (step, site, sample). The coordinate ``target_tokens``
        (sample, target, token) is True where a token belongs to a target. ``sink_share`` is NaN at the
        cross-attention sites of a trace whose token axis was cut to the prompt (``tokens="prompt"``, the
        default on PixArt and Sana) and whose manifest lists an intervention that edits the probabilities
        (``Reweight``, ``AttentionRegulation``; see :func:`row_editing_interventions`): its rows need not
        sum to 1, so the mass on the cut-off padding is unknown (the ``sink_share`` attribute says so).

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=4)
    >>> ds = ats.stats.dominance(tr, targets=["circle", "square"])
    >>> dict(ds.sizes)
    {'step': 4, 'site': 7, 'sample': 1, 'token': 7, 'target': 2}
    >>> float(ds.mass_share.sum("token").max().round(6))   # shares over the prompt's words sum to 1
    1.0
    """
    if not isinstance(include_special, (bool, np.bool_)):
        raise AttnscopeError(f"include_special={include_special!r}: expected True or False")
    arrays, cut, texts, roles = sites_and_text(source, sites, steps, tokens)
    first = next(iter(arrays.values()))
    words = np.array([[r == "word" for r in row] for row in roles])
    prompt = special_prompt(roles, any(cut.values())) if include_special else words
    stored = first["token"].values if "token" in first.coords else np.arange(first.sizes["token"])
    labels, positions = target_positions(texts, roles, targets, stored)

    def sums_of(one: bool) -> Any:
        return lambda maps, samples: f.map_sums(maps, prompt[None, samples], words[None, samples], total_is_one=one)

    # a cut token axis: the total is each pixel's row sum, 1 at cross sites and the text mass at joint ones
    kernels = {name: sums_of(cut[name] and not _is_joint(da)) for name, da in arrays.items()}
    computed = reduce_sites(arrays, kernels, 2 * first.sizes["token"] + 4)
    edited = row_editing_interventions(source)
    unknown_total = [name for name, da in arrays.items() if cut[name] and not _is_joint(da) and edited]
    for sums, (name, da) in zip(computed, arrays.items()):
        if cut[name] and _is_joint(da):
            sums[..., -1] = _text_mass_total(source, name, da)
        elif name in unknown_total:  # the rows need not sum to 1 and the cut-off columns are gone: no total
            sums[..., -1] = np.nan

    keep = np.flatnonzero(prompt.any(0))
    per_site = []
    for sums in computed:
        share = f.mass_share(sums, prompt[None])
        tshare = np.stack([f.target_share(share[:, s], positions[s]) for s in range(share.shape[1])], 1)
        per_site.append({
            "mass_share": (("step", "sample", "token"), share[..., keep]),
            "argmax_coverage": (("step", "sample", "token"), f.argmax_coverage(sums, prompt[None])[..., keep]),
            "target_share": (("step", "sample", "target"), tshare),
            "dominance_ratio": (("step", "sample"), f.dominance_ratio(tshare)),
            "entropy": (("step", "sample"), f.entropy(sums)),
            "gini": (("step", "sample"), f.gini(share, prompt[None])),
            "sink_share": (("step", "sample"), f.sink_share(sums, words[None])),
        })
    out = sites_dataset(arrays, per_site).transpose("step", "site", "sample", "token", "target")
    tok_text = np.array(texts)[:, keep]
    tok_word = np.array([token_words(t, r) for t, r in zip(texts, roles)])[:, keep]
    same = all(row == texts[0] for row in texts)
    token_coords = ({"token_text": ("token", tok_text[0]), "word": ("token", tok_word[0])} if same else
                    {"token_text": (("sample", "token"), tok_text), "word": (("sample", "token"), tok_word)})
    out = out.assign_coords(token=stored[keep], target=labels, **token_coords)  # the stored positions
    member = np.zeros((len(texts), len(labels), len(keep)), bool)
    for sample, row in enumerate(positions):
        for k, cols in enumerate(row):
            member[sample, k] = np.isin(keep, cols)
    out = out.assign_coords(target_tokens=(("sample", "target", "token"), member))
    if unknown_total:
        out.attrs["sink_share"] = (f"NaN at {len(unknown_total)} cross-attention site(s): the token axis was cut to "
                                   f"the prompt and {', '.join(dict.fromkeys(edited))} edited the probabilities, so "
                                   f"a row's total (the sink's denominator) is unknown; capture with tokens='all'")
    out.attrs.update({"targets": labels, "heads": "averaged before the statistics",
                      "prompt_tokens": _prompt_tokens(include_special, any(cut.values())),
                      "definitions": "docs/analysis.md of attnscope; one function per formula in attnscope.stats"})
    return out


def _prompt_tokens(include_special: bool, cut: bool) -> str:
    if not include_special:
        return "word pieces"
    return ("word pieces, SOT, EOT and added text; no padding (the token axis was cut to the prompt)" if cut else
            "word pieces, SOT, EOT and padding")


def special_prompt(roles: list[list[str]], cut: bool) -> np.ndarray:
    """Per sample, the positions ``P`` of ``include_special=True``: every position, but on a token axis cut to the
    prompt (``tokens="prompt"``) not the padding. Such an axis runs to the end of the batch's longest text, so the
    padding a sample has there is only what a longer prompt of its batch kept: counting it would make the
    sample's statistics depend on its batch (alone, its axis ends at its own end of text).

    >>> special_prompt([["sot", "word", "eot", "pad"]], cut=True).tolist()
    [[True, True, True, False]]
    >>> special_prompt([["sot", "word", "eot", "pad"]], cut=False).tolist()
    [[True, True, True, True]]
    """
    return np.array([[not cut or r != "pad" for r in row] for row in roles], dtype=bool)


def sites_and_text(source: Any, sites: Any, steps: Any, tokens: Any) -> tuple[dict[str, Any], Any, list, list]:
    """``(arrays, cut, texts, roles)``: the selected sites' maps (:func:`site_arrays`, at least one) and, per
    sample, the token strings and roles of their text axis."""
    arrays, cut = site_arrays(source, sites, steps)
    if not arrays:
        raise AttnscopeError("no sites to analyse")
    for name, da in arrays.items():
        if not da.sizes["step"]:
            raise AttnscopeError(f"site {name!r}: the array has no step; expected maps of at least one step")
    first = next(iter(arrays.values()))
    texts = token_texts(first, tokens)
    return arrays, cut, texts, token_role_rows(first, texts, tokens)

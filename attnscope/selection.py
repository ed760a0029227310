"""Parsing the user's choice of sites, steps, heads, tokens and branches, with clear errors.

The one step-spec parser (:func:`select_steps`) serves capture, the statistics, the plots and the
interventions alike: a step is an index into the run's denoising steps, negative indices and slices
count from the run's end. Sites are anything with a ``.name`` (a ``CrossAttentionSite``, a :class:`RecordedSite`
read from a site's stored description, or a bare name through :func:`select_site_names`), so this module needs
nothing of the hook core.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .errors import AttnscopeError

__all__ = ["DTYPES", "SEEDS", "RecordedSite", "SiteSpec", "StepSpec", "check_choice", "check_seed", "check_tol", "index_positions",
           "parse_step_text",
           "run_steps",
           "select_captured_steps", "select_site_names", "select_sites", "select_steps", "site_descriptions",
           "step_ranges", "step_runs"]

SiteSpec = None | str | Sequence[str] | Callable[[Any], bool]
StepSpec = None | int | range | slice | Iterable[int]

HEADS = ("mean", "all")
#: the seeds attnscope takes: ``torch.Generator.manual_seed``'s 64-bit range. Negative seeds, which torch also
#: takes, are refused: torch maps -1 to 2**64 - 1, so one image would carry two seeds.
SEEDS = range(2**64)
TOKENS = ("auto", "all", "prompt")
BRANCHES = ("cond", "uncond", "both")
#: the dtypes a pipeline is loaded in (``torch.<name>``)
DTYPES = ("float32", "float16", "bfloat16")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming the argument."""
    if not isinstance(value, str) or value not in allowed:
        raise AttnscopeError(f"{name}={value!r}: expected one of {', '.join(repr(a) for a in allowed)}")
    return value


def check_seed(name: str, value: Any) -> int:
    """Return ``value`` if it is an int a ``torch.Generator`` can be seeded with, else raise naming the argument.

    >>> check_seed("seed", 7), check_seed("seed", np.int64(7))
    (7, 7)
    >>> check_seed("seed", -1)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: seed=-1: expected an int from 0 to 2**64 - 1 (18446744073709551615), the seeds a torch.Generator takes
    >>> check_seed("seed", 99999999999999999999)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: seed=99999999999999999999: expected an int from 0 to 2**64 - 1 (18446744073709551615), the seeds a torch.Generator takes
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or int(value) not in SEEDS:
        raise AttnscopeError(f"{name}={value!r}: expected an int from 0 to 2**64 - 1 ({SEEDS.stop - 1}), the "
                             f"seeds a torch.Generator takes")
    return int(value)  # numpy's ints too, as a plain int (for JSON)


def check_tol(tol: Any) -> None:
    """Raise unless ``tol`` (a convergence tolerance) is a positive number.

    >>> check_tol(0.05)
    >>> check_tol(-1)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: tol=-1: expected a positive tolerance
    """
    if not (isinstance(tol, (int, float, np.floating)) and not isinstance(tol, bool) and tol > 0):
        raise AttnscopeError(f"tol={tol!r}: expected a positive tolerance")


def _listing(sites: Sequence[Any]) -> str:
    return "available sites:\n  " + "\n  ".join(s.name for s in sites)


def select_sites(spec: SiteSpec, sites: Sequence[Any]) -> list[Any]:
    """Sites (objects with a ``.name``) chosen by ``spec``: ``None`` (all), a glob, a list of names/globs, or a predicate.

    Examples
    --------
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> import attnscope as ats
    >>> sites = ats.discover_sites(tiny_sd_pipeline())
    >>> [s.name for s in select_sites("up_blocks.1.*", sites)]
    ['up_blocks.1.attentions.0.transformer_blocks.0.attn2', 'up_blocks.1.attentions.1.transformer_blocks.0.attn2']
    """
    if spec is None:
        return list(sites)
    if callable(spec):
        chosen = []
        for s in sites:
            try:
                keep = spec(s)
            except AttributeError as exc:  # a misspelt attribute, or a bare name (select_site_names) taken for a site
                raise AttnscopeError(f"sites={spec!r}: the predicate failed on site {s.name!r} ({exc}); "
                                     f"{_attributes(s)}") from None
            if keep:
                chosen.append(s)
        if not chosen:
            raise AttnscopeError(f"sites={spec!r}: the predicate matched no site; {_listing(sites)}")
        return chosen
    if not isinstance(spec, (str, Iterable)):
        raise AttnscopeError(f"sites={spec!r}: expected a glob, a list of names/globs, or a predicate")
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise AttnscopeError(f"sites={spec!r}: expected a glob, a list of names/globs, or a predicate")
    chosen_names: set[str] = set()
    for pattern in patterns:
        hits = {s.name for s in sites if fnmatch.fnmatchcase(s.name, pattern)}
        if not hits:
            raise AttnscopeError(f"sites: {pattern!r} matches no cross-attention site; {_listing(sites)}")
        chosen_names |= hits
    return [s for s in sites if s.name in chosen_names]


class _Named(NamedTuple):
    name: str


class RecordedSite:
    """A recorded site as a site predicate sees it: the fields of its stored description (``CrossAttentionSite.
    describe()``: name, family, kind, block, level, depth, heads, head_dim, token_dim; text_layout and patch, which a
    cross-attention site's description leaves out, are ``""`` and 1 as on its ``CrossAttentionSite``), so a predicate
    written for capture (``lambda site: site.level == 1``) selects the same sites in the statistics.

    >>> site = RecordedSite({"name": "up_blocks.0.attn2", "kind": "cross", "block": "up", "level": 1})
    >>> site.block, site.level, site.patch, site
    ('up', 1, 1, RecordedSite(name='up_blocks.0.attn2', kind='cross', block='up', level=1, text_layout='', patch=1))
    """

    def __init__(self, description: Mapping[str, Any]):
        fields = dict(description)
        if fields.get("kind", "cross") != "joint":
            fields = {**fields, "text_layout": fields.get("text_layout", ""), "patch": fields.get("patch", 1)}
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"RecordedSite({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _attributes(site: Any) -> str:
    """What a site predicate may read of ``site``, for an error."""
    if isinstance(site, _Named):
        return ("here the predicate is given the site's name only (site.name): the arrays carry no site description "
                "(their attrs['site'], which Trace.attention sets); use a glob, a list of names, a predicate on "
                "site.name, or the Trace")
    names = ([f.name for f in dataclasses.fields(site)] if dataclasses.is_dataclass(site)
             else [a for a in vars(site) if not a.startswith("_")] if hasattr(site, "__dict__") else ["name"])
    return f"a site has: {', '.join(names)}"


def select_site_names(spec: SiteSpec, names: Sequence[str],
                      descriptions: Mapping[str, Mapping[str, Any] | None] | None = None) -> list[str]:
    """:func:`select_sites` over site names. A predicate sees each site as a :class:`RecordedSite` built from its
    description in ``descriptions`` (name → a stored site description, as in a site array's ``attrs["site"]``: see
    :func:`site_descriptions`), so it selects what it selects in capture; a site without one is seen by its
    ``.name`` only (a predicate reading another attribute is then one error saying so).

    >>> select_site_names("up_*", ["down_blocks.0.attn2", "up_blocks.0.attn2"])
    ['up_blocks.0.attn2']
    >>> select_site_names(lambda s: s.level == 1, ["down_blocks.0.attn2", "up_blocks.0.attn2"],
    ...                   {"down_blocks.0.attn2": {"level": 0}, "up_blocks.0.attn2": {"level": 1}})
    ['up_blocks.0.attn2']
    """
    if not callable(spec):
        return [s.name for s in select_sites(spec, [_Named(n) for n in names])]
    described = descriptions or {}
    sites = [RecordedSite({**d, "name": n}) if isinstance(d := described.get(n), Mapping) and d else _Named(n)
             for n in names]
    return [s.name for s in select_sites(spec, sites)]


def site_descriptions(arrays: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Each site's stored description (name → the ``site`` attribute :meth:`Trace.attention` puts on its array), or
    None for an array without one.

    >>> import xarray as xr
    >>> site_descriptions({"a": xr.DataArray([0], attrs={"site": {"level": 1}}), "b": xr.DataArray([0])})
    {'a': {'level': 1}, 'b': None}
    """
    out: dict[str, dict[str, Any] | None] = {}
    for name, da in arrays.items():
        d = getattr(da, "attrs", {}).get("site")
        out[name] = dict(d) if isinstance(d, Mapping) and d else None
    return out


def select_steps(spec: StepSpec, num_steps: int) -> tuple[int, ...]:
    """Step indices chosen by ``spec`` for a run of ``num_steps`` denoiser calls.

    ``None`` is every step; an int, a ``range``, a ``slice`` (resolved against the run, negative
    indices allowed) or any iterable of ints; numpy's ints count, and so does a numpy or xarray array of
    ints (``da.step[-3:]``; a 0-d one, ``da.step[-1]``, is one step). Indices outside ``0..num_steps-1``
    are an error. The steps are a set: returned in run order, repeats merged, whatever the order of the
    spec (``slice(None, None, -1)`` is every step, from the first).

    Examples
    --------
    >>> select_steps(slice(None, None, 5), 20), select_steps([3, 0, 3], 20), select_steps(-1, 20)
    ((0, 5, 10, 15), (0, 3), (19,))
    >>> select_steps(slice(np.int64(-2), None), 20), select_steps(np.array([4, 2]), 20)
    ((18, 19), (2, 4))
    """
    if spec is None:
        return tuple(range(num_steps))
    if isinstance(spec, slice):
        return tuple(sorted(_slice_steps(spec, num_steps)))
    if hasattr(spec, "__array__") and not isinstance(spec, (numbers.Number, np.bool_)):  # numpy or xarray: da.step[-3:], .values
        spec = np.asarray(spec)
        if spec.dtype.kind in "iu" and spec.ndim <= 1:  # a 0-d array (da.step[-1]) holds one step
            spec = spec.item() if spec.ndim == 0 else spec.tolist()
    spec = int(spec) if isinstance(spec, np.integer) else spec  # numpy's ints count (an np.arange, a .values item)
    if (isinstance(spec, bool) or not isinstance(spec, (int, range, Iterable)) or isinstance(spec, (str, bytes))
            or (isinstance(spec, np.ndarray) and spec.ndim == 0)):
        raise AttnscopeError(f"steps={spec!r}: expected an int, range, slice or list of ints")
    values = [spec] if isinstance(spec, int) else [int(v) if isinstance(v, np.integer) else v for v in spec]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise AttnscopeError(f"steps={spec!r}: expected integers")
    resolved = {v + num_steps if v < 0 else v for v in values}
    outside = sorted(v for v in values if not -num_steps <= v < num_steps)
    if outside:
        raise AttnscopeError(f"steps: {outside} outside this run's steps 0..{num_steps - 1} ({num_steps} steps)")
    if not resolved:
        raise AttnscopeError(f"steps={spec!r}: selects no step")
    return tuple(sorted(resolved))


def _slice_steps(spec: slice, num_steps: int) -> tuple[int, ...]:
    """The steps of a slice; a slice that selects none of the run's steps is an error (30:40 of 20 steps, 5:2).

    >>> _slice_steps(slice(-3, None), 20)
    (17, 18, 19)
    >>> _slice_steps(slice(5, 2), 20)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: steps=5:2: selects no step of this run's 20 steps (0..19): START 5 is not before STOP 2
    >>> _slice_steps(slice(None, None, 0), 20)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: steps=::0: expected a slice whose STEP is not 0
    """
    text = ":".join("" if v is None else str(v) for v in (spec.start, spec.stop, spec.step)).removesuffix(":")
    if not all(v is None or (isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)))
               for v in (spec.start, spec.stop, spec.step)):
        raise AttnscopeError(f"steps={text}: expected a slice of ints")
    spec = slice(*(None if v is None else int(v) for v in (spec.start, spec.stop, spec.step)))  # numpy's ints too
    if spec.step == 0:
        raise AttnscopeError(f"steps={text}: expected a slice whose STEP is not 0")
    chosen = tuple(range(num_steps)[spec])
    if chosen:
        return chosen
    why = (f": START {spec.start} is not before STOP {spec.stop}" if (spec.step or 1) > 0 and None not in
           (spec.start, spec.stop) and spec.start >= spec.stop else "")
    raise AttnscopeError(f"steps={text}: selects no step of this run's {num_steps} steps (0..{num_steps - 1}){why}")


def parse_step_text(text: str | None, option: str = "--steps") -> StepSpec:
    """A step spec from the command line's text: ``START:STOP[:STEP]`` (a slice) or a comma list of ints.

    ``option`` names the option in the error. The spec is then resolved by :func:`select_steps`.

    Examples
    --------
    >>> parse_step_text("-3:"), parse_step_text("0,5,-1"), parse_step_text(None)
    (slice(-3, None, None), [0, 5, -1], None)
    >>> parse_step_text("1,,2")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: --steps '1,,2': expected START:STOP[:STEP] or a comma-separated list of ints
    >>> parse_step_text("a:b", "--capture-steps")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: --capture-steps 'a:b': expected START:STOP[:STEP] or a comma-separated list of ints
    """
    if text is None:
        return None
    try:
        if ":" in text:
            return slice(*(int(p) if p.strip() else None for p in text.split(":")))
        return [int(p) for p in text.split(",")]  # an empty item ("1,,2", "") is an error, not skipped
    except (ValueError, TypeError) as exc:
        raise AttnscopeError(f"{option} {text!r}: expected START:STOP[:STEP] or a comma-separated list of ints") from exc


def select_captured_steps(spec: StepSpec, captured: Sequence[int], num_steps: int, where: str) -> list[int]:
    """Steps chosen by ``spec`` in a run of ``num_steps`` (as :func:`select_steps`: a slice or a
    negative index counts the run's steps, like capture does), all of which must be ``captured`` at
    ``where`` (a site name).

    >>> select_captured_steps(slice(None, None, 5), [0, 5, 10, 15], 20, "up")
    [0, 5, 10, 15]
    >>> select_captured_steps([0, 1], [0, 5], 20, "up")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: steps=[0, 1]: steps [1] are not in this trace at up; captured steps: [0, 5]
    """
    chosen = list(select_steps(spec, num_steps))
    have = {int(s) for s in captured}
    missing = [s for s in chosen if s not in have]
    if missing:
        raise AttnscopeError(f"steps={spec!r}: steps {missing} are not in this trace at {where}; "
                             f"captured steps: {[int(s) for s in captured]}")
    return chosen


def run_steps(source: Any, arrays: Iterable[Any]) -> int:
    """Denoising steps of the run behind ``source``: the trace manifest's ``run.num_steps``, else the
    ``run_steps`` attribute :meth:`Trace.attention` gives its arrays (a run captured with ``steps=`` has steps
    its arrays do not hold), else one past the last step of ``arrays`` (xarray objects with a ``step`` coordinate)."""
    manifest = getattr(source, "manifest", None)
    recorded = manifest.get("run", {}).get("num_steps") if isinstance(manifest, dict) else None
    if recorded:
        return int(recorded)
    arrays = list(arrays)
    given = [int(da.attrs["run_steps"]) for da in arrays if da.attrs.get("run_steps")]
    if given:
        return max(given)
    return max((int(da["step"].max()) + 1 for da in arrays if da.sizes.get("step")), default=0)


def step_runs(steps: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive steps as ``(first, last)`` pairs (for ranges in messages, bands in figures).

    >>> step_runs([8, 3, 4, 5])
    [(3, 5), (8, 8)]
    """
    runs: list[list[int]] = []
    for s in sorted(steps):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return [(lo, hi) for lo, hi in runs]


def step_ranges(steps: Sequence[int]) -> str:
    """Steps as compact ranges, for messages and reports.

    >>> step_ranges([0, 1, 2, 3, 5, 8, 9]), step_ranges([]), step_ranges([4])
    ('0–3, 5, 8–9', 'none', '4')
    """
    return ", ".join(f"{lo}–{hi}" if hi > lo else f"{lo}" for lo, hi in step_runs(steps)) or "none"


def index_positions(targets: Sequence[str | int], positions: Sequence[int]) -> list[str | int]:
    """``targets`` with each int — a token position, a value of a trace's ``token`` coordinate — replaced by its index
    along the stored token axis (``positions``: the kept positions, ``0…k, 77…m`` on SD3 with ``tokens="prompt"``);
    words and phrases as they are. A position the axis does not hold is an error listing the ones it does.

    >>> index_positions(["red", 78, np.int64(2)], [0, 1, 2, 77, 78])
    ['red', 4, 2]
    >>> index_positions([3], [0, 1, 2, 77, 78])
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: target 3: token position not on this trace's token axis; its positions are 0–2, 77–78
    """
    index = {int(p): i for i, p in enumerate(positions)}
    out: list[str | int] = []
    for t in targets:
        if isinstance(t, numbers.Integral) and not isinstance(t, bool):  # numpy's ints count too
            t = int(t)
            if t not in index:
                raise AttnscopeError(f"target {t}: token position not on this trace's token axis; its positions are "
                                     f"{step_ranges(list(index))}")
            t = index[t]
        out.append(t)
    return out

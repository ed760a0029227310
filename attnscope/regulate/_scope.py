"""Where and when an intervention acts, and on which token columns: shared by every intervention."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..selection import select_sites, select_steps
from ..tokens import is_target, prompt_text, resolve_targets, segment_occurrences, target_list, token_roles

__all__ = ["InterventionScope", "default_regulation_sites", "is_integer", "is_real", "nth_occurrences", "repr_options",
           "steps_note", "targets_label"]

TargetSpec = Sequence[str | int] | str | int | Callable[[str], Sequence[str | int]]
#: the blocks of a flat stack of layers (PixArt, Sana): the third of the stack a layer sits in
_THIRDS = ("early", "middle", "late")


def default_regulation_sites(sites: Sequence[Any], latent_shape: tuple[int, int], min_side: int = 8) -> list[str]:
    """The down/up-block sites at the deepest level whose maps are still ``min_side`` pixels or more.

    This is the official Attention Regulation choice expressed by position and scale: on SD-2 base
    at 512 px (64×64 latent) it gives the five ``attn2`` of ``down_blocks.2`` and ``up_blocks.1``
    (16×16 maps); on the shapes model (16×16 latent) the 8×8 sites of ``down_blocks.1`` and
    ``up_blocks.1``. Mid-block sites are never chosen. A transformer has one resolution everywhere:
    on SD3/Flux its double-stream blocks (every SD3 block; Flux's ``transformer_blocks``) are chosen,
    not its single-stream ones (by structure); on a flat stack (PixArt, Sana) the late third of its
    layers (block ``"late"``; its last layer when it has fewer than three) — the third that helped on
    the one model that can be evaluated here (``benchmarks/regulation_depth.py``, docs/regulation.md).

    >>> import attnscope as ats
    >>> default_regulation_sites(ats.discover_sites(ats.load_pipeline("shapes")), (16, 16))  # doctest: +NORMALIZE_WHITESPACE
    ['down_blocks.1.attentions.0.transformer_blocks.0.attn2', 'up_blocks.1.attentions.0.transformer_blocks.0.attn2',
     'up_blocks.1.attentions.1.transformer_blocks.0.attn2']
    """
    candidates = [s for s in sites if s.block in ("down", "up")]
    if not candidates:  # a transformer: one resolution everywhere
        if any(s.block == "double" for s in sites):  # joint families: the double-stream blocks
            return [s.name for s in sites if s.block == "double"]
        if any(s.block in _THIRDS for s in sites):  # a flat stack: its late third (measured: docs/regulation.md)
            late = [s.name for s in sites if s.block == "late"]
            return late or [max(sites, key=lambda s: s.depth).name]  # too short for a late third: its last layer
        return [s.name for s in sites]
    big = [s for s in candidates if min(s.spatial_shape(latent_shape)) >= min_side]
    if not big:  # tiny latents: the finest level there is
        big = candidates
    deepest = max(s.level for s in big)
    return [s.name for s in big if s.level == deepest]


class InterventionScope:
    """Sites, steps and target tokens of one intervention.

    Parameters
    ----------
    targets : words/phrases/positions, or a function prompt → targets
        Resolved on each prompt's own tokens (:func:`attnscope.tokens.resolve_targets`); with
        ``first_occurrence`` each target takes one occurrence: the first, or the k-th for the k-th
        mention of the same word (``["circle", "circle"]`` is the prompt's two circles).
    sites : glob, list of names/globs, predicate, or None
        ``None`` means ``default_sites(sites, latent_shape)`` (all sites when that is None too).
    steps : int, list, range, slice, "first_half" or None
        The run's steps, parsed as capture and the statistics parse them
        (:func:`attnscope.selection.select_steps`: negative indices and slices count from the run's
        end, ``-1`` is the last step); ``None``: every step; ``"first_half"``: the steps below half
        of the run's planned steps (the official Attention Regulation schedule). A slice may also be
        given as the mapping ``{"start", "stop", "step"}`` that :meth:`describe` (and so a manifest)
        records it as. The spec's form is checked here; its steps are resolved against each run.

    Examples
    --------
    >>> scope = InterventionScope("square", steps=slice(-3, None))
    >>> scope.steps_of_run(20)
    (17, 18, 19)
    >>> InterventionScope("square", steps="first_half").steps_of_run(5)
    (0, 1, 2)
    >>> InterventionScope("square", steps={"start": -3, "stop": None, "step": None}).steps   # as a manifest holds it
    slice(-3, None, None)
    """

    def __init__(self, targets: TargetSpec, sites: Any = None, steps: Any = None, *, first_occurrence: bool = False,
                 default_sites: Callable[[Sequence[Any], tuple[int, int]], list[str]] | None = None):
        targets = _plain_targets(targets)
        items = targets if isinstance(targets, (list, tuple)) else [targets]
        if targets is None or not items or not (callable(targets) or all(
                is_target(t) for t in items)):
            raise AttnscopeError(f"targets={targets!r}: expected words, phrases or token positions (a str, an int, a "
                                 f"list of them, or a function of the prompt)")
        if not (sites is None or callable(sites) or isinstance(sites, str)
                or (isinstance(sites, (list, tuple)) and all(isinstance(s, str) for s in sites))):
            raise AttnscopeError(f"sites={sites!r}: expected a site name or glob, a list of them, or a predicate on "
                                 f"the site")
        self.targets, self.sites, self.steps = targets, sites, _steps_spec(steps)
        self.first_occurrence, self.default_sites = first_occurrence, default_sites
        self._all: list[Any] = []
        self._chosen: set[str] | None = None  # the sites given, resolved; None: the default sites
        self._defaults: dict[Any, set[str]] = {}  # latent shape → the default sites at that size
        self._columns: dict[tuple[tuple[str, ...], ...], list[list[int]]] = {}
        self._steps: frozenset[int] = frozenset()
        self._steps_for: int | None = None
        self._pipe: Any = None  # the pipeline installed on, for the note of a steps error

    def install(self, session: Any) -> None:
        """Check the site spec against the pipeline's sites (an unknown site is an error)."""
        self._all = list(session.sites)
        self._pipe = session.pipe
        self._chosen, self._defaults = None, {}
        if self.sites is not None:
            self._chosen = {s.name for s in select_sites(self.sites, self._all)}
        self._columns = {}

    def active(self, ctx: Any) -> bool:
        """Whether the intervention acts at this call (site × step)."""
        return ctx.site.name in self.sites_at(ctx.step_context.latent_shape) and self._step_active(ctx)

    def sites_at(self, latent_shape: tuple[int, int]) -> set[str]:
        """The names of the sites the intervention acts at in a run of this latent size (after :meth:`install`)."""
        if self._chosen is not None:
            return self._chosen
        if latent_shape not in self._defaults:  # the default sites depend on the map sizes: chosen per latent size
            self._defaults[latent_shape] = set(self.default_sites(self._all, latent_shape) if self.default_sites
                                               else [s.name for s in self._all])
        return self._defaults[latent_shape]

    def steps_of_run(self, num_steps: int) -> tuple[int, ...]:
        """The steps the intervention acts at in a run of ``num_steps`` steps."""
        if self.steps == "first_half":
            return tuple(range((num_steps + 1) // 2))
        return select_steps(self.steps, num_steps)

    def _step_active(self, ctx: Any) -> bool:
        if self.steps is None:
            return True
        total = ctx.step_context.num_steps
        if total is None:
            raise AttnscopeError(f"steps={self.steps!r}: the pipeline does not say how many steps it runs, so the "
                                 "steps cannot be resolved; pass steps=None")
        if self._steps_for != total:
            self._steps, self._steps_for = frozenset(self.steps_of_run(total)), total
        return ctx.step in self._steps

    def describe(self) -> dict[str, Any]:
        """The sites and steps as JSON-able values, for an intervention's ``describe()``.

        >>> InterventionScope("square", steps=slice(0, 10)).describe()
        {'sites': None, 'steps': {'start': 0, 'stop': 10, 'step': None}}
        """
        return {"sites": _jsonable_spec(self.sites), "steps": _jsonable_spec(self.steps)}

    def columns(self, ctx: Any) -> list[list[int]]:
        """Per sample of the cond half: the token columns of every target (flattened, sorted)."""
        texts = ctx.step_context.token_text
        if texts is None:
            return [self._positions_without_text(ctx.tokens)] * ctx.rows.samples
        per_prompt = self._run_columns(ctx.step_context)
        return [per_prompt[p] for p in ctx.rows.prompt_of_sample]

    def check(self, step_ctx: Any) -> None:
        """Resolve the targets on every prompt of the run, and the steps, at its first step: a target that is not in
        a prompt or a step outside the run is an error before any attention call (and so before an observer
        installed beside the intervention, a :class:`~attnscope.Recorder`, creates its store)."""
        if step_ctx.token_text is not None:
            self._run_columns(step_ctx)
        else:
            self._positions_without_text(step_ctx.text_length)
        self.check_steps(step_ctx)

    def check_steps(self, step_ctx: Any) -> None:
        """The steps part of :meth:`check`, for an intervention without token columns: a step outside the run is an
        error at its first step."""
        if self.steps is not None and step_ctx.num_steps:
            try:
                self.steps_of_run(step_ctx.num_steps)
            except AttnscopeError as exc:
                raise AttnscopeError(f"{exc}{steps_note(self._pipe, step_ctx.num_steps)}") from None

    def _positions_without_text(self, length: int | None = None) -> list[int]:
        """The targets' columns of a run whose prompt came as embeddings: token positions only, each in
        ``0 .. length - 1`` (``length``: the number of text keys, when known)."""
        items = self.targets if isinstance(self.targets, (list, tuple)) else [self.targets]
        if callable(self.targets) or not all(isinstance(t, numbers.Integral) for t in items):
            raise AttnscopeError("targets given as words need the prompt's tokens, but the pipeline got embeddings; "
                                 "give token positions instead")
        positions = sorted({int(t) for t in items})
        outside = [p for p in positions if p < 0 or (length is not None and p >= length)]
        if outside:
            span = f"0..{length - 1} (the prompt embeddings have {length} tokens)" if length else "0 and up"
            raise AttnscopeError(f"targets={targets_label(self.targets)!r}: token position(s) {outside} out of range "
                                 f"{span}")
        return positions

    def _run_columns(self, step_ctx: Any) -> list[list[int]]:
        """Per prompt of the run: the token columns of every target (computed once per run's token text)."""
        texts = step_ctx.token_text
        roles = step_ctx.token_roles or [None] * len(texts)
        key = (texts, step_ctx.token_roles)
        if key not in self._columns:
            self._columns[key] = [self._columns_of_prompt(i, len(texts), list(tokens), r)
                                  for i, (tokens, r) in enumerate(zip(texts, roles))]
        return self._columns[key]

    def _columns_of_prompt(self, index: int, count: int, tokens: list[str], roles: Any) -> list[int]:
        """:meth:`_prompt_columns`; with several prompts, an error names the prompt it is about."""
        try:
            return self._prompt_columns(tokens, roles, named=count == 1)
        except AttnscopeError as exc:
            if count == 1:
                raise
            hint = "" if callable(self.targets) else "; to target other words per prompt, give targets as a function of the prompt"
            raise AttnscopeError(f"prompt {index} of {count} ({prompt_text(tokens, roles)!r}): {exc}{hint}") from None

    def _prompt_columns(self, tokens: list[str], roles: Any = None, named: bool = True) -> list[int]:
        targets = self.targets
        if callable(targets):  # what it gives is checked here, where the error can say where it came from
            targets = targets(prompt_text(tokens, roles))
            items = targets if isinstance(targets, (list, tuple)) else [targets]
            if not items or not all(is_target(t) for t in items):
                where = f" for the prompt {prompt_text(tokens, roles)!r}" if named else ""
                raise AttnscopeError(f"targets={targets_label(self.targets)!r} gave {targets!r}{where}: expected words, "
                                     f"phrases or token positions (a str, an int or a non-empty list of them)")
        try:
            if not self.first_occurrence:
                return sorted({p for positions in resolve_targets(tokens, targets, roles).values() for p in positions})
            return sorted({p for positions in nth_occurrences(tokens, targets, roles) for p in positions})
        except AttnscopeError as exc:
            if "pad" in token_roles(tokens, roles) or not tokens:
                raise
            raise AttnscopeError(f"{exc} (the prompt fills all {len(tokens)} token positions: the tokenizer may have "
                                 f"cut words off its end)") from None


def steps_note(pipe: Any, num_steps: int | None) -> str:
    """The end of an error about a run's steps when the run has other steps than the ``num_inference_steps`` its
    scheduler was set to (Heun's 2N − 1, PNDM's N + 1, img2img's ``strength``): which count the steps are; else "".

    >>> import diffusers
    >>> pipe = type("Pipe", (), {"scheduler": diffusers.HeunDiscreteScheduler()})()
    >>> pipe.scheduler.set_timesteps(4)
    >>> steps_note(pipe, 7)
    '; steps count the denoiser steps of the run: 7 for num_inference_steps=4 (HeunDiscreteScheduler, Pipe)'
    >>> steps_note(pipe, 4), steps_note(None, 7)
    ('', '')
    """
    scheduler = getattr(pipe, "scheduler", None)
    planned = getattr(scheduler, "num_inference_steps", None)
    if not is_integer(planned) or not num_steps or planned == num_steps:
        return ""
    return (f"; steps count the denoiser steps of the run: {num_steps} for num_inference_steps={planned} "
            f"({type(scheduler).__name__}, {type(pipe).__name__})")


def nth_occurrences(tokens: list[str], targets: Any, roles: Any = None) -> list[list[int]]:
    """Each target's positions: the first occurrence of a word or phrase, the second occurrence for
    its second mention in ``targets``, and so on (``["circle", "circle"]`` is both circles); in each text
    segment of the token axis (SD3 spells the prompt twice, CLIP then T5: both copies).

    >>> toks = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>",
    ...         "circle</w>", "<|endoftext|>"]
    >>> nth_occurrences(toks, ["circle", "circle"]), nth_occurrences(toks, ["blue circle", 2])
    ([[3], [7]], [[6, 7], [2]])
    """
    items = target_list(targets)
    resolve_targets(tokens, items, roles)  # the checks and errors for unknown words and bad positions
    mentions: dict[str, int] = {}
    out = []
    for target in items:
        if isinstance(target, numbers.Integral):  # numpy's ints too, as resolve_targets takes them
            out.append([int(target)])
            continue
        per_segment = segment_occurrences(tokens, target, roles)
        key = " ".join(target.lower().split())  # "circle", "Circle" and " circle" are mentions of one word
        k = mentions[key] = mentions.get(key, -1) + 1
        picked = [p for occ in per_segment if k < len(occ) for p in occ[k]]
        if not picked:
            raise AttnscopeError(f"target {target!r} is given {k + 1} times but occurs "
                                 f"{max(len(occ) for occ in per_segment)} time(s) in the prompt "
                                 f"{prompt_text(tokens, roles)!r}")
        out.append(sorted(picked))
    return out


def targets_label(targets: Any) -> Any:
    """Targets as JSON and in reprs: a function (targets chosen per prompt) by its name, a tuple as a list.

    >>> import numpy as np
    >>> targets_label(("circle", "square")), targets_label(len), targets_label([np.int64(3), "square"])
    (['circle', 'square'], 'len', [3, 'square'])
    """
    if callable(targets):
        return getattr(targets, "__name__", "function")
    if isinstance(targets, (list, tuple)):
        return [int(t) if isinstance(t, numbers.Integral) else t for t in targets]  # numpy's ints: JSON-able
    return int(targets) if isinstance(targets, numbers.Integral) else targets


def repr_options(given: dict[str, tuple[Any, Any]]) -> str:
    """The ``, name=value`` part of a repr: each setting ``name: (value, default)`` whose value is not its default
    (compared with ``==`` for plain values only: an array or a tensor is shown unless it is the default object).

    >>> repr_options({"lr": (0.1, 100.0), "steps": (None, None), "sites": ("up_*", None), "w": ([1.0], 1.0)})
    ", lr=0.1, sites='up_*', w=[1.0]"
    """
    return "".join(f", {name}={value!r}" for name, (value, default) in given.items()
                   if not (value is default or (isinstance(value, (int, float, str, dict)) and value == default)))


_SLICE_KEYS = ("start", "stop", "step")


def _plain_targets(targets: Any) -> Any:
    """``targets`` with numpy's and xarray's values as the Python values they hold (a 0-d array, ``da.word[3]``, is
    one target; an array of words or positions, a list of them), so that they match and a manifest can hold them;
    anything else as it is.

    >>> _plain_targets(np.array("circle")), _plain_targets(np.array([2, 5])), _plain_targets(("red", np.int64(4)))
    ('circle', [2, 5], ('red', 4))
    """
    if isinstance(targets, (list, tuple)):
        return type(targets)(target_list(targets))
    if getattr(targets, "ndim", None) is not None and hasattr(targets, "__array__") and not isinstance(targets, str):
        listed = target_list(targets)
        return listed[0] if getattr(targets, "ndim", None) == 0 else listed
    return targets


def _steps_spec(steps: Any) -> Any:
    """``steps`` checked for form (not yet against a run), with the mapping that :func:`_jsonable_spec` writes
    for a slice read back as the slice.

    >>> _steps_spec({"start": 1, "stop": None, "step": 2}), _steps_spec([0, 2])
    (slice(1, None, 2), [0, 2])
    >>> _steps_spec({"start": 1, "end": 4})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: steps={'start': 1, 'end': 4}: a mapping is read as a slice; expected the keys start, stop, step (as a manifest records a slice), each an int or None
    """
    expected = "expected an int, a list or range of ints, a slice, \"first_half\" or None"
    if isinstance(steps, Mapping):
        if not steps or not set(steps) <= set(_SLICE_KEYS) or not all(_int_or_none(v) for v in steps.values()):
            raise AttnscopeError(f"steps={steps!r}: a mapping is read as a slice; expected the keys "
                                 f"{', '.join(_SLICE_KEYS)} (as a manifest records a slice), each an int or None")
        steps = slice(*(steps.get(k) for k in _SLICE_KEYS))
    if hasattr(steps, "__array__") and not isinstance(steps, (numbers.Number, np.bool_)):  # da.step[-3:], .values
        array = np.asarray(steps)
        if array.dtype.kind in "iu" and array.ndim <= 1:  # as Python ints: a manifest holds them, == is not per element
            steps = array.item() if array.ndim == 0 else array.tolist()
    if steps is None or (isinstance(steps, str) and steps == "first_half") or is_integer(steps):
        return int(steps) if is_integer(steps) else steps
    if isinstance(steps, slice):
        if not all(_int_or_none(v) for v in (steps.start, steps.stop, steps.step)):
            raise AttnscopeError(f"steps={steps!r}: expected a slice of ints")
        steps = slice(*(None if v is None else int(v) for v in (steps.start, steps.stop, steps.step)))  # numpy's too
        if steps.step == 0:
            raise AttnscopeError(f"steps={steps!r}: expected a slice whose step is not 0")
        return steps
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
        raise AttnscopeError(f"steps={steps!r}: {expected}")
    values = list(steps)
    if not values or not all(is_integer(v) for v in values):
        raise AttnscopeError(f"steps={steps!r}: {expected} (a list of at least one int)")
    return steps if isinstance(steps, (list, tuple, range)) else values  # a generator: read once


def is_integer(value: Any) -> bool:
    """An integer, numpy's too, and not a bool: what an intervention's counts and indices accept.

    >>> is_integer(3), is_integer(np.int64(3)), is_integer(True), is_integer(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A real number, numpy's too, and not a bool: what an intervention's numeric settings accept.

    >>> is_real(0.5), is_real(np.float32(0.5)), is_real(2), is_real(False), is_real("0.5")
    (True, True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _int_or_none(value: Any) -> bool:
    return value is None or is_integer(value)


def _jsonable_spec(value: Any) -> Any:
    """A JSON-able form of a site/step spec.

    >>> _jsonable_spec([range(2), slice(1, None)])
    [[0, 1], {'start': 1, 'stop': None, 'step': None}]
    """
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (np.integer, np.ndarray)):  # an np.arange of steps, or one of its items
        return value.tolist()
    if isinstance(value, slice):
        return {"start": value.start, "stop": value.stop, "step": value.step}
    if isinstance(value, range):
        return list(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable_spec(v) for v in value]
    return repr(value)

"""Attention Regulation (seed 000, Zhang et al., ECCV 2024) as a hook client of the ``logits`` stage.

At the chosen sites and steps, for the conditional rows only, a perturbation Δ is added to the
pre-softmax logits of the target tokens' columns. Δ is a weighted sum of Gaussian bumps (_basis.py)
whose weights are found by gradient descent on the loss of :func:`regulation_loss` (its analytic
gradient, without autograd: _descent.py); the best Δ of the iterations is smoothed with the previous
step's and decayed with the step. After the softmax the SOT and first-EOT columns get their unedited
probabilities back. The official algorithm and where attnscope departs from it: docs/regulation.md, "The algorithm, from
the official code".
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import AttnscopeError, AttnscopeWarning
from ..tokens import token_roles
from ._basis import basis_centres, gaussian_basis
from ._descent import RegulationDescent, one_thread
from ._gate import RiskGate
from ._scope import InterventionScope, default_regulation_sites, is_integer, is_real, targets_label

_roles = functools.lru_cache(maxsize=64)(token_roles)  # per prompt (a tuple of token strings), not per call

__all__ = ["AttentionRegulation", "regulation_loss"]


def regulation_loss(maps: torch.Tensor, weights: torch.Tensor, tau: float, *, quantile: float = 0.9,
                    quantile_target: float = 0.9, mass_weight: float = 80.0, weight_decay: float = 0.09,
                    groups: int = 1) -> torch.Tensor:
    """The official three-term loss, per group of rows (a sample's heads), shape (groups,).

    ``maps`` (rows, pixels, n): target-token probabilities; ``weights`` (rows, K, n). Per group,
    over its rows and the n targets::

        mean (q_0.9(A) − 0.9)²  +  80 · mean (mean_pixels A − τ/n)²  +  0.09 · mean W²

    The mean over groups is the official scalar loss (a mean over batch × heads).

    >>> import torch
    >>> a = torch.tensor([[[0.2], [0.4]]])          # one row, two pixels, one target
    >>> w = torch.tensor([[[1.0], [3.0]]])          # two bumps
    >>> # q_0.9 of (0.2, 0.4) = 0.38; mean 0.3; tau = 0.2: (0.38-0.9)^2 + 80 (0.3-0.2)^2 + 0.09 * 5
    >>> round(float(regulation_loss(a, w, 0.2)[0]), 4)
    1.5204
    """
    _check_loss_input(maps, weights, quantile, groups)
    rows, _, n = maps.shape
    q = torch.quantile(maps, quantile, dim=1)  # (rows, n)
    mass = maps.mean(1)  # (rows, n)
    per_row = (q - quantile_target) ** 2 + mass_weight * (mass - tau / n) ** 2  # (rows, n)
    shaped = per_row.reshape(groups, rows // groups * n).mean(1)
    decay = (weights**2).reshape(groups, -1).mean(1)
    return shaped + weight_decay * decay


def _check_loss_input(maps: Any, weights: Any, quantile: Any, groups: Any) -> None:
    """One AttnscopeError naming what :func:`regulation_loss` got, unless its shapes and settings fit together.

    >>> _check_loss_input(torch.rand(4, 10, 2), torch.rand(4, 3, 2), 0.9, 3)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: groups=3: expected a positive int dividing the 4 rows (samples of equally many heads)
    """
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (maps, weights)]
    if (not all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in (maps, weights))
            or maps.shape[0] != weights.shape[0] or maps.shape[2] != weights.shape[2] or 0 in maps.shape):
        raise AttnscopeError(f"maps {shapes[0]}, weights {shapes[1]}: expected tensors (rows, pixels, n) and "
                             f"(rows, K, n) with the same rows and n, none empty")
    if not is_integer(groups) or groups < 1 or maps.shape[0] % groups:
        raise AttnscopeError(f"groups={groups!r}: expected a positive int dividing the {maps.shape[0]} rows (samples "
                             f"of equally many heads)")
    if not is_real(quantile) or not 0 <= quantile <= 1:
        raise AttnscopeError(f"quantile={quantile!r}: expected a number in [0, 1]")


def _check_number(name: str, value: Any, low: float, high: float, closed: bool | None) -> None:
    """``value`` a real number in the range: ``closed`` True ``(low, high]``, False ``(low, high)``, None
    ``[low, high)`` (the weights, which may be 0).

    >>> _check_number("decay", 0.99, 0, 1, True)
    >>> _check_number("lr", np.float32(50), 0, math.inf, False)     # numpy's numbers too
    >>> _check_number("quantile", 2.0, 0, 1, True)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: quantile=2.0: expected a number in (0, 1]
    """
    ok = is_real(value) and (
        low <= value < high if closed is None else low < value <= high if closed else low < value < high)
    if not ok:
        span = f"[{low}, {high})" if closed is None else f"({low}, {high}]" if closed else f"({low}, {high})"
        raise AttnscopeError(f"{name}={value!r}: expected a number in {span.replace('inf', '∞')}")


class AttentionRegulation:
    """Reshape the cross-attention of target tokens at inference time so that each covers a region.

    Parameters
    ----------
    targets : list of words/phrases/positions, or a function prompt → targets
        The objects to regulate, e.g. ``["circle", "square"]``: one token column set per target, the
        first occurrence of each word or phrase (its word pieces included); a word given twice takes
        its second occurrence (``["circle", "circle"]`` in "a red circle and a blue circle"). The
        official code takes the object nouns' token indices; a phrase such as ``"red circle"`` makes
        each of its words a target of its own (see docs/regulation.md, "Extra objects").
    sites : glob(s) or None
        Default (None): the down/up-block ``attn2`` at the deepest level whose maps are ≥ 8 px
        (SD-2 base at 512 px: ``down_blocks.2`` and ``up_blocks.1``, the official choice).
    steps : "first_half", int, list, slice or None
        Default: the first half of the steps (the official 25 of 50).
    lr, iterations : float, int
        Plain gradient descent ``W ← W − rows · lr · ∇L`` for ``iterations`` steps (official 100, 20);
        the Δ with the lowest loss is kept, per sample.
    scale_lr : bool
        Scale ``lr`` by ``pixels / (256 σ_y σ_x)``: the gradient on a bump's weight grows with the share
        of the map the bump covers. The factor is 1 at the official sizes (16², 32², 64² maps with
        σ = 1, 2, 4) and 0.25 on 8×8 maps, where the unscaled step overshoots. ``False``: the
        official fixed ``lr``.
    quantile, quantile_target, mass_weight, weight_decay, tau : loss terms (see :func:`regulation_loss`);
        ``tau`` defaults to ``min(1, 0.2 n)`` for n target tokens.
    smoothing : float
        ``Δ* = smoothing · Δ_prev + (1 − smoothing) · Δ_best`` per site (official 0.25).
    decay : float
        The applied edit is ``decay**step · Δ*`` (official 0.99).
    seed : int
        Seed of the random initial weights ``W ~ U[0, 1)``: one draw of shape (heads, K, n) per site and
        step, on the device, used by every sample, so a sample's result does not depend on its batch
        (the official code draws (batch·heads, K, n) at once).
    when : RiskGate, optional
        :func:`attnscope.regulate.risk_above`: regulate only the samples whose early-warning risk at a
        decision step is above a threshold, from the step after it (before it, nothing is edited).
        ``reg.when.risk`` and ``reg.when.at_risk`` say what was decided for each sample of the last run.

    Examples
    --------
    Rerun a captured generation with the targets' attention regulated:

    >>> import tempfile, attnscope as ats, numpy as np
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=4)
    >>> reg = ats.regulate.AttentionRegulation(["circle", "square"], iterations=5)
    >>> after = ats.rerun(tr, [reg])
    >>> changed = np.abs(np.asarray(after.images[0], float) - np.asarray(tr.images[0], float))
    >>> bool(changed.max() > 10)  # pixel values 0..255: the regulated attention changes the image
    True
    >>> after.manifest["interventions"][0]["params"]["targets"]
    ['circle', 'square']
    """

    role = "intervention"

    def __init__(self, targets: Any, *, sites: Any = None, steps: Any = "first_half", lr: float = 100.0,
                 iterations: int = 20, quantile: float = 0.9, quantile_target: float = 0.9, mass_weight: float = 80.0,
                 weight_decay: float = 0.09, tau: float | None = None, smoothing: float = 0.25, decay: float = 0.99,
                 scale_lr: bool = True, seed: int = 0, when: RiskGate | None = None):
        if isinstance(when, dict) and "risk_above" in when:  # a manifest's record of the gate: not a gate
            raise AttnscopeError(f"when={when!r}: the record of a gate (a manifest's params) does not rebuild it; pass "
                                 f"when=ats.regulate.risk_above({when['risk_above']!r}, step={when.get('step')!r}, "
                                 f"targets=...) with the gate's targets")
        if when is not None and not isinstance(when, RiskGate):
            raise AttnscopeError(f"when={when!r}: expected a gate such as ats.regulate.risk_above(0.3)")
        if not is_integer(iterations) or iterations < 1:
            raise AttnscopeError(f"iterations={iterations!r}: expected a positive integer")
        if not is_integer(seed):
            raise AttnscopeError(f"seed={seed!r}: expected an integer")
        if not isinstance(scale_lr, (bool, np.bool_)):
            raise AttnscopeError(f"scale_lr={scale_lr!r}: expected True or False")
        for name, value, low, high, closed in (
                ("lr", lr, 0, math.inf, False), ("decay", decay, 0, math.inf, False), ("smoothing", smoothing, 0, 1, None),
                ("quantile", quantile, 0, 1, True), ("quantile_target", quantile_target, 0, 1, True),
                ("mass_weight", mass_weight, 0, math.inf, None), ("weight_decay", weight_decay, 0, math.inf, None),
                ("tau", 0.5 if tau is None else tau, 0, 1, True)):
            _check_number(name, value, low, high, closed)
        self.scope = InterventionScope(targets, sites, steps, first_occurrence=True,
                                       default_sites=default_regulation_sites)
        self.targets = self.scope.targets  # numpy's and xarray's words and positions as Python's
        self.lr, self.iterations, self.seed, self.scale_lr = float(lr), int(iterations), int(seed), bool(scale_lr)
        # numpy's numbers as Python's (the same values): JSON-able in describe()
        self.loss_terms = {"quantile": _plain(quantile), "quantile_target": _plain(quantile_target),
                           "mass_weight": _plain(mass_weight), "weight_decay": _plain(weight_decay)}
        self.tau, self.smoothing, self.decay = _plain(tau), _plain(smoothing), _plain(decay)
        self.when = when
        if when is not None and when.targets is None:  # risk_above's default: the intervention's targets
            when.targets = targets
        self._previous: dict[tuple[str, int], torch.Tensor] = {}
        self._restore: tuple[str, int, list[tuple[list[int], torch.Tensor, torch.Tensor]]] | None = None
        self._eos: int | None = None
        self._site_index: dict[str, int] = {}
        self._bases: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._others: list[Any] = []  # the session's other interventions (on_install)
        self._descents: dict[tuple, RegulationDescent] = {}
        self._indices: dict[tuple, torch.Tensor] = {}
        #: last optimisation's losses per call, for inspection: {(site, step): (first, best)} (tensors)
        self.history: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"AttentionRegulation({targets_label(self.targets)!r})"

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {"name": "AttentionRegulation", "params": {
            "targets": targets_label(self.targets), **self.scope.describe(),
            "lr": self.lr, "iterations": self.iterations, **self.loss_terms, "tau": self.tau,
            "smoothing": self.smoothing, "decay": self.decay, "scale_lr": self.scale_lr, "seed": self.seed,
            **({"when": self.when.describe()} if self.when is not None else {})}}

    def decide_from_trace(self, trace: Any) -> None:
        """With ``when=risk_above(…)``: decide which samples to regulate from a stored run (``ats.rerun`` calls it)."""
        if self.when is not None:
            self.when.decide_from(trace)

    # -- hook client protocol ------------------------------------------------------------------
    def on_install(self, session: Any) -> None:
        self.scope.install(session)
        self._site_index = {s.name: i for i, s in enumerate(session.sites)}
        tokenizer = getattr(session.pipe, "tokenizer", None)
        self._eos = getattr(tokenizer, "eos_token_id", None)
        self._previous, self._restore = {}, None  # nothing of a call of an earlier installation is given back
        self._bases, self._descents, self._indices = {}, {}, {}
        self._others = [c for c in session.interventions if c is not self]  # e.g. a TGate: no maps after its gate

    def on_step(self, step_ctx: Any) -> None:
        if step_ctx.step == 0:  # a new run: no temporal smoothing across generations
            self.scope.check(step_ctx)  # unknown targets fail here, before a recorder beside it writes
            if step_ctx.token_text is None and step_ctx.token_ids is None:
                warnings.warn("AttentionRegulation: the prompt came as prompt_embeds, so its end-of-text column is "
                              "unknown and only column 0 (CLIP's start of text) gets its unedited probabilities back "
                              "after the edit; pass the prompt as text to restore its first end-of-text column too",
                              AttnscopeWarning, stacklevel=2)
            self._previous, self._restore = {}, None
            self.history = {}
            if self.when is not None:
                self.when.new_run()
                steps = (self.scope.steps_of_run(step_ctx.num_steps) if self.scope.steps is not None and step_ctx.num_steps
                         else None)
                self.when.check(step_ctx, steps, self._cache_start(step_ctx.num_steps))

    def _cache_start(self, num_steps: int | None) -> tuple[Any, int] | None:
        """``(client, step)``: the earliest step from which another intervention of the session (TGate, by its
        ``gate_of_run``) serves the cross-attention from a cache in a run of ``num_steps``; None if none does."""
        starts = [(c, c.gate_of_run(num_steps)) for c in self._others
                  if num_steps and callable(getattr(c, "gate_of_run", None))]
        return min(starts, key=lambda item: item[1], default=None)

    def stages(self, ctx: Any) -> tuple[str, ...]:
        acting = self.scope.active(ctx) and (self.when is None or self.when.any_at_risk(ctx))
        if acting:
            return ("logits", "probs")
        return ("probs",) if self.when is not None and self.when.observing(ctx) else ()

    def on_logits(self, ctx: Any, logits: torch.Tensor) -> torch.Tensor:
        columns = self.scope.columns(ctx)
        h, w = ctx.spatial_shape
        basis = self._basis(h, w, logits.device)  # (K, pixels)
        lr = self.lr * (h * w / (256 * basis_centres(h)[0] * basis_centres(w)[0]) if self.scale_lr else 1.0)
        with one_thread(logits.numel(), logits.device):  # small tensors: no thread hand-offs
            out, restore = self._regulate(ctx, logits, columns, basis, lr)
        self._restore = (ctx.site.name, ctx.step, restore)
        return out

    def _regulate(self, ctx: Any, logits: torch.Tensor, columns: list[list[int]], basis: torch.Tensor,
                  lr: float) -> tuple[torch.Tensor, list[tuple[list[int], torch.Tensor, torch.Tensor]]]:
        """The edited logits, and per sample group the unedited SOT/EOT probabilities to restore."""
        out = logits.clone()
        restore = []
        cond = ctx.rows.cond
        for group in _groups(columns):
            cols = columns[group[0]]
            if self.when is not None:  # only the samples judged at risk
                group = [s for s in group if self.when.acts_on(ctx, s)]
            if not cols or not group:
                continue
            rows = [cond.start + s for s in group]
            index = _index(rows)
            z = logits[index].detach().float()  # (b, heads, pixels, tokens)
            b, heads, pixels, tokens = z.shape
            flat = z.reshape(b * heads, pixels, tokens)
            best, initial = self._optimise(flat, cols, basis, lr, groups=b, key=(ctx.site.name, ctx.step),
                                           samples=(group, ctx.rows.samples))
            key = (ctx.site.name, tuple(group))  # by sample: a CFG cutoff moves the cond rows, not the samples
            delta = torch.lerp(best, self._previous.get(key, initial), self.smoothing)  # s·Δ_prev + (1 − s)·Δ_best
            self._previous[key] = delta
            cols_t = self._long(cols, logits.device)
            edited = torch.add(flat.index_select(-1, cols_t), delta, alpha=self.decay**ctx.step)
            _put_columns(out, index, cols_t, edited.reshape(b, heads, pixels, -1).to(logits.dtype))
            if ctx.site.kind == "joint":  # no CLIP SOT/EOT sink to give back in a joint softmax (see docs)
                continue
            by_sinks: dict[tuple[int, ...], list[int]] = {}  # each prompt its own end of text (lengths differ)
            for i, sample in enumerate(group):
                by_sinks.setdefault(tuple(self._sink_columns(ctx, sample)), []).append(i)
            unedited = torch.softmax(z, -1)
            for sinks, members in by_sinks.items():
                if sinks:
                    keep = self._long(list(sinks), logits.device)
                    restore.append(([rows[i] for i in members], keep,
                                    unedited[_index(members)].index_select(-1, keep)))
        return out, restore

    def on_probs(self, ctx: Any, probs: torch.Tensor) -> torch.Tensor | None:
        if self.when is not None and self.when.observing(ctx):
            self.when.observe(ctx, probs)  # the decision step: nothing is edited yet
        if self._restore is None or self._restore[:2] != (ctx.site.name, ctx.step):
            return None
        out = probs.clone()
        for rows, keep, original in self._restore[2]:
            _put_columns(out, _index(rows), keep, original.to(probs.dtype))
        self._restore = None
        return out

    # -- the optimisation ----------------------------------------------------------------------
    def _optimise(self, z: torch.Tensor, cols: list[int], basis: torch.Tensor, lr: float, *, groups: int,
                  key: tuple[str, int], samples: tuple[list[int], int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Best Δ (rows, pixels, n) over the iterations, and the initial Δ; no host syncs.

        The weights are drawn per site and step; the descent (:class:`RegulationDescent`) is built once
        per shape and reused. ``samples``: which of the run's samples these are, and how many it has (the
        losses go into :attr:`history` at their places)."""
        rows = z.shape[0]
        n = len(cols)
        tau = self.tau if self.tau is not None else min(1.0, 0.2 * n)
        generator = torch.Generator(device=z.device).manual_seed(  # modulo 2**64: torch's range (as it reads a negative)
            ((self.seed * 1_000_003 + self._site_index.get(key[0], 0)) * 10_007 + key[1]) % 2**64)
        # one draw for a sample's heads, repeated for every sample: its start does not depend on its batch
        weights = torch.rand((rows // groups, basis.shape[0], n), generator=generator, device=z.device,
                             dtype=z.dtype).repeat(groups, 1, 1)
        descent = self._descent(rows, n, basis, lr, tau, groups).run(z, cols, weights)
        best, initial, first, best_loss = descent.result()
        group, count = samples
        if key not in self.history:  # NaN for the samples not regulated here (other columns come next, or safe)
            self.history[key] = tuple(torch.full((count,), float("nan"), device=first.device, dtype=first.dtype)
                                      for _ in range(2))
        where = torch.tensor(group, device=first.device)
        for kept, value in zip(self.history[key], (first, best_loss)):
            kept.index_copy_(0, where, value.to(kept.dtype))
        return best, initial

    def _basis(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The (K, pixels) bumps of a map size, built once per size and device."""
        key = (height, width, device)
        if key not in self._bases:
            self._bases[key] = gaussian_basis(height, width, device=device).reshape(-1, height * width)
        return self._bases[key]

    def _descent(self, rows: int, n: int, basis: torch.Tensor, lr: float, tau: float,
                 groups: int) -> RegulationDescent:
        """The descent for a shape, built once (its constants and buffers are reused)."""
        key = (rows, n, id(basis), lr, tau, groups, self.iterations, tuple(self.loss_terms.values()))
        if key not in self._descents:
            self._descents[key] = RegulationDescent(rows, n, basis, lr=lr, iterations=self.iterations, tau=tau,
                                                    groups=groups, **self.loss_terms)
        return self._descents[key]

    def _long(self, values: list[int], device: torch.device) -> torch.Tensor:
        """``values`` as an index tensor on ``device``, built once (no host-to-device copy per call)."""
        key = (tuple(values), device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(values, device=device)
        return self._indices[key]

    def _sink_columns(self, ctx: Any, sample: int) -> list[int]:
        """The columns of ``sample``'s prompt whose unedited probabilities are given back: the start-of-text token
        (CLIP's; T5 and Gemma prompts start with a word or ``<bos>``) and the first end-of-text token."""
        text = ctx.step_context.token_text
        if text is None:  # embeddings given: a CLIP-style layout is assumed, as the official code does
            return [0] + self._eot_columns(ctx, sample)
        prompt = ctx.rows.prompt_of_sample[sample]
        given = ctx.step_context.token_roles
        roles = given[prompt] if given is not None else _roles(tuple(text[prompt]))
        return [i for i, r in enumerate(roles) if r == "sot"][:1] + [i for i, r in enumerate(roles) if r == "eot"][:1]

    def _eot_columns(self, ctx: Any, sample: int) -> list[int]:
        ids = ctx.step_context.token_ids
        if ids is None or self._eos is None:
            return []
        hits = (ids[ctx.rows.prompt_of_sample[sample]] == self._eos).nonzero().flatten()
        return [int(hits[0])] if len(hits) else []


def _plain(value: Any) -> Any:
    """A numpy number as the Python number of the same value; anything else as it is.

    >>> _plain(np.float32(0.5)), _plain(np.int64(3)), _plain(0.25), _plain(None)
    (0.5, 3, 0.25, None)
    """
    return value.item() if isinstance(value, np.generic) else value


def _index(rows: list[int]) -> slice | list[int]:
    """Consecutive rows as a slice (a view of the batch), others as a list."""
    return slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[0] + len(rows))) else rows


def _put_columns(out: torch.Tensor, index: slice | list[int], cols: torch.Tensor, values: torch.Tensor) -> None:
    """``out[index][..., cols] = values`` in place, for a slice or a list of rows."""
    if isinstance(index, slice):
        out[index].index_copy_(-1, cols, values)
    else:
        out[index] = out[index].index_copy(-1, cols, values)


def _groups(columns: list[list[int]]) -> list[list[int]]:
    """Samples with the same target columns, optimised together (usually all of them)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for sample, cols in enumerate(columns):
        groups.setdefault(tuple(cols), []).append(sample)
    return list(groups.values())

"""``Reweight``: scale the attention on some words (the prompt-to-prompt reweighting baseline)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import AttnscopeError
from ._scope import InterventionScope, is_real, repr_options, targets_label

__all__ = ["Reweight"]


class Reweight:
    """Multiply the post-softmax attention on ``word``'s tokens by ``factor`` (conditional rows only).

    The prompt-to-prompt "attention reweighting" edit: no renormalisation, so the word's columns
    carry ``factor`` times their mass into the attention output. A hook client of the ``probs`` stage.

    Parameters
    ----------
    word : str, int, list of them, or a function prompt → those
        Word(s), phrase(s) or token position(s) whose columns are scaled (every occurrence; a column named
        twice is scaled once).
    factor : float
        Scale, finite and ≥ 0; > 1 strengthens the word, < 1 weakens it, 0 removes it.
    sites, steps : optional
        Where and when (default: every site, every step); as in :class:`InterventionScope`.

    Examples
    --------
    >>> import attnscope as ats, numpy as np, torch
    >>> pipe = ats.load_pipeline("shapes")
    >>> def generate():
    ...     out = pipe("a red circle and a blue square", num_inference_steps=4, output_type="np",
    ...                generator=torch.Generator().manual_seed(0))
    ...     return out.images[0]
    >>> plain = generate()
    >>> with ats.hooks(pipe, ats.regulate.Reweight("square", 3.0)):
    ...     reweighted = generate()
    >>> bool(np.abs(reweighted - plain).max() > 0.01)  # three times the attention on "square" changes the image
    True
    >>> ats.regulate.Reweight("square", 3.0).describe()
    {'name': 'Reweight', 'params': {'word': 'square', 'factor': 3.0, 'sites': None, 'steps': None}}
    """

    role = "intervention"

    def __init__(self, word: Any, factor: float, *, sites: Any = None, steps: Any = None):
        if not is_real(factor) or not 0 <= factor < math.inf:
            raise AttnscopeError(f"factor={factor!r}: expected a finite non-negative number (a float or an int, "
                                 f"numpy's too)")
        self.scope = InterventionScope(word, sites, steps)
        self.word, self.factor = self.scope.targets, float(factor)  # numpy's and xarray's words as Python's

    def __repr__(self) -> str:
        given = {"sites": (self.scope.sites, None), "steps": (self.scope.steps, None)}
        return f"Reweight({targets_label(self.word)!r}, {self.factor}{repr_options(given)})"

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {"name": "Reweight", "params": {"word": targets_label(self.word), "factor": self.factor,
                                               **self.scope.describe()}}

    def on_install(self, session: Any) -> None:
        self.scope.install(session)

    def on_step(self, step_ctx: Any) -> None:
        if step_ctx.step == 0:  # unknown words fail here, before a recorder beside it writes
            self.scope.check(step_ctx)

    def stages(self, ctx: Any) -> tuple[str, ...]:
        return ("probs",) if self.scope.active(ctx) else ()

    def on_probs(self, ctx: Any, probs: Any) -> Any:
        cond = ctx.rows.cond
        out = probs.clone()
        for sample, cols in enumerate(self.scope.columns(ctx)):
            row = cond.start + sample
            out[row, :, :, cols] = probs[row, :, :, cols] * self.factor
        return out

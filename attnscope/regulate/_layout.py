"""Layouts for spatial control: where each object goes, as a box or a centre in [0, 1]², and its mask on a map."""

from __future__ import annotations

import re

import numpy as np
import torch

from ..errors import AttnscopeError
from ..stats import region_mask as stats_region_mask

__all__ = ["layout_from_prompt", "region_mask"]

#: what ends a phrase without belonging to its object ("a blue square." → "a blue square")
_PUNCTUATION = ".,;:!?"

#: relation phrases a default layout understands: the first object's box, then the second's
_RELATIONS = {
    "to the left of": ((0.05, 0.25, 0.45, 0.75), (0.55, 0.25, 0.95, 0.75)),
    "to the right of": ((0.55, 0.25, 0.95, 0.75), (0.05, 0.25, 0.45, 0.75)),
    "left of": ((0.05, 0.25, 0.45, 0.75), (0.55, 0.25, 0.95, 0.75)),
    "right of": ((0.55, 0.25, 0.95, 0.75), (0.05, 0.25, 0.45, 0.75)),
    "above": ((0.25, 0.05, 0.75, 0.45), (0.25, 0.55, 0.75, 0.95)),
    "below": ((0.25, 0.55, 0.75, 0.95), (0.25, 0.05, 0.75, 0.45)),
}


def layout_from_prompt(prompt: str) -> dict[str, tuple[float, ...]]:
    """A deterministic default layout: object phrase → box ``(x0, y0, x1, y1)`` in [0, 1]².

    ``"A <relation> B"`` (to the left of / to the right of / above / below) puts A and B in the two
    halves the relation names; ``"A and B and C"`` (or a comma list) puts the objects side by side,
    left to right, in equal strips; one object gets the middle. The relation words and "and" match in any case
    ("A cat Below a dog"). Punctuation around a phrase is not part
    of it. A phrase named twice (``"a cat and a cat"``) is an error: a layout maps each phrase to one
    region, so give one with distinct phrases.

    >>> layout_from_prompt("a red circle to the left of a blue square")
    {'a red circle': (0.05, 0.25, 0.45, 0.75), 'a blue square': (0.55, 0.25, 0.95, 0.75)}
    >>> layout_from_prompt("a cat and a dog.")
    {'a cat': (0.05, 0.2, 0.475, 0.8), 'a dog': (0.525, 0.2, 0.95, 0.8)}
    """
    text = " ".join(prompt.split())
    for relation in sorted(_RELATIONS, key=len, reverse=True):
        parts = [_phrase(p) for p in re.split(rf"\s+{re.escape(relation)}\s+", text, maxsplit=1, flags=re.IGNORECASE)]
        if len(parts) == 2 and all(parts):
            return dict(zip(_distinct(parts, prompt), _RELATIONS[relation]))
    phrases = _distinct([p for p in (_phrase(p) for p in re.split(r"\s*,\s*|\s+and\s+", text, flags=re.IGNORECASE))
                         if p], prompt)
    if not phrases:
        raise AttnscopeError(f"prompt {prompt!r}: no object phrase to lay out")
    n, gap = len(phrases), 0.05
    width = (0.9 - gap * (n - 1)) / n
    return {p: (round(0.05 + k * (width + gap), 4), 0.2, round(0.05 + k * (width + gap) + width, 4), 0.8)
            for k, p in enumerate(phrases)}


def _phrase(part: str) -> str:
    """``part`` of a prompt without the spaces and punctuation around it."""
    return part.strip(" " + _PUNCTUATION)


def _distinct(phrases: list[str], prompt: str) -> list[str]:
    """``phrases``, each once (case ignored, as phrases are matched), else one error naming the repeated phrase."""
    seen: set[str] = set()
    for phrase in phrases:
        if phrase.lower() in seen:
            raise AttnscopeError(f"prompt {prompt!r} names the object {phrase!r} twice: a layout maps each phrase to "
                                 f"one region, so two objects named alike cannot be placed apart; name them "
                                 f"differently in the prompt ('a red cat and a black cat')")
        seen.add(phrase.lower())
    return phrases


def region_mask(region: tuple[float, ...], shape: tuple[int, int], radius: float = 0.2) -> torch.Tensor:
    """``(h·w,)`` float mask of a box or of a disk of ``radius`` around a centre, on an ``(h, w)`` grid of pixel centres:
    :func:`attnscope.stats.region_mask`, flattened, as the float tensor the control multiplies by.

    >>> region_mask((0.0, 0.0, 0.5, 1.0), (2, 4)).tolist()   # the left half of a 2×4 map
    [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """
    return torch.from_numpy(stats_region_mask(region, shape, radius).reshape(-1).astype(np.float32))

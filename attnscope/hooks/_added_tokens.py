"""Tokens added to a tokenizer after it was made (textual inversion's ``<tok>``), and how their CLIP pieces end a word.

Here, not in :mod:`attnscope.tokens`, because the hook core spells the prompt's tokens when it records them and
imports nothing but :mod:`attnscope.errors`; ``attnscope.tokens`` reads the ``</w>`` this module writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["END_OF_WORD", "added_tokens", "mark_added_tokens"]

#: CLIP BPE's end-of-word marker on a word's last piece
END_OF_WORD = "</w>"


def added_tokens(tokenizer: Any) -> set[str]:
    """The tokens added to a tokenizer after it was made, without its special tokens: textual inversion's
    (``pipe.load_textual_inversion(..., token="<tok>")`` adds ``<tok>``, and ``<tok>_1``, … for an embedding of several
    vectors)."""
    encoder = getattr(tokenizer, "added_tokens_encoder", None)
    if not isinstance(encoder, Mapping):
        return set()
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    return {str(token) for token in encoder if token not in special}


def mark_added_tokens(tokens: Sequence[str], added: set[str] | frozenset[str]) -> list[str]:
    """CLIP BPE pieces with each added token (textual inversion's) ending its word: the tokenizer splits an added token
    from the text around it before BPE, so it is a word of its own, but its string carries no ``</w>`` and would join
    the next word's pieces. The last piece of each added token gets ``</w>``; the vectors of one token (``<tok>``,
    ``<tok>_1``, …: diffusers' names) stay one word.

    >>> mark_added_tokens(["a</w>", "<tok>", "<tok>_1", "circle</w>", "<tok>"], {"<tok>", "<tok>_1"})
    ['a</w>', '<tok>', '<tok>_1</w>', 'circle</w>', '<tok></w>']
    """
    out = list(tokens)
    base = None
    for i, tok in enumerate(out):
        if tok not in added:
            base = None
            continue
        base = base if base is not None and re.fullmatch(re.escape(base) + r"_\d+", tok) else tok
        after = out[i + 1] if i + 1 < len(out) else None
        continues = after in added and re.fullmatch(re.escape(base) + r"_\d+", after or "") is not None
        if not continues and not tok.endswith(END_OF_WORD):
            out[i] = tok + END_OF_WORD
    return out

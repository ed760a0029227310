"""Token strings and the word ↔ token alignment for CLIP BPE tokenizers."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SOT", "EOT", "word_alignment", "prompt_length"]

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_END_OF_WORD = "</w>"


def prompt_length(tokens: Sequence[str]) -> int:
    """Number of positions up to and including the first end-of-text token.

    >>> prompt_length(["<|startoftext|>", "a</w>", "<|endoftext|>", "<|endoftext|>"])
    3
    """
    return tokens.index(EOT) + 1 if EOT in tokens else len(tokens)


def word_alignment(tokens: Sequence[str]) -> dict[str, list[int]]:
    """Map each word of the prompt to the token positions that spell it (word pieces merged).

    Positions of every occurrence are listed in order; SOT, EOT and padding are left out.

    Examples
    --------
    >>> word_alignment(["<|startoftext|>", "a</w>", "ele", "phant</w>", "and</w>", "a</w>", "<|endoftext|>"])
    {'a': [1, 5], 'elephant': [2, 3], 'and': [4]}
    """
    words: dict[str, list[int]] = {}
    pieces: list[int] = []
    for i, tok in enumerate(tokens[: prompt_length(tokens)]):
        if tok in (SOT, EOT):
            continue
        pieces.append(i)
        if tok.endswith(_END_OF_WORD):
            word = "".join(tokens[j] for j in pieces)[: -len(_END_OF_WORD)].replace(_END_OF_WORD, "")
            words.setdefault(word, []).extend(pieces)
            pieces = []
    return words

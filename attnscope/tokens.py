"""Token strings and the word ↔ token alignment for CLIP BPE tokenizers.

Positions are labelled by role — ``"sot"`` (start of text), ``"word"`` (a piece of a prompt word),
``"eot"`` (the first end-of-text token) and ``"pad"`` (everything after it) — and word pieces are
merged into words the way DAAM does: a word ends at a piece carrying ``</w>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import AttnscopeError

__all__ = ["EOT", "ROLES", "SOT", "prompt_length", "prompt_text", "resolve_targets", "target_occurrences",
           "token_roles", "token_words", "word_alignment"]

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
ROLES = ("sot", "word", "eot", "pad")
_END_OF_WORD = "</w>"


def prompt_length(tokens: Sequence[str]) -> int:
    """Number of positions up to and including the first end-of-text token.

    >>> prompt_length(["<|startoftext|>", "a</w>", "<|endoftext|>", "<|endoftext|>"])
    3
    """
    return tokens.index(EOT) + 1 if EOT in tokens else len(tokens)


def token_roles(tokens: Sequence[str]) -> list[str]:
    """Role of every position: ``"sot"``, ``"word"``, ``"eot"`` (the first end-of-text) or ``"pad"``.

    Empty strings (a trace captured from prompt embeddings has no token text) count as padding.

    >>> token_roles(["<|startoftext|>", "a</w>", "red</w>", "<|endoftext|>", "<|endoftext|>"])
    ['sot', 'word', 'word', 'eot', 'pad']
    """
    end = prompt_length(tokens)
    roles = []
    for i, tok in enumerate(tokens):
        if i >= end or not tok:
            roles.append("pad")
        elif tok == SOT:
            roles.append("sot")
        elif tok == EOT:
            roles.append("eot")
        else:
            roles.append("word")
    return roles


def token_words(tokens: Sequence[str]) -> list[str]:
    """The word each position belongs to (pieces merged); ``""`` for SOT, EOT and padding.

    >>> token_words(["<|startoftext|>", "a</w>", "ele", "phant</w>", "<|endoftext|>"])
    ['', 'a', 'elephant', 'elephant', '']
    """
    out = [""] * len(tokens)
    for word, positions in _occurrences(tokens):
        for p in positions:
            out[p] = word
    return out


def _occurrences(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Every word of the prompt in order, with its piece positions."""
    found: list[tuple[str, list[int]]] = []
    pieces: list[int] = []
    for i, role in enumerate(token_roles(tokens)):
        if role != "word":
            continue
        pieces.append(i)
        if tokens[i].endswith(_END_OF_WORD):
            word = "".join(tokens[j] for j in pieces)[: -len(_END_OF_WORD)].replace(_END_OF_WORD, "")
            found.append((word, pieces))
            pieces = []
    if pieces:  # a prompt cut by the tokenizer's length limit ends inside a word
        found.append(("".join(tokens[j] for j in pieces).replace(_END_OF_WORD, ""), pieces))
    return found


def prompt_text(tokens: Sequence[str]) -> str:
    """The prompt's words joined by spaces (pieces merged, special tokens dropped).

    >>> prompt_text(["<|startoftext|>", "a</w>", "ele", "phant</w>", "<|endoftext|>", "<|endoftext|>"])
    'a elephant'
    """
    return " ".join(word for word, _ in _occurrences(tokens))


def word_alignment(tokens: Sequence[str]) -> dict[str, list[int]]:
    """Map each word of the prompt to the token positions that spell it (word pieces merged).

    Positions of every occurrence are listed in order; SOT, EOT and padding are left out.

    Examples
    --------
    >>> word_alignment(["<|startoftext|>", "a</w>", "ele", "phant</w>", "and</w>", "a</w>", "<|endoftext|>"])
    {'a': [1, 5], 'elephant': [2, 3], 'and': [4]}
    """
    words: dict[str, list[int]] = {}
    for word, positions in _occurrences(tokens):
        words.setdefault(word, []).extend(positions)
    return words


def resolve_targets(tokens: Sequence[str], targets: Sequence[str | int] | str | int) -> dict[str, list[int]]:
    """Token positions of each target: a word, a phrase of consecutive words, or a position.

    A word or phrase that occurs several times gets the positions of every occurrence; a word
    spelled by several pieces gets all of them. Matching ignores case.

    Parameters
    ----------
    tokens : sequence of str
        The token strings of one prompt (``trace.tokens``).
    targets : str, int or sequence of them
        ``"circle"``, ``"blue square"``, ``7`` (a token position), or a list of these.

    Returns
    -------
    dict
        Target label → sorted positions, in the order given (a position ``7`` is labelled ``"7"``).

    Examples
    --------
    >>> toks = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>",
    ...         "square</w>", "<|endoftext|>"]
    >>> resolve_targets(toks, ["circle", "blue square", "a", 2])
    {'circle': [3], 'blue square': [6, 7], 'a': [1, 5], '2': [2]}
    """
    items = [targets] if isinstance(targets, (str, int)) else list(targets)
    if not items:
        raise AttnscopeError("targets=[]: expected at least one word, phrase or token position")
    occurrences = [(w.lower(), p) for w, p in _occurrences(tokens)]
    resolved: dict[str, list[int]] = {}
    for target in items:
        if isinstance(target, bool) or not isinstance(target, (str, int)):
            raise AttnscopeError(f"target {target!r}: expected a word, a phrase or a token position (int)")
        if isinstance(target, int):
            if not 0 <= target < len(tokens):
                raise AttnscopeError(f"target {target}: token position out of range 0..{len(tokens) - 1}")
            resolved[str(target)] = [target]
            continue
        found = _matches(occurrences, target)
        if not found:
            words = [w for w, _ in occurrences]
            listed = ", ".join(dict.fromkeys(words)) or "none: the trace has no token text (prompt given as embeddings); use positions"
            raise AttnscopeError(f"target {target!r} is not in the prompt; its words are: {listed}")
        resolved[target] = sorted({p for positions in found for p in positions})
    return resolved


def target_occurrences(tokens: Sequence[str], target: str) -> list[list[int]]:
    """The token positions of each occurrence of a word or phrase, in prompt order (case ignored).

    Examples
    --------
    >>> toks = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>",
    ...         "circle</w>", "<|endoftext|>"]
    >>> target_occurrences(toks, "circle"), target_occurrences(toks, "blue circle"), target_occurrences(toks, "cat")
    ([[3], [7]], [[6, 7]], [])
    """
    return _matches([(w.lower(), p) for w, p in _occurrences(tokens)], target)


def _matches(occurrences: list[tuple[str, list[int]]], target: str) -> list[list[int]]:
    """Positions of each match of the phrase ``target`` among the (lower-cased) words."""
    phrase, words = target.lower().split(), [w for w, _ in occurrences]
    return [[p for _, ps in occurrences[start:start + len(phrase)] for p in ps]
            for start in range(len(words) - len(phrase) + 1) if phrase and words[start:start + len(phrase)] == phrase]

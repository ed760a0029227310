"""Token strings and the word ↔ token alignment for CLIP BPE, sentencepiece (T5, Gemma) and byte-level BPE (Qwen).

Positions are labelled by role — ``"sot"`` (start of text: CLIP's ``<|startoftext|>``, Gemma's
``<bos>``), ``"word"`` (a piece of a prompt word), ``"eot"`` (the first end-of-text token: CLIP's
``<|endoftext|>``, T5's ``</s>``, Gemma's ``<eos>``), ``"pad"`` (everything after it) and
``"instruction"`` (text the pipeline adds around the user's prompt: Sana's instruction prefix,
Flux.2's chat template) — and word pieces are merged into words the way DAAM does: a CLIP word ends
at a piece carrying ``</w>``, a sentencepiece word starts at a piece carrying ``▁`` (and punctuation
stands apart, as CLIP's pre-tokenizer puts it: ``▁circle`` + ``,`` are the words ``circle`` and ``,``),
a byte-level BPE word at a piece carrying ``Ġ``.

Roles are read from the token strings, except where the strings cannot tell (an instruction is
ordinary text): there the family adapter that spelled the tokens gives them, the capture stores
them (the ``token_role`` coordinate) and every function here takes them as ``roles=``.

A token axis may hold several *segments* one after the other: SD3's sites read 77 CLIP positions
followed by the T5 positions. A segment starts at CLIP's ``<|startoftext|>``, or, once the previous
segment has ended, at a sentencepiece token (``▁…``, ``</s>`` or ``<pad>``). Roles and words are
found per segment, so a word of the prompt maps to its pieces in every segment.
"""

from __future__ import annotations

import numbers
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import AttnscopeError

__all__ = ["BYTE_SPACE", "EOT", "ROLES", "SOT", "byte_to_unicode", "is_target", "prompt_length", "prompt_positions", "prompt_text", "resolve_targets",
           "segment_bounds", "segment_occurrences", "target_list", "target_occurrences", "token_roles", "token_words", "word_alignment", "word_occurrences"]

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
T5_EOS, T5_PAD, T5_SPACE = "</s>", "<pad>", "\u2581"
#: the space marker of byte-level BPE (GPT-2, Qwen): "Ġ"
BYTE_SPACE = "\u0120"
ROLES = ("sot", "word", "eot", "pad", "instruction")
_STARTS = (SOT, "<bos>")
_ENDS = (EOT, T5_EOS, "<eos>")
_END_OF_WORD = "</w>"


def _sentencepiece(token: str) -> bool:
    return token.startswith(T5_SPACE) or token in (T5_EOS, T5_PAD)


def segment_bounds(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each tokenizer segment on the token axis (one for a CLIP or a T5 prompt).

    >>> segment_bounds(["<|startoftext|>", "a</w>", "<|endoftext|>", "!", "\u2581a", "</s>", "<pad>"])
    [(0, 4), (4, 7)]
    """
    starts, ended = [0], False
    for i, tok in enumerate(tokens):
        if i == 0:
            continue
        if tok == SOT or (ended and _sentencepiece(tok) and not _sentencepiece(tokens[i - 1])):
            starts.append(i)
            ended = False
        if tok == EOT:
            ended = True
    return list(zip(starts, starts[1:] + [len(tokens)]))


def prompt_length(tokens: Sequence[str]) -> int:
    """Number of positions up to and including the first end-of-text token (of the first segment).

    >>> prompt_length(["<|startoftext|>", "a</w>", "<|endoftext|>", "<|endoftext|>"])
    3
    >>> prompt_length(["\u2581a", "\u2581red", "</s>", "<pad>"])
    3
    """
    start, stop = segment_bounds(tokens)[0] if tokens else (0, 0)
    for i in range(start, stop):
        if tokens[i] in (EOT, T5_EOS):
            return i + 1
    return stop


def prompt_positions(tokens: Sequence[str], roles: Sequence[str] | None = None) -> list[int]:
    """Positions of every segment's prompt: SOT, its word pieces and its end-of-text token (no padding).

    An instruction the pipeline put before the prompt is kept too (it is what the model read).

    >>> prompt_positions(["<|startoftext|>", "a</w>", "<|endoftext|>", "!", "\u2581a", "</s>", "<pad>"])
    [0, 1, 2, 4, 5]
    """
    return [i for i, role in enumerate(token_roles(tokens, roles)) if role != "pad"]


def token_roles(tokens: Sequence[str], roles: Sequence[str] | None = None) -> list[str]:
    """Role of every position: ``"sot"``, ``"word"``, ``"eot"`` (the first end-of-text), ``"pad"`` or ``"instruction"``.

    ``roles`` given (by the adapter that spelled the tokens) are returned as they are, after a
    check. Otherwise they are read from the strings: empty strings (a trace captured from prompt
    embeddings has no token text) count as padding; T5's ``</s>`` and Gemma's ``<eos>`` are the end
    of text, ``<pad>`` padding, Gemma's ``<bos>`` the start; each segment has its own roles.

    >>> token_roles(["<|startoftext|>", "a</w>", "red</w>", "<|endoftext|>", "<|endoftext|>"])
    ['sot', 'word', 'word', 'eot', 'pad']
    >>> token_roles(["\u2581a", "\u2581ele", "phant", "</s>", "<pad>"])
    ['word', 'word', 'word', 'eot', 'pad']
    >>> token_roles(["<bos>", "\u2581a", "<pad>"])
    ['sot', 'word', 'pad']
    """
    if roles is not None:
        roles = [str(r) for r in roles]
        bad = sorted({r for r in roles if r not in ROLES})
        if len(roles) != len(tokens) or bad:
            raise AttnscopeError(f"roles: expected one of {ROLES} per token ({len(tokens)}), got {len(roles)} "
                                 f"roles{f' with unknown {bad}' if bad else ''}")
        return roles
    found: list[str] = []
    for start, stop in segment_bounds(tokens):
        ended = False
        for i in range(start, stop):
            tok = tokens[i]
            if ended or not tok or tok == T5_PAD:
                found.append("pad")
            elif tok in _STARTS:
                found.append("sot")
            elif tok in _ENDS:
                found.append("eot")
                ended = True
            else:
                found.append("word")
    return found


def token_words(tokens: Sequence[str], roles: Sequence[str] | None = None) -> list[str]:
    """The word each position belongs to (pieces merged); ``""`` for SOT, EOT and padding.

    >>> token_words(["<|startoftext|>", "a</w>", "ele", "phant</w>", "<|endoftext|>"])
    ['', 'a', 'elephant', 'elephant', '']
    >>> token_words(["\u2581a", "\u2581ele", "phant", "</s>"])
    ['a', 'elephant', 'elephant', '']
    """
    out = [""] * len(tokens)
    for word, positions in word_occurrences(tokens, roles):
        for p in positions:
            out[p] = word
    return out


def word_occurrences(tokens: Sequence[str], roles: Sequence[str] | None = None) -> list[tuple[str, list[int]]]:
    """Every word of the prompt in order, segment after segment, with its piece positions (a repeated word once
    per occurrence).

    >>> word_occurrences(["<|startoftext|>", "a</w>", "an", "teater</w>", "a</w>", "<|endoftext|>"])
    [('a', [1]), ('anteater', [2, 3]), ('a', [4])]
    """
    return [found for segment in _segment_occurrences(tokens, roles) for found in segment]


def _segment_occurrences(tokens: Sequence[str], roles: Sequence[str] | None = None) -> list[list[tuple[str, list[int]]]]:
    """Per text segment (SD3: CLIP, then T5), its words in order with their piece positions."""
    found: list[list[tuple[str, list[int]]]] = []
    roles = token_roles(tokens, roles)
    for start, stop in segment_bounds(tokens):
        words = [i for i in range(start, stop) if roles[i] == "word"]
        if any(t.startswith(BYTE_SPACE) or t == _BYTE_NEWLINE for t in tokens[start:stop]):
            found.append(_byte_level_words(tokens, words))
        elif any(tokens[i].startswith(T5_SPACE) for i in words):
            found.append(_marked_words(tokens, words, T5_SPACE))
        else:
            found.append(_bpe_words(tokens, words))
    return found


def _bpe_words(tokens: Sequence[str], positions: list[int]) -> list[tuple[str, list[int]]]:
    """Words of CLIP BPE pieces (a word ends at a piece carrying ``</w>``), each spelled from its pieces' bytes
    (CLIP's pieces are byte-level: ``Ã`` + ``©`` → ``é``).

    >>> _bpe_words(["a</w>", "caf", "\u00c3", "\u00a9</w>"], [0, 1, 2, 3])
    [('a', [0]), ('café', [1, 2, 3])]
    """
    found: list[tuple[str, list[int]]] = []
    pieces: list[int] = []
    for i in positions:
        pieces.append(i)
        if tokens[i].endswith(_END_OF_WORD):
            found.append((_spelled(tokens, pieces), pieces))
            pieces = []
    if pieces:  # a prompt cut by the tokenizer's length limit ends inside a word
        found.append((_spelled(tokens, pieces), pieces))
    return found


def _spelled(tokens: Sequence[str], pieces: list[int]) -> str:
    """The text of CLIP BPE pieces: ``</w>`` dropped, the bytes they spell decoded (as text where a piece has a
    character outside the byte-level table, e.g. hand-written tokens). A textual-inversion token of several vectors
    (``<tok>``, ``<tok>_1``, … as diffusers names them) spells the token the prompt wrote: ``<tok>``.

    >>> _spelled(["<tok>", "<tok>_1", "<tok>_2</w>"], [0, 1, 2])
    '<tok>'
    """
    texts = [tokens[j].replace(_END_OF_WORD, "") for j in pieces]
    if len(texts) > 1 and all(t == f"{texts[0]}_{k}" for k, t in enumerate(texts[1:], 1)):
        return texts[0]
    text = "".join(texts)
    if all(c in _BYTE_OF for c in text):
        return _piece_bytes(text).decode("utf-8", errors="replace")
    return text


def _marked_words(tokens: Sequence[str], positions: list[int], marker: str) -> list[tuple[str, list[int]]]:
    """Words of pieces where ``marker`` (``▁``) starts a word; a gap in the positions starts one too, and so does a
    change between punctuation pieces and the others (``▁circle`` + ``,`` → ``circle``, ``,``), as CLIP splits them.

    >>> _marked_words(["\u2581a", "\u2581circle", ",", "\u2581ele", "phant", "!", "!"], list(range(7)), "\u2581")
    [('a', [0]), ('circle', [1]), (',', [2]), ('elephant', [3, 4]), ('!!', [5, 6])]
    """
    words: list[list[int]] = []
    kinds: list[bool | None] = []  # per word: punctuation only (True), other text (False), nothing yet (None)
    for i in positions:
        text = tokens[i].replace(marker, "").strip()
        kind = _is_punctuation(text) if text and not _BYTE_PIECES.fullmatch(text) else None  # a byte sides with neither
        if (tokens[i].startswith(marker) or not words or words[-1][-1] != i - 1
                or (kind is not None and kinds[-1] is not None and kind != kinds[-1])):
            words.append([])
            kinds.append(None)
        words[-1].append(i)
        kinds[-1] = kind if kinds[-1] is None else kinds[-1]
    spelled = [(_byte_fallback("".join(tokens[j] for j in pieces).replace(marker, "")).strip(), pieces)
               for pieces in words]
    return [(word, pieces) for word, pieces in spelled if word]  # a lone "▁" spells nothing


#: sentencepiece's byte-fallback pieces (Gemma, Llama): a character outside the vocabulary as its UTF-8 bytes
_BYTE_PIECES = re.compile(r"(?:<0x[0-9A-Fa-f]{2}>)+")


def _byte_fallback(text: str) -> str:
    """``text`` with each run of byte-fallback pieces decoded as the UTF-8 it spells (``Caf<0xC3><0xA9>`` → ``Café``).

    >>> _byte_fallback("Caf<0xC3><0xA9>"), _byte_fallback("<0xF0><0x9F><0x90><0xB1>cat"), _byte_fallback("a<0x21>")
    ('Café', '🐱cat', 'a!')
    """
    return _BYTE_PIECES.sub(lambda m: bytes.fromhex(m.group().replace("<0x", "").replace(">", ""))
                            .decode("utf-8", errors="replace"), text)


def _is_punctuation(text: str) -> bool:
    """No letter or digit in ``text`` (CLIP's pre-tokenizer makes such a run a word of its own)."""
    return not any(c.isalnum() for c in text)


def byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's table (GPT-2's; CLIP and Qwen use it): each byte → the printable character that spells it.

    >>> table = byte_to_unicode()
    >>> table[ord("a")], table[ord(" ")], table[10]   # 10: a newline
    ('a', 'Ġ', 'Ċ')
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in keep:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_OF = {char: byte for byte, char in byte_to_unicode().items()}
_BYTE_NEWLINE = "\u010a"  # "Ċ"


def _byte_level_words(tokens: Sequence[str], positions: list[int]) -> list[tuple[str, list[int]]]:
    """Words of byte-level BPE pieces: a word starts at a piece beginning with ``Ġ`` (a space) or after a gap in the
    positions; a piece that is only whitespace (a lone ``Ġ``, a newline) belongs to no word and ends the one before;
    a word's text is its pieces' bytes decoded together (``Ã`` + ``©`` → ``é``). Punctuation stands apart from
    letters and digits, as in the other tokenizers' words (``elephant`` + ``,`` → ``elephant``, ``,``); a piece
    holding part of a multi-byte character sides with neither.

    >>> _byte_level_words(["a", "\u0120red", "\u0120", "caf", "\u00c3", "\u00a9", ",", "!"], list(range(8)))
    [('a', [0]), ('red', [1]), ('café', [3, 4, 5]), (',!', [6, 7])]
    """
    found: list[tuple[str, list[int]]] = []
    pieces: list[int] = []
    kind: list[bool | None] = [None]  # the open word's: punctuation only (True), other text (False), unknown (None)

    def close() -> None:
        text = b"".join(_piece_bytes(tokens[j]) for j in pieces).decode("utf-8", errors="replace").strip()
        if text:
            found.append((text, list(pieces)))
        pieces.clear()
        kind[0] = None

    for i in positions:
        raw = _piece_bytes(tokens[i]).strip()
        blank = not raw
        this = None if blank or max(raw) >= 0x80 else _is_punctuation(raw.decode("ascii"))
        if (blank or tokens[i].startswith(BYTE_SPACE) or (pieces and pieces[-1] != i - 1)
                or (this is not None and kind[0] is not None and this != kind[0])):
            close()
        if not blank:
            pieces.append(i)
            kind[0] = this if kind[0] is None else kind[0]
    close()
    return found


def _piece_bytes(piece: str) -> bytes:
    return bytes(_BYTE_OF.get(c, ord("?")) for c in piece)


def prompt_text(tokens: Sequence[str], roles: Sequence[str] | None = None) -> str:
    """The prompt's words joined by spaces (pieces merged, special tokens dropped); with several text segments
    spelling the prompt (SD3: CLIP, then T5), the one with the most words (T5 when CLIP cut a long prompt).

    >>> prompt_text(["<|startoftext|>", "a</w>", "ele", "phant</w>", "<|endoftext|>", "<|endoftext|>"])
    'a elephant'
    >>> prompt_text(["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>", "▁a", "▁cat", "</s>"])
    'a cat'
    """
    segments = _segment_occurrences(tokens, roles)
    longest = max(segments, key=len, default=[])
    return " ".join(word for word, _ in longest)


def word_alignment(tokens: Sequence[str], roles: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Map each word of the prompt to the token positions that spell it (word pieces merged).

    Positions of every occurrence are listed in order; SOT, EOT, padding and a pipeline's
    instruction (``roles``) are left out.

    Examples
    --------
    >>> word_alignment(["<|startoftext|>", "a</w>", "ele", "phant</w>", "and</w>", "a</w>", "<|endoftext|>"])
    {'a': [1, 5], 'elephant': [2, 3], 'and': [4]}
    """
    words: dict[str, list[int]] = {}
    for word, positions in word_occurrences(tokens, roles):
        words.setdefault(word, []).extend(positions)
    return words


def is_target(value: Any) -> bool:
    """Whether ``value`` is one target: a word or phrase (str) or a token position (any int, numpy's included; not a
    bool).

    >>> import numpy as np
    >>> is_target("circle"), is_target(np.int64(3)), is_target(True), is_target(["circle"])
    (True, True, False, False)
    """
    return isinstance(value, (str, numbers.Integral)) and not isinstance(value, bool)


def target_list(targets: Any) -> list[Any]:
    """``targets`` as a list: one target (a str or an int) in a list of its own, any other iterable listed. A 0-d
    numpy or xarray array (``da.token[3].values``, ``da.word[0]``) is the one value it holds.

    >>> import numpy as np
    >>> target_list("blue square"), target_list(7), target_list(("circle", 2)), target_list(np.array(3))
    (['blue square'], [7], ['circle', 2], [3])
    """
    if isinstance(targets, Mapping):  # its values (weights?) would be dropped silently
        raise AttnscopeError(f"targets={targets!r}: a mapping; expected a word, a phrase, a token position or a list "
                             f"of them")
    targets = _scalar(targets)
    one = isinstance(targets, (str, bytes, numbers.Integral)) or not isinstance(targets, Iterable)
    return [targets] if one else [_scalar(t) for t in targets]


def _scalar(value: Any) -> Any:
    """The value a 0-d array (numpy's, xarray's) or a numpy scalar holds, as a Python object; anything else as it is."""
    return value.item() if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)) else value


def resolve_targets(tokens: Sequence[str], targets: Sequence[str | int] | str | int,
                    roles: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Token positions of each target: a word, a phrase of consecutive words, or a position.

    A word or phrase that occurs several times gets the positions of every occurrence; a word
    spelled by several pieces gets all of them. Matching ignores case.

    Parameters
    ----------
    tokens : sequence of str
        The token strings of one prompt (``trace.tokens``).
    targets : str, int or sequence of them
        ``"circle"``, ``"blue square"``, ``7`` (a token position; numpy's ints too), or a list of these.
    roles : sequence of str, optional
        The positions' roles when the strings cannot tell them (:func:`token_roles`): words of a
        pipeline's instruction are not the prompt's and are never matched.

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
    items = target_list(targets)
    if not items:
        raise AttnscopeError("targets=[]: expected at least one word, phrase or token position")
    segments = _lower(_segment_occurrences(tokens, roles))
    occurrences = [found for segment in segments for found in segment]
    resolved: dict[str, list[int]] = {}
    for target in items:
        if not is_target(target):
            raise AttnscopeError(f"target {target!r}: expected a word, a phrase or a token position (int)")
        if isinstance(target, numbers.Integral):
            target = int(target)  # numpy's ints count (an np.arange, a .values item)
            if not 0 <= target < len(tokens):
                raise AttnscopeError(f"target {target}: token position out of range 0..{len(tokens) - 1}")
            resolved[str(target)] = [target]
            continue
        found = _matches(segments, target)
        if not found:
            words = [w for w, _ in occurrences]
            listed = ", ".join(dict.fromkeys(words)) or (
                "none: the prompt is empty; use token positions" if any(tokens) else
                "none: the trace has no token text (prompt given as embeddings); use positions")
            raise AttnscopeError(f"target {target!r} is not in the prompt; its words are: {listed}")
        resolved[target] = sorted({p for positions in found for p in positions})
    return resolved


def target_occurrences(tokens: Sequence[str], target: str, roles: Sequence[str] | None = None) -> list[list[int]]:
    """The token positions of each occurrence of a word or phrase, in prompt order (case ignored).

    Examples
    --------
    >>> toks = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>",
    ...         "circle</w>", "<|endoftext|>"]
    >>> target_occurrences(toks, "circle"), target_occurrences(toks, "blue circle"), target_occurrences(toks, "cat")
    ([[3], [7]], [[6, 7]], [])
    """
    return _matches(_lower(_segment_occurrences(tokens, roles)), target)


def segment_occurrences(tokens: Sequence[str], target: str, roles: Sequence[str] | None = None) -> list[list[list[int]]]:
    """:func:`target_occurrences` of a word or phrase, per text segment of the token axis (SD3 spells the prompt
    twice, CLIP then T5): the k-th occurrence of a target is ``[occ[k] for occ in ...]``, one per copy.

    >>> toks = ["<|startoftext|>", "circle</w>", "circle</w>", "<|endoftext|>"] + ["<|endoftext|>"] * 73
    >>> segment_occurrences(toks + ["\u2581circle", "\u2581circle", "</s>"], "circle")
    [[[1], [2]], [[77], [78]]]
    """
    found = target_occurrences(tokens, target, roles)
    return [[occ for occ in found if start <= occ[0] < stop] for start, stop in segment_bounds(tokens)]


def _lower(segments: list[list[tuple[str, list[int]]]]) -> list[list[tuple[str, list[int]]]]:
    return [[(_fold(w), p) for w, p in segment] for segment in segments]


def _fold(text: str) -> str:
    """``text`` as words are compared: lower case, composed (NFC: the tokenizers compose ``e`` + ``\u0301`` into
    ``é``, so a target typed decomposed still finds the word).

    >>> _fold("CAFE\u0301") == "café"
    True
    """
    return unicodedata.normalize("NFC", text).lower()


def _matches(segments: list[list[tuple[str, list[int]]]], target: str) -> list[list[int]]:
    """Positions of each match of the phrase ``target`` among the (lower-cased) words, within one text segment (a
    phrase never runs from the end of SD3's CLIP prompt into the start of its T5 copy). A phrase a segment lacks is
    looked for there once more with punctuation apart, as the words split it (``"well-known"`` → ``well - known``),
    and then as CLIP's pre-tokenizer splits it, every digit a word and ``'s``, ``'t``, … apart (``"12"`` → ``1 2``,
    ``"dog's"`` → ``dog 's``)."""
    phrase = _fold(target).split()
    splits: list[list[str]] = []
    for words in (phrase, [run for word in phrase for run in _runs(word)], _CLIP_WORD.findall(" ".join(phrase))):
        if words not in splits:
            splits.append(words)
    found: list[list[int]] = []
    for segment in segments:  # each segment by its own split: SD3's CLIP copy of "12" is "1 2", its T5 copy "12"
        found += next((hits for words in splits if (hits := _phrase_matches([segment], words))), [])
    return found


#: CLIP's pre-tokenizer (``CLIPTokenizer.pat``, letters ``\p{L}`` and digits ``\p{N}`` as Python's classes): the words
#: its BPE pieces end at
_CLIP_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def _phrase_matches(segments: list[list[tuple[str, list[int]]]], phrase: list[str]) -> list[list[int]]:
    found = []
    for occurrences in segments:
        words = [w for w, _ in occurrences]
        found += [[p for _, ps in occurrences[start:start + len(phrase)] for p in ps]
                  for start in range(len(words) - len(phrase) + 1) if phrase and words[start:start + len(phrase)] == phrase]
    return found


def _runs(word: str) -> list[str]:
    """``word`` cut where punctuation meets letters or digits: ``"circle,"`` → ``["circle", ","]``."""
    runs: list[str] = []
    for c in word:
        if runs and _is_punctuation(c) == _is_punctuation(runs[-1][-1]):
            runs[-1] += c
        else:
            runs.append(c)
    return runs

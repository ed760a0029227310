"""A CLIP tokenizer built locally: a byte-level BPE vocabulary in which every given word is one token.

The shapes model ships the tokenizer it was trained with (``weights/tokenizer``); this builder makes
it (``attnscope train-shapes``) and the tiny offline test pipelines of :mod:`attnscope.testing`.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from ...errors import AttnscopeError
from ...tokens import byte_to_unicode

__all__ = ["learn_bpe_merges", "make_clip_tokenizer"]

_BOS, _EOS, _EOW = "<|startoftext|>", "<|endoftext|>", "</w>"


# ----------------------------------------------------------------------------- tokenizer
def _learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Run BPE training on ``words`` (each counted once) until every word is one symbol.

    Real BPE training is used (rather than hand-written prefix chains) because the
    tokenizer applies merges by global rank: a chain for ``photo`` would otherwise be
    cut short by the ``t o</w>`` merge learnt for ``to``.
    """
    if isinstance(words, (str, bytes)):  # a lone word would become one tokenizer word per letter
        raise AttnscopeError(f"words={words!r}: expected a sequence of words (e.g. ['a', 'red', 'circle'])")
    table = byte_to_unicode()
    seqs = []
    for word in dict.fromkeys(w.lower() if isinstance(w, str) else w for w in words):
        if not isinstance(word, str) or not word.isalpha():
            raise AttnscopeError(f"words: {word!r} is not letters only; expected each word to be letters only")
        chars = [table[b] for b in word.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + _EOW])
    return learn_bpe_merges(seqs)


def learn_bpe_merges(sequences: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """BPE training on symbol sequences (each counted once) until every sequence is one symbol.

    Each round merges the most frequent adjacent pair (ties: the lexicographically first).

    >>> learn_bpe_merges([["r", "e", "d"], ["r", "e", "s", "t"]])
    [('r', 'e'), ('re', 'd'), ('re', 's'), ('res', 't')]
    """
    seqs = [list(s) for s in sequences]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then lexicographic
        merges.append(best)
        joined = best[0] + best[1]
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i : i + 2] = [joined]
                i += 1


def make_clip_tokenizer(directory: str | os.PathLike, words: Sequence[str], model_max_length: int = 77):
    """Write a tiny CLIP BPE vocabulary into ``directory`` and load it.

    Examples
    --------
    >>> import tempfile
    >>> tok = make_clip_tokenizer(tempfile.mkdtemp(), ["a", "red", "circle"])
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']

    Parameters
    ----------
    directory : str or os.PathLike
        Where ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` are
        written (created if missing). ``CLIPTokenizer.from_pretrained(directory)``
        works on it afterwards.
    words : sequence of str
        Letter-only words that each become a single ``word</w>`` token. Other text
        still tokenizes: the vocabulary holds all 256 byte-level symbols, bare and
        with the ``</w>`` end-of-word suffix, exactly like the real CLIP vocab, so
        unknown words split into letter pieces (``zebra`` -> ``z e b r a</w>``,
        possibly with some merged pieces).
    model_max_length : int, default 77
        Sequence length used by ``padding="max_length"`` (77 as in SD).

    Returns
    -------
    transformers.CLIPTokenizer
        With ``bos_token`` = ``<|startoftext|>`` and ``eos_token`` =
        ``pad_token`` = ``unk_token`` = ``<|endoftext|>`` (as in SD 1.x). The
        vocabulary is ordered like CLIP's: bytes, bytes + ``</w>``, merge results,
        then the two special tokens (the highest ids).
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = list(byte_to_unicode().values())
    merges = _learn_merges(words)
    tokens = base + [b + _EOW for b in base] + [a + b for a, b in merges] + [_BOS, _EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "pad_token": _EOS,
        "unk_token": _EOS,
        "do_lower_case": True,
    }
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8"
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), "utf-8")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=model_max_length)

"""The statistics of docs/analysis.md on plain arrays: one reduction per map, then one formula per statistic.

Every statistic is computed from a few sums per (step, sample) map, which :func:`map_sums` takes in
one pass over the map — so a trace is read once whatever statistics are asked for. Notation, for one
map ``A`` of shape (pixels, tokens) (heads averaged first) and the prompt tokens ``P`` (word pieces;
SOT/EOT/padding excluded unless asked):

* ``S_i = Σ_pixels A[·, i]`` — the attention mass of token ``i``.
* **mass share** ``m_i = S_i / Σ_{j∈P} S_j`` for ``i ∈ P``.
* **target share** of a target (a word or phrase, several tokens) ``= Σ_{i∈target} m_i``.
* **dominance ratio** among targets: the largest target share over the second largest
  (``inf`` when only one is non-zero, NaN with fewer than two targets or no mass).
* **entropy**: per pixel, ``q_i = A[p, i] / Σ_{j∈P} A[p, j]`` over ``P``, ``H_p = -Σ q_i ln q_i``
  (nats); averaged over the pixels with non-zero mass on ``P``.
* **Gini** of the mass shares over ``P``: ``Σ_i Σ_j |m_i − m_j| / (2 |P| Σ_i m_i)``.
* **sink share**: mass on SOT, EOT and padding out of the total, ``1 − Σ_{i∈words} S_i / Σ_all S``;
  when the trace kept only the prompt's tokens the total is what each row sums to: the pixel count at
  cross-attention sites (each row of probabilities sums to 1), the total text mass at joint ones.
* **argmax coverage** of token ``i``: the fraction of pixels whose argmax over ``P`` is ``i``
  (ties go to the lower position; pixels with no mass on ``P`` count for no token; NaN for a map with
  a NaN on ``P``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["argmax_coverage", "dominance_ratio", "entropy", "gini", "map_sums", "mass_share", "sink_share",
           "target_share"]


def map_sums(maps: Any, prompt: Any, words: Any, *, total_is_one: bool = False) -> np.ndarray:
    """One pass over attention maps → the sums every statistic needs, packed on the last axis.

    Parameters
    ----------
    maps : array (..., head, y, x, token)
        Probabilities (float16/float32 are reduced in float32, float64 in float64).
    prompt : bool array (..., token)
        The tokens ``P`` the statistics are over (broadcast against the leading axes).
    words : bool array (..., token)
        The word-piece tokens (for the sink share).
    total_is_one : bool
        The token axis was cut to the prompt: take each pixel's total as 1.

    Returns
    -------
    ndarray (..., 2 * token + 4), float64
        ``[S (token), argmax counts (token), entropy sum, pixels with mass on P, pixels, total mass]``.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]).reshape(1, 1, 2, 3)   # head, y, x, token
    >>> p = np.array([False, True, True])
    >>> map_sums(a, p, p)[:6].round(3).tolist()   # S, then argmax counts
    [0.3, 0.8, 0.9, 0.0, 1.0, 1.0]
    """
    import torch

    a = np.ascontiguousarray(maps)
    double = a.dtype == np.float64  # float16 stores are reduced in float32; float64 input keeps its precision
    work = torch.float64 if double else torch.float32
    heads, tokens = a.shape[-4], a.shape[-1]
    lead = a.shape[:-4]
    pixels = a.shape[-3] * a.shape[-2]
    prompt = np.broadcast_to(np.asarray(prompt, bool), (*lead, tokens))
    words = np.broadcast_to(np.asarray(words, bool), (*lead, tokens))
    t = torch.from_numpy(a).reshape(*lead, heads, pixels, tokens)
    # S over every token: one pass over the whole map (torch sums float16 without a float32 copy)
    sums = t.sum((-3, -2), dtype=work).double().numpy() / heads
    total = np.full(lead, float(pixels)) if total_is_one else sums.sum(-1)

    # entropy and argmax only need the prompt's columns: gather them (a few of 77 for CLIP), average heads
    cols = np.flatnonzero(prompt.reshape(-1, tokens).any(0))
    every = bool(prompt[..., cols].all())  # each sample's P is the same columns (the usual case): no masking
    keep = torch.from_numpy(np.ascontiguousarray(prompt[..., cols]))[..., None, :]  # (..., 1, C)
    sub = t.index_select(-1, torch.from_numpy(cols)).to(work)
    sub = sub[..., 0, :, :] if heads == 1 else sub.mean(-3)  # (..., pixels, C)
    if not every:
        sub = sub * keep
    row = sub.sum(-1)
    has_mass = row > 0
    q = sub / torch.where(has_mass, row, torch.ones_like(row))[..., None]
    ent = -(q * torch.log(q)).masked_fill_(q == 0, 0.0).sum(-1)  # 0·log 0 = 0; a NaN map stays NaN
    ent_sum = (ent * has_mass).sum(-1).double().numpy()
    # the first maximum (the lower position) among P's columns; pixels without mass on P count nowhere
    if len(cols):
        best = (sub if every else torch.where(keep, sub, torch.full_like(sub, -1.0))).max(-1).indices
        best = torch.where(has_mass, best, len(cols))
    else:  # P is empty (an empty prompt: the uncond branch's ""): no pixel has mass on it
        best = torch.zeros(row.shape, dtype=torch.long)
    hits = torch.zeros((*lead, len(cols) + 1), dtype=work).scatter_add_(-1, best, torch.ones(best.shape, dtype=work))
    counts = np.zeros((*lead, tokens))
    counts[..., cols] = hits[..., :-1].double().numpy()
    extra = np.stack([ent_sum, has_mass.sum(-1).double().numpy(), np.full(ent_sum.shape, float(pixels)), total], -1)
    return np.concatenate([sums, counts, extra], -1)


def _split(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tokens = (sums.shape[-1] - 4) // 2
    s, c = sums[..., :tokens], sums[..., tokens:2 * tokens]
    return s, c, sums[..., -4], sums[..., -3], sums[..., -2], sums[..., -1]


def mass_share(sums: np.ndarray, prompt: Any) -> np.ndarray:
    """Mass share of every token from :func:`map_sums` output: ``S_i / Σ_{j∈P} S_j`` on ``P``, NaN elsewhere
    (and everywhere when ``P`` has no mass).

    >>> import numpy as np
    >>> a = np.array([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])   # 2 pixels, 3 tokens
    >>> p = np.array([False, True, True])
    >>> mass_share(map_sums(a.reshape(1, 1, 2, 3), p, p), p).round(4).tolist()   # 0.8/1.7, 0.9/1.7
    [nan, 0.4706, 0.5294]
    """
    s = _split(sums)[0]
    prompt = np.broadcast_to(np.asarray(prompt, bool), s.shape)
    mass = np.where(prompt, s, 0.0).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(prompt & (mass > 0), s / mass, np.nan)


def target_share(shares: np.ndarray, positions: Sequence[Sequence[int]]) -> np.ndarray:
    """Summed mass share of each target's token positions (a target's last axis entry), NaN if it has none or
    none of them is in ``P`` (the start of text, position 0 below, without ``include_special``).

    >>> import numpy as np
    >>> target_share(np.array([np.nan, 0.2, 0.3, 0.5]), [[1], [2, 3], [], [0]]).tolist()
    [0.2, 0.8, nan, nan]
    """
    out = [np.where(np.isnan(shares[..., list(p)]), 0.0, shares[..., list(p)]).sum(-1) if len(p)
           else np.full(shares.shape[:-1], np.nan) for p in positions]
    off = [len(p) > 0 and bool(np.isnan(shares[..., list(p)]).all()) for p in positions]  # off P everywhere
    out = [np.full(shares.shape[:-1], np.nan) if o else v for o, v in zip(off, out)]
    stacked = np.stack(out, -1) if out else np.zeros((*shares.shape[:-1], 0))
    no_mass = np.all(np.isnan(shares), -1)[..., None]
    return np.where(no_mass, np.nan, stacked)


def dominance_ratio(shares: np.ndarray) -> np.ndarray:
    """Top-1 over top-2 of target shares along the last axis (NaN targets ignored).

    ``inf`` when the second is 0 and the first is not; NaN with fewer than two targets or when both are 0.

    >>> import numpy as np
    >>> dominance_ratio(np.array([[0.5, 0.25, 0.1], [0.3, 0.3, 0.1], [0.5, 0.0, 0.0]])).tolist()
    [2.0, 1.0, inf]
    """
    x = np.where(np.isnan(shares), -np.inf, shares)
    if x.shape[-1] < 2:
        return np.full(x.shape[:-1], np.nan)
    top = -np.sort(-x, axis=-1)
    first, second = top[..., 0], top[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = first / second
    ratio = np.where((second == 0) & (first > 0), np.inf, ratio)
    return np.where(np.isfinite(second) & (first > 0), ratio, np.nan)


def entropy(sums: np.ndarray) -> np.ndarray:
    """Mean over pixels (with mass on ``P``) of the per-pixel token entropy over ``P``, in nats.

    >>> import numpy as np
    >>> a = np.array([[0.5, 0.5], [1.0, 0.0]])          # ln 2 and 0
    >>> p = np.array([True, True])
    >>> float(entropy(map_sums(a.reshape(1, 1, 2, 2), p, p)).round(4))
    0.3466
    """
    _, _, ent, valid, _, _ = _split(sums)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(valid > 0, ent / valid, np.nan)


def gini(shares: np.ndarray, prompt: Any) -> np.ndarray:
    """Gini coefficient of the mass shares over ``P``: ``Σ_i Σ_j |m_i − m_j| / (2 |P| Σ m)``.

    >>> import numpy as np
    >>> p = np.ones(4, bool)
    >>> gini(np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]), p).tolist()  # equal; all on one
    [0.0, 0.75]
    """
    prompt = np.broadcast_to(np.asarray(prompt, bool), shares.shape)
    m = np.where(prompt, np.nan_to_num(shares), 0.0)
    n = prompt.sum(-1)
    diffs = np.abs(m[..., :, None] - m[..., None, :]) * (prompt[..., :, None] & prompt[..., None, :])
    total = m.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = diffs.sum((-1, -2)) / (2 * n * total)
    return np.where(total > 0, g, np.nan)


def sink_share(sums: np.ndarray, words: Any) -> np.ndarray:
    """Mass not on the prompt's word pieces (SOT, EOT, padding, and any cut-off padding) out of the total.

    >>> import numpy as np
    >>> a = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])          # SOT, a word, EOT
    >>> w = np.array([False, True, False])
    >>> float(sink_share(map_sums(a.reshape(1, 1, 2, 3), w, w), w).round(4))  # 1 - 0.5/2
    0.75
    """
    s, _, _, _, _, total = _split(sums)
    words = np.broadcast_to(np.asarray(words, bool), s.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - np.where(words, s, 0.0).sum(-1) / total, np.nan)


def argmax_coverage(sums: np.ndarray, prompt: Any) -> np.ndarray:
    """Fraction of pixels whose argmax over ``P`` is each token (NaN off ``P``, and everywhere for a map with a
    NaN on ``P``: a gated or overflowed step, as every other statistic).

    >>> import numpy as np
    >>> a = np.array([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.0, 0.0, 0.0]])   # the last pixel has no mass
    >>> p = np.array([False, True, True])
    >>> argmax_coverage(map_sums(a.reshape(1, 1, 3, 3), p, p), p).round(4).tolist()
    [nan, 0.3333, 0.3333]
    >>> a[0, 1] = np.nan
    >>> argmax_coverage(map_sums(a.reshape(1, 1, 3, 3), p, p), p).tolist()
    [nan, nan, nan]
    """
    s, counts, _, _, pixels, _ = _split(sums)
    prompt = np.broadcast_to(np.asarray(prompt, bool), counts.shape)
    unknown = np.isnan(np.where(prompt, s, 0.0)).any(-1, keepdims=True)
    return np.where(prompt & ~unknown, counts / pixels[..., None], np.nan)

"""Checks every model family's tests share: hooks that change nothing, observers that keep what they see,
and which logit columns an intervention edited."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import attnscope as ats


class ProbsRecorder:
    """An observer keeping a copy of the probabilities of every call, per site, in call order."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {}

    def stages(self, ctx):
        return ("probs",)

    def on_probs(self, ctx, probs):
        self.seen.setdefault(ctx.site.name, []).append(probs.clone())

    @property
    def calls(self) -> int:
        return sum(len(v) for v in self.seen.values())


class LogitsSpy:
    """Keeps a copy of the logits it is shown, per (site, step); as an intervention placed first it sees them
    before any edit, as an observer after every edit."""

    def __init__(self, role: str) -> None:
        self.role, self.seen = role, {}

    def stages(self, ctx):
        return ("logits",)

    def on_logits(self, ctx, logits):
        self.seen[(ctx.site.name, ctx.step)] = logits.clone()


def edits(before: LogitsSpy, after: LogitsSpy) -> dict[tuple[str, int], torch.Tensor]:
    """Per (site, step): the largest change of each (row, token column) between the two spies."""
    return {key: (after.seen[key] - seen).abs().amax(dim=(1, 2)) for key, seen in before.seen.items()}


def check_hooks_are_transparent(pipe, run: Callable[[], np.ndarray], *, exact: bool = False) -> ProbsRecorder:
    """No client, then an observer of the probabilities, keep ``run()``'s image bit-identical; the processors come
    back after a block that raised. Returns the observer (for per-family checks of what it saw)."""
    originals = {s.name: s.module.processor for s in ats.discover_sites(pipe)}
    plain = run()
    with ats.hooks(pipe):
        assert np.array_equal(run(), plain)
    observer = ProbsRecorder()
    with ats.hooks(pipe, observer, exact=exact):
        assert np.array_equal(run(), plain)
    with pytest.raises(RuntimeError, match="boom"), ats.hooks(pipe, ProbsRecorder()):
        raise RuntimeError("boom")
    assert {s.name: s.module.processor for s in ats.discover_sites(pipe)} == originals
    assert np.array_equal(run(), plain)
    return observer


def record_cross_inputs(pipe) -> tuple[dict[str, list[dict]], list]:
    """Forward pre-hooks on every cross-attention site keeping each call's inputs: ``h`` (queries), ``e`` (text),
    ``mask`` (the padding bias). Remove the returned handles when done."""
    found: dict[str, list[dict]] = {}
    handles = []
    for site in ats.discover_sites(pipe):
        def grab(module, args, kwargs, name=site.name):
            found.setdefault(name, []).append({"h": args[0] if args else kwargs["hidden_states"],
                                               "e": kwargs["encoder_hidden_states"], "mask": kwargs["attention_mask"]})
        handles.append(site.module.register_forward_pre_hook(grab, with_kwargs=True))
    return found, handles


def cross_attention_reference(attn, inputs: dict) -> torch.Tensor:
    """softmax(norm(q)·norm(k)ᵀ/√d + mask bias) in float64 from the module's own ``to_q``/``to_k`` weights, with RMS
    norms over the whole projection (Sana's ``rms_norm_across_heads``) written out by hand: (batch, heads, n, tokens)."""
    def linear(layer, x):
        return torch.nn.functional.linear(x.double(), layer.weight.double(),
                                          None if layer.bias is None else layer.bias.double())

    def rms(norm, x):
        if norm is None:
            return x
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    q, k = rms(attn.norm_q, linear(attn.to_q, inputs["h"])), rms(attn.norm_k, linear(attn.to_k, inputs["e"]))
    b, n, _ = q.shape
    d = q.shape[-1] // attn.heads
    q = q.view(b, n, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    mask = inputs["mask"]
    assert mask is not None and mask.shape == (b, 1, k.shape[2])                # the padding bias of PixArt and Sana
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + mask.double()[:, None], -1).detach()


def assert_stored_maps_match_reference(pipe, tr, inputs: dict, grid: tuple[int, int], samples: int) -> None:
    """Every site and step of ``tr`` (captured with heads="all", tokens="all", branch="both") against
    :func:`cross_attention_reference` on the recorded inputs, both CFG halves (float16 storage: atol 2e-3)."""
    modules = {s.name: s.module for s in ats.discover_sites(pipe)}
    for site in tr.sites:
        for step, call in enumerate(inputs[site]):
            ref = cross_attention_reference(modules[site], call)
            ref = ref.reshape(*ref.shape[:2], *grid, ref.shape[-1]).numpy()
            for branch, rows in (("uncond", slice(0, samples)), ("cond", slice(samples, 2 * samples))):
                stored = tr.attention(site, branch).isel(step=step).values.astype(np.float64)
                np.testing.assert_allclose(stored, ref[rows], atol=2e-3, err_msg=f"{site} step {step} {branch}")


def check_reweight(pipe, run: Callable[[], object], word: str, column: int, site: str, cond: slice) -> None:
    """``Reweight(word, 3)`` at ``site``'s first step scales exactly its column of the ``cond`` rows by 3."""
    plain, weighted = ProbsRecorder(), ProbsRecorder()
    with ats.hooks(pipe, plain):
        run()
    with ats.hooks(pipe, ats.regulate.Reweight(word, 3.0, sites=site, steps=[0]), weighted):
        run()
    now, before = weighted.seen[site][0], plain.seen[site][0]
    assert torch.allclose(now[cond][..., column], before[cond][..., column] * 3.0, atol=1e-6)
    keep = [i for i in range(now.shape[-1]) if i != column]
    assert torch.equal(now[cond][..., keep], before[cond][..., keep])
    others = [r for r in range(now.shape[0]) if r not in range(*cond.indices(now.shape[0]))]
    assert torch.equal(now[others], before[others])                             # other rows (uncond) untouched


def check_regulation(pipe, run: Callable[[], np.ndarray], targets: list, column: int, expected_sites: set[str],
                     uncond: slice | None) -> None:
    """``AttentionRegulation(targets)`` changes the image and edits only ``column`` of the conditional rows, at
    exactly ``expected_sites`` (its default sites)."""
    spy, after = LogitsSpy("intervention"), LogitsSpy("observer")
    with ats.hooks(pipe, spy, ats.regulate.AttentionRegulation(targets, iterations=3), after):
        edited = run()
    assert not np.array_equal(edited, run())
    changed = set()
    for key, diff in edits(spy, after).items():                                 # diff: (rows, tokens)
        assert float(diff[:, [c for c in range(diff.shape[-1]) if c != column]].max()) == 0.0
        if uncond is not None:
            assert float(diff[uncond].max()) == 0.0                             # the uncond half is never edited
        if float(diff.max()) > 0:
            changed.add(key[0])
    assert changed == expected_sites


def check_heatmaps_and_compare(pipe, tmp_path, words: list[str], **kw) -> None:
    """Heat maps of a capture, and ``ats.compare`` of it with a regulated rerun."""
    tr = ats.capture(pipe, "a red circle", seed=2, store=tmp_path / "plain.zarr", **kw)
    assert len(ats.plot.heatmaps(tr, words=words).axes) >= len(words)
    reg = ats.rerun(tr, pipe=pipe, store=tmp_path / "regulated.zarr",
                    interventions=[ats.regulate.AttentionRegulation([words[-1]], iterations=2)])
    comparison = ats.compare(tr, reg, words)
    assert len(comparison.table()) > 0 and comparison.figure() is not None

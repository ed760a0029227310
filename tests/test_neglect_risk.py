"""The early warning: neglect_features on hand-made maps, neglect_risk's logistic, and risk_above deciding live."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

import attnscope as ats
from attnscope.models import object_nouns, object_phrases
from attnscope.stats import NEGLECT_FEATURES, neglect_features, neglect_risk

TOKENS = ["<|startoftext|>", "a</w>", "circle</w>", "square</w>", "<|endoftext|>"]


def _site(maps: np.ndarray) -> xr.DataArray:
    """(y, x, token) maps of one sample -> a (step, sample, head, y, x, token) DataArray with token texts."""
    return xr.DataArray(maps[None, None, None], dims=("step", "sample", "head", "y", "x", "token"),
                        coords={"token_text": ("token", TOKENS)})


def _maps(rng, h, w):
    m = rng.random((h, w, len(TOKENS)))
    return m / m.sum(-1, keepdims=True)  # rows of a softmax


def test_features_are_the_site_means_of_hand_computed_statistics():
    rng = np.random.default_rng(3)
    maps = {"a": _maps(rng, 4, 4), "b": _maps(rng, 2, 2)}
    f = neglect_features({k: _site(v) for k, v in maps.items()}, ["circle", "square"], step=0)
    prompt = [1, 2, 3]  # "a", "circle", "square": SOT and EOT are not prompt tokens
    shares, ratios, top, p2m, centres, overlaps = [], [], [], [], [], []
    for m in maps.values():
        mass = m.sum((0, 1))
        s = mass[[2, 3]] / mass[prompt].sum()
        shares.append(s)
        ratios.append(s.max() / s.min())
        h, w = m.shape[:2]
        k = math.ceil(0.1 * h * w)
        top.append([np.sort(m[..., t].ravel())[::-1][:k].sum() / m[..., t].sum() for t in (2, 3)])
        p2m.append([m[..., t].max() / m[..., t].mean() for t in (2, 3)])
        ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w  # pixel centres in map widths
        centres.append([[(m[..., t].sum(0) * xs).sum() / m[..., t].sum(), (m[..., t].sum(1) * ys).sum() / m[..., t].sum()]
                        for t in (2, 3)])
        a, b = m[..., 2] / m[..., 2].sum(), m[..., 3] / m[..., 3].sum()
        overlaps.append(np.minimum(a, b).sum())
    share = np.mean(shares, 0)
    assert float(f.share_min[0]) == pytest.approx(share.min())
    assert float(f.share_ratio[0]) == pytest.approx(share.min() / share.max())
    assert float(f.dominance_ratio[0]) == pytest.approx(np.mean(ratios))  # the mean of each site's ratio
    assert float(f.top_min[0]) == pytest.approx(np.mean(top, 0).min())
    assert float(f.p2m_min[0]) == pytest.approx(np.mean(p2m, 0).min())
    assert float(f.overlap[0]) == pytest.approx(np.mean(overlaps))
    c = np.mean(centres, 0)  # (target, xy), site means
    assert float(f.centre_dist[0]) == pytest.approx(np.hypot(*(c[0] - c[1])))
    assert list(f.data_vars) == list(NEGLECT_FEATURES)


def test_risk_is_the_logistic_of_the_standardised_features():
    rng = np.random.default_rng(4)
    source = {"a": _site(_maps(rng, 4, 4))}
    f = neglect_features(source, ["circle", "square"], step=0)
    x = np.array([float(f[n][0]) for n in NEGLECT_FEATURES])
    mean, std = rng.random(11), rng.random(11) + 0.5
    weights = rng.normal(size=12)
    model = {"features": list(NEGLECT_FEATURES), "steps": {"0": {"mean": mean.tolist(), "std": std.tolist(),
                                                                 "weights": weights.tolist()}}}
    expected = 1 / (1 + math.exp(-(weights[0] + ((x - mean) / std) @ weights[1:])))
    risk = neglect_risk(source, ["circle", "square"], step=0, model=model)
    assert float(risk[0]) == pytest.approx(expected, rel=1e-12) and risk.name == "neglect_risk"
    with pytest.raises(ats.AttnscopeError, match=r"step=3: the risk model has weights for steps \['0'\]"):
        neglect_risk(source, ["circle", "square"], step=3, model=model)
    with pytest.raises(ats.AttnscopeError, match=r"expected two or more"):
        neglect_features(source, ["circle"], step=0)
    with pytest.raises(ats.AttnscopeError, match=r"model\['features'\]"):
        neglect_risk(source, ["circle", "square"], step=0, model={**model, "features": ["x"]})


def test_the_shipped_model_has_weights_for_the_first_ten_steps():
    model = ats.stats.neglect_model()
    assert sorted(model["steps"], key=int) == [str(k) for k in range(10)]
    for entry in model["steps"].values():
        assert len(entry["weights"]) == 12 and all(s > 0 for s in entry["std"])


PROMPTS = ["a red circle and a blue circle", "a green square and a red triangle"]
RUN = dict(num_inference_steps=8)


def _run(pipe, prompts, seeds, *clients, exact=False):
    with ats.hooks(pipe, *clients, exact=exact):
        return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **RUN).images


def test_risk_above_decides_per_sample_from_the_maps_a_trace_would_store(shapes, tmp_path):
    # the risks the gate computes live equal neglect_risk on a trace of the same generation (float16 maps)
    probe = ats.regulate.AttentionRegulation(object_nouns, when=ats.regulate.risk_above(0.0, step=2, targets=object_phrases))
    recorder = ats.Recorder(tmp_path / "plain.zarr", run_info={})
    _run(shapes, PROMPTS, [0, 1], recorder)  # capture the plain run (no regulation: the maps before any edit)
    tr = ats.open_trace(tmp_path / "plain.zarr")
    plain = _run(shapes, PROMPTS, [0, 1])
    _run(shapes, PROMPTS, [0, 1], probe)
    live = probe.when.risk
    stored = [float(neglect_risk({s: tr.attention(s).isel(sample=[i]) for s in tr.sites}, object_phrases(p),
                                 step=2)[0]) for i, p in enumerate(PROMPTS)]
    np.testing.assert_allclose(live, stored, atol=2e-3)
    # a threshold between the two risks: the riskier sample is regulated, the other is not
    threshold = float(np.mean(live))
    gated = ats.regulate.AttentionRegulation(object_nouns,
                                             when=ats.regulate.risk_above(threshold, step=2, targets=object_phrases))
    images = _run(shapes, PROMPTS, [0, 1], gated)
    riskier = int(np.argmax(live))
    assert gated.when.at_risk == [i == riskier for i in range(2)]
    # the safe sample is not edited; its batch-mate's regulated calls leave it equal up to float rounding
    np.testing.assert_allclose(images[1 - riskier], plain[1 - riskier], atol=1e-5)
    assert np.abs(images[riskier] - plain[riskier]).max() > 1e-2
    # no sample at risk: the plain images bit for bit (exact: the decision step's observation keeps the fused result)
    calm = ats.regulate.AttentionRegulation(object_nouns,
                                            when=ats.regulate.risk_above(max(live) + 1e-3, step=2, targets=object_phrases))
    np.testing.assert_array_equal(_run(shapes, PROMPTS, [0, 1], calm, exact=True), plain)
    # alone, each sample gets the same risk and decision as in the batch
    for i in range(2):
        alone = ats.regulate.AttentionRegulation(object_nouns,
                                                 when=ats.regulate.risk_above(threshold, step=2, targets=object_phrases))
        _run(shapes, [PROMPTS[i]], [i], alone)
        assert alone.when.risk[0] == pytest.approx(live[i], abs=1e-5) and alone.when.at_risk[0] == (i == riskier)
    described = gated.describe()["params"]["when"]
    assert described == {"risk_above": threshold, "step": 2, "targets": "object_phrases", "model": "shipped"}


def test_live_risk_of_samples_sharing_a_prompt_is_each_sample_alone(shapes):
    # two images per prompt: the gate judges each prompt's samples in one call; a sample's risk is its own
    gate = ats.regulate.risk_above(0.5, step=2, targets=object_phrases)
    probe = ats.regulate.AttentionRegulation(object_nouns, when=gate)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2, 3)]
    with ats.hooks(shapes, probe):
        shapes(PROMPTS, generator=generators, num_images_per_prompt=2, output_type="np", **RUN)
    assert len(gate.risk) == 4 and len(set(gate.risk)) == 4
    for i, seed in enumerate((0, 1, 2, 3)):
        alone = ats.regulate.AttentionRegulation(object_nouns, when=ats.regulate.risk_above(0.5, step=2,
                                                                                            targets=object_phrases))
        _run(shapes, [PROMPTS[i // 2]], [seed], alone)
        assert alone.when.risk[0] == pytest.approx(gate.risk[i], abs=1e-5)


def test_risk_above_bad_input():
    with pytest.raises(ats.AttnscopeError, match=r"threshold=1.5: expected a probability"):
        ats.regulate.risk_above(1.5)
    with pytest.raises(ats.AttnscopeError, match=r"step=-1: expected the decision step"):
        ats.regulate.risk_above(0.5, step=-1)
    with pytest.raises(ats.AttnscopeError, match=r"when=0.5: expected a gate"):
        ats.regulate.AttentionRegulation(["circle"], when=0.5)


def test_a_rerun_decides_from_the_parent_trace_and_regulates_the_samples_at_risk_from_step_0(shapes, tmp_path):
    parent = ats.capture(shapes, PROMPTS, seed=[0, 1], store=tmp_path / "p.zarr", **RUN)
    risks = [float(neglect_risk({s: parent.attention(s).isel(sample=[i]) for s in parent.sites}, object_phrases(p),
                                step=2)[0]) for i, p in enumerate(PROMPTS)]
    threshold = float(np.mean(risks))
    riskier = int(np.argmax(risks))
    gated = ats.regulate.AttentionRegulation(object_nouns,
                                             when=ats.regulate.risk_above(threshold, step=2, targets=object_phrases))
    selective = ats.rerun(parent, [gated], store=tmp_path / "sel.zarr", pipe=shapes)
    always = ats.rerun(parent, [ats.regulate.AttentionRegulation(object_nouns)], store=tmp_path / "all.zarr", pipe=shapes)
    assert gated.when.risk == pytest.approx(risks, abs=1e-12) and gated.when.at_risk == [i == riskier for i in range(2)]
    img = [np.asarray(i, dtype=float) for i in selective.images]
    # the sample at risk got the whole regulation (from step 0): as in the always-on rerun; the other is the parent's
    np.testing.assert_allclose(img[riskier], np.asarray(always.images[riskier], dtype=float), atol=1)
    np.testing.assert_allclose(img[1 - riskier], np.asarray(parent.images[1 - riskier], dtype=float), atol=1)
    assert np.abs(img[riskier] - np.asarray(parent.images[riskier], dtype=float)).max() > 10
    when = selective.manifest["interventions"][0]["params"]["when"]
    assert when["decided_from_trace"] and when["at_risk"] == gated.when.at_risk

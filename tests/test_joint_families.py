"""Joint-attention families (SD3/SD3.5, Flux.1): sites, stored maps against an independent float64
computation from each module's own projections, bit-identity, restoration, tokens, interventions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.hooks import find_denoiser
from attnscope.hooks._joint import attention_with_lse, joint_attention
from attnscope.testing import tiny_flux2_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

SD3_KW = dict(num_inference_steps=2, height=32, width=32, guidance_scale=2.0, max_sequence_length=16)
FLUX_KW = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


# ----------------------------------------------------------------------------- the kernel
def test_attention_with_lse_matches_float64_and_the_chunked_path():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8) for _ in range(3))
    scores = q.double() @ k.double().transpose(-1, -2) / 8**0.5
    out, lse = attention_with_lse(q, k, v)
    assert torch.allclose(lse.double(), torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ v.double(), atol=1e-5)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))  # the same fused kernel
    q.requires_grad_(True)
    with torch.enable_grad():  # autograd: the chunked float32 path, differentiable
        out2, lse2 = attention_with_lse(q, k, v)
        out2.sum().backward()
    assert torch.allclose(out2.detach(), out, atol=1e-5) and q.grad is not None


@pytest.mark.parametrize("text_first", [True, False])
def test_joint_attention_edits_change_the_real_softmax(text_first):
    torch.manual_seed(1)
    n, t = 12, 5
    q, k, v = (torch.randn(2, 2, n + t, 4, dtype=torch.float64) for _ in range(3))
    image, text = (slice(t, n + t), slice(0, t)) if text_first else (slice(0, n), slice(n, n + t))
    scores = q @ k.transpose(-1, -2) / 2
    seen = {}

    def observe(name, tensor):
        seen[name] = tensor
        return tensor

    out = joint_attention(q, k, v, image=image, text=text, stage=observe)
    full = torch.softmax(scores, -1)
    assert torch.allclose(seen["probs"], full[:, :, image, text])            # the block of the joint softmax
    assert torch.allclose(seen["probs"].sum(-1), full[:, :, image, text].sum(-1))
    assert (seen["probs"].sum(-1) < 1).all()                                   # rows do not sum to 1 over text
    assert torch.allclose(out, full @ v)

    bump = torch.zeros(t, dtype=torch.float64)
    bump[2] = 1.5

    def edit(name, tensor):
        return tensor + bump if name == "logits" else tensor

    edited = scores.clone()
    edited[:, :, image, text] += bump
    assert torch.allclose(joint_attention(q, k, v, image=image, text=text, stage=edit), torch.softmax(edited, -1) @ v)

    def halve(name, tensor):  # replacing probabilities: text keys as given, image keys keep their weights
        return tensor * 0.5 if name == "probs" else tensor

    expected_p = full.clone()
    expected_p[:, :, image, text] *= 0.5
    assert torch.allclose(joint_attention(q, k, v, image=image, text=text, stage=halve), expected_p @ v)


# ----------------------------------------------------------------------------- sites
def test_sites_of_each_family(flux, sd3):
    names = [(s.name, s.kind, s.block, s.text_layout) for s in ats.discover_sites(flux)]
    assert names == [("transformer_blocks.0.attn", "joint", "double", "text_first"),
                     ("transformer_blocks.1.attn", "joint", "double", "text_first"),
                     ("single_transformer_blocks.0.attn", "joint", "single", "text_first"),
                     ("single_transformer_blocks.1.attn", "joint", "single", "text_first")]
    assert [s.name for s in ats.discover_sites(sd3)] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert find_denoiser(sd3)[0] == "sd3" and find_denoiser(flux)[0] == "flux"
    sd35 = tiny_sd3_pipeline(dual_attention=True)
    assert sd35.transformer.transformer_blocks[0].attn2 is not None        # image-only self-attention: not a site
    assert [s.name for s in ats.discover_sites(sd35)] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


# ----------------------------------------------------------------------------- reference computation
def _heads(x, dim):
    return x.unflatten(-1, (-1, dim))


def _rope(x, cos, sin):
    """Flux's rotary embedding on (batch, seq, heads, dim): pairs (x0, x1) rotate to (x0 cos − x1 sin, …)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(3)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


@torch.no_grad()
def _reference(family, attn, inputs):
    """The image-query × text-key block of the joint softmax, float64, from the module's own projections."""
    a = copy.deepcopy(attn).double()
    hs = inputs["hidden_states"].double()
    enc = inputs.get("encoder_hidden_states")
    dim = a.to_q.out_features // a.heads
    q, k = _heads(a.to_q(hs), dim), _heads(a.to_k(hs), dim)
    if a.norm_q is not None:
        q, k = a.norm_q(q), a.norm_k(k)
    if enc is not None:
        enc = enc.double()
        eq, ek = _heads(a.add_q_proj(enc), dim), _heads(a.add_k_proj(enc), dim)
        if a.norm_added_q is not None:
            eq, ek = a.norm_added_q(eq), a.norm_added_k(ek)
        q, k = (torch.cat([eq, q], 1), torch.cat([ek, k], 1)) if family == "flux" else (torch.cat([q, eq], 1), torch.cat([k, ek], 1))
    if family == "flux":
        cos, sin = (t.double() for t in inputs["image_rotary_emb"])
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    probs = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / dim**0.5, dim=-1)
    text = inputs["text_length"]
    if family == "flux":
        return probs[:, :, text:, :text]
    n = probs.shape[-1] - text
    return probs[:, :, :n, n:]


def _record_inputs(pipe, store):
    found, handles = {}, []
    text_length = {}

    def on_transformer(module, args, kwargs):
        text_length["value"] = kwargs["encoder_hidden_states"].shape[1]

    handles.append(pipe.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True))
    for site in ats.discover_sites(pipe):
        def grab(module, args, kwargs, name=site.name):
            entry = {k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, tuple))}
            if args:
                entry["hidden_states"] = args[0]
            entry["text_length"] = text_length["value"]
            found.setdefault(name, []).append(entry)
        handles.append(site.module.register_forward_pre_hook(grab, with_kwargs=True))
    return found, handles


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35"])
def test_stored_maps_equal_a_float64_computation_from_the_module_projections(family, flux, sd3, tmp_path):
    pipe = {"flux": flux, "sd3": sd3}.get(family) or tiny_sd3_pipeline(dual_attention=True)
    kw = FLUX_KW if family == "flux" else SD3_KW
    inputs, handles = _record_inputs(pipe, tmp_path)
    try:
        tr = ats.capture(pipe, ["a red circle", "a blue square"], seed=[1, 2, 3, 4], store=tmp_path / "t.zarr", heads="all", tokens="all",
                         branch="cond" if family == "flux" else "both", num_images_per_prompt=2,
                         **{**kw, "width": 48})
    finally:
        for h in handles:
            h.remove()
    ref_family = "flux" if family == "flux" else "sd3"
    for site in tr.sites:
        for step in range(2):
            ref = _reference(ref_family, ats.discover_sites(pipe)[tr.sites.index(site)].module, inputs[site][step])
            h, w = tr.attention(site).sizes["y"], tr.attention(site).sizes["x"]
            ref = ref.reshape(*ref.shape[:2], h, w, ref.shape[-1]).numpy()
            branches = [("cond", slice(None))] if family == "flux" else [("uncond", slice(0, 4)), ("cond", slice(4, 8))]
            for branch, rows in branches:
                stored = tr.attention(site, branch).isel(step=step).values.astype(np.float64)
                np.testing.assert_allclose(stored, ref[rows], atol=2e-3, err_msg=f"{site} step {step} {branch}")
                mass = tr.text_mass(site, branch).isel(step=step).values.astype(np.float64)
                np.testing.assert_allclose(mass, ref[rows].sum(-1), atol=2e-3)
    sizes = tr.attention(tr.sites[0]).sizes
    assert (sizes["sample"], sizes["y"], sizes["x"]) == (4, 8, 12)             # non-square: 32 x 48 px
    assert tr.images[0].size == (48, 32)
    assert (tr.manifest["run"]["height"], tr.manifest["run"]["width"]) == (32, 48)


# ----------------------------------------------------------------------------- bit-identity, restoration
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_no_client_and_observers_are_bit_identical_and_processors_come_back(family, flux, sd3):
    pipe, kw = (flux, FLUX_KW) if family == "flux" else (sd3, SD3_KW)
    originals = {s.name: s.module.processor for s in ats.discover_sites(pipe)}

    def run():
        return pipe("a red circle", generator=torch.Generator().manual_seed(5), output_type="np", **kw).images

    plain = run()
    with ats.hooks(pipe):
        assert np.array_equal(run(), plain)

    class Probs:
        calls = 0

        def stages(self, ctx):
            return ("probs", "output")

        def on_probs(self, ctx, probs):
            self.calls += 1

        def on_output(self, ctx, output):
            assert output.shape[1] == ctx.spatial_shape[0] * ctx.spatial_shape[1]  # the image stream

    observer = Probs()
    with ats.hooks(pipe, observer):
        assert np.array_equal(run(), plain)      # the kernel's own output when nothing is edited
    assert observer.calls == 2 * len(originals)
    with pytest.raises(RuntimeError, match="boom"), ats.hooks(pipe, Probs()):
        raise RuntimeError("boom")
    assert {s.name: s.module.processor for s in ats.discover_sites(pipe)} == originals
    assert np.array_equal(run(), plain)


def test_set_attention_backend_reaches_the_original_processor_while_hooked(flux):
    site = ats.discover_sites(flux)[0]
    original = site.module.processor
    try:
        with ats.hooks(flux):
            flux.transformer.set_attention_backend("native")
            assert site.module.processor is not original
        assert site.module.processor is original and original._attention_backend is not None
    finally:
        flux.transformer.reset_attention_backend()


def test_true_cfg_counts_steps_by_timestep_and_shows_clients_the_prompt_pass(flux):
    steps = []

    class Steps:
        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, probs):
            steps.append((ctx.step, ctx.site.name))

    with ats.hooks(flux, Steps()):
        flux("a red circle", negative_prompt="blue", true_cfg_scale=2.0, **FLUX_KW)
    assert sorted({s for s, _ in steps}) == [0, 1]
    assert len(steps) == 2 * len(ats.discover_sites(flux))  # the negative pass is not shown


def test_sd3_skip_layer_guidance_pass_is_not_shown_to_clients(sd3, tmp_path):
    """SD3's skip-layer guidance calls the transformer a second time per step (the prompt, some layers skipped, the
    same timestep): as Flux's negative pass, it is not a step of its own and clients do not see it."""
    steps = []

    class Steps:
        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, probs):
            steps.append((ctx.step, ctx.site.name, probs.shape[0]))

    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
               skip_layer_guidance_scale=2.8)
    calls = []
    handle = sd3.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        with ats.hooks(sd3, Steps()):
            with_slg = sd3("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **slg,
                           **SD3_KW).images
    finally:
        handle.remove()
    plain = sd3("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **SD3_KW).images
    assert len(calls) == 3 and np.abs(with_slg - plain).max() > 1e-4   # step 1 had its skip pass; it changed the image
    assert sorted({s for s, _, _ in steps}) == [0, 1]
    assert len(steps) == 2 * len(ats.discover_sites(sd3))              # one call per site and step: the guided batch
    assert {rows for _, _, rows in steps} == {2}                        # [uncond; cond], never the skip pass's 1 row
    tr = ats.capture(sd3, "a red circle", store=tmp_path / "slg.zarr", seed=0, **slg, **SD3_KW)
    assert tr.timesteps.size == 2 and tr.check_unchanged() is None


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_stored_and_shown_timesteps_are_the_schedulers(family, flux, tmp_path):
    """Flux's pipelines call the transformer with t / 1000: the store kept 0.76145 where the scheduler says 761.45."""
    pipe = flux if family == "flux" else tiny_flux2_pipeline()
    kw = FLUX_KW if family == "flux" else dict(FLUX_KW, max_sequence_length=32, guidance_scale=4.0)  # klein: 2 calls
    seen = []

    class Steps:
        def stages(self, ctx):
            return ()

        def on_step(self, step):
            seen.append(step.timestep)

    rec = ats.Recorder(tmp_path / "t.zarr")
    with ats.hooks(pipe, rec, Steps()):
        pipe(prompt="a red circle", **kw)
    planned = [float(t) for t in pipe.scheduler.timesteps]     # the scheduler's own values, after the run
    assert len(planned) == 2 and planned[0] > 1                # on the scheduler's 0…1000 scale
    assert seen == planned
    assert ats.open_trace(rec.path).timesteps.tolist() == planned


# ----------------------------------------------------------------------------- tokens
def test_tokens_words_and_segments(flux, sd3, tmp_path):
    tr = ats.capture(flux, "a red elephant", seed=0, store=tmp_path / "f.zarr", **FLUX_KW)
    assert tr.manifest["capture"]["tokens"] == "prompt"                        # "auto" on a joint family
    assert tr.tokens == ["\u2581a", "\u2581red", "\u2581ele", "phant", "</s>"]
    assert tr.words == {"a": [0], "red": [1], "elephant": [2, 3]}
    assert tr.manifest["run"]["segments"] == [["t5", 16]]
    tr3 = ats.capture(sd3, "a red elephant", seed=0, store=tmp_path / "s.zarr", tokens="all", **SD3_KW)
    assert tr3.manifest["run"]["segments"] == [["clip", 77], ["t5", 16]]
    words = tr3.words
    assert words["red"] == [2, 78] and words["elephant"][-2:] == [79, 80]
    small = ats.capture(sd3, "a red elephant", seed=0, store=tmp_path / "p.zarr", tokens="prompt", **SD3_KW)
    kept = small.attention(small.sites[0]).token.values.tolist()
    assert kept == [0, 1, 2, 3, 4, 77, 78, 79, 80, 81]                         # both segments' prompts, no padding
    assert small.words["red"] == [2, 6]                                        # indices along the kept axis
    ds = ats.stats.dominance(small, targets=["red"])
    assert ds.token.values.tolist() == [1, 2, 3, 77, 78, 79, 80]               # the stored positions
    np.testing.assert_allclose(ds.mass_share.values, ats.stats.dominance(tr3, targets=["red"]).mass_share.values,
                               atol=1e-6)
    site = small.sites[0]
    padding = small.text_mass(site) - small.attention(site).sum("token")     # what the padding took
    full = tr3.attention(site)
    roles = ats.tokens.token_roles(tr3.tokens)
    pad_cols = [i for i, r in enumerate(roles) if r == "pad"]
    np.testing.assert_allclose(padding.values, full.isel(token=pad_cols).sum("token").values, atol=5e-3)
    # every statistic is the same on the kept positions as on all of them (sink share over the text mass, the
    # T5 pieces of a word in its map, an int target as the token coordinate's position 78)
    a, b = ats.stats.dominance(small, targets=["red", 78]), ats.stats.dominance(tr3, targets=["red", 78])
    np.testing.assert_allclose(a.target_share, b.target_share, atol=1e-6)
    np.testing.assert_allclose(a.sink_share, b.sink_share, atol=2e-3)
    word_cols = [i for i, r in enumerate(roles) if r == "word"]
    by_hand = 1 - full.isel(token=word_cols).astype(float).sum(("head", "y", "x", "token")) / \
        full.astype(float).sum(("head", "y", "x", "token"))
    np.testing.assert_allclose(b.sink_share.sel(site=site).values, by_hand.values, rtol=1e-5)
    shape_small, shape_full = ats.stats.map_shape(small, ["red", "elephant"]), ats.stats.map_shape(tr3, ["red", "elephant"])
    for var in ("peak_to_mean", "top_share", "centre_x", "spread", "overlap"):
        np.testing.assert_allclose(shape_small[var], shape_full[var], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dominance_and_heatmaps(family, flux, sd3, tmp_path):
    pipe, kw = (flux, FLUX_KW) if family == "flux" else (sd3, SD3_KW)
    tr = ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "f.zarr", **kw)
    ds = ats.stats.dominance(tr, targets=["red", "circle"])
    shares = ds["mass_share"].sum("token").values
    np.testing.assert_allclose(shares, 1.0, atol=1e-6)                       # shares are over prompt tokens
    fig = ats.plot.heatmaps(tr, words=["red", "circle"])
    assert fig is not None


# ----------------------------------------------------------------------------- interventions
class _Logits:
    """Keeps a copy of the logits it is shown; as an intervention placed first it sees them before any edit."""

    def __init__(self, role):
        self.role, self.seen = role, {}

    def stages(self, ctx):
        return ("logits",)

    def on_logits(self, ctx, logits):
        self.seen[(ctx.site.name, ctx.step)] = logits.clone()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_regulation_edits_only_the_target_columns_and_changes_the_image(family, flux, sd3):
    pipe, kw = (flux, FLUX_KW) if family == "flux" else (sd3, SD3_KW)
    spy, after = _Logits("intervention"), _Logits("observer")
    reg = ats.regulate.AttentionRegulation(["circle"], iterations=3)
    with ats.hooks(pipe, spy, reg, after):
        edited = pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    plain = pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    assert not np.array_equal(edited, plain)
    circle = [2] if family == "flux" else [3, 79]
    changed_sites = set()
    for key, before in spy.seen.items():
        diff = (after.seen[key] - before).abs().amax(dim=(1, 2))             # (rows, tokens)
        others = [c for c in range(diff.shape[-1]) if c not in circle]
        assert float(diff[:, others].max()) == 0.0
        if float(diff.max()) > 0:
            changed_sites.add(key[0])
            if family == "sd3":
                assert float(diff[:1].max()) == 0.0                           # the uncond half is never edited
    expected = {s.name for s in ats.discover_sites(pipe) if s.block == "double"}
    assert changed_sites == expected


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_reweight_scales_only_its_columns(family, flux, sd3):
    pipe, kw = (flux, FLUX_KW) if family == "flux" else (sd3, SD3_KW)
    seen = {}

    class Probs:
        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, probs):
            seen.setdefault(ctx.site.name, []).append(probs.clone())

    with ats.hooks(pipe, Probs()):
        pipe("a red circle", generator=torch.Generator().manual_seed(3), **kw)
    plain = {k: v[0] for k, v in seen.items()}
    seen.clear()
    site = ats.discover_sites(pipe)[-1].name             # Flux: a single-stream block
    with ats.hooks(pipe, ats.regulate.Reweight("circle", 3.0, sites=site, steps=[0]), Probs()):
        pipe("a red circle", generator=torch.Generator().manual_seed(3), **kw)
    now, before = seen[site][0], plain[site]
    cond = slice(0, 1) if family == "flux" else slice(1, 2)
    circle = [2] if family == "flux" else [3, 79]
    assert torch.allclose(now[cond][..., circle], before[cond][..., circle] * 3.0, atol=1e-6)
    keep = [i for i in range(now.shape[-1]) if i not in circle]
    assert torch.equal(now[cond][..., keep], before[cond][..., keep])
    if family == "sd3":
        assert torch.equal(now[:1], before[:1])                                # the uncond half is untouched


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_rerun_is_bit_exact(family, flux, sd3, tmp_path):
    pipe, kw = (flux, FLUX_KW) if family == "flux" else (sd3, SD3_KW)
    tr = ats.capture(pipe, "a red circle", seed=4, store=tmp_path / "a.zarr", **kw)
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    np.testing.assert_array_equal(again.attention(tr.sites[0]).values, tr.attention(tr.sites[0]).values)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_one_clear_error(flux, sd3, tmp_path):
    with pytest.raises(AttnscopeError, match="matches no"):
        ats.capture(flux, "a red circle", seed=0, store=tmp_path / "x.zarr", sites="up_blocks.*", **FLUX_KW)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(AttnscopeError, match="not in the prompt"):
        with ats.hooks(sd3, ats.regulate.Reweight("zebra", 2.0)):
            sd3("a red circle", **SD3_KW)
    with pytest.raises(AttnscopeError, match="max_sequence_length"):
        ats.capture(flux, "a red circle and a blue square and a green triangle", seed=0, store=tmp_path / "y.zarr",
                    **{**FLUX_KW, "max_sequence_length": 8})
    assert not (tmp_path / "y.zarr").exists()


def test_the_t5_text_is_checked_where_it_comes_from(flux, sd3, tmp_path):
    """Flux's T5 reads prompt_2 and SD3's prompt_3 when given: a T5 text the pipeline would cut is refused there too,
    and the T5 segment's labels are that text's."""
    long = "a red circle and a blue square and a green triangle"
    with pytest.raises(AttnscopeError, match=rf"prompt_2 '{long}': \d+ T5 tokens.*max_sequence_length=8"):
        ats.capture(flux, "a cat", seed=0, store=tmp_path / "f.zarr", prompt_2=long, **{**FLUX_KW, "max_sequence_length": 8})
    with pytest.raises(AttnscopeError, match=rf"prompt_3 '{long}': \d+ T5 tokens"):
        ats.capture(sd3, "a cat", seed=0, store=tmp_path / "s.zarr", prompt_3=long, **{**SD3_KW, "max_sequence_length": 8})
    assert not (tmp_path / "f.zarr").exists() and not (tmp_path / "s.zarr").exists()
    tr = ats.capture(flux, "a cat", seed=0, store=tmp_path / "ok.zarr", prompt_2="a blue square", **FLUX_KW)
    assert "square" in tr.words and "cat" not in tr.words


def test_a_second_text_joined_to_the_prompt_is_refused_where_its_words_would_be_cut(sd3, sdxl_pipe, tmp_path):
    """SD3's and SDXL's CLIP-G features of prompt_2 are joined to CLIP-L's of the prompt at each position."""
    with pytest.raises(AttnscopeError, match=r"prompt_2='a red circle and a blue square' differs from the prompt.*"
                                             r"tokens='prompt' would keep only the prompt's positions"):
        ats.capture(sd3, "a cat", seed=0, store=tmp_path / "s.zarr", prompt_2="a red circle and a blue square", **SD3_KW)
    assert not (tmp_path / "s.zarr").exists()
    with pytest.warns(ats.AttnscopeWarning, match="prompt_2 differs from the prompt.*labels and words are the prompt's"):
        tr = ats.capture(sdxl_pipe, "a cat", seed=0, store=tmp_path / "x.zarr", prompt_2="a red circle",
                         num_inference_steps=1, height=32, width=32)
    assert tr.tokens[:3] == ["<|startoftext|>", "a</w>", "cat</w>"] and tr.attention(tr.sites[0]).sizes["token"] == 77


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_tgate_is_refused_on_joint_families(family, flux, sd3, tmp_path):
    pipe, kw = (flux, FLUX_KW) if family == "flux" else (sd3, SD3_KW)
    originals = {s.name: s.module.processor for s in ats.discover_sites(pipe)}
    tr = ats.capture(pipe, "a red circle", seed=4, store=tmp_path / "a.zarr", **kw)
    with pytest.raises(AttnscopeError, match="TGATE has no official rule for joint attention"):
        ats.rerun(tr, pipe=pipe, interventions=[ats.regulate.TGate(1)], store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    assert {s.name: s.module.processor for s in ats.discover_sites(pipe)} == originals


def test_capture_command_on_a_saved_flux_pipeline(flux, tmp_path):
    from .conftest import cli

    flux.save_pretrained(tmp_path / "flux")
    out = tmp_path / "run.zarr"
    done = cli("capture", "--model", str(tmp_path / "flux"), "--prompt", "a red elephant", "--steps", "2",
               "--height", "32", "--width", "48", "--max-sequence-length", "16", "--tokens", "prompt",
               "--sites", "single_*", "--out", str(out))
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    assert tr.sites == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert tr.tokens == ["\u2581a", "\u2581red", "\u2581ele", "phant", "</s>"]
    done = cli("capture", "--model", str(tmp_path / "flux"), "--prompt", "a red circle and a blue square",
               "--steps", "2", "--max-sequence-length", "4", "--out", str(tmp_path / "x.zarr"))
    assert done.exit_code == 2 and "--max-sequence-length 4" in done.stderr  # the CLI's flag, not the keyword


def test_compare_a_regulated_rerun_of_an_sd3_trace(sd3, tmp_path):
    tr = ats.capture(sd3, "a red circle and a blue square", seed=2, store=tmp_path / "a.zarr", **SD3_KW)
    reg = ats.rerun(tr, pipe=sd3, interventions=[ats.regulate.AttentionRegulation(["circle", "square"], iterations=3)],
                    store=tmp_path / "b.zarr")
    assert reg.manifest["interventions"][0]["name"] == "AttentionRegulation"
    table = ats.compare(tr, reg, ["circle", "square"]).table()
    assert len(table) > 0 and not np.array_equal(np.asarray(reg.images[0]), np.asarray(tr.images[0]))


def test_unsupported_transformer_names_the_supported_families():
    from diffusers import DiffusionPipeline

    class Other(DiffusionPipeline):
        def __init__(self):
            super().__init__()
            self.register_modules(transformer=torch.nn.Linear(2, 2))

    with pytest.raises(AttnscopeError, match=r"Linear; supported denoisers: UNet2DConditionModel .*SD3Transformer2DModel"
                                             r".*FluxTransformer2DModel"):
        ats.discover_sites(Other())


def test_stats_and_rerun_commands_on_a_flux_trace(flux, tmp_path):
    from .conftest import cli

    flux.save_pretrained(tmp_path / "flux")
    out = tmp_path / "run.zarr"
    assert cli("capture", "--model", str(tmp_path / "flux"), "--prompt", "a red circle", "--steps", "2", "--height", "32",
               "--width", "32", "--max-sequence-length", "16", "--out", str(out)).exit_code == 0
    done = cli("stats", str(out), "--targets", "red,circle", "--by", "site")
    assert done.exit_code == 0, done.stderr
    assert "single_transformer_blocks.1.attn" in done.stdout
    done = cli("rerun", str(out), "--out", str(tmp_path / "re.zarr"))
    assert done.exit_code == 0, done.stderr
    assert np.array_equal(np.asarray(ats.open_trace(tmp_path / "re.zarr").images[0]), np.asarray(ats.open_trace(out).images[0]))


def test_an_unknown_joint_processor_is_refused_when_logits_are_read(sd3):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Other(JointAttnProcessor2_0):
        pass

    site = ats.discover_sites(sd3)[0]
    original = site.module.processor
    site.module.set_processor(Other())
    try:
        class Probs:
            def stages(self, ctx):
                return ("probs",)

            def on_probs(self, ctx, probs):
                pass

        with pytest.raises(AttnscopeError, match="reading logits/probs needs one of the processors"):
            with ats.hooks(sd3, Probs()):
                sd3("a red circle", **SD3_KW)
        with ats.hooks(sd3):                              # no logits/probs client: any processor runs
            sd3("a red circle", **SD3_KW)
    finally:
        site.module.set_processor(original)


def test_sd3_prompt_once_phrases_within_a_segment_and_positions_in_plots(sd3, tmp_path):
    """On SD3 the prompt is spelled twice (CLIP, then T5): the report and viewer showed it twice, a phrase matched
    from the end of the CLIP copy into the T5 copy ("square red"), and int positions were checked as indices."""
    from attnscope.plot import report_words
    from attnscope.tokens import prompt_text, resolve_targets

    tr = ats.capture(sd3, "red circle and blue square", seed=0, store=tmp_path / "p.zarr", tokens="prompt", **SD3_KW)
    assert prompt_text(tr.tokens) == "red circle and blue square"
    assert report_words(tr) == ["red circle", "blue square"]
    with pytest.raises(AttnscopeError, match="'square red' is not in the prompt"):
        resolve_targets(tr.tokens, ["square red"])
    assert ats.view(tr).panels[0]["prompt"] == "red circle and blue square"
    kept = tr.attention(tr.sites[0]).token.values.tolist()
    t5_red = kept[tr.words["red"][-1]]                                  # a position past 77: the T5 "red"
    assert t5_red >= 77
    fig = ats.plot.heatmaps(tr, [t5_red], layout={"red circle": (0, 0, 0.5, 1)})   # was "out of range 0..16"
    assert fig.axes[1].get_title() == str(t5_red)
    page = ats.report(tr, tmp_path / "r.html", words=[t5_red]).read_text()
    assert "<title>attnscope report — red circle and blue square</title>" in page
    with pytest.raises(AttnscopeError, match="target 20: token position not on this trace's token axis"):
        ats.report(tr, tmp_path / "s.html", words=[20])


def test_regulation_edits_the_target_in_both_copies_of_the_sd3_prompt(sd3):
    """SD3's token axis spells the prompt twice (CLIP, then T5). Regulation took a target's first occurrence over the
    whole axis, so only the CLIP copy of "circle" (column 3) was regulated and its T5 copy (79) never was; and for
    ["circle", "circle"] the second listing took the second CLIP circle. The k-th listing is now the k-th occurrence
    in each copy, as in the statistics."""
    from attnscope.regulate._scope import nth_occurrences

    toks = ["<|startoftext|>", "a</w>", "circle</w>", "and</w>", "a</w>", "circle</w>", "<|endoftext|>"]
    toks += ["<|endoftext|>"] * 70 + ["▁a", "▁circle", "▁and", "▁a", "▁circle", "</s>"]
    assert nth_occurrences(toks, ["circle", "circle"]) == [[2, 78], [5, 81]]
    assert nth_occurrences(toks, ["circle"]) == [[2, 78]]
    spy, after = _Logits("intervention"), _Logits("observer")
    with ats.hooks(sd3, spy, ats.regulate.AttentionRegulation(["circle"], iterations=3), after):
        sd3("a red circle", generator=torch.Generator().manual_seed(3), output_type="np", **SD3_KW)
    edited = set()
    for key, before in spy.seen.items():
        diff = (after.seen[key] - before).abs().amax(dim=(0, 1, 2))           # per token
        edited |= {int(c) for c in diff.nonzero().flatten()}
    assert edited == {3, 79}

"""The Flux.2 family, klein and dev: sites, stored maps against an independent float64 computation from each
module's own projections, bit-identity, restoration, steps under guidance, the chat templates' token
roles and words, interventions, refusals."""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.hooks import find_denoiser
from attnscope.hooks.families import flux2
from attnscope.testing import make_qwen_tokenizer, tiny_flux2_dev_pipeline, tiny_flux2_pipeline
from attnscope.tokens import word_alignment

from .family_checks import (
    LogitsSpy,
    ProbsRecorder,
    check_heatmaps_and_compare,
    check_hooks_are_transparent,
    check_regulation,
    check_reweight,
    edits,
)

KW = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=32)
#: "a red circle" in the chat template: <|im_start|> user Ċ a Ġred Ġcircle <|im_end|> …
RED, CIRCLE = 4, 5


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux2_pipeline()


@pytest.fixture(scope="module")
def tok():
    return make_qwen_tokenizer(tempfile.mkdtemp())


def _run(pipe, prompt="a red circle", seed=5, **kw):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **{**KW, **kw}).images


# ----------------------------------------------------------------------------- sites
def test_sites_are_the_double_and_single_stream_attentions(pipe):
    sites = ats.discover_sites(pipe)
    assert [(s.name, s.family, s.kind, s.block, s.text_layout, s.patch) for s in sites] == [
        ("transformer_blocks.0.attn", "flux2", "joint", "double", "text_first", 2),
        ("transformer_blocks.1.attn", "flux2", "joint", "double", "text_first", 2),
        ("single_transformer_blocks.0.attn", "flux2", "joint", "single", "text_first", 2),
        ("single_transformer_blocks.1.attn", "flux2", "joint", "single", "text_first", 2)]
    assert [type(s.module.processor).__name__ for s in sites] == ["Flux2AttnProcessor"] * 2 + \
        ["Flux2ParallelSelfAttnProcessor"] * 2
    assert {(s.heads, s.head_dim, s.token_dim) for s in sites} == {(2, 16, 48)}
    assert [s.depth for s in sites] == [0, 1, 2, 3]
    assert find_denoiser(pipe)[0] == "flux2"
    assert sites[0].spatial_shape((16, 24)) == (8, 12)                        # the packed 2x2 grid


def test_step_inputs_read_the_latent_grid_and_the_text_length(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(flux2.step_inputs(a, k)), with_kwargs=True)
    try:
        _run(pipe, height=32, width=48)
    finally:
        handle.remove()
    assert len(calls) == 4                                                    # guidance: two calls per step
    assert {(c["batch"], c["latent_shape"], c["text_length"]) for c in calls} == {(1, (16, 24), 32)}
    assert calls[0]["timestep"] == calls[1]["timestep"] != calls[2]["timestep"]


def test_reference_images_are_refused_with_one_error(pipe):
    from PIL import Image

    with pytest.raises(AttnscopeError, match=r"reference images \(image=\): 256 of the transformer's 320 image tokens"):
        with ats.hooks(pipe):
            _run(pipe, image=Image.new("RGB", (64, 64)))
    assert np.array_equal(_run(pipe), _run(pipe))                            # hooks are gone, the pipeline runs


# ----------------------------------------------------------------------------- reference computation
def _rope(x, cos, sin):
    """RoPE as complex rotation: each pair (x[2i], x[2i+1]) times exp(iθ); cos/sin repeat each θ twice."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    turn = torch.polar(torch.ones_like(cos[:, ::2]), torch.atan2(sin[:, ::2], cos[:, ::2]))
    return torch.view_as_real(pairs * turn[None, :, None, :]).flatten(-2)


@torch.no_grad()
def _reference(attn, inputs, text_length):
    """The image-query × text-key block of the joint softmax, float64, from the module's own projections."""
    a = copy.deepcopy(attn).double()
    hs = inputs["hidden_states"].double()
    d = a.head_dim
    if "encoder_hidden_states" in inputs:                                     # double stream: two projections
        enc = inputs["encoder_hidden_states"].double()
        q = torch.cat([a.norm_added_q(a.add_q_proj(enc).unflatten(-1, (-1, d))),
                       a.norm_q(a.to_q(hs).unflatten(-1, (-1, d)))], 1)
        k = torch.cat([a.norm_added_k(a.add_k_proj(enc).unflatten(-1, (-1, d))),
                       a.norm_k(a.to_k(hs).unflatten(-1, (-1, d)))], 1)
    else:                                                                     # single stream: one fused projection
        q, k, _ = a.to_qkv_mlp_proj(hs)[..., :3 * a.inner_dim].chunk(3, -1)
        q, k = a.norm_q(q.unflatten(-1, (-1, d))), a.norm_k(k.unflatten(-1, (-1, d)))
    cos, sin = (t.double() for t in inputs["image_rotary_emb"])
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    probs = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / d**0.5, dim=-1)
    return probs[:, :, text_length:, :text_length]


def _record_inputs(pipe):
    found, handles, text_length = {}, [], {}

    def on_transformer(module, args, kwargs):
        text_length["value"] = kwargs["encoder_hidden_states"].shape[1]

    handles.append(pipe.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True))
    for site in ats.discover_sites(pipe):
        def grab(module, args, kwargs, name=site.name):
            entry = {k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, tuple))}
            entry["text_length"] = text_length["value"]
            found.setdefault(name, []).append(entry)
        handles.append(site.module.register_forward_pre_hook(grab, with_kwargs=True))
    return found, handles


def _capture_with_inputs(pipe, tmp_path, **kw):
    """A capture of "a red circle" (every head and token) and the recorded inputs of every site call."""
    inputs, handles = _record_inputs(pipe)
    try:
        tr = ats.capture(pipe, "a red circle", seed=1, store=tmp_path / "t.zarr", heads="all", tokens="all", **kw)
    finally:
        for h in handles:
            h.remove()
    return tr, inputs


def _assert_maps_match_reference(pipe, tr, inputs, passes):
    """Every site and step of ``tr`` against :func:`_reference` on the recorded inputs of the step's first transformer
    call (the prompt's pass) of ``passes`` per step; returns the largest error."""
    worst = 0.0
    for site in ats.discover_sites(pipe):
        calls = inputs[site.name]
        assert len(calls) == 2 * passes
        for step in range(2):
            entry = calls[passes * step]
            ref = _reference(site.module, entry, entry["text_length"])
            da = tr.attention(site.name)
            ref = ref.reshape(*ref.shape[:2], da.sizes["y"], da.sizes["x"], ref.shape[-1]).numpy()
            stored = da.isel(step=step).values.astype(np.float64)
            np.testing.assert_allclose(stored, ref, atol=2e-4, err_msg=f"{site.name} step {step}")  # float16 storage
            mass = tr.text_mass(site.name).isel(step=step).values.astype(np.float64)
            np.testing.assert_allclose(mass, ref.sum(-1), atol=5e-4)
            worst = max(worst, float(np.abs(stored - ref).max()))
    return worst


def test_stored_maps_equal_a_float64_computation_from_the_module_projections(pipe, tmp_path):
    tr, inputs = _capture_with_inputs(pipe, tmp_path, **{**KW, "width": 48})
    assert tr.sites == [s.name for s in ats.discover_sites(pipe)]
    worst = _assert_maps_match_reference(pipe, tr, inputs, passes=2)          # prompt pass, negative pass, per step
    sizes = tr.attention(tr.sites[0]).sizes
    assert (sizes["sample"], sizes["head"], sizes["y"], sizes["x"], sizes["token"]) == (1, 2, 8, 12, 32)
    assert tr.images[0].size == (48, 32)
    assert (tr.manifest["run"]["height"], tr.manifest["run"]["width"]) == (32, 48)
    assert worst < 1e-4                                                       # measured: 3e-5


def test_batches_without_guidance_map_rows_to_prompts_and_images(pipe, tmp_path):
    tr = ats.capture(pipe, ["a red circle", "a blue square"], seed=[1, 2, 3, 4], store=tmp_path / "b.zarr",
                     tokens="all", num_images_per_prompt=2, guidance_scale=1.0, **KW)
    da = tr.attention(tr.sites[0])
    assert da.sizes["sample"] == 4
    assert tr.manifest["run"]["guidance"] is False
    mass = tr.text_mass(tr.sites[0]).values
    assert np.isfinite(mass).all() and (mass > 0).all()


def test_guidance_does_not_split_the_batch_into_cfg_halves(pipe):
    layouts = []

    class Rows:
        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, probs):
            layouts.append(ctx.rows)

    with ats.hooks(pipe, Rows()):
        pipe(prompt=["a red circle", "a blue square"], **KW)                 # guidance_scale 4.0: CFG on
    assert {(r.uncond, r.samples, r.prompt_of_sample) for r in layouts} == {(None, 2, (0, 1))}


# ----------------------------------------------------------------------------- bit-identity, restoration, steps
def test_no_client_and_observers_are_bit_identical_and_processors_come_back(pipe):
    class Shapes:
        def stages(self, ctx):
            return ("logits", "output")

        def on_logits(self, ctx, logits):
            assert logits.shape[-2:] == (64, 32)

        def on_output(self, ctx, output):
            assert output.shape[1] == ctx.spatial_shape[0] * ctx.spatial_shape[1]  # the image stream's rows

    observer = check_hooks_are_transparent(pipe, lambda: _run(pipe))        # the kernel's own output
    assert observer.calls == 2 * len(ats.discover_sites(pipe))               # the negative pass is not shown
    plain = _run(pipe)
    with ats.hooks(pipe, Shapes()):
        assert np.array_equal(_run(pipe), plain)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_steps_are_counted_by_timestep_with_and_without_guidance(pipe, guidance_scale):
    steps = []

    class Steps:
        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, probs):
            steps.append((ctx.step, ctx.site.name))

    with ats.hooks(pipe, Steps()):
        _run(pipe, guidance_scale=guidance_scale)
    assert sorted({s for s, _ in steps}) == [0, 1]
    assert len(steps) == 2 * len(ats.discover_sites(pipe))


@pytest.mark.parametrize("which", ["pipe", "dev"], ids=["klein", "dev"])
def test_rerun_is_bit_exact(which, request, tmp_path):
    pipe = request.getfixturevalue(which)
    tr = ats.capture(pipe, "a red circle", seed=4, store=tmp_path / "a.zarr", **(KW if which == "pipe" else DEV))
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)


# ----------------------------------------------------------------------------- interventions
def test_reweight_scales_only_its_columns(pipe):
    plain = ProbsRecorder()
    with ats.hooks(pipe, plain):
        _run(pipe, seed=3)
    site = ats.discover_sites(pipe)[-1].name                                  # a single-stream block
    now = ProbsRecorder()
    with ats.hooks(pipe, ats.regulate.Reweight(CIRCLE, 3.0, sites=site, steps=[0]), now):
        _run(pipe, seed=3)
    after, before = now.seen[site][0], plain.seen[site][0]
    assert torch.allclose(after[..., CIRCLE], before[..., CIRCLE] * 3.0, atol=1e-6)
    keep = [i for i in range(after.shape[-1]) if i != CIRCLE]
    assert torch.equal(after[..., keep], before[..., keep])
    first = ats.discover_sites(pipe)[0].name                                  # a site before it: untouched
    assert torch.equal(now.seen[first][0], plain.seen[first][0])


def test_reweight_by_word_finds_the_users_word(pipe):
    now = ProbsRecorder()
    site = ats.discover_sites(pipe)[-1].name
    with ats.hooks(pipe, ats.regulate.Reweight("circle", 0.0, sites=site, steps=[0]), now):
        _run(pipe, seed=3)
    assert float(now.seen[site][0][..., CIRCLE].abs().max()) == 0.0


@pytest.mark.parametrize("targets", [[CIRCLE], ["circle"]], ids=["position", "word"])
def test_regulation_edits_only_the_target_columns_and_changes_the_image(pipe, targets):
    spy, after = LogitsSpy("intervention"), LogitsSpy("observer")
    reg = ats.regulate.AttentionRegulation(targets, iterations=3)
    with ats.hooks(pipe, spy, reg, after):
        edited = _run(pipe, seed=3)
    assert not np.array_equal(edited, _run(pipe, seed=3))
    changed = set()
    for key, diff in edits(spy, after).items():                             # diff: (rows, tokens)
        others = [c for c in range(diff.shape[-1]) if c != CIRCLE]
        assert float(diff[:, others].max()) == 0.0
        if float(diff.max()) > 0:
            changed.add(key[0])
    assert changed == {s.name for s in ats.discover_sites(pipe) if s.block == "double"}


def test_tgate_is_refused(pipe, tmp_path):
    originals = {s.name: s.module.processor for s in ats.discover_sites(pipe)}
    tr = ats.capture(pipe, "a red circle", seed=4, store=tmp_path / "a.zarr", **KW)
    with pytest.raises(AttnscopeError, match="TGATE has no official rule for joint attention"):
        ats.rerun(tr, pipe=pipe, interventions=[ats.regulate.TGate(1)], store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    assert {s.name: s.module.processor for s in ats.discover_sites(pipe)} == originals


@pytest.mark.parametrize("stream", ["double", "single"])
def test_kv_cache_processors_are_refused_when_probs_are_read(stream):
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    pipe = tiny_flux2_pipeline()                                              # its processors are changed here
    site = next(s for s in ats.discover_sites(pipe) if s.block == stream)
    site.module.set_processor(Flux2KVAttnProcessor() if stream == "double" else Flux2KVParallelSelfAttnProcessor())
    with pytest.raises(AttnscopeError, match=r"reading logits/probs needs one of the processors \['Flux2AttnProcessor', "
                                             r"'Flux2ParallelSelfAttnProcessor'\], got Flux2KV"):
        with ats.hooks(pipe, ProbsRecorder()):
            _run(pipe)
    with ats.hooks(pipe):                                                     # no logits/probs client: it runs
        _run(pipe)


def test_fused_projections_give_the_same_maps():
    pipe = tiny_flux2_pipeline()                                              # its projections are fused here
    plain = ProbsRecorder()
    with ats.hooks(pipe, plain):
        _run(pipe)
    pipe.transformer.fuse_qkv_projections()
    assert type(ats.discover_sites(pipe)[0].module.processor).__name__ == "Flux2AttnProcessor"
    fused = ProbsRecorder()
    with ats.hooks(pipe, fused):
        _run(pipe)
    for name, seen in plain.seen.items():
        for a, b in zip(seen, fused.seen[name]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- tokens: spell and words
def _ids(tok, prompt, length=32):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    return tok(text, padding="max_length", truncation=True, max_length=length).input_ids


def test_spell_gives_the_template_its_own_role(tok):
    positions, tokens, roles = flux2.spell(tok, _ids(tok, "a red circle"), 32)
    assert positions == list(range(32))
    assert tokens[:16] == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcircle", "<|im_end|>", "Ċ", "<|im_start|>",
                           "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ", "<|endoftext|>"]
    assert roles == ["instruction"] * 3 + ["word"] * 3 + ["instruction"] * 9 + ["pad"] * 17
    assert set(roles) <= set(("sot", "word", "eot", "pad", "instruction"))
    assert flux2.spell(tok, _ids(tok, "a red circle"), 16)[0] == list(range(16))  # the sites' text length
    _, _, cut_roles = flux2.spell(tok, _ids(tok, "a red circle and a blue square", length=8), 8)
    assert cut_roles == ["instruction"] * 3 + ["word"] * 5                     # cut by max_sequence_length
    _, _, empty = flux2.spell(tok, _ids(tok, ""), 32, pipe=None)
    assert "word" not in empty and empty[:12] == ["instruction"] * 12


def test_spell_matches_what_the_pipeline_feeds_the_text_encoder(pipe):
    seen = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"][0].tolist()), with_kwargs=True)
    try:
        _run(pipe, prompt="a red elephant")
    finally:
        handle.remove()
    _, tokens, roles = flux2.spell(pipe.tokenizer, seen[0], 32, pipe)        # the prompt's ids (the negative's next)
    assert [t for t, r in zip(tokens, roles) if r == "word"] == ["a", "Ġred", "Ġele", "phant"]
    assert _words(tokens, roles) == [("a", [3]), ("red", [4]), ("elephant", [5, 6])]
    assert [r for t, r in zip(tokens, roles) if t == "<|endoftext|>"] == ["pad"] * roles.count("pad")


def test_words_merge_byte_level_pieces(tok):
    _, tokens, roles = flux2.spell(tok, _ids(tok, "a red elephant, two zebras 3\nsquare"), 32)
    assert _words(tokens, roles) == [("a", [3]), ("red", [4]), ("elephant", [5, 6]), (",", [7]),
                                     ("two", [9, 10, 11]), ("zebras", [13, 14, 15, 16, 17]), ("3", [19]),
                                     ("square", [21])]
    assert tokens[8] == tokens[12] == tokens[18] == "Ġ" and tokens[20] == "Ċ"  # spaces and newlines: in no word
    _, accented, roles = flux2.spell(tok, _ids(tok, "café"), 32)
    assert _words(accented, roles) == [("café", [3, 4, 5, 6, 7])]
    assert _words(["Ġa", "Ġb"], ["pad", "pad"]) == []


def _words(tokens, roles):
    """attnscope.tokens' word merge (byte-level BPE on Qwen pieces) as (word, positions) in prompt order."""
    return list(word_alignment(tokens, roles).items())


def test_trace_words_are_the_users_words(pipe, tmp_path):
    tr = ats.capture(pipe, "a red elephant", seed=0, store=tmp_path / "w.zarr", tokens="all", **KW)
    assert tr.tokens[:8] == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġele", "phant", "<|im_end|>"]
    assert tr.words == {"a": [3], "red": [4], "elephant": [5, 6]}
    ds = ats.stats.dominance(tr, targets=["red", "elephant"])
    assert ds.token.values.tolist() == [3, 4, 5, 6]                           # the user's words, no template
    np.testing.assert_allclose(ds["mass_share"].sum("token").values, 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- CLI
def test_capture_command_on_a_saved_flux2_pipeline(pipe, tmp_path):
    from .conftest import cli

    pipe.save_pretrained(tmp_path / "flux2")
    out = tmp_path / "run.zarr"
    done = cli("capture", "--model", str(tmp_path / "flux2"), "--prompt", "a red elephant", "--steps", "2",
               "--height", "32", "--width", "48", "--max-sequence-length", "24", "--tokens", "all",
               "--sites", "single_*", "--out", str(out))
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    assert tr.sites == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert tr.tokens[:8] == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġele", "phant", "<|im_end|>"]
    assert tr.manifest["run"]["segments"] == [["qwen2", 24]]
    assert tr.attention(tr.sites[0]).sizes["token"] == 24


def test_branch_uncond_is_an_error_the_negative_pass_is_not_recorded(pipe, tmp_path):
    with pytest.raises(AttnscopeError, match="no unconditional rows"):
        ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "u.zarr", branch="uncond", **KW)


def test_heatmaps_and_compare_of_a_regulated_rerun(pipe, tmp_path):
    check_heatmaps_and_compare(pipe, tmp_path, ["red", "circle"], **KW)


def test_a_prompt_the_pipeline_would_cut_is_refused(pipe, tmp_path):
    with pytest.raises(AttnscopeError, match="Qwen tokens with the chat template, more than the 16"):
        ats.capture(pipe, "a red circle and a blue square", seed=0, store=tmp_path / "x.zarr", **{**KW, "max_sequence_length": 16})
    assert not (tmp_path / "x.zarr").exists()


# ----------------------------------------------------------------------------- FLUX.2 dev (Flux2Pipeline, Mistral 3)
DEV = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=48)
#: Before the prompt: <s> [SYSTEM_PROMPT], the 27 pieces of the system message, [/SYSTEM_PROMPT] [INST]
TEMPLATE = 31


@pytest.fixture(scope="module")
def dev():
    return tiny_flux2_dev_pipeline()


def _run_dev(dev, prompt="a red circle", seed=5, **kw):
    return dev(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **{**DEV, **kw}).images


def _dev_ids(dev, prompt, length=48, side="left"):
    """The ids of ``prompt`` as the dev pipeline formats them (its system message, padding and truncation)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    kwargs = dict(padding="max_length", truncation=True, max_length=length, padding_side=side)
    return dev.tokenizer.apply_chat_template(format_input([prompt], dev.system_message), tokenize=True,
                                             processor_kwargs=kwargs)[0]


def _users(tokens, roles):
    return [t for t, r in zip(tokens, roles) if r == "word"]


def test_dev_sites_segment_and_one_transformer_call_per_step(dev):
    from attnscope.hooks import segment_name, text_segments

    sites = ats.discover_sites(dev)
    assert [(s.name, s.block) for s in sites] == [(s.name, s.block) for s in ats.discover_sites(tiny_flux2_pipeline())]
    assert {(s.family, s.kind, s.heads, s.head_dim, s.token_dim, s.patch) for s in sites} == {
        ("flux2", "joint", 2, 16, 48, 2)}
    assert [(name, segment_name(tok)) for name, tok in text_segments(dev)] == [("text_encoder", "mistral")]
    calls = []
    handle = dev.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(flux2.step_inputs(a, k)),
                                                       with_kwargs=True)
    try:
        _run_dev(dev, width=48)
    finally:
        handle.remove()
    assert [(c["batch"], c["latent_shape"], c["text_length"]) for c in calls] == [(1, (16, 24), 48)] * 2  # distilled


def test_dev_stored_maps_equal_a_float64_computation_from_the_module_projections(dev, tmp_path):
    tr, inputs = _capture_with_inputs(dev, tmp_path, **{**DEV, "width": 48})
    assert _assert_maps_match_reference(dev, tr, inputs, passes=1) < 1e-4    # one transformer call per step
    sizes = tr.attention(tr.sites[0]).sizes
    assert (sizes["sample"], sizes["head"], sizes["y"], sizes["x"], sizes["token"]) == (1, 2, 8, 12, 48)
    assert tr.manifest["run"]["segments"] == [["mistral", 48]]


def test_dev_no_client_and_observers_are_bit_identical_and_processors_come_back(dev):
    observer = check_hooks_are_transparent(dev, lambda: _run_dev(dev))
    assert observer.calls == 2 * len(ats.discover_sites(dev))


def test_dev_spell_matches_what_the_pipeline_feeds_the_text_encoder(dev):
    seen = []
    handle = dev.text_encoder.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"][0].tolist()),
                                                        with_kwargs=True)
    try:
        _run_dev(dev, prompt="a red elephant")
    finally:
        handle.remove()
    assert seen == [_dev_ids(dev, "a red elephant")]
    positions, tokens, roles = flux2.spell(dev.tokenizer, seen[0], 48, dev)
    assert positions == list(range(48))
    pads = 48 - TEMPLATE - 5                                                  # left padding: 4 pieces and [/INST]
    assert tokens[:pads] == ["<pad>"] * pads and tokens[pads:pads + 2] == ["<s>", "[SYSTEM_PROMPT]"]
    assert tokens[pads + TEMPLATE - 2:] == ["[/SYSTEM_PROMPT]", "[INST]", "a", "Ġred", "Ġele", "phant", "[/INST]"]
    assert roles == ["pad"] * pads + ["instruction"] * TEMPLATE + ["word"] * 4 + ["instruction"]
    assert _words(tokens, roles) == [("a", [pads + 31]), ("red", [pads + 32]), ("elephant", [pads + 33, pads + 34])]


def test_dev_spell_on_right_padding_cut_and_empty_prompts(dev):
    _, tokens, roles = flux2.spell(dev.tokenizer, _dev_ids(dev, "a red circle", side="right"), 48)
    assert roles == ["instruction"] * TEMPLATE + ["word"] * 3 + ["instruction"] + ["pad"] * 13
    assert tokens[-13:] == ["<pad>"] * 13
    _, tokens, roles = flux2.spell(dev.tokenizer, _dev_ids(dev, "a red circle and a blue square", length=34), 34)
    assert _users(tokens, roles) == ["a", "Ġred", "Ġcircle"]                  # cut by max_sequence_length: no [/INST]
    assert roles == ["instruction"] * TEMPLATE + ["word"] * 3
    _, tokens, roles = flux2.spell(dev.tokenizer, _dev_ids(dev, ""), 48)
    assert "word" not in roles and tokens[-2:] == ["[INST]", "[/INST]"] and roles.count("instruction") == 32


def test_dev_trace_words_are_the_users_words_not_the_system_messages(dev, tmp_path):
    tr = ats.capture(dev, "a red object", seed=0, store=tmp_path / "w.zarr", **DEV)    # tokens="prompt"
    assert tr.tokens[0] == "<s>"                                                # the left padding is not kept
    assert "<pad>" not in tr.tokens and tr.tokens[-1] == "[/INST]"
    pads = 48 - len(tr.tokens)
    assert tr.attention(tr.sites[0])["token"].values.tolist() == list(range(pads, 48))   # the text positions kept
    start = tr.tokens.index("[INST]") + 1
    assert tr.tokens.count("Ġobject") == 3                                    # twice in the system message
    assert tr.words == {"a": [start], "red": [start + 1], "object": [start + 2]}
    ds = ats.stats.dominance(tr, targets=["red", "object"])
    assert ds.token.values.tolist() == [pads + start, pads + start + 1, pads + start + 2]  # the user's words only


def test_dev_reweight_by_word_edits_only_the_users_word_column(dev):
    _, tokens, roles = flux2.spell(dev.tokenizer, _dev_ids(dev, "a red object"), 48)
    column = tokens.index("[INST]") + 3                                       # the user's "Ġobject"
    assert tokens[column] == "Ġobject" and roles[column] == "word"
    site = ats.discover_sites(dev)[-1].name                                   # a single-stream block
    # only the user's column is scaled, not the system message's two "Ġobject"
    check_reweight(dev, lambda: _run_dev(dev, prompt="a red object", seed=3), "object", column, site, slice(None))


def test_dev_a_prompt_the_pipeline_would_cut_is_refused(dev, tmp_path):
    from attnscope.capture._capture import _check_prompt_lengths

    with pytest.raises(AttnscopeError, match="39 Mistral tokens with the system message and chat template, more than "
                                             "the 34"):
        ats.capture(dev, "a red circle and a blue square", seed=0, store=tmp_path / "x.zarr",
                    **{**DEV, "max_sequence_length": 34})
    assert not (tmp_path / "x.zarr").exists()
    _check_prompt_lengths(dev, ["a red circle"], {"max_sequence_length": TEMPLATE + 4})  # fits exactly: no error


def test_dev_regulation_heatmaps_compare_and_tgate(dev, tmp_path):
    _, tokens, roles = flux2.spell(dev.tokenizer, _dev_ids(dev, "a red circle"), 48)
    circle = tokens.index("[INST]") + 3                                        # the user's "Ġcircle"
    assert tokens[circle] == "Ġcircle" and roles[circle] == "word"
    check_regulation(dev, lambda: _run_dev(dev, prompt="a red circle", seed=3), ["circle"], circle,
                     {s.name for s in ats.discover_sites(dev) if s.block == "double"}, uncond=None)
    check_heatmaps_and_compare(dev, tmp_path, ["red", "circle"], **DEV)
    with pytest.raises(AttnscopeError, match="TGate on a 'flux2' pipeline"), ats.hooks(dev, ats.regulate.TGate(1)):
        pass

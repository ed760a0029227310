"""The hook core: stages, composition, fast path, restoration, step context."""

import numpy as np
import pytest
import torch

import attnscope as ats

from .conftest import RUN, generate


class Probe:
    """Observer that asks for given stages at every call and keeps what it sees."""

    role = "observer"

    def __init__(self, stages=("probs",), sites=None):
        self.wanted, self.sites, self.seen, self.steps = tuple(stages), sites, [], []

    def stages(self, ctx):
        return self.wanted if self.sites is None or ctx.site.name in self.sites else ()

    def on_step(self, step):
        self.steps.append(step)

    def on_logits(self, ctx, t):
        self.seen.append(("logits", ctx.site.name, ctx.step, t.detach().clone()))

    def on_probs(self, ctx, t):
        self.seen.append(("probs", ctx.site.name, ctx.step, t.detach().clone()))

    def on_output(self, ctx, t):
        self.seen.append(("output", ctx.site.name, ctx.step, t.detach().clone()))


class Edit:
    """Intervention that replaces one stage with ``fn(tensor)``."""

    role = "intervention"

    def __init__(self, stage, fn):
        self.stage, self.fn = stage, fn

    def stages(self, ctx):
        return (self.stage,)

    def __getattr__(self, name):
        if name == f"on_{self.stage}":
            return lambda ctx, t: self.fn(t)
        raise AttributeError(name)


def processors(pipe):
    return {name: m.__dict__.get("processor") for name, m in pipe.unet.named_modules() if hasattr(m, "processor")}


def test_no_stage_needed_is_bit_identical(any_pipe):
    plain = generate(any_pipe)
    with ats.hooks(any_pipe, Probe(stages=())):
        hooked = generate(any_pipe)
    assert np.array_equal(plain, hooked)


def test_probs_observer_exact_is_bit_identical_default_is_close(sd_pipe):
    def float_image():
        out = sd_pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **RUN)
        return out.images

    plain = float_image()
    with ats.hooks(sd_pipe, Probe(stages=("logits", "probs", "output")), exact=True):
        exact = float_image()
    with ats.hooks(sd_pipe, Probe(stages=("logits", "probs", "output"))):
        fast = float_image()
    assert np.array_equal(plain, exact)
    assert np.abs(plain - fast).max() < 1e-4


def test_probs_are_the_softmax_of_scaled_logits(sd_pipe):
    probe = Probe(stages=("logits", "probs"))
    with ats.hooks(sd_pipe, probe):
        generate(sd_pipe, num_inference_steps=1)
    logits = [t for stage, *_, t in probe.seen if stage == "logits"]
    probs = [t for stage, *_, t in probe.seen if stage == "probs"]
    assert len(logits) == len(probs) == 7
    for z, p in zip(logits, probs):
        e = np.exp(z.double().numpy() - z.double().numpy().max(-1, keepdims=True))
        np.testing.assert_allclose(p.numpy(), e / e.sum(-1, keepdims=True), atol=1e-6)


def test_processors_restored_after_exit_and_exception(any_pipe):
    before = processors(any_pipe)
    with ats.hooks(any_pipe, Probe()):
        assert all(type(p).__name__ == "CrossAttentionProcessor" for n, p in processors(any_pipe).items() if n.endswith("attn2"))
    assert processors(any_pipe) == before
    assert all(processors(any_pipe)[n] is p for n, p in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with ats.hooks(any_pipe, Probe()):
            raise RuntimeError("boom")
    assert all(processors(any_pipe)[n] is p for n, p in before.items())
    assert not any_pipe.unet._forward_pre_hooks and not any_pipe.text_encoder._forward_pre_hooks


def test_module_processor_restored_in_place(sd_pipe):
    class ModuleProcessor(torch.nn.Module):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            return torch.zeros_like(hidden_states)

    module = sd_pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")
    original = module.processor
    custom = ModuleProcessor()
    module.set_processor(custom)
    try:
        order = list(module._modules)
        with ats.hooks(sd_pipe, Probe(stages=("output",))):
            generate(sd_pipe, num_inference_steps=1)
        assert module._modules["processor"] is custom and list(module._modules) == order
    finally:
        module.set_processor(original)


def test_interventions_run_first_in_order_then_observers_see_final(sd_pipe):
    probe = Probe(stages=("probs",))
    uniform = Edit("probs", lambda p: torch.full_like(p, 1.0 / p.shape[-1]))
    doubled = Edit("probs", lambda p: p * 2)
    # the observer is listed first but still runs after both interventions
    with ats.hooks(sd_pipe, probe, uniform, doubled):
        edited = generate(sd_pipe, num_inference_steps=1)
    for *_, t in probe.seen:
        np.testing.assert_allclose(t.numpy(), 2.0 / t.shape[-1], rtol=1e-6)
    assert not np.array_equal(edited, generate(sd_pipe, num_inference_steps=1))


def test_logits_edit_changes_probs(sd_pipe):
    site = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    boost = Edit("logits", lambda z: z + torch.nn.functional.one_hot(torch.tensor(3), z.shape[-1]) * 100)
    probe = Probe(stages=("probs",), sites={site})
    with ats.hooks(sd_pipe, boost, probe):
        generate(sd_pipe, num_inference_steps=1)
    (_, _, _, p), = probe.seen
    assert p[..., 3].min() > 0.999


def test_output_replacement_and_bypass(sd_pipe):
    class Cache:
        role = "intervention"
        calls = 0

        def stages(self, ctx):
            return ()

        def bypass(self, ctx):
            self.calls += 1
            return self.cached[ctx.site.name]

    probe = Probe(stages=("output",))
    with ats.hooks(sd_pipe, probe):
        reference = generate(sd_pipe, num_inference_steps=1)
    cache = Cache()
    cache.cached = {name: t for _, name, _, t in probe.seen}
    original = {}
    for name, m in sd_pipe.unet.named_modules():  # make the real attention unusable: bypass must skip it
        if name in cache.cached:
            original[name] = m.to_q.forward
            m.to_q.forward = None
    try:
        with ats.hooks(sd_pipe, cache):
            bypassed = generate(sd_pipe, num_inference_steps=1)
    finally:
        for name, fwd in original.items():
            sd_pipe.unet.get_submodule(name).to_q.forward = fwd
    assert cache.calls == 7
    assert np.array_equal(reference, bypassed)


def test_observer_may_not_replace_and_shapes_must_match(sd_pipe):
    class Rogue(Probe):
        def on_probs(self, ctx, t):
            return t

    with pytest.raises(ats.AttnscopeError, match="observer"):
        with ats.hooks(sd_pipe, Rogue()):
            generate(sd_pipe, num_inference_steps=1)
    with pytest.raises(ats.AttnscopeError, match=r"returned shape .* expected"):
        with ats.hooks(sd_pipe, Edit("probs", lambda p: p[..., :5])):
            generate(sd_pipe, num_inference_steps=1)
    with pytest.raises(ats.AttnscopeError, match="unknown stage 'attn'"):
        with ats.hooks(sd_pipe, Probe(stages=("attn",))):
            generate(sd_pipe, num_inference_steps=1)


def test_step_context_and_rows(sd_pipe):
    probe = Probe(stages=())
    with ats.hooks(sd_pipe, probe):
        generate(sd_pipe, prompt=["a red circle", "a dog"], num_images_per_prompt=2, num_inference_steps=3)
        generate(sd_pipe, num_inference_steps=2, guidance_scale=1.0)
    first, second = probe.steps[:3], probe.steps[3:]
    assert [s.step for s in first] == [0, 1, 2] and [s.step for s in second] == [0, 1]
    assert {s.run for s in first} == {0} and {s.run for s in second} == {1}
    sd_pipe.scheduler.set_timesteps(3)
    assert [s.timestep for s in first] == [float(t) for t in sd_pipe.scheduler.timesteps]
    rows = first[0].rows
    assert rows.batch == 8 and rows.uncond == slice(0, 4) and rows.cond == slice(4, 8)
    assert rows.prompt_of_sample == (0, 0, 1, 1) and rows.image_of_sample == (0, 1, 0, 1)
    assert second[0].rows.uncond is None and second[0].rows.cond == slice(0, 1)
    assert first[0].token_ids.shape == (2, 77) and first[0].latent_shape == (16, 16)


def test_sites_and_spatial_shapes(sd_pipe, sdxl_pipe):
    sd = ats.discover_sites(sd_pipe)
    assert [s.name for s in sd] == [n for n, _ in sd_pipe.unet.named_modules() if n.endswith("attn2")]
    assert {(s.block, s.level) for s in sd} == {("down", 0), ("down", 1), ("mid", 1), ("up", 1), ("up", 0)}
    xl = ats.discover_sites(sdxl_pipe)
    assert len(xl) == 8 and all(s.token_dim == 64 and s.heads == 4 for s in xl)
    assert sd[0].spatial_shape((33, 47)) == (33, 47) and sd[1].spatial_shape((33, 47)) == (17, 24)


def test_unsupported_pipelines_are_refused():
    with pytest.raises(ats.AttnscopeError, match="expected a diffusers pipeline"):
        with ats.hooks(object(), Probe()):
            pass
    with pytest.raises(ats.AttnscopeError, match="expected an object with role"):
        from attnscope.testing import tiny_sd_pipeline

        with ats.hooks(tiny_sd_pipeline(), object()):
            pass


def test_tensors_kept_by_clients_are_never_overwritten(sd_pipe):
    """Stage buffers are reused between calls on the CPU, but never while a client holds on to them."""

    class Keep:
        role = "observer"

        def __init__(self):
            self.kept, self.copies = [], []

        def stages(self, ctx):
            return ("logits", "probs") if ctx.site.name.startswith("down_blocks.0") else ()

        def on_logits(self, ctx, z):
            self.kept.append(z[1])  # a view
            self.copies.append(z[1].clone())

        def on_probs(self, ctx, p):
            self.kept.append(p)  # the tensor itself
            self.copies.append(p.clone())

    keep = Keep()
    with ats.hooks(sd_pipe, keep):
        generate(sd_pipe, num_inference_steps=3)
    assert len(keep.kept) == 6
    for kept, copy in zip(keep.kept, keep.copies):
        assert torch.equal(kept, copy)


def test_gradients_flow_through_observed_attention(sd_pipe):
    """Optimising through sampling (seed 001) differentiates the attention: the stage path must allow it."""
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    text = torch.randn(2, 77, 32)
    probe = Probe(stages=("probs",))
    with ats.hooks(sd_pipe, probe), torch.enable_grad():
        out = sd_pipe.unet(latents, torch.tensor(500), encoder_hidden_states=text).sample
        out.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert len(probe.seen) == 7 and all(t.shape[-1] == 77 for *_, t in probe.seen)


def test_the_client_protocol_is_declared_once():
    from attnscope.hooks import OPTIONAL_METHODS, ROLES, HookClient, client_role

    assert isinstance(Probe(), HookClient) and isinstance(Edit("probs", lambda t: t), HookClient)
    assert not isinstance(object(), HookClient)
    assert ROLES == ("intervention", "observer") and ats.STAGES == ("logits", "probs", "output")
    doc = HookClient.__doc__
    for name in ("role", "self_attention", "stages", *OPTIONAL_METHODS):
        assert name in doc, f"HookClient does not document {name}"

    class NoRole:
        def stages(self, ctx):
            return ()

    class Wrong(NoRole):
        role = "editor"

    assert client_role(NoRole()) == "observer" and client_role(Edit("probs", None)) == "intervention"
    with pytest.raises(ats.AttnscopeError, match="got role='editor' and a stages"):
        client_role(Wrong())


def test_only_interventions_may_bypass_or_choose_branches(sd_pipe):
    """An observer's ``bypass`` and ``branches`` are never called: the role is read once, at install."""
    calls = []

    class Pretender(Probe):
        def bypass(self, ctx):
            calls.append("bypass")
            return torch.zeros(1)

        def branches(self, step):
            calls.append("branches")
            return ("uncond",)

    with ats.hooks(sd_pipe, Pretender()) as session:
        generate(sd_pipe)
    assert calls == [] and session.interventions == [] and len(session.clients) == 1


def test_a_second_hooks_block_on_the_same_pipeline_is_refused_before_anything_is_written(sd_pipe, tmp_path):
    """Nested blocks were accepted, then failed at the first attention call with advice (set the default
    processor) that would have torn down the outer hooks, leaving two empty stores."""
    outer = ats.Recorder(tmp_path / "n1.zarr")
    with ats.hooks(sd_pipe, outer):
        with pytest.raises(ats.AttnscopeError, match="already has attnscope hooks installed.*in one block"):
            with ats.hooks(sd_pipe, ats.Recorder(tmp_path / "n2.zarr")):
                pass
        sd_pipe("a red circle", **RUN)       # the outer block still works
    assert ats.open_trace(tmp_path / "n1.zarr").complete and not (tmp_path / "n2.zarr").exists()


@pytest.mark.parametrize("after", ["second call", "error after the run", "error after the run, no images added"])
def test_a_recording_whose_run_finished_is_complete_whatever_ends_the_block(sd_pipe, tmp_path, after):
    """Any exception at the end of the block marked a fully written store incomplete (without add_images, also one
    raised after the pipeline returned, although docs/store-format.md said it stays complete)."""
    store = tmp_path / "r.zarr"
    rec = ats.Recorder(store, run_info={"num_inference_steps": RUN["num_inference_steps"]})
    with pytest.raises((ats.AttnscopeError, ValueError)), ats.hooks(sd_pipe, rec):
        if after == "second call":
            sd_pipe("a red circle", **RUN)     # no images added: the second run's start says the first finished
            sd_pipe("a blue square", **RUN)    # "Recorder records one pipeline call"
        elif after == "error after the run":
            rec.add_images(sd_pipe("a red circle", **RUN).images)
            raise ValueError("the user's code after the run")
        else:
            sd_pipe("a red circle", **RUN)
            raise ValueError("the user's code after the run")
    tr = ats.open_trace(store)
    assert tr.complete and tr.steps_written == RUN["num_inference_steps"]
    cut = tmp_path / "cut.zarr"                 # an error inside the run still leaves it incomplete

    class Stop:  # fails inside the last step, after every client was told the step began
        def stages(self, ctx):
            return ("probs",) if ctx.step == RUN["num_inference_steps"] - 1 else ()

        def on_probs(self, ctx, probs):
            raise ValueError("stopped in the last step")

    with pytest.raises(ValueError), ats.hooks(sd_pipe, ats.Recorder(cut), Stop()):
        sd_pipe("a red circle", **RUN)
    with pytest.warns(ats.AttnscopeWarning, match="incomplete"):
        assert not ats.open_trace(cut).complete


def test_every_cross_site_of_a_session_shares_one_set_of_scratch_buffers(sd_pipe):
    """Each cross site had scratch tensors of its own: the memory held grew with the number of sites."""

    class KeepAll:
        def __init__(self):
            self.kept, self.copies = [], []

        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, p):
            self.kept.append(p)          # held across sites of the same map size: never reused under it
            self.copies.append(p.clone())

    keep = KeepAll()
    with ats.hooks(sd_pipe, keep) as session:
        buffers = {id(site.module.processor._buffer) for site in session.sites}
        generate(sd_pipe, num_inference_steps=2)
    assert len(buffers) == 1 and len(session.sites) == 7
    assert len(keep.kept) == 2 * 7
    for kept, copy in zip(keep.kept, keep.copies):
        assert torch.equal(kept, copy)


def _restore_processors(pipe, saved):
    pipe.unet.set_attn_processor(dict(saved))  # it empties the dict it is given
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())


def test_processors_replaced_inside_the_block_are_refused_naming_the_site(sd_pipe, tmp_path):
    """set_attn_processor inside the block silently removed the hooks: the store was marked complete with 0 steps
    written, and on exit only the wrapped sites were put back (attn1 kept the new processor, attn2 the old)."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = sd_pipe.unet.attn_processors
    store = tmp_path / "r.zarr"
    try:
        with pytest.raises(ats.AttnscopeError, match=r"site down_blocks\.0\..*attn2: its attention processor was "
                                                     r"replaced inside .*AttnProcessor.*set the processors before"):
            with ats.hooks(sd_pipe, ats.Recorder(store)):
                sd_pipe.unet.set_attn_processor(AttnProcessor())
                sd_pipe("a red circle", **RUN)
        assert not store.exists()     # refused before the first step: nothing written, nothing marked complete
        # the user's replacement stands everywhere, attn1 and attn2 alike; no attnscope wrapper is left behind
        assert {type(p).__name__ for p in sd_pipe.unet.attn_processors.values()} == {"AttnProcessor"}
        assert not sd_pipe.unet._forward_pre_hooks
    finally:
        _restore_processors(sd_pipe, saved)

    class Replace:  # mid-run, after the first step: the trace stays incomplete
        def stages(self, ctx):
            return ()

        def on_step(self, step):
            if step.step == 1:
                sd_pipe.unet.set_attn_processor(AttnProcessor())

    try:
        with pytest.raises(ats.AttnscopeError, match="replaced inside"):
            with ats.hooks(sd_pipe, ats.Recorder(store), Replace()):
                sd_pipe("a red circle", **RUN)
        with pytest.warns(ats.AttnscopeWarning, match="incomplete"):
            tr = ats.open_trace(store)
        assert not tr.complete and tr.steps_written < RUN["num_inference_steps"]
    finally:
        _restore_processors(sd_pipe, saved)


def test_attention_slicing_is_refused_at_install_naming_the_fix(sd_pipe, tmp_path):
    """It was found mid-run, at the first read of the attention, with advice (set_default_attn_processor) that does
    not name the cause."""
    saved = sd_pipe.unet.attn_processors
    sd_pipe.enable_attention_slicing()
    try:
        with pytest.raises(ats.AttnscopeError, match=r"attention slicing is on \(SlicedAttnProcessor\).*"
                                                     r"pipe\.disable_attention_slicing\(\)"):
            with ats.hooks(sd_pipe, ats.Recorder(tmp_path / "r.zarr")):
                pass
        assert not (tmp_path / "r.zarr").exists()
        assert {type(p).__name__ for p in sd_pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    finally:
        _restore_processors(sd_pipe, saved)


def test_a_compiled_denoiser_gets_one_clear_error():
    """torch.compile(pipe.unet) made `unet or transformer` raise a raw TypeError (a compiled module refuses len())."""
    from attnscope.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    compiled = torch.compile(unet)  # lazy: nothing is compiled until it is called
    with pytest.raises(ats.AttnscopeError, match=r"pipe: got a torch.compile'd UNet2DConditionModel; pass the "
                                                 r"pipeline.*pipe\.unet\.compile\(\)"):
        with ats.hooks(compiled):
            pass
    pipe.unet = compiled
    with pytest.raises(ats.AttnscopeError, match=r"pipe\.unet: a torch.compile'd UNet2DConditionModel.*in place.*"
                                                 r"pipe\.unet\.compile\(\)"):
        with ats.hooks(pipe):
            pass
    pipe.unet = unet
    with ats.hooks(pipe) as session:  # the module itself again: hooked as usual
        assert session.denoiser is unet

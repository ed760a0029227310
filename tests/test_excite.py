"""Attend-and-Excite (the latent-moving baseline) against hand computations, and the hook core's probe calls."""

import math

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.models import evaluate, object_nouns
from attnscope.regulate import AttendAndExcite, default_regulation_sites, excite_loss, smoothing_kernel

PROMPT = "a red circle and a blue square"


@pytest.fixture
def pipe(shapes):
    return shapes


def _call(prompt=PROMPT, seeds=(0,), **kw):
    prompts = prompt if isinstance(prompt, list) else [prompt]
    per = kw.get("num_images_per_prompt", 1)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    assert len(gens) == len(prompts) * per
    return {"prompt": prompt, "generator": gens, "num_inference_steps": 4, "output_type": "np", **kw}


def test_smoothing_kernel_is_the_official_formula():
    # per axis exp(-((x - 1) / (2 * 0.5))^2) = [e^-1, 1, e^-1], normalised; the 2-D kernel is the outer product
    axis = np.array([math.exp(-1), 1.0, math.exp(-1)])
    expected = np.outer(axis, axis) / np.outer(axis, axis).sum()
    np.testing.assert_allclose(smoothing_kernel(3, 0.5).numpy(), expected, rtol=1e-12)
    wide = smoothing_kernel(3, 2.0).numpy()                       # sigma 2: almost flat
    assert wide.max() / wide.min() == pytest.approx(math.exp(2 * 1 / 16), rel=1e-9)


def _loss_by_hand(maps, prompt, targets, temperature=100.0):
    """Independent numpy version: softmax over the prompt's words, reflect-padded 3x3 smoothing by loops, max."""
    maps = np.asarray(maps, float)
    h, w, _ = maps.shape
    z = maps[..., prompt] * temperature
    share = np.exp(z - z.max(-1, keepdims=True))
    share /= share.sum(-1, keepdims=True)
    kernel = smoothing_kernel(3, 0.5).numpy()
    losses = []
    for cols in targets:
        img = sum(share[..., prompt.index(c)] for c in cols)
        padded = np.pad(img, 1, mode="reflect")
        smooth = np.array([[(padded[y:y + 3, x:x + 3] * kernel).sum() for x in range(w)] for y in range(h)])
        losses.append(max(0.0, 1.0 - smooth.max()))
    return max(losses)


def test_excite_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.ones(6), size=(5, 4))                 # (h, w, tokens), rows sum to 1
    prompt, targets = [1, 2, 3, 4], [[2], [3, 4]]                 # a one-piece and a two-piece target
    got = excite_loss(torch.tensor(maps), prompt, targets)
    assert float(got) == pytest.approx(_loss_by_hand(maps, prompt, targets), rel=1e-9)
    low = excite_loss(torch.tensor(maps), prompt, targets, temperature=1.0)  # a milder softmax: lower peaks
    assert float(low) == pytest.approx(_loss_by_hand(maps, prompt, targets, temperature=1.0), rel=1e-9)
    assert float(low) > float(got)


def test_excite_loss_is_zero_only_when_every_target_owns_a_patch():
    maps = torch.full((4, 4, 4), 0.1)
    maps[:2, :, 1] = 0.8                                           # "circle" owns the top half
    maps[2:, :, 2] = 0.8                                           # "square" the bottom half
    assert float(excite_loss(maps, [1, 2], [[1], [2]])) == pytest.approx(0.0, abs=1e-6)
    maps[2:, :, 2] = 0.1                                           # square nowhere: its loss is 1 - 1/2 (a tie)
    assert float(excite_loss(maps, [1, 2], [[1], [2]])) == pytest.approx(0.5, abs=1e-6)


class _Maps:
    """An observer that keeps the conditional probs of some sites, with their graph."""

    def __init__(self, names):
        self.names, self.maps = set(names), []

    def stages(self, ctx):
        return ("probs",) if ctx.site.name in self.names else ()

    def on_probs(self, ctx, probs):
        h, w = ctx.spatial_shape
        self.maps.append(probs.mean(1).view(probs.shape[0], h, w, probs.shape[-1]))


def _gradient_by_hand(pipe, start, scale, timestep, words, targets, **conditioning):
    """Loss and gradient at ``start`` of one UNet call (input ``start * scale``), from an observer's maps of the
    default sites, independently of AttendAndExcite; also how many site maps were averaged."""
    observer = _Maps(default_regulation_sites(ats.discover_sites(pipe), tuple(start.shape[-2:])))
    z = start.clone().requires_grad_(True)
    with ats.hooks(pipe, observer), torch.enable_grad():
        pipe.unet(z * scale, timestep, **conditioning)
        loss = excite_loss(torch.stack(observer.maps).mean(0)[0], words, targets)
        grad, = torch.autograd.grad(loss, z)
    return loss.detach(), grad, len(observer.maps)


def _words_and_nouns(pipe):
    """The word positions of PROMPT and the positions of its circle and square, read from the tokenizer."""
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(PROMPT).input_ids)
    return list(range(1, len(tokens) - 1)), [[tokens.index("circle</w>")], [tokens.index("square</w>")]]


def test_the_first_update_is_minus_step_size_times_the_gradient(pipe):
    """Step 0 without refinement: z' = z - 20 * grad L(z), the gradient computed here on its own."""
    excite = AttendAndExcite(["circle", "square"], steps=[0], thresholds={})
    call = _call()
    excite.prepare(pipe, call)
    moved = call["latents"]
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    start = pipe.prepare_latents(1, 4, side, side, torch.float32, "cpu", [torch.Generator().manual_seed(0)])
    cond = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(4)
    # tokens: <sot> a red circle and a blue square <eot>: the words are 1..7, circle 3, square 7
    loss, grad, maps = _gradient_by_hand(pipe, start, 1.0, pipe.scheduler.timesteps[0], list(range(1, 8)), [[3], [7]],
                                         encoder_hidden_states=cond)
    assert maps == 3
    assert excite.history[0][0][0] == pytest.approx(loss.item(), abs=1e-6)
    torch.testing.assert_close(moved, start - 20.0 * grad, atol=1e-5, rtol=0)
    assert (moved - start).abs().max() > 1e-3


def test_refinement_runs_until_the_threshold_or_the_cap(pipe):
    capped = AttendAndExcite(["circle", "square"], steps=[0], thresholds={0.0: 0.99}, max_refinement=3)
    capped.prepare(pipe, _call())
    free = AttendAndExcite(["circle", "square"], steps=[0], thresholds={})
    free.prepare(pipe, _call())
    before, after = capped.history[0]
    assert before == free.history[0][0]                           # the same first look
    assert after[0] < before[0]                                   # three refinement updates lowered the loss
    easy = AttendAndExcite(["circle", "square"], steps=[0], thresholds={0.0: 0.01}, max_refinement=3)
    easy.prepare(pipe, _call())
    assert easy.history[0] == (before, before)                    # already below 1 - 0.01: no refinement


def test_probe_calls_are_seen_by_the_probing_client_only(pipe):
    class Count:
        def __init__(self):
            self.calls, self.steps = 0, []

        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, probs):
            self.calls += 1

        def on_step(self, step_ctx):
            self.steps.append(step_ctx.step)

    plain = Count()
    with ats.hooks(pipe, plain):
        pipe(**_call())
    excite, beside = AttendAndExcite(["circle", "square"]), Count()
    call = _call()
    excite.prepare(pipe, call)
    with ats.hooks(pipe, excite, beside):
        pipe(**call)
    assert beside.steps == plain.steps == [0, 1, 2, 3]
    assert beside.calls == plain.calls == 4 * 7                   # 4 steps x 7 sites, no probe call among them
    assert sorted(excite.history) == [0, 1]


def test_probe_context_and_nesting(pipe):
    seen = []

    class Look:
        def stages(self, ctx):
            seen.append((ctx.step, ctx.rows.samples, ctx.rows.uncond, ctx.step_context.token_text))
            return ()

    look = Look()
    cond = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    with ats.hooks(pipe, look) as session:
        with session.probe(look):
            pipe.unet(torch.zeros(1, 4, 16, 16), 999, encoder_hidden_states=cond)
            with pytest.raises(AttnscopeError, match="inside another client's probe"), session.probe(object()):
                pass
    assert seen and all(s == (0, 1, None, None) for s in seen)


def test_a_sample_does_not_depend_on_its_batch(pipe):
    prompts = [PROMPT, "a green triangle and a green square", "a blue circle and a red circle"]

    def run(prompt, seeds, probe_batch=None, **kw):
        excite = AttendAndExcite(object_nouns, max_refinement=4, probe_batch=probe_batch)
        call = _call(prompt, seeds, **kw)
        excite.prepare(pipe, call)
        with ats.hooks(pipe, excite):
            return pipe(**call).images, excite.history

    alone, alone_history = run(prompts[2], (12,))
    batch, batch_history = run(prompts, (10, 11, 12))
    np.testing.assert_allclose(batch[2], alone[0], atol=1e-4)
    for step in alone_history:
        assert batch_history[step][1][2] == pytest.approx(alone_history[step][1][0], abs=1e-4)
    one_by_one, one_history = run(prompts, (10, 11, 12), probe_batch=2)      # looks of 2 and 1 images
    np.testing.assert_allclose(one_by_one[2], alone[0], atol=1e-4)
    assert one_history[0][1][2] == pytest.approx(alone_history[0][1][0], abs=1e-4)
    twice, _ = run(prompts[2], (12, 13), num_images_per_prompt=2)
    np.testing.assert_allclose(twice[0], alone[0], atol=1e-4)
    assert np.abs(twice[1] - twice[0]).max() > 0.01                # the second image has its own noise


def test_rerun_with_attend_and_excite_is_reproducible(pipe, tmp_path):
    tr = ats.capture(pipe, PROMPT, seed=3, store=tmp_path / "a.zarr", num_inference_steps=4)
    one = ats.rerun(tr, [AttendAndExcite(["circle", "square"], max_refinement=2)], store=tmp_path / "b.zarr")
    two = ats.rerun(tr, [AttendAndExcite(["circle", "square"], max_refinement=2)], store=tmp_path / "c.zarr")
    assert np.array_equal(np.asarray(one.images[0]), np.asarray(two.images[0]))
    assert not np.array_equal(np.asarray(one.images[0]), np.asarray(tr.images[0]))
    described = one.manifest["interventions"][0]
    assert described["name"] == "AttendAndExcite" and described["params"]["step_size"] == 20.0
    assert one.attention(one.sites[0]).sizes["step"] == 4       # the recorder saw the 4 steps, no probe


def test_eval_names_it(pipe):
    result = evaluate(pipe, "two", n=2, seed=5, interventions=ats.models.named_interventions(["attend-excite"]),
                      num_inference_steps=4, progress=False, bootstrap=10)
    assert result["interventions"] == ["AttendAndExcite('object_nouns')"] and result["n"] == 2


def test_errors_name_the_input(pipe):
    excite = AttendAndExcite(["circle", "square"])
    with pytest.raises(AttnscopeError, match="needs the pipeline call"), ats.hooks(pipe, excite):
        pass
    call = _call()
    excite.prepare(pipe, call)
    with ats.hooks(pipe, excite):
        pipe(**call)
    with pytest.raises(AttnscopeError, match="needs the pipeline call"), ats.hooks(pipe, excite):  # used up
        pass
    call = _call()
    excite.prepare(pipe, call)
    with pytest.raises(AttnscopeError, match="ran without the hooks"):
        pipe(**call)
    with pytest.raises(AttnscopeError, match="already has callback_on_step_end"):
        excite.prepare(pipe, {**_call(), "callback_on_step_end": print})
    with pytest.raises(AttnscopeError, match="'triangle'"):
        AttendAndExcite(["triangle"]).prepare(pipe, _call())
    from attnscope.testing import tiny_flux_pipeline

    with pytest.raises(AttnscopeError, match="expected a UNet pipeline"):
        AttendAndExcite(["circle"]).prepare(tiny_flux_pipeline(), {"prompt": "a red circle"})
    for bad in ({"step_size": 0}, {"max_refinement": -1}, {"thresholds": {10: 0.5}}, {"sigma": 0},
                {"probe_batch": 0}):
        with pytest.raises(AttnscopeError, match=next(iter(bad))):
            AttendAndExcite(["circle"], **bad)


def test_on_euler_the_probe_input_is_scaled_as_the_pipeline_scales_it():
    """Euler-type schedulers scale the model input by 1/sqrt(sigma^2 + 1): the first update is the gradient
    through that scaling (the official code feeds the latent unscaled, right only for DDIM/PNDM)."""
    from attnscope.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(scheduler="euler")
    pipe.set_progress_bar_config(disable=True)
    excite = AttendAndExcite(["circle", "square"], steps=[0], thresholds={})
    call = {"prompt": PROMPT, "generator": torch.Generator().manual_seed(1), "num_inference_steps": 3,
            "height": 32, "width": 32}
    excite.prepare(pipe, call)
    start = pipe.prepare_latents(1, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(3)
    sigma = float(pipe.scheduler.sigmas[0])
    assert sigma > 2 and float(pipe.scheduler.init_noise_sigma) > 2           # a real scaling, not 1
    cond = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    _, grad, _ = _gradient_by_hand(pipe, start, 1 / math.sqrt(sigma**2 + 1), pipe.scheduler.timesteps[0],
                                   *_words_and_nouns(pipe), encoder_hidden_states=cond)
    moved = call["latents"] * pipe.scheduler.init_noise_sigma                 # the pipeline multiplies it back
    torch.testing.assert_close(moved, start - 20.0 * grad, atol=1e-4, rtol=1e-5)
    with ats.hooks(pipe, excite):                                             # and the prepared call runs
        pipe(**call)
    assert sorted(excite.history) == [0]


@pytest.mark.parametrize("scheduler", ["dpm", "euler"])
def test_it_runs_on_multistep_and_euler_schedulers(scheduler):
    from attnscope.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def generate(client=None):
        call = {"prompt": PROMPT, "generator": torch.Generator().manual_seed(2), "num_inference_steps": 4,
                "height": 32, "width": 32, "output_type": "latent"}
        if client is None:
            return pipe(**call).images[0]
        client.prepare(pipe, call)
        with ats.hooks(pipe, client):
            return pipe(**call).images[0]

    excite = AttendAndExcite(["circle", "square"], max_refinement=2)
    moved, plain = generate(excite), generate()
    assert sorted(excite.history) == [0, 1] and torch.isfinite(moved).all()
    assert (moved - plain).abs().max() > 1e-3                                 # the final latents moved (noise: 1e-6)


def test_matches_the_diffusers_reference_pipeline():
    """diffusers' own port of the authors' code (StableDiffusionAttendAndExcitePipeline, deprecated but shipped)
    on the same weights and seed gives the same image. Its softmax runs over positions 1..75 of the 77 (the
    end-of-text and padding included), ours over the prompt's words: a 75-word prompt makes the two the same.
    Its maps are every 8x8 site (down, mid, up): ours are given those sites. Its refinement steps are indices
    of this 10-step run: ours are the default shares 0, 0.2 and 0.4 of it."""
    try:
        from diffusers import StableDiffusionAttendAndExcitePipeline as reference
    except ImportError:
        pytest.skip("this diffusers no longer ships StableDiffusionAttendAndExcitePipeline")
    from attnscope.testing import tiny_sd_pipeline

    ours, theirs = tiny_sd_pipeline(), tiny_sd_pipeline()                  # the same weights (seed 0), two copies
    theirs = reference(**{k: v for k, v in theirs.components.items() if k != "image_encoder"})
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    prompt = " ".join(("a red circle and a blue square " * 11).split()[:75])
    assert len(ours.tokenizer(prompt).input_ids) == 77
    sites = [s.name for s in ats.discover_sites(ours) if s.spatial_shape((16, 16)) == (8, 8)]
    assert len(sites) == 4
    run = dict(num_inference_steps=10, height=32, width=32, output_type="np")
    expected = theirs(prompt, token_indices=[3, 7], attn_res=(8, 8), max_iter_to_alter=5,
                      thresholds={0: 0.05, 2: 0.5, 4: 0.8}, generator=torch.Generator().manual_seed(1), **run).images[0]
    excite = AttendAndExcite(["circle", "square"], sites=sites)
    call = {"prompt": prompt, "generator": torch.Generator().manual_seed(1), **run}
    excite.prepare(ours, call)
    with ats.hooks(ours, excite):
        got = ours(**call).images[0]
    plain = ours(prompt, generator=torch.Generator().manual_seed(1), **run).images[0]
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(plain - expected).max() > 5e-3                              # and it is not the plain image


def test_on_sdxl_the_looks_get_the_pipelines_own_conditioning(sdxl_pipe):
    """SDXL's UNet also needs the pooled text embeddings and the size ids: the first update equals the gradient
    of a UNet call given exactly what the pipeline's first denoiser call got (read here by a plain torch hook)."""
    pipe = sdxl_pipe
    pipe.set_progress_bar_config(disable=True)
    run = {"num_inference_steps": 3, "height": 32, "width": 32}
    seen = {}

    def keep(module, args, kwargs):
        if not seen:
            seen.update(kwargs, sample=args[0], timestep=args[1])

    handle = pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe(PROMPT, generator=torch.Generator().manual_seed(4), output_type="latent", **run)
    finally:
        handle.remove()
    assert set(seen["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    cond = {"encoder_hidden_states": seen["encoder_hidden_states"][1:],
            "added_cond_kwargs": {k: v[1:] for k, v in seen["added_cond_kwargs"].items()}}
    start = pipe.prepare_latents(1, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(4))
    sigma = float(pipe.scheduler.sigmas[0])                                 # Euler: the input is scaled
    torch.testing.assert_close(seen["sample"][1:], start / math.sqrt(sigma**2 + 1))  # the same noise
    excite = AttendAndExcite(["circle", "square"], steps=[0], thresholds={}, step_size=2000.0)  # a visible move
    call = {"prompt": PROMPT, "generator": torch.Generator().manual_seed(4), **run}
    excite.prepare(pipe, call)
    _, grad, _ = _gradient_by_hand(pipe, start, 1 / math.sqrt(sigma**2 + 1), seen["timestep"], *_words_and_nouns(pipe),
                                   **cond)
    moved = call["latents"] * pipe.scheduler.init_noise_sigma                 # the pipeline multiplies it back
    torch.testing.assert_close(moved, start - 2000.0 * grad, atol=1e-4, rtol=1e-5)
    assert (moved - start).abs().max() > 0.02
    with ats.hooks(pipe, excite):
        pipe(**call)
    assert sorted(excite.history) == [0]


@pytest.mark.parametrize("thresholds", [5, {"a": 0.5}, {0.0: "high"}, [(0.0, 0.5)]])
def test_thresholds_not_a_mapping_of_numbers_is_one_error(thresholds):
    """A non-mapping or non-numeric keys/values failed with a raw TypeError (or were taken as a list of pairs)."""
    with pytest.raises(AttnscopeError, match=r"thresholds=.*: expected \{share of the run"):
        AttendAndExcite(["circle"], thresholds=thresholds)


def test_a_prepared_call_run_without_the_hooks_to_its_end_is_used_up(pipe):
    """With only step 0 moved (done in prepare), a prepared call run without the hooks raised nothing and left the
    preparation in place, so a later hooks block for another call installed and silently moved nothing."""
    excite = AttendAndExcite(["circle", "square"], steps=[0])
    call = _call()
    excite.prepare(pipe, call)
    pipe(**call)
    with pytest.raises(AttnscopeError, match="needs the pipeline call"), ats.hooks(pipe, excite):
        pass

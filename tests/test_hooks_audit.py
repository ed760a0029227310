"""The hook core seen by a demanding user and by the author of a new client: run bookkeeping across failed calls,
second-order schedulers, edits made in place, bad client answers, clients given twice, probes, pipelines sharing
modules, and modules changed inside the block."""

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.hooks import RowLayout
from attnscope.testing import tiny_sd3_pipeline

from .conftest import RUN


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


class Steps:
    """Observer of the step contexts only."""

    def __init__(self):
        self.steps = []

    def stages(self, ctx):
        return ()

    def on_step(self, step):
        self.steps.append(step)


def _ids(pipe, prompt):
    tok = pipe.tokenizer
    return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids


def test_a_call_that_failed_before_its_first_step_leaves_its_text_to_no_other_call(sd_pipe):
    """A call that raised after encoding its prompt but before the denoiser ran (here: a generator list of the
    wrong length) left its token ids in the session: the next call of the block was labelled with the failed call's
    prompt, and its own prompt was taken for a negative prompt."""
    seen = Steps()

    def stop(pipe, i, t, tensors):
        if i == 1:
            raise RuntimeError("stopped after step 1")
        return tensors

    with ats.hooks(sd_pipe, seen):
        with pytest.raises(RuntimeError, match="stopped"):       # fails mid-run: steps 0 and 1 were shown
            sd_pipe("a red circle", callback_on_step_end=stop, **RUN)
        with pytest.raises(ValueError, match="generators"):      # fails after encoding, before its first step
            sd_pipe("a green triangle", generator=[torch.Generator().manual_seed(0)] * 2, **RUN)
        sd_pipe("a blue square", **RUN)
    assert [(s.run, s.step) for s in seen.steps] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    last = seen.steps[2:]
    for step in last:
        assert step.token_ids[0].tolist() == _ids(sd_pipe, "a blue square")
        assert step.uncond_token_text[0][1] == "<|endoftext|>"   # the empty negative prompt, not a prompt
        assert "blue</w>" in step.token_text[0] and "triangle</w>" not in step.token_text[0]


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_second_order_scheduler_shows_every_denoiser_call_as_a_step(family, sd_pipe, sd3):
    """Heun calls the denoiser twice per step at a repeated timestep. At SD3 (steps counted by timestep) the second
    call was taken for a second pass of the same step (Flux's true CFG) and hidden: clients saw 3 of 5 calls while
    num_steps said 5 — a Recorder stayed incomplete and interventions edited half the calls."""
    from diffusers import FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler

    pipe = sd_pipe if family == "sd" else sd3
    heun = HeunDiscreteScheduler if family == "sd" else FlowMatchHeunDiscreteScheduler
    saved, calls = pipe.scheduler, []
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    handle = denoiser.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    pipe.scheduler = heun.from_config(saved.config)
    seen = Steps()
    try:
        with ats.hooks(pipe, seen):
            pipe("a red circle", **RUN)
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
    finally:
        pipe.scheduler = saved
        handle.remove()
    n = RUN["num_inference_steps"]
    assert len(calls) == len(timesteps) == 2 * n - 1                # the scheduler's 2N − 1 denoiser calls
    assert [s.step for s in seen.steps] == list(range(2 * n - 1))
    assert {s.num_steps for s in seen.steps} == {2 * n - 1}
    assert [s.timestep for s in seen.steps] == pytest.approx(timesteps)


class InPlace:
    """Intervention that edits the tensor it is handed in place, then returns it (or a fresh edited copy)."""

    role = "intervention"

    def __init__(self, stage, fresh=False):
        self.stage, self.fresh = stage, fresh

    def stages(self, ctx):
        return (self.stage,)

    def on_logits(self, ctx, t):
        t = t.clone() if self.fresh else t
        t[..., 1] += 5.0
        return t

    def on_probs(self, ctx, t):
        t = t.clone() if self.fresh else t
        t.mul_(0.0)[..., 1] = 1.0
        return t


@pytest.mark.parametrize("stage", ["logits", "probs"])
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_an_edit_made_in_place_and_returned_is_an_edit(stage, family, sd_pipe, sd3):
    """The processors told an edit by the identity of the returned tensor: returning the tensor one was handed,
    edited in place, was taken for "nothing changed" — the edit was dropped with exact=True at cross sites and
    always at joint sites (SD3, Flux), where the output then came from the unedited kernel."""
    pipe = sd_pipe if family == "sd" else sd3

    def image(client, exact):
        kw = {**RUN, "num_inference_steps": 2}
        with ats.hooks(pipe, client, exact=exact):
            return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kw).images

    plain = image(Steps(), False)
    for exact in (False, True):
        fresh = image(InPlace(stage, fresh=True), exact)
        assert np.abs(fresh - plain).max() > 1e-3                    # the edit shows in the image
        np.testing.assert_array_equal(image(InPlace(stage), exact), fresh)


def test_a_client_that_returns_no_tensor_gets_one_error_naming_it(sd_pipe):
    class Numpy:
        role = "intervention"

        def stages(self, ctx):
            return ("probs",)

        def on_probs(self, ctx, t):
            return t.detach().numpy()                                # same shape, not a tensor

    with pytest.raises(ats.AttnscopeError, match=r"returned ndarray at stage 'probs' of down_blocks.*expected None "
                                                 r"or a tensor of shape"):
        with ats.hooks(sd_pipe, Numpy()):
            sd_pipe("a red circle", **RUN)


@pytest.mark.parametrize("answer", ["probs", None, 3])
def test_stages_that_are_no_collection_get_one_error_naming_the_answer(sd_pipe, answer):
    """``return "probs"`` (no tuple) was read letter by letter: "unknown stage 'p'"; None raised a bare TypeError."""

    class Client:
        def stages(self, ctx):
            return answer

        def on_probs(self, ctx, t):
            pass

    with pytest.raises(ats.AttnscopeError, match=rf"stages\(\) returned {answer!r} at down_blocks.*expected a "
                                                 rf"collection of .* such as \('probs',\)"):
        with ats.hooks(sd_pipe, Client()):
            sd_pipe("a red circle", **RUN)


def test_a_client_given_twice_is_refused_before_anything_is_installed(sd_pipe, tmp_path):
    """It saw every call twice: a Recorder wrote each map twice, an intervention edited twice."""
    rec = ats.Recorder(tmp_path / "r.zarr")
    before = {name: m.__dict__.get("processor") for name, m in sd_pipe.unet.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ats.AttnscopeError, match="is given twice"):
        with ats.hooks(sd_pipe, rec, Steps(), rec):
            pass
    after = {name: m.__dict__.get("processor") for name, m in sd_pipe.unet.named_modules() if hasattr(m, "processor")}
    assert after == before and not (tmp_path / "r.zarr").exists()
    steps = Steps()
    with ats.hooks(sd_pipe, steps, Steps()):                        # two clients of one class are two clients
        sd_pipe("a red circle", **RUN)
    assert [s.step for s in steps.steps] == list(range(RUN["num_inference_steps"]))


def test_a_probe_needs_a_client_of_the_block(sd_pipe):
    """A probe by an object not installed showed its calls to no client at all, silently."""
    with ats.hooks(sd_pipe, Steps()) as session:
        with pytest.raises(ats.AttnscopeError, match=r"probe\(\) needs a client installed in this block"):
            with session.probe(Steps()):
                pass
        assert session._probing is None


def test_row_layout_names_an_unknown_branch():
    """Any name but "cond" gave the unconditional rows."""
    layout = RowLayout.for_batch(batch=4, guidance=True, num_prompts=1)
    assert layout.rows("uncond") == slice(0, 2) and layout.rows("cond") == slice(2, 4)
    with pytest.raises(ats.AttnscopeError, match=r"branch='conditional': expected 'cond' or 'uncond'"):
        layout.rows("conditional")
    with pytest.raises(ats.AttnscopeError, match="no unconditional rows"):
        RowLayout.for_batch(batch=2, guidance=False, num_prompts=1).rows("uncond")


def test_another_pipeline_sharing_the_denoiser_is_refused(sd_pipe):
    """A pipeline built from the hooked one's components ran through the same denoiser, but the core read steps and
    guidance from the hooked pipeline: a guided batch of one image was described as two unguided samples."""
    from diffusers import StableDiffusionPipeline

    other = StableDiffusionPipeline(**sd_pipe.components)
    seen = Steps()
    with ats.hooks(sd_pipe, seen):
        with pytest.raises(ats.AttnscopeError, match=r"called by a StableDiffusionPipeline that is not the pipeline "
                                                     r"given to `ats.hooks\(pipe, ...\)`.*install them on the pipeline"):
            other("a red circle", **RUN)
        assert seen.steps == []
        sd_pipe("a red circle", **RUN)                             # the hooked pipeline itself runs as usual
    assert [(s.step, s.rows.uncond) for s in seen.steps] == [(i, slice(0, 1)) for i in range(RUN["num_inference_steps"])]


def test_children_changed_inside_the_block_stay_after_it(sd_pipe):
    """Exit put back the attention module's whole child list as it was at install: a projection replaced inside the
    block (a LoRA layer, a fused projection) was silently taken away again."""
    with ats.hooks(sd_pipe, Steps()) as session:
        module = session.sites[0].module
        original, wrapper = module.to_q, module.processor
        replacement = torch.nn.Linear(original.in_features, original.out_features, bias=False)
        module.to_q = replacement
    try:
        assert module.to_q is replacement and module.processor is not wrapper
        assert list(module._modules) == ["to_q", "to_k", "to_v", "to_out"]
    finally:
        module.to_q = original

"""Interventions on runs whose steps are not "N steps, CFG on" (audit): Heun (2N − 1 denoiser steps), PNDM (N + 1),
DPM-Solver++, Euler ancestral, an Euler ``sigmas=`` list (one fewer), img2img with ``strength``, no CFG, a CFG cutoff
callback and an interrupted run. The expectations come from a plain torch forward pre-hook that counts the
denoiser's calls and from observers placed before and after an intervention (which calls it edited)."""

import contextlib
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers.callbacks import SDCFGCutoffCallback

import attnscope as ats
from attnscope.errors import AttnscopeWarning
from attnscope.regulate import AttentionRegulation, Reweight, SpatialTemporal, TGate
from attnscope.selection import select_steps

PROMPT = "a red circle and a blue square"
LAYOUT = {"circle": (0.0, 0.0, 0.5, 1.0), "square": (0.5, 0.0, 1.0, 1.0)}
SIGMAS = [14.6, 5.0, 2.0, 0.8, 0.3]


def _scheduler(pipe, name):
    config = pipe.scheduler.config
    if name == "heun":
        return diffusers.HeunDiscreteScheduler.from_config(config)
    if name == "pndm":
        return diffusers.PNDMScheduler.from_config(config, skip_prk_steps=True)
    if name == "dpm":
        return diffusers.DPMSolverMultistepScheduler.from_config(config)
    if name == "ancestral":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    return diffusers.EulerDiscreteScheduler.from_config(config)


@contextlib.contextmanager
def scheduled(pipe, name):
    """``pipe`` with another scheduler for the block, put back after it."""
    saved = pipe.scheduler
    pipe.scheduler = _scheduler(pipe, name)
    try:
        yield pipe
    finally:
        pipe.scheduler = saved


CASES = {"heun": {"num_inference_steps": 4}, "pndm": {"num_inference_steps": 4}, "dpm": {"num_inference_steps": 4},
         "ancestral": {"num_inference_steps": 4}, "sigmas": {"sigmas": SIGMAS}}


def _call(**kwargs):
    return {"prompt": PROMPT, "generator": torch.Generator().manual_seed(0), "output_type": "np", **kwargs}


def _img2img(pipe):
    out = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out


def _init_image():
    return np.random.default_rng(3).random((1, 32, 32, 3)).astype(np.float32)


class _Seen:
    """Keeps every logits/probs tensor it is shown, by (step, site, stage)."""

    role = "observer"

    def __init__(self):
        self.seen = {}

    def stages(self, ctx):
        return ("logits", "probs")

    def on_logits(self, ctx, tensor):
        self.seen[(ctx.step, ctx.site.name, "logits")] = tensor.detach().clone()

    def on_probs(self, ctx, tensor):
        self.seen[(ctx.step, ctx.site.name, "probs")] = tensor.detach().clone()


class _SeenFirst(_Seen):
    """The same, run before the intervention (interventions run before observers, in the order given)."""

    role = "intervention"


def _edited_steps(pipe, intervention, **kwargs):
    """``(denoiser calls counted by a plain pre-hook, the steps at which ``intervention`` changed a tensor)``."""
    before, after, calls = _SeenFirst(), _Seen(), []
    with ats.hooks(pipe, before, intervention, after):
        handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            pipe(**_call(**kwargs))
        finally:
            handle.remove()
    edited = sorted({key[0] for key in before.seen if not torch.equal(before.seen[key], after.seen[key])})
    return len(calls), edited


def _count_calls(pipe, **kwargs):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        pipe(**_call(**kwargs))
    finally:
        handle.remove()
    return calls


# -- the step specs of Reweight and AttentionRegulation count the denoiser's steps --------------------------------

@pytest.mark.parametrize("name", ["heun", "pndm", "sigmas"])
@pytest.mark.parametrize("steps", ["first_half", slice(-2, None), -1, [0, 2]])
def test_scope_steps_are_the_denoiser_calls(shapes, name, steps):
    with scheduled(shapes, name):
        calls, edited = _edited_steps(shapes, Reweight("circle", 3.0, steps=steps), **CASES[name])
    expected = list(range((calls + 1) // 2)) if steps == "first_half" else list(select_steps(steps, calls))
    assert calls != 4 or name == "sigmas"  # Heun 7, PNDM 5: not num_inference_steps
    assert edited == expected


def test_regulation_steps_on_img2img(shapes):
    pipe = _img2img(shapes)
    reg = AttentionRegulation(["circle", "square"], steps=slice(-2, None), iterations=2)
    calls, edited = _edited_steps(pipe, reg, num_inference_steps=8, strength=0.5, image=_init_image())
    assert calls == 4 and edited == [2, 3]


# -- TGate: a fraction is resolved on the denoiser steps the call runs ----------------------------------------------

@pytest.mark.parametrize("name", ["heun", "pndm", "sigmas"])
def test_tgate_fraction_on_a_rerun_uses_the_run_steps(shapes, name, tmp_path):
    with scheduled(shapes, name):
        calls = len(_count_calls(shapes, **CASES[name]))
        tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", **CASES[name])
        gate = TGate(0.7)
        out = ats.rerun(tr, interventions=[gate], store=tmp_path / "b.zarr")
    first = round(0.7 * calls)
    assert gate.gated_steps == list(range(first, calls))
    assert out.manifest["interventions"][0]["params"]["gate_step"] == first


def test_tgate_prepare_on_img2img_and_pndm(shapes):
    pipe = _img2img(shapes)
    call = _call(num_inference_steps=8, strength=0.5, image=_init_image())
    calls = len(_count_calls(pipe, num_inference_steps=8, strength=0.5, image=_init_image()))
    gate = TGate(0.5)
    gate.prepare(pipe, call)
    with ats.hooks(pipe, gate):
        pipe(**call)
    assert calls == 4 and gate.gated_steps == [2, 3]
    with scheduled(shapes, "pndm"):  # 4 steps are 5 denoiser steps: a gate of 5 runs them all in full
        gate = TGate(5)
        call = _call(num_inference_steps=4)
        gate.prepare(shapes, call)
        with ats.hooks(shapes, gate):
            shapes(**call)
    assert gate.gate_step == 5 and gate.gated_steps == []


def test_tgate_without_guidance_and_through_a_cutoff(shapes):
    """No CFG: nothing to drop, the batch stays one row; a cutoff before the gate: the batch the callback left."""
    gate = TGate(2)
    with ats.hooks(shapes, gate):
        batches = _count_calls(shapes, num_inference_steps=4, guidance_scale=1.0)
    assert batches == [1, 1, 1, 1] and gate.gated_steps == [2, 3]
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    with ats.hooks(shapes, gate):
        batches = _count_calls(shapes, num_inference_steps=4, callback_on_step_end=cutoff)
    assert batches == [2, 1, 1, 1] and gate.gated_steps == [2, 3]


# -- SpatialTemporal through a CFG cutoff ---------------------------------------------------------------------------

def test_spatial_after_a_cfg_cutoff_adds_nothing_and_does_not_fail(shapes, tmp_path):
    def run(control, recorder=None):
        cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
        clients = [control] + ([recorder] if recorder is not None else [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ats.hooks(shapes, *clients):
                image = shapes(**_call(num_inference_steps=5, callback_on_step_end=cutoff)).images[0]
        return image, [w for w in caught if issubclass(w.category, AttnscopeWarning)]

    recorder = ats.Recorder(tmp_path / "st.zarr")
    image, said = run(SpatialTemporal(LAYOUT), recorder)
    assert len(said) == 1 and "step 2" in str(said[0].message)
    until_cutoff, _ = run(SpatialTemporal(LAYOUT, steps=[0, 1]))
    assert np.abs(image - until_cutoff).max() < 1e-5  # steps 0, 1 controlled, nothing after (the recorder: rounding)
    plain = shapes(**_call(num_inference_steps=5, callback_on_step_end=SDCFGCutoffCallback(
        cutoff_step_ratio=None, cutoff_step_index=1))).images[0]
    assert np.abs(image - plain).max() > 1e-3  # it did act before the cutoff
    tr = ats.open_trace(tmp_path / "st.zarr")
    assert tr.attention(tr.sites[0]).sizes["step"] == 5


def test_interrupted_run_then_a_full_one(shapes):
    """A run interrupted after step 1 stops there; the next run starts from step 0 with every step."""
    def stop(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    reweight = Reweight("circle", 3.0, steps=slice(-2, None))
    calls, edited = _edited_steps(shapes, reweight, num_inference_steps=4, callback_on_step_end=stop)
    assert calls == 2 and edited == []  # its steps 2, 3 never came
    calls, edited = _edited_steps(shapes, reweight, num_inference_steps=4)
    assert calls == 4 and edited == [2, 3]


# -- the risk gate's decision step beside TGate ---------------------------------------------------------------------

@pytest.mark.parametrize("gate", [2, 0.5])
def test_risk_decision_at_a_gated_step_fails_before_the_store(shapes, gate, tmp_path):
    """TGate computes no maps from its gate on: a decision there is one error at step 0, before a Recorder writes
    (it was a mid-run error saying the run never reached the step, after the store was created)."""
    reg = AttentionRegulation(["circle", "square"], steps=None, iterations=2,
                              when=ats.regulate.risk_above(0.0, step=3))
    with pytest.raises(ats.AttnscopeError, match=r"risk_above\(step=3\): TGate.*from step [23] on") as err:
        with ats.hooks(shapes, TGate(gate), reg, ats.Recorder(tmp_path / "x.zarr")):
            shapes(**_call(num_inference_steps=6))
    assert "never reached" not in str(err.value)
    assert not (tmp_path / "x.zarr").exists()
    before = AttentionRegulation(["circle", "square"], steps=None, iterations=2,
                                 when=ats.regulate.risk_above(0.0, step=1))
    tgate = TGate(gate)
    with ats.hooks(shapes, before, tgate):  # a decision before the gate still works
        shapes(**_call(num_inference_steps=6))
    assert before.when.at_risk == [True] and tgate.gated_steps == list(range(tgate.gate_step, 6))


# -- AttentionRegulation's temporal smoothing through a CFG cutoff ------------------------------------------------

class _CondLogits:
    """The conditional rows' logits at every regulated call, by (step, site)."""

    role = "observer"

    def __init__(self):
        self.seen = {}

    def stages(self, ctx):
        return ("logits",)

    def on_logits(self, ctx, tensor):
        self.seen[(ctx.step, ctx.site.name)] = tensor[ctx.rows.cond].detach().clone()


class _CondLogitsFirst(_CondLogits):
    role = "intervention"


def _regulation_edits(pipe, **kwargs):
    """Per (step, site): what AttentionRegulation added to the conditional logits. With a vanishing ``lr`` the edit
    is its seeded start Δ smoothed over the steps, which does not depend on the logits (so not on guidance)."""
    before, after = _CondLogitsFirst(), _CondLogits()
    reg = AttentionRegulation(["circle", "square"], steps=None, lr=1e-12, iterations=1)
    with ats.hooks(pipe, before, reg, after):
        pipe(**_call(num_inference_steps=4, output_type="latent", **kwargs))
    return {key: after.seen[key] - before.seen[key] for key in before.seen}


def test_regulation_smoothing_continues_through_a_cfg_cutoff(shapes):
    """After the cutoff the cond row of a sample is row 0, not row 1: its Δ_prev is still its own (it restarted from
    the start Δ: edits off by 0.2 of ~1.2 at the step after the cutoff)."""
    plain = _regulation_edits(shapes)
    unguided = _regulation_edits(shapes, guidance_scale=1.0)  # the edit does not depend on guidance (the premise)
    cut = _regulation_edits(shapes, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None,
                                                                             cutoff_step_index=1))
    assert max(float(v.abs().max()) for v in plain.values()) > 0.5
    for key, edit in plain.items():
        assert float((unguided[key] - edit).abs().max()) < 1e-5, key
        assert float((cut[key] - edit).abs().max()) < 1e-5, key


# -- a steps error on a run whose steps are not num_inference_steps says which count it is --------------------------

def test_steps_errors_name_the_denoiser_step_count(shapes, tmp_path):
    with scheduled(shapes, "heun"):
        calls = len(_count_calls(shapes, num_inference_steps=4))  # 7: the count the note must give
        for client in (Reweight("circle", 2.0, steps=calls + 1), TGate(calls + 2)):
            with pytest.raises(ats.AttnscopeError) as err:
                with ats.hooks(shapes, client):
                    shapes(**_call(num_inference_steps=4))
            assert f"denoiser steps of the run: {calls} for num_inference_steps=4 (HeunDiscreteScheduler" in str(err.value)
        tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "h.zarr", num_inference_steps=4)
        with pytest.raises(ats.AttnscopeError, match=f"gate_step={calls + 2} on a run of {calls} steps.*"
                                                     f"num_inference_steps=4"):
            ats.rerun(tr, interventions=[TGate(calls + 2)], store=tmp_path / "g.zarr")
    assert not (tmp_path / "g.zarr").exists()

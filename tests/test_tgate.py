"""TGATE (seed 002) against the official schedule (docs/tgate.md, "The algorithm, from the official code"): cache, CFG cut, V2 intervals."""

from collections import defaultdict

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.hooks import discover_self_sites
from attnscope.regulate import TGate
from attnscope.testing import tiny_sdxl_pipeline

PROMPT = "a red circle and a blue square"
STEPS, GATE = 8, 3


@pytest.fixture(scope="module")
def pipe():
    p = ats.load_pipeline("shapes")
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, *clients, images=1, steps=STEPS, **kwargs):
    """Generate with ``clients`` installed; return the latents after each step and the image."""
    latents = []

    def keep(_pipe, step, timestep, callback_kwargs):
        latents.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    with ats.hooks(pipe, *clients):
        out = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                   num_images_per_prompt=images, callback_on_step_end=keep, **kwargs)
    return latents, out.images


class _Counter:
    """Counts, per step, the rows that reach given submodules' forward (a module attends only if its to_q runs)."""

    def __init__(self, pipe, modules):
        self.pipe, self.modules, self.step = pipe, modules, -1
        self.rows: dict[str, dict[int, int]] = defaultdict(dict)

    def __enter__(self):
        hooks = [self.pipe.unet.register_forward_pre_hook(self._on_step)]
        for name, module in self.modules.items():
            hooks.append(module.register_forward_pre_hook(self._counter(name)))
        self.hooks = hooks
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def _on_step(self, module, args):
        self.step += 1

    def _counter(self, name):
        def count(module, args):
            self.rows[name][self.step] = int(args[0].shape[0])
        return count


def test_steps_before_the_gate_are_identical_and_after_it_differ(pipe):
    plain, plain_image = _run(pipe)
    gated, gated_image = _run(pipe, TGate(GATE))
    for step in range(GATE):
        assert torch.equal(plain[step], gated[step]), step
    assert all(not torch.equal(plain[s], gated[s]) for s in range(GATE, STEPS))
    assert not np.array_equal(plain_image, gated_image)
    assert np.abs(plain_image - gated_image).mean() < 0.1  # the same picture, refined without text


def test_after_the_gate_cross_attention_is_not_computed_and_the_batch_is_one_row_per_image(pipe):
    sites = ats.discover_sites(pipe)
    modules = {s.name: s.module.to_q for s in sites} | {"unet": pipe.unet.conv_in}
    gate = TGate(GATE)
    with _Counter(pipe, modules) as counter:
        _run(pipe, gate, images=2)
    for site in sites:
        assert sorted(counter.rows[site.name]) == list(range(GATE)), site.name  # attended only before the gate
        assert gate.computed[site.name] == list(range(GATE))
    assert counter.rows["unet"] == {s: (4 if s < GATE else 2) for s in range(STEPS)}  # 2 images: CFG 4 rows, then 2
    assert gate.gated_steps == list(range(GATE, STEPS))


def test_the_cache_is_the_mean_of_the_two_branches_at_the_last_full_step(pipe):
    class Keep:
        role = "observer"
        outputs = {}

        def stages(self, ctx):
            return ("output",) if ctx.step == GATE - 1 else ()

        def on_output(self, ctx, output):
            self.outputs[ctx.site.name] = output.clone()

    keep, gate = Keep(), TGate(GATE)
    _run(pipe, gate, keep, images=2)
    assert set(gate.cache) == set(keep.outputs) == {s.name for s in ats.discover_sites(pipe)}
    for name, out in keep.outputs.items():
        assert out.shape[0] == 4
        assert torch.equal(gate.cache[name], (out[:2] + out[2:]) / 2)


def test_after_the_gate_the_pipeline_gets_the_unconditional_prediction_unguided(pipe):
    """The denoiser's output reaches the pipeline in both CFG halves, so guidance returns it unchanged."""
    halves = {}

    def look(module, args, kwargs, output):
        prediction = output[0] if isinstance(output, tuple) else output.sample
        halves[len(halves)] = prediction.shape[0], torch.equal(*prediction.chunk(2))

    class LookAfterTheCore:  # registered once the core's hooks are in, so it sees what the pipeline gets
        role = "observer"

        def stages(self, ctx):
            return ()

        def on_install(self, session):
            self.handle = pipe.unet.register_forward_hook(look, with_kwargs=True)

        def on_remove(self, error):
            self.handle.remove()

    _run(pipe, TGate(GATE), LookAfterTheCore())
    assert halves == {s: (2, s >= GATE) for s in range(STEPS)}


def test_drop_guidance_false_keeps_the_cfg_batch_and_serves_the_cache(pipe):
    modules = {"unet": pipe.unet.conv_in}
    gate = TGate(GATE, drop_guidance=False)
    with _Counter(pipe, modules) as counter:
        kept, _ = _run(pipe, gate)
    dropped, _ = _run(pipe, TGate(GATE))
    assert counter.rows["unet"] == {s: 2 for s in range(STEPS)}
    assert gate.gated_steps == list(range(GATE, STEPS)) and all(gate.computed[n] == list(range(GATE)) for n in gate.computed)
    assert torch.equal(kept[GATE - 1], dropped[GATE - 1])
    # the text enters this UNet only through cross-attention: with the cache in both halves they predict
    # the same, so guidance changes nothing and keeping the CFG batch gives the cut run's latents
    for step in range(GATE, STEPS):
        torch.testing.assert_close(kept[step], dropped[step], rtol=0, atol=1e-4)


def test_v2_schedule_by_hand():
    # official SDXL V2 settings at 25 steps: gate 10, sp_interval 5, warm_up 2, fi_interval 1
    gate = TGate(10, sp_interval=5, warm_up=2, fi_interval=1)
    reused = [s for s in range(25) if not gate.self_attention_computed(s)]
    assert reused == [3, 4, 6, 7, 8]       # 0, 1 warm-up; 2 = warm_up caches; 5 refreshes; 9 = gate - 1 refreshes
    gate = TGate(8, sp_interval=3, warm_up=1, fi_interval=4)
    assert [s for s in range(16) if not gate.self_attention_computed(s)] == [2, 4, 5, 9, 10, 11, 13, 14, 15]
    assert [s for s in range(12) if not TGate(5).self_attention_computed(s)] == []  # V1 never reuses self-attention


def test_v2_self_attention_skips_exactly_the_scheduled_steps(pipe):
    self_sites = discover_self_sites(pipe)
    gate = TGate(GATE + 2, sp_interval=2, warm_up=1, fi_interval=2)
    modules = {s.name: s.module.to_q for s in self_sites}
    with _Counter(pipe, modules) as counter:
        plain_v1, _ = _run(pipe, TGate(GATE + 2))
    with _Counter(pipe, modules) as counter:
        latents, _ = _run(pipe, gate)
    expected = [s for s in range(STEPS) if gate.self_attention_computed(s)]
    assert expected == [0, 1, 2, 4, 6] and expected != list(range(STEPS))
    for site in self_sites:
        assert sorted(counter.rows[site.name]) == expected, site.name
        assert gate.computed[site.name] == expected
    assert torch.equal(latents[1], plain_v1[1]) and not torch.equal(latents[3], plain_v1[3])  # step 3 reused
    for site in self_sites:  # processors are back after the block
        assert type(site.module.processor).__name__ != "SelfAttentionProcessor"


def test_sdxl_cuts_every_batched_input_including_text_time_conditioning():
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    text = {}

    def look(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        seen[len(seen)] = (args[0].shape[0], kwargs["encoder_hidden_states"].shape[0], added["text_embeds"].shape[0],
                           added["time_ids"].shape[0])
        text[len(text)] = (kwargs["encoder_hidden_states"].clone(), added["text_embeds"].clone())

    with ats.hooks(pipe, TGate(2)):
        handle = pipe.unet.register_forward_pre_hook(look, with_kwargs=True)  # runs after the core's: sees the cut
        try:
            pipe("a red circle", num_inference_steps=4, height=32, width=32, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0))
        finally:
            handle.remove()
    assert seen == {0: (2, 2, 2, 2), 1: (2, 2, 2, 2), 2: (1, 1, 1, 1), 3: (1, 1, 1, 1)}
    for full, cut in zip(text[0], text[3]):  # the rows kept are the unconditional half, as in the official code
        assert torch.equal(cut, full[:1]) and not torch.equal(cut, full[1:])


def test_without_guidance_nothing_is_cut_but_the_cache_is_served(pipe):
    modules = {"unet": pipe.unet.conv_in}
    gate = TGate(GATE)
    with _Counter(pipe, modules) as counter:
        _run(pipe, gate, guidance_scale=1.0)
    assert counter.rows["unet"] == {s: 1 for s in range(STEPS)}
    assert all(steps == list(range(GATE)) for steps in gate.computed.values())


def test_gate_beyond_the_run_changes_nothing(pipe):
    plain, image = _run(pipe)
    gated, gated_image = _run(pipe, TGate(STEPS))
    assert np.array_equal(image, gated_image)


def test_bad_input():
    for bad in (0, -1, 2.5, True, "soon"):
        with pytest.raises(AttnscopeError, match="gate_step"):
            TGate(bad)
    with pytest.raises(AttnscopeError, match="reference"):
        TGate("auto")
    with pytest.raises(AttnscopeError, match="reference"):
        TGate(5, reference="runs/a.zarr")
    with pytest.raises(AttnscopeError, match="sp_interval"):
        TGate(5, sp_interval=0)
    with pytest.raises(AttnscopeError, match="fi_interval"):
        TGate(5, sp_interval=2, fi_interval=0)


def test_describe_is_json():
    import json

    d = TGate(7, sp_interval=3).describe()
    assert json.loads(json.dumps(d)) == {"name": "TGate", "params": {"gate_step": 7, "drop_guidance": True,
                                                                      "sp_interval": 3, "warm_up": 2, "fi_interval": 1}}


def test_a_fraction_gates_at_that_share_of_each_runs_steps(pipe):
    gate = TGate(0.4)
    _run(pipe, gate, steps=10)
    assert gate.gate_step == 4 and gate.gated_steps == list(range(4, 10))
    _run(pipe, gate, steps=5)
    assert gate.gate_step == 2 and gate.gated_steps == [2, 3, 4]
    assert gate.describe()["params"]["fraction"] == 0.4


# -- composition: capture in the same call, reruns, the CLI ------------------------------------------------
@pytest.fixture(scope="module")
def parent(pipe, tmp_path_factory):
    store = tmp_path_factory.mktemp("tgate") / "a.zarr"
    return ats.capture(pipe, PROMPT, seed=0, store=store, num_inference_steps=STEPS, output_change=True)


def test_capture_in_the_same_call_marks_the_gated_steps(pipe, tmp_path):
    recorder = ats.Recorder(tmp_path / "g.zarr", run_info={"num_inference_steps": STEPS})
    with ats.hooks(pipe, TGate(GATE), recorder):
        out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        recorder.add_images(out.images)
    tr = ats.open_trace(recorder.path)
    assert tr.complete and tr.gated_steps == list(range(GATE, STEPS))
    maps = tr.attention(tr.sites[0]).values
    assert np.isfinite(maps[:GATE]).all() and np.isnan(maps[GATE:]).all()


def test_rerun_with_tgate_records_the_intervention_and_the_gate(parent, tmp_path):
    gated = ats.rerun(parent, [TGate(GATE)], store=tmp_path / "t.zarr")
    assert gated.manifest["interventions"][0]["name"] == "TGate"
    assert gated.manifest["interventions"][0]["params"]["gate_step"] == GATE
    assert gated.gated_steps == list(range(GATE, STEPS))
    before, after = parent.attention(parent.sites[0]).values, gated.attention(gated.sites[0]).values
    assert np.array_equal(before[:GATE], after[:GATE])  # the maps before the gate are the parent's
    assert not np.array_equal(np.asarray(gated.images[0]), np.asarray(parent.images[0]))


def test_auto_gate_step_comes_from_the_reference_trace(parent):
    suggested = ats.stats.suggest_gate_step(parent, tol=0.5)
    assert 1 <= suggested < STEPS
    assert TGate("auto", reference=parent, tol=0.5).gate_step == suggested


def test_rerun_command_with_tgate(parent, tmp_path):
    from typer.testing import CliRunner

    from attnscope.cli import app

    out = tmp_path / "cli.zarr"
    done = CliRunner().invoke(app, ["rerun", str(parent.path), "--tgate", str(GATE), "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "TGate" in done.output and ats.open_trace(out).gated_steps == list(range(GATE, STEPS))
    bad = CliRunner().invoke(app, ["rerun", str(parent.path), "--tgate", "soon", "-o", str(tmp_path / "x.zarr")])
    assert bad.exit_code != 0 and "--tgate 'soon'" in bad.output


def test_a_rerun_keeps_the_output_summaries_of_its_parent(parent, tmp_path):
    gated = ats.rerun(parent, [TGate(GATE)], store=tmp_path / "s.zarr")
    assert gated.manifest["capture"]["output_change"] is True
    summary = gated.output_change()
    assert summary is not None
    before = parent.output_change()["output_norm"].values
    assert np.array_equal(summary["output_norm"].values[:GATE], before[:GATE])  # the same outputs up to the gate


def test_compare_with_a_gated_rerun_uses_the_steps_both_computed(parent, tmp_path):
    gated = ats.rerun(parent, [TGate(GATE)], store=tmp_path / "c.zarr")
    c = ats.compare(parent, gated, ["circle", "square"])
    assert c.stats.step.values.tolist() == list(range(GATE))
    assert np.isfinite(c.stats.target_share.values).all()
    assert float(abs(c.stats.target_share).max()) == 0.0  # before the gate the two runs are the same
    assert np.isfinite(c.shares().to_numpy()).all()
    fig = c.figure()
    assert all(np.isfinite(im.get_array()).all() for ax in fig.axes for im in ax.images)


class _AddToOutput:
    """An intervention that adds ``value`` to every cross-attention output."""

    role = "intervention"

    def __init__(self, value):
        self.value = value

    def stages(self, ctx):
        return ("output",)

    def on_output(self, ctx, output):
        return output + self.value


class _Outputs:
    """Keeps each cross-attention call's final output, per (site, step)."""

    def __init__(self):
        self.seen = {}

    def stages(self, ctx):
        return ("output",)

    def on_output(self, ctx, output):
        self.seen[ctx.site.name, ctx.step] = output.clone()


@pytest.mark.parametrize("make", [lambda: _AddToOutput(0.5), lambda: ats.regulate.SpatialTemporal(weights=1.0)],
                         ids=["add-to-output", "spatial-temporal"])
def test_a_cached_output_is_not_edited_again_after_the_gate(pipe, make):
    """With the CFG batch kept (drop_guidance=False), a gated call's output is the cache as it was taken, the edits of
    the interventions installed before TGate included once: they do not act again on the cache at each gated step."""
    seen = _Outputs()
    _run(pipe, make(), TGate(GATE, drop_guidance=False), seen, steps=STEPS)
    sites = {name for name, _ in seen.seen}
    for name in sites:
        last = seen.seen[name, GATE - 1]
        half = last.shape[0] // 2
        cache = (last[:half] + last[half:]) / 2
        for step in range(GATE, STEPS):
            torch.testing.assert_close(seen.seen[name, step], torch.cat([cache, cache]), rtol=0, atol=0)

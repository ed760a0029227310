"""SpatialTemporal's λ optimisation: gradients through the whole trajectory (checkpointed), objectives, reruns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.regulate import AttentionObjective, ClipObjective, SampledRun, SpatialTemporal
from attnscope.regulate._trajectory import sample_with_gradients
from attnscope.testing import tiny_clip_model

PROMPT = "a red circle to the left of a blue square"
RUN = dict(num_inference_steps=5, guidance_scale=5.0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class _ScaleOutputs:
    """A trainable per-step scale on every cross-attention output, and a count of the calls seen (not recomputed)."""

    role = "intervention"

    def __init__(self, steps):
        self.scale = torch.ones(steps, requires_grad=True)
        self.calls = self.recomputed = 0

    def on_install(self, session):
        self.session = session

    def stages(self, ctx):
        return ("output",)

    def on_output(self, ctx, output):
        if self.session.recomputing:
            self.recomputed += 1
        else:
            self.calls += 1
        return output * self.scale[ctx.step]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_the_first_step_through_the_trajectory_with_and_without_checkpointing(shapes, checkpointing):
    """d(final latents)/d(scale at step t) for every t, the same with checkpointing (recomputed under each step's
    context) as without; the first step's scale reaches the final latents only through the scheduler's steps."""
    grads = {}
    for mode in (False, checkpointing):
        client = _ScaleOutputs(RUN["num_inference_steps"])
        with ats.hooks(shapes, client) as session:
            with session.checkpointing() if mode else torch.enable_grad():
                latents = sample_with_gradients(shapes, session.denoiser, prompt=PROMPT, generator=_gen(), **RUN)
                (latents ** 2).sum().backward()
        grads[mode] = client.scale.grad.clone()
        assert client.calls == len(ats.discover_sites(shapes)) * RUN["num_inference_steps"]
        assert client.recomputed == (client.calls if mode else 0)  # backward replays every call once
    assert torch.all(grads[False] != 0), grads[False]
    torch.testing.assert_close(grads[checkpointing], grads[False], rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad is False for p in shapes.unet.parameters())  # nothing frozen by these calls


def test_optimisation_lowers_the_attention_objective_and_is_deterministic(shapes):
    runs = []
    for _ in range(2):
        control = SpatialTemporal(objective="attention")  # the released code's Adam lr 5e-3, 3 epochs
        result = control.optimize(shapes, PROMPT, generator=_gen(3), **RUN)
        runs.append((control, result))
    (control, result), (_, again) = runs
    history = [h[0] for h in result["objective"]]
    assert len(history) == 4 and history[-1] < history[0], history
    assert result == again  # same seed: the same λ and objective values, bit for bit
    weights = np.array(result["weights"][0])
    assert weights.shape == (2, RUN["num_inference_steps"])
    assert np.all(np.abs(weights - 1.0) <= 3 * 5e-3 * 1.01) and np.any(weights != 1.0)  # Adam: about lr per update
    # the pipeline's weights are trainable again, the generator was given back, the control now uses λ
    assert all(p.requires_grad for p in shapes.unet.parameters())
    g = _gen(3)
    control.optimize(shapes, PROMPT, generator=g, **RUN)
    assert torch.equal(g.get_state(), _gen(3).get_state())


def test_the_attention_objective_on_a_hand_made_map():
    """Inside share of a phrase's mass, computed by the observer, against a hand count on a 2×2 map."""
    control = SpatialTemporal({"a red circle": (0.0, 0.0, 0.5, 1.0)})  # the left column of a 2×2 map
    objective = AttentionObjective()
    (observer,) = objective.clients(control)

    class Rows:
        samples, prompt_of_sample = 1, [0]
        cond = slice(1, 2)

    class Site:
        kind = "cross"

    class Ctx:
        rows, spatial_shape, site, step_context, step = Rows(), (2, 2), Site(), None, 0

    from attnscope.regulate._spatial import Placement

    control.placements = lambda step_ctx: [Placement(("a red circle",), ((0.0, 0.0, 0.5, 1.0),), ([2, 3],))]
    probs = torch.zeros(2, 2, 4, 5)  # (batch, heads, pixels, tokens); tokens 2, 3 = "red circle"
    probs[1, 0, :, 2] = torch.tensor([0.4, 0.1, 0.2, 0.0])  # pixels in row-major order: left, right, left, right
    probs[1, 1, :, 3] = torch.tensor([0.2, 0.3, 0.0, 0.1])
    observer.on_probs(Ctx(), probs)
    mass = (probs[1, 0, :, 2] + probs[1, 1, :, 3]) / 2
    expected = 1 - (mass[0] + mass[2]) / mass.sum()  # left pixels: 0 and 2
    loss = objective.loss(SampledRun(None, torch.zeros(1), (PROMPT,), ({},)))
    torch.testing.assert_close(loss, expected.reshape(1))


def test_a_sample_s_optimised_weights_do_not_depend_on_its_batch(shapes):
    alone = [SpatialTemporal(objective="attention", epochs=2, lr=0.05).optimize(shapes, PROMPT, generator=_gen(s), **RUN)
             for s in (1, 2)]
    batch = SpatialTemporal(objective="attention", epochs=2, lr=0.05).optimize(
        shapes, PROMPT, generator=[_gen(1), _gen(2)], num_images_per_prompt=2, **RUN)
    for s in range(2):
        np.testing.assert_allclose(batch["weights"][s], alone[s]["weights"][0], rtol=0, atol=2e-5)
        np.testing.assert_allclose([h[s] for h in batch["objective"]], [h[0] for h in alone[s]["objective"]],
                                   rtol=1e-4)


def test_clip_objective_equals_its_formula_and_drives_the_optimisation(shapes):
    model, processor = tiny_clip_model(shapes.tokenizer)
    objective = ClipObjective(model, processor, global_weight=1.0, local_weight=5.0)
    control = SpatialTemporal({"a red circle": (0.0, 0.25, 0.5, 0.75), "a blue square": (0.6, 0.4)})
    objective.clients(control)
    latents = torch.randn(1, 4, 16, 16, generator=_gen(5))  # a 32-pixel image
    run = SampledRun(shapes, latents, (PROMPT,), (control.layout,))
    loss = objective.loss(run)

    with torch.no_grad():  # independently: decode, crop by hand, resize, normalise, CLIP cosines
        image = (shapes.vae.decode(latents / shapes.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)

        def cos(img, text):
            pixels = F.interpolate(img, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
            ids = processor.tokenizer([text], return_tensors="pt")
            i = model.get_image_features(pixel_values=(pixels - mean) / std)
            t = model.get_text_features(**ids)
            i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
            return F.cosine_similarity(i, t)[0]

        side = image.shape[-1]  # 32 px: box x 0..16, y 8..24; the disk's square x 0.4..0.8 → 12..25, y 0.2..0.6 → 6..19
        expected = (1 - cos(image, PROMPT)) + 5 * (1 - cos(image[..., 8:24, 0:16], "a photo of a red circle")) \
            + 5 * (1 - cos(image[..., 6:19, 12:25], "a photo of a blue square"))
    assert side == 32
    torch.testing.assert_close(loss, expected.reshape(1), rtol=1e-5, atol=1e-5)

    optimised = SpatialTemporal(objective=objective, epochs=2, lr=0.05)
    result = optimised.optimize(shapes, PROMPT, generator=_gen(0), **RUN)
    history = [h[0] for h in result["objective"]]
    assert len(history) == 3 and history[-1] < history[0], history
    assert optimised.describe()["params"]["objective"] == {"name": "clip", "model": "CLIPModel", "global_weight": 1.0,
                                                          "local_weight": 5.0}
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the optimisation


def test_rerun_optimises_stores_lambda_and_a_rerun_reuses_it_without_optimising(shapes, tmp_path):
    tr = ats.capture(shapes, PROMPT, seed=4, store=tmp_path / "a.zarr", **RUN)
    control = SpatialTemporal(objective="attention", epochs=2, lr=0.05)
    optimised = ats.rerun(tr, [control], store=tmp_path / "b.zarr", pipe=shapes)
    (described,) = optimised.manifest["interventions"]
    weights = np.array(described["params"]["weights"])
    assert weights.shape == (1, 2, RUN["num_inference_steps"]) and np.any(weights != 1.0)
    assert len(described["optimisation"]["objective"]) == 3
    assert described["params"]["objective"] == {"name": "attention"}
    # with the same control (λ optimised, fixed) and with the one rebuilt from the trace: the same image
    again = SpatialTemporal.from_trace(optimised)
    assert again.objective is None and again.optimisation is None
    reused = ats.rerun(optimised, [again], store=tmp_path / "c.zarr", pipe=shapes)
    assert np.array_equal(np.asarray(reused.images[0]), np.asarray(optimised.images[0]))
    assert "optimisation" not in reused.manifest["interventions"][0]
    plain = ats.rerun(tr, [SpatialTemporal()], store=tmp_path / "d.zarr", pipe=shapes)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(optimised.images[0]))


def test_optimisation_errors(shapes):
    with pytest.raises(AttnscopeError, match="λ are not optimised yet"):
        with ats.hooks(shapes, SpatialTemporal(objective="attention")):
            shapes(PROMPT, generator=_gen(), **RUN)
    control = SpatialTemporal(objective="attention", epochs=1)
    control.optimize(shapes, PROMPT, generator=_gen(), **RUN)
    with pytest.raises(AttnscopeError, match="optimize\\(\\) inside an ats.hooks block"):
        with ats.hooks(shapes, control):
            control.optimize(shapes, PROMPT, generator=_gen(), **RUN)
    with pytest.raises(AttnscopeError, match="generator=None"):
        SpatialTemporal(objective="attention").optimize(shapes, PROMPT, **RUN)
    with pytest.raises(AttnscopeError, match="objective='clip'"):
        SpatialTemporal(objective="clip")
    with pytest.raises(AttnscopeError, match="epochs=0"):
        SpatialTemporal(objective="attention", epochs=0)
    with pytest.raises(AttnscopeError, match="lr=-1"):
        SpatialTemporal(objective="attention", lr=-1)
    with pytest.raises(AttnscopeError, match="expected a CLIP model"):
        ClipObjective(torch.nn.Linear(2, 2), None)

    class Scalar(AttentionObjective):
        def loss(self, run):
            return super().loss(run).sum()

    with pytest.raises(AttnscopeError, match=r"returned \(\), expected a tensor of shape \(1,\)"):
        SpatialTemporal(objective=Scalar()).optimize(shapes, PROMPT, generator=_gen(), **RUN)
    assert all(p.requires_grad for p in shapes.unet.parameters())  # put back after the error too


def test_rerun_command_optimises_and_reuses_the_trace_s_lambda(shapes, tmp_path):
    from .conftest import cli

    tr = ats.capture(shapes, PROMPT, seed=2, store=tmp_path / "a.zarr", **RUN)
    done = cli("rerun", str(tr.path), "--layout", "auto", "--optimise", "--epochs", "1", "--lr", "0.05",
               "-o", str(tmp_path / "b.zarr"))
    assert done.exit_code == 0, done.stderr
    optimised = ats.open_trace(tmp_path / "b.zarr")
    (described,) = optimised.manifest["interventions"]
    assert described["params"]["epochs"] == 1 and len(described["optimisation"]["objective"]) == 2
    again = cli("rerun", str(optimised.path), "--layout", "trace", "-o", str(tmp_path / "c.zarr"))
    assert again.exit_code == 0, again.stderr
    reused = ats.open_trace(tmp_path / "c.zarr")
    assert reused.manifest["interventions"][0]["params"]["weights"] == described["params"]["weights"]
    assert np.array_equal(np.asarray(reused.images[0]), np.asarray(optimised.images[0]))
    bad = cli("rerun", str(tr.path), "--optimise", "-o", str(tmp_path / "d.zarr"))
    assert bad.exit_code == 2 and "give --layout too" in bad.stderr and not (tmp_path / "d.zarr").exists()
    bad = cli("rerun", str(tr.path), "--layout", "trace", "-o", str(tmp_path / "d.zarr"))
    assert bad.exit_code == 2 and "found 0" in bad.stderr

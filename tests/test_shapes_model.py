"""The embedded shapes model: loading offline, its guards, and the training script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.models.shapes import DEFAULT_GUIDANCE, DEFAULT_STEPS, VOCABULARY, TrainConfig, train_shapes


def _image(pipe, prompt, seed, steps=4):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps)
    return np.asarray(out.images[0])


def test_loads_offline_in_a_fresh_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    code = ("import attnscope as ats; p = ats.load_pipeline('shapes'); "
            "print(type(p).__name__, type(p.scheduler).__name__, p.config._name_or_path)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ShapesPipeline", "DDIMScheduler", "shapes"]
    # a notebook's first cell shows stderr: transformers' torchvision fallback note is not the user's business
    assert "torchvision" not in out.stderr and "deprecated" not in out.stderr, out.stderr


def test_standard_diffusers_parts(shapes):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(shapes, StableDiffusionPipeline)
    assert isinstance(shapes.unet, UNet2DConditionModel) and isinstance(shapes.vae, AutoencoderKL)
    assert isinstance(shapes.text_encoder, CLIPTextModel) and isinstance(shapes.tokenizer, CLIPTokenizer)
    resolutions = {site.spatial_shape((16, 16)) for site in ats.discover_sites(shapes)}
    assert resolutions == {(8, 8), (4, 4)}  # cross-attention at two resolutions


def test_same_seed_same_image(shapes):
    a, b = _image(shapes, "a red circle", 0), _image(shapes, "a red circle", 0)
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _image(shapes, "a red circle", 1))


def test_defaults_recorded_in_a_capture(shapes, tmp_path):
    tr = ats.capture(shapes, "a blue square", seed=0, store=tmp_path / "a.zarr")
    run = tr.manifest["run"]
    assert (run["num_inference_steps"], run["guidance_scale"]) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert tr.manifest["model"]["reference"] == "shapes"
    assert len(tr.timesteps) == DEFAULT_STEPS


def test_words_outside_the_vocabulary_are_refused(shapes):
    with pytest.raises(AttnscopeError, match="'purple', 'hexagon'") as info:
        shapes("a purple hexagon", num_inference_steps=1)
    assert " ".join(VOCABULARY) in str(info.value)
    with pytest.raises(AttnscopeError, match="'cat'"):
        shapes(["a red circle", "a cat"], num_inference_steps=1)
    with pytest.raises(AttnscopeError, match="'dog'"):
        shapes("a red circle", negative_prompt="a dog", num_inference_steps=1)
    with pytest.raises(AttnscopeError, match="negative_prompt=3: expected a string or a list of strings"):
        shapes("a red circle", negative_prompt=3, num_inference_steps=1)


def test_sizes_the_model_cannot_make_are_refused(shapes):
    with pytest.raises(AttnscopeError, match="height=36"):
        shapes("a red circle", height=36, num_inference_steps=1)
    with pytest.raises(AttnscopeError, match="width=512"):
        shapes("a red circle", width=512, num_inference_steps=1)
    with pytest.raises(AttnscopeError, match="height='32': the shapes model"):  # a string, not the number 32
        shapes("a red circle", height="32", num_inference_steps=1)


def test_unknown_model_name():
    with pytest.raises(AttnscopeError, match="'shapez': unknown model"):
        ats.load_pipeline("shapez")


def _losses(path, stage):
    rows = [json.loads(line) for line in (path / "loss.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["stage"] == stage]


def test_training_lowers_the_loss_and_writes_loadable_weights(tmp_path):
    config = TrainConfig(vae_steps=40, vae_batch=8, steps=40, batch=8, warmup=5, checkpoint_every=20)
    pipeline_dir = train_shapes(tmp_path / "run", config, progress=False)
    vae, diffusion = _losses(tmp_path / "run", "vae"), _losses(tmp_path / "run", "diffusion")
    assert len(vae) == 40 and len(diffusion) == 40
    assert np.mean(vae[-5:]) < 0.5 * np.mean(vae[:5])
    assert np.mean(diffusion[-10:]) < np.mean(diffusion[:10])
    pipe = ats.load_pipeline(pipeline_dir)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the latents
    assert _image(pipe, "a red circle", 0, steps=2).shape == (32, 32, 3)
    with pytest.raises(AttnscopeError, match="not empty"):
        train_shapes(tmp_path / "run", config, progress=False)


def test_resume_continues_where_the_run_stopped(tmp_path, monkeypatch):
    import attnscope.models.shapes._training as training

    config = TrainConfig(vae_steps=4, vae_batch=4, steps=6, batch=4, warmup=2, checkpoint_every=2)
    whole = train_shapes(tmp_path / "whole", config, progress=False)
    original = training._lr

    def killed_at_step_3(cfg, step, total, peak):
        if total == config.steps and step == 3:
            raise KeyboardInterrupt
        return original(cfg, step, total, peak)

    monkeypatch.setattr(training, "_lr", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_shapes(tmp_path / "resumed", config, progress=False)
    monkeypatch.setattr(training, "_lr", original)
    resumed = train_shapes(tmp_path / "resumed", config, resume=True, progress=False)
    # same trajectory: the same batches and noise; float rounding may differ in the last bits
    assert _losses(tmp_path / "resumed", "diffusion") == pytest.approx(_losses(tmp_path / "whole", "diffusion"), rel=1e-5)
    a, b = ats.load_pipeline(whole), ats.load_pipeline(resumed)
    for name, p in a.unet.state_dict().items():
        torch.testing.assert_close(b.unet.state_dict()[name], p, atol=1e-5, rtol=0)
    with pytest.raises(AttnscopeError, match="other settings"):
        train_shapes(tmp_path / "resumed", TrainConfig(vae_steps=4, vae_batch=4, steps=7, batch=4), resume=True,
                     progress=False)


def test_hub_id_from_the_local_cache_only(tmp_path):
    """A hub id resolves from the local Hugging Face cache (the layout the hub client writes); one that is
    not cached is refused with a clear error instead of a download attempt."""
    from attnscope.testing import tiny_sd_pipeline

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    tiny_sd_pipeline().save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("import attnscope as ats\n"
            "print(type(ats.load_pipeline('someone/tiny-sd')).__name__)\n"
            "try:\n    ats.load_pipeline('someone/not-cached')\n"
            "except ats.AttnscopeError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, second = out.stdout.splitlines()[:2]
    assert first == "StableDiffusionPipeline"
    assert second.startswith("refused: model='someone/not-cached': not a local diffusers directory")

"""Sweeps of pipelines with image inputs (fifth audit): ``sweep.json`` records an init image by its content."""

import numpy as np
import PIL.Image
import pytest
import torch

import attnscope as ats


def _image(seed):
    return PIL.Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8))


@pytest.fixture
def img2img(sd_pipe):
    import diffusers

    pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_img2img_sweep_resumes_with_the_same_image_and_refuses_another(img2img, tmp_path):
    """The image was recorded by its repr, which holds its address: a resumed sweep (a new process, the same file
    loaded again) was refused as "other settings", and an image with the same address passed as the same."""
    run = dict(strength=0.5, num_inference_steps=4)
    first = ats.sweep(img2img, ["a red circle"], [0], out=tmp_path / "s", image=_image(0), **run)
    assert first.df["status"].tolist() == ["complete"]
    again = ats.sweep(img2img, ["a red circle"], [0, 1], out=tmp_path / "s", image=_image(0).copy(), **run)
    assert again.df["status"].tolist() == ["complete", "complete"]
    with pytest.raises(ats.AttnscopeError, match=r"holds a sweep with other settings \(capture: \{.*'image': 'image RGB "
                                                 r"32x32, sha256 (\w+)'.*'image': 'image RGB 32x32, sha256 (?!\1)\w+'"):
        ats.sweep(img2img, ["a red circle"], [0, 1, 2], out=tmp_path / "s", image=_image(1), **run)


def test_latents_are_recorded_by_content(img2img, sd_pipe, tmp_path):
    run = dict(num_inference_steps=2, height=32, width=32)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ats.sweep(sd_pipe, ["a red circle"], [0], out=tmp_path / "s", latents=latents, **run)
    ats.sweep(sd_pipe, ["a red circle"], [0], out=tmp_path / "s", latents=latents.clone(), **run)  # the same
    with pytest.raises(ats.AttnscopeError, match=r"other settings \(capture: \{.*'latents': 'Tensor float32 "
                                                 r"\(1, 4, 4, 4\), sha256"):
        ats.sweep(sd_pipe, ["a red circle"], [0], out=tmp_path / "s", latents=latents + 1, **run)

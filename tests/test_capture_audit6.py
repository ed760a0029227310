"""Stop 45: capture on an img2img pipeline with the default strength."""

import diffusers
import numpy as np
import pytest
from PIL import Image

import attnscope as ats
from attnscope.testing import tiny_sd_pipeline


def test_the_default_strength_leaving_no_step_is_one_error_before_anything_is_written(tmp_path):
    """StableDiffusionImg2ImgPipeline's default strength 0.8 of one step runs int(1 * 0.8) = 0 steps: diffusers fails
    inside its call; capture says so first, naming the default, and writes nothing. Two steps run one (int(1.6))."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(Exception) as plain:
        pipe("a red circle", image=image, num_inference_steps=1)
    assert not isinstance(plain.value, ats.AttnscopeError)
    with pytest.raises(ats.AttnscopeError, match=r"strength=0\.8 \(the pipeline's default\) with num_inference_steps=1: "
                                                 r"StableDiffusionImg2ImgPipeline would run 0 of the 1 steps"):
        ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "a.zarr", image=image, num_inference_steps=1)
    assert not (tmp_path / "a.zarr").exists()
    tr = ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "b.zarr", image=image, num_inference_steps=2)
    assert tr.timesteps.size == 1

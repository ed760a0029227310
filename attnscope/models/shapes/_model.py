"""The shapes model: its architecture (standard diffusers parts), its pipeline and where its weights live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline

from ...errors import AttnscopeError
from .._compat import quiet_loading
from ._tokenizer import make_clip_tokenizer
from ._world import IMAGE_SIZE, VOCABULARY, check_vocabulary

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_STEPS", "TEXT_LENGTH", "WEIGHTS_DIR", "ShapesPipeline", "assemble", "build_components",
           "load_shapes_pipeline", "sampling_scheduler"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
TEXT_LENGTH = 16  # tokens per prompt including SOT/EOT; the longest caption has 13
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.5
_SIZES = range(16, 129, 8)  # latent = size/2 must be divisible by 4 (two downsamplings)


class ShapesPipeline(StableDiffusionPipeline):
    """A :class:`~diffusers.StableDiffusionPipeline` with the shapes model's defaults (20 steps,
    guidance 2.5, 32×32 pixels) that refuses words outside its vocabulary and sizes it cannot make."""

    def check_inputs(self, prompt, height, width, callback_steps, negative_prompt=None, *args, **kwargs):  # noqa: D102
        _check_sizes(height, width)
        tokenizer = getattr(self, "tokenizer", None)
        limit = TEXT_LENGTH if tokenizer is None else tokenizer.model_max_length
        for label, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not (text is None or isinstance(text, str) or
                    isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
                raise AttnscopeError(f"{label}={text!r}: expected a string or a list of strings")
            if isinstance(text, (list, tuple)) and not text:
                raise AttnscopeError(f"{label}={text!r}: expected a string or a list of strings, not an empty list")
            for item in [text] if isinstance(text, str) else (text or []):
                check_vocabulary(item, name=label)
                # every vocabulary word is one token; a longer prompt would be cut off with only a warning
                count = 2 + (len(tokenizer.tokenize(item)) if tokenizer is not None else len(item.split()))
                if count > limit:
                    raise AttnscopeError(f"{label}={item!r}: {count} tokens with the start and end tokens; the shapes "
                                         f"model reads at most {limit} (up to three objects, 'a red circle and a blue "
                                         f"square and a green triangle')")
        return super().check_inputs(prompt, height, width, callback_steps, negative_prompt, *args, **kwargs)

    def __call__(self, prompt=None, height=None, width=None, num_inference_steps: int = DEFAULT_STEPS,
                 timesteps=None, sigmas=None, guidance_scale: float = DEFAULT_GUIDANCE, *args, **kwargs):
        # diffusers resets *both* sizes to the default when one is missing; fill each on its own instead
        height, width = (IMAGE_SIZE if height is None else height), (IMAGE_SIZE if width is None else width)
        _check_sizes(height, width)  # here too: diffusers turns a 0 into its default before check_inputs sees it
        if timesteps is None and sigmas is None and (isinstance(num_inference_steps, bool) or
                                                     not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise AttnscopeError(f"num_inference_steps={num_inference_steps!r}: expected an int >= 1 "
                                 f"(the number of denoising steps)")
        return super().__call__(prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                                *args, **kwargs)


def _check_sizes(height: Any, width: Any) -> None:
    for name, value in (("height", height), ("width", width)):
        if value not in _SIZES:
            raise AttnscopeError(
                f"{name}={value!r}: the shapes model makes images of 16 to 128 pixels in steps of 8 "
                f"(trained at {IMAGE_SIZE})"
            )


def sampling_scheduler(config: dict[str, Any]):
    """DDIM with trailing timestep spacing over the training noise schedule (v-prediction, cosine)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_components(tokenizer_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Fresh (seeded, untrained) components of the shapes model.

    The UNet has cross-attention at its two lower resolutions (8×8 and 4×4 over a 16×16 latent:
    ``down_blocks.1``, ``down_blocks.2``, ``mid_block``, ``up_blocks.0``, ``up_blocks.1``), the VAE
    halves the image (32 px ↔ 16×16×4 latent), the text encoder is a 2-layer CLIP of width 64.

    >>> import tempfile
    >>> from attnscope.models.shapes import build_components
    >>> parts = build_components(tempfile.mkdtemp())
    >>> sorted(parts)
    ['scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_clip_tokenizer(tokenizer_dir, words=VOCABULARY, model_max_length=TEXT_LENGTH)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def assemble(parts: dict[str, Any], cls: type = StableDiffusionPipeline) -> Any:
    """A pipeline of class ``cls`` from trained parts, with the sampling scheduler.

    Training saves a plain :class:`~diffusers.StableDiffusionPipeline` so the directory loads with
    stock diffusers anywhere; :func:`load_shapes_pipeline` reads it back as a :class:`ShapesPipeline`.
    """
    return cls(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=sampling_scheduler(parts["scheduler"].config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def load_shapes_pipeline(dtype: Any = None) -> ShapesPipeline:
    """The shipped shapes model, from the package's own files (never the network).

    >>> from attnscope.models.shapes import load_shapes_pipeline
    >>> pipe = load_shapes_pipeline()
    >>> pipe.config._name_or_path, len(pipe("a red circle", generator=__import__("torch").manual_seed(0),
    ...                                    num_inference_steps=2).images)
    ('shapes', 1)
    """
    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise AttnscopeError(
            f"model='shapes': the embedded weights are missing from this installation (expected {WEIGHTS_DIR}); "
            "reinstall attnscope or train them with `attnscope train-shapes`"
        )
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    with quiet_loading():
        pipe = ShapesPipeline.from_pretrained(WEIGHTS_DIR, local_files_only=True, use_safetensors=True, **kwargs)
    pipe.register_to_config(_name_or_path="shapes")
    pipe.set_progress_bar_config(disable=None)
    return pipe

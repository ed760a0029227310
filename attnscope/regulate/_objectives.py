"""What SpatialTemporal's λ optimisation minimises: pluggable objectives over one sampled trajectory.

An objective is any object with

* ``clients(control)`` → hook clients installed beside the control for one optimisation run (may
  be empty), made fresh for every run;
* ``loss(run)`` → a ``(samples,)`` tensor, one loss per sample of the run just made (a
  :class:`SampledRun`: the pipeline, the final latents with their graph, and per sample its
  prompt and layout). Per-sample losses are summed, so a sample's λ does not depend on its batch;
* ``describe()`` → a JSON-able dict for manifests.

:class:`AttentionObjective` (the default) needs no extra model; :class:`ClipObjective` is the
paper's, with a CLIP model the user supplies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttnscopeError

__all__ = ["AttentionObjective", "ClipObjective", "SampledRun"]

@dataclasses.dataclass(frozen=True)
class SampledRun:
    """One run of the optimisation: what an objective's ``loss`` scores.

    ``latents`` are the pipeline's final latents (``output_type="latent"``), still attached to the
    graph through every step; ``prompts[s]`` and ``layouts[s]`` (phrase → region) belong to sample ``s``.
    """

    pipe: Any
    latents: torch.Tensor
    prompts: tuple[str, ...]
    layouts: tuple[dict[str, tuple[float, ...]], ...]


class AttentionObjective:
    """Each object's attention mass inside its region: ``1 − mean over sites, steps and objects`` of the share
    of the object phrase's cross-attention mass (its tokens, leading articles dropped, heads averaged) that
    falls inside the object's region. Computed from the hook core's own maps on the conditional rows; no
    extra model.

    >>> AttentionObjective().describe()
    {'name': 'attention'}
    """

    name = "attention"

    def __init__(self) -> None:
        self._observer: _InsideShare | None = None

    def __repr__(self) -> str:
        return "AttentionObjective()"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def clients(self, control: Any) -> tuple[Any, ...]:
        self._observer = _InsideShare(control)
        return (self._observer,)

    def loss(self, run: SampledRun) -> torch.Tensor:
        observer = self._observer
        if observer is None or not observer.count:
            raise AttnscopeError("AttentionObjective: no cross-attention call was observed in the run (are the "
                                 "control's sites and steps empty?)")
        samples = len(run.prompts)
        total = torch.stack([observer.total[s] for s in range(samples)])
        count = torch.tensor([observer.count[s] for s in range(samples)], dtype=total.dtype, device=total.device)
        return 1.0 - total / count


class _InsideShare:
    """Observer: per sample, the sum over calls and objects of the inside-region share of each phrase's mass."""

    role = "observer"

    def __init__(self, control: Any):
        self.control = control
        self.total: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}
        self._session: Any = None

    def on_install(self, session: Any) -> None:
        self._session = session

    def stages(self, ctx: Any) -> tuple[str, ...]:
        return ("probs",) if ctx.site.kind == "cross" and self.control.scope.active(ctx) else ()

    def on_probs(self, ctx: Any, probs: torch.Tensor) -> None:
        rows = ctx.rows
        for sample in range(rows.samples):
            place = self.control.placement(ctx.step_context, sample)
            maps = probs[rows.cond.start + sample].mean(dim=0)  # (pixels, tokens), heads averaged
            for region, positions in zip(place.regions, place.positions):
                mass = maps[:, positions].sum(dim=-1)
                mask = self.control.mask(region, ctx.spatial_shape, mass)
                share = (mass * mask).sum() / mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)
                if self._session is not None and self._session.recomputing:
                    continue  # backward's recomputation: the same tensors, not counted again
                self.total[sample] = self.total.get(sample, 0) + share
                self.count[sample] = self.count.get(sample, 0) + 1


class ClipObjective:
    """The paper's objective: CLIP similarity of the decoded image to the prompt, and of each object's crop to its
    local prompt, with a CLIP model and processor you supply (``transformers.CLIPModel`` and ``CLIPProcessor``;
    nothing is downloaded).

    ``loss = global_weight · (1 − cos(image, prompt)) + local_weight · Σ_i (1 − cos(crop_i, local prompt_i))``;
    a crop is the object's box, or the square around its disk, clipped to the image (the released code:
    ``5 ×`` the crop terms; it computes the global term but does not add it — ``global_weight=0``
    reproduces that). Images are resized (bilinear, antialiased) to the model's input size and normalised
    with the processor's mean and std, all differentiably.

    Parameters
    ----------
    model : transformers.CLIPModel
    processor : transformers.CLIPProcessor (or anything with ``tokenizer``, ``image_processor.image_mean``/``image_std``)
    global_weight, local_weight : float

    Examples
    --------
    A tiny random CLIP stands in here for yours (``CLIPModel.from_pretrained(...)`` and its processor):

    >>> import attnscope as ats, torch
    >>> from attnscope.testing import tiny_clip_model
    >>> pipe = ats.load_pipeline("shapes")
    >>> model, processor = tiny_clip_model(pipe.tokenizer)
    >>> control = ats.regulate.SpatialTemporal(objective=ClipObjective(model, processor), epochs=1)
    >>> result = control.optimize(pipe, "a red circle to the left of a blue square", num_inference_steps=4,
    ...                           generator=torch.Generator().manual_seed(0))
    >>> len(result["objective"]), len(result["objective"][0])       # passes (before, after), samples
    (2, 1)
    """

    name = "clip"

    def __init__(self, model: Any, processor: Any, *, global_weight: float = 1.0, local_weight: float = 5.0):
        if not (callable(getattr(model, "get_image_features", None)) and callable(getattr(model, "get_text_features", None))):
            raise AttnscopeError(f"model={type(model).__name__}: expected a CLIP model with get_image_features and "
                                 f"get_text_features (transformers.CLIPModel)")
        images = getattr(processor, "image_processor", None)
        if getattr(processor, "tokenizer", None) is None or images is None:
            raise AttnscopeError(f"processor={type(processor).__name__}: expected a CLIPProcessor (with a tokenizer and "
                                 f"an image_processor)")
        self.model, self.processor = model, processor
        self.global_weight, self.local_weight = float(global_weight), float(local_weight)
        self._mean = torch.tensor(images.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(images.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self._size = int(model.config.vision_config.image_size)

    def __repr__(self) -> str:
        return f"ClipObjective({type(self.model).__name__})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__,
                "global_weight": self.global_weight, "local_weight": self.local_weight}

    def clients(self, control: Any) -> tuple[Any, ...]:
        self._local = control.local_prompt
        self._radius = control.radius
        return ()

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.model,)

    def loss(self, run: SampledRun) -> torch.Tensor:
        images = decode(run.pipe, run.latents)  # (samples, 3, H, W) in [0, 1]
        losses = []
        for s, (prompt, layout) in enumerate(zip(run.prompts, run.layouts)):
            image = images[s:s + 1]
            total = self.global_weight * (1 - self._similarity(image, prompt))
            for phrase, region in layout.items():
                crop = _crop(image, region, self._radius)
                total = total + self.local_weight * (1 - self._similarity(crop, self._local.format(phrase)))
            losses.append(total.reshape(()))
        return torch.stack(losses)

    def _similarity(self, image: torch.Tensor, text: str) -> torch.Tensor:
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        pixels = F.interpolate(image.float(), size=(self._size, self._size), mode="bilinear", antialias=True,
                               align_corners=False)
        pixels = ((pixels - self._mean.to(pixels.device)) / self._std.to(pixels.device)).to(device, dtype)
        tokens = self.processor.tokenizer([text], padding=True, truncation=True, return_tensors="pt").to(device)
        image_features = _pooled(self.model.get_image_features(pixel_values=pixels))
        text_features = _pooled(self.model.get_text_features(**tokens))
        return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)


def _pooled(features: Any) -> torch.Tensor:
    """CLIP features as a tensor (transformers 4 returns one; 5 an output whose ``pooler_output`` it is)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _crop(image: torch.Tensor, region: tuple[float, ...], radius: float) -> torch.Tensor:
    """The box of ``region`` (or the square around a centre's disk), clipped to the image, at least one pixel."""
    h, w = image.shape[-2:]
    if len(region) == 4:
        x0, y0, x1, y1 = region
    else:
        x0, y0, x1, y1 = region[0] - radius, region[1] - radius, region[0] + radius, region[1] + radius
    left, top = min(max(int(x0 * w), 0), w - 1), min(max(int(y0 * h), 0), h - 1)
    right, bottom = max(min(int(x1 * w), w), left + 1), max(min(int(y1 * h), h), top + 1)
    return image[..., top:bottom, left:right]


def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's VAE decoding of ``latents``, differentiably, as images in [0, 1] ``(samples, 3, H, W)``."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)

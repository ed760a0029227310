"""Model-family adapters: one module per denoiser family, each finding its denoiser and its sites.

An adapter module has

- ``FAMILY`` (its name, stored in each site) and ``SUPPORTS`` (what it covers, for error messages);
- ``denoiser(pipe)``: the pipeline's denoiser when the family applies, else None (a PAG pipeline of the family:
  one error, :func:`~attnscope.hooks.families._common.refuse_perturbed_guidance`);
- ``sites(denoiser, cross=True)``: its :class:`~attnscope.hooks.CrossAttentionSite` list in module
  order (``cross=False``: the self-attention modules wrapped for bypass, if any);
- ``step_inputs(args, kwargs)``: batch, timestep, latent (h, w) and text length of a denoiser call;
- ``TEXT_ENCODERS``: the text segments of the sites' key axis, in order, each a tuple of
  alternative pipeline attributes (``"text_encoder_3"``) whose input ids spell that segment;
- ``KERNEL``: ``(module, attribute, layout)`` of the attention function a joint site's processor
  calls (replaced for the call when a client reads logits/probs), or None for cross-attention;
- ``PROCESSORS`` (joint families): the processor class names known to make that one call;
- ``STEPS_BY``: ``"call"`` (each denoiser call is a step) or ``"timestep"`` (a call with the same
  timestep as the previous one is a second pass of the same step, e.g. Flux's true CFG);
- optionally ``guidance(pipe)``: whether the running call stacks the CFG halves, for pipelines
  without a ``do_classifier_free_guidance`` property (PixArt);
- optionally ``spell(tokenizer, ids, text_length, pipe)``: for a single text segment that the sites
  do not see as the encoder read it (Sana keeps ``[0] + the last 299`` positions after an
  instruction; Flux.2 wraps the prompt in a chat template), the positions the sites see, their
  strings and their roles (:data:`attnscope.tokens.ROLES`, ``"instruction"`` included).
- optionally ``prompt_tokens(tokenizer, prompt, pipe, setting)``: ``(count, reserved, what)``, the prompt's
  tokens as the pipeline feeds them and the positions of ``max_sequence_length`` it cannot use, for
  capture's check that the pipeline will not cut the prompt (without it: T5 segments are counted).

Add a family by adding a module and listing it in :data:`ADAPTERS`.

>>> [adapter.FAMILY for adapter in ADAPTERS]
['unet', 'sd3', 'flux', 'flux2', 'pixart', 'sana']
"""

from . import flux, flux2, pixart, sana, sd3, unet
from ._common import depth_band, text_tokenizer, timestep_value

__all__ = ["ADAPTERS", "depth_band", "text_tokenizer", "timestep_value"]

#: The adapters, tried in this order.
ADAPTERS = (unet, sd3, flux, flux2, pixart, sana)

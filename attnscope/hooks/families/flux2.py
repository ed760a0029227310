"""The Flux.2 family: ``Flux2Transformer2DModel`` (FLUX.2 klein: ``Flux2KleinPipeline``; dev: ``Flux2Pipeline``).

Joint sites of two streams, both with the text **first** in the joint sequence, as in Flux.1:

- ``transformer_blocks.N.attn`` (block ``"double"``, ``Flux2Attention``): ``Flux2AttnProcessor``
  concatenates the text and image projections, RMS-norms queries and keys, applies RoPE and calls
  ``dispatch_attention_fn`` once over ``[text, image]``;
- ``single_transformer_blocks.N.attn`` (block ``"single"``, ``Flux2ParallelSelfAttention``): the
  block concatenates ``[text, image]`` itself; ``Flux2ParallelSelfAttnProcessor`` takes q, k, v
  (and the MLP input) from one fused projection and calls ``dispatch_attention_fn`` once. Its
  output (the ``output`` stage) is ``to_out`` of the attention **and** the parallel MLP together:
  the block has no attention-only output. The text length comes from the transformer call.

The pipeline patchifies the VAE latent 2×2 (``(C, H, W)`` → ``(4C, H/2, W/2)``) and packs it to
``(batch, H/2·W/2, 4C)``; the transformer's own ``patch_size`` is 1. ``img_ids`` give each position's
``(t, row, column, layer)``, so the sites' ``patch`` is 2 and ``latent_shape`` is the VAE latent's
``(H, W)``, as in Flux.1. There is no attention mask: padding takes real attention mass.

The text axis is the text encoder's view of its chat template: klein's Qwen3 reads
``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``, then
``<|endoftext|>`` padding to ``max_sequence_length``; dev's Mistral 3 (``Mistral3ForConditionalGeneration``; the
pipeline's ``tokenizer`` is a ``PixtralProcessor`` holding the tokenizer) reads
``<s>[SYSTEM_PROMPT]{system message}[/SYSTEM_PROMPT][INST]{prompt}[/INST]`` with ``<pad>`` padding on the left.
:func:`spell` (called by the hook core) gives the template tokens their own role (``"instruction"``) so that
statistics over the prompt's words mean the user's words; :mod:`attnscope.tokens` merges the byte-level BPE pieces
(Qwen's, Mistral's Tekken) into words.

Classifier-free guidance (klein base models, ``guidance_scale > 1``) runs the transformer twice per
step, the prompt first, then the empty negative prompt, with the same timestep: steps are counted by
timestep, and the negative pass is not shown to clients (as Flux.1's true CFG). Its batch never
stacks the two halves, although the pipeline's ``do_classifier_free_guidance`` is true
(:func:`guidance`). Not covered: the KV-cache processors (``Flux2KVAttnProcessor``, reference
images), refused when logits/probs are read, and reference-image conditioning (``image=``), whose
extra image tokens have no place on the latent grid: refused with one error (:func:`step_inputs`).
"""

from __future__ import annotations

from typing import Any

import torch

from .._sites import CrossAttentionSite
from ._common import packed_step_inputs, text_tokenizer, transformer_of

__all__ = ["FAMILY", "KERNEL", "PROCESSORS", "STEPS_BY", "SUPPORTS", "TEXT_ENCODERS", "TIMESTEP_SCALE", "denoiser",
           "guidance", "prompt_tokens", "sites", "spell", "step_inputs"]

FAMILY = "flux2"
SUPPORTS = "Flux2Transformer2DModel (FLUX.2 klein, FLUX.2 dev)"
#: The text encoder whose token ids make the sites' text axis (klein: Qwen3; dev: Mistral 3).
TEXT_ENCODERS = (("text_encoder",),)
#: (module, attribute, layout) of the attention kernel the processors call.
KERNEL = ("diffusers.models.transformers.transformer_flux2", "dispatch_attention_fn", "bshd")
#: Processors whose one kernel call is the joint attention over [text, image] (checked before logits/probs are read).
PROCESSORS = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")
#: Steps are counted by the scheduler's timestep (with guidance the model runs twice per step).
STEPS_BY = "timestep"
#: The pipeline calls the transformer with the scheduler's timestep divided by this; the hook core shows clients (and
#: the store keeps) the scheduler's own value, ``pipe.scheduler.timesteps``.
TIMESTEP_SCALE = 1000

#: Per chat template, the tokens that open the user's prompt (None: any token) and the token that closes it:
#: Qwen3's (klein: ``<|im_start|>user\\n{prompt}<|im_end|>``) and Mistral 3's (dev: ``[INST]{prompt}[/INST]``).
_PROMPT_BOUNDS = ((("<|im_start|>", "user", None), "<|im_end|>"), (("[INST]",), "[/INST]"))
#: Qwen's padding token, for a tokenizer that names none.
_PAD = "<|endoftext|>"


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ``transformer`` when it is a ``Flux2Transformer2DModel``, else None.

    >>> from attnscope.testing import tiny_flux2_pipeline
    >>> type(denoiser(tiny_flux2_pipeline())).__name__
    'Flux2Transformer2DModel'
    """
    return transformer_of(pipe, "Flux2Transformer2DModel")


def guidance(pipe: Any) -> bool:
    """Whether one transformer call stacks ``[uncond; cond]`` rows: never in Flux.2.

    The klein pipeline's ``do_classifier_free_guidance`` is true with ``guidance_scale > 1``, but it
    runs the negative prompt as a second call (same timestep), not as rows of the same batch.

    >>> guidance(None)
    False
    """
    return False


def sites(model: torch.nn.Module, cross: bool = True) -> list[CrossAttentionSite]:
    """The joint sites of ``model``: double-stream blocks, then single-stream blocks (``cross=False``: none).

    >>> from attnscope.testing import tiny_flux2_pipeline
    >>> [(s.name, s.block, s.heads, s.patch) for s in sites(tiny_flux2_pipeline().transformer)][::2]
    [('transformer_blocks.0.attn', 'double', 2, 2), ('single_transformer_blocks.0.attn', 'single', 2, 2)]
    """
    if not cross:
        return []
    found = []
    for stream, prefix in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
        for index, block in enumerate(getattr(model, prefix)):
            attn = block.attn
            found.append(CrossAttentionSite(
                name=f"{prefix}.{index}.attn", family=FAMILY, kind="joint", block=stream, level=0,
                heads=attn.heads, head_dim=attn.head_dim, token_dim=int(model.config.joint_attention_dim), module=attn,
                text_layout="text_first", patch=2, depth=len(found),
            ))
    return found


def step_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch size, timestep, latent (h, w) — twice the packed grid — and text length of one transformer call.

    The timestep is the transformer's input, the scheduler's divided by :data:`TIMESTEP_SCALE` (the core undoes it).

    The grid is read from ``img_ids``. Reference images (the pipeline's ``image=``) add positions
    with other time coordinates: refused with one error, their tokens have no place on the grid.

    >>> t, h, w, layer = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), torch.zeros(1),
    ...                                 indexing="ij")
    >>> ids = torch.stack([t, h, w, layer], -1).reshape(1, -1, 4)
    >>> step_inputs((), {"hidden_states": torch.zeros(1, 24, 4), "timestep": torch.tensor([0.5]),
    ...                  "img_ids": ids, "encoder_hidden_states": torch.zeros(1, 16, 48)})
    {'batch': 1, 'timestep': 0.5, 'latent_shape': (8, 12), 'text_length': 16}
    """
    return packed_step_inputs(args, kwargs, (2, 3), "Flux.2 with reference images (image=)")


def spell(tokenizer: Any, ids: list[int], text_length: int | None, pipe: Any = None
          ) -> tuple[list[int], list[str], list[str]]:
    """Positions, token strings and roles of one prompt's ids over the sites' text axis.

    The hook core calls it with the prompt's padded ids as the text encoder saw them (one row) and the
    pipeline's ``tokenizer`` (dev's is a processor: the tokenizer it holds spells the ids); the sites see
    every one of them (``text_length``, the transformer call's text length, equals ``max_sequence_length``),
    so the positions are ``0 … len(ids) − 1``. The chat template is told by its tokens: the user's prompt
    (``"word"``) is what follows ``<|im_start|>``, ``user`` and a newline (klein) or ``[INST]`` (dev), up to
    ``<|im_end|>`` or ``[/INST]``; every other token up to the padding is ``"instruction"`` (dev's ``<s>``
    and system message included). The padding token (on either side) is ``"pad"``. A prompt cut by
    ``max_sequence_length`` has no closing token: its pieces up to the end are words. ``pipe`` is not needed.

    Examples
    --------
    >>> import tempfile
    >>> from attnscope.testing import make_qwen_tokenizer, tiny_flux2_dev_pipeline
    >>> tok = make_qwen_tokenizer(tempfile.mkdtemp())
    >>> text = tok.apply_chat_template([{"role": "user", "content": "a red elephant"}], tokenize=False,
    ...                                add_generation_prompt=True, enable_thinking=False)
    >>> positions, tokens, roles = spell(tok, tok(text, padding="max_length", max_length=20).input_ids, 20)
    >>> positions == list(range(20))
    True
    >>> list(zip(tokens, roles))[:8]  # doctest: +NORMALIZE_WHITESPACE
    [('<|im_start|>', 'instruction'), ('user', 'instruction'), ('Ċ', 'instruction'), ('a', 'word'),
     ('Ġred', 'word'), ('Ġele', 'word'), ('phant', 'word'), ('<|im_end|>', 'instruction')]
    >>> roles[8:]  # doctest: +NORMALIZE_WHITESPACE
    ['instruction', 'instruction', 'instruction', 'instruction', 'instruction', 'instruction', 'instruction',
     'instruction', 'pad', 'pad', 'pad', 'pad']

    FLUX.2 dev: the system message and the template are instruction, the padding comes first.

    >>> processor = tiny_flux2_dev_pipeline().tokenizer
    >>> messages = [[{"role": "system", "content": [{"type": "text", "text": "You are an AI."}]},
    ...              {"role": "user", "content": [{"type": "text", "text": "a red elephant"}]}]]
    >>> ids = processor.apply_chat_template(messages, tokenize=True, processor_kwargs={"padding": "max_length",
    ...                                     "max_length": 16})[0]
    >>> list(zip(*spell(processor, ids, 16)[1:]))  # doctest: +NORMALIZE_WHITESPACE
    [('<pad>', 'pad'), ('<pad>', 'pad'), ('<s>', 'instruction'), ('[SYSTEM_PROMPT]', 'instruction'),
     ('You', 'instruction'), ('Ġare', 'instruction'), ('Ġan', 'instruction'), ('ĠAI', 'instruction'),
     ('.', 'instruction'), ('[/SYSTEM_PROMPT]', 'instruction'), ('[INST]', 'instruction'), ('a', 'word'),
     ('Ġred', 'word'), ('Ġele', 'word'), ('phant', 'word'), ('[/INST]', 'instruction')]
    """
    tokenizer = text_tokenizer(tokenizer)
    ids = list(ids)
    if text_length is not None:
        ids = ids[:text_length]
    tokens = list(tokenizer.convert_ids_to_tokens(ids))
    pad = getattr(tokenizer, "pad_token", None) or _PAD
    first = next((i for i, tok in enumerate(tokens) if tok != pad), len(tokens))  # after left padding
    stop = next((i for i in range(first, len(tokens)) if tokens[i] == pad), len(tokens))  # right padding
    start, end = _prompt_span(tokens, first, stop)
    roles = ["pad"] * first + ["instruction"] * (start - first) + ["word"] * (end - start)
    roles += ["instruction"] * (stop - end) + ["pad"] * (len(tokens) - stop)
    return list(range(len(ids))), tokens, roles


def prompt_tokens(tokenizer: Any, prompt: str, pipe: Any, setting: Any) -> tuple[int, int, str]:
    """``(count, reserved, what)``: the tokens of ``prompt`` inside the chat template the pipeline wraps it in — klein's
    Qwen3 template, or dev's system message and Mistral 3 template (a tokenizer with ``[INST]``); nothing reserved.

    >>> import tempfile
    >>> from attnscope.testing import make_qwen_tokenizer
    >>> prompt_tokens(make_qwen_tokenizer(tempfile.mkdtemp()), "a red circle", None, None)  # 3 words + 12 template
    (15, 0, 'Qwen tokens with the chat template')
    """
    if "[INST]" in getattr(text_tokenizer(tokenizer), "added_tokens_encoder", {}):  # dev: Mistral 3
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        ids = tokenizer.apply_chat_template(format_input([prompt], pipe.system_message), tokenize=True)[0]
        return len(ids), 0, "Mistral tokens with the system message and chat template"
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    return len(tokenizer(text).input_ids), 0, "Qwen tokens with the chat template"


def _prompt_span(tokens: list[str], first: int, stop: int) -> tuple[int, int]:
    """``(start, end)`` of the user's prompt in ``tokens[first:stop]``: after the first opening of a known chat
    template, up to its closing token or ``stop``; no template found: all of it.

    >>> _prompt_span(["<s>", "[INST]", "a", "Ġcat", "[/INST]", "<pad>"], 0, 5)
    (2, 4)
    """
    for opener, closer in _PROMPT_BOUNDS:
        for i in range(first, stop - len(opener) + 1):
            if all(want is None or tok == want for tok, want in zip(tokens[i:i + len(opener)], opener)):
                start = i + len(opener)
                return start, next((j for j in range(start, stop) if tokens[j] == closer), stop)
    return first, stop

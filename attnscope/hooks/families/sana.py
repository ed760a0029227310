"""The Sana family: ``SanaTransformer2DModel`` denoisers (Sana, Sana 1.5, Sana Sprint).

A flat stack of ``SanaTransformerBlock`` layers at the latent's resolution (patch size 1 on a DC-AE
latent). ``attn1`` is *linear* attention (``SanaLinearAttnProcessor2_0``): it never forms a softmax
map, so it is not a site. ``transformer_blocks.N.attn2`` is softmax cross-attention
(``SanaAttnProcessor2_0``: RMS norms of q and k, when the model has them, before the heads are split)
to 300 Gemma-2 positions, with the padding masked by a bias of −10000: a site of kind ``"cross"``.

The text axis is not the text encoder's input as it is: the pipeline prepends a long instruction
(``complex_human_instruction``) to the prompt, encodes ``instruction + prompt`` padded to
``len(instruction) + 298`` tokens, and keeps the positions ``[0] + the last 299``. :func:`spell`
reproduces that selection from the encoder's ids and marks the kept positions: ``"sot"`` for
``<bos>``, ``"instruction"`` for tokens of the instruction (found by tokenizing the running call's
instruction), ``"word"``, ``"eot"``, ``"pad"`` for the rest.
"""

from __future__ import annotations

from typing import Any

import torch

from .._sites import CrossAttentionSite
from ._common import call_local, flat_stack_sites, latent_step_inputs, transformer_of

__all__ = ["FAMILY", "KERNEL", "STEPS_BY", "SUPPORTS", "TEXT_ENCODERS", "denoiser", "prompt_tokens", "sites", "spell",
           "step_inputs"]

FAMILY = "sana"
SUPPORTS = "SanaTransformer2DModel (Sana)"
#: The text encoder whose token ids make the sites' text axis (Gemma-2).
TEXT_ENCODERS = (("text_encoder",),)
#: Cross-attention: the processor is re-implemented with visible stages (``attnscope.hooks._processors``).
KERNEL = None
#: Steps are counted by denoiser calls.
STEPS_BY = "call"


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ``transformer`` when it is a ``SanaTransformer2DModel``, else None.

    >>> from attnscope.testing import tiny_sana_pipeline
    >>> type(denoiser(tiny_sana_pipeline())).__name__
    'SanaTransformer2DModel'
    """
    return transformer_of(pipe, "SanaTransformer2DModel")


def sites(model: torch.nn.Module, cross: bool = True) -> list[CrossAttentionSite]:
    """The ``attn2`` sites of ``model``, one per layer (``cross=False``: none — ``attn1`` is linear attention).

    >>> from attnscope.testing import tiny_sana_pipeline
    >>> [(s.name, s.block, s.heads, s.patch) for s in sites(tiny_sana_pipeline().transformer)]
    [('transformer_blocks.0.attn2', 'early', 2, 1), ('transformer_blocks.1.attn2', 'middle', 2, 1)]
    """
    return flat_stack_sites(model, FAMILY, cross) if cross else []


def step_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch, timestep, latent (h, w) and text length of one transformer call (the latent is ``(B, C, H, W)``).

    >>> step_inputs((torch.zeros(2, 4, 16, 32),), {"encoder_hidden_states": torch.zeros(2, 300, 8),
    ...                                           "timestep": torch.tensor([1000.0, 1000.0])})
    {'batch': 2, 'timestep': 1000.0, 'latent_shape': (16, 32), 'text_length': 300}
    """
    return latent_step_inputs(args, kwargs)


def prompt_tokens(tokenizer: Any, prompt: str, pipe: Any, setting: Any) -> tuple[int, int, str]:
    """``(count, reserved, what)``: the prompt's Gemma tokens and the positions of ``max_sequence_length`` it cannot
    use — 2 after an instruction (the pipeline keeps ``<bos>`` and the last ``max_sequence_length − 1`` positions of
    instruction + prompt), 1 without one (``<bos>``). ``setting(name)`` is a pipeline argument of the call.

    >>> import tempfile
    >>> from attnscope.testing import make_gemma_tokenizer
    >>> prompt_tokens(make_gemma_tokenizer(tempfile.mkdtemp()), "a red circle", None, lambda name: ["Say:"])
    (3, 2, 'Gemma tokens')
    """
    reserved = 2 if setting("complex_human_instruction") else 1
    return len(tokenizer(prompt, add_special_tokens=False).input_ids), reserved, "Gemma tokens"


def spell(tokenizer: Any, ids: list[int], text_length: int | None, pipe: Any = None, *,
          instruction: str | None = None) -> tuple[list[int], list[str], list[str]]:
    """The positions of the encoder's ``ids`` the sites see, their strings and their roles.

    With an instruction the encoder reads ``len(instruction) + 298`` tokens and the sites
    ``[0] + the last text_length − 1`` of them; without, all of them. The instruction is the running
    call's ``complex_human_instruction`` (read from ``pipe``'s running call unless ``instruction``
    is given; the positions it shares with the encoder's input, after ``<bos>``, are ``"instruction"``).

    Examples
    --------
    >>> import tempfile
    >>> from attnscope.testing import make_gemma_tokenizer
    >>> tok = make_gemma_tokenizer(tempfile.mkdtemp())
    >>> tok.padding_side = "right"
    >>> ids = tok("Say:a red circle", padding="max_length", max_length=5 + 8 - 2).input_ids   # "Say:" is 5 tokens
    >>> positions, tokens, roles = spell(tok, ids, 8, instruction="Say:")
    >>> positions, tokens
    ([0, 4, 5, 6, 7, 8, 9, 10], ['<bos>', ':', 'a', '▁red', '▁circle', '<pad>', '<pad>', '<pad>'])
    >>> roles
    ['sot', 'instruction', 'word', 'word', 'word', 'pad', 'pad', 'pad']
    """
    return _spell(tokenizer, ids, text_length, instruction if instruction is not None else _instruction(pipe))


def _instruction(pipe: Any) -> str | None:
    chi = call_local(pipe, "complex_human_instruction") if pipe is not None else None
    return "\n".join(chi) if chi else None


def _spell(tokenizer: Any, ids: list[int], text_length: int | None, instruction: str | None
           ) -> tuple[list[int], list[str], list[str]]:
    n = len(ids)
    positions = list(range(n)) if text_length is None or n <= text_length else [0, *range(n - text_length + 1, n)]
    shared = 0
    if instruction:
        instruction_ids = tokenizer(instruction, add_special_tokens=True).input_ids
        while shared < min(n, len(instruction_ids)) and ids[shared] == instruction_ids[shared]:
            shared += 1
    tokens = tokenizer.convert_ids_to_tokens([ids[p] for p in positions])
    roles, ended = [], False
    for p, tok in zip(positions, tokens):
        if ended or tok == tokenizer.pad_token:
            roles.append("pad")
        elif p == 0 and tok == tokenizer.bos_token:
            roles.append("sot")
        elif p < shared:
            roles.append("instruction")
        elif tok == tokenizer.eos_token:
            roles.append("eot")
            ended = True
        else:
            roles.append("word")
    return positions, tokens, roles

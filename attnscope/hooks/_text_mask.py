"""The pipeline's text mask against the prompts: a mask that hides another prompt's words is refused.

PixArt and Sana pipelines pass the denoiser ``encoder_attention_mask``, one row of 0/1 per batch row over
the text keys: 1 where a key is the prompt's, 0 on its padding. attnscope labels every text position of
a sample from that sample's own prompt (its negative prompt in the unconditional rows), so the mask of a
row must hide exactly the positions that hold its text's padding token. When it does not, the model did not
read the prompt it was given (its words are masked out, or padding is read as text) and every label, statistic
and edit of that sample would be about text the model never saw: one error, at the run's first step, before anything is recorded.

Known cause: diffusers' ``SanaPipeline.encode_prompt`` (0.42) repeats the mask per image as
``[p0, p1, p0, p1]`` while the embeddings are ``[p0, p0, p1, p1]`` (the negative prompts' alike), so with
``num_images_per_prompt > 1`` and prompts (or negative prompts) of different lengths samples get another one's mask.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AttnscopeError

__all__ = ["check_text_mask"]


def check_text_mask(mask: Any, step: Any, pad_id: int | None, uncond_ids: torch.Tensor | None = None) -> None:
    """Raise when ``mask`` (the denoiser's ``encoder_attention_mask``) hides other text than a row's padding (its
    prompt's ``pad_id`` tokens): a conditional row against its prompt's ids (``step.token_ids``), an unconditional row
    against its negative prompt's (``uncond_ids``, one row per prompt). No mask, no token ids or pad id, or a mask that
    is not 0/1 of shape ``(batch, text keys)``: nothing to check.

    Examples
    --------
    >>> from attnscope.hooks import RowLayout
    >>> from types import SimpleNamespace
    >>> step = SimpleNamespace(rows=RowLayout.for_batch(2, False, 2), token_ids=torch.tensor([[2, 5, 6, 0], [2, 5, 7, 8]]),
    ...                        token_text=(("<bos>", "\u2581a", "\u2581cat", "<pad>"), ("<bos>", "\u2581a", "\u2581big", "\u2581dog")))
    >>> check_text_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), step, pad_id=0)   # each row masks its own padding
    >>> check_text_mask(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), step, pad_id=0)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: the pipeline's text mask (encoder_attention_mask) does not fit the prompts: sample 0 (prompt 0) reads position 3 ('<pad>'), which is padding; sample 1 (prompt 1) masks position 3 ('\u2581dog') of its prompt. The model did not read the prompts it was given. Known cause: diffusers' SanaPipeline with num_images_per_prompt > 1 and prompts of different lengths (it repeats the mask in another order than the prompts); repeat each prompt in the prompt list instead, with num_images_per_prompt=1 (the same latents, seed for seed)
    """
    rows = step.rows
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or pad_id is None or mask.shape[0] != rows.batch:
        return
    if not bool(((mask == 0) | (mask == 1)).all()):  # a bias, not a keep mask: not the pipelines' form
        return
    branches = [(rows.cond, getattr(step, "token_ids", None), getattr(step, "token_text", None), "prompt")]
    if rows.uncond is not None:
        branches.append((rows.uncond, uncond_ids, getattr(step, "uncond_token_text", None), "negative prompt"))
    for branch_rows, ids, text, what in branches:
        if ids is None or ids.shape[-1] != mask.shape[1] or ids.shape[0] <= max(rows.prompt_of_sample):
            continue
        keep = mask[branch_rows].detach().cpu() > 0.5
        text = text or [[""] * ids.shape[-1]] * ids.shape[0]
        problems = []
        for sample, prompt in enumerate(rows.prompt_of_sample):
            wrong = (keep[sample] == (ids[prompt] == pad_id)).nonzero().flatten().tolist()
            if wrong:
                position = wrong[0]
                token = text[prompt][position]
                problems.append(f"sample {sample} ({what} {prompt}) " + (
                    f"reads position {position} ({token!r}), which is padding" if keep[sample, position] else
                    f"masks position {position} ({token!r}) of its {what}"))
        if problems:
            lists = "each prompt in the prompt list" if what == "prompt" else "each prompt and its negative prompt in their lists"
            raise AttnscopeError(
                f"the pipeline's text mask (encoder_attention_mask) does not fit the {what}s: " + "; ".join(problems[:4])
                + (f"; and {len(problems) - 4} more samples" if len(problems) > 4 else "")
                + f". The model did not read the {what}s it was given. Known cause: diffusers' SanaPipeline with "
                f"num_images_per_prompt > 1 and {what}s of different lengths (it repeats the mask in another order than "
                f"the {what}s); repeat {lists} instead, with num_images_per_prompt=1 (the same latents, seed for seed)")

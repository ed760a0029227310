"""What a hook client is told at each denoising step and at each attention call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AttnscopeError
from ._sites import CrossAttentionSite

__all__ = ["RowLayout", "StepContext", "CallContext"]


@dataclass(frozen=True)
class RowLayout:
    """How the rows of the denoiser's batch map to branches, prompts and images.

    With classifier-free guidance diffusers stacks ``[uncond rows; cond rows]``; within each half the
    rows are ordered prompt-major: ``prompt 0 image 0, prompt 0 image 1, …, prompt 1 image 0, …``.
    ``sample`` is the index of the generated image in the pipeline's output (same order).

    Examples
    --------
    >>> layout = RowLayout.for_batch(batch=8, guidance=True, num_prompts=2)
    >>> layout.cond, layout.samples, layout.prompt_of_sample, layout.image_of_sample
    (slice(4, 8, None), 4, (0, 0, 1, 1), (0, 1, 0, 1))
    """

    batch: int
    uncond: slice | None
    cond: slice
    prompt_of_sample: tuple[int, ...]
    image_of_sample: tuple[int, ...]

    @property
    def samples(self) -> int:
        return len(self.prompt_of_sample)

    def rows(self, branch: str) -> slice:
        """Row slice of ``branch`` (``"cond"`` or ``"uncond"``).

        >>> RowLayout.for_batch(batch=2, guidance=True, num_prompts=1).rows("uncond")
        slice(0, 1, None)
        >>> RowLayout.for_batch(batch=2, guidance=True, num_prompts=1).rows("negative")
        Traceback (most recent call last):
        attnscope.errors.AttnscopeError: branch='negative': expected 'cond' or 'uncond'
        """
        if branch == "cond":
            return self.cond
        if branch != "uncond":
            raise AttnscopeError(f"branch={branch!r}: expected 'cond' or 'uncond'")
        if self.uncond is None:
            raise AttnscopeError("branch='uncond': this batch has no unconditional rows (classifier-free guidance is off)")
        return self.uncond

    @classmethod
    def for_batch(cls, batch: int, guidance: bool, num_prompts: int | None) -> RowLayout:
        samples = batch // 2 if guidance and batch % 2 == 0 else batch
        guided = guidance and batch % 2 == 0
        if not num_prompts or samples % num_prompts:
            num_prompts = samples
        per_prompt = samples // num_prompts
        return cls(
            batch=batch,
            uncond=slice(0, samples) if guided else None,
            cond=slice(samples, 2 * samples) if guided else slice(0, samples),
            prompt_of_sample=tuple(i // per_prompt for i in range(samples)),
            image_of_sample=tuple(i % per_prompt for i in range(samples)),
        )


@dataclass(frozen=True)
class StepContext:
    """One denoiser forward pass (one denoising step).

    ``step`` counts denoiser calls from 0 within a run; ``num_steps`` is the run's planned number of
    denoiser calls when the pipeline exposes it (``pipe.num_timesteps``), else ``None``.
    ``token_ids`` are the prompts' token ids as the text encoders saw them, one row per prompt,
    the segments of the sites' text axis joined (SD3: CLIP then T5), or ``None`` when the
    pipeline was given embeddings instead of text. ``token_text`` spells them (one tuple of
    strings per prompt, ``""`` where unknown) and ``segments`` names each segment and its length
    (``(("clip", 77), ("t5", 256))``). ``text_length`` is the number of text keys the sites see.
    ``token_roles`` gives each position's role (:data:`attnscope.tokens.ROLES`) where the strings
    cannot tell it — an instruction the pipeline added around the prompt (Sana, Flux.2) — and is
    None where :func:`attnscope.tokens.token_roles` reads them from ``token_text``.
    ``uncond_token_text`` and ``uncond_token_roles`` are the same for the negative prompts that the
    unconditional rows read (one per prompt), or None when no text encoder ran for them (the
    pipeline was given negative embeddings, or zeros them: SDXL with no negative prompt) or the
    batch has no unconditional rows.
    ``single_branch`` is ``"uncond"`` or ``"cond"`` when a client asked the core to run only that
    half of a classifier-free-guidance batch at this step (TGATE after its gate): the denoiser then
    sees one row per image, ``rows`` describes that batch (no ``uncond`` slice; ``rows.cond`` covers
    all rows), and its prediction is duplicated into both halves so the pipeline's guidance combine
    returns it unchanged. ``None`` on ordinary steps.
    """

    run: int
    step: int
    timestep: float
    num_steps: int | None
    latent_shape: tuple[int, int]
    rows: RowLayout
    token_ids: torch.Tensor | None
    single_branch: str | None = None
    text_length: int | None = None
    token_text: tuple[tuple[str, ...], ...] | None = None
    segments: tuple[tuple[str, int], ...] = ()
    token_roles: tuple[tuple[str, ...], ...] | None = None
    uncond_token_text: tuple[tuple[str, ...], ...] | None = None
    uncond_token_roles: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class CallContext:
    """One call of one cross-attention site at one step.

    Examples
    --------
    A client's ``stages`` method usually looks only at ``ctx.site.name`` and ``ctx.step``:

    >>> def stages(ctx):
    ...     return ("probs",) if ctx.step < 10 else ()
    """

    site: CrossAttentionSite
    step_context: StepContext
    spatial_shape: tuple[int, int]
    tokens: int
    #: the site's query input ``(batch, h·w, channels)`` at a cross site (for output-stage clients that attend
    #: again with other keys, e.g. SpatialTemporal's local prompts); None at joint and self sites
    hidden_states: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def step(self) -> int:
        return self.step_context.step

    @property
    def timestep(self) -> float:
        return self.step_context.timestep

    @property
    def rows(self) -> RowLayout:
        return self.step_context.rows

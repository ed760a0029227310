"""The hook core: the one place attnscope intercepts a diffusers model.

``with hooks(pipe, *clients):`` swaps the processor of every site for a thin wrapper — a
cross-attention site's (:mod:`._processors`) or a joint-attention site's (:mod:`._joint`) —, adds
a pre-forward hook on the denoiser (step index, timestep, batch layout, text length) and one on
each text encoder whose ids spell the sites' text axis (and watches ``pipe.encode_prompt`` for a prompt
given as embeddings), and puts everything back exactly on exit,
also on errors. What a client offers is declared once, in :class:`~attnscope.hooks.HookClient`;
what differs between model families, in their adapters (:mod:`attnscope.hooks.families`).

Fast path: at a call where no client needs ``logits`` or ``probs``, the site's original processor
runs untouched (fused SDPA); ``output`` clients then see its return value. Where they are needed at
a cross site, Q, K, V are computed once, ``QKᵀ`` only over the text keys, and the output is
``probs @ V`` (``exact=True``: the fused kernel whenever nothing was edited, bit-identical to no
hooks). At a joint site the model's processor runs with its attention function replaced for the
call: the fused kernel's output and log-sum-exp, and the text block from them (``exact=True``: the
processor's own attention function whenever nothing was edited, its attention backend included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..errors import AttnscopeError
from ._added_tokens import added_tokens, mark_added_tokens
from ._cfg_batch import duplicate_prediction, select_rows
from ._checkpoint import checkpointed_denoiser
from ._client import STAGES, client_role
from ._context import CallContext, RowLayout, StepContext
from ._discovery import discover_self_sites, discover_sites, find_adapter, segment_name, text_segments
from ._joint import JointAttentionProcessor
from ._processors import IP_ADAPTER_TEXT, CrossAttentionProcessor, ScratchBuffers, SelfAttentionProcessor
from ._sites import CrossAttentionSite
from ._text_mask import check_text_mask
from .families import timestep_value

__all__ = ["HookSession", "hooks"]


class HookSession:
    """The installed state of :func:`hooks`: sites, clients, the current step."""

    def __init__(self, pipe: Any, clients: tuple[Any, ...], exact: bool = False):
        if not isinstance(exact, bool):
            raise AttnscopeError(f"exact={exact!r}: expected True or False")
        self.pipe, self.exact = pipe, exact
        self.adapter, self.denoiser = find_adapter(pipe)
        self.family: str = self.adapter.FAMILY
        self.sites: list[CrossAttentionSite] = discover_sites(pipe)
        #: per text segment of the sites' key axis: (pipeline attribute of its text encoder, its tokenizer)
        self.text_encoders = text_segments(pipe)
        roles = [client_role(client) for client in clients]  # the one place a client's role is read
        for i, client in enumerate(clients):
            if any(client is other for other in clients[:i]):
                raise AttnscopeError(f"client {client!r} is given twice: it would see (and edit) every call twice; "
                                     f"give each client once")
        #: interventions first, then observers, each in the order given
        self.interventions = [c for c, role in zip(clients, roles) if role == "intervention"]
        self.clients = self.interventions + [c for c, role in zip(clients, roles) if role == "observer"]
        self._intervening = {id(c) for c in self.interventions}
        self.self_clients = [c for c in self.clients if getattr(c, "self_attention", False)]
        self.self_sites: list[CrossAttentionSite] = discover_self_sites(pipe) if self.self_clients else []
        self.step_context: StepContext | None = None
        self._duplicate = False
        self._run, self._steps_in_run, self._new_run = -1, 0, True
        self._segment_ids: list[torch.Tensor | None] = [None] * len(self.text_encoders)
        self._negative_ids: list[torch.Tensor | None] = [None] * len(self.text_encoders)  # the uncond rows' text
        self._prompt_embedded = False  # the run's prompt came as prompt_embeds: every text encoded is a negative
        self._embedded_prompts: int | None = None  # then the number of prompts: prompt_embeds' rows
        self._text: tuple | None = None  # (token_ids, token_text, segments, token_roles) of the run
        self._uncond_text: tuple | None = None  # (token_text, token_roles) of the negative prompts, or (None, None)
        self._uncond_ids: torch.Tensor | None = None  # their token ids over the sites' text axis (the text mask's check)
        #: the padding token of a one-tokenizer text axis (the text mask's check), else None
        self._pad_id = getattr(self.text_encoders[0][1], "pad_token_id", None) if len(self.text_encoders) == 1 else None
        #: (timestep, the scheduler's step_index) of the last call shown to clients: a second call at both is a second
        #: pass of one step (Flux's true CFG); a second-order scheduler's correction call repeats the timestep only
        self._last_position: tuple | None = None
        #: (site, the stand-in processor installed there) of every wrapped site, checked before each denoiser call
        self._installed: list[tuple[CrossAttentionSite, Any]] = []
        #: ``(run, step)`` of the last step whose denoiser call returned (the run's prompt pass), None before any
        self.step_done: tuple[int, int] | None = None
        self._aside = False
        self._probing: Any = None  # the client whose own denoiser calls are running (:meth:`probe`)
        #: True while backward recomputes a checkpointed denoiser call (:meth:`checkpointing`)
        self.recomputing = False

    # -- for clients ----------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """The pipeline's own text embeddings of ``prompts`` (``pipe.encode_prompt``, no guidance), ``(len, tokens,
        dim)`` — for clients that need extra prompts (SpatialTemporal's local prompts). The run's prompt is not
        changed: the text-encoder hooks ignore these calls."""
        device = getattr(self.pipe, "_execution_device", None) or next(self.denoiser.parameters()).device
        params = inspect.signature(self.pipe.encode_prompt).parameters
        call: dict[str, Any] = {"prompt": list(prompts), "device": device, "num_images_per_prompt": 1}
        if "do_classifier_free_guidance" in params:  # SD, SDXL, PixArt, Sana; SD3, Flux: no negative unless given
            call["do_classifier_free_guidance"] = False
        for name in ("prompt_2", "prompt_3"):  # SD3 requires them: None reuses the prompt for that encoder
            if name in params and params[name].default is inspect.Parameter.empty:
                call[name] = None
        self._aside = True
        try:
            with torch.no_grad():
                out = self.pipe.encode_prompt(**call)
        finally:
            self._aside = False
        return out[0]

    @contextlib.contextmanager
    def probe(self, client: Any) -> Iterator[None]:
        """Denoiser calls a client makes itself inside the block (Attend-and-Excite's look at the step about to
        run): only ``client`` sees their attention calls, no step is counted, no ``on_step`` is called, and their
        step context has the step about to run, every row conditional and no token text."""
        if self._probing is not None:
            raise AttnscopeError(f"client {client!r}: probe() inside another client's probe ({self._probing!r})")
        if not any(client is c for c in self.clients):
            raise AttnscopeError(f"client {client!r}: probe() needs a client installed in this block (its calls are "
                                 f"shown to that client only)")
        saved = self.step_context, self._duplicate
        self._probing = client
        try:
            yield
        finally:
            self._probing = None
            self.step_context, self._duplicate = saved

    def checkpointing(self) -> contextlib.AbstractContextManager[None]:
        """Activation checkpointing of every denoiser call in the block, for clients that backpropagate through a
        whole sampling run: a call keeps only its inputs, backward recomputes it at the step it ran at, with
        :attr:`recomputing` True (clients that accumulate must not count those calls twice)."""
        return checkpointed_denoiser(self)

    # -- events from the pipeline ---------------------------------------------------------------
    def _start_text(self, call: bool = False) -> None:
        """The text of a new run is about to be encoded: forget the last run's. ``call``: ``pipe.check_inputs`` ran, a
        pipeline call begins; also after a call that ended with an error before its first step, whose text would
        otherwise be taken for this call's."""
        if self._steps_in_run > 0 or call:
            self._new_run, self._steps_in_run = True, 0
            self._segment_ids, self._text = [None] * len(self.text_encoders), None
            self._negative_ids, self._uncond_text, self._uncond_ids = [None] * len(self.text_encoders), None, None
            self._prompt_embedded, self._embedded_prompts = False, None

    def _on_encode_prompt(self, embeds: Any) -> None:
        """``pipe.encode_prompt`` is called; ``embeds``: its ``prompt_embeds``, or None. In a run's first call that
        means the prompt has no ids here, so the text the encoders see next is the negative prompt's (SD encodes
        it in the same call, Flux's true CFG in a second one); the embeddings' rows are the prompts."""
        if self._aside:
            return
        self._start_text()
        if embeds is not None and all(ids is None for ids in self._segment_ids) and not self._prompt_embedded:
            self._prompt_embedded = True
            self._embedded_prompts = int(embeds.shape[0]) if isinstance(embeds, torch.Tensor) and embeds.ndim else None

    def _on_text_encoder(self, segment: int, module: Any, args: tuple, kwargs: dict) -> None:
        if self._aside:  # a client's extra prompts (encode_text), not the run's
            return
        self._start_text()
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):  # the pipelines encode the prompt first, then the negative prompt
            first = self._segment_ids[segment] is None and not self._prompt_embedded
            seen = self._segment_ids if first else self._negative_ids
            if seen[segment] is None:
                seen[segment] = ids.detach().cpu()

    def _text_of_run(self, text_length: int | None) -> tuple:
        """``(token_ids, token_text, segments, token_roles)`` of this run's prompts, computed once per run."""
        if self._text is None:
            self._text = _prompt_text(self.text_encoders, self._segment_ids, text_length,
                                      getattr(self.adapter, "spell", None), self.pipe)
        return self._text

    def _uncond_text_of_run(self, text_length: int | None) -> tuple:
        """``(token_text, token_roles)`` of the negative prompts the unconditional rows read, ``(None, None)`` when
        no text encoder ran for them (embeddings given, or zeros: SDXL's ``force_zeros_for_empty_prompt``)."""
        if self._uncond_text is None:
            ids, text, _, roles = _prompt_text(self.text_encoders, self._negative_ids, text_length,
                                               getattr(self.adapter, "spell", None), self.pipe)
            self._uncond_text, self._uncond_ids = (text, roles), ids
        return self._uncond_text

    def _on_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._check_installed()
        self._check_caller()
        inputs = self.adapter.step_inputs(args, kwargs)
        timestep = self._scheduler_timestep(inputs["timestep"])
        num_steps = self._num_steps()
        if self._probing is not None:  # a client's own call: the step about to run, shown to that client only
            self.step_context, self._duplicate = StepContext(
                run=max(self._run, 0), step=0 if self._new_run else self._steps_in_run, timestep=timestep,
                num_steps=num_steps, latent_shape=inputs["latent_shape"],
                rows=RowLayout.for_batch(inputs["batch"], False, None), token_ids=None,
                text_length=inputs["text_length"]), False
            return None
        position = (timestep, getattr(getattr(self.pipe, "scheduler", None), "step_index", None))
        if not self._new_run and self.adapter.STEPS_BY == "timestep" and position == self._last_position:
            # a second pass of the same step (Flux's true CFG: the negative prompt): not shown to clients
            self.step_context, self._duplicate = None, False
            return None
        if self._new_run or (num_steps and self._steps_in_run >= num_steps):
            self._run, self._steps_in_run, self._new_run = self._run + 1, 0, False
        self._last_position = position
        guidance = self._guidance()
        ids, token_text, segments, token_roles = self._text_of_run(inputs["text_length"])
        prompts = len(token_text) if token_text is not None else None
        uncond_text, uncond_roles = self._uncond_text_of_run(inputs["text_length"]) if guidance else (None, None)
        if prompts is None:  # a prompt given as embeddings: one row per prompt, one negative per prompt
            prompts = self._embedded_prompts or (len(uncond_text) if uncond_text is not None else None)
        rows = RowLayout.for_batch(inputs["batch"], guidance, prompts)
        if not rows.uncond or (uncond_text is not None and len(uncond_text) != prompts):
            uncond_text = uncond_roles = None
        step = StepContext(
            run=self._run, step=self._steps_in_run, timestep=timestep, num_steps=num_steps,
            latent_shape=inputs["latent_shape"], rows=rows, token_ids=ids, text_length=inputs["text_length"],
            token_text=token_text, segments=segments, token_roles=token_roles,
            uncond_token_text=uncond_text, uncond_token_roles=uncond_roles,
        )
        if step.step == 0:
            check_text_mask(kwargs.get("encoder_attention_mask"), step, self._pad_id, self._uncond_ids if guidance else None)
        branch = self._single_branch(step)
        self._duplicate = branch is not None
        if branch is not None:  # run one half of the CFG batch; the post-hook duplicates the prediction
            keep = rows.rows(branch)
            args, kwargs = select_rows(args, rows.batch, keep), select_rows(kwargs, rows.batch, keep)
            step = dataclasses.replace(step, rows=RowLayout.for_batch(rows.samples, False, prompts), single_branch=branch)
        self.step_context = step
        self._steps_in_run += 1
        for client in self.clients:
            if hasattr(client, "on_step"):
                client.on_step(self.step_context)
        return (args, kwargs) if branch is not None else None

    def _check_caller(self) -> None:
        """The denoiser runs in a call of ``pipe`` (or is called directly), not of another pipeline sharing its modules
        (``StableDiffusionImg2ImgPipeline(**pipe.components)``), whose steps, guidance and prompt hooks on ``pipe``
        cannot see: one error naming it."""
        from diffusers import DiffusionPipeline

        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is self.pipe:
                return
            if isinstance(owner, DiffusionPipeline):
                raise AttnscopeError(
                    f"the denoiser was called by a {type(owner).__name__} that is not the pipeline given to "
                    f"`ats.hooks(pipe, ...)` (a {type(self.pipe).__name__} sharing its modules): the hooks cannot read "
                    f"that call's steps, guidance and prompt; install them on the pipeline you call")
            frame = frame.f_back

    def _check_installed(self) -> None:
        """Each wrapped site still has its stand-in processor; else one error naming the first site that lost it."""
        for site, wrapper in self._installed:
            if site.module.__dict__.get("processor") is not wrapper:
                found = type(getattr(site.module, "processor", None)).__name__
                raise AttnscopeError(
                    f"site {site.name}: its attention processor was replaced inside the `with ats.hooks(pipe, ...)` "
                    f"block (now {found}: set_attn_processor, set_default_attn_processor, enable_attention_slicing, "
                    f"...), so attnscope no longer sees its attention; set the processors before the block")

    def _scheduler_timestep(self, value: float) -> float:
        """The scheduler's timestep of a denoiser call whose input is ``value``: the adapter's ``TIMESTEP_SCALE``
        undone (Flux's pipelines pass ``t / 1000``) — exactly the scheduler's value, the pipeline's
        ``_current_timestep`` (else the scheduler's timestep nearest to it), when that is this call's."""
        scale = getattr(self.adapter, "TIMESTEP_SCALE", None)
        if scale is None:
            return value
        current = getattr(self.pipe, "_current_timestep", None)
        if current is None:  # FluxImg2Img, FluxInpaint, FluxFill, FluxControlNet set none: the schedule's nearest
            timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
            if timesteps is not None and len(timesteps):
                listed = timesteps.tolist() if hasattr(timesteps, "tolist") else list(timesteps)  # one device copy
                current = min(listed, key=lambda t: abs(float(t) - value * scale))
        if current is not None:
            current = timestep_value(current)
            # the model's input went through the latents' dtype (bfloat16: 3 significant digits) before the division
            if abs(current - value * scale) <= 1e-2 * max(abs(current), 1.0):
                return current
        return value * scale

    def _num_steps(self) -> int | None:
        """The run's planned denoiser steps: the pipeline's ``_num_timesteps``, else its scheduler's timesteps."""
        num_steps = getattr(self.pipe, "_num_timesteps", None)
        if num_steps is None:  # PixArt's pipelines keep no count; the scheduler is set before the first step
            timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
            num_steps = len(timesteps) if timesteps is not None else None
        return num_steps

    def _guidance(self) -> bool:
        """Whether the denoiser's batch stacks the CFG halves: the adapter's reading where it has one (PixArt keeps
        the flag as a local of its call; Flux.2 guides with separate calls, not stacked rows), else the pipeline's
        ``do_classifier_free_guidance``."""
        read = getattr(self.adapter, "guidance", None)
        if read is not None:
            return bool(read(self.pipe))
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def _single_branch(self, step: StepContext) -> str | None:
        """The one CFG branch the interventions want the denoiser to run at this step, or None."""
        wanted: set[str] = set()
        for client in self.interventions:
            if hasattr(client, "branches"):
                branches = client.branches(step)
                if branches is None:
                    continue
                if not set(branches) <= {"uncond", "cond"} or not branches:
                    raise AttnscopeError(f"client {client!r}: branches() returned {branches!r}, expected ('uncond',), "
                                         f"('cond',), ('uncond', 'cond') or None")
                if len(set(branches)) == 1:
                    wanted.add(branches[0])
        if len(wanted) > 1:
            raise AttnscopeError(f"step {step.step}: interventions ask for different single branches {sorted(wanted)}")
        if not wanted or step.rows.uncond is None:  # nothing asked, or no CFG batch to cut
            return None
        return wanted.pop()

    def _after_denoiser(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        step = self.step_context
        if self._probing is None and step is not None and not self.recomputing:
            self.step_done = (step.run, step.step)
        if not self._duplicate:
            return None
        self._duplicate = False
        return duplicate_prediction(output)

    # -- per call ---------------------------------------------------------------------------------
    def call_context(self, site: CrossAttentionSite, queries: int, tokens: int) -> CallContext:
        """The context of one call of ``site`` with ``queries`` image positions and ``tokens`` text keys."""
        step = self.step_context
        assert step is not None
        h, w = site.spatial_shape(step.latent_shape)
        if h * w != queries:
            raise AttnscopeError(
                f"site {site.name}: expected {h}x{w}={h * w} query positions for a {step.latent_shape} latent, got {queries}"
            )
        return CallContext(site=site, step_context=step, spatial_shape=(h, w), tokens=int(tokens))

    def plan(self, ctx: CallContext, clients: list[Any] | None = None) -> dict[str, list[Any]]:
        plan: dict[str, list[Any]] = {}
        for client in self._visible(self.clients if clients is None else clients):
            stages = client.stages(ctx)
            if isinstance(stages, str) or not isinstance(stages, Iterable):
                raise AttnscopeError(f"client {client!r}: stages() returned {stages!r} at {ctx.site.name}, expected a "
                                     f"collection of {STAGES} such as ('probs',), or () for none")
            for stage in dict.fromkeys(stages):  # a stage named twice is asked for once
                if stage not in STAGES:
                    raise AttnscopeError(f"client {client!r}: unknown stage {stage!r}, expected one of {STAGES}")
                plan.setdefault(stage, []).append(client)
        return plan

    def bypass(self, ctx: CallContext, clients: list[Any] | None = None, shape: tuple | None = None) -> Any:
        """The output an intervention's ``bypass`` returns for this call, or None; ``shape``: the module output's,
        where the caller knows it — one tensor's ``(sizes)`` or a tuple of them for a module returning several
        tensors, a size None where any fits (a cache of another batch or site is one error naming the client)."""
        for client in self._visible(self.interventions if clients is None else clients):
            if id(client) in self._intervening and hasattr(client, "bypass"):
                out = client.bypass(ctx)
                if out is not None:
                    if shape is not None and not _fits(out, shape):
                        raise AttnscopeError(f"client {client!r}: bypass() returned {_spell(out)} at {ctx.site.name} "
                                             f"step {ctx.step}, expected None or the module's output, {_spell(shape, expected=True)}")
                    return out
        return None

    def _visible(self, clients: list[Any]) -> list[Any]:
        """The clients shown an attention call: all of them, or during a :meth:`probe` only the probing one."""
        return clients if self._probing is None else [c for c in clients if c is self._probing]

    def skipped(self, plan: dict, ctx: CallContext) -> dict:
        """At a bypassed call: tell the clients that asked for logits/probs that those stages did not run, and return
        the plan of its ``output`` stage, observers only. The bypass's output (TGATE's cache) is final: it holds the
        edits of the interventions that acted when it was taken, so none edits it again."""
        told: list[Any] = []
        for client in plan.get("logits", []) + plan.get("probs", []):
            if hasattr(client, "on_skipped") and not any(client is c for c in told):
                told.append(client)
                client.on_skipped(ctx)
        return {"output": [c for c in plan.get("output", ()) if id(c) not in self._intervening]}

    def run_stage(self, stage: str, plan: dict, ctx: CallContext, tensor: torch.Tensor) -> torch.Tensor:
        for client in plan.get(stage, ()):
            result = getattr(client, f"on_{stage}")(ctx, tensor)
            if result is None:
                continue
            if id(client) not in self._intervening:
                raise AttnscopeError(f"client {client!r} is an observer but returned a tensor at stage {stage!r}")
            if not isinstance(result, torch.Tensor):
                raise AttnscopeError(f"client {client!r} returned {type(result).__name__} at stage {stage!r} of "
                                     f"{ctx.site.name}, expected None or a tensor of shape {tuple(tensor.shape)}")
            if result.shape != tensor.shape:
                raise AttnscopeError(
                    f"client {client!r} returned shape {tuple(result.shape)} at stage {stage!r} of {ctx.site.name}, "
                    f"expected {tuple(tensor.shape)}"
                )
            if result.device != tensor.device or not result.is_floating_point():
                raise AttnscopeError(
                    f"client {client!r} returned a {result.dtype} tensor on {result.device} at stage {stage!r} of "
                    f"{ctx.site.name}, expected a floating-point tensor on {tensor.device} (as handed: {tensor.dtype})"
                )
            if result.dtype != tensor.dtype:  # float64 for a float32 map: the model's layers need the handed dtype
                result = result.to(tensor.dtype)
            # the tensor it was handed, edited in place, is an edit too: the processors tell edits by identity
            tensor = result.view_as(result) if result is tensor else result
        return tensor


def _prompt_text(encoders: list[tuple[str | None, Any]], ids: list[torch.Tensor | None], text_length: int | None,
                 spell: Any = None, pipe: Any = None) -> tuple:
    """``(token_ids, token_text, segments, token_roles)``: the prompts' ids, strings and roles over the sites' text axis.

    Segments are joined in order; a segment whose encoder did not run (SD3 without T5: zeros) is
    spelled by empty strings. ``token_ids`` is None unless every segment was seen. An adapter's
    ``spell(tokenizer, ids, text_length, pipe)`` (single-segment families whose text axis is not
    the encoder's input as it is: Sana keeps ``[0] + the last 299`` positions after an instruction,
    Flux.2 wraps the prompt in a chat template) gives the positions the sites see, their strings and
    their roles; ``token_roles`` is None when every role can be read from the strings.
    """
    known = [i for i in ids if i is not None]
    if not known:
        return None, None, (), None
    prompts = known[0].shape[0]
    total = sum(i.shape[-1] for i in known)
    missing = (text_length - total) if text_length is not None else 0
    texts: list[list[str]] = [[] for _ in range(prompts)]
    roles: list[tuple[str, ...]] = []
    segments, kept_ids = [], []
    for (_, tokenizer), segment_ids in zip(encoders, ids):
        if segment_ids is None or segment_ids.shape[0] != prompts:
            length = max(0, missing)
            for row in texts:
                row.extend([""] * length)
            segments.append(("missing", length))
            continue
        positions = list(range(segment_ids.shape[-1]))
        spelled = spell is not None and tokenizer is not None and len(encoders) == 1
        for row, row_ids in zip(texts, segment_ids.tolist()):
            if spelled:  # one segment: the adapter says which positions the sites see and their roles
                positions, tokens, token_roles = spell(tokenizer, row_ids, text_length, pipe)
                roles.append(tuple(token_roles))
            else:
                tokens = _spelled_ids(tokenizer, row_ids)
            row.extend(tokens)
        kept_ids.append(segment_ids[:, positions])
        segments.append((segment_name(tokenizer), len(positions)))
    token_ids = torch.cat(kept_ids, dim=-1) if len(known) == len(ids) else None
    return token_ids, tuple(tuple(row) for row in texts), tuple(segments), tuple(roles) if roles else None


def _spelled_ids(tokenizer: Any, ids: list[int]) -> list[str]:
    """The strings of a segment's token ids (empty strings without a tokenizer); a CLIP tokenizer's added tokens
    (textual inversion's ``<tok>``) end their word (:func:`attnscope.hooks._added_tokens.mark_added_tokens`)."""
    if tokenizer is None:
        return [""] * len(ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    added = added_tokens(tokenizer) if segment_name(tokenizer) == "clip" else set()
    return mark_added_tokens(tokens, added) if added else tokens


def _swap_processor(module: torch.nn.Module, new: Any) -> Any:
    """Replace ``module.processor`` (an instance attribute, which attribute access finds first); return a token that
    restores it exactly. An nn.Module processor (an IP-Adapter's) stays the module's child meanwhile, so its weights
    stay in the module's parameters, ``state_dict`` (the manifest's weights fingerprint) and ``.to(...)``."""
    saved = (module.__dict__.get("processor"), "processor" in module.__dict__)
    module.__dict__["processor"] = new
    return saved


def _fits(out: Any, shape: tuple) -> bool:
    """Whether ``out`` is a tensor of ``shape`` (None: any size), or a tuple of such tensors for a tuple of shapes.

    >>> _fits(torch.zeros(2, 3), (2, None)), _fits((torch.zeros(2, 3), torch.zeros(2, 4)), ((2, 3), (2, 5)))
    (True, False)
    """
    if shape and isinstance(shape[0], tuple):
        return isinstance(out, (tuple, list)) and len(out) == len(shape) and all(map(_fits, out, shape))
    return (isinstance(out, torch.Tensor) and out.ndim == len(shape)
            and all(want is None or want == got for want, got in zip(shape, out.shape)))


def _spell(value: Any, *, expected: bool = False) -> str:
    """A bypass output (tensors in words by their shapes), or with ``expected`` a shape from :func:`_fits`.

    >>> _spell((torch.zeros(2, 3), 1)), _spell(((2, None), (2, 4)), expected=True)
    ('a tuple (shape (2, 3), int)', 'a tuple (shape (2, …), shape (2, 4))')
    """
    if expected and not (value and isinstance(value[0], tuple)):
        return f"shape ({', '.join('…' if v is None else str(v) for v in value)}{',' if len(value) == 1 else ''})"
    if isinstance(value, torch.Tensor):
        return _spell(tuple(value.shape), expected=True)
    if isinstance(value, (tuple, list)):
        return f"a tuple ({', '.join(_spell(v, expected=expected) for v in value)})"
    return type(value).__name__


def _refuse_nesting(session: HookSession) -> None:
    """Hooks already installed on this pipeline (an outer ``with hooks(...)``): the inner block would wrap the
    outer one's wrappers and fail at the first call that reads the attention, leaving empty stores behind."""
    hooked = (CrossAttentionProcessor, JointAttentionProcessor, SelfAttentionProcessor)
    if any(isinstance(site.module.processor, hooked) for site in session.sites):
        raise AttnscopeError("this pipeline already has attnscope hooks installed (an outer `with ats.hooks(pipe, "
                             "...)` block, or ats.capture/ats.rerun/eval running inside one): install every client "
                             "in one block, `with ats.hooks(pipe, client_a, client_b): ...`")


def _refuse_slicing(session: HookSession) -> None:
    """Attention slicing (``pipe.enable_attention_slicing()``) splits each site's attention into slices that attnscope
    cannot read whole: refused before anything is installed."""
    for site in [*session.sites, *session.self_sites]:
        name = type(site.module.processor).__name__
        if name.startswith("SlicedAttn"):
            raise AttnscopeError(f"site {site.name}: attention slicing is on ({name}), which computes the attention in "
                                 f"slices attnscope cannot read whole; call pipe.disable_attention_slicing() before "
                                 f"`ats.hooks(pipe, ...)`")


def _refuse_ip_adapter(session: HookSession) -> None:
    """An IP-Adapter (``pipe.load_ip_adapter(...)``) makes each cross-attention site attend to the text and, apart, to
    image-prompt tokens handed with it, adding ``scale ·`` that attention to the text's. Observers are shown the text
    part (UNet sites: ``IPAdapterAttnProcessor2_0``/``IPAdapterAttnProcessor``) while the processor makes the output;
    interventions, which would edit a computation attnscope does not mirror, and the IP-Adapters of other processors
    (SD3, Flux, xFormers) are refused before anything is installed, not at the first call."""
    for site in session.sites:
        name = type(site.module.processor).__name__
        if "IPAdapter" not in name:
            continue
        if site.kind != "cross" or name not in IP_ADAPTER_TEXT:
            raise AttnscopeError(f"site {site.name}: an IP-Adapter is loaded ({name}: the site also attends to image "
                                 f"tokens, which attnscope cannot record apart from the text with this processor); "
                                 f"call pipe.unload_ip_adapter() before `ats.hooks(pipe, ...)` (or ats.capture)")
        if session.interventions:
            names = ", ".join(type(c).__name__ for c in session.interventions)
            raise AttnscopeError(f"interventions ({names}) with an IP-Adapter loaded ({name} at {site.name}): the site "
                                 f"adds attention to image tokens to the text's, which interventions cannot edit "
                                 f"apart; record without interventions (ats.capture, ats.Recorder), or call "
                                 f"pipe.unload_ip_adapter() first")


def _watch_encode_prompt(session: HookSession, pipe: Any) -> Callable[[], None]:
    """Tell ``session`` of each ``pipe.encode_prompt`` call, and of each ``pipe.check_inputs`` call (the start of a
    pipeline call); returns the function that takes these watches away again."""
    method = getattr(pipe, "encode_prompt", None)
    signature = inspect.signature(method) if method is not None else None

    def encoding(*args: Any, **kwargs: Any) -> None:
        try:
            given = signature.bind_partial(*args, **kwargs).arguments.get("prompt_embeds")
        except TypeError:  # let the method itself report a bad call
            given = None
        session._on_encode_prompt(given)

    restores = [_watch(pipe, "check_inputs", lambda *args, **kwargs: session._start_text(call=True)),
                _watch(pipe, "encode_prompt", encoding)]

    def restore() -> None:
        for each in reversed(restores):
            each()
    return restore


def _watch(pipe: Any, name: str, event: Callable[..., None]) -> Callable[[], None]:
    """Call ``event`` with the arguments of each ``pipe.<name>`` call before the method runs (an instance attribute
    over the class's method); returns the function that takes it away again."""
    original, had = pipe.__dict__.get(name), name in pipe.__dict__
    method = getattr(pipe, name, None)
    if method is None:
        return lambda: None

    @functools.wraps(method)
    def watched(*args: Any, **kwargs: Any) -> Any:
        event(*args, **kwargs)
        return method(*args, **kwargs)

    setattr(pipe, name, watched)

    def restore() -> None:
        pipe.__dict__.pop(name, None)
        if had:
            pipe.__dict__[name] = original
    return restore


def _restore_processor(module: torch.nn.Module, saved: Any) -> None:
    """Put back the processor :func:`_swap_processor` took; the module's children stay as they are now (a LoRA or a
    fused projection added inside the block is kept)."""
    value, in_dict = saved
    module.__dict__.pop("processor", None)
    if in_dict:
        module.__dict__["processor"] = value


def hooks(pipe: Any, *clients: Any, exact: bool = False) -> contextlib.AbstractContextManager[HookSession]:
    """Install ``clients`` on every cross-attention site of ``pipe`` for the duration of the block.

    Parameters
    ----------
    pipe : diffusers pipeline
        With a supported denoiser: UNet2DConditionModel (SD 1.x, 2.x, SDXL), SD3Transformer2DModel (SD3,
        SD3.5), FluxTransformer2DModel (FLUX.1), Flux2Transformer2DModel (FLUX.2), PixArtTransformer2DModel
        (PixArt-α/Σ) or SanaTransformer2DModel (Sana); see docs/model-families.md.
    *clients
        Observers and interventions: objects following :class:`~attnscope.hooks.HookClient` (it
        documents the stages, the roles, the optional methods and the order they run in).
    exact : bool
        At calls where clients read ``logits``/``probs`` but change nothing, compute the output with
        the kernel the original processor uses (at joint sites: its own attention function and
        backend), so the image is bit-identical to a run without hooks. Costs one more attention
        computation per observed call (about +50% of the attention's time on CPU). Default: the
        output is ``probs @ V`` from the same probabilities (joint sites: torch's fused kernel),
        equal to the original up to float rounding. With an IP-Adapter loaded a cross site's output is always
        its processor's own (bit-identical either way; clients see the text part, docs/hooks.md).

    Examples
    --------
    An observer that counts the calls of the two sites in ``up_blocks.1`` (2 sites × 2 steps):

    >>> import attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> class Count:
    ...     calls = 0
    ...     def stages(self, ctx):
    ...         return ("probs",) if ctx.site.name.startswith("up_blocks.1") else ()
    ...     def on_probs(self, ctx, probs):
    ...         self.calls += 1
    >>> counter = Count()
    >>> with ats.hooks(pipe, counter):
    ...     _ = pipe("a red circle", num_inference_steps=2, height=32, width=32)
    >>> counter.calls
    4
    """
    return _OneBlock(functools.partial(_installed, pipe, clients, exact))


class _OneBlock(contextlib.AbstractContextManager):
    """What :func:`hooks` returns: the hooks of one ``with`` block; entering it a second time is an error
    (a generator-based context manager would fail there with contextlib's own AttributeError)."""

    def __init__(self, open_block: Callable[[], Any]):
        self._open, self._block = open_block, None

    def __enter__(self) -> HookSession:
        if self._block is not None:
            raise AttnscopeError("ats.hooks(...): this hooks object was already entered; it installs the hooks for "
                                 "one `with` block: call ats.hooks(pipe, *clients) again for each block")
        block = self._open()
        session = block.__enter__()  # a failed start leaves nothing installed: the object may be entered again
        self._block = block
        return session

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self._block.__exit__(*exc_info)


@contextlib.contextmanager
def _installed(pipe: Any, clients: tuple, exact: bool) -> Iterator[HookSession]:
    """:func:`hooks`' work: install, yield the session, restore everything (also after an exception)."""
    session = HookSession(pipe, clients, exact=exact)
    _refuse_nesting(session)
    _refuse_slicing(session)
    _refuse_ip_adapter(session)
    saved: list[tuple[torch.nn.Module, Any, Any]] = []
    handles = []
    unwatch: Callable[[], None] | None = None
    error: BaseException | None = None
    try:
        kernel, buffers = session.adapter.KERNEL, ScratchBuffers()  # one set of scratch tensors for every site
        for site in session.sites:
            wrapper = (JointAttentionProcessor(session, site, site.module.processor, kernel, buffers,
                                               getattr(session.adapter, "PROCESSORS", ())) if site.kind == "joint"
                       else CrossAttentionProcessor(session, site, site.module.processor, buffers))
            saved.append((site.module, _swap_processor(site.module, wrapper), wrapper))
            session._installed.append((site, wrapper))
        for site in session.self_sites:
            wrapper = SelfAttentionProcessor(session, site, site.module.processor)
            saved.append((site.module, _swap_processor(site.module, wrapper), wrapper))
            session._installed.append((site, wrapper))
        handles.append(session.denoiser.register_forward_pre_hook(session._on_denoiser, with_kwargs=True))
        handles.append(session.denoiser.register_forward_hook(session._after_denoiser, with_kwargs=True))
        for segment, (name, _) in enumerate(session.text_encoders):
            if name is not None:
                hook = functools.partial(session._on_text_encoder, segment)
                handles.append(getattr(pipe, name).register_forward_pre_hook(hook, with_kwargs=True))
        unwatch = _watch_encode_prompt(session, pipe)
        for client in session.clients:
            if hasattr(client, "on_install"):
                client.on_install(session)
        yield session
    except BaseException as exc:
        error = exc
        raise
    finally:
        if unwatch is not None:
            unwatch()
        for handle in handles:
            handle.remove()
        for module, token, wrapper in reversed(saved):
            if module.__dict__.get("processor") is wrapper:  # else replaced in the block: that processor stays
                _restore_processor(module, token)
        pending: BaseException | None = None
        for client in session.clients:
            if hasattr(client, "on_remove"):
                try:
                    client.on_remove(error)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    pending = pending or exc
        if pending is not None and error is None:
            raise pending

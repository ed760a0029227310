"""The hook core: the one place attnscope intercepts a diffusers model.

``with hooks(pipe, *clients):`` swaps the processor of every cross-attention site for a thin
wrapper (:mod:`._processors`), adds a pre-forward hook on the denoiser (step index, timestep, batch
layout) and one on the text encoder (the prompt's token ids), and puts everything back exactly on
exit, also on errors. What a client offers is declared once, in :class:`~attnscope.hooks.HookClient`.

Fast path: at a call where no client needs ``logits`` or ``probs``, the site's original processor
runs untouched (fused SDPA); ``output`` clients then see its return value. Where they are needed,
Q, K, V are computed once, ``QKᵀ`` only over the text keys, and the output is ``probs @ V``
(``exact=True``: the fused kernel whenever nothing was edited, bit-identical to no hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import AttnscopeError
from ._cfg_batch import duplicate_prediction, select_rows
from ._client import STAGES, client_role
from ._context import CallContext, RowLayout, StepContext
from ._discovery import discover_self_sites, discover_sites, find_denoiser
from ._processors import CrossAttentionProcessor, SelfAttentionProcessor
from ._sites import CrossAttentionSite

__all__ = ["HookSession", "hooks"]


class HookSession:
    """The installed state of :func:`hooks`: sites, clients, the current step."""

    def __init__(self, pipe: Any, clients: tuple[Any, ...], exact: bool = False):
        self.pipe, self.exact = pipe, exact
        self.family, self.denoiser = find_denoiser(pipe)
        self.sites: list[CrossAttentionSite] = discover_sites(pipe)
        roles = [client_role(client) for client in clients]  # the one place a client's role is read
        #: interventions first, then observers, each in the order given
        self.interventions = [c for c, role in zip(clients, roles) if role == "intervention"]
        self.clients = self.interventions + [c for c, role in zip(clients, roles) if role == "observer"]
        self._intervening = {id(c) for c in self.interventions}
        self.self_clients = [c for c in self.clients if getattr(c, "self_attention", False)]
        self.self_sites: list[CrossAttentionSite] = discover_self_sites(pipe) if self.self_clients else []
        self.step_context: StepContext | None = None
        self._duplicate = False
        self._run, self._steps_in_run, self._new_run = -1, 0, True
        self._token_ids: torch.Tensor | None = None

    # -- events from the pipeline ---------------------------------------------------------------
    def _on_text_encoder(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._steps_in_run > 0:
            self._new_run, self._steps_in_run, self._token_ids = True, 0, None
        ids = args[0] if args else kwargs.get("input_ids")
        if self._token_ids is None and isinstance(ids, torch.Tensor):
            self._token_ids = ids.detach().cpu()

    def _on_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        num_steps = getattr(self.pipe, "_num_timesteps", None)
        if self._new_run or (num_steps and self._steps_in_run >= num_steps):
            self._run, self._steps_in_run, self._new_run = self._run + 1, 0, False
        guidance = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        ids = self._token_ids
        prompts = ids.shape[0] if ids is not None else None
        rows = RowLayout.for_batch(sample.shape[0], guidance, prompts)
        timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        step = StepContext(
            run=self._run, step=self._steps_in_run, timestep=timestep, num_steps=num_steps,
            latent_shape=(int(sample.shape[-2]), int(sample.shape[-1])), rows=rows, token_ids=ids,
        )
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
        if not self._duplicate:
            return None
        self._duplicate = False
        return duplicate_prediction(output)

    # -- per call ---------------------------------------------------------------------------------
    def call_context(self, site: CrossAttentionSite, hidden_states: torch.Tensor, text: torch.Tensor) -> CallContext:
        step = self.step_context
        assert step is not None
        h, w = site.spatial_shape(step.latent_shape)
        queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[-2] * hidden_states.shape[-1]
        if h * w != queries:
            raise AttnscopeError(
                f"site {site.name}: expected {h}x{w}={h * w} query positions for a {step.latent_shape} latent, got {queries}"
            )
        return CallContext(site=site, step_context=step, spatial_shape=(h, w), tokens=int(text.shape[1]))

    def plan(self, ctx: CallContext, clients: list[Any] | None = None) -> dict[str, list[Any]]:
        plan: dict[str, list[Any]] = {}
        for client in self.clients if clients is None else clients:
            for stage in client.stages(ctx):
                if stage not in STAGES:
                    raise AttnscopeError(f"client {client!r}: unknown stage {stage!r}, expected one of {STAGES}")
                plan.setdefault(stage, []).append(client)
        return plan

    def bypass(self, ctx: CallContext, clients: list[Any] | None = None) -> torch.Tensor | None:
        for client in self.interventions if clients is None else clients:
            if id(client) in self._intervening and hasattr(client, "bypass"):
                out = client.bypass(ctx)
                if out is not None:
                    return out
        return None

    def skipped(self, plan: dict, ctx: CallContext) -> None:
        """Tell the clients that asked for logits/probs at a bypassed call that those stages did not run."""
        told: list[Any] = []
        for client in plan.get("logits", []) + plan.get("probs", []):
            if hasattr(client, "on_skipped") and not any(client is c for c in told):
                told.append(client)
                client.on_skipped(ctx)

    def run_stage(self, stage: str, plan: dict, ctx: CallContext, tensor: torch.Tensor) -> torch.Tensor:
        for client in plan.get(stage, ()):
            result = getattr(client, f"on_{stage}")(ctx, tensor)
            if result is None:
                continue
            if id(client) not in self._intervening:
                raise AttnscopeError(f"client {client!r} is an observer but returned a tensor at stage {stage!r}")
            if result.shape != tensor.shape:
                raise AttnscopeError(
                    f"client {client!r} returned shape {tuple(result.shape)} at stage {stage!r} of {ctx.site.name}, "
                    f"expected {tuple(tensor.shape)}"
                )
            tensor = result
        return tensor


def _swap_processor(module: torch.nn.Module, new: Any) -> Any:
    """Replace ``module.processor``; return a token that restores it exactly (also nn.Module processors)."""
    saved = (module.__dict__.get("processor"), "processor" in module.__dict__, dict(module._modules))
    module._modules.pop("processor", None)
    module.__dict__["processor"] = new
    return saved


def _restore_processor(module: torch.nn.Module, saved: Any) -> None:
    value, in_dict, modules = saved
    module.__dict__.pop("processor", None)
    if in_dict:
        module.__dict__["processor"] = value
    module._modules.clear()
    module._modules.update(modules)


@contextlib.contextmanager
def hooks(pipe: Any, *clients: Any, exact: bool = False) -> Iterator[HookSession]:
    """Install ``clients`` on every cross-attention site of ``pipe`` for the duration of the block.

    Parameters
    ----------
    pipe : diffusers pipeline
        With a UNet2DConditionModel denoiser (SD 1.x, 2.x, SDXL).
    *clients
        Observers and interventions: objects following :class:`~attnscope.hooks.HookClient` (it
        documents the stages, the roles, the optional methods and the order they run in).
    exact : bool
        At calls where clients read ``logits``/``probs`` but change nothing, compute the output with
        the fused kernel as the original processor does, so the image is bit-identical to a run
        without hooks. Costs one more attention computation per observed call (about +50% of the
        attention's time on CPU). Default: the output is ``probs @ V`` from the same probabilities,
        equal to the fused result up to float rounding.

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
    session = HookSession(pipe, clients, exact=exact)
    saved: list[tuple[torch.nn.Module, Any]] = []
    handles = []
    error: BaseException | None = None
    try:
        for site in session.sites:
            saved.append((site.module, _swap_processor(site.module, CrossAttentionProcessor(session, site, site.module.processor))))
        for site in session.self_sites:
            saved.append((site.module, _swap_processor(site.module, SelfAttentionProcessor(session, site, site.module.processor))))
        handles.append(session.denoiser.register_forward_pre_hook(session._on_denoiser, with_kwargs=True))
        handles.append(session.denoiser.register_forward_hook(session._after_denoiser, with_kwargs=True))
        text_encoder = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
        if text_encoder is not None:
            handles.append(text_encoder.register_forward_pre_hook(session._on_text_encoder, with_kwargs=True))
        for client in session.clients:
            if hasattr(client, "on_install"):
                client.on_install(session)
        yield session
    except BaseException as exc:
        error = exc
        raise
    finally:
        for handle in handles:
            handle.remove()
        for module, token in reversed(saved):
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

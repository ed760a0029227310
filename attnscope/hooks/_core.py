"""The hook core: the one place attnscope intercepts a diffusers model.

``with hooks(pipe, *clients):`` swaps the processor of every cross-attention site for a thin
wrapper, adds a pre-forward hook on the denoiser (step index, timestep, batch layout) and one on the
text encoder (the prompt's token ids), and puts everything back exactly on exit, also on errors.

Client protocol
---------------
A client is any object with:

``role``
    ``"intervention"`` (may replace tensors) or ``"observer"`` (may only look; the default when the
    attribute is missing).
``stages(ctx) -> Collection[str]``
    Which of ``"logits"``, ``"probs"``, ``"output"`` it needs at this call (``ctx`` is a
    :class:`~attnscope.context.CallContext`: site, step, timestep, rows, spatial shape).
``on_logits(ctx, logits)``, ``on_probs(ctx, probs)``, ``on_output(ctx, output)``
    Called for the stages it asked for. ``logits`` and ``probs`` are ``(batch, heads, h*w, tokens)``:
    the pre-softmax ``QKᵀ/√d`` (attention mask added) and its softmax over the text tokens.
    ``output`` is what the attention module returns (after ``to_out``). Return ``None`` to leave
    the tensor as it is, or a tensor of the same shape to replace it (interventions only).

Optional methods: ``bypass(ctx)`` (interventions; return the module output to skip computing the
attention at this call, e.g. a cache), ``on_skipped(ctx)`` (told that a call where it asked for
``logits``/``probs`` was bypassed, so those stages did not run), ``branches(step_ctx)``
(interventions; return ``("uncond",)`` or ``("cond",)`` to run the denoiser on that half of a
classifier-free-guidance batch only at this step, ``None`` for both), ``on_install(session)``,
``on_step(step_ctx)``, ``on_remove(error)``.

Self-attention: a client with ``self_attention = True`` is also shown the denoiser's self-attention
modules (sites of kind ``"self"``), where only ``output`` and ``bypass`` exist (self-attention is
never materialised). Other clients never see them.

Order: interventions first, in the order given, each seeing the previous one's result; then
observers, in the order given, all seeing the final tensors.

Fast path: at a call where no client needs ``logits`` or ``probs``, the site's original processor
runs untouched (fused SDPA); ``output`` clients then see its return value. Where they are needed,
Q, K, V are computed once, ``QKᵀ`` only over the text keys, and the output is ``probs @ V``
(``exact=True``: the fused kernel whenever nothing was edited, bit-identical to no hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .cfg_batch import duplicate_prediction, select_rows
from .context import CallContext, RowLayout, StepContext
from .errors import AttnscopeError
from .sites import CrossAttentionSite, discover_self_sites, discover_sites, find_denoiser

__all__ = ["hooks", "HookSession", "STAGES"]

STAGES = ("logits", "probs", "output")


def _signature_stub(fn: Any) -> Any:
    def stub(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("signature stub")

    stub.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return stub


def _sole_reference(scratch: dict[str, torch.Tensor], key: str) -> bool:
    """True when ``scratch[key]`` is referenced only by ``scratch`` (no tensor, view or autograd node
    elsewhere); False when unsure."""
    tensor = scratch.get(key)
    if tensor is None:
        return False
    try:  # references to the Python object: the dict, `tensor`, getrefcount's argument
        python_refs = sys.getrefcount(tensor) - 3
        # references to the storage: this tensor and the temporary storage object made by the call
        storage_refs = torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 2
    except (AttributeError, RuntimeError):  # private API gone: never reuse
        return False
    return python_refs == 0 and storage_refs == 0


class _SiteProcessor:
    """Stands in for one site's processor while hooks are installed."""

    def __init__(self, session: HookSession, site: CrossAttentionSite, original: Any):
        self.session, self.site, self.original = session, site, original
        self._scratch: dict[str, torch.Tensor] = {}
        # Attention.forward passes on only the cross_attention_kwargs that `processor.__call__`
        # names: show it the original's signature so exactly the same kwargs reach us.
        self.__call__ = _signature_stub(original.__call__)

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        session = self.session
        encoder_hidden_states = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if session.step_context is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        ctx = session.call_context(self.site, hidden_states, encoder_hidden_states)
        plan = session.plan(ctx)
        output = session.bypass(ctx)
        if output is not None:
            session.skipped(plan, ctx)
        else:
            if plan.get("logits") or plan.get("probs"):
                if args:
                    raise AttnscopeError(f"site {self.site.name}: expected keyword arguments from Attention.forward")
                output = self._attend(ctx, plan, attn, hidden_states, **kwargs)
            else:
                output = self.original(attn, hidden_states, *args, **kwargs)
        return session.run_stage("output", plan, ctx, output)

    def _buffer(self, key: str, shape: tuple[int, ...], *inputs: torch.Tensor) -> torch.Tensor | None:
        """An ``out=`` tensor to compute into, or None to let the op allocate.

        On the CPU a fresh multi-MB tensor costs a page fault per 4 KiB on every call (as much as the
        attention itself), so the last one is reused — but only when nothing else (a client keeping
        the tensor or a view of it, autograd) still references it. None on GPUs (the caching
        allocator already reuses memory) and when autograd records the op (``out=`` can't be
        differentiated)."""
        like = inputs[0]
        if like.device.type != "cpu" or (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            return None
        if _sole_reference(self._scratch, key):
            buf = self._scratch[key]
            if buf.shape == shape and buf.dtype == like.dtype:
                return buf
        buf = self._scratch[key] = torch.empty(shape, dtype=like.dtype)
        return buf

    def _attend(self, ctx: CallContext, plan: dict, attn: Any, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                temb: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """AttnProcessor2_0's computation with the logits/probs stages made visible."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if type(self.original) not in (AttnProcessor2_0, AttnProcessor):
            raise AttnscopeError(
                f"site {self.site.name}: reading logits/probs needs AttnProcessor2_0 or AttnProcessor, got "
                f"{type(self.original).__name__}; call pipe.unet.set_default_attn_processor() first"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        session = self.session
        rows, queries, tokens = batch_size * attn.heads, query.shape[-2], key.shape[-2]
        logits = torch.baddbmm(  # scaled QKᵀ in one pass (the scale SDPA uses); beta=0 ignores the input
            query.new_empty(1, 1, 1), query.reshape(rows, queries, head_dim),
            key.reshape(rows, tokens, head_dim).transpose(1, 2), beta=0, alpha=head_dim**-0.5,
            out=self._buffer("logits", (rows, queries, tokens), query, key),
        ).view(batch_size, attn.heads, queries, tokens)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attention_mask, float("-inf"))
            else:
                logits = logits + attention_mask
        edited = session.run_stage("logits", plan, ctx, logits)
        probs = torch.softmax(edited, dim=-1, out=self._buffer("probs", edited.shape, edited))
        final = session.run_stage("probs", plan, ctx, probs)
        if session.exact and edited is logits and final is probs:  # observed only: the fused kernel, bit-identical
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        else:
            out = final.to(value.dtype) @ value
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _SelfAttentionProcessor:
    """Stands in for a self-attention module's processor: ``bypass`` and ``output`` only."""

    def __init__(self, session: HookSession, site: CrossAttentionSite, original: Any):
        self.session, self.site, self.original = session, site, original
        self.__call__ = _signature_stub(original.__call__)

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        session = self.session
        if session.step_context is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        ctx = session.call_context(self.site, hidden_states, hidden_states)
        plan = session.plan(ctx, session.self_clients)
        if plan.get("logits") or plan.get("probs"):
            raise AttnscopeError(f"self-attention site {self.site.name}: only the 'output' stage and bypass exist there")
        output = session.bypass(ctx, session.self_clients)
        if output is None:
            output = self.original(attn, hidden_states, *args, **kwargs)
        return session.run_stage("output", plan, ctx, output)


class HookSession:
    """The installed state of :func:`hooks`: sites, clients, the current step."""

    def __init__(self, pipe: Any, clients: tuple[Any, ...], exact: bool = False):
        self.pipe, self.exact = pipe, exact
        self.family, self.denoiser = find_denoiser(pipe)
        self.sites: list[CrossAttentionSite] = discover_sites(pipe)
        for client in clients:
            role = getattr(client, "role", "observer")
            if role not in ("intervention", "observer") or not callable(getattr(client, "stages", None)):
                raise AttnscopeError(
                    f"client {client!r}: expected an object with role 'intervention' or 'observer' and a "
                    f"stages(ctx) method, got role={role!r}"
                )
        self.clients = [c for c in clients if getattr(c, "role", "observer") == "intervention"]
        self.clients += [c for c in clients if getattr(c, "role", "observer") == "observer"]
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
        for client in self.clients:
            if getattr(client, "role", "observer") == "intervention" and hasattr(client, "branches"):
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
        for client in self.clients if clients is None else clients:
            if getattr(client, "role", "observer") == "intervention" and hasattr(client, "bypass"):
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
            if getattr(client, "role", "observer") != "intervention":
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
        Observers and interventions (see the module docstring for the protocol and the order).
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
            saved.append((site.module, _swap_processor(site.module, _SiteProcessor(session, site, site.module.processor))))
        for site in session.self_sites:
            saved.append((site.module, _swap_processor(site.module, _SelfAttentionProcessor(session, site, site.module.processor))))
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

"""The attention processors the hook core swaps in: cross-attention with visible stages, self-attention with bypass."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttnscopeError
from ._context import CallContext
from ._sites import CrossAttentionSite

__all__ = ["IP_ADAPTER_TEXT", "CrossAttentionProcessor", "ScratchBuffers", "SelfAttentionProcessor", "signature_stub", "text_states"]


def signature_stub(fn: Any) -> Any:
    def stub(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("signature stub")

    stub.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return stub


def _queries(hidden_states: torch.Tensor) -> int:
    """Query positions of an attention input: ``(batch, seq, dim)`` or ``(batch, channels, h, w)``."""
    return int(hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[-2] * hidden_states.shape[-1])


def _output_shape(attn: Any, hidden_states: torch.Tensor) -> tuple[int, ...] | None:
    """The shape of what an ``Attention`` module returns for ``hidden_states``, None where unsure."""
    if hidden_states.ndim == 4:  # (batch, channels, h, w) in, the same out
        return tuple(hidden_states.shape)
    out_dim = getattr(attn, "out_dim", None)
    return (*hidden_states.shape[:2], out_dim) if hidden_states.ndim == 3 and isinstance(out_dim, int) else None


def _sole_reference(scratch: dict[Any, torch.Tensor], key: Any) -> bool:
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


class ScratchBuffers:
    """``out=`` tensors for large per-call results, reused from call to call on the CPU.

    On the CPU a fresh multi-MB tensor costs a page fault per 4 KiB on every call (as much as the
    attention itself), so the last one of each key, shape and dtype is reused — but only when nothing
    else (a client keeping the tensor or a view of it, autograd) still references it. One instance
    serves every site of a hook session: the memory held grows with the distinct map sizes (a
    UNet's resolution levels), not with the number of sites. Calling returns None on GPUs (the caching
    allocator already reuses memory) and when autograd records the op (``out=`` can't be
    differentiated): then let the op allocate.

    >>> buffers = ScratchBuffers()
    >>> a = buffers("probs", (2, 3), torch.zeros(1))
    >>> b = buffers("probs", (2, 3), torch.zeros(1))   # `a` is still referenced here: a new tensor
    >>> b is a
    False
    >>> c = buffers("probs", (3, 2), torch.zeros(1))   # another shape: a slot of its own
    >>> kept = b.data_ptr()
    >>> del a, b                                         # nothing references the (2, 3) one now: reused
    >>> buffers("probs", (2, 3), torch.zeros(1)).data_ptr() == kept
    True
    """

    def __init__(self) -> None:
        self._scratch: dict[tuple, torch.Tensor] = {}

    def __call__(self, key: str, shape: tuple[int, ...], *inputs: torch.Tensor, dtype: torch.dtype | None = None
                 ) -> torch.Tensor | None:
        like = inputs[0]
        dtype = like.dtype if dtype is None else dtype
        if like.device.type != "cpu" or (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            return None
        slot = (key, tuple(shape), dtype)
        if _sole_reference(self._scratch, slot):
            return self._scratch[slot]
        buf = self._scratch[slot] = torch.empty(shape, dtype=dtype)
        return buf


class CrossAttentionProcessor:
    """Stands in for one cross-attention site's processor while hooks are installed.

    At a call where no client needs ``logits`` or ``probs`` it runs the site's original processor.
    Where they are needed it computes the attention itself, mirroring diffusers'
    ``AttnProcessor2_0`` (``diffusers.models.attention_processor``) step by step — spatial norm,
    4-D inputs, attention mask, group norm, ``norm_cross``, ``norm_q``/``norm_k``, ``to_out``,
    residual connection, ``rescale_output_factor`` — with ``QKᵀ/√d`` and its softmax made visible
    as the ``logits`` and ``probs`` stages; it accepts sites whose original processor is
    ``AttnProcessor2_0``, ``AttnProcessor`` (the same computation without SDPA) or Sana's
    ``SanaAttnProcessor2_0`` (q/k norms before the heads are split). With an IP-Adapter's processor
    (``IPAdapterAttnProcessor2_0``/``IPAdapterAttnProcessor``) the stages show the text part — the same
    computation over the text keys alone — to observers, and the processor itself then makes the output. Tested against
    diffusers 0.42 (the version CI installs; ``pyproject.toml`` admits 0.35 and later): with
    ``exact=True`` an observed call is bit-identical to the original processor.
    """

    def __init__(self, session: Any, site: CrossAttentionSite, original: Any, buffers: ScratchBuffers | None = None):
        self.session, self.site, self.original = session, site, original
        self._buffer = buffers if buffers is not None else ScratchBuffers()  # the session's, shared by its sites
        # Attention.forward passes on only the cross_attention_kwargs that `processor.__call__`
        # names: show it the original's signature so exactly the same kwargs reach us.
        self.__call__ = signature_stub(original.__call__)

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        session = self.session
        encoder_hidden_states = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if session.step_context is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        text = text_states(encoder_hidden_states)
        ctx = session.call_context(self.site, _queries(hidden_states), int(text.shape[1]))
        if hidden_states.ndim == 3:  # the queries' input, for output-stage clients that attend again
            ctx = dataclasses.replace(ctx, hidden_states=hidden_states)
        plan = session.plan(ctx)
        output = session.bypass(ctx, shape=_output_shape(attn, hidden_states))
        if output is not None:
            plan = session.skipped(plan, ctx)
        else:
            if plan.get("logits") or plan.get("probs"):
                if args:
                    raise AttnscopeError(f"site {self.site.name}: expected keyword arguments from Attention.forward")
                output = self._attend(ctx, plan, attn, hidden_states, **{**kwargs, "encoder_hidden_states": text})
                if output is None:  # IP-Adapter: the text part was observed; the processor adds the image part
                    output = self.original(attn, hidden_states, **kwargs)
            else:
                output = self.original(attn, hidden_states, *args, **kwargs)
        return session.run_stage("output", plan, ctx, output)

    def _attend(self, ctx: CallContext, plan: dict, attn: Any, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                temb: torch.Tensor | None = None, **_: Any) -> torch.Tensor | None:
        """AttnProcessor2_0's computation with the logits/probs stages made visible (SanaAttnProcessor2_0's: the
        same with the q/k norms applied before the heads are split; AttnProcessor's: ``attn.scale``, no q/k norms;
        FusedAttnProcessor2_0's: key and value from ``to_kv``; an IP-Adapter's: its text part, which is
        AttnProcessor2_0's or AttnProcessor's, and None once the stages have run: the caller runs the processor)."""
        name = type(self.original).__name__
        ip_adapter = name in IP_ADAPTER_TEXT
        name = IP_ADAPTER_TEXT.get(name, name)
        if name not in _KNOWN_PROCESSORS:
            raise AttnscopeError(
                f"site {self.site.name}: reading logits/probs needs one of {', '.join(_KNOWN_PROCESSORS)}, got "
                f"{name}; call the denoiser's set_default_attn_processor() before `ats.hooks(...)`"
            )
        norm_before_heads = name == "SanaAttnProcessor2_0"
        classic = name == "AttnProcessor"  # attn.get_attention_scores: attn.scale, no q/k norms (as it computes)
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
        if name == "FusedAttnProcessor2_0":  # pipe.fuse_qkv_projections(): key and value from one fused projection
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if norm_before_heads:
            query, key = _normed(attn, query, key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if not (norm_before_heads or classic):
            query, key = _normed(attn, query, key)

        session = self.session
        rows, queries, tokens = batch_size * attn.heads, query.shape[-2], key.shape[-2]
        scale = attn.scale if classic else head_dim**-0.5  # the classic processor's, or the one SDPA uses
        wide = _score_dtype(attn, query.dtype, classic)
        logits = torch.baddbmm(  # scaled QKᵀ in one pass; beta=0 ignores the input
            query.new_empty(1, 1, 1, dtype=wide), query.reshape(rows, queries, head_dim).to(wide),
            key.reshape(rows, tokens, head_dim).to(wide).transpose(1, 2), beta=0, alpha=scale,
            out=self._buffer("logits", (rows, queries, tokens), query, key, dtype=wide),
        ).view(batch_size, attn.heads, queries, tokens)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attention_mask, float("-inf"))
            else:
                logits = logits + attention_mask
        edited = session.run_stage("logits", plan, ctx, logits)
        probs = torch.softmax(edited, dim=-1, out=self._buffer("probs", edited.shape, edited))
        final = session.run_stage("probs", plan, ctx, probs)
        if ip_adapter:  # observers only (interventions are refused at install): the output is the processor's own
            return None
        if session.exact and edited is logits and final is probs and classic:
            # observed only: AttnProcessor's own computation (no fused kernel), bit-identical
            mask = attention_mask.reshape(rows, -1, tokens) if attention_mask is not None else None
            scores = attn.get_attention_scores(query.reshape(rows, queries, head_dim),
                                               key.reshape(rows, tokens, head_dim), mask)
            out = torch.bmm(scores, value.reshape(rows, tokens, head_dim)).view(batch_size, attn.heads, queries, head_dim)
        elif session.exact and edited is logits and final is probs:  # observed only: the fused kernel, bit-identical
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


#: the cross-attention processors whose computation :class:`CrossAttentionProcessor` mirrors
_KNOWN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "SanaAttnProcessor2_0", "FusedAttnProcessor2_0")


#: IP-Adapter processors (``pipe.load_ip_adapter``) whose text part is the computation of a processor above: the
#: queries attend to the text keys alone, then ``scale ·`` attention to each adapter's image tokens is added
IP_ADAPTER_TEXT = {"IPAdapterAttnProcessor2_0": "AttnProcessor2_0", "IPAdapterAttnProcessor": "AttnProcessor"}


def text_states(encoder_hidden_states: Any) -> torch.Tensor:
    """The text states a cross-attention call attends to: the first of the ``(text, [image tokens, …])`` pair a UNet
    hands its sites with an IP-Adapter loaded, else ``encoder_hidden_states`` itself.

    >>> text_states((torch.zeros(2, 77, 8), [torch.zeros(2, 1, 4, 8)])).shape
    torch.Size([2, 77, 8])
    """
    return encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states


def _score_dtype(attn: Any, dtype: torch.dtype, classic: bool) -> torch.dtype:
    """The dtype the site's processor computes its scores and softmax in: float32 for half-precision inputs (torch's
    fused SDPA kernels accumulate ``QKᵀ`` and the softmax in float32; a bfloat16 score rounds by up to 0.25 at 40, a
    probability by 13 %), the inputs' own for ``AttnProcessor`` unless the module upcasts (``upcast_attention``,
    ``upcast_softmax``: SD 2.x's fp16 fix), as its ``get_attention_scores`` does.

    >>> from types import SimpleNamespace as Module
    >>> plain, upcast = Module(upcast_attention=False, upcast_softmax=False), Module(upcast_attention=True, upcast_softmax=False)
    >>> _score_dtype(plain, torch.bfloat16, False), _score_dtype(plain, torch.float16, True)
    (torch.float32, torch.float16)
    >>> _score_dtype(upcast, torch.float16, True), _score_dtype(plain, torch.float64, False)
    (torch.float32, torch.float64)
    """
    if classic and not (getattr(attn, "upcast_attention", False) or getattr(attn, "upcast_softmax", False)):
        return dtype
    return torch.promote_types(dtype, torch.float32)


def _normed(attn: Any, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn.norm_q(query)``, ``attn.norm_k(key)`` where the module has them."""
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key


class SelfAttentionProcessor:
    """Stands in for a self-attention module's processor: ``bypass`` and ``output`` only."""

    def __init__(self, session: Any, site: CrossAttentionSite, original: Any):
        self.session, self.site, self.original = session, site, original
        self.__call__ = signature_stub(original.__call__)

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        session = self.session
        if session.step_context is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        ctx = session.call_context(self.site, _queries(hidden_states), _queries(hidden_states))
        plan = session.plan(ctx, session.self_clients)
        if plan.get("logits") or plan.get("probs"):
            raise AttnscopeError(f"self-attention site {self.site.name}: only the 'output' stage and bypass exist there")
        output = session.bypass(ctx, session.self_clients, _output_shape(attn, hidden_states))
        if output is None:
            output = self.original(attn, hidden_states, *args, **kwargs)
        else:
            plan = session.skipped(plan, ctx)
        return session.run_stage("output", plan, ctx, output)

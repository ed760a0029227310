"""Joint attention (SD3, Flux): the text block of the model's own softmax, made visible as stages.

In a joint attention image and text tokens attend together: one softmax over the keys of both.
Its cross part is the block image queries × text keys, ``P = exp(scale·q·k_textᵀ − LSE_all)``,
whose rows sum to the pixel's attention mass on text, not to 1. Nothing here materialises the
full ``(N+T)²`` matrix: the log-sum-exp over all keys comes from the attention kernel itself (the
fused CPU or CUDA flash kernel returns it with the output) or, where none gives it, from a pass
over query chunks.

The wrapper does not re-implement the model's processor. It runs the processor as it is (its
projections, norms, RoPE and concatenation) with the one attention call it makes replaced by
:func:`joint_attention` for the duration of the call: the kernel sees the final ``q, k, v``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import AttnscopeError
from ._context import CallContext
from ._processors import ScratchBuffers, signature_stub
from ._sites import CrossAttentionSite

__all__ = ["JointAttentionProcessor", "attention_with_lse", "joint_attention"]

_CHUNK_ELEMENTS = 1 << 24  # logits elements per chunk of the fallback (64 MiB in float32)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(out, lse)`` of ``(batch, heads, seq, dim)`` tensors, never holding the whole score matrix.

    ``out`` is what ``F.scaled_dot_product_attention`` returns (bit for bit on the CPU, where the
    same fused kernel runs); ``lse`` is the float32 log-sum-exp of each query's scaled scores,
    ``(batch, heads, seq_q)``. With autograd recording, or where no fused kernel applies, the
    scores are computed in float32 over chunks of queries.

    Examples
    --------
    >>> q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    >>> out, lse = attention_with_lse(q, k, v)
    >>> torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 2, dim=-1), atol=1e-5)
    True
    >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)
    True
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad:
        try:
            if q.device.type == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
                return out, lse.to(torch.promote_types(q.dtype, torch.float32))
            if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
                return out, lse.float()
        except (RuntimeError, AttributeError, NotImplementedError):
            pass  # no fused kernel for these inputs: the chunked path below
    return _chunked_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


def _chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = max(1, _CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[-2]))
    wide = torch.promote_types(q.dtype, torch.float32)
    kt, vf = k.to(wide).transpose(-1, -2), v.to(wide)
    outs, lses = [], []
    for start in range(0, q.shape[-2], rows):
        scores = (q[..., start:start + rows, :].to(wide) @ kt) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse[..., None]) @ vf)
        lses.append(lse)
    return torch.cat(outs, dim=-2).to(v.dtype), torch.cat(lses, dim=-1)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice,
                    stage: Callable[[str, torch.Tensor], torch.Tensor], scale: float | None = None,
                    logits_stage: bool = True, buffer: Callable[..., torch.Tensor | None] | None = None) -> torch.Tensor:
    """Joint softmax attention of ``(batch, heads, seq, dim)`` tensors with its text block passed through ``stage``.

    ``stage("logits", L)`` gets the scaled scores of image queries × text keys, ``(batch, heads,
    N, T)``, and may return edited ones: the edit then changes the joint softmax itself (the image
    keys' scores stay). ``stage("probs", P)`` gets that block of the joint softmax — rows sum to the
    pixel's mass on text — and may return replacement probabilities, which are used as given for
    the text keys while the image keys keep their weights. Text queries are never edited. Without
    edits the result is the kernel's own output, untouched. ``logits_stage=False`` skips the
    ``logits`` stage (no client reads it: the probabilities are then computed in one pass);
    ``buffer(key, shape, like)`` may give ``out=`` tensors to reuse (:class:`ScratchBuffers`).

    Examples
    --------
    Adding 0.7 to one text key's scores through ``stage`` equals the joint softmax with that score edited:

    >>> q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64) for _ in range(3))
    >>> def edit(name, t):
    ...     return t + torch.tensor([0.0, 0.7], dtype=t.dtype) if name == "logits" else t
    >>> out = joint_attention(q, k, v, image=slice(0, 4), text=slice(4, 6), stage=edit)
    >>> scores = q @ k.transpose(-1, -2) / 2
    >>> scores[..., :4, 5] += 0.7
    >>> torch.allclose(out, torch.softmax(scores, -1) @ v)
    True
    """
    out, lse = attention_with_lse(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    buffer = buffer or _no_buffer
    wide = torch.promote_types(q.dtype, torch.float32)  # float32 scores for half inputs, as the LSE
    q_image, k_text, v_text = q[:, :, image], k[:, :, text], v[:, :, text]
    b, h, n, d = q_image.shape
    t = k_text.shape[-2]
    qs = (q_image.to(wide) * scale).reshape(b * h, n, d)
    kt = k_text.to(wide).reshape(b * h, t, d).transpose(1, 2)
    lse_image = lse[:, :, image].to(wide)
    logits = edited = None
    if logits_stage:
        logits = torch.bmm(qs, kt, out=buffer("logits", (b * h, n, t), qs)).view(b, h, n, t)
        edited = stage("logits", logits)
    image_only: tuple[torch.Tensor, torch.Tensor] | None = None
    if edited is logits:
        lse_all = lse_image
        target = buffer("probs", (b * h, n, t), qs)
        if logits is None:  # exp(q·kᵀ·scale − LSE) with the subtraction in the matmul's epilogue
            probs = torch.baddbmm(lse_image.reshape(b * h, n, 1), qs, kt, beta=-1, out=target)
        else:
            probs = torch.sub(logits.view(b * h, n, t), lse_image.reshape(b * h, n, 1), out=target)
        probs = probs.exp_().view(b, h, n, t)
    else:  # the edit changes the normaliser: image keys' part from the kernel, text part from the edited scores
        image_only = attention_with_lse(q_image, k[:, :, image], v[:, :, image], scale)
        lse_all = torch.logaddexp(image_only[1].to(wide), torch.logsumexp(edited, dim=-1))
        probs = torch.exp(edited - lse_all[..., None])
    final = stage("probs", probs)
    if edited is logits and final is probs:
        return out
    if image_only is None:
        image_only = attention_with_lse(q_image, k[:, :, image], v[:, :, image], scale)
    o_image, lse_from_image = image_only
    weight = torch.exp(lse_from_image.to(wide) - lse_all)[..., None]
    mixed = weight * o_image.to(wide) + final.to(wide) @ v_text.to(wide)
    out = out.clone()
    out[:, :, image] = mixed.to(out.dtype)
    return out


def _no_buffer(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _kernel_replaced(target: tuple[str, str], kernel: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Replace the attention function ``target`` (module, name) by ``kernel`` for the block; yields the original."""
    module = importlib.import_module(target[0])
    original = getattr(module, target[1])
    setattr(module, target[1], kernel)
    try:
        yield original
    finally:
        setattr(module, target[1], original)


class JointAttentionProcessor:
    """Stands in for one joint-attention site's processor while hooks are installed.

    At a call where no client needs ``logits`` or ``probs`` the original processor runs untouched
    (with the attention backend it was given). Where they are needed, the original processor still
    runs, with its attention kernel replaced by :func:`joint_attention` for that call. The
    ``output`` stage sees the image stream's output (the first element of a double-stream block's
    pair; the image rows of a single-stream block's sequence).
    """

    def __init__(self, session: Any, site: CrossAttentionSite, original: Any, kernel: tuple[str, str, str],
                 buffers: ScratchBuffers | None = None, processors: tuple[str, ...] = ()):
        self.session, self.site, self.original = session, site, original
        self._known = processors
        self._target, self._layout = (kernel[0], kernel[1]), kernel[2]
        # one set for all joint sites of a session: they run one after the other with the same shapes,
        # and a text block per site kept alive would cost sites × (heads · N · T) floats
        self._buffer = buffers if buffers is not None else ScratchBuffers()
        self.__call__ = signature_stub(original.__call__)

    # `model.set_attention_backend(...)` while hooks are installed reaches the original processor
    @property
    def _attention_backend(self) -> Any:
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return self.original._parallel_config

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        step = session.step_context
        if step is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        encoder = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if encoder is not None:
            tokens, images = int(encoder.shape[1]), int(hidden_states.shape[1])
        else:  # a single-stream block: text and image already concatenated, the length from the model call
            if step.text_length is None:
                raise AttnscopeError(f"site {self.site.name}: the text length of this call is unknown")
            tokens = step.text_length
            images = int(hidden_states.shape[1]) - tokens
        ctx = session.call_context(self.site, images, tokens)
        plan = session.plan(ctx)
        batch = int(hidden_states.shape[0])
        output = session.bypass(ctx, shape=((batch, images, None), (batch, tokens, None)) if encoder is not None
                                else (batch, tokens + images, None))
        if output is not None:
            plan = session.skipped(plan, ctx)
        elif plan.get("logits") or plan.get("probs"):
            output = self._observed(ctx, plan, images, tokens, attn, hidden_states, *args, **kwargs)
        else:
            output = self.original(attn, hidden_states, *args, **kwargs)
        if not plan.get("output"):
            return output
        single = encoder is None
        part = output[:, tokens:] if single else output[0]
        new = session.run_stage("output", plan, ctx, part)
        if new is part:
            return output
        if single:
            return torch.cat([output[:, :tokens], new], dim=1)
        return (new, *output[1:])

    def _observed(self, ctx: CallContext, plan: dict, images: int, tokens: int, attn: Any, hidden_states: torch.Tensor,
                  *args: Any, **kwargs: Any) -> Any:
        if self._known and type(self.original).__name__ not in self._known:
            raise AttnscopeError(
                f"site {self.site.name}: reading logits/probs needs one of the processors {list(self._known)}, got "
                f"{type(self.original).__name__}; put the default back with "
                f"{type(self.session.denoiser).__name__}.set_attn_processor({self._known[0]}()) "
                f"(clients that read no logits/probs still work with any processor)")
        text_first = self.site.text_layout == "text_first"
        image = slice(tokens, tokens + images) if text_first else slice(0, images)
        text = slice(0, tokens) if text_first else slice(images, images + tokens)
        session, calls, edits = self.session, [], []

        def stage(name: str, tensor: torch.Tensor) -> torch.Tensor:
            result = session.run_stage(name, plan, ctx, tensor)
            if result is not tensor:
                edits.append(name)
            return result

        def kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   **rest: Any) -> torch.Tensor:
            if attn_mask is not None or is_causal or dropout_p:
                raise AttnscopeError(f"site {self.site.name}: reading logits/probs of a masked, causal or dropout "
                                     f"joint attention is not supported")
            calls.append(1)
            options = {"image": image, "text": text, "stage": stage, "scale": scale, "buffer": self._buffer,
                       "logits_stage": bool(plan.get("logits"))}
            if self._layout == "bshd":  # (batch, seq, heads, dim), diffusers' dispatch_attention_fn
                out = joint_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                      **options).transpose(1, 2)
            else:
                out = joint_attention(query, key, value, **options)
            if session.exact and not edits:  # observed only: the processor's own call (its backend), bit-identical
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, **rest)
            return out

        with _kernel_replaced(self._target, kernel) as original:  # kernel() calls it where exact asks for it
            output = self.original(attn, hidden_states, *args, **kwargs)
        if len(calls) != 1:
            raise AttnscopeError(
                f"site {self.site.name}: the processor {type(self.original).__name__} made {len(calls)} calls to "
                f"{'.'.join(self._target)}, expected exactly 1; reading logits/probs needs the family's default processor"
            )
        return output

"""The hook client protocol: what an observer or an intervention offers the hook core."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol, runtime_checkable

from ..errors import AttnscopeError
from ._context import CallContext

__all__ = ["HookClient", "OPTIONAL_METHODS", "ROLES", "STAGES", "client_role", "prepare_clients"]

#: The stages of one attention call a client can observe or replace, in the order they happen.
STAGES = ("logits", "probs", "output")
#: ``"intervention"``: may replace tensors, bypass calls and choose CFG branches; ``"observer"``: may only look.
ROLES = ("intervention", "observer")
#: Methods a client may define besides ``stages``; each is called only where it exists (``prepare`` by the runners
#: that know the whole pipeline call, through :func:`prepare_clients`; the others by the core).
OPTIONAL_METHODS = ("on_logits", "on_probs", "on_output", "bypass", "on_skipped", "branches", "on_install", "on_step",
                    "on_remove", "prepare")


@runtime_checkable
class HookClient(Protocol):
    """What :func:`attnscope.hooks` accepts as a client. Nothing to subclass: any object with these members.

    Attributes
    ----------
    role : {"intervention", "observer"}, optional
        Interventions may return replacement tensors, ``bypass`` calls and choose ``branches``;
        observers only look. An object without ``role`` is an observer.
    self_attention : bool, optional
        ``True`` to be shown the denoiser's self-attention modules too (sites of kind ``"self"``,
        where only ``output`` and ``bypass`` exist: self-attention is never materialised).
        Default ``False``.

    Methods
    -------
    stages(ctx) -> Collection[str]
        Required. Which of :data:`STAGES` the client needs at this call; ``ctx`` is a
        :class:`~attnscope.hooks.CallContext` (site, step, timestep, rows, spatial shape). When no
        client needs ``logits`` or ``probs`` at a call, the site's original processor runs untouched.
    on_logits(ctx, logits), on_probs(ctx, probs), on_output(ctx, output)
        Called for the stages asked for. ``logits``/``probs`` are ``(batch, heads, h*w, tokens)``:
        the pre-softmax ``QKᵀ/√d`` over the text keys (attention mask added) and its softmax;
        ``output`` is the attention module's return value (after ``to_out``). Return ``None`` to
        leave the tensor as it is, or a tensor of the same shape and device to replace it (interventions
        only; cast to the handed tensor's dtype; the tensor handed in, edited in place and returned, is a
        replacement too).
    bypass(ctx) -> Tensor | None
        Interventions: return the module output to skip the attention at this call (a cache). That
        output is final: at the call, ``on_output`` runs for observers only.
    on_skipped(ctx)
        Told that a call where it asked for ``logits``/``probs`` was bypassed, so they did not run.
    branches(step_ctx) -> tuple[str, ...] | None
        Interventions: ``("uncond",)`` or ``("cond",)`` to run the denoiser on that half of a
        classifier-free-guidance batch only at this step (``step_ctx`` is a
        :class:`~attnscope.hooks.StepContext`), ``None`` for both.
    on_install(session), on_step(step_ctx), on_remove(error)
        Installed (``session`` is the :class:`~attnscope.hooks.HookSession`), a denoising step
        starts, removed (``error`` is the exception that ended the block, or ``None``; called for
        every client, also when an ``on_install``, its own or another's, raised).
    prepare(pipe, call)
        Before the hooks are installed, the exact pipeline call about to run (``call``: the keyword
        arguments, prompt and generator included), from the runners that know it —
        :func:`attnscope.rerun` and ``attnscope eval`` (:func:`prepare_clients`). SpatialTemporal
        optimises its λ there.

    Order: interventions first, in the order given, each seeing the previous one's result; then
    observers, in the order given, all seeing the final tensors.

    Examples
    --------
    >>> class CountProbs:
    ...     calls = 0
    ...     def stages(self, ctx):
    ...         return ("probs",)
    ...     def on_probs(self, ctx, probs):
    ...         self.calls += 1
    >>> isinstance(CountProbs(), HookClient), client_role(CountProbs())
    (True, 'observer')
    """

    def stages(self, ctx: CallContext) -> Collection[str]: ...


def client_role(client: Any) -> str:
    """The role of a hook client (``"observer"`` when it declares none); AttnscopeError if it is no client.

    >>> class Edit:
    ...     role = "intervention"
    ...     def stages(self, ctx):
    ...         return ()
    >>> client_role(Edit())
    'intervention'
    >>> client_role(Edit)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: client Edit: expected an instance of a hook client, got the class itself; give Edit(...)
    >>> client_role("a red circle")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: client 'a red circle': expected an object with role 'intervention' or 'observer' and a stages(ctx) method (a hook client: attnscope.hooks.HookClient), got role='observer' and no stages(ctx) method
    """
    if isinstance(client, type):  # `ats.hooks(pipe, Counter)`: its stages(ctx) would be called without an instance
        raise AttnscopeError(f"client {client.__name__}: expected an instance of a hook client, got the class itself; "
                             f"give {client.__name__}(...)")
    role = getattr(client, "role", "observer")
    if role not in ROLES or not callable(getattr(client, "stages", None)):
        has_stages = "a stages(ctx) method" if callable(getattr(client, "stages", None)) else "no stages(ctx) method"
        raise AttnscopeError(f"client {client!r}: expected an object with role 'intervention' or 'observer' and a "
                             f"stages(ctx) method (a hook client: attnscope.hooks.HookClient), got role={role!r} and "
                             f"{has_stages}")
    return role


def prepare_clients(clients: Any, pipe: Any, call: dict[str, Any]) -> None:
    """Hand ``call`` (the keyword arguments of the pipeline call about to run) to every client with a ``prepare``.

    >>> class Fit:
    ...     def stages(self, ctx):
    ...         return ()
    ...     def prepare(self, pipe, call):
    ...         self.seen = sorted(call)
    >>> fit = Fit()
    >>> prepare_clients([fit, object()], None, {"prompt": "a cat", "generator": None})
    >>> fit.seen
    ['generator', 'prompt']
    """
    for client in clients:
        if callable(getattr(client, "prepare", None)):
            client.prepare(pipe, call)

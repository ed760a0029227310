"""TGATE (seed 002, Liu et al.): cache the cross-attention output at the gate step, then skip text.

Steps are counted from 0. With ``gate_step = g`` the first ``g`` steps run in full; at step ``g − 1``
every cross-attention site keeps its output averaged over the two classifier-free-guidance halves
(the ``to_out`` output: cross-attention modules have no residual inside); from step ``g`` on each
site returns that cache instead of attending, and the denoiser runs on the unconditional half only
(one row per image, no guidance combine). The CFG cut is the hook core's step-level branch control
(``branches``), the same for every pipeline family: no pipeline's denoising loop is copied.

V2 (``sp_interval`` given) also caches self-attention outputs, on the official schedule: before the
gate, steps below ``warm_up`` compute, step ``warm_up`` and every ``sp_interval``-th step compute and
refresh the cache, the others reuse it; at step ``g − 1`` the cache is refreshed (CFG-averaged);
after the gate, every ``fi_interval``-th step computes and refreshes, the others reuse.
The official algorithm and where attnscope departs from it: docs/tgate.md, "The algorithm, from the
official code".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import AttnscopeError
from ..hooks import find_denoiser
from ._scope import is_integer, is_real, repr_options, steps_note
from ._trajectory import planned_steps

__all__ = ["TGate"]


def _positive_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int (numpy's integers too), or one error naming it.

    >>> import numpy as np
    >>> _positive_int("sp_interval", np.int64(3), 1)
    3
    """
    if not is_integer(value) or value < minimum:
        raise AttnscopeError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


#: the families TGATE is defined on: cross-attention whose output can be cached on its own (the
#: official code covers SD-1.5/2.1/XL and PixArt-α/Σ)
_FAMILIES = {"unet": "Stable Diffusion 1.x, 2.x, SDXL", "pixart": "PixArt-α, PixArt-Σ"}
_REFUSED = {
    "sd3": "joint attention, where text and image share one softmax",
    "flux": "joint attention, where text and image share one softmax",
    "flux2": "joint attention, where text and image share one softmax",
    "sana": "a linear self-attention (no official TGATE rule for Sana's attn1 cache)",
}


class TGate:
    """Cache cross-attention after the gate step and drop classifier-free guidance (TGATE).

    Parameters
    ----------
    gate_step : int, float or "auto"
        Number of steps computed in full, which is also the index of the first gated step (official:
        10 of 25 for SD-1.5/2.1/XL, 8 for PixArt). A float in (0, 1) is a fraction of each run's
        steps (``0.4``: 10 of 25, 8 of 20), rounded, at least 1; :meth:`resolve` turns it into the
        step index when a run starts. ``"auto"``: :func:`attnscope.stats.suggest_gate_step` of
        ``reference`` at ``tol``. A gate beyond a run's steps (``50`` on a 20-step run) is refused
        before the run's first step; a gate equal to its steps runs it in full (nothing gated).
    reference : Trace, optional
        The trace whose convergence sets ``gate_step="auto"``.
    tol : float
        Tolerance for ``"auto"`` (relative step-to-step change of the cross-attention).
    drop_guidance : bool
        After the gate run the denoiser on the unconditional half only (official, most of the
        speed-up). ``False`` keeps the CFG batch and only serves the cache (an ablation).
    sp_interval, warm_up, fi_interval : int, optional
        TGATE V2's self-attention cache (off unless ``sp_interval`` is given): refresh interval
        before the gate, steps always computed at the start (default 2), refresh interval after the
        gate (default 1: always computed).

    Attributes
    ----------
    cache : dict
        Site name → the cached cross-attention output of the current run.
    computed : dict
        Site name → the steps at which it attended during the last run (cross and self sites);
        ``gated_steps``: the steps served from the cross-attention cache.
    fraction : float or None
        ``gate_step`` as given, when it was a fraction; ``gate_step`` is then the step it resolved to
        for the last (or prepared) run, ``None`` before any.

    Examples
    --------
    >>> import attnscope as ats, torch
    >>> pipe = ats.load_pipeline("shapes")
    >>> gate = ats.regulate.TGate(3)
    >>> with ats.hooks(pipe, gate):
    ...     image = pipe("a red circle and a blue square", num_inference_steps=6,
    ...                  generator=torch.Generator().manual_seed(0)).images[0]
    >>> gate.gated_steps
    [3, 4, 5]
    """

    role = "intervention"

    def __init__(self, gate_step: int | str = 10, *, reference: Any = None, tol: float = 0.05,
                 drop_guidance: bool = True, sp_interval: int | None = None, warm_up: int = 2,
                 fi_interval: int = 1):
        if not is_real(tol) or not 0 < tol < math.inf:  # numpy's numbers too
            raise AttnscopeError(f"tol={tol!r}: expected a positive finite number (a relative change)")
        tol = float(tol)
        if not isinstance(drop_guidance, (bool, np.bool_)):
            raise AttnscopeError(f"drop_guidance={drop_guidance!r}: expected True or False")
        drop_guidance = bool(drop_guidance)
        self.auto = isinstance(gate_step, str) and gate_step == "auto"
        if self.auto:
            if reference is None:
                raise AttnscopeError("gate_step='auto': pass reference=<a Trace> whose convergence sets the gate step")
            from ..stats import suggest_gate_step

            gate_step = suggest_gate_step(reference, tol=tol)
        elif reference is not None:
            raise AttnscopeError(f"reference= is used only with gate_step='auto', got gate_step={gate_step!r}")
        if is_integer(gate_step):
            gate_step = int(gate_step)  # numpy's integers (a step index read from an array) are integers too
        elif is_real(gate_step):
            gate_step = float(gate_step)  # numpy's floats (np.float32(0.4)) are fractions too
        if isinstance(gate_step, float):
            if not 0 < gate_step < 1:
                raise AttnscopeError(f"gate_step={gate_step!r}: expected an integer >= 1 or a fraction in (0, 1)")
            self.fraction: float | None = gate_step
            self.gate_step: int | None = None  # resolved for each run: resolve(num_steps)
        else:
            self.fraction = None
            if isinstance(gate_step, bool) or not isinstance(gate_step, int) or gate_step < 1:
                raise AttnscopeError(f"gate_step={gate_step!r}: expected the number of steps to run in full (an "
                                     f"integer >= 1), a fraction of the steps in (0, 1), or 'auto'")
            self.gate_step = gate_step
        self.tol, self.drop_guidance = tol, drop_guidance
        self.sp_interval = None if sp_interval is None else _positive_int("sp_interval", sp_interval, 1)
        self.warm_up = _positive_int("warm_up", warm_up, 0)
        self.fi_interval = _positive_int("fi_interval", fi_interval, 1)
        #: a V2 TGate is shown the self-attention modules too (hook core protocol)
        self.self_attention = self.sp_interval is not None
        self.cache: dict[str, torch.Tensor] = {}
        self.computed: dict[str, list[int]] = {}
        self.gated_steps: list[int] = []
        self._prepared: int | None = None  # the gate step prepare() resolved (and a manifest may describe)
        self._pipe: Any = None  # the pipeline installed on, for the note of a steps error

    def __repr__(self) -> str:
        given = {"drop_guidance": (self.drop_guidance, True), "sp_interval": (self.sp_interval, None)}
        if self.sp_interval is not None:
            given.update(warm_up=(self.warm_up, 2), fi_interval=(self.fi_interval, 1))
        return f"TGate({self.fraction if self.fraction is not None else self.gate_step}{repr_options(given)})"

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> TGate:
        """The gate a manifest describes (an entry of ``manifest["interventions"]``): a fraction as the fraction, an
        ``"auto"`` gate as the step it resolved to.

        >>> gate = TGate(0.4, sp_interval=3)
        >>> _ = gate.resolve(20)
        >>> TGate.from_description(gate.describe())
        TGate(0.4, sp_interval=3)
        """
        if not isinstance(description, dict) or description.get("name") != "TGate":
            raise AttnscopeError(f"description={description!r}: expected a TGate description (an entry of a trace's "
                                 f"manifest['interventions'])")
        p = description.get("params", {})
        gate = p["fraction"] if p.get("fraction") is not None else p.get("gate_step")
        return cls(gate, drop_guidance=p.get("drop_guidance", True), sp_interval=p.get("sp_interval"),
                   warm_up=p.get("warm_up", 2), fi_interval=p.get("fi_interval", 1))

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests: ``gate_step`` is the step index the run used (the first gated
        step), ``fraction`` the value given when it was a fraction (``gate_step`` is ``None`` until resolved).

        >>> gate = TGate(0.4)
        >>> _ = gate.resolve(20)
        >>> gate.describe()["params"]["gate_step"], gate.describe()["params"]["fraction"]
        (8, 0.4)
        """
        params = {"gate_step": self.gate_step, "drop_guidance": self.drop_guidance, "sp_interval": self.sp_interval,
                  "warm_up": self.warm_up, "fi_interval": self.fi_interval}
        if self.fraction is not None:
            params["fraction"] = self.fraction
        if self.auto:
            params["auto_tol"] = self.tol
        return {"name": "TGate", "params": params}

    # -- the schedule ----------------------------------------------------------------------------
    def gated(self, step: int) -> bool:
        """Whether cross-attention is served from the cache at ``step``.

        >>> [TGate(2).gated(s) for s in range(4)]
        [False, False, True, True]
        """
        return step >= self._gate()

    def resolve(self, num_steps: int) -> int:
        """The gate step (index of the first gated step) for a run of ``num_steps`` steps; sets ``gate_step``.

        Refuses a gate beyond the run, which would gate nothing; a gate equal to ``num_steps`` runs every
        step in full.

        >>> TGate(0.4).resolve(20), TGate(10).resolve(25)
        (8, 10)
        >>> TGate(50).resolve(20)
        Traceback (most recent call last):
        attnscope.errors.AttnscopeError: TGate: gate_step=50 on a run of 20 steps: the gate is beyond the run and would gate no step; expected a gate step from 1 to 20 (or a fraction in (0, 1))
        """
        self.gate_step = self.gate_of_run(num_steps)
        return self.gate_step

    def gate_of_run(self, num_steps: int) -> int:
        """:meth:`resolve` without setting ``gate_step``: the first step a run of ``num_steps`` steps serves from the
        cross-attention cache (what another intervention reads to know which steps have no maps).

        >>> gate = TGate(0.5)
        >>> gate.gate_of_run(7), gate.gate_step
        (4, None)
        """
        steps = _positive_int("num_steps", num_steps, 1)
        gate = self.gate_step if self.fraction is None else max(1, round(self.fraction * steps))
        if gate > steps:
            raise AttnscopeError(f"TGate: gate_step={gate} on a run of {steps} steps: the gate is beyond the run and "
                                 f"would gate no step; expected a gate step from 1 to {steps} (or a fraction in (0, 1))")
        return gate

    def _gate(self) -> int:
        if self.gate_step is None:
            raise AttnscopeError(f"TGate(gate_step={self.fraction}): a fraction of the run's steps, not resolved yet; "
                                 f"it is resolved when a run starts, or call resolve(num_steps)")
        return self.gate_step

    def self_attention_computed(self, step: int) -> bool:
        """Whether (V2) self-attention attends at ``step``; otherwise it reuses its cache.

        >>> gate = TGate(10, sp_interval=5, warm_up=2, fi_interval=2)
        >>> [s for s in range(14) if not gate.self_attention_computed(s)]
        [3, 4, 6, 7, 8, 11, 13]
        """
        gate = self._gate()
        if self.sp_interval is None or step < self.warm_up or step == gate - 1:
            return True
        if step < gate - 1:
            return step == self.warm_up or step % self.sp_interval == 0
        return step % self.fi_interval == 0

    # -- hook client protocol ------------------------------------------------------------------
    def on_install(self, session: Any) -> None:
        self._pipe = session.pipe
        _check_family(session.family)

    def prepare(self, pipe: Any, call: dict[str, Any]) -> None:
        """Resolve and check the gate for the pipeline call about to run (before anything is written).

        Called by :func:`attnscope.rerun` and ``attnscope eval`` with the call's keyword arguments, so
        the manifest's description holds the gate step the run uses. The steps are the denoiser steps the call
        runs, counted by running it up to its first denoiser call (its generators put back): not
        ``num_inference_steps``, which Heun's 2N − 1, PNDM's N + 1, img2img's ``strength`` and an Euler
        ``sigmas=`` list (one step fewer than sigmas) are not.
        """
        family, denoiser = find_denoiser(pipe)
        _check_family(family)  # before the call is run to count its steps
        num_steps = planned_steps(pipe, denoiser, call, "TGate")
        try:
            self._prepared = self.resolve(num_steps) if num_steps is not None else None
        except AttnscopeError as exc:
            raise AttnscopeError(f"{exc}{steps_note(pipe, num_steps)}") from None

    def branches(self, step_ctx: Any) -> tuple[str, ...] | None:
        # step 0 is never gated (the gate is at least 1); it comes before on_step, which resolves the gate
        return ("uncond",) if self.drop_guidance and step_ctx.step > 0 and self.gated(step_ctx.step) else None

    def on_step(self, step_ctx: Any) -> None:
        if step_ctx.step == 0:  # a new run
            self.cache, self.computed, self.gated_steps = {}, {}, []
            prepared, self._prepared = self._prepared, None
            if step_ctx.num_steps:
                try:
                    self.resolve(step_ctx.num_steps)
                except AttnscopeError as exc:
                    raise AttnscopeError(f"{exc}{steps_note(self._pipe, step_ctx.num_steps)}") from None
            elif self.fraction is not None:
                raise AttnscopeError(f"gate_step={self.fraction}: the pipeline does not say how many steps it "
                                     f"runs; give an integer gate step")
            if prepared is not None and prepared != self.gate_step:
                raise AttnscopeError(f"TGate(gate_step={self.fraction}) was prepared as gate step {prepared}, but this "
                                     f"run of {step_ctx.num_steps} steps resolves it to {self.gate_step}: the "
                                     f"manifest would describe another gate than the one used; give an integer "
                                     f"gate step")
        if self.gated(step_ctx.step):
            self.gated_steps.append(step_ctx.step)

    def stages(self, ctx: Any) -> tuple[str, ...]:
        return ("output",) if self._caches(ctx) else ()

    def bypass(self, ctx: Any) -> torch.Tensor | None:
        name, step = ctx.site.name, ctx.step
        reuse = self.gated(step) if ctx.site.kind != "self" else not self.self_attention_computed(step)
        cached = self.cache.get(name) if reuse else None
        if cached is None:
            self.computed.setdefault(name, []).append(step)
            return None
        if cached.shape[0] != ctx.rows.batch:  # the CFG batch is kept (drop_guidance=False): both halves
            cached = torch.cat([cached] * (ctx.rows.batch // cached.shape[0]))
        return cached

    def on_output(self, ctx: Any, output: torch.Tensor) -> None:
        rows = ctx.rows
        # the official cache at the last full step is the mean of the two CFG halves (self-attention's
        # too, since the batch shrinks to one half after the gate)
        average = ctx.step == self._gate() - 1 and rows.uncond is not None and (
            ctx.site.kind != "self" or self.drop_guidance)
        if average:
            output = (output[rows.uncond] + output[rows.cond]) / 2
        self.cache[ctx.site.name] = output.detach()

    def _caches(self, ctx: Any) -> bool:
        """Whether this call's output is kept: cross sites at the last full step, V2 self sites whenever they attend."""
        if ctx.site.kind != "self":
            return ctx.step == self._gate() - 1
        return self.self_attention_computed(ctx.step)


def _check_family(family: str) -> None:
    """One error for a family TGATE is not defined on (joint attention, Sana's linear self-attention)."""
    if family not in _FAMILIES:
        why = _REFUSED.get(family, "a model family TGATE was not defined on")
        supported = "; ".join(f"{name} ({models})" for name, models in _FAMILIES.items())
        raise AttnscopeError(
            f"TGate on a {family!r} pipeline: TGATE has no official rule for {why}, and attnscope has not "
            f"designed and measured one; supported families: {supported}")

"""``risk_above``: intervene only in the generations at risk of losing an object, deciding at one step.

Two ways to decide. **From a stored run** (``ats.rerun`` of a trace, or :meth:`RiskGate.decide_from`):
the trace's maps at the decision step give each sample's risk, and the rerun gets the intervention
from step 0 on the samples at risk only — the way to regulate the failures-to-be of a sweep.
**Live**: a :class:`RiskGate` watches every site's conditional attention at its decision step, computes each
sample's :func:`attnscope.stats.neglect_risk` from those maps (the same function that reads a stored
trace), and from the next step on lets its intervention act on the samples whose risk is above the
threshold only. Before the decision the intervention does nothing, and it never edits a sample judged
safe: that sample is the plain generation up to float rounding (bit for bit under
``ats.hooks(..., exact=True)`` when no sample of its batch is at risk). Each sample is judged on its own maps: the decision does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import AttnscopeError
from ._scope import is_integer, is_real

__all__ = ["RiskGate", "risk_above"]

_DIMS = ("step", "sample", "head", "y", "x", "token")


class RiskGate:
    """Decides per sample at step ``step`` whether an intervention acts from the next step on.

    Create it with :func:`risk_above`. After a run, :attr:`risk` holds each sample's risk and
    :attr:`at_risk` the samples the intervention acted on.
    """

    def __init__(self, threshold: float, step: int, targets: Any = None, model: dict | None = None):
        if not is_real(threshold) or not 0 <= threshold <= 1:  # numpy's numbers too
            raise AttnscopeError(f"threshold={threshold!r}: expected a probability in [0, 1]")
        if not is_integer(step) or step < 0:
            raise AttnscopeError(f"step={step!r}: expected the decision step, an int >= 0")
        step = int(step)
        _check_risk_model(model, step)
        if not (targets is None or callable(targets) or (isinstance(targets, (list, tuple)) and len(targets) >= 2)):
            raise AttnscopeError(f"targets={targets!r}: expected two or more object phrases (a list), a function of "
                                 f"the prompt that gives them, or None (the intervention's targets)")
        self.threshold, self.step, self.targets, self.model = float(threshold), step, targets, model
        self._maps: dict[str, torch.Tensor] = {}
        self._texts: Any = None
        self._roles: Any = None
        self._prompt_of_sample: tuple[int, ...] = ()
        #: per sample of the last run: its risk at the decision step (None until decided)
        self.risk: list[float] | None = None
        #: per sample of the last run: whether the intervention acts on it after the decision step
        self.at_risk: list[bool] | None = None
        self._preset = False  # decided from a stored run (decide_from): act from step 0, observe nothing
        self._preset_used = False  # the run the stored decisions were made for has started

    def __repr__(self) -> str:
        return f"risk_above({self.threshold}, step={self.step})"

    def describe(self) -> dict[str, Any]:
        """JSON-able description, stored in the intervention's ``describe()``."""
        label = getattr(self.targets, "__name__", self.targets) if callable(self.targets) else self.targets
        out = {"risk_above": self.threshold, "step": self.step, "targets": label,
               "model": "given" if self.model is not None else "shipped"}
        if self._preset:  # decided from the parent trace: the risks and decisions are part of the record
            out.update(decided_from_trace=True, risk=list(self.risk), at_risk=list(self.at_risk))
        return out

    # -- driven by the intervention that holds the gate -------------------------------------------
    def new_run(self) -> None:
        self._maps = {}
        if self._preset and self._preset_used:  # decisions from a stored run are for the one run after decide_from
            self._preset = False
        self._preset_used = self._preset
        if not self._preset:
            self.risk, self.at_risk = None, None

    def check(self, step_ctx: Any, acting: Sequence[int] | None, cached: tuple[Any, int] | None = None) -> None:
        """At a run's first step, before any map is recorded: the decision step must come before the last step the
        intervention acts at (``acting``; None: every step) and before ``cached`` (``(client, step)``: from that step
        on another intervention, TGate, serves the cross-attention from a cache, so no maps are computed), and the
        targets must be in every prompt."""
        if self._preset:
            if len(self.at_risk) != step_ctx.rows.samples:
                raise AttnscopeError(f"risk_above: the decisions were decided from a stored run of {len(self.at_risk)} "
                                     f"sample(s) (decide_from), but this run has {step_ctx.rows.samples}; they are "
                                     f"for a rerun of that trace only")
            return
        total = step_ctx.num_steps
        if acting is not None:
            last = max(acting, default=-1)
        else:
            last = total - 1 if total else None
        if last is not None and self.step >= last:
            where = f"its last step is {last}" if acting is None else f"it acts at steps {list(acting)}"
            raise AttnscopeError(f"risk_above(step={self.step}): the intervention would never act, since it decides "
                                 f"at step {self.step} and acts only after it, but {where}"
                                 f"{f' of {total}' if total else ''}; choose an earlier step= or let it act at more "
                                 f"steps")
        if cached is not None and self.step >= cached[1]:
            raise AttnscopeError(f"risk_above(step={self.step}): {cached[0]!r} serves the cross-attention from its "
                                 f"cache from step {cached[1]} on, so the decision step has no maps to judge; choose "
                                 f"step= below {cached[1]} or a later gate")
        if step_ctx.token_text is None:
            raise AttnscopeError("risk_above: judging the risk needs the prompt's words, but the pipeline got "
                                 "embeddings")
        from ..tokens import resolve_targets

        roles = step_ctx.token_roles or [None] * len(step_ctx.token_text)
        for tokens, token_roles in zip(step_ctx.token_text, roles):
            prompt = _prompt(tokens, token_roles)
            targets = self.targets(prompt) if callable(self.targets) else self.targets
            if targets is None or isinstance(targets, str) or len(targets) < 2:
                raise AttnscopeError(f"risk_above(targets={targets!r}) for prompt {prompt!r}: expected two or more "
                                     f"object phrases (the risk is that one of them goes missing)")
            try:
                resolve_targets(list(tokens), list(targets), list(token_roles) if token_roles else None)
            except AttnscopeError as exc:
                raise AttnscopeError(f"risk_above, prompt {prompt!r}: {exc}") from None

    def decide_from(self, trace: Any) -> list[bool]:
        """Decide from a stored run: each sample's risk from the trace's maps at the decision step.

        The intervention then acts on the samples at risk **from step 0** of the next run (a rerun
        of that trace: ``ats.rerun`` calls this itself), so a generation judged at risk gets the whole
        intervention and one judged safe is left alone; the run after that is judged live again.
        Returns :attr:`at_risk`.

        A trace that was itself made this way (its manifest records the decisions of a gate with the same
        threshold and step) passes them on: its maps are regulated ones, so judging them again would decide
        otherwise, and a rerun of it with the same intervention reproduces it.
        """
        recorded = self._recorded_decisions(trace.manifest)
        if recorded is not None:
            self.risk, self.at_risk, self._preset, self._preset_used = recorded[0], recorded[1], True, False
            return list(self.at_risk)
        for site in trace.sites:  # before anything is decided: an earlier decision stays as it was
            captured = [int(s) for s in trace.attention(site)["step"].values]
            if self.step not in captured:
                raise AttnscopeError(f"risk_above(step={self.step}): the trace has no maps of step {self.step} at "
                                     f"{site} (its captured steps: {captured}), so it cannot decide from them; "
                                     f"capture the decision step, or choose step= among the captured ones")
        self._preset_used = False
        run = trace.manifest.get("run", {})
        prompts, per_prompt = run.get("prompts") or [], int(run.get("num_images_per_prompt") or 1)
        risks: list[float] = []
        for p, prompt in enumerate(prompts):  # a prompt's images are consecutive samples: one read of each site
            samples = list(range(p * per_prompt, (p + 1) * per_prompt))
            risks += self._risks(_SomeSamples(trace, samples), prompt)
        unknown = [i for i, r in enumerate(risks) if r != r]  # NaN > θ is False: every such sample judged safe
        if unknown:
            raise AttnscopeError(f"risk_above(step={self.step}): the risk of sample(s) {unknown} cannot be computed "
                                 f"from this trace (NaN: its maps at step {self.step} are NaN, or their sink share "
                                 f"is unknown, as on a rerun trace whose token axis is cut to the prompt); decide "
                                 f"from the plain parent trace, or live (a run without decide_from)")
        self.risk, self.at_risk, self._preset = risks, [r > self.threshold for r in risks], True
        return list(self.at_risk)

    def _recorded_decisions(self, manifest: dict) -> tuple[list[float], list[bool]] | None:
        """The risks and decisions a trace's manifest holds from a gate like this one, decided from a stored run."""
        for item in manifest.get("interventions") or []:
            when = item.get("params", {}).get("when") if isinstance(item, dict) else None
            if (isinstance(when, dict) and when.get("decided_from_trace") and when.get("risk_above") == self.threshold
                    and when.get("step") == self.step and isinstance(when.get("at_risk"), list)):
                return [float(r) for r in when["risk"]], [bool(a) for a in when["at_risk"]]
        return None

    def observing(self, ctx: Any) -> bool:
        """Whether this call's probabilities are needed (every site at the decision step)."""
        return not self._preset and ctx.step == self.step

    def observe(self, ctx: Any, probs: torch.Tensor) -> None:
        """Keep the conditional rows' head-mean map of this site at the decision step (CPU, float32)."""
        cond = probs[ctx.rows.cond]  # (samples, heads, pixels, tokens)
        h, w = ctx.spatial_shape
        maps = cond.float().mean(1).reshape(cond.shape[0], h, w, cond.shape[-1])
        self._maps[ctx.site.name] = maps.detach().cpu()  # a site called twice in a step: its last call
        self._texts, self._roles = ctx.step_context.token_text, ctx.step_context.token_roles
        self._prompt_of_sample = tuple(ctx.rows.prompt_of_sample)

    def any_at_risk(self, ctx: Any) -> bool:
        """Whether the intervention acts on any sample at this call (False up to the decision step)."""
        decided = self._decisions(ctx)
        return decided is not None and any(decided)

    def acts_on(self, ctx: Any, sample: int) -> bool:
        """Whether the intervention may act on cond sample ``sample`` at this call."""
        decided = self._decisions(ctx)
        return decided is not None and bool(decided[sample])

    def _decisions(self, ctx: Any) -> list[bool] | None:
        """Per sample, whether it is at risk; None before the decision step's maps have been judged."""
        if not self._preset and ctx.step <= self.step:
            return None
        if self.at_risk is None:
            self._decide()
        return self.at_risk

    def _decide(self) -> None:
        """Judge each sample on the maps :meth:`observe` kept at the decision step."""
        import xarray as xr

        if not self._maps or self._texts is None:
            raise AttnscopeError(f"risk_above(step={self.step}): the run never reached step {self.step} with "
                                 f"cross-attention maps to judge (a run of fewer steps?)")
        by_prompt: dict[int, list[int]] = {}
        for sample, prompt in enumerate(self._prompt_of_sample):
            by_prompt.setdefault(prompt, []).append(sample)
        risks = [0.0] * len(self._prompt_of_sample)
        for prompt, samples in by_prompt.items():  # one call per prompt: the statistics are per sample
            tokens = list(self._texts[prompt])
            roles = list(self._roles[prompt]) if self._roles is not None else None
            coords = {"step": [self.step], "token_text": ("token", tokens)}
            if roles is not None:
                coords["token_role"] = ("token", roles)
            arrays = {site: xr.DataArray(maps[samples].numpy()[None, :, None], dims=_DIMS, coords=coords)
                      for site, maps in self._maps.items()}  # (1 step, samples, 1 head, h, w, tokens)
            for sample, risk in zip(samples, self._risks(arrays, _prompt(tokens, roles))):
                risks[sample] = risk
        self.risk = risks
        self.at_risk = [r > self.threshold for r in risks]
        self._maps = {}

    def _risks(self, arrays: Any, prompt: str) -> list[float]:
        """The risk of each sample of ``arrays`` (site name → DataArray, or a trace's samples; of one prompt)."""
        from ..stats import neglect_risk

        targets = self.targets(prompt) if callable(self.targets) else self.targets
        if targets is None:
            raise AttnscopeError("risk_above: give targets= (two or more object phrases, or a function of the prompt)")
        return [float(r) for r in neglect_risk(arrays, targets, step=self.step, model=self.model).values]


class _SomeSamples:
    """A trace seen through some of its samples (one prompt's images), for the statistics: its maps and, at joint
    sites, its text mass, which the sink share of a token axis cut to the prompt needs (SD3, Flux: maps given as bare
    arrays have none, and their risk was NaN, so no sample was ever judged at risk); the rest is the trace's."""

    def __init__(self, trace: Any, samples: list[int]) -> None:
        self._trace, self._samples = trace, samples

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trace, name)

    def attention(self, site: Any, branch: str | None = None) -> Any:
        return self._trace.attention(site, branch).isel(sample=self._samples)

    def text_mass(self, site: Any, branch: str | None = None) -> Any:
        return self._trace.text_mass(site, branch).isel(sample=self._samples)


def _prompt(tokens: Sequence[str], roles: Sequence[str] | None) -> str:
    from ..tokens import prompt_text

    return prompt_text(list(tokens), list(roles) if roles is not None else None)


def _check_risk_model(model: Any, step: int) -> None:
    """AttnscopeError unless ``model`` (None: the shipped one) is a risk model with weights for the decision step:
    found when the gate is made, not at the run's decision step."""
    from collections.abc import Mapping

    from ..stats import check_neglect_model, neglect_model

    if model is not None and not (isinstance(model, Mapping) and isinstance(model.get("steps"), Mapping)):
        raise AttnscopeError(f"model={model!r}: expected a risk model (a dict with 'features' and 'steps', as "
                             f"ats.stats.neglect_model() or ats.sweep.fit_neglect_risk give), or None for the shipped one")
    model = model if model is not None else neglect_model()
    if str(step) not in model["steps"]:
        raise AttnscopeError(f"risk_above: the model has no weights for step {step} (it has steps "
                             f"{', '.join(sorted(model['steps'], key=lambda k: int(k) if str(k).isdigit() else -1))}); "
                             f"choose one of those, or fit a model for it")
    try:
        check_neglect_model(model, step)
    except AttnscopeError as exc:
        raise AttnscopeError(f"risk_above: {exc}") from None


def risk_above(threshold: float, *, step: int = 5, targets: Sequence[str] | Callable[[str], Sequence[str]] | None = None,
               model: dict | None = None) -> RiskGate:
    """A gate for ``AttentionRegulation(..., when=risk_above(θ))``: act only on samples whose risk exceeds θ.

    At step ``step`` every site's conditional maps are reduced to :func:`attnscope.stats.neglect_risk`
    per sample; from step ``step + 1`` on, the intervention acts only on the samples whose risk is
    above ``threshold``. Until then it does nothing, and it never edits a sample judged safe (that
    sample is the plain generation up to float rounding).

    Parameters
    ----------
    threshold : float
        Risk in [0, 1] (the shipped model's risk is a probability of a missing object on the shapes model).
    step : int
        The decision step (default 5 of 20).
    targets : list of str, or a function prompt -> list of str, optional
        The objects the risk is about, one phrase each (``["red circle", "blue circle"]``);
        default: the intervention's targets.
    model : dict, optional
        Another risk model (see :func:`attnscope.stats.neglect_risk`).

    Examples
    --------
    >>> import attnscope as ats
    >>> from attnscope.models import object_nouns, object_phrases
    >>> pipe = ats.load_pipeline("shapes")
    >>> reg = ats.regulate.AttentionRegulation(object_nouns, when=ats.regulate.risk_above(0.3, targets=object_phrases))
    >>> with ats.hooks(pipe, reg):
    ...     _ = pipe(["a red circle and a blue circle", "a green square and a red triangle"], num_inference_steps=20)
    >>> len(reg.when.risk), reg.when.at_risk == [r > 0.3 for r in reg.when.risk]
    (2, True)
    """
    return RiskGate(threshold, step, targets, model)

"""Spatial-temporal attention control (seed 001, Wu et al., ICCV 2023): put each object in its region.

At every cross-attention site and step, on the conditional rows, the released code's rule:

    O_cond = Attn_D,cond + Σ_i M_i · λ_{i,t} · (Attn_{L_i},cond − Attn_∅,uncond)

``Attn_D,cond`` is the site's own output for the prompt, ``Attn_∅,uncond`` its output on the
unconditional rows, ``Attn_{L_i},cond`` the attention of the same queries to the *local prompt* of
object ``i`` (``"a photo of <phrase>"``, encoded by the pipeline's own text encoder, its keys and values
made by the site's own ``to_k``/``to_v``), ``M_i`` the object's region at the site's resolution and
``λ_{i,t}`` one weight per object and step. The unconditional half is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttnscopeError, AttnscopeWarning
from ..hooks import hooks
from ..stats import layout_regions, layout_tokens
from ..tokens import prompt_text
from ._layout import layout_from_prompt, region_mask
from ._objectives import AttentionObjective, SampledRun
from ._scope import InterventionScope, is_integer, is_real, repr_options
from ._trajectory import frozen, replayable, sample_with_gradients

__all__ = ["Placement", "SpatialTemporal"]

_FAMILIES = ("unet",)


@dataclasses.dataclass(frozen=True)
class Placement:
    """One prompt's objects: their phrases, regions and token positions (leading articles dropped)."""

    phrases: tuple[str, ...]
    regions: tuple[tuple[float, ...], ...]
    positions: tuple[list[int], ...]


class SpatialTemporal:
    """Place objects with region masks and local prompts at every cross-attention site (seed 001's released rule).

    Parameters
    ----------
    layout : mapping of phrase → box or centre, or None
        Each object phrase of the prompt (``"a red circle"``) with a box ``(x0, y0, x1, y1)`` or a centre
        ``(x, y)`` in [0, 1]² (x to the right, y down; a centre means a disk of ``radius`` in these
        coordinates: on a non-square image an ellipse in pixels, ``radius`` of the width across and of the
        height down, the same image region at every site). A phrase that occurs twice is placed by its first
        occurrence. None: each prompt's :func:`layout_from_prompt` (from its relation words).
    weights : float, array, or None
        λ, one weight per object and step: a float for every object and step, an ``(objects, steps)``
        array with exactly the run's steps (another length is an error, not truncated), or one such array per
        sample (a list, or a ``(samples, objects, steps)`` array). Default
        1.0, tuned on the shapes model's relation prompts (docs/spatial.md). None: ``5 / objects``, the
        released code's initial value. With an ``objective`` these are the starting point.
    objective : "attention", an objective object, or None
        Optimise λ over the whole trajectory before generating (:meth:`optimize`; :func:`attnscope.rerun`
        does it for you): ``"attention"`` (:class:`AttentionObjective`, each object's attention mass
        inside its region), :class:`ClipObjective` (the paper's, with your CLIP model), or any object
        with ``clients``/``loss``/``describe`` (see :mod:`attnscope.regulate`). None: λ fixed.
    epochs, lr : int, float
        The optimisation: Adam with learning rate ``lr``, one update per sampled trajectory (the
        released code's 3 and 5e-3).
    local_prompt : str
        Template of each object's local prompt (``"{}"`` is the phrase).
    radius : float
        Disk radius for centres (the paper's 0.2).
    sites, steps : optional
        Where and when (default: every cross-attention site, every step); ``steps`` as
        :class:`~attnscope.regulate.AttentionRegulation`'s (negative indices and slices from the run's end,
        ``"first_half"``), checked against the run at its first step.

    Examples
    --------
    >>> import attnscope as ats, torch
    >>> pipe = ats.load_pipeline("shapes")
    >>> control = ats.regulate.SpatialTemporal({"a red circle": (0.0, 0.0, 0.5, 1.0),
    ...                                         "a blue square": (0.5, 0.0, 1.0, 1.0)})
    >>> with ats.hooks(pipe, control):
    ...     image = pipe("a red circle and a blue square", num_inference_steps=4,
    ...                  generator=torch.Generator().manual_seed(0)).images[0]
    >>> control.describe()["params"]["layout"]["a blue square"]
    [0.5, 0.0, 1.0, 1.0]
    """

    role = "intervention"

    def __init__(self, layout: Mapping[str, Sequence[float]] | None = None, *, weights: Any = 1.0,
                 objective: Any = None, epochs: int = 3, lr: float = 5e-3,
                 local_prompt: str = "a photo of {}", radius: float = 0.2, sites: Any = None, steps: Any = None):
        if layout is not None:
            if not isinstance(layout, Mapping) or not layout:
                raise AttnscopeError(f"layout={layout!r}: expected a mapping of object phrase to a box or centre, "
                                     f"or None (a layout from the prompt's relation words)")
            layout = layout_regions(dict(layout))  # a key that is not a phrase is an error there
        if not isinstance(local_prompt, str) or "{}" not in local_prompt:
            raise AttnscopeError(f"local_prompt={local_prompt!r}: expected a template with '{{}}' for the phrase")
        if not is_real(radius) or not 0 < radius <= 1:  # numpy's numbers too
            raise AttnscopeError(f"radius={radius!r}: expected a number in (0, 1]")
        if not is_integer(epochs) or epochs < 1:
            raise AttnscopeError(f"epochs={epochs!r}: expected an int ≥ 1")
        if not is_real(lr) or not 0 < lr < math.inf:
            raise AttnscopeError(f"lr={lr!r}: expected a finite number > 0")
        self.layout, self.local_prompt, self.radius = layout, local_prompt, float(radius)
        self.weights = self._start = _weights(weights)
        self.objective = _objective(objective)
        self.epochs, self.lr = int(epochs), float(lr)
        #: the last optimisation: the objective per pass and sample (the last pass: after the last update)
        self.optimisation: dict[str, Any] | None = None
        self.scope = InterventionScope(lambda prompt: (), sites, steps)  # sites and steps only: no token columns
        self._session: Any = None
        self._plan: dict[Any, list[Placement]] = {}  # token text of the run → per prompt its placement
        self._local: dict[str, torch.Tensor] = {}
        self._masks: dict[Any, torch.Tensor] = {}
        self._kv: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._trainable: list[torch.Tensor] | None = None  # per sample, while optimising
        self._optimising = False
        self._unguided = False  # the running call stopped classifier-free guidance (a CFG cutoff callback)
        self._checkpointing = True  # benchmarks/spatial_optimisation.py turns it off to measure what it saves

    def __repr__(self) -> str:
        weights = self.describe()["params"]["weights"]  # as lists: the repr rebuilds the control
        given = {"weights": (weights, 1.0), "objective": (self.objective, None), "epochs": (self.epochs, 3),
                 "lr": (self.lr, 5e-3), "local_prompt": (self.local_prompt, "a photo of {}"),
                 "radius": (self.radius, 0.2), "sites": (self.scope.sites, None), "steps": (self.scope.steps, None)}
        return f"SpatialTemporal({self.layout!r}{repr_options(given)})"

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests (with the optimised λ and the objective's values, once optimised)."""
        if isinstance(self.weights, list):
            weights: Any = [t.tolist() for t in self.weights]
        else:
            weights = self.weights.tolist() if isinstance(self.weights, torch.Tensor) else self.weights
        layout = None if self.layout is None else {p: list(r) for p, r in self.layout.items()}
        params = {"layout": layout, "weights": weights, "local_prompt": self.local_prompt, "radius": self.radius,
                  **self.scope.describe()}
        if self.objective is not None:
            params.update(objective=self.objective.describe(), epochs=self.epochs, lr=self.lr)
        out = {"name": "SpatialTemporal", "params": params}
        if self.optimisation is not None:
            out["optimisation"] = self.optimisation
        return out

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> SpatialTemporal:
        """The control a manifest describes, with its (optimised) λ fixed: a rerun reuses them without optimising.

        >>> control = SpatialTemporal({"a cat": (0, 0, 0.5, 1)}, weights=[[0.5, 0.25]], steps=slice(0, 2))
        >>> again = SpatialTemporal.from_description(control.describe())
        >>> again.describe() == control.describe()
        True
        """
        if not isinstance(description, Mapping) or description.get("name") != "SpatialTemporal":
            raise AttnscopeError(f"description={description!r}: expected a SpatialTemporal description "
                                 f"(an entry of a trace's manifest['interventions'])")
        p = description.get("params", {})
        steps = p.get("steps")
        if isinstance(steps, Mapping):
            steps = slice(steps.get("start"), steps.get("stop"), steps.get("step"))
        return cls(p.get("layout"), weights=p.get("weights"), local_prompt=p.get("local_prompt", "a photo of {}"),
                   radius=p.get("radius", 0.2), sites=p.get("sites"), steps=steps)

    @classmethod
    def from_trace(cls, trace: Any) -> SpatialTemporal:
        """The SpatialTemporal a trace was made with (its manifest's ``interventions``), λ fixed as they were used."""
        found = [d for d in trace.manifest.get("interventions") or [] if isinstance(d, Mapping)
                 and d.get("name") == "SpatialTemporal"]
        if len(found) != 1:
            raise AttnscopeError(f"trace {str(getattr(trace, 'path', trace))!r}: expected one SpatialTemporal among its "
                                 f"manifest's interventions, found {len(found)}")
        return cls.from_description(found[0])

    # -- optimisation ------------------------------------------------------------------------
    def optimize(self, pipe: Any, prompt: str | list[str], *, generator: Any = None, **call: Any) -> dict[str, Any]:
        """Optimise λ for one pipeline call, over its whole trajectory; afterwards the control uses them.

        Each epoch samples the call with gradients (activation checkpointing per denoiser step keeps memory to
        about one step's activations), scores it with the objective (one loss per sample, summed, so a sample's λ
        does not depend on its batch) and takes one Adam step on λ. A last pass without gradients measures the
        objective at the final λ. ``generator`` is put back to its state at entry after every pass, so every pass
        and your own call with the same generator start from the same noise.

        Parameters
        ----------
        pipe, prompt, generator, **call
            Exactly what you will pass to ``pipe(...)`` (``output_type`` is ignored). A generator (or
            ``latents=``) is required: every pass must start from the same noise.

        Returns
        -------
        dict
            ``{"objective": [[loss per sample] per pass], "weights": per-sample λ lists}`` (also in
            :meth:`describe`). The first pass is before any update, the last after the last one.

        Examples
        --------
        >>> import attnscope as ats, torch
        >>> pipe = ats.load_pipeline("shapes")
        >>> control = ats.regulate.SpatialTemporal(objective="attention", epochs=2, lr=0.05)
        >>> result = control.optimize(pipe, "a red circle to the left of a blue square", num_inference_steps=4,
        ...                           generator=torch.Generator().manual_seed(0))
        >>> len(result["objective"]), len(result["weights"][0]), len(result["weights"][0][0])  # passes, objects, steps
        (3, 2, 4)
        >>> with ats.hooks(pipe, control):                      # the same call, with the optimised λ
        ...     image = pipe("a red circle to the left of a blue square", num_inference_steps=4,
        ...                  generator=torch.Generator().manual_seed(0)).images[0]
        """
        if self._session is not None:
            raise AttnscopeError("optimize() inside an ats.hooks block that holds this control: optimise first, then "
                                 "install the control for the run")
        objective = self.objective or AttentionObjective()
        if generator is None and call.get("latents") is None:
            raise AttnscopeError("optimize(generator=None): every pass must start from the same noise; pass the "
                                 "generator (a seeded torch.Generator) or latents= you will use for the run")
        if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and prompt
                                                 and all(isinstance(p, str) for p in prompt)):
            raise AttnscopeError(f"optimize(prompt={prompt!r}): expected the prompt's text (a str or a list of str): "
                                 f"each object's layout and token positions come from it (prompt_embeds cannot be "
                                 f"optimised for)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = call.get("num_images_per_prompt") or 1
        sample_prompts = tuple(p for p in prompts for _ in range(per_prompt))
        layouts = tuple(self.layout if self.layout is not None else layout_from_prompt(p) for p in sample_prompts)
        call = {k: v for k, v in call.items() if k != "output_type"}
        history: list[list[float]] = []
        optimizer = None
        self._trainable, self._optimising = None, True
        try:
            with replayable(generator) as rewind, frozen(pipe, *getattr(objective, "modules", tuple)()):
                for epoch in range(self.epochs + 1):
                    rewind()
                    learn = epoch < self.epochs
                    with hooks(pipe, self, *objective.clients(self)) as session:
                        with session.checkpointing() if learn and self._checkpointing else contextlib.nullcontext(), \
                                torch.set_grad_enabled(learn):
                            latents = sample_with_gradients(pipe, session.denoiser, prompt=prompt,
                                                            generator=generator, **call) \
                                if learn else pipe(prompt=prompt, generator=generator, output_type="latent",
                                                   **call).images
                            losses = objective.loss(SampledRun(pipe, latents, sample_prompts, layouts))
                            _check_losses(losses, len(sample_prompts), objective)
                        history.append([float(v) for v in losses.detach().cpu()])
                        if learn:
                            if optimizer is None:
                                optimizer = torch.optim.Adam(self._trainable or [], lr=self.lr)
                            optimizer.zero_grad()
                            losses.sum().backward()  # inside the hooks: backward recomputes the steps with them
                            optimizer.step()
            self.weights = [t.detach().to(torch.float64).cpu().clone() for t in self._trainable or []]
        finally:
            self._trainable, self._optimising = None, False
        self.optimisation = {"objective": history}
        return {"objective": history, "weights": [t.tolist() for t in self.weights]}

    def prepare(self, pipe: Any, call: Mapping[str, Any]) -> None:
        """Called by :func:`attnscope.rerun` with the exact pipeline call it is about to make: optimises λ for it when
        an ``objective`` is set."""
        if self.objective is not None:
            self.optimize(pipe, **call)

    # -- hook client protocol ------------------------------------------------------------------
    def on_install(self, session: Any) -> None:
        if session.family not in _FAMILIES:
            raise AttnscopeError(
                f"SpatialTemporal on a {session.family!r} pipeline: the released rule adds local prompts' attention "
                f"outputs at cross-attention sites; supported families: {', '.join(_FAMILIES)} (Stable Diffusion "
                f"1.x, 2.x, SDXL). Joint attention (SD3, Flux) and flat stacks are not designed and measured yet")
        if self.objective is not None and not self._optimising and self.optimisation is None:
            raise AttnscopeError("SpatialTemporal(objective=...): λ are not optimised yet; call "
                                 "control.optimize(pipe, prompt, generator=..., **the same call) first, or use "
                                 "ats.rerun(trace, [control]), which does")
        self._session = session
        self.scope.install(session)
        self._kv.clear()
        self._local.clear()  # the local prompts are encoded by the text encoder of the pipeline installed on,
        self._plan.clear()  # when its first run plans the placements

    def on_remove(self, error: BaseException | None) -> None:
        self._session = None

    def on_step(self, step_ctx: Any) -> None:
        if step_ctx.step == 0:
            self._unguided = False
            self.scope.check_steps(step_ctx)  # a step outside the run fails before a recorder beside it writes
            if step_ctx.rows.uncond is not None:
                self._check_regions(step_ctx)
        if step_ctx.rows.uncond is None and step_ctx.single_branch is not None:
            return  # one half of the CFG batch only (after TGATE's gate): the attention is the cache's, nothing to add
        if step_ctx.rows.uncond is None:
            if step_ctx.step == 0:  # before anything is written
                raise AttnscopeError("SpatialTemporal needs classifier-free guidance (the rule subtracts the "
                                     "unconditional output): use a guidance_scale > 1")
            if not self._unguided:  # guidance stopped mid-run: said once per run
                self._unguided = True
                warnings.warn(f"SpatialTemporal: the pipeline stopped classifier-free guidance at step {step_ctx.step} "
                              f"(a CFG cutoff callback?): no unconditional output to subtract, so the control adds "
                              f"nothing from this step on", AttnscopeWarning, stacklevel=2)
            return
        self.placements(step_ctx)
        if self._optimising and self._trainable is None:
            self._trainable = [
                self._initial(s, len(self.placement(step_ctx, s).phrases), step_ctx.num_steps)
                .to(torch.float32).requires_grad_(True) for s in range(step_ctx.rows.samples)]

    def placements(self, step_ctx: Any) -> list[Placement]:
        """Per prompt of the running call: its objects' phrases, regions and token positions (computed once per call)."""
        key = step_ctx.token_text
        if key in self._plan:
            return self._plan[key]
        if key is None:
            if self.layout is None:
                raise AttnscopeError("layout=None reads the layout from the prompt's words, but the pipeline got "
                                     "embeddings: give a layout")
            texts, roles = [None], [None]
        else:
            texts, roles = key, step_ctx.token_roles or [None] * len(key)
        plans = []
        for text, text_roles in zip(texts, roles):
            prompt = prompt_text(text, text_roles) if text is not None else ""
            layout = self.layout if self.layout is not None else layout_from_prompt(prompt)
            positions = layout_tokens(text, list(layout), text_roles) if text is not None else {p: [] for p in layout}
            for phrase, found in positions.items():
                if text is not None and not found:
                    raise AttnscopeError(f"layout phrase {phrase!r} is not in the prompt {prompt!r}")
            plans.append(Placement(tuple(layout), tuple(layout.values()), tuple(positions.values())))
        missing = sorted({p for plan in plans for p in plan.phrases} - set(self._local))
        if missing:
            encoded = self._session.encode_text([self.local_prompt.format(p) for p in missing])
            self._local.update(zip(missing, encoded))
        self._plan[key] = plans
        self._kv.clear()
        return plans

    def _check_regions(self, step_ctx: Any) -> None:
        """At a run's first step: every object's region holds a pixel of some map the control acts on, else one error
        (a region between the pixel centres of every map would leave its object without any control, silently)."""
        chosen = self.scope.sites_at(step_ctx.latent_shape)
        shapes = sorted({s.spatial_shape(step_ctx.latent_shape) for s in self._session.sites
                         if s.kind == "cross" and s.name in chosen})
        for plan in self.placements(step_ctx):
            for phrase, region in zip(plan.phrases, plan.regions):
                if shapes and not any(bool(region_mask(region, shape, self.radius).any()) for shape in shapes):
                    what = "the box" if len(region) == 4 else f"the disk of radius {self.radius} around this centre"
                    raise AttnscopeError(
                        f"layout[{phrase!r}] = {region}: {what} holds no pixel centre of any map the control acts "
                        f"on ({', '.join(f'{h}×{w}' for h, w in shapes)}), so the object would get no control; "
                        f"make the region larger (or radius= bigger for a centre)")

    def placement(self, step_ctx: Any, sample: int) -> Placement:
        """The placement of ``sample`` (an image of the running call): its prompt's, from :meth:`placements`."""
        plans = self.placements(step_ctx)
        return plans[step_ctx.rows.prompt_of_sample[sample]] if len(plans) > 1 else plans[0]

    def stages(self, ctx: Any) -> tuple[str, ...]:
        both = ctx.rows.uncond is not None  # not after TGATE's gate, which runs one half on the cache
        return ("output",) if ctx.site.kind == "cross" and both and self.scope.active(ctx) else ()

    def on_output(self, ctx: Any, output: torch.Tensor) -> torch.Tensor | None:
        hidden = ctx.hidden_states
        if hidden is None:
            raise AttnscopeError(f"site {ctx.site.name}: SpatialTemporal needs the site's queries (a 3-D input)")
        rows, attn = ctx.rows, ctx.site.module
        out = output.clone()
        query = attn.to_q(hidden[rows.cond])
        for sample in range(rows.samples):
            place = self.placement(ctx.step_context, sample)
            weights = self._lambda(sample, rows.samples, len(place.phrases), ctx.step, ctx.step_context.num_steps)
            cond, uncond = rows.cond.start + sample, rows.uncond.start + sample
            for i, (phrase, region) in enumerate(zip(place.phrases, place.regions)):
                if not isinstance(weights[i], torch.Tensor) and weights[i] == 0:
                    continue
                local = self._attend(attn, query[sample:sample + 1], phrase, ctx.site.name)
                mask = self.mask(region, ctx.spatial_shape, output)
                out[cond] += mask[:, None] * weights[i] * (local[0] - output[uncond])
        return out

    # -- pieces --------------------------------------------------------------------------------
    def _initial(self, sample: int, objects: int, num_steps: int | None) -> torch.Tensor:
        """The starting λ of an optimisation (the ``weights`` given) as an ``(objects, steps)`` float64 table."""
        if num_steps is None:
            raise AttnscopeError("SpatialTemporal: the pipeline's number of steps is unknown; cannot size λ")
        if self._start is None or isinstance(self._start, float):
            value = 5.0 / objects if self._start is None else self._start
            return torch.full((objects, num_steps), value, dtype=torch.float64)
        return self._table(self._start, sample, None, objects, num_steps)

    @staticmethod
    def _table(weights: Any, sample: int, samples: int | None, objects: int, num_steps: int | None) -> torch.Tensor:
        if isinstance(weights, list):
            if samples is not None and len(weights) != samples:
                raise AttnscopeError(f"weights: {len(weights)} per-sample tables for a batch of {samples} samples")
            if sample >= len(weights):
                raise AttnscopeError(f"weights: {len(weights)} per-sample tables, no table for sample {sample}")
            table = weights[sample]
        else:
            table = weights
        if table.shape[0] != objects or (num_steps and table.shape[1] != num_steps):
            raise AttnscopeError(f"weights: expected an array of shape (objects={objects}, steps={num_steps}), "
                                 f"got {tuple(table.shape)}: one λ per object of the prompt and step of this run "
                                 f"(λ of another run's length would act at the wrong steps)")
        return table

    def _lambda(self, sample: int, samples: int, objects: int, step: int, num_steps: int | None) -> list[Any]:
        if self._trainable is not None:
            return list(self._trainable[sample][:, step])
        if self.weights is None:
            return [5.0 / objects] * objects
        if isinstance(self.weights, float):
            return [self.weights] * objects
        return self._table(self.weights, sample, samples, objects, num_steps)[:, step].tolist()

    def _attend(self, attn: Any, query: torch.Tensor, phrase: str, site: str) -> torch.Tensor:
        """The site's attention output (after ``to_out``) for ``query`` over the local prompt of ``phrase``."""
        key = (site, phrase)
        if key not in self._kv:
            local = self._local[phrase].to(query.device, query.dtype)[None]
            self._kv[key] = (attn.to_k(local), attn.to_v(local))
        k, v = self._kv[key]
        heads = attn.heads
        d = k.shape[-1] // heads
        split = lambda t: t.view(t.shape[0], -1, heads, d).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(query), split(k), split(v))
        o = o.transpose(1, 2).reshape(query.shape[0], -1, heads * d)
        return attn.to_out[1](attn.to_out[0](o)) / attn.rescale_output_factor

    def mask(self, region: tuple[float, ...], shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """:func:`region_mask` of ``region`` on an ``(h, w)`` map, on ``like``'s device and dtype (cached)."""
        key = (region, shape, like.device, like.dtype)
        if key not in self._masks:
            self._masks[key] = region_mask(region, shape, self.radius).to(like.device, like.dtype)
        return self._masks[key]


def _weights(weights: Any) -> Any:
    """``weights`` as None, a float, an ``(objects, steps)`` float64 table, or a list of them (one per sample)."""
    if weights is None:
        return None
    finite = f"weights={weights!r}: expected finite numbers (λ, one per object and step)"
    if getattr(weights, "ndim", None) == 0 and callable(getattr(weights, "item", None)):  # numpy's number, a 0-d array
        weights = weights.item()
    if is_real(weights):
        if not math.isfinite(weights):
            raise AttnscopeError(finite)
        return float(weights)
    try:
        if isinstance(weights, (list, tuple)) and weights and all(
                torch.as_tensor(w, dtype=torch.float64).ndim == 2 for w in weights):
            tables = [torch.as_tensor(w, dtype=torch.float64) for w in weights]
        else:
            table = torch.as_tensor(weights, dtype=torch.float64)
            tables = list(table) if table.ndim == 3 else table
    except (TypeError, ValueError, RuntimeError) as exc:
        raise AttnscopeError(f"weights={weights!r}: expected a number, an (objects, steps) array or one per sample "
                             f"({exc})") from None
    if isinstance(tables, torch.Tensor) and tables.ndim != 2:
        raise AttnscopeError(f"weights: expected a number, an (objects, steps) array or one per sample, got an array "
                             f"of shape {tuple(tables.shape)}")
    if not all(torch.isfinite(t).all() for t in tables):
        raise AttnscopeError(finite)
    return tables


def _objective(objective: Any) -> Any:
    if objective is None:
        return None
    if objective == "attention":
        return AttentionObjective()
    if not all(callable(getattr(objective, m, None)) for m in ("clients", "loss", "describe")):
        raise AttnscopeError(f"objective={objective!r}: expected 'attention', ats.regulate.ClipObjective(model, "
                             f"processor), or an object with clients(control), loss(run) and describe()")
    return objective


def _check_losses(losses: Any, samples: int, objective: Any) -> None:
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (samples,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise AttnscopeError(f"objective {objective!r}: loss(run) returned {shape}, expected a tensor of shape "
                             f"({samples},), one loss per sample")

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

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttnscopeError
from ..tokens import prompt_text, target_occurrences
from ._scope import InterventionScope

__all__ = ["SpatialTemporal", "layout_from_prompt", "region_mask"]

#: relation phrases a default layout understands: the first object's box, then the second's
_RELATIONS = {
    "to the left of": ((0.05, 0.25, 0.45, 0.75), (0.55, 0.25, 0.95, 0.75)),
    "to the right of": ((0.55, 0.25, 0.95, 0.75), (0.05, 0.25, 0.45, 0.75)),
    "left of": ((0.05, 0.25, 0.45, 0.75), (0.55, 0.25, 0.95, 0.75)),
    "right of": ((0.55, 0.25, 0.95, 0.75), (0.05, 0.25, 0.45, 0.75)),
    "above": ((0.25, 0.05, 0.75, 0.45), (0.25, 0.55, 0.75, 0.95)),
    "below": ((0.25, 0.55, 0.75, 0.95), (0.25, 0.05, 0.75, 0.45)),
}
_FAMILIES = ("unet",)


def layout_from_prompt(prompt: str) -> dict[str, tuple[float, ...]]:
    """A deterministic default layout: object phrase → box ``(x0, y0, x1, y1)`` in [0, 1]².

    ``"A <relation> B"`` (to the left of / to the right of / above / below) puts A and B in the two
    halves the relation names; ``"A and B and C"`` (or a comma list) puts the objects side by side,
    left to right, in equal strips; one object gets the middle.

    >>> layout_from_prompt("a red circle to the left of a blue square")
    {'a red circle': (0.05, 0.25, 0.45, 0.75), 'a blue square': (0.55, 0.25, 0.95, 0.75)}
    >>> layout_from_prompt("a cat and a dog")
    {'a cat': (0.05, 0.2, 0.475, 0.8), 'a dog': (0.525, 0.2, 0.95, 0.8)}
    """
    text = " ".join(prompt.split())
    for relation in sorted(_RELATIONS, key=len, reverse=True):
        parts = re.split(rf"\s+{re.escape(relation)}\s+", text, maxsplit=1)
        if len(parts) == 2 and all(parts):
            return dict(zip((parts[0], parts[1]), _RELATIONS[relation]))
    phrases = [p for p in re.split(r"\s*,\s*|\s+and\s+", text) if p]
    if not phrases:
        raise AttnscopeError(f"prompt {prompt!r}: no object phrase to lay out")
    n, gap = len(phrases), 0.05
    width = (0.9 - gap * (n - 1)) / n
    return {p: (round(0.05 + k * (width + gap), 4), 0.2, round(0.05 + k * (width + gap) + width, 4), 0.8)
            for k, p in enumerate(phrases)}


def _region(spec: Any, phrase: str) -> tuple[float, ...]:
    values = tuple(spec) if isinstance(spec, (list, tuple)) else None
    if values is None or len(values) not in (2, 4) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                for v in values):
        raise AttnscopeError(f"layout[{phrase!r}] = {spec!r}: expected a box (x0, y0, x1, y1) or a centre (x, y) "
                             f"in [0, 1]")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise AttnscopeError(f"layout[{phrase!r}] = {spec!r}: coordinates must lie in [0, 1]")
    if len(values) == 4 and not (values[0] < values[2] and values[1] < values[3]):
        raise AttnscopeError(f"layout[{phrase!r}] = {spec!r}: an empty box; expected x0 < x1 and y0 < y1")
    return tuple(float(v) for v in values)


def region_mask(region: tuple[float, ...], shape: tuple[int, int], radius: float = 0.2) -> torch.Tensor:
    """``(h·w,)`` float mask of a box or of a disk of ``radius`` around a centre, on an ``(h, w)`` grid of pixel centres.

    >>> region_mask((0.0, 0.0, 0.5, 1.0), (2, 4)).tolist()   # the left half of a 2×4 map
    [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """
    h, w = shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    if len(region) == 4:
        inside = (x >= region[0]) & (x <= region[2]) & (y >= region[1]) & (y <= region[3])
    else:
        inside = (x - region[0]) ** 2 + (y - region[1]) ** 2 <= radius**2
    return inside.flatten().float()


class SpatialTemporal:
    """Place objects with region masks and local prompts at every cross-attention site (seed 001's released rule).

    Parameters
    ----------
    layout : mapping of phrase → box or centre, or None
        Each object phrase of the prompt (``"a red circle"``) with a box ``(x0, y0, x1, y1)`` or a centre
        ``(x, y)`` in [0, 1]² (x to the right, y down; a centre means a disk of ``radius``). None: each
        prompt's :func:`layout_from_prompt` (from its relation words).
    weights : float, (objects, steps) array, or None
        λ, one weight per object and step; a float is used for every object and step. Default 1.0,
        tuned on the shapes model's relation prompts (docs/spatial.md). None: ``5 / objects``, the
        released code's *initial* value, which its optimisation then lowers or raises per step (the
        optimisation is not built yet; fixed at 5/2 it costs presence on the shapes model).
    local_prompt : str
        Template of each object's local prompt (``"{}"`` is the phrase).
    radius : float
        Disk radius for centres (the paper's 0.2).
    sites, steps : optional
        Where and when (default: every cross-attention site, every step).

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
                 local_prompt: str = "a photo of {}", radius: float = 0.2, sites: Any = None, steps: Any = None):
        if layout is not None:
            if not isinstance(layout, Mapping) or not layout:
                raise AttnscopeError(f"layout={layout!r}: expected a mapping of object phrase to a box or centre, "
                                     f"or None (a layout from the prompt's relation words)")
            layout = {str(p): _region(v, p) for p, v in layout.items()}
        if "{}" not in local_prompt:
            raise AttnscopeError(f"local_prompt={local_prompt!r}: expected a template with '{{}}' for the phrase")
        if not 0 < radius <= 1:
            raise AttnscopeError(f"radius={radius!r}: expected a number in (0, 1]")
        self.layout, self.local_prompt, self.radius = layout, local_prompt, float(radius)
        self.weights = weights
        self.scope = InterventionScope(lambda prompt: (), sites, steps)  # sites and steps only: no token columns
        self._session: Any = None
        self._plan: dict[Any, Any] = {}     # token text of the run → per prompt (phrases, regions, λ)
        self._local: dict[str, torch.Tensor] = {}
        self._masks: dict[Any, torch.Tensor] = {}
        self._kv: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"SpatialTemporal({self.layout!r})"

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        weights = self.weights.tolist() if isinstance(self.weights, torch.Tensor) else self.weights
        layout = None if self.layout is None else {p: list(r) for p, r in self.layout.items()}
        return {"name": "SpatialTemporal", "params": {"layout": layout, "weights": weights,
                                                      "local_prompt": self.local_prompt, "radius": self.radius,
                                                      **self.scope.describe()}}

    # -- hook client protocol ------------------------------------------------------------------
    def on_install(self, session: Any) -> None:
        if session.family not in _FAMILIES:
            raise AttnscopeError(
                f"SpatialTemporal on a {session.family!r} pipeline: the released rule adds local prompts' attention "
                f"outputs at cross-attention sites; supported families: {', '.join(_FAMILIES)} (Stable Diffusion "
                f"1.x, 2.x, SDXL). Joint attention (SD3, Flux) and flat stacks are not designed and measured yet")
        self._session = session
        self.scope.install(session)
        self._kv.clear()

    def on_step(self, step_ctx: Any) -> None:
        if step_ctx.rows.uncond is None:
            raise AttnscopeError("SpatialTemporal needs classifier-free guidance (the rule subtracts the "
                                 "unconditional output): use a guidance_scale > 1")
        key = step_ctx.token_text
        if key in self._plan:
            return
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
            if text is not None:
                for phrase in layout:
                    if not target_occurrences(text, phrase, text_roles):
                        raise AttnscopeError(f"layout phrase {phrase!r} is not in the prompt {prompt!r}")
            plans.append((list(layout), list(layout.values())))
        missing = sorted({p for phrases, _ in plans for p in phrases} - set(self._local))
        if missing:
            encoded = self._session.encode_text([self.local_prompt.format(p) for p in missing])
            self._local.update(zip(missing, encoded))
        self._plan[key] = plans
        self._kv.clear()

    def stages(self, ctx: Any) -> tuple[str, ...]:
        return ("output",) if ctx.site.kind == "cross" and self.scope.active(ctx) else ()

    def on_output(self, ctx: Any, output: torch.Tensor) -> torch.Tensor | None:
        hidden = ctx.hidden_states
        if hidden is None:
            raise AttnscopeError(f"site {ctx.site.name}: SpatialTemporal needs the site's queries (a 3-D input)")
        rows, attn = ctx.rows, ctx.site.module
        plans = self._plan[ctx.step_context.token_text]
        out = output.clone()
        query = attn.to_q(hidden[rows.cond])
        for sample in range(rows.samples):
            phrases, regions = plans[rows.prompt_of_sample[sample]] if len(plans) > 1 else plans[0]
            weights = self._lambda(len(phrases), ctx.step, ctx.step_context.num_steps)
            cond, uncond = rows.cond.start + sample, rows.uncond.start + sample
            for i, (phrase, region) in enumerate(zip(phrases, regions)):
                if weights[i] == 0:
                    continue
                local = self._attend(attn, query[sample:sample + 1], phrase, ctx.site.name)
                mask = self._mask(region, ctx.spatial_shape, output)
                out[cond] += mask[:, None] * weights[i] * (local[0] - output[uncond])
        return out

    # -- pieces --------------------------------------------------------------------------------
    def _lambda(self, objects: int, step: int, num_steps: int | None) -> list[float]:
        if self.weights is None:
            return [5.0 / objects] * objects
        if isinstance(self.weights, (int, float)) and not isinstance(self.weights, bool):
            return [float(self.weights)] * objects
        table = torch.as_tensor(self.weights, dtype=torch.float64)
        if table.ndim != 2 or table.shape[0] != objects or (num_steps and table.shape[1] < num_steps):
            raise AttnscopeError(f"weights: expected an array of shape (objects={objects}, steps={num_steps}), "
                                 f"got {tuple(table.shape)}")
        return table[:, step].tolist()

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

    def _mask(self, region: tuple[float, ...], shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        key = (region, shape, like.device, like.dtype)
        if key not in self._masks:
            self._masks[key] = region_mask(region, shape, self.radius).to(like.device, like.dtype)
        return self._masks[key]

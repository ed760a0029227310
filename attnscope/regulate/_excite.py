"""``AttendAndExcite``: the Attend-and-Excite baseline (Chefer et al., SIGGRAPH 2023), which moves the latent.

Attention Regulation edits the attention; Attend-and-Excite leaves the attention alone and moves the
latent instead: before each early step it runs the denoiser on the conditional prompt with
gradients, asks that every target token's (smoothed) attention map peak high somewhere, and takes a
gradient step on the latent. A hook cannot move a pipeline's latent between steps, so the runner
hands the call to :meth:`AttendAndExcite.prepare` first (``ats.rerun`` and ``attnscope eval`` do),
which excites the start noise for step 0 and adds a ``callback_on_step_end`` that excites the
latent of every later step; its looks at the attention are the hook session's
:meth:`~attnscope.hooks.HookSession.probe` calls, which no other client sees.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttnscopeError
from ..hooks import find_adapter, hooks, select_rows
from ..tokens import prompt_text, token_roles
from ._scope import (
    InterventionScope,
    default_regulation_sites,
    is_integer,
    is_real,
    nth_occurrences,
    repr_options,
    steps_note,
    targets_label,
)
from ._trajectory import first_denoiser_call

__all__ = ["AttendAndExcite", "excite_loss", "smoothing_kernel"]

#: the official schedule of iterative refinement, {step: threshold} of a 50-step run, as shares of the run
_THRESHOLDS = {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}


def smoothing_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The official code's smoothing kernel: ``exp(-((x - c) / (2σ))²)`` per axis, normalised to sum 1.

    Its exponent is ``d² / 4σ²`` (a Gaussian of standard deviation ``√2·σ``); kept as the authors
    wrote it, since it is what their reported numbers used.

    >>> k = smoothing_kernel()
    >>> round(float(k.sum()), 6), round(float(k[1, 1] / k[0, 1]), 4)  # centre / edge = e^{1/(4·0.25)} = e
    (1.0, 2.7183)
    """
    if not is_integer(size) or size < 1 or size % 2 == 0:
        raise AttnscopeError(f"size={size!r}: expected an odd int >= 1 (the kernel has a centre pixel)")
    if not is_real(sigma) or not 0 < sigma < math.inf:
        raise AttnscopeError(f"sigma={sigma!r}: expected a positive finite number")
    centre = (size - 1) / 2
    axis = torch.exp(-(((torch.arange(size, dtype=torch.float64) - centre) / (2 * sigma)) ** 2))
    kernel = axis[:, None] * axis[None, :]
    return kernel / kernel.sum()


def excite_loss(maps: torch.Tensor, prompt: list[int], targets: list[list[int]], *, temperature: float = 100.0,
                kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Attend-and-Excite's loss for one image: the most neglected target's shortfall, ``max_s max(0, 1 − m_s)``.

    ``maps`` is the attention ``(h, w, tokens)`` averaged over heads and sites. Over the prompt's own
    tokens (``prompt``: its word positions, no start/end of text) it is multiplied by ``temperature``
    and softmaxed again, per pixel; each target's map (the sum over its pieces' columns) is smoothed
    by ``kernel`` (reflect padding; a side too short to reflect, a map one pixel high or wide, repeats its edge)
    and ``m_s`` is its maximum.

    Tokens ``[SOT, circle, square, EOT]``; "circle" holds 0.5 of every pixel, "square" 0.2 except one
    pixel where it holds 0.52. After ×100 and the softmax over the two words, square's best pixel
    has ``σ(100 · 0.02) = σ(2) = 0.881`` of it, circle has ≈ 1 elsewhere; without smoothing the loss
    is square's shortfall:

    >>> import math
    >>> maps = torch.zeros(2, 2, 4)
    >>> maps[..., 1], maps[..., 2] = 0.5, 0.2
    >>> maps[0, 0, 2] = 0.52
    >>> loss = excite_loss(maps, prompt=[1, 2], targets=[[1], [2]], kernel=torch.ones(1, 1))
    >>> round(float(loss), 4), round(1 - 1 / (1 + math.exp(-2)), 4)
    (0.1192, 0.1192)
    """
    _check_excite_input(maps, prompt, targets)
    h, w, _ = maps.shape
    kernel = smoothing_kernel() if kernel is None else kernel
    shares = torch.softmax(maps[..., prompt] * temperature, dim=-1)  # (h, w, prompt tokens)
    where = {p: i for i, p in enumerate(prompt)}
    per_target = torch.stack([shares[..., [where[p] for p in cols]].sum(-1) for cols in targets])  # (n, h, w)
    pad = kernel.shape[-1] // 2
    image = per_target[:, None]
    if pad:  # reflect padding, as the official code; a side too short to reflect (a 1-pixel row) repeats its edge
        image = F.pad(image, (pad, pad, 0, 0), mode="reflect" if w > pad else "replicate")
        image = F.pad(image, (0, 0, pad, pad), mode="reflect" if h > pad else "replicate")
    smooth = F.conv2d(image, kernel.to(maps)[None, None]) if pad else image
    peaks = smooth.flatten(1).amax(1)
    return (1 - peaks).clamp(min=0).max()


def _check_excite_input(maps: Any, prompt: Any, targets: Any) -> None:
    """One AttnscopeError naming what :func:`excite_loss` got, unless the maps are ``(h, w, tokens)`` and every
    target is a non-empty list of the prompt's positions.

    >>> _check_excite_input(torch.zeros(2, 2, 4), [1, 2], [[1], [3]])
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: targets=[[1], [3]]: expected one or more targets, each a non-empty list of positions among prompt=[1, 2]
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or 0 in maps.shape:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise AttnscopeError(f"maps {shape}: expected a tensor (h, w, tokens), none of them empty")
    tokens = maps.shape[-1]
    if (not isinstance(prompt, (list, tuple)) or not prompt
            or not all(is_integer(p) and 0 <= p < tokens for p in prompt)):
        raise AttnscopeError(f"prompt={prompt!r}: expected the prompt's word positions, a non-empty list of ints in "
                             f"0..{tokens - 1}")
    known = set(prompt)
    if (not isinstance(targets, (list, tuple)) or not targets
            or not all(isinstance(c, (list, tuple)) and c and all(p in known for p in c) for c in targets)):
        raise AttnscopeError(f"targets={targets!r}: expected one or more targets, each a non-empty list of positions "
                             f"among prompt={list(prompt)!r}")


class AttendAndExcite:
    """Move the latent of the early steps until every target's attention peaks somewhere (Attend-and-Excite).

    At each chosen step ``i`` (default: the first half, the official 25 of 50) the denoiser runs on the
    latent with the conditional prompt only and gradients on; the attention of the chosen sites
    (default: the same sites as :class:`AttentionRegulation`, which on SD 1.x/2.x at 512 px are the
    official 16×16 layers) is averaged over heads and sites, and :func:`excite_loss` is minimised by
    one step ``z ← z − α_i ∇_z L``, ``α_i = step_size · √(linspace(1, 0.5, N)[i])``. At the steps of
    ``thresholds`` (shares of the run: the official steps 0, 10 and 20 of 50) the step is repeated
    first, up to ``max_refinement`` times, until the loss is at most ``1 − threshold``. Each image
    has its own loss, steps and stopping, so it does not depend on its batch. The latents the
    pipeline then denoises are the moved ones; the attention itself is never edited.

    Because it moves the latent, it needs the pipeline call: the runners call :meth:`prepare`
    (``ats.rerun``, ``attnscope eval --intervention attend-excite``); by hand, call it yourself
    before installing the hooks, as below. UNet pipelines (Stable Diffusion 1.x/2.x, SDXL), prompts
    as text; it uses ``latents=`` and ``callback_on_step_end`` of the call, and its looks get the
    denoiser's conditioning (text embeddings, SDXL's pooled embeddings and size ids) exactly as the
    pipeline's first denoiser call gets it.

    Parameters
    ----------
    targets : words/phrases/positions, or a function prompt → targets
        The subjects, e.g. ``["circle", "square"]``; the k-th mention of a word is its k-th occurrence.
    sites : glob(s), predicate or None
        Sites whose attention is averaged; they must share one map size.
    steps : "first_half", int, list, slice or None
        The steps whose latent is moved.
    step_size : float
        The official 20.
    thresholds : {share of the run: threshold}
        Iterative refinement at step ``round(share · N)``; official ``{0: 0.05, 0.2: 0.5, 0.4: 0.8}``. A share
        whose step is not moved is ignored, as in the official code; shares that land on one step (a short run)
        take the later share's threshold. A share may be given as text (``{"0.2": 0.5}``, as a manifest records it).
    max_refinement : int
        At most this many refinement updates per step (official 20).
    temperature, sigma : float
        The softmax over the prompt's words is taken of ``temperature`` × the attention (official 100);
        the smoothing kernel is :func:`smoothing_kernel` ``(3, sigma)`` (official 0.5).
    probe_batch : int, optional
        At most this many images per look with gradients (default: the whole batch at once; the
        official code looks at one at a time). A look keeps the denoiser's activations for the
        backward pass, so on a GPU a large batch at 512 px and more may need a small ``probe_batch``.

    Examples
    --------
    >>> import attnscope as ats, numpy as np, torch
    >>> pipe = ats.load_pipeline("shapes")
    >>> excite = ats.regulate.AttendAndExcite(["circle", "square"], max_refinement=2)
    >>> call = {"prompt": "a red circle and a blue square", "num_inference_steps": 4, "output_type": "np",
    ...         "generator": torch.Generator().manual_seed(0)}
    >>> excite.prepare(pipe, call)               # excites the start noise, adds the per-step callback
    >>> with ats.hooks(pipe, excite):
    ...     moved = pipe(**call).images[0]
    >>> plain = pipe("a red circle and a blue square", num_inference_steps=4, output_type="np",
    ...              generator=torch.Generator().manual_seed(0)).images[0]
    >>> bool(np.abs(moved - plain).max() > 0.01), sorted(excite.history)    # steps 0 and 1 of 4 were moved
    (True, [0, 1])
    """

    role = "intervention"

    def __init__(self, targets: Any, *, sites: Any = None, steps: Any = "first_half", step_size: float = 20.0,
                 thresholds: Mapping[float, float] | None = None, max_refinement: int = 20,
                 temperature: float = 100.0, sigma: float = 0.5, probe_batch: int | None = None):
        if thresholds is None:
            thresholds = dict(_THRESHOLDS)
        shares = {_share(k): v for k, v in thresholds.items()} if isinstance(thresholds, Mapping) else None
        if shares is None or len(shares) != len(thresholds) or not all(
                is_real(k) and is_real(v) and 0 <= k < 1 and 0 <= v <= 1 for k, v in shares.items()):
            raise AttnscopeError(f"thresholds={thresholds!r}: expected {{share of the run in [0, 1): threshold in "
                                 f"[0, 1]}}, e.g. the official {_THRESHOLDS}")
        thresholds = {float(k): float(v) for k, v in sorted(shares.items())}  # by share: the later one wins a step
        if not is_integer(max_refinement) or max_refinement < 0:
            raise AttnscopeError(f"max_refinement={max_refinement!r}: expected a non-negative integer")
        if probe_batch is not None and (not is_integer(probe_batch) or probe_batch < 1):
            raise AttnscopeError(f"probe_batch={probe_batch!r}: expected a positive integer or None")
        for name, value in (("step_size", step_size), ("temperature", temperature), ("sigma", sigma)):
            if not (is_real(value) and 0 < value < math.inf):
                raise AttnscopeError(f"{name}={value!r}: expected a positive finite number")
        self.scope = InterventionScope(targets, sites, steps, first_occurrence=True,
                                       default_sites=default_regulation_sites)
        self.targets = self.scope.targets  # numpy's and xarray's words and positions as Python's
        self.step_size, self.thresholds, self.max_refinement = float(step_size), thresholds, int(max_refinement)
        self.temperature, self.sigma = float(temperature), float(sigma)
        self.probe_batch = None if probe_batch is None else int(probe_batch)
        self._kernel = smoothing_kernel(3, self.sigma)
        self._run: dict[str, Any] | None = None  # what prepare() worked out for the call about to run
        self._session: Any = None
        self._looking = False
        self._maps: list[torch.Tensor] = []
        #: last run's losses per moved step: {step: (loss before, loss after refinement) per image}
        self.history: dict[int, tuple[list[float], list[float]]] = {}

    def __repr__(self) -> str:
        given = {"sites": (self.scope.sites, None), "steps": (self.scope.steps, "first_half"),
                 "step_size": (self.step_size, 20.0), "thresholds": (self.thresholds, _THRESHOLDS),
                 "max_refinement": (self.max_refinement, 20), "temperature": (self.temperature, 100.0),
                 "sigma": (self.sigma, 0.5), "probe_batch": (self.probe_batch, None)}
        return f"AttendAndExcite({targets_label(self.targets)!r}{repr_options(given)})"

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {"name": "AttendAndExcite", "params": {
            "targets": targets_label(self.targets), **self.scope.describe(), "step_size": self.step_size,
            "thresholds": {str(k): v for k, v in self.thresholds.items()}, "max_refinement": self.max_refinement,
            "temperature": self.temperature, "sigma": self.sigma, "probe_batch": self.probe_batch}}

    # -- the call ----------------------------------------------------------------------------------
    def prepare(self, pipe: Any, call: dict[str, Any]) -> None:
        """Make ``call`` (the keyword arguments of the pipeline call about to run) an Attend-and-Excite call.

        Runs the call up to its first denoiser call and stops it there, keeping the denoiser's
        conditioning and giving the generators' draws back; draws the start noise from the call's
        generator (without one: from torch's global RNG) exactly as the pipeline would, moves it for
        step 0, and puts it in ``call["latents"]``; adds ``callback_on_step_end``, which moves the latent
        of every later chosen step. Install this object with :func:`attnscope.hooks` for the
        call (it reads the attention through the hooks); a second call needs a second ``prepare``. A ``prepare`` voids
        the one before it, also when it fails.
        """
        self._run = None  # an earlier preparation is void, also when this one fails
        _check_pipeline(pipe, call)
        prompts = [call["prompt"]] if isinstance(call["prompt"], str) else list(call["prompt"])
        per_prompt = int(call.get("num_images_per_prompt") or 1)
        found = [self._prompt_columns(pipe.tokenizer, p, i, len(prompts)) for i, p in enumerate(prompts)]
        columns = [c for c in found for _ in range(per_prompt)]
        t0, sample, inputs = _first_denoiser_call(pipe, call)  # the conditioning exactly as the pipeline builds it
        batch, samples = sample.shape[0], len(columns)
        conditioning = select_rows(inputs, batch, slice(batch - samples, batch))  # [uncond; cond] rows: the cond
        num_steps = len(pipe.scheduler.timesteps)  # set by the pipeline's own call
        try:
            moved = self.scope.steps_of_run(num_steps)
        except AttnscopeError as exc:
            raise AttnscopeError(f"{exc}{steps_note(pipe, num_steps)}") from None
        sigma0 = pipe.scheduler.init_noise_sigma
        if call.get("latents") is not None:
            latents = call["latents"].to(device=sample.device, dtype=sample.dtype) * sigma0
        else:  # the pipeline's own draw, from the call's generator (the cut-short call gave its draws back)
            scale = pipe.vae_scale_factor
            latents = pipe.prepare_latents(samples, sample.shape[1], sample.shape[-2] * scale, sample.shape[-1] * scale,
                                           sample.dtype, sample.device, call.get("generator"))
        self._run = {"columns": columns, "conditioning": conditioning, "moved": set(moved),
                     "refine": {round(share * num_steps): t for share, t in self.thresholds.items()},
                     "sizes": (self.step_size * torch.linspace(1.0, 0.5, num_steps, dtype=torch.float64).sqrt()).tolist()}
        self.history = {}
        if 0 in moved:
            try:
                with hooks(pipe, self) as session:
                    latents = self._excite(session, latents, t0, 0)
            except BaseException:
                self._run = None  # not prepared: installing it for the call is the "needs the pipeline call" error
                raise
        call["latents"] = latents / sigma0
        call["callback_on_step_end"] = self._on_step_end
        call["callback_on_step_end_tensor_inputs"] = ["latents"]
        self._run["ready"] = True

    def _prompt_columns(self, tokenizer: Any, prompt: str, index: int, count: int) -> tuple[list[int], list[list[int]]]:
        """:meth:`_columns`; with several prompts, an error names the prompt it is about."""
        try:
            return self._columns(tokenizer, prompt)
        except AttnscopeError as exc:
            if count == 1:
                raise
            hint = "" if callable(self.targets) else "; to target other words per prompt, give targets as a function of the prompt"
            raise AttnscopeError(f"prompt {index} of {count} ({prompt!r}): {exc}{hint}") from None

    def _columns(self, tokenizer: Any, prompt: str) -> tuple[list[int], list[list[int]]]:
        """The prompt's word positions and each target's positions, on the tokens the text encoder reads."""
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        targets = self.targets(prompt_text(tokens)) if callable(self.targets) else self.targets
        words = [i for i, role in enumerate(token_roles(tokens)) if role == "word"]
        found = nth_occurrences(tokens, targets)
        outside = [p for cols in found for p in cols if p not in words]
        if outside:
            raise AttnscopeError(f"targets={targets_label(self.targets)!r}: positions {outside} of the prompt "
                                 f"{prompt!r} are not words of it (Attend-and-Excite shares attention among the words)")
        return words, found

    def _on_step_end(self, pipe: Any, i: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        step = i + 1
        run = self._run
        if run is not None and self._session is None and step >= len(pipe.scheduler.timesteps):
            self._run = None  # the prepared call ran to its end without the hooks: the next call needs its own
        if run is None or step not in run["moved"]:  # the moved steps all lie within the run
            return {}
        if self._session is None:
            raise AttnscopeError("AttendAndExcite: the prepared call ran without the hooks; run it as "
                                 "`with ats.hooks(pipe, excite): pipe(**call)` (its looks at the attention go "
                                 "through them)")
        return {"latents": self._excite(self._session, tensors["latents"], pipe.scheduler.timesteps[step], step)}

    # -- the optimisation --------------------------------------------------------------------------
    def _excite(self, session: Any, latents: torch.Tensor, t: Any, step: int) -> torch.Tensor:
        """The latents of ``step`` after refinement (at a threshold step) and one update, per image."""
        run = self._run
        assert run is not None
        size, threshold = run["sizes"][step], run["refine"].get(step)
        z = latents.detach().clone()
        everyone = list(range(z.shape[0]))
        loss, grad = self._look(session, z, everyone, t, step)
        first = loss.clone()
        if threshold is not None and self.max_refinement:
            target = max(0.0, 1.0 - threshold)
            refining = [b for b in everyone if loss[b] > target]
            updates = 0
            while refining:
                # the official loop: update from the current loss, then stop once that loss was at most the target
                z[refining] -= size * grad[refining] * (loss[refining] != 0)[:, None, None, None]
                updates += 1
                refining = [b for b in refining if loss[b] > target] if updates < self.max_refinement else []
                if refining:
                    loss[refining], grad[refining] = self._look(session, z, refining, t, step)
            moved = [b for b in everyone if first[b] > target]
            if moved:  # the official code looks once more after refining; the update below uses that look
                loss[moved], grad[moved] = self._look(session, z, moved, t, step)
        z -= size * grad * (loss != 0)[:, None, None, None]
        self.history[step] = (first.tolist(), loss.tolist())
        return z

    def _look(self, session: Any, z: torch.Tensor, rows: list[int], t: Any, step: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss per image of ``rows`` and its gradient with respect to their latents: probes of the denoiser, at
        most ``probe_batch`` images each."""
        size = self.probe_batch or len(rows)
        parts = [self._look_at(session, z, rows[i:i + size], t, step) for i in range(0, len(rows), size)]
        return torch.cat([loss for loss, _ in parts]), torch.cat([grad for _, grad in parts])

    def _look_at(self, session: Any, z: torch.Tensor, rows: list[int], t: Any, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        run = self._run
        assert run is not None
        sample = z[rows].detach().requires_grad_(True)
        self._maps = []
        with torch.enable_grad(), session.probe(self):
            self._looking = True
            try:
                pipe = session.pipe
                pipe.unet(pipe.scheduler.scale_model_input(sample, t), t,
                          **select_rows(run["conditioning"], len(run["columns"]), rows))
            finally:
                self._looking = False
            if not self._maps:
                raise AttnscopeError(f"AttendAndExcite at step {step}: no chosen site was called; sites="
                                     f"{self.scope.sites!r}")
            shapes = {m.shape for m in self._maps}
            if len(shapes) > 1:
                raise AttnscopeError(f"AttendAndExcite: the chosen sites have maps of different sizes "
                                     f"{sorted(tuple(s[1:3]) for s in shapes)}; choose sites of one size")
            maps = torch.stack(self._maps).mean(0)  # (rows, h, w, tokens)
            losses = torch.stack([excite_loss(maps[j], *run["columns"][b], temperature=self.temperature,
                                              kernel=self._kernel) for j, b in enumerate(rows)])
            grad, = torch.autograd.grad(losses.sum(), sample)
        self._maps = []
        return losses.detach(), grad

    # -- hook client protocol ----------------------------------------------------------------------
    def on_install(self, session: Any) -> None:
        if self._run is None:
            raise AttnscopeError("AttendAndExcite moves the latent between steps, which needs the pipeline call: call "
                                 "excite.prepare(pipe, call) with the call's keyword arguments first and run "
                                 "pipe(**call), or use ats.rerun / attnscope eval, which do")
        self.scope.install(session)
        self._session = session

    def on_remove(self, error: BaseException | None) -> None:
        self._session = None
        if self._run is not None and self._run.get("ready"):  # the prepared call has run: the next needs its own
            self._run = None

    def stages(self, ctx: Any) -> tuple[str, ...]:
        return ("probs",) if self._looking and self.scope.active(ctx) else ()

    def on_probs(self, ctx: Any, probs: torch.Tensor) -> None:
        h, w = ctx.spatial_shape
        self._maps.append(probs.mean(1).view(probs.shape[0], h, w, probs.shape[-1]))


def _share(key: Any) -> Any:
    """A key of ``thresholds``: a number, or a number as text (a manifest's JSON keeps its keys as strings)."""
    if isinstance(key, str):
        try:
            return float(key)
        except ValueError:
            return key
    return key


def _first_denoiser_call(pipe: Any, call: Mapping[str, Any]) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """``(timestep, sample, the other inputs)`` of the pipeline's first denoiser call for ``call``: the call is run
    and stopped there, and the generators it drew from (the call's, or torch's global one) are put back."""
    args, kwargs = first_denoiser_call(pipe, pipe.unet, call, "AttendAndExcite")
    seen = {**kwargs, **dict(zip(("sample", "timestep", "encoder_hidden_states"), args))}
    inputs = {k: v for k, v in seen.items() if k not in ("sample", "timestep", "return_dict")}
    return seen["timestep"], seen["sample"], inputs


def _check_pipeline(pipe: Any, call: Mapping[str, Any]) -> None:
    """Attend-and-Excite here needs a UNet pipeline (SD 1.x/2.x, SDXL) called with text and a step callback free."""
    family = find_adapter(pipe)[0].FAMILY
    if family != "unet" or "latents" not in getattr(pipe, "_callback_tensor_inputs", ()):  # no step callback
        raise AttnscopeError(f"AttendAndExcite on {type(pipe).__name__}: expected a UNet pipeline (Stable Diffusion "
                             "1.x/2.x, SDXL) that takes latents= and callback_on_step_end=; Attend-and-Excite is not "
                             "defined on joint attention or flat stacks here")
    if "strength" in inspect.signature(pipe.__call__).parameters:  # img2img, inpainting: starts from an image
        raise AttnscopeError(f"AttendAndExcite on {type(pipe).__name__}: expected a text-to-image pipeline (ControlNet's "
                             "included); it draws its start noise as text-to-image does, which a pipeline starting "
                             "from an image (img2img, inpainting) does not take")
    if not isinstance(call.get("prompt"), (str, list)) or call.get("prompt_embeds") is not None:
        raise AttnscopeError("AttendAndExcite: expected the call's prompt as text (prompt=...), not prompt_embeds: the "
                             "targets are found in its words")
    for key in ("callback_on_step_end", "timesteps", "sigmas"):
        if call.get(key) is not None:
            raise AttnscopeError(f"AttendAndExcite: the call already has {key}=...; it sets its own step callback and "
                                 "uses the scheduler's own timesteps")

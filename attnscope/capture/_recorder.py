"""The Recorder: an observer client that writes cross-attention maps into a trace store."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AttnscopeError, AttnscopeWarning
from ..hooks import CallContext, HookSession, StepContext
from ..selection import BRANCHES, HEADS, TOKENS, SiteSpec, StepSpec, check_choice, select_sites, select_steps
from ..store import (
    FORMAT_VERSION,
    GATED_STEPS_ATTR,
    OUTPUT_CHANGE,
    OUTPUT_NORM,
    SiteLayout,
    StoreLayout,
    TraceWriter,
    build_manifest,
    check_keep_bits,
    check_store_path,
    jsonable,
)
from ..tokens import prompt_positions, segment_bounds, token_roles
from ._adapters import adapter_state

__all__ = ["Recorder"]


class Recorder:
    """Observer client that writes the cross-attention probabilities of one pipeline call to a store.

    Use it through :func:`capture`, or inside :func:`attnscope.hooks` next to other clients; call
    :meth:`add_images` with the pipeline's images before the block ends to store them too.

    Next to interventions: at a call whose attention an intervention bypassed (TGATE serving its
    cache) the maps are stored as NaN, so the store stays complete and step-aligned, and the step is
    listed in the root attribute ``gated_steps``. At a step where the hook core runs one
    classifier-free-guidance half only (``StepContext.single_branch``) and a call still attends,
    the rows that ran are stored as the ``cond`` branch — they are the prediction that drives the
    image — and ``attention_uncond`` (if recorded) holds NaN there, as it does from a step on which the
    batch has no uncond rows any more (a CFG cutoff callback turned guidance off).

    Parameters
    ----------
    store : path
        Zarr store to create (a directory).
    sites : glob, list of names/globs, or predicate on :class:`CrossAttentionSite`, optional
        Which sites to record (default all).
    steps : int, range, slice or list of int, optional
        Which denoising steps to record (default all).
    heads : {"mean", "all"}
        Average the heads on the device (head axis of size 1) or keep every head.
    tokens : {"auto", "all", "prompt"}
        All text positions, or only each segment's positions up to the longest prompt's end-of-text
        token (CLIP's, T5's ``</s>``). At joint sites the padding's share stays known: it is the
        ``text_mass`` minus the stored columns. ``"auto"`` (default): ``"prompt"`` when the
        pipeline has joint sites (SD3, Flux: 256–512 T5 positions, mostly padding) or a text
        encoder other than CLIP (PixArt's 120/300 T5 positions, masked padding with zero attention;
        Sana's 300 Gemma positions) and the prompt's tokens are known, else ``"all"`` (the 77 CLIP
        positions of a UNet).
    branch : {"cond", "uncond", "both"}
        Which classifier-free-guidance half to record.
    overwrite : bool
        Replace an existing trace at ``store``, only by a complete one: the run is written beside it
        (``<store>.attnscope-new-<8 hex>``) and takes its place when it completes; a run that fails or
        stops early keeps the old trace and leaves its own partial trace there (``path`` says where).
    output_change : bool
        Also keep, at every recorded site and step, ``‖O_t‖`` and ``‖O_t − O_{t−1}‖`` per sample,
        where ``O`` is the site's output averaged over the two guidance halves (what TGATE caches);
        computed on the device, moved to the host once at the end and stored in the ``summaries``
        group (read with :meth:`Trace.output_change`).
    max_queue_bytes : int
        Bound of the queue to the background writer (>= 0; 0 writes each map before the next is queued); the
        forward pass waits only when it is full.
    keep_bits : int, optional
        Store the maps lossily, keeping this many of float16's 10 mantissa bits (1–10; numcodecs' BitRound, round
        to nearest): each value within a relative ``2**-(keep_bits + 1)`` of the lossless one, the store smaller
        (docs/store-format.md gives sizes and errors). ``None`` (default): lossless. ``text_mass`` stays lossless.
    run_info : dict, optional
        What the hooks cannot see (prompts, seed, …), stored as the manifest's ``run``.
    extra_manifest : dict, optional
        JSON-able top-level manifest fields added to the built manifest (e.g. ``parent`` and
        ``interventions`` of a rerun); they cannot replace the built ones.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> rec = ats.Recorder(tempfile.mkdtemp() + "/run.zarr", sites="up_blocks.*")
    >>> with ats.hooks(pipe, rec):
    ...     out = pipe("a red circle", num_inference_steps=2, height=32, width=32)
    ...     rec.add_images(out.images)
    >>> ats.open_trace(rec.path).complete
    True
    """

    role = "observer"

    @property
    def path(self) -> Path:
        """Where this run's trace is: ``store``, or the directory beside it while a run that replaces a trace is
        written and after one that did not complete (the old trace then stays at ``store``)."""
        return self.writer.location if self.writer is not None else self._target

    def __init__(self, store: str | Path, *, sites: SiteSpec = None, steps: StepSpec = None, heads: str = "mean",
                 tokens: str = "auto", branch: str = "cond", overwrite: bool = False, output_change: bool = False,
                 max_queue_bytes: int = 256 << 20, run_info: dict[str, Any] | None = None,
                 extra_manifest: dict[str, Any] | None = None, keep_bits: int | None = None):
        self.heads = check_choice("heads", heads, HEADS)
        self.tokens = check_choice("tokens", tokens, TOKENS)
        self.branch = check_choice("branch", branch, BRANCHES)
        if isinstance(max_queue_bytes, bool) or not isinstance(max_queue_bytes, numbers.Integral) or max_queue_bytes < 0:
            raise AttnscopeError(f"max_queue_bytes={max_queue_bytes!r}: expected an int >= 0 (the bytes of maps queued "
                                 f"for the writer before the forward pass waits)")
        self._target = check_store_path(store, overwrite)
        self.overwrite, self.max_queue_bytes = overwrite, int(max_queue_bytes)
        if not isinstance(output_change, bool):
            raise AttnscopeError(f"output_change={output_change!r}: expected True or False")
        self.output_change = output_change
        self.keep_bits = check_keep_bits(keep_bits)
        self.site_spec, self.step_spec = sites, steps
        self.run_info = dict(run_info or {})
        self.extra_manifest = _extra_manifest(extra_manifest)
        self.branches = ("uncond", "cond") if branch == "both" else (branch,)
        self.writer: TraceWriter | None = None
        self._session: HookSession | None = None
        self._sites: dict[str, Any] = {}
        self._site_index: dict[str, int] = {}
        self._steps: frozenset[int] = frozenset()
        self._run: int | None = None
        self._steps_seen = 0
        self._finished = False
        self._num_steps = 0
        self._token_index: slice | torch.Tensor = slice(None)
        self._kept = 0
        self._images: np.ndarray | None = None
        self._manifest: dict[str, Any] | None = None
        self._planned: list[float] = []
        self._samples = 0
        self._gated: set[int] = set()  # steps where an intervention bypassed a recorded site
        self._bypassed: set[str] = set()  # sites bypassed at the current step
        self._outputs = _OutputChange()
        self._refused = False  # on_install refused a second block: its on_remove leaves the first block's trace alone

    # -- client protocol ------------------------------------------------------------------------------
    def on_install(self, session: HookSession) -> None:
        if self._session is not None:  # its writer is closed (or about to be): a second block would record nothing
            self._refused = True
            raise AttnscopeError(f"Recorder({str(self.path)!r}) was already used in a `with ats.hooks(...)` block; a "
                                 f"Recorder records one run: create a new Recorder per run")
        self._session = session
        self._sites = {s.name: s for s in select_sites(self.site_spec, session.sites)}
        self._site_index = {name: i for i, name in enumerate(self._sites)}
        # the steps are checked at the first step, against the scheduler's count: num_inference_steps is not it (Heun
        # and PNDM run more, img2img's strength, denoising_end and an Euler sigmas= list fewer); still before the store
        scale = self.run_info.get("guidance_scale", 2.0)
        if self.branch != "cond" and scale is not None and not _is_number(scale):
            raise AttnscopeError(f"guidance_scale={scale!r}: expected a number")
        if self.branch != "cond" and scale is not None and scale <= 1.0:
            raise AttnscopeError(
                f"branch={self.branch!r}: guidance_scale={self.run_info['guidance_scale']} turns classifier-free guidance "
                f"off, so there is no unconditional branch; use branch='cond'"
            )

    def stages(self, ctx: CallContext) -> tuple[str, ...]:
        if ctx.step not in self._steps or ctx.site.name not in self._sites:
            return ()
        return ("probs", "output") if self.output_change else ("probs",)

    def on_step(self, step: StepContext) -> None:
        if self._run is None:
            self._run = step.run
            self._start(step)
        elif step.run != self._run:
            self._finished = True  # the denoiser went on to another run: the recorded one ran its last step through
            raise AttnscopeError("Recorder records one pipeline call; use a new Recorder (or capture()) per call")
        assert self.writer is not None
        if not self._planned or self._planned[step.step] != step.timestep:
            self.writer.timestep(step.step, step.timestep)  # the plan was unknown or the run deviated from it
        self.writer.steps_done(step.step)  # the steps before this one ran through
        self._steps_seen = step.step + 1
        self._bypassed = set()

    def on_skipped(self, ctx: CallContext) -> None:
        """An intervention bypassed this call's attention: store NaN maps and remember the step as gated."""
        self._gated.add(ctx.step)
        self._bypassed.add(ctx.site.name)
        for branch in self.branches:
            self._put_nan(ctx, branch)

    def on_output(self, ctx: CallContext, output: torch.Tensor) -> None:
        if ctx.site.name in self._bypassed:  # a cache, not this step's attention
            self._outputs.skip(ctx.site.name)
        else:
            self._outputs.add(ctx, self._site_index[ctx.site.name], output)

    def _put_nan(self, ctx: CallContext, branch: str) -> None:
        heads = 1 if self.heads == "mean" else ctx.site.heads
        assert self.writer is not None
        self.writer.put(ctx.site.name, branch, ctx.step,
                        np.full((self._samples, heads, *ctx.spatial_shape, self._kept), np.nan, np.float16), gated=True)
        if ctx.site.kind == "joint":
            self.writer.put(ctx.site.name, branch, ctx.step, np.full((self._samples, heads, *ctx.spatial_shape), np.nan,
                                                                     np.float16), quantity="text_mass", gated=True)

    def on_probs(self, ctx: CallContext, probs: torch.Tensor) -> None:
        h, w = ctx.spatial_shape
        single = ctx.step_context.single_branch is not None  # one CFG half ran: its rows are the prediction
        for branch in self.branches:
            if branch == "uncond" and (single or ctx.rows.uncond is None):  # or guidance stopped: a CFG cutoff
                self._put_nan(ctx, branch)
                continue
            rows = slice(None) if single else ctx.rows.rows(branch)
            p = probs[rows]
            if ctx.site.kind == "joint":  # the row's whole mass on text, before any token selection
                mass = p.sum(dim=-1, dtype=torch.float32)
                mass = mass.mean(dim=1, keepdim=True) if self.heads == "mean" else mass
                self._put(ctx, branch, mass.reshape(mass.shape[0], mass.shape[1], h, w), "text_mass")
            p = p[..., self._token_index]  # select, then average the heads: fewer columns to average
            p = p.mean(dim=1, keepdim=True, dtype=torch.float32) if self.heads == "mean" else p
            self._put(ctx, branch, p.reshape(p.shape[0], p.shape[1], h, w, p.shape[-1]), "attention")

    def _put(self, ctx: CallContext, branch: str, values: torch.Tensor, quantity: str) -> None:
        p = values.to(torch.float16, copy=True)
        ready = None
        if p.is_cuda:
            host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            host.copy_(p, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            p = host
        assert self.writer is not None
        self.writer.put(ctx.site.name, branch, ctx.step, p, ready, quantity=quantity)

    def on_remove(self, error: BaseException | None) -> None:
        if self._refused:
            self._refused = False
            return
        if self.writer is None:
            return
        # the last step began; it ran through unless the block ended with an error before its denoiser call returned
        # (it returned: the hook core saw it, the images were added, or the denoiser went on to another run)
        session = self._session
        last_done = session is not None and session.step_done == (self._run, self._num_steps - 1)
        finished = error is None or last_done or self._images is not None or self._finished
        complete = finished and self._steps_seen >= self._num_steps
        try:
            try:
                if session is not None and session.step_done == (self._run, self._steps_seen - 1) \
                        and self.writer.error is None:  # the step that ran last returned: it ran through
                    self.writer.steps_done(self._steps_seen)
                if self.output_change and self.writer.error is None:
                    norm, change = self._outputs.arrays(self._num_steps, len(self._sites), self._samples)
                    self.writer.summaries(list(self._sites), {OUTPUT_NORM: norm, OUTPUT_CHANGE: change})
            finally:
                self.writer.close(complete=complete, images=self._images,
                                  attrs={"images": 0 if self._images is None else len(self._images),
                                         GATED_STEPS_ATTR: sorted(self._gated), **self._resized_manifest()})
        except BaseException as exc:
            self._say_kept(error or exc)
            raise
        self._say_kept(error)
        if self.writer.nan_maps:
            first = min(min(steps) for steps in self.writer.nan_maps.values())
            warnings.warn(f"{str(self.path)!r}: the model produced NaN attention at {len(self.writer.nan_maps)} of "
                          f"{len(self._sites)} sites, from step {first} (NaN weights or a float16 overflow): the image "
                          f"is likely blank and statistics over those steps are NaN; recorded in the trace's 'nan_maps'",
                          AttnscopeWarning, stacklevel=2)

    # -- helpers --------------------------------------------------------------------------------------
    def _say_kept(self, error: BaseException | None) -> None:
        """A run that was to replace a trace and did not complete: say that the old trace is kept and where this
        run's partial trace is, as a note of the exception that ended the run, else (the call returned, or was
        interrupted: the note of a KeyboardInterrupt is not shown by every caller) as a warning."""
        assert self.writer is not None
        if self.writer.location == self.writer.path:
            return
        message = (f"attnscope: this run did not complete, so the old trace at {str(self.writer.path)!r} is kept; "
                   f"the run's partial trace is at {str(self.writer.location)!r}, readable with ats.open_trace")
        if isinstance(error, Exception) and hasattr(error, "add_note"):  # Python 3.11 and later
            error.add_note(message)
        else:
            warnings.warn(message, AttnscopeWarning, stacklevel=3)

    def _resized_manifest(self) -> dict[str, Any]:
        """``{"manifest": …}`` with the images' size as the run's height and width where the pipeline resized its
        output (PixArt's and Sana's resolution binning generate at the nearest bin and resize back), the size it
        generated at kept as ``generated_size``; ``{}`` otherwise."""
        run = (self._manifest or {}).get("run", {})
        if self._images is None or self._images.ndim != 4 or not run:
            return {}
        size = [int(v) for v in self._images.shape[1:3]]
        if size == [run.get("height"), run.get("width")]:
            return {}
        run = {**run, "height": size[0], "width": size[1], "generated_size": [run.get("height"), run.get("width")]}
        return {"manifest": {**self._manifest, "run": run}}

    def add_images(self, images: Any) -> None:
        """Store the pipeline's output images (PIL list, numpy array in [0, 1] or uint8, or tensor in [0, 1]) with the
        trace: RGB, one per sample of the run (else AttnscopeError, and the trace is kept without them)."""
        pixels = _images_to_uint8(images)
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise AttnscopeError(f"images: got shape {pixels.shape} (as image, height, width, channel), expected RGB "
                                 f"images: (image, height, width, 3)")
        if self._samples and len(pixels) != self._samples:
            raise AttnscopeError(f"images: got {len(pixels)} images, expected one per sample of the run "
                                 f"({self._samples}): pass the pipeline's output images")
        self._images = pixels

    def _start(self, step: StepContext) -> None:
        session = self._session
        assert session is not None
        num_steps = step.num_steps or self.run_info.get("num_inference_steps")
        if not num_steps:
            raise AttnscopeError("cannot tell this run's number of steps: the pipeline does not expose num_timesteps; "
                                 "pass run_info={'num_inference_steps': N}")
        self._num_steps = num_steps
        steps = select_steps(self.step_spec, num_steps)
        rows = step.rows
        if self.branch != "cond" and rows.uncond is None:
            raise AttnscopeError(f"branch={self.branch!r}: the denoiser's batch has no unconditional rows (guidance is "
                                 f"off, or runs as a second denoiser call per step — Flux's true_cfg_scale, FLUX.2 "
                                 f"klein — whose negative pass attnscope does not record); use branch='cond'")
        ids = step.token_ids
        prompt_tokens, prompt_roles = _text_and_roles(step.token_text, step.token_roles)
        if prompt_tokens is None and self.tokens == "prompt":
            raise AttnscopeError("tokens='prompt' needs the prompt's token ids, but the pipeline got embeddings, not text")
        if self.tokens == "auto":  # the long padded text axes of T5/Gemma/Qwen prompts and of joint sites: the prompt
            joint = any(s.kind == "joint" for s in self._sites.values())
            long_text = any(name not in ("clip", "missing") for name, _ in step.segments)
            self.tokens = "prompt" if (joint or long_text) and prompt_tokens is not None else "all"
        text_len = self._text_length(session, step)
        uncond = self.branch != "cond"  # the uncond rows read their own (negative) text
        negative_tokens, negative_roles = (_text_and_roles(step.uncond_token_text, step.uncond_token_roles) if uncond
                                           else (None, None))
        positions = (_kept_positions(prompt_tokens + (negative_tokens or []), prompt_roles + (negative_roles or []),
                                     text_len) if self.tokens == "prompt" and prompt_tokens else list(range(text_len)))
        contiguous = positions == list(range(len(positions)))
        self._token_index = slice(0, len(positions)) if contiguous else torch.tensor(positions)
        self._kept = len(positions)
        token_text = _sample_rows(prompt_tokens, rows.prompt_of_sample, positions, "")
        roles = _sample_rows(prompt_roles, rows.prompt_of_sample, positions, "pad")
        # a negative no text encoder ran for (SDXL's zeros): no text, all padding
        uncond_text = _sample_rows(negative_tokens, rows.prompt_of_sample, positions, "") if uncond else None
        uncond_roles = _sample_rows(negative_roles, rows.prompt_of_sample, positions, "pad") if uncond else None
        layout = StoreLayout(
            num_steps=num_steps, samples=rows.samples, prompt_of_sample=rows.prompt_of_sample,
            image_of_sample=rows.image_of_sample, token_positions=tuple(positions), token_text=token_text,
            token_roles=roles, uncond_token_text=uncond_text, uncond_token_roles=uncond_roles,
            sites=[
                SiteLayout(name, s.describe(), 1 if self.heads == "mean" else s.heads, s.spatial_shape(step.latent_shape),
                           self.branches, steps)
                for name, s in self._sites.items()
            ],
        )
        scale = int(getattr(session.pipe, "vae_scale_factor", 1))
        run = {
            **self.run_info, "num_steps": num_steps, "samples": rows.samples,
            "latent_shape": list(step.latent_shape), "guidance": rows.uncond is not None,
            "height": step.latent_shape[0] * scale, "width": step.latent_shape[1] * scale,
            "token_ids": ids.tolist() if ids is not None else None, "tokens": prompt_tokens,
            "token_roles": [list(r) for r in step.token_roles] if step.token_roles is not None else None,
            "segments": [list(segment) for segment in step.segments],
        }
        spec = {"sites": list(self._sites), "steps": list(steps), "heads": self.heads, "tokens": self.tokens,
                "branch": self.branch, "dtype": "float16", "output_change": self.output_change,
                "keep_bits": self.keep_bits}
        manifest = {**build_manifest(session.pipe, session.denoiser, run, spec), **self.extra_manifest}
        # how LoRA is applied and textual inversion's tokens: no weights, so not in the fingerprint (a rerun checks them)
        manifest["model"] = {**manifest["model"], "adapters": jsonable(adapter_state(session.pipe))}
        self._manifest = manifest
        layout.attrs = {"manifest": manifest, "sites": list(self._sites),
                        "format_min_reader": FORMAT_VERSION}
        planned = getattr(session.pipe.scheduler, "timesteps", None)
        self._planned = [float(t) for t in planned[-num_steps:]] if planned is not None and len(planned) >= num_steps else []
        layout.timesteps = tuple(self._planned) if self._planned else None
        self._steps = frozenset(steps)
        self._samples = rows.samples
        self.writer = TraceWriter(self._target, max_queue_bytes=self.max_queue_bytes, overwrite=self.overwrite,
                                  keep_bits=self.keep_bits)
        self.writer.init(layout)

    @staticmethod
    def _text_length(session: HookSession, step: StepContext) -> int:
        if step.text_length is not None:
            return step.text_length
        if step.token_ids is not None:
            return int(step.token_ids.shape[-1])
        tokenizer = getattr(session.pipe, "tokenizer", None)
        return int(getattr(tokenizer, "model_max_length", 77))


def _text_and_roles(text: Any, roles: Any) -> tuple[list[list[str]] | None, list[list[str]] | None]:
    """Per prompt, its strings and roles (read from the strings where the adapter gave none); ``(None, None)`` when
    the text is unknown.

    >>> _text_and_roles((("<|startoftext|>", "a</w>", "<|endoftext|>"),), None)
    ([['<|startoftext|>', 'a</w>', '<|endoftext|>']], [['sot', 'word', 'eot']])
    """
    if text is None:
        return None, None
    tokens = [list(t) for t in text]
    return tokens, [list(r) for r in roles] if roles is not None else [token_roles(t) for t in tokens]


def _sample_rows(per_prompt: list[list[str]] | None, prompt_of_sample: Sequence[int], positions: Sequence[int],
                 fill: str) -> list[list[str]]:
    """Per sample, its prompt's row at ``positions``; ``fill`` past the row's end and where the text is unknown.

    >>> _sample_rows([["a", "b"], ["c"]], (0, 1, 1), [0, 1], "-"), _sample_rows(None, (0,), [0, 1], "")
    ([['a', 'b'], ['c', '-'], ['c', '-']], [['', '']])
    """
    rows = [per_prompt[p] if per_prompt else [] for p in prompt_of_sample]
    return [[row[i] if i < len(row) else fill for i in positions] for row in rows]


def _kept_positions(prompt_tokens: list[list[str]], prompt_roles: list[list[str]], text_len: int) -> list[int]:
    """``tokens="prompt"``: in each segment, its positions from the earliest prompt's first non-padding position (a
    left-padded tokenizer, FLUX.2 dev's, puts padding first) to the longest prompt's end-of-text token.

    >>> _kept_positions([["<pad>", "<pad>", "[INST]", "red", "[/INST]"], ["<pad>", "[INST]", "a", "red", "[/INST]"]],
    ...                 [["pad", "pad", "instruction", "word", "instruction"],
    ...                  ["pad", "instruction", "word", "word", "instruction"]], 5)
    [1, 2, 3, 4]
    """
    kept: list[int] = []
    bounds = segment_bounds(prompt_tokens[0][:text_len])
    first = {b: b[1] for b in bounds}
    last = {b: -1 for b in bounds}
    for tokens, roles in zip(prompt_tokens, prompt_roles):
        for p in prompt_positions(tokens[:text_len], roles[:text_len]):
            for start, stop in bounds:
                if start <= p < stop:
                    first[(start, stop)] = min(first[(start, stop)], p)
                    last[(start, stop)] = max(last[(start, stop)], p)
    for bound, end in last.items():
        kept.extend(range(first[bound], end + 1))
    return kept


class _OutputChange:
    """Per-step ``‖O_t‖`` and ``‖O_t − O_{t−1}‖`` of each site's output, kept on the device until the end.

    ``O`` is the output averaged over the two guidance halves when the batch has both (TGATE's
    cache), else the rows as they are; norms are Frobenius over everything but the sample axis, in
    float32. No host synchronisation per call: the norms stay device tensors until :meth:`arrays`.
    """

    def __init__(self) -> None:
        self.previous: dict[str, tuple[torch.Tensor, bool]] = {}  # site → (O, averaged)
        self.norms: list[tuple[int, int, torch.Tensor]] = []
        self.changes: list[tuple[int, int, torch.Tensor]] = []

    def add(self, ctx: CallContext, site: int, output: torch.Tensor) -> None:
        rows = ctx.rows
        averaged = rows.uncond is not None
        if averaged:
            o = (output[rows.uncond].detach().float() + output[rows.cond].detach().float()) * 0.5
        else:  # a copy: the next step compares against it, whatever happens to `output`
            o = output.detach().to(torch.float32, copy=True)
        o = o.flatten(1)
        self.norms.append((ctx.step, site, torch.linalg.vector_norm(o, dim=1)))
        previous = self.previous.get(ctx.site.name)
        if previous is not None and previous[1] == averaged and previous[0].shape == o.shape:
            self.changes.append((ctx.step, site, torch.linalg.vector_norm(o - previous[0], dim=1)))
        self.previous[ctx.site.name] = (o, averaged)

    def skip(self, name: str) -> None:
        """A bypassed call: nothing computed, and the next step has nothing to compare with."""
        self.previous.pop(name, None)

    def arrays(self, steps: int, sites: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
        """``(norm, change)`` as float32 (step, site, sample) arrays, NaN where not computed (one copy to the host)."""
        out = []
        for entries in (self.norms, self.changes):
            values = np.full((steps, sites, samples), np.nan, np.float32)
            if entries:
                host = torch.stack([v for _, _, v in entries]).cpu().numpy()
                for (step, site, _), v in zip(entries, host):
                    values[step, site] = v
            out.append(values)
        self.previous.clear()
        return out[0], out[1]


_BUILT_MANIFEST_KEYS = ("model", "scheduler", "dtype", "device", "cpu_threads", "versions", "run", "capture")


def _extra_manifest(extra: dict[str, Any] | None) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise AttnscopeError(f"extra_manifest={extra!r}: expected a dict of JSON-able manifest fields")
    clash = [k for k in extra if k in _BUILT_MANIFEST_KEYS]
    if clash:
        raise AttnscopeError(f"extra_manifest: keys {clash} are built by attnscope and cannot be replaced")
    try:
        return jsonable(extra)
    except TypeError as exc:
        raise AttnscopeError(f"extra_manifest={extra!r}: not JSON-able ({exc})") from exc


def _images_to_uint8(images: Any) -> np.ndarray:
    """Images as uint8 (image, height, width, channel): PIL images as RGB, floats in [0, 1] (diffusers'
    ``output_type="np"``/``"pt"``) scaled to 0…255, uint8 as they are; floats outside [0, 1] are refused (0…255 or
    −1…1 values would be clipped to white and black without a word).

    >>> _images_to_uint8(np.full((1, 2, 2, 3), 0.5)).max()
    np.uint8(128)
    >>> _images_to_uint8(np.full((1, 2, 2, 3), 255.0))
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: images: float values from 255.0 to 255.0, expected [0, 1] (diffusers' output_type 'np' or 'pt'); pass uint8 for values 0…255
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise AttnscopeError(f"images: a tensor of shape {tuple(images.shape)}, expected (image, channel, height, "
                                 f"width)")
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            if images.dtype.kind not in "fiub":
                raise AttnscopeError(f"images: a numpy array of dtype {images.dtype}, expected uint8 or floats in [0, 1]")
            low, high = (float(np.nanmin(images)), float(np.nanmax(images))) if np.isfinite(images).any() else (0, 1)
            if low < 0 or high > 1:
                kind = "float" if images.dtype.kind == "f" else "integer"
                raise AttnscopeError(f"images: {kind} values from {low} "
                                     f"to {high}, expected [0, 1] (diffusers' output_type 'np' or 'pt'); pass uint8 "
                                     f"for values 0…255")
            images = (np.clip(np.nan_to_num(images), 0, 1) * 255).round().astype(np.uint8)
        return images if images.ndim == 4 else images[None]
    try:
        pixels = [np.asarray(im.convert("RGB")) for im in images]
    except (AttributeError, TypeError) as exc:
        raise AttnscopeError(f"images: expected PIL images, a numpy array or a tensor, got {type(images).__name__}") from exc
    if not pixels or len({p.shape for p in pixels}) > 1:
        raise AttnscopeError(f"images: {len(pixels)} PIL images of sizes {sorted({p.shape[1::-1] for p in pixels})}, "
                             f"expected one or more of one size")
    return np.stack(pixels)


def _is_number(value: Any) -> bool:
    """A real number (not a bool, not a string)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))

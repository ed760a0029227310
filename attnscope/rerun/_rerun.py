"""``rerun``: regenerate a captured generation from its manifest, optionally with interventions installed."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..capture import Recorder, check_images_per_prompt, check_num_steps, check_scale, check_size
from ..errors import AttnscopeError
from ..hooks import client_role, find_denoiser, hooks, prepare_clients
from ..models import load_pipeline
from ..selection import SEEDS
from ..store import (
    Trace,
    as_trace,
    check_layerwise_casting,
    check_store_path,
    freeu_settings,
    is_url,
    jsonable,
    locate,
    open_trace,
    set_layerwise_casting,
    weights_fingerprint,
)
from ._adapters import check_adapters, recorded_lora_sources

__all__ = ["manifest_sha256", "rerun"]

#: ``**capture_options`` of :func:`rerun`: the capture spec (default: the parent's) and the recorder's tuning.
CAPTURE_OPTIONS = ("sites", "steps", "heads", "tokens", "branch", "exact", "output_change", "keep_bits",
                   "max_queue_bytes")
#: What ``capture`` put into the manifest's ``run`` from its arguments (the rest the recorder measures).
_RUN_INPUTS = ("prompts", "negative_prompt", "seed", "generator_device", "num_images_per_prompt",
               "num_inference_steps", "guidance_scale")


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest as ``json.dumps(manifest, sort_keys=True)`` (UTF-8): the ``parent`` link of a rerun.

    Examples
    --------
    >>> manifest_sha256({"b": 1, "a": [2]}) == manifest_sha256({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


# -- rerun ------------------------------------------------------------------------------------------------
def rerun(trace: Trace | str | Path, interventions: Any = (), *, store: str | Path | None = None, pipe: Any = None,
          overwrite: bool = False, device: str | None = None, **capture_options: Any) -> Trace:
    """Regenerate a captured trace exactly (same model, weights, scheduler, prompts, seeds, sizes), optionally
    with interventions installed, and capture the new run into a new trace.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> d = tempfile.mkdtemp()
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=d + "/a.zarr", num_inference_steps=3)
    >>> again = ats.rerun(tr)                        # no intervention: the same image, the same maps
    >>> again.path.name, again.manifest["parent"]["path"] == str(tr.path), again.manifest["interventions"]
    ('a-rerun.zarr', True, [])
    >>> import numpy as np
    >>> np.array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    True

    With interventions (hook clients of role ``"intervention"``, e.g. ``ats.regulate.Reweight``), pass
    them as ``interventions=[...]``; each one's ``describe()`` is stored in the new manifest. An
    intervention with a ``prepare(pipe, call)`` method is first handed the exact pipeline call
    (``SpatialTemporal(objective=...)`` optimises its λ there; the manifest then holds them).

    Parameters
    ----------
    trace : Trace or path
        A **complete** trace written by :func:`attnscope.capture` (or by an earlier rerun).
    interventions : hook client or sequence of them
        Installed in the same :func:`attnscope.hooks` call as the recorder (interventions run first, so
        the new trace records the attention they produce). Default: none.
    store : path, optional
        Trace store to create (a local directory; a ``file://`` URL is that path). Default:
        ``<parent stem>-rerun.zarr`` beside the parent. Never the parent.
    pipe : diffusers pipeline, optional
        Use this pipeline instead of loading ``manifest["model"]["reference"]`` (a rerun without it also loads
        the LoRA files ``load_pipeline(..., lora=)`` loaded for the capture, ``model.adapters.lora_sources``, each
        checked against its recorded SHA-256); its class must be the trace's
        ``pipeline_class`` (or derive from it), its weights must match
        the trace's fingerprint and its dtype the trace's dtype. Its scheduler and its FreeU factors
        (``pipe.enable_freeu``: no weights, so not in the fingerprint) are set to the trace's for the duration of
        the run and put back afterwards. ``device`` given too moves it there.
    overwrite : bool
        Replace an existing trace at ``store``.
    device : str, optional
        Where to run. Default: the device the trace was captured on (the latents are drawn on the CPU
        either way, so another device changes the image only by float rounding).
    **capture_options
        Override the parent's capture spec: ``sites``, ``steps``, ``heads``, ``tokens``, ``branch``,
        ``output_change``, ``keep_bits`` (as in :func:`attnscope.capture`), ``exact`` and ``max_queue_bytes``. With ``exact=False`` (capture's
        default) the attention of recorded calls is computed as ``probs @ V``, so recording other sites
        or steps than the parent changes the image by float rounding; keep the spec for bit-identity
        (on the CPU, also the number of torch threads: see docs/rerun.md).

    Returns
    -------
    Trace
        The new trace; its manifest adds ``interventions`` (each client's ``describe()``, or
        ``{"name": class name}``) and ``parent`` (``path``, absolute, or the URL it was read from, and
        ``manifest_sha256``, see :func:`manifest_sha256`).

    Raises
    ------
    AttnscopeError
        The trace is incomplete, was overwritten or removed since this ``Trace`` was opened, or lacks what a
        rerun needs (prompts and seed: traces of a bare :class:`~attnscope.Recorder` cannot be rerun; steps,
        sizes, guidance scales, images per prompt and seeds the pipeline can run), its pipeline was called with
        inputs the manifest cannot hold (an img2img, inpainting or ControlNet image, ``latents``: see docs/rerun.md
        for the before/after made by hand), ``pipe`` is not of the pipeline class it was captured with (or one
        derived from it), ``device`` cannot hold the pipeline (checked
        before ``pipe`` is moved), its model cannot be loaded (or a LoRA file it recorded is missing or changed: its
        SHA-256 is checked before the model loads), the loaded
        weights differ from the recorded fingerprint (the message names the components), ``store`` is not a
        path, is the parent, a URL other than ``file://`` or exists without ``overwrite=True``, an intervention is not a
        hook client instance of role ``"intervention"``, or an option is unknown.
    """
    parent = as_trace(trace, "trace")
    where = str(parent.path)
    if isinstance(trace, Trace):
        parent.check_unchanged()
    if not parent.complete:
        raise AttnscopeError(f"trace {where!r} is incomplete (complete=false: its capture was interrupted or is "
                             f"still running, {parent.steps_written} steps written); only a complete trace can be rerun")
    manifest = parent.manifest
    run = manifest.get("run") if isinstance(manifest.get("run"), dict) else {}
    prompts, seed = run.get("prompts"), run.get("seed")
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)) or seed is None:
        raise AttnscopeError(f"trace {where!r}: its manifest has no prompts/seed (prompts={prompts!r}, seed={seed!r}); "
                             "it was recorded with a bare Recorder rather than attnscope.capture and cannot be rerun")
    _check_inputs_recorded(manifest, run, where)
    clients = _interventions(interventions)
    options = _capture_options(manifest, run, capture_options)
    out = check_store_path(_rerun_store(parent, store), overwrite)
    given = pipe is not None
    if given and device is not None:  # checked before the pipe moves: a bad device must not leave it half-moved
        _check_device(device, where)
    pipe = (pipe.to(device) if device is not None else pipe) if given else _load(manifest, where, device)
    if not given:  # a setting, not a weight: a model loaded afresh gets the trace's again (as FreeU below);
        # _load found manifest["model"] an object naming the model
        set_layerwise_casting(pipe, manifest["model"].get("layerwise_casting") or {}, f"trace {where!r}")
    denoiser = find_denoiser(pipe)[1]
    _check_pipeline_class(pipe, manifest, where)
    if given:
        _check_dtype(denoiser, manifest, where)
    check_layerwise_casting(pipe, manifest, where)
    check_adapters(pipe, manifest, where)  # before the weights: a LoRA applied otherwise says so, not 'weights differ'
    _check_weights(pipe, manifest, where)
    _warn_on_other_threads(denoiser, manifest, where)
    _warn_on_dropped_interventions(manifest, clients, where)
    scheduler = _scheduler(manifest, where)
    freeu = _recorded_freeu(manifest, denoiser, where)
    generator = _generator(run, where)
    kwargs = _pipeline_kwargs(pipe, run, where)
    _check_batch(run, kwargs, len(prompts), where)
    exact = bool(options.pop("exact"))
    run_info = {
        **{k: run.get(k) for k in _RUN_INPUTS}, "pipeline_kwargs": jsonable(kwargs), "unrecorded_kwargs": [],
        "reproducible": True, "exact": exact,
    }
    saved, saved_freeu = pipe.scheduler, freeu_settings(denoiser)
    pipe.scheduler = scheduler
    _set_freeu(denoiser, saved_freeu if freeu is _UNRECORDED else freeu)
    try:
        call = {"prompt": prompts if len(prompts) > 1 else prompts[0], "generator": generator, **kwargs}
        for client in clients:  # e.g. AttentionRegulation(when=risk_above(θ)): the parent's maps say which samples
            decide = getattr(client, "decide_from_trace", None)
            if callable(decide):
                decide(parent)
        prepare_clients(clients, pipe, call)  # e.g. SpatialTemporal optimises its λ for exactly this call
        extra = {"interventions": [_describe(i, c) for i, c in enumerate(clients)],
                 "parent": {"path": _parent_link(parent), "manifest_sha256": manifest_sha256(manifest)}}
        recorder = Recorder(out, overwrite=overwrite, run_info=run_info, extra_manifest=extra, **options)
        with hooks(pipe, *clients, recorder, exact=exact):
            result = pipe(**call)
            if kwargs.get("output_type", "pil") != "latent":
                recorder.add_images(result.images)
    finally:
        pipe.scheduler = saved
        _set_freeu(denoiser, saved_freeu)
    return open_trace(recorder.path)


def _interventions(interventions: Any) -> list[Any]:
    if interventions is None:
        return []
    if callable(getattr(interventions, "stages", None)):
        interventions = [interventions]
    if isinstance(interventions, (str, bytes)) or not isinstance(interventions, (list, tuple)):
        raise AttnscopeError(f"interventions={interventions!r}: expected a hook client or a list of them "
                             "(objects with role 'intervention' and a stages(ctx) method)")
    for i, client in enumerate(interventions):
        if isinstance(client, type):
            raise AttnscopeError(f"interventions[{i}]={client!r}: a class; expected an instance of it, e.g. "
                                 f"{client.__name__}(...)")
        try:
            role = client_role(client)
        except AttnscopeError:
            role = "none: not a hook client"
        if role != "intervention":
            raise AttnscopeError(f"interventions[{i}]={client!r}: expected a hook client with role 'intervention' "
                                 f"and a stages(ctx) method, got role={role!r}")
    return list(interventions)


def _describe(i: int, client: Any) -> Any:
    describe = getattr(client, "describe", None)
    if not callable(describe):
        return {"name": type(client).__name__}
    description = describe()
    try:
        return jsonable(description)
    except TypeError as exc:
        raise AttnscopeError(f"interventions[{i}]={client!r}: describe() returned {description!r}, which is not "
                             f"JSON-able ({exc})") from exc


def _capture_options(manifest: dict[str, Any], run: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in given if k not in CAPTURE_OPTIONS]
    if unknown:
        raise AttnscopeError(f"rerun(**{{{unknown[0]!r}: ...}}): unknown capture option; expected one of "
                             f"{', '.join(CAPTURE_OPTIONS)}")
    spec = manifest.get("capture") if isinstance(manifest.get("capture"), dict) else {}
    options = {"sites": spec.get("sites"), "steps": spec.get("steps"), "heads": spec.get("heads", "mean"),
               "tokens": spec.get("tokens", "all"), "branch": spec.get("branch", "cond"),
               "output_change": bool(spec.get("output_change", False)), "keep_bits": spec.get("keep_bits"),
               "exact": bool(run.get("exact", False))}
    options = {**options, **given}
    if not isinstance(options["exact"], bool):
        raise AttnscopeError(f"exact={options['exact']!r}: expected True or False")
    return options


def _parent_link(parent: Trace) -> str:
    """The parent's location as the rerun's manifest records it: an absolute path (a path relative to the working
    directory of the rerun would point elsewhere from any other), or the URL it was read from."""
    return str(parent.path.absolute()) if isinstance(parent.path, Path) else str(parent.path)


def _rerun_store(parent: Trace, store: str | Path | None) -> Path:
    if store is not None and (not isinstance(store, (str, os.PathLike)) or isinstance(os.fspath(store), bytes)
                              or not os.fspath(store).strip()):  # "" would be the working directory
        raise AttnscopeError(f"store={store!r}: expected the path of the trace store to create (a str or Path, e.g. "
                             f"'runs/a-reg.zarr'), or None for '<parent stem>-rerun.zarr' beside the parent")
    if is_url(store):  # a file:// URL is that local path; a rerun writes nothing else
        located = locate(store)
        if not isinstance(located, Path):
            raise AttnscopeError(f"store={store!r}: a rerun writes a local directory; write it there, then copy it "
                                 f"with attnscope.store.upload_trace(path, {store!r})")
        store = located
    if not isinstance(parent.path, Path):  # a trace read from a URL: the rerun is written locally, where asked
        if store is None:
            raise AttnscopeError(f"trace {str(parent.path)!r} is read from a URL: pass store= (a local path) for "
                                 "the rerun's trace")
        return Path(store)
    out = Path(store) if store is not None else parent.path.with_name(parent.path.stem + "-rerun.zarr")
    here, there = out.resolve(), parent.path.resolve()
    if here == there or there in here.parents:
        raise AttnscopeError(f"store={str(out)!r} is the parent trace {str(parent.path)!r} (or inside it); "
                             "a rerun writes a new trace, choose another path")
    return out


def _load(manifest: dict[str, Any], where: str, device: str | None) -> Any:
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    ref = model.get("reference")
    if not isinstance(ref, str) or not ref:
        raise AttnscopeError(f"trace {where!r}: its manifest names no model (reference={ref!r}: the pipeline was "
                             "built in memory); pass the pipeline itself with pipe=...")
    loras = recorded_lora_sources(manifest, where)  # loaded again after the model, each file's SHA-256 checked first
    target = device or manifest.get("device")
    if target is not None:
        _check_device(target, where)
    try:
        return load_pipeline(ref, device=target, dtype=manifest.get("dtype"), lora=loras or None)
    except AttnscopeError as exc:
        what = "its model" if not loras else "its model with the LoRA files recorded in model.adapters.lora_sources"
        raise AttnscopeError(f"cannot rerun trace {where!r}: {what} cannot be loaded: {exc}") from exc


def _check_device(device: Any, where: str) -> None:
    """``device`` can hold the pipeline's weights: one clear error otherwise, before anything is loaded or moved.

    >>> _check_device("cpu", "a.zarr")
    >>> _check_device("meta", "a.zarr")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: cannot rerun trace 'a.zarr' on device 'meta': it holds no data (a pipeline moved there loses its weights); pass device='cpu' (the latents are drawn on the CPU, so the image changes only by float rounding)
    """
    fix = "pass device='cpu' (the latents are drawn on the CPU, so the image changes only by float rounding)"
    try:
        torch.empty(0, device=device)
        kind = torch.device(device).type
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
        raise AttnscopeError(f"cannot rerun trace {where!r} on device {device!r}: {exc}; {fix}") from exc
    if kind == "meta":
        raise AttnscopeError(f"cannot rerun trace {where!r} on device {device!r}: it holds no data (a pipeline moved "
                             f"there loses its weights); {fix}")


def _check_pipeline_class(pipe: Any, manifest: dict[str, Any], where: str) -> None:
    """``pipe`` is of the class the trace was captured with, or of one derived from it (a subclass makes the same
    call): another pipeline on the same modules (``StableDiffusionImg2ImgPipeline(**pipe.components)`` for a
    text-to-image trace) passes the weights check but needs other inputs.

    >>> class StableDiffusionPipeline: ...
    >>> class Mine(StableDiffusionPipeline): ...
    >>> _check_pipeline_class(Mine(), {"model": {"pipeline_class": "StableDiffusionPipeline"}}, "a.zarr")
    >>> _check_pipeline_class(Mine(), {"model": {"pipeline_class": "StableDiffusionImg2ImgPipeline"}}, "a.zarr")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: cannot rerun trace 'a.zarr' with a Mine: it was captured with a StableDiffusionImg2ImgPipeline, and another pipeline class makes another call (other inputs, other steps); pass a StableDiffusionImg2ImgPipeline (e.g. diffusers.StableDiffusionImg2ImgPipeline(**pipe.components))
    """
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    want, have = model.get("pipeline_class"), type(pipe)
    if not isinstance(want, str) or want in {c.__name__ for c in have.__mro__}:
        return
    import diffusers

    hint = f" (e.g. diffusers.{want}(**pipe.components))" if isinstance(getattr(diffusers, want, None), type) else ""
    raise AttnscopeError(f"cannot rerun trace {where!r} with a {have.__name__}: it was captured with a {want}, and "
                         f"another pipeline class makes another call (other inputs, other steps); pass a {want}{hint}")


def _check_dtype(denoiser: Any, manifest: dict[str, Any], where: str) -> None:
    have = str(getattr(denoiser, "dtype", "")).removeprefix("torch.")
    want = manifest.get("dtype")
    if want is not None and have != want:
        raise AttnscopeError(f"cannot rerun trace {where!r} with this pipe: its dtype is {have}, the trace was "
                             f"captured in {want}; pass a pipeline in {want} (or pipe=None to load it)")


def _warn_on_other_threads(denoiser: Any, manifest: dict[str, Any], where: str) -> None:
    """On the CPU another torch thread count splits sums differently: the maps then differ by float rounding."""
    recorded, now = manifest.get("cpu_threads"), torch.get_num_threads()
    if str(denoiser.device) == "cpu" and isinstance(recorded, int) and recorded != now:
        warnings.warn(f"trace {where!r} was captured with {recorded} CPU threads, this rerun uses {now}: maps and "
                      f"images may differ by float rounding; torch.set_num_threads({recorded}) reproduces it "
                      f"bit for bit", stacklevel=3)


def _warn_on_dropped_interventions(manifest: dict[str, Any], clients: list[Any], where: str) -> None:
    """A parent made with interventions: a rerun installs only the ones given, so without them it is the plain
    generation (the grandparent's image), not the parent's."""
    made = manifest.get("interventions") if isinstance(manifest.get("interventions"), list) else []
    names = [str(i.get("name", "?")) for i in made if isinstance(i, dict)]
    if names and not clients:
        warnings.warn(f"trace {where!r} was made with interventions ({', '.join(names)}; their settings are in its "
                      f"manifest's 'interventions'), which a rerun does not reapply: this rerun is the generation "
                      f"without them, not a copy of this trace; pass them again to reproduce it", stacklevel=3)


def _check_weights(pipe: Any, manifest: dict[str, Any], where: str) -> None:
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    recorded = model.get("weights_fingerprint")
    if not isinstance(recorded, dict) or not recorded:
        raise AttnscopeError(f"trace {where!r}: its manifest has no weights fingerprint to check the model against")
    current = weights_fingerprint(pipe)
    differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if differ:
        detail = "; ".join(f"{k}: trace {str(recorded.get(k) or 'absent')[:12]}, loaded "
                           f"{str(current.get(k) or 'absent')[:12]}" for k in differ)
        raise AttnscopeError(f"cannot rerun trace {where!r}: the weights of {', '.join(differ)} differ from those it "
                             f"was captured with (model {model.get('reference')!r}; {detail})")


def _scheduler(manifest: dict[str, Any], where: str) -> Any:
    import diffusers

    spec = manifest.get("scheduler") if isinstance(manifest.get("scheduler"), dict) else {}
    name, config = spec.get("class"), spec.get("config")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)) or not isinstance(config, dict):
        raise AttnscopeError(f"trace {where!r}: scheduler class {name!r} is not a diffusers scheduler (or its config "
                             "is missing), so the run cannot be rebuilt")
    return cls.from_config(config)


#: ``model.freeu`` absent from the manifest (a trace written before it was recorded): the pipe's FreeU is kept
_UNRECORDED = object()


def _recorded_freeu(manifest: dict[str, Any], denoiser: Any, where: str) -> Any:
    """The FreeU factors the trace was captured with (``model.freeu``: None for off), checked; ``_UNRECORDED`` for an
    older trace. FreeU is no weight: a pipeline loaded again has it off, another may have it on."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if "freeu" not in model:
        return _UNRECORDED
    factors = model["freeu"]
    if factors is None:
        return None
    numbers = isinstance(factors, dict) and set(factors) == {"s1", "s2", "b1", "b2"} and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v for v in factors.values())
    if not numbers or not callable(getattr(denoiser, "enable_freeu", None)):
        raise AttnscopeError(f"trace {where!r}: freeu={factors!r} in its manifest's model; expected null or the "
                             f"non-zero numbers s1, s2, b1, b2 of pipe.enable_freeu on a UNet (the store is damaged "
                             f"or crafted)")
    return factors


def _set_freeu(denoiser: Any, factors: dict[str, float] | None) -> None:
    """Run ``denoiser`` with these FreeU factors (None: FreeU off)."""
    if factors:
        denoiser.enable_freeu(**factors)
    elif callable(getattr(denoiser, "disable_freeu", None)):
        denoiser.disable_freeu()


def _generator(run: dict[str, Any], where: str) -> Any:
    seed, device = run.get("seed"), run.get("generator_device") or "cpu"

    def ok(s: Any) -> bool:
        return isinstance(s, int) and not isinstance(s, bool) and s in SEEDS

    if not (ok(seed) or (isinstance(seed, list) and seed and all(ok(s) for s in seed))):
        raise AttnscopeError(f"trace {where!r}: seed={seed!r} in its manifest; expected an int or a list of ints, each "
                             f"from 0 to {SEEDS.stop - 1} (2**64 - 1)")
    try:
        if ok(seed):
            return torch.Generator(device).manual_seed(seed)
        return [torch.Generator(device).manual_seed(s) for s in seed]
    except RuntimeError as exc:
        raise AttnscopeError(f"trace {where!r}: cannot make its generator on {device!r}: {exc}") from exc


def _check_batch(run: dict[str, Any], kwargs: dict[str, Any], prompts: int, where: str) -> None:
    """The steps, sizes, guidance scales, images per prompt and seeds the rerun will pass the pipeline, checked with
    ``capture``'s own checks: a damaged or crafted manifest is one error naming the trace, not a failure inside the
    pipeline (or, for a NaN guidance scale, a run without guidance recorded as guided)."""
    checks = {"num_inference_steps": (check_num_steps, "an int >= 1 (the number of denoising steps)"),
              "height": (functools.partial(check_size, "height"), "a positive int (the image's height in pixels)"),
              "width": (functools.partial(check_size, "width"), "a positive int (the image's width in pixels)"),
              "num_images_per_prompt": (check_images_per_prompt, "an int >= 1")}
    for name in ("guidance_scale", "true_cfg_scale"):  # NaN would turn guidance off without a word
        checks[name] = (functools.partial(check_scale, name), "a finite number (the guidance scale)")
    for name, (check, expected) in checks.items():
        try:
            check(kwargs.get(name))
        except AttnscopeError:
            raise AttnscopeError(f"trace {where!r}: {name}={kwargs.get(name)!r} in its manifest; expected "
                                 f"{expected}") from None
    per_prompt = check_images_per_prompt(kwargs.get("num_images_per_prompt"))
    seed, images = run.get("seed"), prompts * per_prompt
    if isinstance(seed, list) and len(seed) != images:
        raise AttnscopeError(f"trace {where!r}: seed={seed!r} in its manifest: {len(seed)} seeds for {images} images "
                             f"({prompts} prompts x {per_prompt} images per prompt); expected one int, or one per "
                             f"image")


#: pipeline arguments that only watch the run (a step callback): a rerun without them makes the same generation
_OBSERVING_KWARGS = ("callback", "callback_on_step_end")


def _check_inputs_recorded(manifest: dict[str, Any], run: dict[str, Any], where: str) -> None:
    """Refuse a trace generated from pipeline inputs its manifest could not hold (not JSON: an img2img or inpainting
    pipeline's ``image`` and ``mask_image``, a ControlNet's control image, an IP-Adapter's image or embeddings,
    ``latents``): without them the pipeline
    fails or makes another generation. Only step callbacks may be missing (they watch the run): a warning, later.

    >>> _check_inputs_recorded({}, {"unrecorded_kwargs": ["callback_on_step_end"]}, "a.zarr")
    >>> _check_inputs_recorded({"model": {"pipeline_class": "StableDiffusionImg2ImgPipeline"}},
    ...                        {"unrecorded_kwargs": ["image"]}, "a.zarr")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: cannot rerun trace 'a.zarr': its StableDiffusionImg2ImgPipeline was called with image, ...
    """
    unrecorded = run.get("unrecorded_kwargs") or []
    missing = [str(k) for k in unrecorded if k not in _OBSERVING_KWARGS] if isinstance(unrecorded, list) else []
    if not missing:
        return
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    pipeline = model.get("pipeline_class") or "pipeline"
    opening = (f"cannot rerun trace {where!r}: its {pipeline} was called with {', '.join(missing)}, which the manifest "
               f"cannot hold (not JSON: an init image, a mask, a control image, an IP-Adapter image or its embeddings, "
               f"latents), so a rerun cannot make the same generation. ")
    if any(k.startswith("ip_adapter_") for k in missing):  # interventions are refused beside an IP-Adapter
        raise AttnscopeError(opening + "Interventions are refused while an IP-Adapter is loaded, so no before/after "
                                       "can be made with it (docs/capture.md#adapters-lora-textual-inversion-ip-adapter)")
    raise AttnscopeError(
        opening + f"Record the run with interventions in your own block, passing the same inputs and seed: "
        f"rec = ats.Recorder(store); with ats.hooks(pipe, *interventions, rec): out = pipe(prompt, "
        f"{', '.join(f'{k}=...' for k in missing)}, generator=torch.Generator().manual_seed(seed), ...); "
        f"rec.add_images(out.images); then ats.compare(trace, ats.open_trace(store)) (docs/rerun.md)")


def _pipeline_kwargs(pipe: Any, run: dict[str, Any], where: str) -> dict[str, Any]:
    unrecorded = run.get("unrecorded_kwargs") or []
    if unrecorded:
        warnings.warn(f"trace {where!r} was generated with pipeline arguments that could not be recorded "
                      f"({', '.join(map(str, unrecorded))}); the rerun runs without them and may differ", stacklevel=3)
    recorded = run.get("pipeline_kwargs") or {}
    if not isinstance(recorded, dict):
        raise AttnscopeError(f"trace {where!r}: pipeline_kwargs={recorded!r} in its manifest; expected an object of "
                             f"pipeline arguments (the store is damaged or crafted)")
    kwargs = dict(recorded)
    for key in ("prompt", "generator"):
        kwargs.pop(key, None)
    for key in ("num_inference_steps", "guidance_scale", "height", "width", "num_images_per_prompt"):
        if kwargs.get(key) is None and run.get(key) is not None:
            kwargs[key] = run[key]
    # JSON made tuples lists; give tuple-typed arguments (SDXL's original_size, …) their tuples back
    params = inspect.signature(pipe.__call__).parameters
    for key, value in kwargs.items():
        annotation = str(getattr(params.get(key), "annotation", ""))
        if isinstance(value, list) and "tuple" in annotation.lower():
            kwargs[key] = tuple(value)
        elif isinstance(value, dict) and "diffusers_callback" in value:  # SDCFGCutoffCallback, … (store.jsonable)
            kwargs[key] = _diffusers_callback(key, value, where)
    return kwargs


def _diffusers_callback(key: str, spec: dict[str, Any], where: str) -> Any:
    """A callback of diffusers' own (``diffusers.callbacks``) built again from the class name and config the manifest
    records for it; a spec that names no such class or that it refuses is one error naming the trace.

    >>> _diffusers_callback("callback_on_step_end", {"diffusers_callback": "SDCFGCutoffCallback",
    ...                     "config": {"cutoff_step_ratio": 0.4, "cutoff_step_index": None}}, "a.zarr").config
    FrozenDict([('cutoff_step_ratio', 0.4), ('cutoff_step_index', None)])
    """
    from diffusers import callbacks

    name, config, parts = spec.get("diffusers_callback"), spec.get("config"), spec.get("callbacks")
    cls = getattr(callbacks, name, None) if isinstance(name, str) else None
    try:
        if cls is callbacks.MultiPipelineCallbacks and isinstance(parts, list):
            return cls([_diffusers_callback(key, part if isinstance(part, dict) else {}, where) for part in parts])
        if isinstance(cls, type) and issubclass(cls, callbacks.PipelineCallback) and isinstance(config, dict):
            return cls(**config)
    except (TypeError, ValueError) as exc:
        raise AttnscopeError(f"trace {where!r}: {key}={spec!r} in its manifest: {name} refuses that config ({exc})") \
            from None
    raise AttnscopeError(f"trace {where!r}: {key}={spec!r} in its manifest; expected one of diffusers' callbacks "
                         f"(diffusers.callbacks) as its class name and config (the store is damaged or crafted)")

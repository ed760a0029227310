"""``ats.sweep``: one trace per (prompt, seed) under a folder, a catalog beside them, resumable, on N workers."""

from __future__ import annotations

import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..selection import DTYPES
from ..store import check_keep_bits, enclosing_trace
from ._catalog import Catalog, open_catalog, write_catalog
from ._folder import SweepFolder
from ._plan import plan_runs, read_prompts
from ._pool import (
    WorkerSpec,
    adapter_change,
    check_workers_can_load,
    load_sweep_pipeline,
    pipeline_settings,
    run_in_workers,
)
from ._runs import execute_run

__all__ = ["sweep"]

SETTINGS_FILE = "sweep.json"
#: seconds between rewrites of the catalog while a sweep runs (the row files are always current)
CATALOG_INTERVAL = 30.0
_NOT_CAPTURE_KWARGS = ("prompt", "seed", "store", "overwrite", "generator")


def _reference(pipe: Any) -> str | None:
    return pipe.config.get("_name_or_path") or getattr(pipe, "name_or_path", None)


def _model_source(pipe: Any, scratch: list[str]) -> str:
    """What worker processes load: the pipeline's own reference when it is loadable, else a saved copy."""
    ref = _reference(pipe)
    if ref == "shapes" or (ref and (Path(ref) / "model_index.json").is_file()):
        return str(ref)
    saved = tempfile.mkdtemp(prefix="attnscope-sweep-model-")
    scratch.append(saved)
    pipe.save_pretrained(saved, safe_serialization=True)  # safetensors: what workers load is never a pickle
    return saved


def _check_picklable(extra: Any) -> None:
    """Worker processes receive ``extra`` pickled: a lambda or a function defined inside another one cannot be."""
    import pickle

    try:
        pickle.dumps(extra)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise AttnscopeError(f"extra={extra!r}: worker processes cannot receive it ({exc}); with workers > 1 or "
                             f"devices, give a function defined at the top level of a module") from None


def _recordable(value: Any) -> Any:
    """``value`` as ``sweep.json`` records it: JSON, a function by its name and code, anything else by its repr.

    A function's repr holds its address, which differs in every process: a rerun of the same script
    must find the same setting, and a function with another body another one.

    >>> def starts(prefix):
    ...     return lambda site: site.name.startswith(prefix)
    >>> a, b = starts("up"), starts("up")
    >>> a is b, _recordable(a) == _recordable(b), _recordable(a) == _recordable(starts("down"))
    (False, True, False)
    """
    import hashlib
    import marshal

    from ..store import jsonable

    try:
        return jsonable(value)
    except TypeError:
        pass
    if isinstance(value, (list, tuple)):  # a list of init images, …
        return [_recordable(v) for v in value]
    content = _content_digest(value)
    if content is not None:
        return content
    code = getattr(value, "__code__", None)
    if code is None:  # a callable object, …: compared by its repr
        return repr(value)
    code = code.replace(co_filename="", co_firstlineno=1)  # the same function moved in its file is the same
    bound = repr(([c.cell_contents for c in value.__closure__ or ()], value.__defaults__)).encode()
    digest = hashlib.sha256(marshal.dumps(code) + bound).hexdigest()[:16]
    return f"function {value.__qualname__}, code {digest}"


def _content_digest(value: Any) -> str | None:
    """An image, array or tensor (an img2img init image, a mask, a control image, latents) by its content: its repr
    holds an address (PIL) or a few values (torch, numpy), so a resumed sweep found the same input changed, or
    another one the same.

    >>> import numpy as np, PIL.Image
    >>> a = PIL.Image.fromarray(np.zeros((2, 3, 3), np.uint8))
    >>> _content_digest(a) == _content_digest(a.copy()), _content_digest(a).split(",")[0], _content_digest(1.0)
    (True, 'image RGB 3x2', None)
    >>> _content_digest(np.ones(3)) != _content_digest(np.ones(4))
    True
    """
    import hashlib

    import numpy as np
    import PIL.Image
    import torch

    if isinstance(value, PIL.Image.Image):
        kind, data = f"image {value.mode} {value.width}x{value.height}", value.tobytes()
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        array = value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)
        dtype = str(array.dtype).removeprefix("torch.")
        kind = f"{type(value).__name__} {dtype} {tuple(array.shape)}"
        data = array.view(torch.uint8).numpy().tobytes() if isinstance(array, torch.Tensor) else array.tobytes()
    else:
        return None
    return f"{kind}, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def _settings_record(settings: dict, pipeline_defaults: dict | None = None) -> dict:
    """``settings`` as ``sweep.json`` holds them: JSON values, the capture settings that differ from the defaults."""
    settings = dict(settings)
    if isinstance(settings.get("capture"), dict):
        settings["capture"] = _explicit(settings["capture"], pipeline_defaults)
    return {k: ({kk: _recordable(vv) for kk, vv in v.items()} if isinstance(v, dict) else _recordable(v))
            for k, v in settings.items()}


def _check_folder(folder: SweepFolder) -> None:
    """``out`` must be a folder that is new, empty or a sweep's: refuse a file, a trace or a folder of other files."""
    if folder.is_file():
        raise AttnscopeError(f"out={folder.url('').rstrip('/')!r} is a file; expected a folder (new, empty, or a "
                             f"sweep's) for the sweep")
    if not folder.remote:
        above = next((p for p in Path(folder.url("")).parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise AttnscopeError(f"out={folder.url('').rstrip('/')!r}: {str(above)!r} is a file; expected a folder "
                                 f"to write the sweep into")
        inside = enclosing_trace(folder.url(""))
        if inside is not None:
            raise AttnscopeError(f"out={folder.url('').rstrip('/')!r} is inside the trace {str(inside)!r}; expected a "
                                 f"folder outside any trace for the sweep")
    if not any(folder.exists(mark) for mark in (SETTINGS_FILE, "catalog.parquet", "rows")) and folder.list(""):
        what = "an attnscope trace" if folder.exists("zarr.json") else "a folder that is not a sweep (no sweep.json)"
        raise AttnscopeError(f"out={folder.url('')!r} is {what}; give a new or empty folder for the sweep")


def _check_settings(folder: SweepFolder, settings: dict, pipeline_defaults: dict | None = None) -> bool:
    """Refuse ``settings`` when the folder's ``sweep.json`` records others; whether the folder has a ``sweep.json``.

    A folder holds one sweep: one model, one capture setting, one scheduler, one dtype, one FreeU setting and
    one way of applying adapters, one layerwise casting. Only the keys in ``settings`` are compared; ``scheduler``,
    ``dtype``, ``freeu``, ``adapters`` and ``layerwise_casting``, recorded since they were added, are not compared
    with a ``sweep.json`` written before (it lacks them).
    """
    if not folder.exists(SETTINGS_FILE):
        return False
    before = folder.read_json(SETTINGS_FILE)
    if not isinstance(before, dict):
        raise AttnscopeError(f"{folder.url(SETTINGS_FILE)!r}: expected a JSON object of the sweep's settings, got "
                             f"{type(before).__name__}")
    if isinstance(before.get("capture"), dict):
        before["capture"] = _explicit(before["capture"], pipeline_defaults)
    changed = {k: (before.get(k), v) for k, v in _settings_record(settings, pipeline_defaults).items()
               if before.get(k) != v and (k in before or k in ("model", "capture"))}
    if "model" in changed and _same_directory(*changed["model"]):  # one directory named two ways
        del changed["model"]
    if "dtype" in changed or "adapters" in changed or "layerwise_casting" in changed:  # they say why the hash differs
        changed.pop("model_hash", None)
    if changed:
        detail = "; ".join(_describe_change(k, old, new) for k, (old, new) in changed.items())
        raise AttnscopeError(f"out={folder.url('')!r} holds a sweep with other settings ({detail}); resume it "
                             f"with the same settings or choose another folder")
    return True


def _describe_change(key: str, old: Any, new: Any) -> str:
    """One setting's change for the refusal: a scheduler by its class, or by the config entries that differ; FreeU by
    its factors; adapters by what differs (:func:`adapter_change`).

    >>> _describe_change("dtype", "float32", "bfloat16")
    "dtype: 'float32' then, 'bfloat16' now"
    >>> _describe_change("scheduler", {"class": "DDIMScheduler", "config": {"eta": 0, "steps_offset": 1}},
    ...                  {"class": "DDIMScheduler", "config": {"eta": 0, "steps_offset": 0}})
    "scheduler: DDIMScheduler with {'steps_offset': 1} then, with {'steps_offset': 0} now"
    >>> _describe_change("freeu", None, {"s1": 0.9, "s2": 0.2, "b1": 1.5, "b2": 1.6})
    'freeu (pipe.enable_freeu): off then, s1=0.9 s2=0.2 b1=1.5 b2=1.6 now'
    """
    if key == "adapters":
        return f"adapters: {adapter_change(old, new)}"
    if key == "freeu":
        return f"freeu (pipe.enable_freeu): {_factors(old)} then, {_factors(new)} now"
    if key == "scheduler" and isinstance(old, dict) and isinstance(new, dict):
        if old.get("class") != new.get("class"):
            return f"scheduler: {old.get('class')} then, {new.get('class')} now"
        a, b = old.get("config") or {}, new.get("config") or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return (f"scheduler: {new.get('class')} with {({k: a.get(k) for k in keys})!r} then, "
                f"with {({k: b.get(k) for k in keys})!r} now")
    return f"{key}: {old!r} then, {new!r} now"


def _factors(freeu: Any) -> str:
    """FreeU factors in the order ``enable_freeu`` takes them (``sweep.json`` sorts them), or ``off``."""
    if not isinstance(freeu, dict):
        return "off" if freeu is None else repr(freeu)
    return " ".join(f"{k}={freeu.get(k)}" for k in ("s1", "s2", "b1", "b2"))


def _same_directory(a: Any, b: Any) -> bool:
    """Whether model references ``a`` and ``b`` are paths of one existing directory (``models/m`` and its absolute
    path): the weights' hash, compared too, says whether what it holds changed.

    >>> _same_directory(".", str(Path.cwd())), _same_directory("shapes", "other")
    (True, False)
    """
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _fix_settings(folder: SweepFolder, settings: dict, pipeline_defaults: dict | None = None) -> None:
    """Check ``settings`` against the folder's ``sweep.json`` and write it when there is none yet.

    Called once the model is loaded and a run can start: a sweep that stops before (a model that does
    not load, a bad device) leaves no settings, so the corrected command can use the same folder.
    """
    if not _check_settings(folder, settings, pipeline_defaults):
        folder.write_json(SETTINGS_FILE, _settings_record(settings, pipeline_defaults))


def _explicit(capture_settings: dict, pipeline_defaults: dict | None = None) -> dict:
    """The capture settings that differ from the defaults of :func:`attnscope.capture` and of the pipeline's own call
    (``pipeline_defaults``): a setting given at its default value is the same sweep as one left out (``attnscope
    sweep`` passes every option, ``num_inference_steps`` included, ``ats.sweep`` only those given). ``steps`` is
    recorded as the step indices it selects (``range(0, 2)``, ``[0, 1]`` and the command line's ``0:2`` are one
    setting).

    >>> _explicit({"num_inference_steps": 20, "sites": None, "heads": "mean", "tokens": "prompt"})
    {'num_inference_steps': 20, 'tokens': 'prompt'}
    >>> _explicit({"num_inference_steps": 20, "steps": range(0, 2)}, {"num_inference_steps": 20})
    {'steps': [0, 1]}
    """
    import inspect

    from ..capture import capture
    from ..selection import select_steps

    defaults = {name: p.default for name, p in inspect.signature(capture).parameters.items()
                if p.default is not inspect.Parameter.empty}
    settings = dict(capture_settings)
    steps = settings.get("num_inference_steps", (pipeline_defaults or {}).get("num_inference_steps"))
    if settings.get("steps") is not None and isinstance(steps, int):
        try:
            chosen = list(select_steps(_step_spec(settings["steps"]), steps))
        except (AttnscopeError, TypeError, ValueError):  # not a selection of this run's steps: compared as given
            chosen = None
        if chosen is not None:
            settings["steps"] = None if chosen == list(range(steps)) else chosen
    defaults = {**(pipeline_defaults or {}), **defaults}
    settings = {k: _recordable(v) for k, v in settings.items()}
    return {k: v for k, v in settings.items() if not (k in defaults and v == _recordable(defaults[k]))}


def _step_spec(spec: Any) -> Any:
    """``spec``, or the range or slice that a ``sweep.json`` written before steps were resolved holds as its repr.

    >>> _step_spec("range(0, 4, 2)"), _step_spec("slice(None, -1, None)"), _step_spec([0, 1])
    (range(0, 4, 2), slice(None, -1, None), [0, 1])
    """
    import re

    match = re.fullmatch(r"(range|slice)\(([-\d, None]*)\)", spec) if isinstance(spec, str) else None
    if match is None:
        return spec
    args = [None if a.strip() == "None" else int(a) for a in match[2].split(",")]
    return range(*args) if match[1] == "range" else slice(*args)


def _pipeline_defaults(pipe_or_model: Any) -> dict:
    """The defaults of the pipeline's own call (``num_inference_steps``, ``guidance_scale``, …), from its class, without
    loading it: a pipeline object's, the shapes model's, a saved directory's (``model_index.json``); else none.

    >>> _pipeline_defaults("shapes")["num_inference_steps"], _pipeline_defaults("owner/not-local")
    (20, {})
    """
    import inspect
    import json

    cls = name = None
    if not isinstance(pipe_or_model, (str, Path)):
        cls = type(pipe_or_model)
    elif str(pipe_or_model) == "shapes":
        name = "ShapesPipeline"
    else:
        try:
            name = json.loads((Path(pipe_or_model) / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None
    if name == "ShapesPipeline":
        from ..models.shapes import ShapesPipeline as cls
    elif isinstance(name, str):
        import diffusers

        cls = getattr(diffusers, name, None)
    try:
        params = inspect.signature(cls.__call__).parameters if cls is not None else {}
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in params.items()
            if p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, float, str, type(None)))}


def _is_shapes(model: Any) -> bool:
    return (model if isinstance(model, str) else _reference(model)) == "shapes"


def _check_dtype_of_pipeline(pipe_or_model: Any, dtype: str | None) -> None:
    """``dtype=`` names the dtype a model is *loaded* in; a pipeline object is already loaded: another dtype than its
    own was ignored with ``workers=1`` and refused by every worker as changed weights. One error instead.

    >>> import attnscope as ats
    >>> _check_dtype_of_pipeline(ats.load_pipeline("shapes"), "float32")
    >>> _check_dtype_of_pipeline(ats.load_pipeline("shapes"), "bfloat16")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: dtype='bfloat16': the pipeline given runs in float32; ...
    """
    if dtype is None or isinstance(pipe_or_model, (str, Path)):
        return
    own = str(getattr(pipe_or_model, "dtype", "")).removeprefix("torch.")
    if own and own != dtype:
        raise AttnscopeError(f"dtype={dtype!r}: the pipeline given runs in {own}; dtype= sets the dtype a model is "
                             f"loaded in, so give the model's reference (a name or directory) with dtype={dtype!r}, "
                             f"or a pipeline loaded in it (ats.load_pipeline(ref, dtype={dtype!r})), or leave dtype= out")


def sweep(pipe_or_model: Any, prompts: Sequence[str] | str | Path, seeds: Any, out: str | Path, *,
          workers: int = 1, devices: Sequence[str] | None = None, threads: int | None = None,
          dtype: str | None = None, extra: Callable[[Any], dict] | None = None, progress: bool = True,
          storage_options: dict | None = None, **capture_kwargs: Any) -> Catalog:
    """Capture one trace per (prompt, seed) under ``out``, with a Parquet catalog of the runs; resumable.

    Rerunning the same call skips every run whose trace is complete and redoes the others (an
    interrupted sweep loses at most the runs in flight). Runs can be spread over worker processes,
    each loading the model once.

    Parameters
    ----------
    pipe_or_model : diffusers pipeline or str
        A pipeline, or what :func:`attnscope.load_pipeline` loads (``"shapes"``, a local directory).
        Worker processes load the pipeline's own reference when it is loadable, else a copy saved
        with ``save_pretrained`` (safetensors) in a temporary folder; its scheduler, dtype and FreeU factors
        are carried over, and weights or textual-inversion tokens that differ from what the reference loads
        stop the sweep before any run; a pipeline with a LoRA loaded is refused for workers (they would
        load it without).
    prompts : list of str, or the path of a text file (one prompt per line)
    seeds : int, list of int, or text like ``"0-99"`` / ``"0,3,7"``
    out : str or Path
        The sweep's folder: a local directory or a URL (``s3://bucket/runs/s1``, ``file://…``). It
        gets ``traces/<run>.zarr``, ``images/<run>.png``, ``rows/<run>.json``, ``sweep.json`` (the
        model, capture settings, scheduler, dtype, FreeU and adapters, written once the model is loaded
        and checked on resume) and ``catalog.parquet``. It must not be a file, a trace or a folder of other files. Traces for a URL are captured into a
        local staging folder and uploaded when complete.
    workers : int
        Worker processes on the CPU (1: run in this process, with ``pipe_or_model`` itself).
    devices : list of str, optional
        One worker process per device (``["cuda:0", "cuda:1"]``); overrides ``workers``.
    threads : int, optional
        Torch threads per worker process (default: the CPU cores divided among the workers, at most
        this process's own ``torch.get_num_threads()``, so ``OMP_NUM_THREADS=1`` holds in workers too;
        in this process, left as they are).
    dtype : str, optional
        For a model loaded here or in workers: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (default: the
        model's). A pipeline object runs in its own dtype: another ``dtype=`` beside it is refused.
    extra : callable, optional
        ``extra(trace) -> dict`` of scalars, added as catalog columns (runs in the worker; with
        worker processes it must be a module-level function).
    progress : bool
        A progress bar over the runs (tqdm), with the rate and ETA.
    storage_options : dict, optional
        fsspec options for a URL ``out`` (credentials, ``client_kwargs={"endpoint_url": …}``).
    **capture_kwargs
        Passed to :func:`attnscope.capture` for every run (``num_inference_steps``, ``sites``,
        ``steps``, ``heads``, ``height``, …).

    Returns
    -------
    Catalog
        :func:`open_catalog` of ``out``.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> out = tempfile.mkdtemp() + "/s1"
    >>> cat = ats.sweep(tiny_sd_pipeline(), ["a red circle", "a blue square"], seeds="0-2", out=out,
    ...                 progress=False, num_inference_steps=2, height=32, width=32)
    >>> len(cat), list(cat.df.status.unique())
    (6, ['complete'])
    >>> ats.sweep(tiny_sd_pipeline(), ["a red circle", "a blue square"], seeds="0-2", out=out, progress=False,
    ...           num_inference_steps=2, height=32, width=32).df.seconds.equals(cat.df.seconds)  # all skipped
    True
    """
    bad = sorted(set(capture_kwargs) & set(_NOT_CAPTURE_KWARGS))
    if bad:
        raise AttnscopeError(f"sweep(): {', '.join(bad)} are set per run by the sweep; pass prompts, seeds and out")
    if isinstance(prompts, Path):
        prompts = read_prompts(prompts)
    elif isinstance(prompts, str):
        raise AttnscopeError(f"prompts={prompts!r}: expected a list of prompts, or a pathlib.Path of a prompts file")
    runs = plan_runs(prompts, seeds)
    # numpy's ints (an np.arange item) as Python's: checked, recorded in sweep.json and compared as the ints they are
    capture_kwargs = {k: int(v) if isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) else v
                      for k, v in capture_kwargs.items()}
    _check_capture_kwargs(capture_kwargs)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise AttnscopeError(f"workers={workers!r}: expected an int >= 1")
    if devices is not None and (isinstance(devices, str) or not devices or not all(isinstance(d, str) for d in devices)):
        raise AttnscopeError(f"devices={devices!r}: expected a non-empty list of device names, e.g. ['cuda:0', 'cuda:1']")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise AttnscopeError(f"threads={threads!r}: expected an int >= 1")
    if extra is not None and not callable(extra):
        raise AttnscopeError(f"extra={extra!r}: expected a function trace -> dict of scalars")
    if dtype is not None and dtype not in DTYPES:
        raise AttnscopeError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if not isinstance(pipe_or_model, (str, Path)) and not hasattr(pipe_or_model, "components"):
        raise AttnscopeError(f"pipe_or_model={pipe_or_model!r}: expected a diffusers pipeline or a model name/directory")
    _check_dtype_of_pipeline(pipe_or_model, dtype)
    use_workers = devices is not None or workers > 1
    if use_workers and extra is not None:
        _check_picklable(extra)
    folder = SweepFolder(out, storage_options)
    scratch: list[str] = []
    try:
        _check_folder(folder)
        model = str(pipe_or_model) if isinstance(pipe_or_model, (str, Path)) else None
        known = {"model": model or _reference(pipe_or_model), "capture": capture_kwargs,
                 **({} if model else pipeline_settings(pipe_or_model))}
        defaults = _pipeline_defaults(pipe_or_model)
        _check_settings(folder, known, defaults)
        todo = [r for r in runs if not _done(folder, r)]
        detector = _is_shapes(model or pipe_or_model)
        bar = _progress_bar(len(runs), len(runs) - len(todo), progress)
        rows_since = [time.monotonic()]

        def on_ready(loaded: dict) -> None:  # the model is loaded: the settings are fixed before the first run
            _fix_settings(folder, {**known, **loaded}, defaults)

        def on_row(row: dict) -> None:
            bar.update(1)
            if row["status"] != "complete":
                bar.write(f"run {row['run']} failed: {row['error']}")
            if time.monotonic() - rows_since[0] > CATALOG_INTERVAL:
                write_catalog(folder)
                rows_since[0] = time.monotonic()

        try:
            if todo and use_workers:
                check_workers_can_load(known)
                worker_devices = list(devices) if devices is not None else [None] * workers
                pipe = None if model else pipe_or_model
                scheduler = None if pipe is None else (type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
                spec = WorkerSpec(model=model or _model_source(pipe, scratch), device=None,
                                  dtype=dtype or (None if pipe is None else known["dtype"]),
                                  scheduler=scheduler, threads=threads or _worker_threads(len(worker_devices)),
                                  location=str(folder.location), storage_options=storage_options,
                                  capture_kwargs=capture_kwargs, extra=extra, detector=detector,
                                  model_hash=known.get("model_hash"), freeu=known.get("freeu"),
                                  adapters=known.get("adapters"), casting=known.get("layerwise_casting"))
                run_in_workers(todo, spec, worker_devices, folder, on_row, on_ready)
            elif todo:
                pipe = load_sweep_pipeline(model, dtype=dtype) if model else pipe_or_model
                on_ready(pipeline_settings(pipe))
                with _torch_threads(threads):
                    for run in todo:
                        on_row(execute_run(pipe, run, folder, capture_kwargs, extra, "main", detector))
        finally:
            bar.close()
            if folder.exists(SETTINGS_FILE) or folder.exists("rows"):  # a sweep that never started writes nothing
                write_catalog(folder)
    finally:
        folder.close()
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
    catalog = open_catalog(out, storage_options=storage_options)
    failed = int((catalog.df["status"] != "complete").sum()) if len(catalog.df) else 0
    if failed and failed == len(catalog.df):
        # no run came out: the settings are not fixed yet, so the corrected command can use the same folder
        SweepFolder(out, storage_options).remove(SETTINGS_FILE)
        raise AttnscopeError(f"sweep {str(out)!r}: every run failed; the first error: {catalog.df['error'].iloc[0]}")
    return catalog


def _check_capture_kwargs(kwargs: dict[str, Any]) -> None:
    """What can be checked of every run's capture arguments before the sweep's folder is created (a bad one
    would otherwise fail every run, leaving a folder of failed runs).

    >>> _check_capture_kwargs({"num_inference_steps": 4, "steps": -1, "heads": "all"})
    >>> _check_capture_kwargs({"num_inference_steps": 0})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: num_inference_steps=0: expected an int >= 1 (the number of denoising steps)
    >>> _check_capture_kwargs({"height": 0})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: height=0: expected a positive int (the image's height in pixels), or leave it out for the pipeline's default
    >>> _check_capture_kwargs({"num_images_per_prompt": 4})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: num_images_per_prompt=4: a sweep's run is one image (its row, PNG and detector columns are one image's); leave it out and give more seeds instead (seeds give the repeats)
    """
    from ..capture import check_images_per_prompt, check_num_steps, check_size
    from ..selection import BRANCHES, HEADS, TOKENS, check_choice, select_steps

    steps = kwargs.get("num_inference_steps")
    check_num_steps(steps)
    for name in ("height", "width"):
        check_size(name, kwargs.get(name))
    if check_images_per_prompt(kwargs.get("num_images_per_prompt")) != 1:
        raise AttnscopeError(f"num_images_per_prompt={kwargs['num_images_per_prompt']!r}: a sweep's run is one image (its "
                             f"row, PNG and detector columns are one image's); leave it out and give more seeds instead "
                             f"(seeds give the repeats)")
    for name, allowed in (("heads", HEADS), ("tokens", TOKENS), ("branch", BRANCHES)):
        if name in kwargs:
            check_choice(name, kwargs[name], allowed)
    check_keep_bits(kwargs.get("keep_bits"))
    if steps is not None:
        select_steps(kwargs.get("steps"), steps)


def _done(folder: SweepFolder, run: Any) -> bool:
    """A run is done when its row says complete and its trace is complete and the one the row recorded (a deleted
    trace, or one another capture wrote over, is redone)."""
    try:
        row = folder.read_json(run.row)
    except FileNotFoundError:
        return False
    except AttnscopeError:
        return False  # a damaged row file: redo the run
    if not (isinstance(row, dict) and row.get("status") == "complete"):
        return False
    trace_id = row.get("trace_id")  # rows written before it was recorded have none: their trace is taken as theirs
    return folder.trace_complete(run.trace, trace_id if isinstance(trace_id, str) else None)


def _progress_bar(total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="run", desc="sweep", disable=not enabled, smoothing=0.1)


def _worker_threads(workers: int) -> int:
    """Threads per worker: the cores shared among ``workers``, no more than this process runs itself."""
    import torch

    return max(1, min((os.cpu_count() or 1) // workers, torch.get_num_threads()))


class _torch_threads:
    """Set torch's thread count for a block (nothing when ``threads`` is None)."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(self.before)

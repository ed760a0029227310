"""Worker processes of a sweep: each loads the model once and runs one run at a time, as the parent hands them out.

Each worker talks to the parent over its own pipe (no shared queue whose lock a killed worker
could hold). The parent watches every worker's process sentinel: a worker that dies mid-run
costs only that run, which gets a ``failed`` row and is redone on resume; the others go on.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import AttnscopeError
from ._folder import SweepFolder
from ._plan import Run
from ._runs import execute_run, failed_row, model_hash

__all__ = ["WorkerSpec", "adapter_change", "check_workers_can_load", "load_sweep_pipeline", "pipeline_settings",
           "run_in_workers"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to load the model and run its share (sent to it once, at start)."""

    model: str
    device: str | None
    dtype: str | None
    scheduler: tuple[str, dict] | None
    threads: int
    location: str
    storage_options: dict | None
    capture_kwargs: dict
    extra: Callable[[Any], Any] | None
    detector: bool
    model_hash: str | None = None  # the weights of the pipeline given, which the loaded ``model`` must have
    freeu: dict[str, float] | None = None  # the FreeU factors of the pipeline given: no weights, set again on load
    adapters: dict | None = None  # its adapters (``adapter_state``), which the loaded ``model`` must apply alike
    casting: dict | None = None  # its layerwise casting per component (storage, compute dtypes): set again on load


def load_sweep_pipeline(model: str, *, device: str | None = None, dtype: str | None = None,
                        scheduler: tuple[str, dict] | None = None, freeu: dict[str, float] | None = None,
                        casting: dict[str, dict[str, str]] | None = None) -> Any:
    """The pipeline a sweep runs: ``model`` loaded locally, with ``scheduler`` (class name, config), FreeU
    (``pipe.enable_freeu`` factors: no weights, so a loaded model has it off) and layerwise casting (per component:
    ``enable_layerwise_casting``'s storage and compute dtypes, as ``attnscope.store.layerwise_casting`` reads them,
    set by ``attnscope.store.set_layerwise_casting``)
    when given."""
    import diffusers

    from ..models import load_pipeline
    from ..store import set_layerwise_casting

    pipe = load_pipeline(model, device=device, dtype=dtype)
    if scheduler is not None:
        name, config = scheduler
        pipe.scheduler = getattr(diffusers, name).from_config(config)
    if freeu:
        pipe.unet.enable_freeu(**freeu)
    set_layerwise_casting(pipe, casting or {}, f"model {model!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_settings(pipe: Any) -> dict[str, Any]:
    """What a sweep records of the pipeline its runs use: the scheduler (class, config), the dtype, the
    hash of its weights (the catalog's ``model_hash``: two models with one reference are told apart), and
    what changes the image but no weight: the FreeU factors (``freeu``, None when off; the manifest's
    ``model.freeu``) and how LoRA and textual inversion are applied (``adapters``: the manifest's
    ``model.adapters``, :func:`attnscope.capture.adapter_state`).

    The config's private entries (``_class_name``, ``_diffusers_version``) are left out: the class is
    recorded beside it, and the diffusers version does not change what the runs compute.

    >>> import attnscope as ats
    >>> s = pipeline_settings(ats.load_pipeline("shapes"))
    >>> s["scheduler"]["class"], s["scheduler"]["config"]["prediction_type"], s["dtype"], len(s["model_hash"])
    ('DDIMScheduler', 'v_prediction', 'float32', 16)
    >>> s["freeu"], s["adapters"]
    (None, {'lora': {}, 'textual_inversion': {}})
    """
    from ..capture import adapter_state
    from ..store import freeu_settings, jsonable, layerwise_casting, weights_fingerprint

    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return {"scheduler": {"class": type(pipe.scheduler).__name__, "config": jsonable(config)},
            "dtype": str(pipe.dtype).removeprefix("torch."), "model_hash": model_hash(weights_fingerprint(pipe)),
            "freeu": freeu_settings(getattr(pipe, "unet", None)), "adapters": jsonable(adapter_state(pipe)),
            "layerwise_casting": layerwise_casting(pipe)}


#: the LoRA settings of ``adapter_state`` in the order a change names them, with what sets each
_LORA_SETTINGS = {"merged": "fused (pipe.fuse_lora)", "disabled": "disabled (pipe.disable_lora)",
                  "active": "active adapters (pipe.set_adapters)",
                  "adapters": "scales (pipe.set_adapters(adapter_weights=), fuse_lora(lora_scale=))",
                  "layers": "layers (pipe.load_lora_weights)"}


def adapter_change(before: dict | None, after: dict | None, then: str = "then", now: str = "now") -> str:
    """What differs between two :func:`attnscope.capture.adapter_state` records, in words (for a refusal).

    >>> adapter_change({"lora": {}, "textual_inversion": {"tokenizer": ["<t>"]}}, {"lora": {}, "textual_inversion": {}})
    "textual-inversion tokens of tokenizer: ['<t>'] then, none now"
    >>> lora = {"adapters": {"a": [1.0]}, "active": ["a"], "disabled": False, "merged": [], "layers": 8, "digest": "x"}
    >>> adapter_change({"lora": {"unet": lora, "text_encoder": lora}},
    ...                {"lora": {"unet": {**lora, "disabled": True}, "text_encoder": {**lora, "disabled": True}}})
    'LoRA of text_encoder, unet: disabled (pipe.disable_lora) False then, True now'
    >>> adapter_change({"lora": {"unet": lora}}, {"lora": {"unet": {**lora, "digest": "y"}}}, "given", "loaded")
    'LoRA of unet: per-layer scales (pipe.set_adapters with per-block weights) differ'
    >>> adapter_change({"lora": {"unet": lora}}, {"lora": {}})
    "LoRA in unet: adapters {'a': [1.0]} then, none now"
    >>> adapter_change({"lora_sources": [{"path": "/l/a.safetensors", "scale": 0.5, "sha256": "ab" * 32}]}, {})
    'LoRA files (load_pipeline(lora=)): /l/a.safetensors ×0.5 (sha256 abababababab…) then, none now'
    >>> adapter_change({"ip_adapter": {"unet": {"scales": [[0.5]], "digest": "x"}}}, {})
    'IP-Adapter of unet (pipe.load_ip_adapter, set_ip_adapter_scale): scales [[0.5]] then, none now'
    """
    before, after = before or {}, after or {}
    parts = []
    tokens_then, tokens_now = before.get("textual_inversion") or {}, after.get("textual_inversion") or {}
    for name in sorted(set(tokens_then) | set(tokens_now)):
        if tokens_then.get(name) != tokens_now.get(name):
            parts.append(f"textual-inversion tokens of {name}: {tokens_then.get(name) or 'none'} {then}, "
                         f"{tokens_now.get(name) or 'none'} {now}")
    lora_then, lora_now = before.get("lora") or {}, after.get("lora") or {}
    changes: dict[str, list[str]] = {}  # one description -> the components it holds for
    for name in sorted(set(lora_then) | set(lora_now)):
        a, b = lora_then.get(name), lora_now.get(name)
        if a == b:
            continue
        if not (isinstance(a, dict) and isinstance(b, dict)):
            parts.append(f"LoRA in {name}: {_lora_words(a)} {then}, {_lora_words(b)} {now}")
            continue
        differ = [f"{words} {a.get(key)!r} {then}, {b.get(key)!r} {now}"
                  for key, words in _LORA_SETTINGS.items() if a.get(key) != b.get(key)]
        said = "; ".join(differ) or "per-layer scales (pipe.set_adapters with per-block weights) differ"
        changes.setdefault(said, []).append(name)
    parts += [f"LoRA of {', '.join(names)}: {said}" for said, names in changes.items()]
    files_then, files_now = before.get("lora_sources") or [], after.get("lora_sources") or []
    if files_then != files_now:
        parts.append(f"LoRA files (load_pipeline(lora=)): {_lora_files(files_then)} {then}, {_lora_files(files_now)} {now}")
    ip_then, ip_now = before.get("ip_adapter") or {}, after.get("ip_adapter") or {}
    for name in sorted(set(ip_then) | set(ip_now)):
        a, b = ip_then.get(name), ip_now.get(name)
        if a != b:
            parts.append(f"IP-Adapter of {name} (pipe.load_ip_adapter, set_ip_adapter_scale): scales "
                         f"{a['scales'] if a else 'none'} {then}, {b['scales'] if b else 'none'} {now}")
    return "; ".join(parts)


def _lora_files(sources: list) -> str:
    """The LoRA files of ``lora_sources`` in words: path, scale (and the hash's start), or ``none``."""
    said = [f"{s.get('path')} ×{s.get('scale')} (sha256 {str(s.get('sha256'))[:12]}…)" for s in sources
            if isinstance(s, dict)]
    return ", ".join(said) or "none"


def _lora_words(state: Any) -> str:
    return f"adapters {state.get('adapters')!r}" if isinstance(state, dict) else "none"


def check_workers_can_load(settings: dict[str, Any]) -> None:
    """Refuse worker processes for a pipeline with a LoRA loaded (its ``pipeline_settings``): they load the model
    again, from its reference or a copy saved with ``save_pretrained``, and neither holds peft's LoRA layers.

    >>> lora = {"adapters": {"a": [1.0]}, "active": ["a"], "disabled": False, "merged": [], "layers": 8, "digest": "x"}
    >>> check_workers_can_load({"adapters": {"lora": {"unet": lora}, "textual_inversion": {}}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: the pipeline given has a LoRA loaded (adapter 'a' in unet): worker processes ...
    """
    adapters = settings.get("adapters") or {}
    if adapters.get("ip_adapter"):
        raise AttnscopeError(f"the pipeline given has an IP-Adapter loaded (in {', '.join(sorted(adapters['ip_adapter']))}): "
                             f"worker processes load the model again, from its reference or a copy saved with "
                             f"save_pretrained, which keeps no IP-Adapter; use workers=1 (no devices=)")
    lora = adapters.get("lora") or {}
    if not lora:
        return
    names = sorted({a for state in lora.values() for a in state.get("adapters", {})})
    raise AttnscopeError(f"the pipeline given has a LoRA loaded (adapter {', '.join(map(repr, names))} in "
                         f"{', '.join(sorted(lora))}): worker processes load the model again, from its reference or a "
                         f"copy saved with save_pretrained, which keeps no LoRA layers, so their runs would lack it; use "
                         f"workers=1 (no devices=), or fuse it into the weights (pipe.fuse_lora(); "
                         f"pipe.unload_lora_weights()), save it with pipe.save_pretrained(folder) and sweep that folder")


def _worker_main(spec: WorkerSpec, conn: Any, name: str) -> None:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(spec.threads)
    diffusers_logging.disable_progress_bar()  # the parent's bar over runs is the one progress display
    transformers_logging.disable_progress_bar()
    try:
        pipe = load_sweep_pipeline(spec.model, device=spec.device, dtype=spec.dtype, scheduler=spec.scheduler,
                                   freeu=spec.freeu, casting=spec.casting)
    except Exception as exc:  # reported to the parent, which stops the sweep with this message
        conn.send(("error", f"worker {name} could not load model {spec.model!r}: {type(exc).__name__}: {exc}"))
        return
    settings = pipeline_settings(pipe)
    problem = _loaded_otherwise(spec, settings, name)
    if problem is not None:
        conn.send(("error", problem))
        return
    folder = SweepFolder(spec.location, spec.storage_options)
    conn.send(("ready", settings))
    try:
        while (run := conn.recv()) is not None:
            conn.send(("done", execute_run(pipe, run, folder, spec.capture_kwargs, spec.extra, name, spec.detector)))
    except (EOFError, KeyboardInterrupt):  # the parent went away or was interrupted: stop quietly
        pass
    finally:
        folder.close()


def _loaded_otherwise(spec: WorkerSpec, settings: dict[str, Any], name: str) -> str | None:
    """Why the model a worker loaded is not the pipeline given (its adapters, then its weights), or None."""
    if spec.adapters is not None and settings["adapters"] != spec.adapters:  # they say why the weights differ
        return (f"worker {name} loaded {spec.model!r}, whose adapters differ from the pipeline given "
                f"({adapter_change(spec.adapters, settings['adapters'], 'given', 'loaded')}): they were loaded into it "
                f"since; save it with pipe.save_pretrained(folder) and sweep that folder, or use workers=1")
    if spec.model_hash not in (None, settings["model_hash"]):
        return (f"worker {name} loaded {spec.model!r}, whose weights differ from the pipeline given "
                f"(model_hash {spec.model_hash!r} given, {settings['model_hash']!r} loaded, in "
                f"{settings['dtype']}): it was changed since it was loaded; save it with "
                f"pipe.save_pretrained(folder) and sweep that folder, or use workers=1")
    return None


@dataclass
class _Worker:
    name: str
    process: Any
    conn: Any
    run: Run | None = None


def run_in_workers(runs: Sequence[Run], spec: WorkerSpec, devices: Sequence[str | None], folder: SweepFolder,
                   on_row: Callable[[dict], None], on_ready: Callable[[dict], None]) -> None:
    """Run ``runs`` on one worker process per entry of ``devices``; ``on_row`` gets each finished run's row.

    ``on_ready`` gets each worker's :func:`pipeline_settings` once it has loaded the model, before the
    worker is given a run; an AttnscopeError it raises stops the sweep (the workers are ended).
    """
    ctx = multiprocessing.get_context("spawn")  # fork and torch/OpenMP threads do not mix
    workers: list[_Worker] = []
    pending = deque(runs)
    started: set[str] = set()  # the workers that got as far as loading the model
    try:
        for i, device in enumerate(devices):
            parent_conn, child_conn = ctx.Pipe()
            name = f"worker-{i}" + (f"@{device}" if device else "")
            process = ctx.Process(target=_worker_main, args=(replace(spec, device=device), child_conn, name),
                                  name=f"attnscope-sweep-{name}", daemon=True)
            process.start()
            child_conn.close()
            workers.append(_Worker(name, process, parent_conn))
        alive = list(workers)
        while alive and (pending or any(w.run is not None for w in alive)):
            ready = multiprocessing.connection.wait([w.conn for w in alive] + [w.process.sentinel for w in alive])
            for w in list(alive):
                message = None
                if w.conn in ready:
                    try:
                        message = w.conn.recv()
                    except (EOFError, OSError):
                        message = None
                if message is None:
                    if w.process.sentinel in ready or not w.process.is_alive():
                        w.process.join(timeout=5)
                        alive.remove(w)
                        if w.run is not None:  # the run it was doing: failed, redone on resume
                            row = failed_row(w.run, w.name, f"worker {w.name} exited with code {w.process.exitcode} "
                                                            f"while running it")
                            folder.write_json(w.run.row, row)
                            on_row(row)
                            w.run = None
                    continue
                kind, payload = message
                started.add(w.name)
                if kind == "error":
                    raise AttnscopeError(payload)
                if kind == "ready":
                    on_ready(payload)
                if kind == "done":
                    on_row(payload)
                    w.run = None
                if pending:
                    w.run = pending.popleft()
                    w.conn.send(w.run)
        if pending and not started:
            codes = sorted({w.process.exitcode for w in workers}, key=str)
            raise AttnscopeError(f"every worker process exited before it was ready (exit codes {codes}); nothing ran. "
                                 f"Workers are spawned and import the calling script again: in a script, call "
                                 f"ats.sweep(..., workers=N) under `if __name__ == \"__main__\":`")
        if pending:
            raise AttnscopeError(f"every worker process died; {len(pending)} runs were not started. Rerun the same "
                                 f"sweep to resume: complete runs are skipped")
    finally:
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in workers:
            w.process.join(timeout=10)
            if w.process.is_alive():  # interrupted mid-run: its run has no row and is redone on resume
                w.process.terminate()
                w.process.join(timeout=5)
            w.conn.close()

"""The manifest: everything needed to reproduce a captured generation, as JSON."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

import numpy as np
import torch

from ..errors import AttnscopeError

__all__ = ["build_manifest", "check_layerwise_casting", "check_same_generation", "check_same_schedule", "freeu_settings", "jsonable",
           "layerwise_casting", "set_layerwise_casting", "weights_fingerprint"]

_LIBRARIES = ("attnscope", "torch", "diffusers", "transformers", "zarr", "xarray", "numpy")
_SAMPLES_PER_TENSOR = 4096


def check_same_generation(a: Any, b: Any, what: str = "") -> None:
    """Check that traces ``a`` and ``b`` record the same generation — the same prompts, image size, number of
    samples and schedule (``num_steps``) — so their steps pair up as a before/after (:func:`attnscope.compare`,
    ``ats.view(compare=)``); ``what`` (e.g. ``"compare='b.zarr'"``) opens the error.

    >>> from types import SimpleNamespace as Run
    >>> a = Run(path="a.zarr", manifest={"run": {"prompts": ["a red circle"], "num_steps": 8}})
    >>> b = Run(path="b.zarr", manifest={"run": {"prompts": ["a red circle"], "num_steps": 4}})
    >>> check_same_generation(a, a)
    >>> check_same_generation(a, b)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: cannot compare 'a.zarr' and 'b.zarr': their num_steps differs (8 vs 4); a before/after needs two runs of the same generation
    """
    opening = f"{what}: " if what else ""
    ra, rb = (t.manifest.get("run", {}) if isinstance(t.manifest, dict) else {} for t in (a, b))
    pa, pb = ra.get("prompts"), rb.get("prompts")
    if pa is None or pb is None:
        pa, pb = ra.get("tokens"), rb.get("tokens")
    if pa != pb:
        raise AttnscopeError(f"{opening}cannot compare {str(a.path)!r} and {str(b.path)!r}: their prompts differ "
                             f"({pa!r} vs {pb!r})")
    for key in ("height", "width", "samples", "num_steps"):
        if ra.get(key) != rb.get(key):
            raise AttnscopeError(f"{opening}cannot compare {str(a.path)!r} and {str(b.path)!r}: their {key} differs "
                                 f"({ra.get(key)!r} vs {rb.get(key)!r}); a before/after needs two runs of the same "
                                 f"generation")


def check_same_schedule(a: Any, b: Any, what: str = "") -> None:
    """Check that traces ``a`` and ``b`` ran their steps at the same timesteps: a before/after pairs steps by index,
    so a text-to-image run (t = 999, 749, …) and an img2img run of as many steps (strength 0.5: t = 499, 374, …), or
    two schedulers' plans, would compare maps of other noise levels as if one run had changed them. Steps whose
    timestep either trace does not know (NaN) are not judged; ``what`` opens the error, as in
    :func:`~attnscope.store.check_same_generation`.

    >>> from types import SimpleNamespace as Run
    >>> a, b = Run(path="a.zarr", timesteps=[999.0, 749.0]), Run(path="b.zarr", timesteps=[499.0, 374.0])
    >>> check_same_schedule(a, a)
    >>> check_same_schedule(a, b)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: cannot compare 'a.zarr' and 'b.zarr': their timesteps differ (step 0: t=999 vs t=499; step 1: t=749 vs t=374); steps pair up by index, so a before/after needs two runs of the same schedule (the same scheduler, steps and strength)
    """
    ta, tb = (np.asarray(getattr(t, "timesteps", []), dtype=np.float64).ravel() for t in (a, b))
    if len(ta) != len(tb):  # another number of steps: check_same_generation's num_steps says so
        return
    known = np.isfinite(ta) & np.isfinite(tb)
    differ = np.flatnonzero(known & ~np.isclose(ta, tb, rtol=1e-6, atol=1e-6))
    if differ.size:
        shown = "; ".join(f"step {i}: t={ta[i]:g} vs t={tb[i]:g}" for i in differ[:3]) + ("; …" if differ.size > 3 else "")
        opening = f"{what}: " if what else ""
        raise AttnscopeError(f"{opening}cannot compare {str(a.path)!r} and {str(b.path)!r}: their timesteps differ "
                             f"({shown}); steps pair up by index, so a before/after needs two runs of the same "
                             f"schedule (the same scheduler, steps and strength)")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, or raise TypeError. Numpy's scalars and 1-d numeric arrays (a schedule:
    ``sigmas=np.linspace(...)``, ``timesteps=np.array([...])``) become numbers and lists of them, which the pipeline
    takes back alike; arrays of more dimensions (an image) and tensors are not JSON-able.

    >>> jsonable({"sigmas": np.array([14.6, 0.5], np.float32), "steps": np.int64(3), "size": (64, 96)})
    {'sigmas': [14.600000381469727, 0.5], 'steps': 3, 'size': [64, 96]}
    """
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "biuf":
        return value.tolist()
    callback = _diffusers_callback(value)
    if callback is not None:
        return callback
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _diffusers_callback(value: Any) -> dict[str, Any] | None:
    """One of diffusers' own step callbacks (``diffusers.callbacks``: ``SDCFGCutoffCallback``, …, and a
    ``MultiPipelineCallbacks`` of them) as ``{"diffusers_callback": class name, "config": …}`` (``"callbacks": […]``),
    from which a rerun builds it again; None for anything else (a function or a class of your own is not recorded).

    >>> from diffusers.callbacks import SDCFGCutoffCallback
    >>> jsonable(SDCFGCutoffCallback(cutoff_step_ratio=0.4))
    {'diffusers_callback': 'SDCFGCutoffCallback', 'config': {'cutoff_step_ratio': 0.4, 'cutoff_step_index': None}}
    """
    callbacks = sys.modules.get("diffusers.callbacks")  # loaded wherever one of its callbacks exists
    name = type(value).__name__
    if callbacks is None or getattr(callbacks, name, None) is not type(value):
        return None
    if isinstance(value, callbacks.MultiPipelineCallbacks):
        return {"diffusers_callback": name, "callbacks": list(value.callbacks)}
    if isinstance(value, callbacks.PipelineCallback):
        return {"diffusers_callback": name, "config": {k: v for k, v in value.config.items() if not k.startswith("_")}}
    return None


def _module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of one module's tensors (names, shapes, dtypes, a strided sample of values), computed afresh each
    time: a cache keyed by tensor versions missed writes through ``.data`` (peft's ``fuse_lora`` merges so), and
    the samples of a whole SD 1.5 cost about 40 ms on CPU. The samples are gathered per device and copied to the
    host once, not once per tensor."""
    tensors = list(module.state_dict(keep_vars=True).items())
    samples = []
    for _, t in tensors:
        flat = t.detach().reshape(-1)
        samples.append(flat[::max(1, flat.numel() // _SAMPLES_PER_TENSOR)].to(torch.float64))
    host = {}
    for device in {s.device for s in samples}:
        on = [s for s in samples if s.device == device]
        host[device] = iter(np.split(torch.cat(on).cpu().numpy(), np.cumsum([len(s) for s in on])[:-1]))
    digest = hashlib.sha256()
    for (name, t), sample in zip(tensors, samples):
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(next(host[sample.device]).tobytes())
    return digest.hexdigest()


def weights_fingerprint(pipe: Any) -> dict[str, str]:
    """SHA-256 per model component over names, shapes, dtypes and an evenly strided sample of
    each tensor's values (4096 to 8191 per tensor of 4096 or more values; every value of a smaller one), computed
    afresh on each call (a change through ``.data`` counts too).

    Examples
    --------
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> sorted(weights_fingerprint(tiny_sd_pipeline()))
    ['text_encoder', 'unet', 'vae']
    """
    return {name: _module_fingerprint(c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def _reference(ref: Any) -> Any:
    """The model reference a trace records: a relative path to a local pipeline directory is made absolute, so
    a rerun from another working directory loads the same model (``"shapes"`` and hub ids stay as they are).

    >>> import os, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "m").mkdir(); (d / "m" / "model_index.json").write_text("{}")
    2
    >>> here = os.getcwd(); os.chdir(d)
    >>> _reference("m") == str(d.resolve() / "m"), _reference("shapes"), _reference("owner/name")
    (True, 'shapes', 'owner/name')
    >>> os.chdir(here)
    """
    if isinstance(ref, str) and ref and ref != "shapes" and not os.path.isabs(ref) and "://" not in ref:
        if os.path.isfile(os.path.join(ref, "model_index.json")):
            return os.path.abspath(ref)
    return ref


#: the factors of FreeU (``pipe.enable_freeu(s1=, s2=, b1=, b2=)``), set on each of the UNet's up blocks
FREEU = ("s1", "s2", "b1", "b2")


def freeu_settings(denoiser: Any) -> dict[str, float] | None:
    """The FreeU factors a UNet's up blocks run with, None where FreeU is off (diffusers applies it only when all four
    are set and non-zero) or the denoiser has no up blocks. Not in the weights: a rerun must set it again.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> freeu_settings(pipe.unet) is None
    True
    >>> pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    >>> freeu_settings(pipe.unet)
    {'s1': 0.9, 's2': 0.2, 'b1': 1.5, 'b2': 1.6}
    """
    for block in getattr(denoiser, "up_blocks", None) or ():
        factors = {k: getattr(block, k, None) for k in FREEU}
        if all(factors.values()):
            return factors
    return None


def layerwise_casting(pipe: Any) -> dict[str, dict[str, str]]:
    """Per model component with layerwise casting on (``component.enable_layerwise_casting(storage_dtype=,
    compute_dtype=)``): its storage and compute dtypes. Not a weight: the weights fingerprint sees the storage dtype
    (and the values rounded to it), not that the layers are upcast to run; a rerun must have it on again.

    >>> import torch
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> layerwise_casting(pipe)
    {}
    >>> pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    >>> layerwise_casting(pipe)
    {'unet': {'storage_dtype': 'float8_e4m3fn', 'compute_dtype': 'float32'}}
    """
    found = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        settings = {(str(hook.storage_dtype).removeprefix("torch."), str(hook.compute_dtype).removeprefix("torch."))
                    for hook in map(_casting_hook, component.modules()) if hook is not None}
        if settings:  # diffusers applies one setting to a whole model: the first of a sorted set, to be deterministic
            storage, compute = sorted(settings)[0]
            found[name] = {"storage_dtype": storage, "compute_dtype": compute}
    return found


def set_layerwise_casting(pipe: Any, recorded: Any, what: str) -> None:
    """Turn on, on a freshly loaded ``pipe``, the layerwise casting :func:`layerwise_casting` recorded (per
    component: storage and compute dtypes); an entry that is not that (a damaged or crafted record) is one error that
    ``what`` opens (e.g. ``"trace 'a.zarr'"``).

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> set_layerwise_casting(pipe, {"unet": {"storage_dtype": "float8_e4m3fn", "compute_dtype": "float32"}}, "a")
    >>> layerwise_casting(pipe)
    {'unet': {'storage_dtype': 'float8_e4m3fn', 'compute_dtype': 'float32'}}
    >>> set_layerwise_casting(pipe, {"unet": {"storage_dtype": "os.system"}}, "trace 'a.zarr'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: trace 'a.zarr': layerwise_casting unet={'storage_dtype': 'os.system'} in its manifest; ...
    """
    for name, setting in (recorded.items() if isinstance(recorded, dict) else [(None, recorded)]):
        dtypes = [getattr(torch, setting.get(k), None) if isinstance(setting, dict) and isinstance(setting.get(k), str)
                  else None for k in ("storage_dtype", "compute_dtype")]
        component = getattr(pipe, name, None) if isinstance(name, str) else None
        if not all(isinstance(d, torch.dtype) for d in dtypes) or not callable(
                getattr(component, "enable_layerwise_casting", None)):
            raise AttnscopeError(f"{what}: layerwise_casting {name}={setting!r} in its manifest; expected, per model "
                                 f"component of the pipeline, a storage_dtype and a compute_dtype named as torch "
                                 f"dtypes (the store is damaged or crafted)")
        component.enable_layerwise_casting(storage_dtype=dtypes[0], compute_dtype=dtypes[1])


def _casting_hook(module: torch.nn.Module) -> Any:
    """The diffusers layerwise-casting hook of one module (its ``_diffusers_hook`` registry), or None."""
    registry = getattr(module, "_diffusers_hook", None)
    get = getattr(registry, "get_hook", None)
    return get("layerwise_casting") if callable(get) else None


def check_layerwise_casting(pipe: Any, manifest: dict[str, Any], where: str) -> None:
    """Refuse to rerun trace ``where`` with ``pipe`` when its layerwise casting differs from the recorded one
    (``model.layerwise_casting``; a manifest written before it was recorded is not judged), naming the component and
    the call that sets it: without it, the weights fingerprint would only say that the weights differ.
    """
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if "layerwise_casting" not in model:
        return
    recorded = model["layerwise_casting"] if isinstance(model["layerwise_casting"], dict) else {}
    current = layerwise_casting(pipe)
    for name in sorted(set(recorded) | set(current)):
        then, now = recorded.get(name), current.get(name)
        if then == now:
            continue
        if not isinstance(then, dict) or not then:
            raise AttnscopeError(f"cannot rerun trace {where!r} with this pipe: its {name} has layerwise casting on "
                                 f"({_spell_casting(now)}), the trace was captured without it; load the model afresh "
                                 f"(layerwise casting cannot be turned off) and pass it without casting")
        enable = (f"pipe.{name}.enable_layerwise_casting(storage_dtype=torch.{then.get('storage_dtype')}, "
                  f"compute_dtype=torch.{then.get('compute_dtype')})")
        raise AttnscopeError(f"cannot rerun trace {where!r} with this pipe: the trace was captured with layerwise "
                             f"casting on its {name} ({_spell_casting(then)}), this pipe has "
                             f"{_spell_casting(now) if now else 'it off'}; call {enable} on a freshly loaded model "
                             f"before the rerun")


def _spell_casting(setting: dict[str, str]) -> str:
    """``{'storage_dtype': 'float8_e4m3fn', 'compute_dtype': 'bfloat16'}`` in words."""
    return f"storage {setting.get('storage_dtype')}, compute {setting.get('compute_dtype')}"


def build_manifest(pipe: Any, denoiser: torch.nn.Module, run: dict[str, Any], capture_spec: dict[str, Any]) -> dict[str, Any]:
    """The manifest stored in a trace's root attributes (see docs/store-format.md); ``denoiser`` is the
    pipeline's UNet or transformer, as the hook core found it."""
    return jsonable({
        "model": {
            "reference": _reference(pipe.config.get("_name_or_path") or getattr(pipe, "name_or_path", None)),
            "weights_fingerprint": weights_fingerprint(pipe),
            "pipeline_class": type(pipe).__name__,
            "denoiser_class": type(denoiser).__name__,
            "freeu": freeu_settings(denoiser),
            "layerwise_casting": layerwise_casting(pipe),
        },
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        "dtype": str(denoiser.dtype).removeprefix("torch."),
        "device": str(denoiser.device),
        "cpu_threads": torch.get_num_threads(),
        "versions": dict(_versions()),
        "run": run,
        "capture": capture_spec,
    })

"""``load_pipeline``: the embedded model, a local diffusers directory or a cached hub id, never the network."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import AttnscopeError
from ..selection import DTYPES
from ._compat import quiet_loading

__all__ = ["load_pipeline"]

_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weight files that only torch.load (pickle) reads


def load_pipeline(model: str | Path, *, device: str | None = None, dtype: str | None = None,
                  lora: Any = None) -> Any:
    """Load a diffusers pipeline from a local directory or the local Hugging Face cache, never the network.

    Parameters
    ----------
    model : str or Path
        ``"shapes"`` (the embedded model, see docs/shapes-model.md), a directory saved with
        ``pipe.save_pretrained``, or a hub id already in the local cache.
    device : str, optional
        ``"cpu"``, ``"cuda"``, … (default: leave where loaded).
    dtype : {"float32", "float16", "bfloat16"}, optional
    lora : path, dict or list of them, optional
        LoRA files to load into the pipeline with diffusers' ``load_lora_weights``, in order: each a local
        ``.safetensors`` file (or a folder holding exactly one), or a dict with ``path`` and optionally ``scale``
        (default 1.0: the weight ``set_adapters`` would give it), ``adapter_name`` (default: diffusers'
        ``default_<i>``) and ``sha256`` (the file must have this SHA-256). Pickled files (.bin, .pt, .ckpt) are
        refused. Each file's absolute path, SHA-256, adapter name and scale are remembered on the pipeline, so a
        capture records them (``model.adapters.lora_sources``) and :func:`attnscope.rerun` loads them again.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> d = tempfile.mkdtemp()
    >>> tiny_sd_pipeline().save_pretrained(d)
    >>> type(ats.load_pipeline(d)).__name__
    'StableDiffusionPipeline'
    >>> ats.load_pipeline("shapes").unet.config.sample_size
    16

    A saved copy of the embedded model loads back as the shapes pipeline:

    >>> ats.load_pipeline("shapes").save_pretrained(d + "/copy")
    >>> type(ats.load_pipeline(d + "/copy")).__name__
    'ShapesPipeline'

    A LoRA file must be safetensors:

    >>> ats.load_pipeline("shapes", lora=d + "/style.ckpt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: lora=...style.ckpt': a pickled file (.ckpt); attnscope reads LoRA weights from .safetensors files only...
    """
    import torch
    from diffusers import DiffusionPipeline

    if not isinstance(model, (str, os.PathLike)):
        raise AttnscopeError(f"model={model!r}: expected a str or path ('shapes', a local diffusers directory or a "
                             "hub id 'owner/name' already in the local Hugging Face cache)")
    dtypes = {name: getattr(torch, name) for name in DTYPES}
    if dtype is not None and dtype not in dtypes:
        raise AttnscopeError(f"dtype={dtype!r}: expected one of {', '.join(dtypes)}")
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}  # never unpickle .bin weights
    if dtype is not None:
        kwargs["torch_dtype"] = dtypes[dtype]
    loras = _lora_files(lora)  # checked and hashed before the model loads: a wrong file fails fast
    if str(model) == "shapes":
        with quiet_loading():  # importing diffusers' SD pipeline module is what prints transformers' note
            from .shapes import load_shapes_pipeline

        return _to_device(_load_loras(load_shapes_pipeline(dtype=kwargs.get("torch_dtype")), loras), device)
    path = Path(model)
    if not path.exists() and str(model).count("/") != 1:
        raise AttnscopeError(
            f"model={str(model)!r}: unknown model; expected 'shapes' (the embedded model), a local diffusers "
            "directory, or a hub id 'owner/name' already in the local Hugging Face cache"
        )
    if path.exists() and not path.is_dir():
        raise AttnscopeError(f"model={str(model)!r}: is a file; expected the directory of a diffusers pipeline saved "
                             "with save_pretrained (the folder that holds model_index.json)")
    if path.exists() and not (path / "model_index.json").is_file():
        raise AttnscopeError(f"model={str(model)!r}: directory has no model_index.json (expected a diffusers pipeline saved with save_pretrained)")
    cls = _own_pipeline_class(path) if path.exists() else DiffusionPipeline
    try:
        # some models draw their init from torch's global RNG while loading (PixArt, Sana): the caller's stays as it was
        with quiet_loading(), torch.random.fork_rng(devices=[]):
            pipe = cls.from_pretrained(str(model), **kwargs)
    except (OSError, ValueError) as exc:
        if path.exists():
            pickled = sorted({f.suffix for f in path.rglob("*") if f.suffix in _PICKLED})
            note = (f" (its weights are pickled {'/'.join(pickled)} files; attnscope reads .safetensors only: "
                    "save it again with save_pretrained(..., safe_serialization=True))") if pickled else ""
            raise AttnscopeError(f"model={str(model)!r}: cannot load the diffusers pipeline in this directory: "
                                 f"{exc}{note}") from exc
        raise AttnscopeError(
            f"model={str(model)!r}: not a local diffusers directory and not in the local Hugging Face cache with "
            f".safetensors weights (this machine cannot download models; attnscope never unpickles .bin weights): {exc}"
        ) from exc
    _check_complete(pipe, model)
    pipe = _to_device(_load_loras(pipe, loras), device)
    pipe.set_progress_bar_config(disable=None)
    return pipe


def _lora_files(lora: Any) -> list[dict[str, Any]]:
    """``lora=`` as a list of ``{"path": absolute .safetensors file, "sha256", "adapter_name", "scale"}``, each file
    hashed (and compared with a ``sha256`` given); any bad entry is one error naming it.

    >>> _lora_files(None)
    []
    >>> _lora_files({"path": "a.safetensors", "scale": "big"})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: lora={'path': 'a.safetensors', 'scale': 'big'}: scale='big'; expected a finite number
    """
    import math

    if lora is None:
        return []
    entries = list(lora) if isinstance(lora, (list, tuple)) else [lora]
    found: list[dict[str, Any]] = []
    for entry in entries:
        spec = entry if isinstance(entry, dict) else {"path": entry}
        path, scale, name, want = (spec.get(k) for k in ("path", "scale", "adapter_name", "sha256"))
        unknown = sorted(set(spec) - {"path", "scale", "adapter_name", "sha256"})
        if unknown or not isinstance(path, (str, os.PathLike)):
            raise AttnscopeError(f"lora={entry!r}: expected a path to a .safetensors file, or a dict with 'path' and "
                                 f"optionally 'scale', 'adapter_name', 'sha256'")
        scale = 1.0 if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise AttnscopeError(f"lora={entry!r}: scale={scale!r}; expected a finite number")
        if not (name is None or (isinstance(name, str) and name)):
            raise AttnscopeError(f"lora={entry!r}: adapter_name={name!r}; expected a non-empty str")
        file = _lora_file(Path(path))
        digest = _sha256(file)
        if want is not None and want != digest:
            raise AttnscopeError(f"lora={str(file)!r}: the file's SHA-256 is {digest}, expected {want!r} (the file "
                                 f"changed since it was recorded)")
        found.append({"path": str(file), "sha256": digest, "adapter_name": name, "scale": float(scale)})
    names = [f["adapter_name"] for f in found if f["adapter_name"] is not None]
    if len(set(names)) < len(names):
        raise AttnscopeError(f"lora: adapter names {names!r}; expected each LoRA under its own name")
    return found


def _lora_file(path: Path) -> Path:
    """The absolute ``.safetensors`` file ``path`` names: itself, or the only one in a folder."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            pickled = sorted(f.name for f in path.iterdir() if f.suffix in _PICKLED)
            raise AttnscopeError(f"lora={str(path)!r}: the folder holds {len(files)} .safetensors files "
                                 f"({', '.join(f.name for f in files) or 'none'}"
                                 f"{'; pickled: ' + ', '.join(pickled) if pickled else ''}); expected exactly one, "
                                 f"or give the file itself")
        path = files[0]
    if path.suffix in _PICKLED:
        raise AttnscopeError(f"lora={str(path)!r}: a pickled file ({path.suffix}); attnscope reads LoRA weights from "
                             ".safetensors files only (convert it with safetensors.torch.save_file)")
    if not path.is_file():
        raise AttnscopeError(f"lora={str(path)!r}: no such file; expected a local LoRA .safetensors file or a folder "
                             "holding one")
    if path.suffix != ".safetensors":
        raise AttnscopeError(f"lora={str(path)!r}: expected a .safetensors file (LoRA weights in safetensors format)")
    return path.resolve()


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_loras(pipe: Any, loras: list[dict[str, Any]]) -> Any:
    """Load each of ``loras`` (from :func:`_lora_files`) into ``pipe`` with ``load_lora_weights``, make them all
    active in that order with their scales (``set_adapters``) and remember them on the pipeline (:data:`attnscope.capture.LORA_SOURCES`)."""
    if not loras:
        return pipe
    if not callable(getattr(pipe, "load_lora_weights", None)):
        raise AttnscopeError(f"lora={loras[0]['path']!r}: {type(pipe).__name__} cannot load LoRA weights (it has no "
                             "load_lora_weights); expected a pipeline diffusers loads LoRA into")
    import importlib.util

    import torch
    from safetensors import SafetensorError

    from ..capture import LORA_SOURCES  # where capture reads them from

    if importlib.util.find_spec("peft") is None:
        raise AttnscopeError(f"lora={loras[0]['path']!r}: diffusers loads LoRA weights with peft, which is not "
                             "installed (pip install peft)")
    sources = list(getattr(pipe, LORA_SOURCES, []))
    for spec in loras:
        file, before = Path(spec["path"]), _lora_names(pipe)
        try:
            with quiet_loading(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # peft may draw an init it then overwrites; it warns on a second adapter, which lora=[a, b] asks for
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=spec["adapter_name"],
                                       use_safetensors=True, local_files_only=True)
        except (ValueError, RuntimeError, KeyError, OSError, TypeError, AttributeError, SafetensorError) as exc:
            said = " ".join(str(exc).split())
            said = said if len(said) <= 300 else said[:300] + " …"  # e.g. every size mismatch of a LoRA for another model
            raise AttnscopeError(f"lora={str(file)!r}: cannot load it into the {type(pipe).__name__}: "
                                 f"{type(exc).__name__}: {said}") from exc
        added = sorted(_lora_names(pipe) - before)
        name = spec["adapter_name"] or (added[0] if len(added) == 1 else None)
        if name is None or name not in _lora_names(pipe):
            raise AttnscopeError(f"lora={str(file)!r}: loaded no LoRA layer into the {type(pipe).__name__} (are its "
                                 "keys for another model?)")
        sources.append({**spec, "adapter_name": name})
    try:  # loading activates only the adapter loaded last: all of them run, in the order given, with their scales
        pipe.set_adapters([s["adapter_name"] for s in sources], adapter_weights=[s["scale"] for s in sources])
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise AttnscopeError(f"lora={[s['path'] for s in sources]!r}: cannot set their scales with set_adapters: "
                             f"{type(exc).__name__}: {exc}") from exc
    setattr(pipe, LORA_SOURCES, sources)
    return pipe


def _lora_layers(pipe: Any) -> list[Any]:
    """Every peft LoRA layer of ``pipe``'s model components."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()
            if isinstance(m, BaseTunerLayer)]


def _lora_names(pipe: Any) -> set[str]:
    return {name for layer in _lora_layers(pipe) for name in getattr(layer, "scaling", {})}


def _check_complete(pipe: Any, model: Any) -> None:
    """Refuse a pipeline whose weight files lack tensors its configs need (diffusers leaves them unloaded, on
    the ``meta`` device, and the first generation fails far from the cause)."""
    import torch

    for name, component in getattr(pipe, "components", {}).items():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.named_parameters(), *component.named_buffers()]
            missing = [key for key, tensor in tensors if tensor.is_meta]
            if missing:
                raise AttnscopeError(f"model={str(model)!r}: the {name} weights lack {len(missing)} tensor(s) its "
                                     f"config needs: {', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}")


def _to_device(pipe: Any, device: str | None) -> Any:
    """``pipe`` moved to ``device``; a device this torch cannot use is one error naming it.

    >>> _to_device(object(), "nonsense")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: device='nonsense': not a device this torch can use (Expected one of cpu, cuda, ...
    """
    if device is None:
        return pipe
    import torch

    try:
        target = torch.device(device)
        torch.empty(0, device=target)  # a CUDA device on a CPU-only build, or one that is not there, fails here
    except (RuntimeError, AssertionError) as exc:
        raise AttnscopeError(f"device={device!r}: not a device this torch can use ({str(exc).splitlines()[0]}); "
                             f"torch {torch.__version__} sees {torch.cuda.device_count()} CUDA device(s)") from None
    return pipe.to(target)


def _own_pipeline_class(path: Path) -> Any:
    """The class to load a saved directory with: attnscope's own pipeline class when ``model_index.json`` names
    one (a saved copy of the shapes model), else diffusers' ``DiffusionPipeline`` (which reads the class itself)."""
    import importlib.util
    import json

    import diffusers
    from diffusers import DiffusionPipeline

    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AttnscopeError(f"model={str(path)!r}: cannot read its model_index.json ({exc}); expected the JSON "
                             "that save_pretrained writes") from exc
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        raise AttnscopeError(f"model={str(path)!r}: its model_index.json names no pipeline class (got "
                             f"{name!r} for '_class_name'); expected the JSON that save_pretrained writes")
    if name == "ShapesPipeline":
        from .shapes import ShapesPipeline

        return ShapesPipeline
    cls = getattr(diffusers, name, None)  # what DiffusionPipeline.from_pretrained looks the name up in
    if type(cls).__name__ == "DummyObject":  # diffusers' stand-in for a pipeline whose libraries are not installed
        needs = [lib for lib in getattr(cls, "_backends", []) if importlib.util.find_spec(lib) is None]
        raise AttnscopeError(f"model={str(path)!r}: its pipeline class {name!r} needs libraries that are not "
                             f"installed: {', '.join(needs) or ', '.join(getattr(cls, '_backends', []))}")
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise AttnscopeError(f"model={str(path)!r}: its model_index.json names {name!r} for '_class_name', which is not "
                             f"a pipeline class of diffusers {diffusers.__version__}; expected a diffusers pipeline class "
                             "such as 'StableDiffusionPipeline' (a pipeline saved with a newer diffusers needs that version)")
    return DiffusionPipeline

"""``load_pipeline``: the embedded model, a local diffusers directory or a cached hub id, never the network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import AttnscopeError
from ..selection import DTYPES
from ._compat import quiet_loading

__all__ = ["load_pipeline"]

_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weight files that only torch.load (pickle) reads


def load_pipeline(model: str | Path, *, device: str | None = None, dtype: str | None = None) -> Any:
    """Load a diffusers pipeline from a local directory or the local Hugging Face cache, never the network.

    Parameters
    ----------
    model : str or Path
        ``"shapes"`` (the embedded model, see docs/shapes-model.md), a directory saved with
        ``pipe.save_pretrained``, or a hub id already in the local cache.
    device : str, optional
        ``"cpu"``, ``"cuda"``, … (default: leave where loaded).
    dtype : {"float32", "float16", "bfloat16"}, optional

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
    if str(model) == "shapes":
        with quiet_loading():  # importing diffusers' SD pipeline module is what prints transformers' note
            from .shapes import load_shapes_pipeline

        return _to_device(load_shapes_pipeline(dtype=kwargs.get("torch_dtype")), device)
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
    pipe = _to_device(pipe, device)
    pipe.set_progress_bar_config(disable=None)
    return pipe


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

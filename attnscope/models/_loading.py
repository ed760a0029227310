"""``load_pipeline``: the embedded model, a local diffusers directory or a cached hub id, never the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AttnscopeError
from ..selection import DTYPES
from ._compat import quiet_loading

__all__ = ["load_pipeline"]


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

    dtypes = {name: getattr(torch, name) for name in DTYPES}
    if dtype is not None and dtype not in dtypes:
        raise AttnscopeError(f"dtype={dtype!r}: expected one of {', '.join(dtypes)}")
    kwargs: dict[str, Any] = {"local_files_only": True}
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
    if path.exists() and not (path / "model_index.json").is_file():
        raise AttnscopeError(f"model={str(model)!r}: directory has no model_index.json (expected a diffusers pipeline saved with save_pretrained)")
    cls = _own_pipeline_class(path) if path.exists() else DiffusionPipeline
    try:
        # some models draw their init from torch's global RNG while loading (PixArt, Sana): the caller's stays as it was
        with quiet_loading(), torch.random.fork_rng(devices=[]):
            pipe = cls.from_pretrained(str(model), **kwargs)
    except (OSError, ValueError) as exc:
        raise AttnscopeError(
            f"model={str(model)!r}: not a local diffusers directory and not in the local Hugging Face cache "
            f"(this machine cannot download models): {exc}"
        ) from exc
    pipe = _to_device(pipe, device)
    pipe.set_progress_bar_config(disable=None)
    return pipe


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
    import json

    from diffusers import DiffusionPipeline

    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AttnscopeError(f"model={str(path)!r}: cannot read its model_index.json ({exc}); expected the JSON "
                             "that save_pretrained writes") from exc
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name == "ShapesPipeline":
        from .shapes import ShapesPipeline

        return ShapesPipeline
    return DiffusionPipeline

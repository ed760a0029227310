"""A rerun's pipeline must apply its adapters as the trace's did: LoRA settings and textual-inversion tokens, which
the weights fingerprint does not see (``model.adapters`` in the manifest, recorded by capture)."""

from __future__ import annotations

from typing import Any

from ..capture import adapter_state
from ..errors import AttnscopeError

__all__ = ["check_adapters", "recorded_lora_sources"]

#: what to call for each LoRA setting that differs
_LORA_FIX = {"adapters": "pipe.set_adapters(names, adapter_weights=...) (or fuse_lora(lora_scale=...))",
             "active": "pipe.set_adapters(names) with the names in the same order",
             "disabled": "pipe.enable_lora() / pipe.disable_lora()",
             "merged": "pipe.fuse_lora() / pipe.unfuse_lora()", "layers": "pipe.load_lora_weights(...)",
             "digest": "pipe.set_adapters(names, adapter_weights=...) with the same per-block weights"}


def check_adapters(pipe: Any, manifest: dict[str, Any], where: str) -> None:
    """Refuse ``pipe`` when it applies LoRA otherwise than the trace's pipeline did (other adapters, scales, active
    or disabled adapters, fused or not) or lacks (or adds) textual-inversion tokens: the image would differ while the
    weights check passes (a LoRA's scale is no weight). Traces captured before ``model.adapters`` was recorded are
    not checked.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> check_adapters(pipe, {"model": {"adapters": {"lora": {}, "textual_inversion": {}}}}, "a.zarr")
    >>> check_adapters(pipe, {"model": {"adapters": {"lora": {}, "textual_inversion": {"tokenizer": ["<tok>"]}}}},
    ...                "a.zarr")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: cannot rerun trace 'a.zarr': it was captured with the textual-inversion token(s) '<tok>' in tokenizer, which this pipeline lacks; ...
    """
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    recorded = model.get("adapters")
    if recorded is None and "adapters" not in model:
        return
    if not (isinstance(recorded, dict) and isinstance(recorded.get("lora"), dict)
            and isinstance(recorded.get("textual_inversion"), dict)):
        raise AttnscopeError(f"trace {where!r}: adapters={recorded!r} in its manifest's model; expected an object with "
                             f"'lora' and 'textual_inversion' (the store is damaged or crafted)")
    current = adapter_state(pipe)
    _check_tokens(recorded["textual_inversion"], current["textual_inversion"], where)
    _check_lora(recorded["lora"], current["lora"], where)


def recorded_lora_sources(manifest: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The LoRA files the trace's pipeline was loaded with (``model.adapters.lora_sources``, written when
    ``load_pipeline(..., lora=)`` loaded them), to load again with ``load_pipeline(ref, lora=...)``: each
    ``{"path", "sha256", "adapter_name", "scale"}``. None recorded: ``[]``; a malformed entry is one error.

    >>> recorded_lora_sources({"model": {"adapters": {"lora": {}, "textual_inversion": {}}}}, "a.zarr")
    []
    >>> recorded_lora_sources({"model": {"adapters": {"lora_sources": [{"path": 3}]}}}, "a.zarr")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: trace 'a.zarr': lora_sources=[{'path': 3}] in its manifest's model.adapters; ...
    """
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    adapters = model.get("adapters") if isinstance(model.get("adapters"), dict) else {}
    sources = adapters.get("lora_sources", [])
    keys = {"path": str, "sha256": str, "adapter_name": str, "scale": (int, float)}
    if not (isinstance(sources, list) and all(isinstance(s, dict) and set(s) == set(keys) and all(
            isinstance(s[k], t) and not isinstance(s[k], bool) for k, t in keys.items()) for s in sources)):
        raise AttnscopeError(f"trace {where!r}: lora_sources={sources!r} in its manifest's model.adapters; expected "
                             f"a list of objects with 'path', 'sha256', 'adapter_name' and 'scale' (the store is "
                             f"damaged or crafted)")
    return sources


def _check_tokens(recorded: dict[str, Any], current: dict[str, list[str]], where: str) -> None:
    for name in sorted(set(recorded) | set(current)):
        want, have = set(recorded.get(name) or ()), set(current.get(name) or ())
        if want - have:
            missing = ", ".join(map(repr, sorted(want - have)))
            raise AttnscopeError(f"cannot rerun trace {where!r}: it was captured with the textual-inversion token(s) "
                                 f"{missing} in {name}, which this pipeline lacks; load the same embedding with "
                                 f"pipe.load_textual_inversion(..., token=...) and pass pipe=")
        if have - want:
            extra = ", ".join(map(repr, sorted(have - want)))
            raise AttnscopeError(f"cannot rerun trace {where!r}: this pipeline's {name} has the textual-inversion "
                                 f"token(s) {extra}, which the trace's had not; rerun on a pipeline without them "
                                 f"(pipe.unload_textual_inversion())")


def _check_lora(recorded: dict[str, Any], current: dict[str, dict[str, Any]], where: str) -> None:
    for name in sorted(set(recorded) | set(current)):
        want, have = recorded.get(name), current.get(name)
        if want is None or have is None:
            said = ("captured with LoRA layers in {0}, which this pipeline has none of; load the same LoRA "
                    "(pipe.load_lora_weights(...)) with the same settings and pass pipe= (or load the model and "
                    "its LoRA files with attnscope.load_pipeline(model, lora=[...]) for the capture: a rerun "
                    "without pipe= then loads them again)" if have is None else
                    "captured without LoRA in {0}, which this pipeline has LoRA layers in; rerun on a pipeline "
                    "without them (pipe.unload_lora_weights())").format(name)
            raise AttnscopeError(f"cannot rerun trace {where!r}: it was {said}")
        differ = [key for key in _LORA_FIX if want.get(key) != have.get(key)]
        if differ:
            key = differ[0]
            raise AttnscopeError(
                f"cannot rerun trace {where!r}: the LoRA of {name} is applied otherwise than when it was captured "
                f"({key}: trace {want.get(key)!r}, this pipeline {have.get(key)!r}; a LoRA's scale, active adapters "
                f"and fusion change the image but no weight); set it as it was with {_LORA_FIX[key]}")

"""What adapters loaded into a pipeline change without being a weight of it: LoRA settings, textual-inversion tokens
and IP-Adapter scales.

The weights fingerprint (``attnscope.store.weights_fingerprint``) sees a LoRA's matrices and a textual inversion's
embedding rows, but not how a LoRA is applied: ``pipe.set_adapters(..., adapter_weights=...)``, ``disable_lora()``,
``fuse_lora(lora_scale=...)`` change the image and no weight (a fused LoRA's sum is written into the base weights, which the fingerprint
sees, but a rerun's error should say why they differ). Capture records them as the manifest's ``model.adapters``; a
rerun compares them with its pipeline's (``attnscope.rerun._adapters``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import torch

from ..hooks import added_tokens

__all__ = ["LORA_SOURCES", "adapter_state", "ip_adapter_state", "lora_sources", "lora_state", "textual_inversion_tokens"]

#: the pipeline attribute where ``attnscope.load_pipeline(..., lora=)`` keeps the LoRA files it loaded (models writes
#: it, capture reads it into the manifest's ``model.adapters.lora_sources``)
LORA_SOURCES = "_attnscope_lora_sources"

#: significant digits a LoRA scale is recorded with: diffusers scales a LoRA for a call (``cross_attention_kwargs=
#: {"scale": s}``) by multiplying and dividing again, which may leave the last bit of the scale changed
_DIGITS = 6


def adapter_state(pipe: Any) -> dict[str, Any]:
    """``{"lora": lora_state(pipe), "textual_inversion": textual_inversion_tokens(pipe)}``, and ``"ip_adapter":
    ip_adapter_state(pipe)`` where an IP-Adapter is loaded, ``"lora_sources": lora_sources(pipe)`` where
    ``load_pipeline(..., lora=)`` loaded LoRA files.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> adapter_state(tiny_sd_pipeline())
    {'lora': {}, 'textual_inversion': {}}
    """
    state = {"lora": lora_state(pipe), "textual_inversion": textual_inversion_tokens(pipe)}
    ip_adapter, sources = ip_adapter_state(pipe), lora_sources(pipe, state["lora"])
    return {**state, **({"ip_adapter": ip_adapter} if ip_adapter else {}),
            **({"lora_sources": sources} if sources else {})}


def lora_sources(pipe: Any, lora: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The LoRA files ``attnscope.load_pipeline(..., lora=)`` loaded into ``pipe``, in loading order, each as
    ``{"path": absolute path, "sha256", "adapter_name", "scale"}``; those whose adapter is no longer in any component
    (``pipe.unload_lora_weights()``, ``delete_adapters``) are left out. ``lora``: :func:`lora_state` of ``pipe``.
    A rerun that loads the model loads them again (a scale set otherwise afterwards is refused by its check).

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> lora_sources(tiny_sd_pipeline())
    []
    """
    recorded = pipe.__dict__.get(LORA_SOURCES) if hasattr(pipe, "__dict__") else None
    if not recorded:
        return []
    present = {name for component in (lora_state(pipe) if lora is None else lora).values()
               for name in component["adapters"]}
    return [dict(source) for source in recorded if source.get("adapter_name") in present]


def ip_adapter_state(pipe: Any) -> dict[str, dict[str, Any]]:
    """Per pipeline component with IP-Adapter processors (``pipe.load_ip_adapter(...)``): their settings, which are no
    weight. ``scales``: the distinct per-processor scales (one per loaded adapter, as ``set_ip_adapter_scale`` set
    them, to 6 significant digits; per-block scales give several), ``tokens`` (the image tokens of each adapter),
    ``processors`` and ``digest`` (SHA-256 over each processor's path and scales). Components without are left out;
    while attnscope's hooks are installed the processors they wrap are read.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> ip_adapter_state(tiny_sd_pipeline())
    {}
    """
    state: dict[str, dict[str, Any]] = {}
    for name, component in pipe.components.items():
        rows = _ip_adapter_rows(component) if isinstance(component, torch.nn.Module) else []
        if rows:
            distinct = sorted({json.dumps(scales) for _, scales, _ in rows})
            state[name] = {"scales": [json.loads(s) for s in distinct], "tokens": rows[0][2], "processors": len(rows),
                           "digest": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()}
    return state


def _ip_adapter_rows(component: torch.nn.Module) -> list[list[Any]]:
    """``[path, scales, tokens]`` of each IP-Adapter processor in ``component`` (the original under an attnscope
    hook, which keeps it as ``.original``)."""
    rows = []
    for path, module in component.named_modules():
        processor = module.__dict__.get("processor", module._modules.get("processor"))
        processor = getattr(processor, "original", processor)
        if "IPAdapter" in type(processor).__name__:
            scales = [[_rounded(v) for v in s] if isinstance(s, (list, tuple)) else _rounded(s)
                      for s in getattr(processor, "scale", [])]
            rows.append([path, scales, list(getattr(processor, "num_tokens", []))])
    return rows


def lora_state(pipe: Any) -> dict[str, dict[str, Any]]:
    """Per pipeline component holding LoRA (peft) layers: how they are applied. ``adapters``: each adapter's scales
    (the distinct ``scaling`` values of its layers: ``lora_alpha / r`` times the weight ``set_adapters`` or
    ``fuse_lora(lora_scale=)`` gave it, to 6 significant digits), ``active`` (the adapters the layers run, in the
    order ``set_adapters`` named them: a layer adds their products to its output in that order, and another order
    may change the last bits of the maps and the image),
    ``disabled`` (``disable_lora()``), ``merged`` (fused into the base weights: ``fuse_lora()``) and ``digest``
    (SHA-256 over every layer's settings: per-block weights that differ layer by layer). Components without LoRA
    layers are left out."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # no peft imported: no LoRA layer can exist
    if tuners is None:
        return {}
    state: dict[str, dict[str, Any]] = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        layers = [(path, m) for path, m in component.named_modules() if isinstance(m, tuners.BaseTunerLayer)]
        if layers:
            state[name] = _component_lora(layers)
    return state


def _component_lora(layers: list[tuple[str, Any]]) -> dict[str, Any]:
    scales: dict[str, set[float]] = {}
    active: list[str] = []  # in the order the layers sum them (the first layer's, then any a later layer adds)
    merged: set[str] = set()
    disabled: set[bool] = set()
    rows = []
    for path, layer in layers:
        scaling = {k: _rounded(v) for k, v in sorted(getattr(layer, "scaling", {}).items())}
        for adapter, value in scaling.items():
            scales.setdefault(adapter, set()).add(value)
        on, fused, off = list(layer.active_adapters), sorted(layer.merged_adapters), bool(layer.disable_adapters)
        active.extend(name for name in on if name not in active)
        merged.update(fused)
        disabled.add(off)
        rows.append([path, on, fused, off, scaling])
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return {"adapters": {k: sorted(v) for k, v in sorted(scales.items())}, "active": active,
            "disabled": sorted(disabled) if len(disabled) > 1 else disabled.pop(), "merged": sorted(merged),
            "layers": len(layers), "digest": digest}


def _rounded(value: Any) -> Any:
    """A LoRA scale to :data:`_DIGITS` significant digits (a tensor or another object: its string).

    >>> _rounded(0.30000000000000004), _rounded(2)
    (0.3, 2.0)
    """
    try:
        return float(f"{float(value):.{_DIGITS}g}")
    except (TypeError, ValueError):
        return str(value)


def textual_inversion_tokens(pipe: Any) -> dict[str, list[str]]:
    """Per tokenizer of the pipeline (``tokenizer``, ``tokenizer_2``, …), the tokens added to it that are not special
    tokens: textual inversion's (``pipe.load_textual_inversion(..., token="<tok>")`` adds ``<tok>``, and
    ``<tok>_1``, … for an embedding of several vectors). Tokenizers without such tokens are left out.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> pipe.load_textual_inversion(torch.zeros(2, 32), token="<tok>")
    >>> textual_inversion_tokens(pipe)
    {'tokenizer': ['<tok>', '<tok>_1']}
    """
    found: dict[str, list[str]] = {}
    for name, component in pipe.components.items():
        added = added_tokens(component) if name.startswith("tokenizer") else set()
        if added:
            found[name] = sorted(added)
    return found


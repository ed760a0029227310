"""Choosing sites, steps and the sample of a trace, or a variable of a statistics Dataset, with clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xarray as xr

from .. import stats  # noqa: F401  (registers DataArray.attn)
from ..errors import AttnscopeError
from ..selection import run_steps, select_captured_steps, select_site_names
from ..store import crop_region
from ..tokens import prompt_text, token_roles, word_alignment

__all__ = ["crop_box", "cropped_generation", "in_crop_box", "dataset_variable", "default_targets", "forward_order", "sample_index",
           "sample_prompt", "sample_roles", "sample_tokens", "token_positions", "select_label", "site_maps", "site_names"]


def site_names(trace: Any, sites: Any) -> list[str]:
    """The trace's sites chosen by ``sites``: ``None`` (all), a name or glob, a list of them, or a predicate on each
    site's stored description (as capture's: ``lambda site: site.block == "up"``)."""
    described = {n: trace.site_description(n) for n in trace.sites} if callable(sites) else None
    return select_site_names(sites, trace.sites, described)


def crop_box(trace: Any) -> tuple[int, int, int, int] | None:
    """The box ``(x1, y1, x2, y2)`` (image pixels, x2 and y2 exclusive) that an inpainting run with
    ``padding_mask_crop`` generated and pasted back into its image (manifest ``run.crop_region``, checked by
    :func:`attnscope.store.crop_region`), or None: a run without the crop, or a trace written before capture recorded
    the box.

    >>> from types import SimpleNamespace as Run
    >>> crop_box(Run(manifest={"run": {"height": 64, "width": 64, "crop_region": [8, 4, 40, 36]}}))
    (8, 4, 40, 36)
    >>> crop_box(Run(manifest={"run": {"height": 64, "width": 64}})) is None
    True
    """
    manifest = getattr(trace, "manifest", None)
    return crop_region(manifest.get("run") if isinstance(manifest, dict) else None)


def in_crop_box(maps: Any, box: tuple[int, int, int, int], size: tuple[int, int]) -> Any:
    """``maps`` (last two axes ``y, x``, a float array) upsampled bilinearly to the crop ``box`` and pasted at its
    place in an image of ``size`` ``(height, width)``, NaN (no map, drawn transparent) outside the box.

    >>> import numpy as np
    >>> out = in_crop_box(np.array([[0.0, 1.0], [0.0, 0.0]]), (2, 0, 6, 4), (4, 8))
    >>> np.argwhere(out == out[np.isfinite(out)].max()).tolist(), bool(np.isnan(out[:, :2]).all())
    ([[0, 5]], True)
    """
    import numpy as np

    from ..stats import upsample_maps

    x1, y1, x2, y2 = box
    inside = upsample_maps(np.asarray(maps), (y2 - y1, x2 - x1))
    canvas = np.full((*inside.shape[:-2], *size), np.nan, dtype=inside.dtype)
    canvas[..., y1:y2, x1:x2] = inside
    return canvas


def cropped_generation(trace: Any) -> str | None:
    """Why the trace's maps are not aligned with its images, or None when they are.

    An inpainting run with ``padding_mask_crop`` generates only a crop around the mask (at ``height`` × ``width``)
    and pastes it back into the whole image: its maps cover that crop. Capture records the crop's box
    (:func:`crop_box`) and the figures draw the maps inside it; a trace written before that lacks the box, so a
    map stretched over the stored image lands in the wrong place.

    >>> from types import SimpleNamespace as Run
    >>> print(cropped_generation(Run(manifest={"run": {"pipeline_kwargs": {"padding_mask_crop": 4}, "height": 64,
    ...                                                 "width": 64, "generated_size": [32, 32]}})))
    the maps cover the crop around the mask that the pipeline generated (padding_mask_crop=4, at 32 × 32 px) and pasted back into the 64 × 64 px image, not the whole image, and the trace does not record the crop's box (run.crop_region; captured before attnscope recorded it): heat maps drawn over the image are not aligned with it
    >>> cropped_generation(Run(manifest={"run": {"pipeline_kwargs": {"padding_mask_crop": 4}, "height": 64,
    ...                                          "width": 64, "crop_region": [0, 0, 32, 32]}})) is None
    True
    >>> cropped_generation(Run(manifest={"run": {"pipeline_kwargs": {}}})) is None
    True
    """
    manifest = getattr(trace, "manifest", None)
    run = manifest.get("run") if isinstance(manifest, dict) else None
    kwargs = run.get("pipeline_kwargs") if isinstance(run, dict) else None
    pad = kwargs.get("padding_mask_crop") if isinstance(kwargs, dict) else None
    if pad is None or run.get("crop_region") is not None:
        return None
    height, width = run.get("height"), run.get("width")
    generated = run.get("generated_size") or [height, width]
    return (f"the maps cover the crop around the mask that the pipeline generated (padding_mask_crop={pad!r}, at "
            f"{generated[0]} × {generated[1]} px) and pasted back into the {height} × {width} px image, not the whole "
            f"image, and the trace does not record the crop's box (run.crop_region; captured before attnscope "
            f"recorded it): heat maps drawn over the image are not aligned with it")


def forward_order(trace: Any, names: Sequence[str]) -> list[str]:
    """``names`` in the order the forward pass runs them (a UNet's down, mid, up), by each site's stored ``depth``;
    as given when a site does not say (traces written before sites carried it)."""
    depths = [trace.attention(name).attrs.get("site", {}).get("depth") for name in names]
    if any(not isinstance(d, int) for d in depths):
        return list(names)
    return [name for _, name in sorted(zip(depths, names), key=lambda pair: pair[0])]


def sample_index(trace: Any, sample: Any) -> int:
    """Position of ``sample`` on the trace's sample axis (an error listing the samples if absent)."""
    samples = trace.coords["sample"].values.tolist()
    if isinstance(sample, bool) or sample not in samples:
        raise AttnscopeError(f"sample={sample!r} is not in this trace; its samples are {samples}")
    return samples.index(sample)


def sample_tokens(trace: Any, sample: Any) -> list[str]:
    """Token strings of ``sample``'s prompt."""
    return [str(t) for t in trace.coords["token_text"].values[sample_index(trace, sample)].tolist()]


def sample_prompt(trace: Any, sample: Any) -> str:
    """The prompt of ``sample`` as given to the run (the manifest's ``run.prompts``, by the ``prompt_index``
    coordinate); spelled from its tokens when the manifest does not hold it (a prompt given as embeddings).
    The tokens lose what the tokenizer rewrote (accents, emoji, case), so the manifest's text comes first."""
    position = sample_index(trace, sample)
    run = trace.manifest.get("run") if isinstance(trace.manifest, dict) else None
    prompts = run.get("prompts") if isinstance(run, dict) else None
    if isinstance(prompts, list) and "prompt_index" in trace.coords:
        index = int(trace.coords["prompt_index"].values[position])
        if 0 <= index < len(prompts) and isinstance(prompts[index], str):
            return prompts[index]
    return prompt_text(sample_tokens(trace, sample), sample_roles(trace, sample))


def token_positions(trace: Any) -> list[int]:
    """The positions the trace's token axis holds (its ``token`` coordinate: ``0…k, 77…m`` on SD3 with
    ``tokens="prompt"``), which int targets name."""
    if "token" in trace.coords:
        return [int(p) for p in trace.coords["token"].values.tolist()]
    return list(range(len(trace.coords["token_text"].values[0])))


def sample_roles(trace: Any, sample: Any) -> list[str] | None:
    """Roles of ``sample``'s tokens as stored (None for traces without the ``token_role`` coordinate)."""
    if "token_role" not in trace.coords:
        return None
    return [str(t) for t in trace.coords["token_role"].values[sample_index(trace, sample)].tolist()]


def site_maps(trace: Any, site: str, steps: Any, sample: Any) -> xr.DataArray:
    """``trace.attention(site)`` of one sample at the chosen steps, lazily (steps ``None``: every captured step)."""
    sample_index(trace, sample)
    da = trace.attention(site).sel(sample=sample)
    if steps is None:
        return da
    return da.sel(step=select_captured_steps(steps, da["step"].values.tolist(), run_steps(trace, [da]), site))


def default_targets(tokens: Sequence[str], roles: Sequence[str] | None = None) -> tuple[list[str | int], list[str]]:
    """Targets and labels for every prompt word plus SOT and EOT.

    >>> default_targets(["<|startoftext|>", "a</w>", "red</w>", "a</w>", "<|endoftext|>", "<|endoftext|>"])
    ([0, 'a', 'red', 4], ['<SOT>', 'a', 'red', '<EOT>'])
    """
    roles = token_roles(tokens, roles)
    words: list[str | int] = list(word_alignment(tokens, roles))
    targets, labels = list(words), [str(w) for w in words]
    if "sot" in roles:
        targets.insert(0, roles.index("sot"))
        labels.insert(0, "<SOT>")
    if "eot" in roles:
        targets.append(roles.index("eot"))
        labels.append("<EOT>")
    return targets, labels


def dataset_variable(data: Any, variable: str, needs: Sequence[str], what: str) -> xr.DataArray:
    """``data[variable]`` after checking it is a Dataset holding that variable with dims ``needs``."""
    if not isinstance(data, xr.Dataset):
        raise AttnscopeError(f"{what}: got {type(data).__name__}, expected an xarray.Dataset from attnscope.stats")
    if variable not in data.data_vars:
        raise AttnscopeError(f"{what}: the Dataset has no variable {variable!r}; "
                             f"its variables are {list(data.data_vars)}")
    da = data[variable]
    missing = [d for d in needs if d not in da.dims]
    if missing:
        raise AttnscopeError(f"{what}: variable {variable!r} has dims {list(da.dims)}, "
                             f"expected {list(needs)} among them")
    return da


def select_label(da: xr.DataArray, dim: str, value: Any, what: str) -> xr.DataArray:
    """``da.sel({dim: value})``; ``what`` (the user's argument, e.g. ``"sample=3"``) opens the error listing the labels.

    A dim without a coordinate is labelled by position.
    """
    labels = da[dim].values.tolist()  # 0..n-1 when the dim has no coordinate
    values = value if isinstance(value, (list, tuple)) else [value]
    missing = [v for v in values if isinstance(v, bool) or v not in labels]
    if missing:
        raise AttnscopeError(f"{what}: {missing} not in the Dataset's {dim!r} labels {labels}")
    return da.sel({dim: value}) if dim in da.coords else da.isel({dim: value})

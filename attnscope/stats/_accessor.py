"""The ``.attn`` accessor: word maps, reductions, upsampling and normalisation of attention DataArrays.

Importing this module registers ``DataArray.attn``. It works on arrays shaped like
``trace.attention(site)`` — dims ``("step", "sample", "head", "y", "x", "token")`` or any subset — and
stays lazy on dask-backed arrays: only the ``token_text`` coordinate is read (to find the words).
Results are float32 (float64 stays float64); names and attributes are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..errors import AttnscopeError
from ..tokens import resolve_targets
from ._upsample import image_size, upsample_maps

__all__ = ["AttentionAccessor"]

REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = ("max", "sum", "minmax")


def _floating(da: xr.DataArray) -> xr.DataArray:
    """``da`` as float32 unless it is float64 already (float16 sums lose too much)."""
    return da if da.dtype in (np.float32, np.float64) else da.astype(np.float32)


def _require_dims(da: xr.DataArray, dims: Sequence[str], what: str) -> None:
    missing = [d for d in dims if d not in da.dims]
    if missing:
        raise AttnscopeError(f"{what}: dims {missing} are not in this DataArray; its dims are {list(da.dims)}")


def _one_sample(da: xr.DataArray, sample: Any) -> xr.DataArray:
    """``da`` at ``sample`` (a ``sample`` coordinate value; an index where there is none), its ``sample`` dim dropped
    as ``.sel`` drops it; ``da`` itself when ``sample`` is None."""
    if sample is None:
        return da
    if "sample" not in da.dims:
        kept = da.coords["sample"].values.tolist() if "sample" in da.coords else None
        if kept is not None and not isinstance(sample, bool) and sample == kept:
            return da  # already this sample's maps (da.sel(sample=k))
        raise AttnscopeError(f"sample={sample!r}: this DataArray has no sample dim"
                             f"{f' (it holds sample {kept!r})' if kept is not None else ''}; its dims are {list(da.dims)}")
    found = da["sample"].values.tolist()  # 0..n-1 when there is no sample coordinate
    if isinstance(sample, bool) or sample not in found:
        raise AttnscopeError(f"sample={sample!r} is not in this DataArray; its samples are {found}")
    return da.sel(sample=sample) if "sample" in da.coords else da.isel(sample=sample)


def _token_texts(da: xr.DataArray, coord: str = "token_text") -> list[str] | None:
    """Token strings along ``da``'s token axis, taken from the ``token_text`` coordinate (``coord="token_role"``:
    their roles, None where the array has none); samples with different prompts are an error."""
    if coord not in da.coords:  # no text: resolve_targets then accepts positions only
        return [""] * da.sizes["token"] if coord == "token_text" else None
    text = da.coords[coord]
    if "sample" in text.dims:
        rows = [[str(t) for t in row] for row in text.transpose("sample", "token").values.tolist()]
        if any(row != rows[0] for row in rows[1:]):
            raise AttnscopeError("samples have different prompts (token_text differs): pass sample= to choose "
                                 "one, or select one sample first")
        text = text.isel(sample=0)
    return [str(t) for t in text.values.tolist()]


@xr.register_dataarray_accessor("attn")
class AttentionAccessor:
    """Domain methods on attention DataArrays, available as ``da.attn`` once attnscope is imported.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
    >>> da = tr.attention(tr.sites[0])
    >>> dict(da.attn.heatmap(["circle", "square"], size=(32, 32)).sizes)
    {'sample': 1, 'y': 32, 'x': 32, 'word': 2}
    """

    def __init__(self, da: xr.DataArray):
        self._da = da

    def words(self, targets: Sequence[str | int] | str | int, sample: Any = None) -> xr.DataArray:
        """Replace the ``token`` dim by a ``word`` dim: each target's map summed over its token positions.

        >>> import tempfile, attnscope as ats
        >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
        ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
        >>> w = tr.attention(tr.sites[0]).attn.words(["circle", "blue square", 0])
        >>> w.dims, w["word"].values.tolist()
        (('step', 'sample', 'head', 'y', 'x', 'word'), ['circle', 'blue square', '0'])
        >>> tr.attention(tr.sites[0]).attn.words("circle", sample=0).dims   # one sample: no sample dim
        ('step', 'head', 'y', 'x', 'word')

        Parameters
        ----------
        targets : str, int or sequence of them
            Words, phrases (``"blue square"``: all their pieces) or token positions, as in
            :func:`attnscope.tokens.resolve_targets`; a word occurring twice sums both occurrences.
        sample : optional
            Take this sample only (a ``sample`` coordinate value), its words found in its own prompt;
            the result has no ``sample`` dim, as ``da.sel(sample=k)``. By default every sample, their
            words found in the first sample's prompt: an error if the samples have different prompts.

        Returns
        -------
        xarray.DataArray
            Same dims with ``token`` replaced in place by ``word`` (labels as given; ints become
            strings; ``sample`` dropped when one is chosen); coordinates along ``token`` are dropped.
        """
        _require_dims(self._da, ["token"], f"words({targets!r})")
        da = _one_sample(self._da, sample)
        tokens, roles = _token_texts(da), _token_texts(da, "token_role")
        positions = da["token"].values.tolist() if "token" in da.coords else list(range(len(tokens)))
        # resolve on a list indexed by token position, so a token axis that was subset still aligns
        by_position = [""] * (max(positions) + 1 if positions else 0)
        roles_by_position = ["pad"] * len(by_position) if roles is not None else None
        for i, (pos, text) in enumerate(zip(positions, tokens)):
            by_position[pos] = text
            if roles_by_position is not None:
                roles_by_position[pos] = roles[i]
        resolved = resolve_targets(by_position, targets, roles_by_position)
        index = {pos: i for i, pos in enumerate(positions)}
        for label, wanted in resolved.items():
            absent = [p for p in wanted if p not in index]
            if absent:
                raise AttnscopeError(f"target {label!r}: token positions {absent} are not on this DataArray's token "
                                     f"axis (positions {positions[0]}..{positions[-1]})")
        data = _floating(da)
        # skipna=False: a NaN map (a gated step) stays NaN, so means over steps leave it out instead of counting 0
        maps = [data.isel(token=[index[p] for p in wanted]).sum("token", keep_attrs=True, skipna=False)
                for wanted in resolved.values()]
        labels = xr.Variable("word", np.array(list(resolved), dtype=object))  # object: variable-length strings in Zarr
        out = xr.concat(maps, dim=labels, coords="minimal", compat="override", join="override",
                        combine_attrs="override")
        order = [("word" if d == "token" else d) for d in da.dims]
        return out.transpose(*order).rename(da.name)

    def aggregate(self, over: Sequence[str] | str = ("step", "head"), how: str = "mean") -> xr.DataArray:
        """Reduce the named dims with ``how`` (``"mean"``, ``"sum"`` or ``"max"``; NaNs skipped).

        >>> import tempfile, attnscope as ats
        >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0,
        ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
        >>> tr.attention(tr.sites[0]).attn.aggregate(["step", "head", "sample"], how="max").dims
        ('y', 'x', 'token')

        Parameters
        ----------
        over : str or sequence of str
            Dims to reduce; each must exist (the error lists the dims that do).
        how : {"mean", "sum", "max"}
        """
        dims = [over] if isinstance(over, str) else list(over)
        if how not in REDUCTIONS:
            raise AttnscopeError(f"how={how!r}: expected one of {', '.join(map(repr, REDUCTIONS))}")
        _require_dims(self._da, dims, f"aggregate(over={over!r})")
        data = _floating(self._da)
        return getattr(data, how)(dim=dims, keep_attrs=True)

    def upsample(self, size: Any) -> xr.DataArray:
        """Resize the ``(y, x)`` maps bilinearly to ``size`` (``torch`` ``interpolate``, ``align_corners=False``).

        >>> import tempfile, attnscope as ats
        >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0,
        ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
        >>> da = tr.attention(tr.sites[1])  # a 4x4 site
        >>> dict(da.attn.upsample(tr).sizes), dict(da.attn.upsample((8, 12)).sizes)["x"]
        ({'step': 2, 'sample': 1, 'head': 1, 'y': 32, 'x': 32, 'token': 16}, 12)

        Parameters
        ----------
        size : (int, int), PIL image or Trace
            Target ``(height, width)``; an image or a trace gives its image size.

        Returns
        -------
        xarray.DataArray
            Same dims in the same order; ``y``/``x`` coordinates become pixel indices; other
            coordinates along ``y`` or ``x`` are dropped.
        """
        height, width = image_size(size)
        da = self._da
        _require_dims(da, ["y", "x"], "upsample")
        data = _floating(da).drop_vars([c for c in da.coords if {"y", "x"} & set(da.coords[c].dims)])
        if data.chunks is not None:
            data = data.chunk({"y": -1, "x": -1})
        out = xr.apply_ufunc(
            upsample_maps, data, kwargs={"size": (height, width)},
            input_core_dims=[["y", "x"]], output_core_dims=[["y", "x"]], exclude_dims={"y", "x"},
            dask="parallelized", output_dtypes=[data.dtype],
            dask_gufunc_kwargs={"output_sizes": {"y": height, "x": width}}, keep_attrs=True,
        )
        return out.transpose(*da.dims).assign_coords(y=np.arange(height), x=np.arange(width))

    def normalize(self, how: str = "max") -> xr.DataArray:
        """Scale each ``(y, x)`` map: by its max, by its sum, or to ``[0, 1]`` (``"minmax"``).

        Zero-safe: a map whose max (sum, range) is 0 comes out as zeros, not NaN.

        >>> import xarray as xr, attnscope
        >>> da = xr.DataArray([[1.0, 4.0], [3.0, 0.0]], dims=("y", "x"))
        >>> da.attn.normalize("minmax").values.tolist(), da.attn.normalize("sum").values.tolist()
        ([[0.25, 1.0], [0.75, 0.0]], [[0.125, 0.5], [0.375, 0.0]])

        Parameters
        ----------
        how : {"max", "sum", "minmax"}
        """
        if how not in NORMALIZATIONS:
            raise AttnscopeError(f"how={how!r}: expected one of {', '.join(map(repr, NORMALIZATIONS))}")
        _require_dims(self._da, ["y", "x"], f"normalize(how={how!r})")
        data = _floating(self._da)
        if how == "minmax":
            data = data - data.min(dim=["y", "x"])
        scale = data.sum(dim=["y", "x"]) if how == "sum" else data.max(dim=["y", "x"])
        with xr.set_options(keep_attrs=True):
            return data / scale.where(scale != 0, 1)

    def heatmap(self, targets: Sequence[str | int] | str | int, size: Any,
                over: Sequence[str] | str = ("step", "head"), norm: str = "minmax", sample: Any = None) -> xr.DataArray:
        """Word heat maps at image size: :meth:`words`, :meth:`aggregate` (mean), :meth:`upsample`, :meth:`normalize`.

        >>> import tempfile, attnscope as ats
        >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0,
        ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
        >>> hm = tr.attention(tr.sites[0]).attn.heatmap("circle", size=tr.images[0])
        >>> dict(hm.sizes), float(hm.max()), float(hm.min())
        ({'sample': 1, 'y': 32, 'x': 32, 'word': 1}, 1.0, 0.0)

        Parameters
        ----------
        targets : str, int or sequence of them
            See :meth:`words`.
        size : (int, int), PIL image or Trace
            See :meth:`upsample`.
        over : str or sequence of str
            Dims averaged before upsampling.
        norm : {"minmax", "max", "sum"}
            See :meth:`normalize`; ``"minmax"`` is DAAM's convention.
        sample : optional
            See :meth:`words`: the one sample to draw (no ``sample`` dim in the result); needed when the
            samples' prompts differ.
        """
        return self.words(targets, sample=sample).attn.aggregate(over, "mean").attn.upsample(size).attn.normalize(norm)

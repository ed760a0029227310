"""Reading a trace store: ``open_trace`` and the lazy :class:`Trace`."""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnscopeError, AttnscopeWarning
from ..tokens import token_roles, word_alignment
from ._format import (
    BRANCH_ARRAYS,
    FORMAT_VERSION,
    GATED_STEPS_ATTR,
    NAN_MAPS_ATTR,
    OUTPUT_CHANGE,
    OUTPUT_NORM,
    ROOT_CHUNKS_ATTR,
    ROOT_COORDS,
    RUN_ID_ATTR,
    SUMMARIES_GROUP,
    SUMMARY_DIMS,
    TEXT_MASS_ARRAYS,
    UNCOND_TOKEN_COORDS,
    quiet_consolidated,
    site_group,
)
from ._integrity import (
    GuardedArray,
    check_entries,
    check_layout,
    lost_chunks,
    missing_shards,
    read_key,
    shard_keys,
    shard_problem,
    shard_spec,
    stored_keys,
)
from ._location import access_error, locate, read_root, zarr_store

__all__ = ["Trace", "as_trace", "open_trace"]

_RUN_ID = re.compile(r"[0-9a-f]{32}\Z")


class Trace:
    """A captured generation, read lazily from its Zarr store. Create it with :func:`open_trace`.

    Attributes
    ----------
    path : Path or str
        The store's directory; for a trace opened from a URL other than ``file://``, the URL string
        (``"s3://bucket/run.zarr"``). ``str(tr.path)`` reopens it either way.
    storage_options : dict or None
        The fsspec options it was opened with (URL traces), reused to read its arrays.
    manifest : dict
        Model, scheduler, prompts, seeds, sizes, versions and the capture spec (docs/store-format.md).
    complete : bool
        False while the capture runs, or if it was interrupted.
    steps_written : int
        Every step before this index is on disk for every captured site.
    missing : str
        What reading a site does when a shard of a step on disk is missing or damaged: ``"raise"`` an
        AttnscopeError naming the site and steps, or ``"skip"`` those steps with a warning.
    """

    def __init__(self, path: Path | str, attrs: dict[str, Any], *, storage_options: dict[str, Any] | None = None,
                 missing: str = "raise", nodes: dict[str, dict] | None = None, consolidated: bool = True):
        self.path = path
        self.storage_options = storage_options
        self._attrs = attrs
        self._nodes = nodes or {}
        self.missing = missing
        self.manifest: dict[str, Any] = attrs["manifest"]
        self.complete: bool = bool(attrs.get("complete", False))
        self.steps_written: int = int(attrs.get("steps_written", 0))
        self._lost: dict[str, list[int]] = {}  # array path -> steps whose shards are missing
        self._warned: set[str] = set()
        self._consolidated = consolidated
        self._run_id: str | None = attrs.get(RUN_ID_ATTR)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"incomplete, {self.written}"
        return f"<Trace {str(self.path)!r}: {len(self.sites)} sites, {state}>"

    @property
    def tree(self) -> Any:
        """The whole store as an ``xarray.DataTree`` (lazy, dask-backed). Each access checks that the store is still
        the one this trace was opened from (reads through a tree kept from an earlier access are not checked)."""
        tree = self._tree
        self.check_unchanged()
        return tree

    @functools.cached_property
    def _tree(self) -> Any:
        import xarray as xr

        store = zarr_store(self.path, self.storage_options)
        try:
            with quiet_consolidated():
                tree = xr.open_datatree(store, engine="zarr", chunks={}, consolidated=self.complete and self._consolidated, zarr_format=3)
        except Exception as exc:
            self.check_unchanged()
            if isinstance(self.path, Path):
                raise AttnscopeError(f"{str(self.path)!r}: cannot be read as a trace ({type(exc).__name__}: {exc}); "
                                     f"the store is damaged") from exc
            raise access_error(self.path, exc, self.storage_options) from exc
        return tree  # checked by the ``tree`` property, after every access

    def check_unchanged(self) -> None:
        """AttnscopeError when the store at :attr:`path` is no longer the one this trace was opened from (another
        capture replaced it: its root attribute ``run_id`` differs) or is gone. Called after data is read, so
        what was read is known to be this trace's; one small read of the root metadata.

        >>> import tempfile, attnscope as ats
        >>> from attnscope.testing import tiny_sd_pipeline
        >>> d, pipe = tempfile.mkdtemp(), tiny_sd_pipeline()
        >>> kw = dict(seed=0, num_inference_steps=2, height=32, width=32)
        >>> tr = ats.capture(pipe, "a red circle", store=d + "/a.zarr", **kw)
        >>> tr.check_unchanged()
        >>> _ = ats.capture(pipe, "a red circle", store=d + "/a.zarr", overwrite=True, **kw)
        >>> tr.check_unchanged()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        attnscope.errors.AttnscopeError: '.../a.zarr' was overwritten (by another capture) since this Trace was opened: ...
        """
        raw = read_root(self.path, self.storage_options)
        same = raw is not None and (f'"{self._run_id}"'.encode() in raw if self._run_id is not None
                                    else f'"{RUN_ID_ATTR}"'.encode() not in raw)
        if not same:
            what = "removed" if raw is None else "overwritten (by another capture)"
            raise AttnscopeError(f"{str(self.path)!r} was {what} since this Trace was opened: its data are no longer "
                                 f"this trace's; reopen it with ats.open_trace({str(self.path)!r})")

    @property
    def num_steps(self) -> int:
        """Denoising steps of the run (the length of the ``step`` axis); ``steps_written`` of them are on disk."""
        return int(self._nodes["step"]["shape"][0])

    @property
    def written(self) -> str:
        """How much of the run is on disk, in words: ``"3 of 5 steps written"``, or for a run whose every step is
        written but which did not finish (its images and the completion mark are missing) ``"all 5 steps written,
        the run did not finish"``.

        >>> import tempfile, attnscope as ats
        >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
        ...                  num_inference_steps=2)
        >>> tr.written
        'all 2 steps written'
        """
        n = self.num_steps
        if self.steps_written < n:
            return f"{self.steps_written} of {n} steps written"
        return f"all {n} steps written" + ("" if self.complete else ", the run did not finish")

    @property
    def nan_maps(self) -> dict[str, list[int]]:
        """Site → steps where the model itself produced NaN attention (NaN weights or an overflow), as recorded
        by the capture; gated steps (:attr:`gated_steps`) are not among them. ``{}`` when none, and for traces
        written before this was recorded."""
        found = self._attrs.get(NAN_MAPS_ATTR, {})
        if not (isinstance(found, dict) and all(isinstance(v, list) and all(isinstance(s, int) for s in v)
                                                for v in found.values())):
            raise AttnscopeError(f"{str(self.path)!r}: root attribute {NAN_MAPS_ATTR!r} is {str(found)[:80]}, "
                                 f"expected an object of site -> list of steps")
        return {str(k): list(v) for k, v in found.items()}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, AttnscopeWarning, stacklevel=4)

    @functools.cached_property
    def coords(self) -> dict[str, Any]:
        """The trace's coordinates — ``step``, ``sample``, ``token``, ``timestep``, ``prompt_index``,
        ``image_index``, ``token_text``, ``token_role`` (and ``token_text_uncond``, ``token_role_uncond``: the
        negative prompts' text, when the uncond branch was recorded) — as in-memory DataArrays, read once straight
        from Zarr.

        >>> import tempfile, attnscope as ats
        >>> from attnscope.testing import tiny_sd_pipeline
        >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
        ...                  num_inference_steps=2, height=32, width=32)
        >>> tr.coords["step"].values.tolist(), tr.coords["token_text"].dims
        ([0, 1], ('sample', 'token'))
        """
        import xarray as xr

        out = {}
        for name in ("step", "sample", "token", *ROOT_COORDS, *UNCOND_TOKEN_COORDS.values()):
            meta = self._nodes.get(name)
            if not meta or meta.get("node_type") != "array":
                continue
            self._check_root_chunks(name, f"coordinate {name!r}")
            try:
                values = np.asarray(self._group[name][...])
            except Exception as exc:
                self.check_unchanged()
                raise AttnscopeError(f"{str(self.path)!r}: coordinate {name!r} cannot be read ({type(exc).__name__}: "
                                     f"{exc}); the trace is damaged") from exc
            dims = tuple(meta.get("dimension_names") or ())
            out[name] = xr.DataArray(values, dims=dims, name=name)
        self.check_unchanged()
        for name in ("step", "sample", "token"):  # index coordinates carry themselves, as xarray's own
            if name in out:
                _check_index(str(self.path), name, out[name].values)
                out[name] = out[name].assign_coords({name: out[name].variable})
        return out

    @property
    def sites(self) -> list[str]:
        """Module paths of the recorded sites, in model order."""
        return list(self._attrs["sites"])

    def site_description(self, site: str | Any) -> dict[str, Any]:
        """The stored description of a recorded site (name, family, kind, block, level, depth, heads, …), read from its
        metadata without opening its arrays: what a ``sites=`` predicate sees of it after capture.

        >>> import tempfile, attnscope as ats
        >>> from attnscope.testing import tiny_sd_pipeline
        >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
        ...                  num_inference_steps=2, height=32, width=32)
        >>> d = tr.site_description(tr.sites[0])
        >>> d["name"] == tr.sites[0], d["kind"], d["block"]
        (True, 'cross', 'down')
        """
        name = getattr(site, "name", site)
        if name not in self.sites:
            raise AttnscopeError(f"site {name!r} is not in this trace; recorded sites:\n  " + "\n  ".join(self.sites))
        return dict(self._nodes.get(site_group(name), {}).get("attributes", {}).get("site", {}))

    @property
    def tokens(self) -> list[str]:
        """Text tokens of the first prompt as the model saw them, one per position on the token axis.

        For several prompts see ``manifest["run"]["tokens"]`` or the ``token_text`` coordinate.
        """
        texts = self.coords["token_text"].values
        return [str(t) for t in texts[0]] if len(texts) else []

    @property
    def token_roles(self) -> list[str]:
        """Role of each position of :attr:`tokens` (:data:`attnscope.tokens.ROLES`): ``"word"`` for the prompt's
        words, ``"instruction"`` for text the pipeline added around them (Sana, Flux.2), ``"sot"``, ``"eot"``, ``"pad"``.

        Stored by the capture (the ``token_role`` coordinate); read from the strings for traces that have none.
        """
        if "token_role" in self.coords and len(self.coords["token_role"].values):
            return [str(r) for r in self.coords["token_role"].values[0]]
        return token_roles(self.tokens)

    @property
    def words(self) -> dict[str, list[int]]:
        """Word → indices along the token axis of the first prompt (word pieces merged; SOT/EOT/padding left out).

        The indices suit ``isel(token=...)``; they equal the text positions (the ``token``
        coordinate) unless the trace kept a subset of non-leading positions (SD3 with
        ``tokens="prompt"``: CLIP 0…k, then T5 77…m).
        """
        return word_alignment(self.tokens, self.token_roles)

    @property
    def timesteps(self) -> np.ndarray:
        """Timestep of every denoising step of the run: the scheduler's plan, written when the capture starts and
        corrected at any step where the run deviated, so steps an interrupted run never reached hold their planned
        timestep (NaN only where the plan was unknown and the step was not reached)."""
        return self.coords["timestep"].values

    @property
    def gated_steps(self) -> list[int]:
        """Steps at which an intervention bypassed the recorded sites' attention (e.g. TGATE's cache).

        Their maps are NaN in the store. ``[]`` when none, and for traces written before this was
        recorded.
        """
        steps = self._attrs.get(GATED_STEPS_ATTR, [])
        if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise AttnscopeError(f"{str(self.path)!r}: root attribute {GATED_STEPS_ATTR!r} is {steps!r}, expected a list of ints")
        return list(steps)

    def output_change(self) -> Any:
        """Per-step norms of each site's attention output and of its change, or None if not recorded.

        Recorded with ``ats.capture(..., output_change=True)``. ``O_t`` is a site's output at step
        ``t`` averaged over the two guidance halves (the rows as they are without guidance); norms
        are Frobenius over positions and channels. Only captured steps are included.

        Returns
        -------
        xarray.Dataset or None
            ``output_norm`` = ``‖O_t‖`` and ``output_change`` = ``‖O_t − O_{t−1}‖`` (the previous
            captured step), float32 with dims ``(step, site, sample)``; NaN at gated steps, and
            ``output_change`` is NaN at the first captured step and right after a gated one.
            ``attrs["gated_steps"]`` lists the gated steps.

        Examples
        --------
        >>> import tempfile, attnscope as ats
        >>> from attnscope.testing import tiny_sd_pipeline
        >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
        ...                  num_inference_steps=3, height=32, width=32, output_change=True)
        >>> ds = tr.output_change()
        >>> dict(ds.output_change.sizes), bool(ds.output_change.isel(step=0).isnull().all())
        ({'step': 3, 'site': 7, 'sample': 1}, True)
        """
        if SUMMARIES_GROUP not in self._nodes:  # most traces: no need to open the DataTree
            return None
        node = self.tree[SUMMARIES_GROUP]
        missing = [v for v in (OUTPUT_NORM, OUTPUT_CHANGE) if v not in node.data_vars]
        if missing:
            raise AttnscopeError(f"{str(self.path)!r}: group {SUMMARIES_GROUP!r} lacks {missing}")
        for name in ("site", OUTPUT_NORM, OUTPUT_CHANGE):  # a lost chunk would read as NaN norms or "" site labels
            path = f"{SUMMARIES_GROUP}/{name}"
            codecs = self._nodes.get(path, {}).get("codecs") or []
            if any(isinstance(c, dict) and c.get("name") == "crc32c" for c in codecs):  # every chunk stored since then
                if not self.complete and self._root_chunks_lost(path):  # the run stopped, or is, while it wrote them
                    return None
                self._check_root_chunks(path, "the output summaries")
        try:  # a few numbers per step and site: read now, so a damaged chunk is one clear error here
            ds = node.to_dataset(inherit=False)[[OUTPUT_NORM, OUTPUT_CHANGE]].load()
        except Exception as exc:
            self.check_unchanged()
            raise AttnscopeError(f"{str(self.path)!r}: the output summaries cannot be read ({type(exc).__name__}: "
                                 f"{exc}); the trace is damaged") from exc
        self.check_unchanged()
        ds = ds.assign_coords(step=self.coords["step"].values, sample=self.coords["sample"].values,
                              site=[str(s) for s in ds["site"].values],
                              timestep=("step", np.asarray(self.coords["timestep"].values, dtype=float)))
        captured = self.manifest.get("capture", {}).get("steps")
        if isinstance(captured, list):
            ds = ds.sel(step=[int(s) for s in captured if self.complete or int(s) < self.steps_written])
        ds.attrs[GATED_STEPS_ATTR] = self.gated_steps
        return ds.transpose(*SUMMARY_DIMS)

    @property
    def images(self) -> list[Any]:
        """The generated images as PIL images (empty if the capture did not finish)."""
        from PIL import Image

        if "images" not in self._nodes:
            return []
        if not self.complete and self._root_chunks_lost("images"):  # the run stopped, or is, while it wrote them
            return []
        self._check_root_chunks("images", "the stored images")
        try:
            pixels = np.asarray(self._group["images"][...])
        except Exception as exc:
            self.check_unchanged()
            raise AttnscopeError(f"{str(self.path)!r}: the stored images cannot be decoded ({type(exc).__name__}: "
                                 f"{exc}); the trace is damaged") from exc
        self.check_unchanged()
        return [Image.fromarray(np.asarray(a)) for a in pixels]

    def attention(self, site: str | Any, branch: str | None = None) -> Any:
        """Cross-attention probabilities of ``site`` as a lazy ``xarray.DataArray``.

        Dims ``(step, sample, head, y, x, token)``; only captured steps that are on disk are
        included. ``branch`` is ``"cond"`` or ``"uncond"`` (default: cond when captured). The uncond array's
        ``token_text`` and ``token_role`` are its negative prompt's (``""`` and ``"pad"`` where no text encoder
        ran for it: negative embeddings given, or SDXL's zeros); traces written before 2026-12-05 label it
        with the prompt's.

        Examples
        --------
        >>> import tempfile, attnscope as ats
        >>> from attnscope.testing import tiny_sd_pipeline
        >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
        ...                  num_inference_steps=2, height=32, width=48)
        >>> da = tr.attention("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
        >>> dict(da.sizes)
        {'step': 2, 'sample': 1, 'head': 1, 'y': 16, 'x': 24, 'token': 77}
        """
        return self._site_array(site, branch, BRANCH_ARRAYS)

    def text_mass(self, site: str | Any, branch: str | None = None) -> Any:
        """A joint site's per-pixel attention mass on all text keys, lazy, dims ``(step, sample, head, y, x)``.

        At a joint site (SD3, Flux) :meth:`attention` holds the image-query × text-key block of the
        model's softmax over image *and* text keys, so a pixel's row sums to its text mass, not to 1;
        ``attention(site) / text_mass(site)`` renormalises it over the text (padding included).
        Cross-attention sites have no text mass (it is 1 by construction): AttnscopeError.
        """
        return self._site_array(site, branch, TEXT_MASS_ARRAYS)

    def _site_array(self, site: str | Any, branch: str | None, arrays: dict[str, str]) -> Any:
        name = getattr(site, "name", site)
        if name not in self.sites:
            raise AttnscopeError(f"site {name!r} is not in this trace; recorded sites:\n  " + "\n  ".join(self.sites))
        group = site_group(name)
        node_attrs = self._nodes.get(group, {}).get("attributes", {})
        branches = [b for b, arr in arrays.items() if f"{group}/{arr}" in self._nodes]
        if not branches and arrays is TEXT_MASS_ARRAYS:
            kind = node_attrs.get("site", {}).get("kind", "cross")
            raise AttnscopeError(f"site {name!r} is a {kind!r} site: only joint sites (SD3, Flux, Flux.2) store a text mass")
        if not branches:
            raise AttnscopeError(f"{str(self.path)!r}: site {name!r} has no {' or '.join(arrays.values())} array in the "
                                 f"store (its metadata is damaged)")
        if branch is None:
            branch = "cond" if "cond" in branches else branches[0]
        if branch not in branches:
            raise AttnscopeError(f"branch={branch!r}: this trace recorded {branches} at {name}")
        steps = [int(s) for s in node_attrs.get("steps", []) if self.complete or int(s) < self.steps_written]
        if not steps:
            raise AttnscopeError(f"{str(self.path)!r}: no step of site {name!r} is written yet (the trace is "
                                 f"incomplete: {self.written})"
                                 if not self.complete else f"{str(self.path)!r}: site {name!r} captured no step")
        path = f"{group}/{arrays[branch]}"
        lost = self._lost_steps(path, steps)
        if lost:
            self.check_unchanged()
            message = (f"{str(self.path)!r}: site {name!r} ({arrays[branch]}): the shards of steps {lost} are missing "
                       f"from the store although {'the trace is complete' if self.complete else 'they were written'}")
            if self.missing != "skip":
                raise AttnscopeError(message + "; open_trace(..., missing='skip') reads the other steps")
            self._warn_once(path, message + "; those steps are left out")
            steps = [s for s in steps if s not in lost]
        nan = [s for s in self.nan_maps.get(name, []) if s in steps]
        if nan:
            self._warn_once(f"nan:{name}", f"{str(self.path)!r}: the model produced NaN attention at site {name!r}, "
                                           f"steps {nan} (recorded at capture; NaN weights or an overflow): statistics "
                                           f"over these steps are NaN and the image is likely blank")
        import xarray as xr

        meta = self._nodes[path]
        dims = tuple(meta["dimension_names"])
        uncond_names = set(UNCOND_TOKEN_COORDS.values())
        coords = {c: v for c, v in self.coords.items() if set(v.dims) <= set(dims) and c not in uncond_names}
        if branch == "uncond":  # the uncond rows read the negative prompt: its text, where the trace stored it
            coords.update({key: self.coords[stored].rename(key) for key, stored in UNCOND_TOKEN_COORDS.items()
                           if key in coords and stored in self.coords})
        attrs = {**meta.get("attributes", {}), "site": self.site_description(name),  # branch; family, kind, …
                 "tokens": self.manifest.get("capture", {}).get("tokens", "all"),  # "prompt": the token axis was cut
                 "run_steps": self.manifest.get("run", {}).get("num_steps")}  # the run's steps, captured or not
        da = xr.DataArray(self._guarded(path, name), dims=dims, coords=coords, name=arrays[branch], attrs=attrs)
        return da.isel(step=steps)

    def _check_root_chunks(self, name: str, what: str) -> None:
        """A root array whose writer stored every chunk must have them all: one lost would read as zeros or NaN."""
        lost = self._root_chunks_lost(name)
        if lost:
            self.check_unchanged()
            raise AttnscopeError(f"{str(self.path)!r}: {what} lost {len(lost)} chunk(s) ({', '.join(lost[:3])}"
                                 f"{', …' if len(lost) > 3 else ''} of array {name!r}); the trace is damaged")

    def _root_chunks_lost(self, name: str) -> list[str]:
        """Keys of root array ``name``'s chunks missing from the store, where its writer stored them all, else []."""
        if self._attrs.get(ROOT_CHUNKS_ATTR) is not True:
            return []
        return lost_chunks(self._nodes[name], stored_keys(self.path, name, self.storage_options))

    def _lost_steps(self, path: str, steps: list[int]) -> list[int]:
        """Steps among ``steps`` whose shard of array ``path`` is not in the store (listed once per array)."""
        if path not in self._lost:
            meta = self._nodes.get(path)
            stored = stored_keys(self.path, path, self.storage_options) if meta else set()
            self._lost[path] = missing_shards(meta, steps, stored) if meta else []
        return self._lost[path]

    @functools.cached_property
    def _group(self) -> Any:
        """The root Zarr group, opened from the metadata the layout check read (consolidated when complete)."""
        import zarr

        with quiet_consolidated():
            return zarr.open_group(zarr_store(self.path, self.storage_options), mode="r", zarr_format=3,
                                   use_consolidated=self.complete and self._consolidated)

    def _guarded(self, path: str, site: str) -> Any:
        """Array ``path``'s data as a dask array (one block per shard) read through :class:`GuardedArray` (errors
        name the site and steps)."""
        import dask.array

        meta = self._nodes[path]
        shard, chunks, checksum = shard_spec(meta)

        def inspect(step: int) -> str | None:
            for key in shard_keys(meta, step // shard[0]):
                problem = shard_problem(read_key(self.path, f"{path}/{key}", self.storage_options), chunks, checksum)
                if problem:
                    return problem
            return None

        array = self._group[path]
        captured = self._nodes[site_group(site)].get("attributes", {}).get("steps", [])
        uncaptured = set(range(self.num_steps)) - set(captured)  # never written: NaN (the fill value) by design
        expected = set(self.gated_steps) | set(self.nan_maps.get(site, [])) | uncaptured
        guard = GuardedArray(array, f"{str(self.path)!r}: site {site!r} ({path.rsplit('/', 1)[1]})", inspect, expected,
                             self.check_unchanged)
        return dask.array.from_array(guard, chunks=shard, asarray=False, fancy=False, lock=False,
                                     meta=np.empty((0,) * guard.ndim, dtype=guard.dtype),  # else dask reads a block for it
                                     name=f"attnscope-{abs(hash((str(self.path), self._run_id, path, self.steps_written)))}")


def open_trace(path: str | Path, *, storage_options: dict[str, Any] | None = None, missing: str = "raise") -> Trace:
    """Open a trace store lazily; no attention map is read until asked for.

    Parameters
    ----------
    path : str or Path
        A local directory, a ``file://`` URL, or any fsspec URL (``s3://bucket/run.zarr``; S3 needs
        ``pip install 'attnscope[s3]'``). Remote stores are read through zarr's ``FsspecStore``.
    storage_options : dict, optional
        Passed to fsspec for a URL: credentials, ``{"client_kwargs": {"endpoint_url": …}}``, … Without
        them the backend's own environment configuration applies (``AWS_ENDPOINT_URL``,
        ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``).

    Returns
    -------
    Trace
        ``Trace.path`` is a ``Path`` for a local trace (``file://`` included), the URL string otherwise.

    A trace is untrusted input: every array's shape, dtype, dimensions and chunking are checked against
    the sizes its manifest declares before anything is read, and each block of maps is read through a
    guard, so a crafted or damaged store is one AttnscopeError (docs/store-format.md, "Integrity").
    An incomplete trace (the capture was interrupted) opens with an :class:`AttnscopeWarning` saying how
    many steps were written.

    Raises AttnscopeError when ``path`` is not a trace, was written by a newer format or claims a format
    below 1, does not match its manifest, when a URL's scheme is unknown or its fsspec backend is not
    installed, and when its endpoint cannot be reached.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> d = tempfile.mkdtemp() + "/a.zarr"
    >>> _ = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=d, num_inference_steps=2, height=32, width=32)
    >>> tr = ats.open_trace(d)
    >>> tr.tokens[:4], tr.words["circle"]
    (['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>'], [3])
    >>> ats.open_trace("file://" + d).path == tr.path
    True
    """
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise AttnscopeError(f"path={path!r}: expected the path or URL of a trace store (a str or Path)")
    p = locate(path)
    where = str(p)
    raw = read_root(p, storage_options)
    if raw is None:
        meta = p / "zarr.json" if isinstance(p, Path) else f"{p}/zarr.json"
        raise AttnscopeError(f"{where!r} is not an attnscope trace: no Zarr group there (expected {meta})")
    if isinstance(p, Path):
        check_entries(p)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AttnscopeError(f"{where!r} is not an attnscope trace: unreadable zarr.json "
                             f"({'nested too deeply' if isinstance(exc, RecursionError) else exc})") from None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    fmt = attrs.get("attnscope_format") if isinstance(attrs, dict) else None
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise AttnscopeError(f"{where!r} is not an attnscope trace: no integer 'attnscope_format' attribute")
    if fmt < 1:
        raise AttnscopeError(f"{where!r} claims trace format {fmt}; formats start at 1 (this attnscope reads 1 to "
                             f"{FORMAT_VERSION}): the store is damaged or was not written by attnscope")
    needed = attrs.get("format_min_reader", fmt)
    if not isinstance(needed, int) or isinstance(needed, bool):
        raise AttnscopeError(f"{where!r}: its 'format_min_reader' attribute is {needed!r}; expected an int")
    if fmt > FORMAT_VERSION or needed > FORMAT_VERSION:
        why = (f"has trace format {fmt}" if fmt > FORMAT_VERSION else
               f"needs a reader of format {needed} or later (its 'format_min_reader')")
        raise AttnscopeError(f"{where!r} {why}; this attnscope reads formats up to {FORMAT_VERSION} — upgrade attnscope")
    run_id = attrs.get(RUN_ID_ATTR)
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.match(run_id)):
        raise AttnscopeError(f"{where!r}: root attribute {RUN_ID_ATTR!r} is {str(run_id)[:80]!r}, expected 32 lowercase "
                             f"hex digits; the store is damaged or crafted")
    if missing not in ("raise", "skip"):
        raise AttnscopeError(f"missing={missing!r}: expected 'raise' or 'skip'")
    if "manifest" not in attrs and "sites" not in attrs and attrs.get("complete") is False:
        raise AttnscopeError(f"{where!r} is a trace whose capture stopped while it was setting up the store, or is "
                             f"still doing so (being written or interrupted during its first step): nothing is "
                             f"recorded yet; wait for a running capture, or capture it again with overwrite=True")
    if not isinstance(attrs.get("manifest"), dict) or not isinstance(attrs.get("sites"), list):
        raise AttnscopeError(f"{where!r}: trace attributes 'manifest' (object) and 'sites' (list) are missing or malformed")
    parts = [key for key in ("capture", "run", "model") if not isinstance(attrs["manifest"].get(key, {}), dict)]
    if parts:
        raise AttnscopeError(f"{where!r}: manifest entries {parts} are not objects; the store is damaged or crafted")
    consolidated = doc.get("consolidated_metadata")
    consolidated = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    use_consolidated = bool(attrs.get("complete")) and isinstance(consolidated, dict)
    nodes = consolidated if use_consolidated else _node_metadata(p, storage_options)
    try:
        check_layout(where, attrs, nodes)
    except AttnscopeError:
        raise
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as exc:  # metadata of an unexpected shape
        raise AttnscopeError(f"{where!r}: its metadata is damaged or crafted ({type(exc).__name__}: {exc})") from None
    absent = [name for name in ("step", "timestep", "token_text") if name not in nodes]
    if absent:
        raise AttnscopeError(f"{where!r}: the root arrays {absent} are missing; the store is damaged or crafted")
    trace = Trace(p, attrs, storage_options=storage_options, missing=missing, nodes=nodes, consolidated=use_consolidated)
    if not trace.complete:
        warnings.warn(f"trace {where!r} is incomplete: {trace.written} (the "
                      f"capture was interrupted or is still running); maps, statistics and plots cover only those steps",
                      AttnscopeWarning, stacklevel=2)
    return trace


def _check_index(where: str, name: str, values: np.ndarray) -> None:
    """AttnscopeError unless an index coordinate holds what the writer writes: ``step`` and ``sample`` count 0 … n−1
    (statistics select steps and samples by these labels: a crafted ``step`` of ``[2, 1, 0]`` would make
    ``steps=0`` read the last step), ``token`` the text positions, increasing from 0 or more.

    >>> _check_index("a.zarr", "step", np.array([2, 1, 0]))
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: 'a.zarr': coordinate 'step' holds [2, 1, 0], expected 0 … 2 in order; the store is damaged or crafted
    """
    values = np.asarray(values)
    if name == "token":
        ok = values.ndim == 1 and (values.size == 0 or (int(values[0]) >= 0 and bool(np.all(np.diff(values) > 0))))
        expected = "text positions increasing from 0 or more"
    else:
        ok = values.ndim == 1 and np.array_equal(values, np.arange(values.size))
        expected = f"0 … {values.size - 1} in order"
    if not ok:
        shown = values.ravel()[:8].tolist()
        raise AttnscopeError(f"{where!r}: coordinate {name!r} holds {str(shown)[:-1]}{', …' if values.size > 8 else ''}], "
                             f"expected {expected}; the store is damaged or crafted")


def _lists(value: Any) -> Any:
    """Metadata as ``zarr.json`` holds it: tuples as lists, recursively."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _node_metadata(where: Path | str, storage_options: dict[str, Any] | None) -> dict[str, dict]:
    """Path -> ``zarr.json`` metadata of every node below the root, read node by node (no consolidated metadata)."""
    import zarr

    try:
        group = zarr.open_group(zarr_store(where, storage_options), mode="r", zarr_format=3, use_consolidated=False)
        return {path: _lists(node.metadata.to_dict()) for path, node in group.members(max_depth=None)}
    except Exception as exc:
        if isinstance(where, Path):
            raise AttnscopeError(f"{str(where)!r}: its Zarr metadata cannot be read ({type(exc).__name__}: {exc}); "
                                 f"the store is damaged") from exc
        raise access_error(where, exc, storage_options) from exc


def as_trace(trace: Trace | str | Path, what: str = "trace") -> Trace:
    """``trace`` itself, or the trace at that path or URL (:func:`open_trace`); ``what`` names the argument in errors.

    >>> as_trace(42, "a")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: a=42: expected an attnscope Trace or the path or URL of a trace store
    """
    if isinstance(trace, Trace):
        return trace
    if isinstance(trace, (str, Path)):
        return open_trace(trace)
    raise AttnscopeError(f"{what}={trace!r}: expected an attnscope Trace or the path or URL of a trace store")

"""A trace is untrusted input: its layout is checked against its manifest before any array is read, and
every block of maps is read through a guard that turns a missing, truncated or corrupt chunk into an
error naming the site and the steps.

Three checks, in the order a read meets them:

* :func:`check_layout` (at ``open_trace``): every array's shape, dtype, dimension names and chunking
  against the sizes the manifest declares (steps, samples, image size, tokens), within fixed limits, so
  a crafted shape can never make a reader allocate more than the trace says it holds; site names
  are module paths.
* :func:`missing_shards` (the first time a site's maps are asked for): the shards of the steps on
  disk, listed in the store; a shard that is not there would otherwise read back as NaN.
* :class:`GuardedArray` (each block dask reads): decoding errors (the chunks' crc32c checksum, a
  truncated shard) become AttnscopeError naming site and steps; a step that reads back all-NaN is
  checked against its shard's index, which zarr would otherwise treat as empty.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ._format import (
    BRANCH_ARRAYS,
    IMAGE_DIMS,
    SITE_DIMS,
    SITES_GROUP,
    SUMMARIES_GROUP,
    SUMMARY_DIMS,
    TEXT_MASS_ARRAYS,
    TEXT_MASS_DIMS,
)

__all__ = ["LIMITS", "GuardedArray", "check_entries", "check_layout", "check_site_name", "crop_region", "declared_sizes", "lost_chunks",
           "missing_shards", "read_key", "shard_keys", "shard_problem", "shard_spec", "stored_keys"]

#: a diffusers module path: dotted identifiers or indices (``up_blocks.1.attentions.0.transformer_blocks.0.attn2``)
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")
#: the largest sizes a trace may declare; far above any real run, far below an allocation that hangs a machine
LIMITS = {"num_steps": 10_000, "samples": 4_096, "height": 16_384, "width": 16_384, "tokens": 16_384,
          "heads": 1_024}
#: dtype and dimension names of the root arrays (the coordinates, the images)
_ROOT_ARRAYS = {
    "step": ("int64", ("step",)), "timestep": ("float64", ("step",)), "sample": ("int64", ("sample",)),
    "prompt_index": ("int64", ("sample",)), "image_index": ("int64", ("sample",)), "token": ("int64", ("token",)),
    "token_text": ("string", ("sample", "token")), "token_role": ("string", ("sample", "token")),
    "token_text_uncond": ("string", ("sample", "token")), "token_role_uncond": ("string", ("sample", "token")),
    "images": ("uint8", IMAGE_DIMS),
}
_EMPTY = 2**64 - 1  # offset and length of a chunk a shard does not hold


def check_entries(where: Path) -> None:
    """Refuse a local store holding anything but directories and regular files (a FIFO would hang a read,
    a link to a device would read without end) or a link that leads out of the store (a link to ``/`` would
    walk the whole file system, one to another file would be read as a chunk), before anything in it is opened.

    >>> import os, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "zarr.json").write_text("{}") and check_entries(d)
    >>> os.mkfifo(d / "c")
    >>> check_entries(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: '...': 'c' is a named pipe (FIFO), not a regular file; a trace holds only directories and files (the store is damaged or crafted)
    """
    import os
    import stat

    root = os.path.realpath(where)

    def check_inside(path: str) -> None:
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise AttnscopeError(f"{str(where)!r}: {os.path.relpath(path, where)!r} links out of the store (to "
                                 f"{real!r}); a trace holds only its own directories and files (the store is damaged "
                                 f"or crafted)")

    seen: set[str] = set()
    for top, dirs, files in os.walk(where, followlinks=True):
        check_inside(top)
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree: walk each directory once
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            path = os.path.join(top, name)
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                if not (os.path.islink(path) and not os.path.exists(path)):
                    continue  # gone since the listing (or gone and back): a running capture renamed its temporary file
                raise AttnscopeError(f"{str(where)!r}: {os.path.relpath(path, where)!r} is a link to nothing; "
                                     f"the store is damaged") from None
            except OSError as exc:
                raise AttnscopeError(f"{str(where)!r}: {os.path.relpath(path, where)!r} cannot be read ({exc}); "
                                     f"the store is damaged") from None
            if not stat.S_ISREG(mode):
                kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
                raise AttnscopeError(f"{str(where)!r}: {os.path.relpath(path, where)!r} is {kind}, not a regular "
                                     f"file; a trace holds only directories and files (the store is damaged or crafted)")
            if os.path.islink(path):
                check_inside(path)


def check_site_name(name: Any, where: str) -> str:
    """``name`` if it is a module path, else AttnscopeError (a site name becomes a path in the store).

    >>> check_site_name("mid_block.attentions.0.transformer_blocks.0.attn2", "t.zarr")
    'mid_block.attentions.0.transformer_blocks.0.attn2'
    >>> check_site_name("../../../escape", "t.zarr")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: 't.zarr': site name '../../../escape' is not a module path (expected dotted identifiers such as 'up_blocks.1.attentions.0.transformer_blocks.0.attn2')
    """
    if not isinstance(name, str) or not _MODULE_PATH.match(name):
        raise AttnscopeError(f"{where!r}: site name {name!r} is not a module path (expected dotted identifiers "
                             f"such as 'up_blocks.1.attentions.0.transformer_blocks.0.attn2')")
    return name


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def crop_region(run: Any, where: str | None = None) -> tuple[int, int, int, int] | None:
    """The box ``(x1, y1, x2, y2)`` (image pixels, x2 and y2 exclusive) an inpainting run with ``padding_mask_crop``
    generated and pasted back into its image (``run.crop_region`` of a manifest), checked; None where there is none.

    >>> crop_region({"height": 64, "width": 64, "crop_region": [8, 4, 40, 36]}), crop_region({"height": 64})
    ((8, 4, 40, 36), None)
    >>> crop_region({"height": 64, "width": 64, "crop_region": [8, 4, 80, 36]}, "t.zarr")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: 't.zarr': manifest run.crop_region is [8, 4, 80, 36], expected [x1, y1, x2, y2]: ints with 0 ≤ x1 < x2 ≤ 64 (the image's width) and 0 ≤ y1 < y2 ≤ 64 (its height)
    """
    box = run.get("crop_region") if isinstance(run, dict) else None
    if box is None:
        return None
    height, width = run.get("height"), run.get("width")
    sized = _int_in(height, 1, LIMITS["height"]) and _int_in(width, 1, LIMITS["width"])
    if not (sized and isinstance(box, list) and len(box) == 4 and all(_int_in(v, 0, LIMITS["width"]) for v in box)
            and box[0] < box[2] <= width and box[1] < box[3] <= height):
        opening = f"{where!r}: " if where else ""
        raise AttnscopeError(f"{opening}manifest run.crop_region is {box!r}, expected [x1, y1, x2, y2]: ints with "
                             f"0 ≤ x1 < x2 ≤ {width} (the image's width) and 0 ≤ y1 < y2 ≤ {height} (its height)")
    return box[0], box[1], box[2], box[3]


def declared_sizes(where: str, manifest: dict[str, Any], nodes: dict[str, dict] | None = None) -> dict[str, int | None]:
    """Steps, samples and image size the manifest declares (``manifest["run"]``), each checked against :data:`LIMITS`.

    A size the manifest does not hold at all (synthetic traces written with :class:`TraceWriter` directly)
    is taken from the root coordinate's length in ``nodes`` (steps, samples) or left open (image size,
    then bounded by :data:`LIMITS` only); one it holds must be an int within the limits.

    >>> declared_sizes("t.zarr", {"run": {"num_steps": 20, "samples": 1, "height": 64, "width": 64}})
    {'num_steps': 20, 'samples': 1, 'height': 64, 'width': 64}
    >>> declared_sizes("t.zarr", {"run": {"num_steps": 20, "samples": 1, "height": 64, "width": "64"}})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: 't.zarr': manifest run.width is '64', expected an int from 1 to 16384
    """
    run = manifest.get("run", {})
    if not isinstance(run, dict):
        raise AttnscopeError(f"{where!r}: manifest 'run' is {type(run).__name__}, expected an object")
    coords = {"num_steps": "step", "samples": "sample"}
    sizes: dict[str, int | None] = {}
    for key in ("num_steps", "samples", "height", "width"):
        if key in run:
            value, source = run[key], f"manifest run.{key}"
        elif key in coords:
            shape = ((nodes or {}).get(coords[key]) or {}).get("shape")
            value, source = shape[0] if isinstance(shape, list) and len(shape) == 1 else shape, f"array {coords[key]!r}'s length"
        else:
            sizes[key] = None
            continue
        if not _int_in(value, 1, LIMITS[key]):
            raise AttnscopeError(f"{where!r}: {source} is {value!r}, expected an int from 1 to {LIMITS[key]}")
        sizes[key] = value
    generated = run.get("generated_size")  # the pipeline generated at another size and resized its image (binning)
    if generated is not None:
        if not (isinstance(generated, list) and len(generated) == 2 and _int_in(generated[0], 1, LIMITS["height"])
                and _int_in(generated[1], 1, LIMITS["width"])):
            raise AttnscopeError(f"{where!r}: manifest run.generated_size is {generated!r}, expected [height, width]: "
                                 f"ints from 1 to {LIMITS['height']} and {LIMITS['width']}")
        sizes["generated_size"] = tuple(generated)
    crop_region(run, where)  # an inpainting crop's box, where the figures draw its maps
    return sizes


def _expected_arrays(where: str, attrs: dict[str, Any], nodes: dict[str, dict], sizes: dict[str, int],
                     tokens: int) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
    """Path -> (dtype, dims, shape or None where only the dims' sizes are checked) of every array a trace may hold."""
    n, s = sizes["num_steps"], sizes["samples"]
    fixed = {"step": n, "sample": s, "token": tokens, "channel": 3,
             "height": sizes["height"], "width": sizes["width"]}
    expected: dict[str, Any] = {name: (dtype, dims, tuple(fixed[d] for d in dims))
                                for name, (dtype, dims) in _ROOT_ARRAYS.items()}
    if None in expected["images"][2]:  # image size not declared: no larger than the limits
        expected["images"] = ("uint8", IMAGE_DIMS, None)
    for name in attrs["sites"]:
        group = nodes.get(f"{SITES_GROUP}/{name}")
        if group is None or group.get("node_type") != "group":
            raise AttnscopeError(f"{where!r}: site {name!r} is listed in the root attribute 'sites' but the store "
                                 f"has no group {SITES_GROUP}/{name}")
        _check_site_description(where, name, (group.get("attributes") or {}).get("site", {}))
        for arrays, dims in ((BRANCH_ARRAYS, SITE_DIMS), (TEXT_MASS_ARRAYS, TEXT_MASS_DIMS)):
            for array in arrays.values():
                expected[f"{SITES_GROUP}/{name}/{array}"] = ("float16", dims, None)
    n_sites = len(attrs["sites"])
    expected[f"{SUMMARIES_GROUP}/site"] = ("string", ("site",), (n_sites,))
    for array in ("output_norm", "output_change"):
        expected[f"{SUMMARIES_GROUP}/{array}"] = ("float32", SUMMARY_DIMS, (n, n_sites, s))
    return expected


#: the site description's fields readers use, and the JSON types they must have
_SITE_FIELDS = {"name": str, "family": str, "kind": str, "block": str, "level": int, "depth": int, "heads": int,
                "head_dim": int, "token_dim": int}


def _check_site_description(where: str, name: str, description: Any) -> None:
    """A site group's ``site`` attribute: an object whose known fields have their types (absent fields are fine)."""
    bad = not isinstance(description, dict)
    if not bad:
        bad = any(key in description and (not isinstance(description[key], kind) or isinstance(description[key], bool))
                  for key, kind in _SITE_FIELDS.items())
        bad = bad or description.get("kind", "cross") not in ("cross", "joint")
    if bad:
        raise AttnscopeError(f"{where!r}: site {name!r} has the description {str(description)[:80]}, expected an object "
                             f"with {', '.join(f'{k} ({t.__name__})' for k, t in _SITE_FIELDS.items())} and kind "
                             f"'cross' or 'joint'")


def _site_shape_problem(shape: tuple[int, ...], dims: tuple[str, ...], sizes: dict[str, int], tokens: int,
                        heads: Any) -> str | None:
    """Why a site array's shape does not fit the trace, or None: steps, samples and tokens are the trace's, the heads
    1 (averaged) or the site's count, and the map no larger than the image."""
    named = dict(zip(dims, shape))
    want = {"step": sizes["num_steps"], "sample": sizes["samples"], "token": tokens}
    for dim, size in want.items():
        if dim in named and named[dim] != size:
            return f"{dim} has {named[dim]}, the trace declares {size}"
    allowed = {1, heads} if _int_in(heads, 1, LIMITS["heads"]) else {1}
    if named["head"] not in allowed:
        return f"head has {named['head']}, expected {' or '.join(map(str, sorted(allowed)))}"
    high, wide = sizes.get("generated_size") or (sizes["height"] or LIMITS["height"], sizes["width"] or LIMITS["width"])
    if not (1 <= named["y"] <= high and 1 <= named["x"] <= wide):
        return f"the map is {named['y']}×{named['x']}, larger than the {high}×{wide} image"
    return None


def _chunk_problem(meta: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    """Why an array's chunking is not one attnscope writes (chunks no larger than the array, default keys), or None."""
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    shapes = [grid]
    for codec in meta.get("codecs", []):
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            shapes.append(codec.get("configuration", {}).get("chunk_shape"))
    for chunk in shapes:
        if (not isinstance(chunk, list) or len(chunk) != len(shape)
                or not all(_int_in(c, 1, max(d, 1)) for c, d in zip(chunk, shape))):
            return f"chunk shape {chunk} does not fit the array's shape {list(shape)}"
    codecs = _codec_problem(meta.get("codecs"))
    if codecs:
        return codecs
    encoding = meta.get("chunk_key_encoding", {})
    if encoding.get("name") != "default" or encoding.get("configuration", {}).get("separator", "/") != "/":
        return f"chunk key encoding {encoding} (attnscope writes the default, '/'-separated)"
    return None


def _codec_problem(codecs: Any) -> str | None:
    """Why a codec chain (with the sharding codec's inner chains) cannot be decoded here, or None."""
    import zarr
    from zarr.registry import get_codec_class

    if not isinstance(codecs, list) or not codecs:
        return f"codecs {str(codecs)[:80]} (expected a list of codecs)"
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else codec
        if not isinstance(name, str):
            return f"a codec {str(codec)[:80]} with no name"
        try:
            get_codec_class(name)
        except KeyError:
            return f"codec {name[:80]!r}, which zarr {zarr.__version__} cannot decode (unknown, or its plugin is not installed)"
        config = codec.get("configuration") if isinstance(codec, dict) else None
        for inner in ("codecs", "index_codecs"):
            if isinstance(config, dict) and inner in config:
                problem = _codec_problem(config[inner])
                if problem:
                    return problem
    return None


def check_layout(where: str, attrs: dict[str, Any], nodes: dict[str, dict]) -> None:
    """Check every array of a trace against the sizes its manifest declares, before anything is read.

    ``nodes`` maps each node's path to its Zarr v3 metadata (``zarr.json`` as a dict: the root's consolidated
    metadata, or each node's own). Raises AttnscopeError naming the first array that does not fit: an
    unexpected array, a shape, dtype, dimension names or chunking other than the trace declares.

    Examples
    --------
    >>> import json, tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
    ...                  num_inference_steps=2, height=32, width=32)
    >>> root = json.loads((tr.path / "zarr.json").read_text())
    >>> nodes = root["consolidated_metadata"]["metadata"]
    >>> check_layout(str(tr.path), root["attributes"], nodes)
    >>> nodes["images"]["shape"] = [1, 100000, 100000, 3]
    >>> check_layout("a.zarr", root["attributes"], nodes)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: 'a.zarr': array 'images' has shape [1, 100000, 100000, 3], expected [1, 32, 32, 3]; the store does not match its manifest (damaged or crafted)
    """
    sizes = declared_sizes(where, attrs["manifest"], nodes)
    token_meta = nodes.get("token", {})
    token_shape = token_meta.get("shape") if isinstance(token_meta, dict) else None
    if not (isinstance(token_shape, list) and len(token_shape) == 1 and _int_in(token_shape[0], 0, LIMITS["tokens"])):
        raise AttnscopeError(f"{where!r}: array 'token' has shape {token_shape}, expected one axis of at most "
                             f"{LIMITS['tokens']} text positions")
    sites = attrs["sites"]
    for name in sites:
        check_site_name(name, where)
    if len(set(sites)) != len(sites):
        raise AttnscopeError(f"{where!r}: the root attribute 'sites' lists a site twice")
    expected = _expected_arrays(where, attrs, nodes, sizes, token_shape[0])
    for path, meta in nodes.items():
        if not isinstance(meta, dict) or meta.get("node_type") != "array":
            continue
        if path not in expected:
            raise AttnscopeError(f"{where!r}: unexpected array {path!r} (not part of an attnscope trace)")
        dtype, dims, shape = expected[path]
        found = meta.get("shape")
        if not (isinstance(found, list) and len(found) == len(dims) and all(_int_in(d, 0, 2**40) for d in found)):
            raise AttnscopeError(f"{where!r}: array {path!r} has shape {found!r}, expected {len(dims)} sizes")
        problem = None
        if meta.get("data_type") != dtype:
            problem = f"has dtype {meta.get('data_type')!r}, expected {dtype!r}"
        elif tuple(meta.get("dimension_names") or ()) != dims:
            problem = f"has dimensions {meta.get('dimension_names')}, expected {list(dims)}"
        elif shape is not None and tuple(found) != shape:
            problem = f"has shape {found}, expected {list(shape)}"
        elif shape is None and path == "images":
            limits = (sizes["samples"], LIMITS["height"], LIMITS["width"], 3)
            if found[0] != limits[0] or found[3] != 3 or found[1] > limits[1] or found[2] > limits[2]:
                problem = f"has shape {found}, expected [{limits[0]}, ≤{limits[1]}, ≤{limits[2]}, 3]"
        elif shape is None:
            site = nodes[path.rsplit("/", 1)[0]].get("attributes", {}).get("site", {})
            reason = _site_shape_problem(tuple(found), dims, sizes, token_shape[0],
                                         site.get("heads") if isinstance(site, dict) else None)
            problem = f"has shape {found}: {reason}" if reason else None
        if problem is None:
            reason = _chunk_problem(meta, tuple(found))
            problem = f"has {reason}" if reason else None
        if problem:
            raise AttnscopeError(f"{where!r}: array {path!r} {problem}; the store does not match its manifest "
                                 f"(damaged or crafted)")
    _check_steps(where, attrs, nodes, sizes["num_steps"])


def _check_steps(where: str, attrs: dict[str, Any], nodes: dict[str, dict], n: int) -> None:
    """The step lists in the attributes (steps written, gated steps, each site's captured steps) are steps of the run."""
    if not _int_in(attrs.get("steps_written", 0), 0, n):
        raise AttnscopeError(f"{where!r}: root attribute 'steps_written' is {attrs.get('steps_written')!r}, "
                             f"expected an int from 0 to {n}")
    if not isinstance(attrs.get("complete", False), bool):
        raise AttnscopeError(f"{where!r}: root attribute 'complete' is {attrs.get('complete')!r}, expected true or false")
    lists = {"root attribute 'gated_steps'": attrs.get("gated_steps", [])}
    capture = attrs["manifest"].get("capture", {})
    if capture.get("steps") is not None:  # the captured steps (output summaries are read at them)
        lists["manifest capture.steps"] = capture["steps"]
    for name in attrs["sites"]:
        lists[f"site {name!r} attribute 'steps'"] = nodes[f"{SITES_GROUP}/{name}"].get("attributes", {}).get("steps", [])
    for what, steps in lists.items():
        if not (isinstance(steps, list) and all(_int_in(s, 0, n - 1) for s in steps)):
            raise AttnscopeError(f"{where!r}: {what} is {str(steps)[:80]}, expected a list of steps from 0 to {n - 1}")


def shard_problem(raw: bytes | None, chunks: int, checksum: bool = True) -> str | None:
    """What is wrong with a shard's bytes (zarr v3 sharding, index at the end), or None if its index is sound.

    The index is ``chunks`` pairs of little-endian uint64 (offset, length), followed by its crc32c when
    ``checksum``; every chunk must be present (attnscope writes whole shards) and lie inside the shard.

    >>> import google_crc32c, struct
    >>> index = struct.pack("<2Q", 0, 4)
    >>> shard_problem(b"data" + index + struct.pack("<I", google_crc32c.value(index)), 1) is None
    True
    >>> shard_problem(b"data" + index[:5], 1)
    'truncated: 9 bytes, its index alone needs 20'
    """
    if raw is None:
        return "missing"
    size = chunks * 16 + (4 if checksum else 0)
    if len(raw) < size:
        return f"truncated: {len(raw)} bytes, its index alone needs {size}"
    index = raw[len(raw) - size: len(raw) - size + chunks * 16]
    if checksum:
        import google_crc32c

        (stored,) = struct.unpack("<I", raw[-4:])
        if stored != google_crc32c.value(index):
            return "its index fails its checksum (truncated or overwritten)"
    pairs = struct.unpack(f"<{2 * chunks}Q", index)
    for i in range(chunks):
        offset, length = pairs[2 * i], pairs[2 * i + 1]
        if offset == _EMPTY and length == _EMPTY:
            return f"chunk {i} is missing from its index"
        if offset + length > len(raw) - size:
            return f"chunk {i} lies past the end of the data ({offset}+{length} > {len(raw) - size} bytes)"
    return None


def shard_spec(meta: dict[str, Any]) -> tuple[tuple[int, ...], int, bool]:
    """(shard shape, inner chunks per shard, whether the index has a checksum) of a sharded array's metadata."""
    shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    for codec in meta.get("codecs", []):
        if codec.get("name") == "sharding_indexed":
            config = codec.get("configuration", {})
            inner = config.get("chunk_shape", shard)
            checksum = any(c.get("name") == "crc32c" for c in config.get("index_codecs", []))
            return shard, math.prod(s // c for s, c in zip(shard, inner)), checksum
    return shard, 0, False


def shard_keys(meta: dict[str, Any], step_shard: int) -> list[str]:
    """Keys (relative to the array) of the shards holding step-shard ``step_shard`` (one per block of the other axes)."""
    shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    counts = [math.ceil(d / c) for d, c in zip(meta["shape"][1:], shard[1:])]
    return [_chunk_key((step_shard, *rest)) for rest in np.ndindex(*counts)]


def _chunk_key(index: tuple[int, ...]) -> str:
    """The key (relative to its array) of the chunk or shard at grid ``index`` (zarr v3's default encoding)."""
    return "c/" + "/".join(str(i) for i in index) if index else "c"


def missing_shards(meta: dict[str, Any], steps: list[int], stored: set[str]) -> list[int]:
    """The steps among ``steps`` whose shard is not among ``stored`` (keys relative to the array).

    >>> meta = {"shape": [4, 1, 1, 2, 2, 3], "chunk_grid": {"configuration": {"chunk_shape": [2, 1, 1, 2, 2, 3]}}}
    >>> missing_shards(meta, [0, 1, 2, 3], {"c/0/0/0/0/0/0"})
    [2, 3]
    """
    step_chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    lost = {k for k in {s // step_chunk for s in steps} if not set(shard_keys(meta, k)) <= stored}
    return [s for s in steps if s // step_chunk in lost]


def lost_chunks(meta: dict[str, Any], stored: set[str]) -> list[str]:
    """Keys of a (non-sharded) array's chunks that are not among ``stored`` (keys relative to the array).

    >>> lost_chunks({"shape": [3, 4], "chunk_grid": {"configuration": {"chunk_shape": [1, 4]}}}, {"c/0/0", "c/2/0"})
    ['c/1/0']
    """
    shape = meta["shape"]
    if 0 in shape:
        return []
    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
    counts = [math.ceil(d / c) for d, c in zip(shape, chunk)]
    keys = (_chunk_key(index) for index in np.ndindex(*counts))
    return [key for key in keys if key not in stored]


def stored_keys(where: Path | str, prefix: str, storage_options: dict[str, Any] | None) -> set[str]:
    """Keys stored under ``prefix`` (an array's path), relative to it: one directory walk or one listing."""
    if isinstance(where, Path):
        base = where / prefix
        return {str(p.relative_to(base)) for p in (base / "c").rglob("*") if p.is_file()} if (base / "c").is_dir() else set()
    from ._location import access_error, filesystem

    fs, root = filesystem(where, storage_options)
    base = f"{root}/{prefix}"
    try:
        return {p[len(base) + 1:] for p in fs.find(f"{base}/c")}
    except Exception as exc:
        raise access_error(where, exc, storage_options) from exc


def read_key(where: Path | str, key: str, storage_options: dict[str, Any] | None) -> bytes | None:
    """The bytes stored at ``key`` (relative to the store), or None."""
    if isinstance(where, Path):
        path = where / key
        return path.read_bytes() if path.is_file() else None
    from ._location import filesystem

    fs, root = filesystem(where, storage_options)
    try:
        return fs.cat_file(f"{root}/{key}")
    except FileNotFoundError:
        return None


def _step_text(steps: list[int]) -> str:
    steps = sorted(set(steps))
    if len(steps) > 1 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}–{steps[-1]}"
    return ("step " if len(steps) == 1 else "steps ") + ", ".join(map(str, steps))


class GuardedArray:
    """One site array of a trace, read block by block for dask; every failure names the site and the steps.

    A block that cannot be decoded (a chunk's crc32c checksum fails, its compressed bytes are cut) is an
    AttnscopeError. A step that reads back all-NaN although it was captured and not gated is checked
    against its shard (``inspect(step)`` returns what is wrong, or None when the maps really are NaN).
    """

    def __init__(self, array: Any, label: str, inspect: Callable[[int], str | None], nan_expected: set[int],
                 same_store: Callable[[], None] = lambda: None):
        self.array, self.label, self.inspect, self.nan_expected = array, label, inspect, nan_expected
        self.same_store = same_store  # raises when the store was replaced since it was opened: checked after each read
        self.shape, self.dtype, self.ndim = tuple(array.shape), np.dtype(array.dtype), len(array.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        steps = range(self.shape[0])[key[0]] if isinstance(key, tuple) and isinstance(key[0], slice) else range(self.shape[0])
        try:
            block = np.asarray(self.array[key])
        except AttnscopeError:
            raise
        except Exception as exc:
            self.same_store()
            raise AttnscopeError(f"{self.label}, {_step_text(list(steps))}: the stored chunk cannot be decoded "
                                 f"({type(exc).__name__}: {exc}); the trace is damaged") from exc
        self.same_store()
        if block.ndim == self.ndim and block.size:
            empty = np.isnan(block).reshape(block.shape[0], -1).all(axis=1)
            for step, is_empty in zip(steps, empty):
                if is_empty and step not in self.nan_expected:
                    problem = self.inspect(step)
                    if problem:
                        raise AttnscopeError(f"{self.label}, {_step_text([step])}: its shard is damaged ({problem}); "
                                             f"the maps of these steps are lost")
        return block

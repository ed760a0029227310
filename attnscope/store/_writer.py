"""TraceWriter: a background thread that owns every write to one trace store.

The forward pass only hands reduced CPU tensors to a byte-bounded queue; this thread compresses and
writes whole shards, and advances the root attribute ``steps_written`` once every capture planned
for the steps before it is on disk and the run got past them (:meth:`TraceWriter.steps_done`; persisted
at most every PERSIST_INTERVAL seconds, and at the latest PERSIST_INTERVAL seconds after the queue runs
empty, so it may lag the data, briefly, but never leads it). A kill loses at most the steps not yet written. A run that replaces a
trace is written beside it and swapped in once complete: the old trace is lost only to a complete new one.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AttnscopeError
from ..tokens import token_roles
from ._format import (
    BRANCH_ARRAYS,
    FORMAT_VERSION,
    IMAGE_DIMS,
    NAN_MAPS_ATTR,
    ROOT_CHUNKS_ATTR,
    ROOT_COORDS,
    RUN_ID_ATTR,
    SITE_DIMS,
    SITES_GROUP,
    SUMMARIES_GROUP,
    SUMMARY_DIMS,
    TEXT_MASS_ARRAYS,
    TEXT_MASS_DIMS,
    UNCOND_TOKEN_COORDS,
    check_keep_bits,
    checksum_codec,
    chunk_steps,
    default_compressor,
    map_filters,
    quiet_consolidated,
)
from ._integrity import check_site_name
from ._location import is_url, locate

__all__ = ["SiteLayout", "StoreLayout", "TraceWriter", "check_store_path", "enclosing_trace"]

def check_store_path(store: str | Path, overwrite: bool) -> Path:
    """The path of a trace store about to be written: new, or (``overwrite=True``) an existing trace or empty
    directory, never anything else (``overwrite`` only ever replaces traces).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> check_store_path(d / "new.zarr", overwrite=False).name
    'new.zarr'
    >>> (d / "notes.txt").write_text("keep me")
    7
    >>> check_store_path(d, overwrite=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: store '...' exists and is not an attnscope trace or an empty directory; overwrite=True only replaces traces
    >>> check_store_path(None, overwrite=False)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: store=None: expected the path of the trace store to create (a str or Path, e.g. 'runs/a.zarr')
    """
    if (not isinstance(store, (str, os.PathLike)) or isinstance(os.fspath(store), bytes)
            or not os.fspath(store).strip()):  # "" would be the working directory
        raise AttnscopeError(f"store={store!r}: expected the path of the trace store to create (a str or Path, e.g. "
                             f"'runs/a.zarr')")
    if is_url(store):  # a file:// URL is that local path; captures write nothing else (the writer needs a local disk)
        located = locate(store)
        if not isinstance(located, Path):
            raise AttnscopeError(f"store={store!r}: a capture writes a local directory; write it there, then copy it "
                                 f"with attnscope.store.upload_trace(path, {store!r})")
        store = located
    if not isinstance(overwrite, (bool, np.bool_)):  # "no" is truthy: it must not replace a trace
        raise AttnscopeError(f"overwrite={overwrite!r}: expected True or False")
    path = Path(store)
    for parent in path.parents:  # the nearest existing folder above the store must be a folder
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise AttnscopeError(f"store {str(path)!r}: {str(parent)!r} is a file, not a directory; choose a "
                                     f"store path in a folder")
            break
    inside = enclosing_trace(path)
    if inside is not None:  # a trace written into another one would be a stray group in it, deleted with it
        raise AttnscopeError(f"store {str(path)!r} is inside the trace {str(inside)!r}; choose a store path outside "
                             f"any trace")
    if not path.exists():
        return path
    if not overwrite:
        _check_replaceable(path)  # a file or another folder: overwrite=True would not help, so do not suggest it
        raise AttnscopeError(f"store {str(path)!r} exists; pass overwrite=True to replace it")
    _check_replaceable(path)
    return path


def _check_replaceable(path: Path) -> None:
    """AttnscopeError unless ``path`` is a directory holding a trace (a root ``zarr.json`` whose attributes have
    ``attnscope_format``) or nothing: ``overwrite=True`` never deletes anything else."""
    if not (path.is_dir() and not path.is_symlink() and (_is_trace(path) or not any(path.iterdir()))):
        raise AttnscopeError(
            f"store {str(path)!r} exists and is not an attnscope trace or an empty directory; "
            f"overwrite=True only replaces traces"
        )


def enclosing_trace(path: str | Path) -> Path | None:
    """The trace directory ``path`` lies inside (a folder above it that holds a trace), or None.

    >>> import tempfile, pathlib
    >>> enclosing_trace(pathlib.Path(tempfile.mkdtemp()) / "runs" / "a.zarr") is None
    True
    """
    return next((p for p in Path(path).absolute().parents if _is_trace(p)), None)


def _is_trace(path: Path) -> bool:
    """Whether ``path`` is a directory holding a trace: a root ``zarr.json`` whose attributes have ``attnscope_format``."""
    meta = path / "zarr.json"
    try:
        doc = json.loads(meta.read_bytes()) if path.is_dir() and not path.is_symlink() and meta.is_file() else None
    except (OSError, ValueError, RecursionError):
        doc = None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return isinstance(attrs, dict) and "attnscope_format" in attrs


def _flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


#: infix of the directory a run that replaces a trace is written into, beside it (``<name>.attnscope-new-<8 hex>``)
STAGING_INFIX = ".attnscope-new-"
#: infix of the old trace while it is swapped out (``<name>.attnscope-old-<8 hex>``; only left after a crash)
ASIDE_INFIX = ".attnscope-old-"


def _claim(path: Path, overwrite: bool) -> tuple[int, Path, int | None]:
    """Create the directory the writer writes and hold an exclusive lock on it while the writer lives: its open
    descriptor, the directory, and the locked descriptor of the trace it is to replace (None: written in place).

    ``path`` absent or an empty directory: the store is written at ``path``. ``path`` a trace (``overwrite``):
    the new run is written beside it, into ``<name>.attnscope-new-<8 hex>``, and the old trace is held locked
    until :func:`_swap` puts the complete new store in its place; a run that does not complete leaves both.
    Claims are serialised by a short lock on the parent directory, so of two processes writing to one
    path at once the second fails (the path exists, or with ``overwrite`` the first still holds its lock):
    their writes never interleave. The kernel drops the locks when the process ends, even when killed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    parent = os.open(path.parent, os.O_RDONLY)
    old: int | None = None
    try:
        fcntl.flock(parent, fcntl.LOCK_EX)
        where = path
        if path.exists():
            if not overwrite:
                raise AttnscopeError(f"store {str(path)!r} exists; pass overwrite=True to replace it")
            _check_replaceable(path)  # again: what is there now, not what was there when the capture was set up
            old = os.open(path, os.O_RDONLY)
            if not _flock(old):
                raise AttnscopeError(f"store {str(path)!r} is being written by another process; wait for it to "
                                     f"finish, or write to another path")
            if any(path.iterdir()):  # a trace: kept until the new one is complete
                where = path.with_name(f"{path.name}{STAGING_INFIX}{uuid.uuid4().hex[:8]}")
            else:
                path.rmdir()
                os.close(old)
                old = None
        where.mkdir()
        fd = os.open(where, os.O_RDONLY)
        _flock(fd)  # nobody else can hold it: the directory is new and claims are serialised
        return fd, where, old
    except BaseException:
        if old is not None:
            os.close(old)
        raise
    finally:
        os.close(parent)  # releases the parent's lock


def _swap(staging: Path, path: Path, old: int) -> None:
    """Put the complete store at ``staging`` in the place of the trace at ``path`` (held locked by ``old``), then
    delete that trace. Under the parent's lock, so no claim sees the path missing; the old trace is renamed aside
    first, so a crash between the two renames leaves it whole at ``<name>.attnscope-old-<8 hex>`` (and the new
    one at ``staging``), never neither."""
    parent = os.open(path.parent, os.O_RDONLY)
    aside = path.with_name(f"{path.name}{ASIDE_INFIX}{uuid.uuid4().hex[:8]}")
    try:
        fcntl.flock(parent, fcntl.LOCK_EX)
        try:
            found = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            found = None
        if found is None or not os.path.samestat(found, os.fstat(old)):  # moved or replaced by hand meanwhile
            raise AttnscopeError(f"store {str(path)!r} was moved or replaced while this run was written; the new "
                                 f"trace is kept at {str(staging)!r}")
        os.rename(path, aside)
        try:
            os.rename(staging, path)
        except BaseException:
            os.rename(aside, path)
            raise
        os.fsync(parent)
    finally:
        os.close(parent)
    shutil.rmtree(aside, ignore_errors=True)


#: seconds between rewrites of the root attribute ``steps_written`` (it only ever lags the data)
PERSIST_INTERVAL = 0.25


@dataclass
class SiteLayout:
    """One site's array: its description, map shape and the steps/branches captured there."""

    name: str
    description: dict[str, Any]
    heads: int
    spatial: tuple[int, int]
    branches: tuple[str, ...]
    steps: tuple[int, ...]


@dataclass
class StoreLayout:
    """Everything needed to create a store: sizes, coordinates, sites, root attributes."""

    num_steps: int
    samples: int
    prompt_of_sample: tuple[int, ...]
    image_of_sample: tuple[int, ...]
    token_positions: tuple[int, ...]
    token_text: list[list[str]]  # one row per sample
    sites: list[SiteLayout]
    attrs: dict[str, Any] = field(default_factory=dict)
    #: the planned timestep of each step (NaN where unknown); steps that deviate are corrected later
    timesteps: tuple[float, ...] | None = None
    #: each position's role (attnscope.tokens.ROLES), one row per sample; None: read from the token text
    token_roles: list[list[str]] | None = None
    #: the same two for the unconditional rows (their negative prompt), when that branch is recorded; None: not stored
    uncond_token_text: list[list[str]] | None = None
    uncond_token_roles: list[list[str]] | None = None


class _ByteQueue:
    """FIFO that blocks producers while more than ``limit`` bytes are queued."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()

    def put(self, item: Any, nbytes: int) -> None:
        with self.cond:
            while self.size > 0 and self.size + nbytes > self.limit:
                self.cond.wait()
            self.items.append((item, nbytes))
            self.size += nbytes
            self.cond.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """The next item; None when ``timeout`` seconds pass with none queued (never without a timeout)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.items, timeout):
                return None
            item, nbytes = self.items.popleft()
            self.size -= nbytes
            self.cond.notify_all()
            return item


class _SiteBuffer:
    """Collects one (site, branch) array's steps into whole shards before writing them."""

    def __init__(self, array: Any, steps: tuple[int, ...], chunk: int):
        self.array, self.chunk = array, chunk
        self.pending = set(steps)  # captured steps not yet on disk
        self.shards: dict[int, tuple[np.ndarray, set[int]]] = {}
        self.written: set[int] = set()  # shards on disk

    def add(self, step: int, data: np.ndarray) -> None:
        shard = step // self.chunk
        start = shard * self.chunk
        stop = min(start + self.chunk, self.array.shape[0])
        if shard not in self.shards:
            # a step sent again after its shard was written (a site called twice in a step): start from what is on
            # disk, so the shard's other steps are kept, not rewritten as NaN
            buf = (np.asarray(self.array[start:stop]) if shard in self.written
                   else np.full((stop - start, *data.shape), np.nan, dtype=np.float16))
            self.shards[shard] = (buf, set())
        buf, got = self.shards[shard]
        buf[step - start] = data
        got.add(step)
        if all(s in got for s in self.pending if start <= s < stop):
            self._write(shard)

    def _write(self, shard: int) -> None:
        buf, got = self.shards.pop(shard)
        start = shard * self.chunk
        self.array[start : start + buf.shape[0]] = buf
        self.pending -= got
        self.written.add(shard)

    def flush(self) -> None:
        for shard in list(self.shards):
            self._write(shard)

    def first_pending(self, num_steps: int) -> int:
        return min(self.pending, default=num_steps)


class TraceWriter:
    """Writes one trace store from a background thread.

    ``keep_bits`` (None: lossless) keeps that many of the 10 mantissa bits of each stored map value (numcodecs'
    BitRound, which plain zarr decodes): smaller stores at a relative error of at most ``2**-(keep_bits + 1)``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from attnscope.store import TraceWriter, StoreLayout, SiteLayout
    >>> layout = StoreLayout(num_steps=2, samples=1, prompt_of_sample=(0,), image_of_sample=(0,),
    ...     token_positions=(0, 1), token_text=[["<sot>", "<eot>"]],
    ...     sites=[SiteLayout("attn2", {}, heads=1, spatial=(2, 2), branches=("cond",), steps=(0, 1))])
    >>> w = TraceWriter(tempfile.mkdtemp() + "/t.zarr")
    >>> w.init(layout)
    >>> for step in range(2):
    ...     w.timestep(step, 999.0 - step)
    ...     w.put("attn2", "cond", step, np.full((1, 1, 2, 2, 2), 0.5, np.float16))
    >>> w.close(complete=True)
    >>> w.steps_written
    2
    """

    def __init__(self, path: str | Path, *, max_queue_bytes: int = 256 << 20, compressor: Any = None,
                 overwrite: bool = False, checksum: bool = True, keep_bits: int | None = None):
        self.path = Path(path)
        #: where this run's store is: ``path``, or, while it replaces a trace and after a run that did not complete,
        #: the directory ``<name>.attnscope-new-<8 hex>`` beside it (the old trace stays at ``path``); set by init()
        self.location = self.path
        self.overwrite = overwrite
        self.compressor = compressor if compressor is not None else default_compressor()
        # every chunk compressed, then checksummed (checksum=False: only to measure its cost, benchmarks/)
        self._codecs = (self.compressor, checksum_codec()) if checksum else (self.compressor,)
        #: the site maps' filters: lossless, or ``keep_bits`` mantissa bits kept (``text_mass`` stays lossless)
        self._map_filters = map_filters(check_keep_bits(keep_bits))
        self._lock: int | None = None
        self._old: int | None = None  # the locked trace this run replaces once complete
        self._claimed = threading.Event()
        #: the root attribute ``run_id``, set when the store is created (a new one for every store written)
        self.run_id: str | None = None
        self._nan: dict[str, set[int]] = {}  # site -> steps whose maps came out of the model with NaN
        #: after close: site -> steps where the model produced NaN maps (also the root attribute ``nan_maps``)
        self.nan_maps: dict[str, list[int]] = {}
        self.queue = _ByteQueue(max_queue_bytes)
        self.error: BaseException | None = None
        self.steps_written = 0
        self._root: Any = None
        self._buffers: dict[tuple[str, str], _SiteBuffer] = {}
        self._timesteps_done = 0
        self._steps_run: int | None = None  # steps the run has finished (steps_done); None: not told, no bound
        self._num_steps = 0
        self._persisted, self._persisted_at = 0, 0.0
        self._thread = threading.Thread(target=self._run, name=f"attnscope-writer:{self.path.name}", daemon=True)
        self._thread.start()

    # -- producer side (forward thread) -----------------------------------------------------------
    def _send(self, message: tuple, nbytes: int = 0) -> None:
        if self.error is not None:
            raise AttnscopeError(f"trace writer for {self.path} failed: {self.error!r}") from self.error
        if not self._thread.is_alive():  # closed: nothing would ever drain the queue, a full one would block forever
            raise AttnscopeError(f"trace writer for {self.path} is closed: its trace is finished, nothing more can be "
                                 f"written to it (a Recorder records one run: create a new one per run)")
        self.queue.put(message, nbytes)

    def init(self, layout: StoreLayout) -> None:
        """Create the store (in the writer thread); returns once its directory is claimed and ``location`` set (a
        failure to claim it is raised by the next call, as every write error is)."""
        self._send(("init", layout))
        self._claimed.wait()

    def timestep(self, step: int, value: float) -> None:
        self._send(("timestep", step, value))

    def steps_done(self, count: int) -> None:
        """The run has finished its steps before ``count``: ``steps_written`` never passes it, so a run that stopped
        early is not counted as written past where it stopped when the steps it skipped captured nothing (a
        ``steps=`` subset). A writer never told (used directly) bounds ``steps_written`` by the captures alone."""
        self._send(("steps_done", count))

    def put(self, site: str, branch: str, step: int, data: Any, ready: Any = None, quantity: str = "attention",
            gated: bool = False) -> None:
        """Queue one step of one site: ``data`` (sample, head, y, x, token), float16, on the CPU.

        ``ready`` is an optional CUDA event the writer waits on before reading ``data``.
        ``quantity="text_mass"``: a joint site's per-pixel text mass, (sample, head, y, x).
        ``gated``: the maps are NaN on purpose (an intervention bypassed the attention); any other NaN is
        recorded in the root attribute ``nan_maps`` (the model produced it).
        """
        nbytes = data.numel() * 2 if isinstance(data, torch.Tensor) else data.nbytes
        array = (BRANCH_ARRAYS if quantity == "attention" else TEXT_MASS_ARRAYS)[branch]
        self._send(("data", site, array, step, data, ready, gated), nbytes)

    def summaries(self, sites: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Queue the per-step summaries: ``arrays`` maps a name to a float32 (step, site, sample) array.

        Written as the root group ``summaries`` (one array per name, plus the ``site`` labels).
        """
        self._send(("summaries", list(sites), arrays), sum(a.nbytes for a in arrays.values()))

    def close(self, *, complete: bool, images: np.ndarray | None = None, attrs: dict | None = None) -> None:
        """Flush, write ``images`` and ``attrs``, mark ``complete`` (last), stop the thread.

        The store is marked complete only when ``complete`` is asked for and every planned capture of every step
        is on disk (``steps_written`` reaches the number of steps); otherwise it stays incomplete. A store that replaces
        a trace (``overwrite``) takes the old one's place only once complete; otherwise the old trace stays at ``path``
        and this run's is left at ``location``."""
        if self._thread.is_alive():
            self.queue.put(("close", complete, images, attrs or {}), 0)
            self._thread.join()
        if self.error is not None:
            raise AttnscopeError(f"trace writer for {self.path} failed: {self.error!r}") from self.error

    # -- writer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            # progress not yet persisted (rewritten at most every PERSIST_INTERVAL s) is persisted once the queue has
            # stayed empty that long: a slow step, or a pause of the run, must not leave steps on disk uncounted
            behind = self._root is not None and self.error is None and self.steps_written > self._persisted
            message = self.queue.get(PERSIST_INTERVAL if behind else None)
            if message is None:
                try:
                    self._advance(force=True)
                except BaseException as exc:  # noqa: BLE001 - reported to the producer
                    self.error = self.error or exc
                continue
            if self.error is not None and message[0] != "close":
                continue  # drain so producers never block on a dead writer
            try:
                getattr(self, f"_do_{message[0]}")(*message[1:])
            except BaseException as exc:  # noqa: BLE001 - reported to the producer
                self.error = self.error or exc
            if message[0] == "init":
                self._claimed.set()
            if message[0] == "close":
                self._release()
                return

    def _do_init(self, layout: StoreLayout) -> None:
        import zarr

        for site in layout.sites:
            check_site_name(site.name, str(self.path))
        self._lock, self.location, self._old = _claim(self.path, self.overwrite)
        # the format attribute first: a capture killed while it sets up the store leaves a trace that overwrite=True
        # replaces and that open_trace names as set up only in part, not a directory of unknown kind. The run id
        # tells an open Trace that the store was replaced under it (by another capture to the same path)
        self.run_id = uuid.uuid4().hex
        root = zarr.open_group(str(self.location), mode="w-", zarr_format=3,
                               attributes={"attnscope_format": FORMAT_VERSION, RUN_ID_ATTR: self.run_id,
                                           "complete": False, "steps_written": 0, ROOT_CHUNKS_ATTR: True})
        self._num_steps = n = layout.num_steps
        s, t = layout.samples, len(layout.token_positions)

        def coord(name: str, values: Any, dims: tuple[str, ...], **kw: Any) -> None:
            values = np.asarray(values)
            # every chunk stored (a zero or empty one too) and checksummed: a lost or changed one is damage, not values
            arr = root.create_array(name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
                                    dimension_names=dims, compressors=(checksum_codec(),),
                                    config={"write_empty_chunks": True}, **kw)
            arr[...] = values

        coord("step", np.arange(n, dtype=np.int64), ("step",))
        planned = np.full(n, np.nan) if layout.timesteps is None else np.asarray(layout.timesteps, dtype=np.float64)
        coord("timestep", planned, ("step",), fill_value=np.nan)
        unknown = np.isnan(planned)
        self._timesteps_done = int(unknown.argmax()) if unknown.any() else n
        coord("sample", np.arange(s, dtype=np.int64), ("sample",))
        coord("prompt_index", np.asarray(layout.prompt_of_sample, dtype=np.int64), ("sample",))
        coord("image_index", np.asarray(layout.image_of_sample, dtype=np.int64), ("sample",))
        coord("token", np.asarray(layout.token_positions, dtype=np.int64), ("token",))
        coord("token_text", np.asarray(layout.token_text, dtype=str).reshape(s, t), ("sample", "token"))
        roles = layout.token_roles if layout.token_roles is not None else [token_roles(row) for row in layout.token_text]
        coord("token_role", np.asarray(roles, dtype=str).reshape(s, t), ("sample", "token"))
        if layout.uncond_token_text is not None:
            coord(UNCOND_TOKEN_COORDS["token_text"], np.asarray(layout.uncond_token_text, dtype=str).reshape(s, t),
                  ("sample", "token"))
            roles = layout.uncond_token_roles or [token_roles(row) for row in layout.uncond_token_text]
            coord(UNCOND_TOKEN_COORDS["token_role"], np.asarray(roles, dtype=str).reshape(s, t), ("sample", "token"))
        sites_group = root.create_group(SITES_GROUP)
        for site in layout.sites:
            group = sites_group.create_group(site.name, attributes={"site": site.description, "steps": list(site.steps)})
            y, x = site.spatial
            step_bytes = s * site.heads * y * x * t * 2
            c = chunk_steps(step_bytes, n)
            for branch in site.branches:
                arr = group.create_array(
                    BRANCH_ARRAYS[branch], shape=(n, s, site.heads, y, x, t), dtype="float16",
                    shards=(c, s, site.heads, y, x, t), chunks=(c, 1, site.heads, y, x, t),
                    filters=self._map_filters, compressors=self._codecs, fill_value=np.nan,
                    dimension_names=SITE_DIMS, attributes={"branch": branch},
                    # every shard written holds captured maps: skip zarr's all-NaN test (~1 ms per write)
                    config={"write_empty_chunks": True},
                )
                self._buffers[(site.name, BRANCH_ARRAYS[branch])] = _SiteBuffer(arr, site.steps, c)
                if site.description.get("kind") == "joint":
                    mass = group.create_array(
                        TEXT_MASS_ARRAYS[branch], shape=(n, s, site.heads, y, x), dtype="float16",
                        shards=(c, s, site.heads, y, x), chunks=(c, 1, site.heads, y, x), compressors=self._codecs,
                        fill_value=np.nan, dimension_names=TEXT_MASS_DIMS, attributes={"branch": branch},
                        config={"write_empty_chunks": True},
                    )
                    self._buffers[(site.name, TEXT_MASS_ARRAYS[branch])] = _SiteBuffer(mass, site.steps, c)
        coordinates = [*ROOT_COORDS, *(UNCOND_TOKEN_COORDS.values() if layout.uncond_token_text is not None else ())]
        root.update_attributes({**layout.attrs, "attnscope_format": FORMAT_VERSION, RUN_ID_ATTR: self.run_id, "complete": False,
                                "steps_written": 0, ROOT_CHUNKS_ATTR: True, "coordinates": " ".join(coordinates)})  # one metadata write
        self._root = root

    def _do_timestep(self, step: int, value: float) -> None:
        self._root["timestep"][step] = value
        if step == self._timesteps_done:
            self._timesteps_done = step + 1
        self._advance()

    def _do_steps_done(self, count: int) -> None:
        self._steps_run = max(self._steps_run or 0, count)
        self._advance()

    def _do_data(self, site: str, array_name: str, step: int, data: Any, ready: Any, gated: bool) -> None:
        if ready is not None:
            ready.synchronize()
        array = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if not gated and np.isnan(array).any():
            self._nan.setdefault(site, set()).add(step)
        self._buffers[(site, array_name)].add(step, array)
        self._advance()

    def _do_summaries(self, sites: list[str], arrays: dict[str, np.ndarray]) -> None:
        group = self._root.create_group(SUMMARIES_GROUP)
        # checksummed and every chunk stored, as the root coordinates: a changed byte is an error, not another norm
        stored = {"compressors": (checksum_codec(),), "config": {"write_empty_chunks": True}}
        labels = group.create_array("site", shape=(len(sites),), dtype=str, dimension_names=("site",), **stored)
        labels[...] = np.asarray(sites, dtype=str)
        for name, values in arrays.items():
            arr = group.create_array(name, shape=values.shape, dtype="float32", dimension_names=SUMMARY_DIMS,
                                     fill_value=np.nan, **stored)
            arr[...] = values.astype(np.float32)

    def _advance(self, force: bool = False) -> None:
        """Advance ``steps_written``; persist it at most every PERSIST_INTERVAL s (always when forced)."""
        done = min((b.first_pending(self._num_steps) for b in self._buffers.values()), default=self._num_steps)
        ran = self._num_steps if self._steps_run is None else self._steps_run
        self.steps_written = max(self.steps_written, min(done, self._timesteps_done, ran))
        now = time.monotonic()
        if self.steps_written > self._persisted and (force or now - self._persisted_at >= PERSIST_INTERVAL):
            self._root.attrs["steps_written"] = self.steps_written
            self._persisted, self._persisted_at = self.steps_written, now

    def _do_close(self, complete: bool, images: np.ndarray | None, attrs: dict) -> None:
        if self._root is None:
            return
        for buf in self._buffers.values():
            buf.flush()
        if complete:
            self._timesteps_done = self._num_steps
            self._steps_run = None
        self._advance(force=True)
        complete = complete and self.steps_written >= self._num_steps  # never complete with steps missing
        if images is not None:
            arr = self._root.create_array("images", shape=images.shape, dtype="uint8", dimension_names=IMAGE_DIMS,
                                          chunks=(1, *images.shape[1:]), compressors=self._codecs,
                                          config={"write_empty_chunks": True})  # a black image is stored too
            arr[...] = images
        self.nan_maps = nan = {site: sorted(steps) for site, steps in self._nan.items()}
        self._root.update_attributes({**attrs, NAN_MAPS_ATTR: nan, "complete": complete})  # complete last, one write
        if complete:
            import zarr

            with quiet_consolidated():
                zarr.consolidate_metadata(str(self.location))
            if self._old is not None and self.error is None:  # replacing a trace: now, complete, it takes its place
                _swap(self.location, self.path, self._old)
                self.location = self.path
        self._release()

    def _release(self) -> None:
        for fd in (self._lock, self._old):
            if fd is not None:
                os.close(fd)
        self._lock = self._old = None

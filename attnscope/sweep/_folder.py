"""A sweep's folder: a local directory or a URL (``s3://…``, ``file://…``), read and written through fsspec.

Traces are always written to local disk first (the capture writer needs a file system): straight
into the folder when it is local, into a staging directory and then uploaded (root ``zarr.json``
last) when it is a URL. Small files (rows, images, the catalog) are written whole, atomically on
local disk.

Other processes write into the same folder (a sweep's workers, another sweep resuming it), so every
listing and read of a URL's folder asks the store again: fsspec's cache of directory listings
(shared by every filesystem instance with the same options in a process) is dropped for the path
first, and never hides what another process wrote.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import AttnscopeError
from ..store import access_error, filesystem, locate, read_root

__all__ = ["SweepFolder", "root_attributes", "trace_problem"]


def root_attributes(location: str | Path, storage_options: dict | None = None) -> dict | None:
    """The root attributes of the trace at ``location`` (a path or URL), or None where there is no readable
    root ``zarr.json``; an unreachable URL is an AttnscopeError naming it.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> root_attributes(d / "a.zarr"), (d / "zarr.json").write_text('{"attributes": {"complete": true}}') > 0
    (None, True)
    >>> root_attributes(d)
    {'complete': True}
    """
    raw = read_root(locate(location), storage_options)  # an unreachable URL: AttnscopeError naming it
    try:
        doc = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else None


def trace_problem(location: str, trace_id: Any, storage_options: dict | None) -> str | None:
    """Why the trace at ``location`` is not the one a catalog row recorded (``trace_id``, its root attribute
    ``run_id``), or None when it is: deleted, or replaced by another capture since the sweep catalogued it.

    >>> import tempfile
    >>> trace_problem(tempfile.mkdtemp() + "/gone.zarr", "ab" * 16, None)  # doctest: +ELLIPSIS
    "its trace '.../gone.zarr' is gone (deleted since the sweep catalogued it)"
    """
    attrs = root_attributes(location, storage_options)
    if attrs is None:
        return f"its trace {str(location)!r} is gone (deleted since the sweep catalogued it)"
    if isinstance(trace_id, str) and attrs.get("run_id") != trace_id:
        return (f"its trace {str(location)!r} was replaced since the sweep catalogued it (another capture wrote there; "
                f"its data are not this run's)")
    return None


class SweepFolder:
    """Where a sweep's traces, images, rows and catalog live.

    Examples
    --------
    >>> import tempfile
    >>> folder = SweepFolder(tempfile.mkdtemp() + "/s1")
    >>> folder.write_json("rows/a.json", {"run": "a"}); folder.read_json("rows/a.json"), folder.list("rows")
    ({'run': 'a'}, ['a.json'])
    """

    def __init__(self, location: str | Path, storage_options: dict | None = None):
        where = locate(location)  # a Path for local folders and file:// URLs; refuses unknown schemes
        self.location = where
        self.storage_options = storage_options
        self.remote = not isinstance(where, Path)
        if self.remote:
            self.fs, self._root = filesystem(str(where), storage_options)
            self._staging = Path(tempfile.mkdtemp(prefix="attnscope-sweep-"))
        else:
            self._root = str(where)

    def url(self, rel: str) -> str:
        """The full path or URL of ``rel`` inside the folder."""
        if self.remote:
            return str(self.location).rstrip("/") + "/" + rel
        return str(Path(self._root) / rel)

    def _remote_path(self, rel: str) -> str:
        return self._root.rstrip("/") + "/" + rel

    def _wrap(self, what: str, exc: Exception) -> AttnscopeError:
        return access_error(self.url(what), exc, self.storage_options)

    def _fresh(self, rel: str) -> str:
        """The remote path of ``rel``, with fsspec's cached listings of it and of its parents dropped."""
        path = self._remote_path(rel)
        self.fs.invalidate_cache(path)
        return path

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (Path(self._root) / rel).exists()
        try:
            return bool(self.fs.exists(self._fresh(rel)))
        except Exception as exc:  # connection errors of any backend: one message naming the URL
            raise self._wrap(rel, exc) from exc

    def read_bytes(self, rel: str) -> bytes:
        try:
            if not self.remote:
                return (Path(self._root) / rel).read_bytes()
            return self.fs.cat_file(self._fresh(rel))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._wrap(rel, exc) from exc

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AttnscopeError(f"{self.url(rel)!r}: not valid JSON ({exc})") from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        if not self.remote:
            target = Path(self._root) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)  # readers see the old file or the new one, never half of one
            return
        try:
            self.fs.pipe_file(self._remote_path(rel), data)
        except Exception as exc:
            raise self._wrap(rel, exc) from exc

    def remove(self, rel: str) -> None:
        """Delete the file ``rel`` (nothing when it is not there)."""
        try:
            if not self.remote:
                (Path(self._root) / rel).unlink(missing_ok=True)
            elif self.fs.exists(self._fresh(rel)):
                self.fs.rm(self._remote_path(rel))
        except Exception as exc:
            raise self._wrap(rel, exc) from exc

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_png(self, rel: str, image: Any) -> None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self.write_bytes(rel, buf.getvalue())

    def list(self, rel: str) -> list[str]:
        """Names of the entries directly under ``rel`` (empty when it does not exist)."""
        if not self.remote:
            d = Path(self._root) / rel
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        try:
            path = self._fresh(rel)
            if not self.fs.exists(path):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except Exception as exc:
            raise self._wrap(rel, exc) from exc

    def modified(self, rel: str) -> dict[str, float]:
        """When each file directly under ``rel`` (or the file ``rel`` itself) was last written, as Unix time, by name;
        files whose store reports no time are left out.

        >>> import tempfile
        >>> folder = SweepFolder(tempfile.mkdtemp())
        >>> folder.write_json("rows/a.json", {}); sorted(folder.modified("rows")), list(folder.modified("rows/a.json"))
        (['a.json'], ['a.json'])
        """
        if not self.remote:
            path = Path(self._root) / rel
            files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
            return {p.name: p.stat().st_mtime for p in files}
        try:
            path = self._fresh(rel)
            if not self.fs.exists(path):
                return {}
            entries = self.fs.ls(path, detail=True) if self.fs.isdir(path) else [self.fs.info(path)]
        except Exception as exc:
            raise self._wrap(rel, exc) from exc
        times = {}
        for entry in entries:
            when = next((entry[k] for k in ("mtime", "LastModified", "last_modified", "created") if entry.get(k)), None)
            when = when.timestamp() if hasattr(when, "timestamp") else when
            if isinstance(when, (int, float)):
                times[str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]] = float(when)
        return times

    def trace_complete(self, rel: str, trace_id: str | None = None) -> bool:
        """Whether the trace at ``rel`` exists and says ``complete: true`` in its root attributes, and, when
        ``trace_id`` is given, is that capture's (its root attribute ``run_id``: not one another capture wrote there)."""
        try:
            doc = json.loads(self.read_bytes(rel + "/zarr.json"))
        except (FileNotFoundError, ValueError):
            return False
        attrs = doc.get("attributes") if isinstance(doc, dict) else None
        return (isinstance(attrs, dict) and attrs.get("complete") is True
                and (trace_id is None or attrs.get("run_id") == trace_id))

    def staging_path(self, rel: str) -> Path:
        """Where the capture writes the trace ``rel``: in the folder itself, or a local staging copy of a URL's."""
        if not self.remote:
            return Path(self._root) / rel
        return self._staging / rel

    def clear_staged(self, rel: str) -> None:
        """Delete what an earlier attempt at the trace ``rel`` left where the capture writes it: the trace and the
        partial copies of failed overwrites beside it (``<rel>.attnscope-new-<hex>``). A run is redone from scratch,
        so these are not kept; the folder's own paths only."""
        import fcntl

        target = self.staging_path(rel)
        for leftover in [target, *target.parent.glob(f"{glob.escape(target.name)}.attnscope-*")]:
            if not leftover.is_dir() or leftover.is_symlink():
                continue
            fd = os.open(leftover, os.O_RDONLY)
            try:  # one a live writer holds (another process on this folder) is left to the capture, which refuses it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            else:
                shutil.rmtree(leftover, ignore_errors=True)
            finally:
                os.close(fd)

    def is_file(self) -> bool:
        """Whether the folder's own path is a file (or object), where a folder was expected."""
        if not self.remote:
            return Path(self._root).is_file()
        try:
            return bool(self.fs.isfile(self._fresh("").rstrip("/")))
        except Exception as exc:
            raise self._wrap("", exc) from exc

    def publish_trace(self, rel: str) -> None:
        """Make the staged trace ``rel`` visible in the folder (upload it when the folder is a URL).

        A trace already at ``rel`` (a run redone: its row was missing or failed, or its upload was cut
        short) is deleted first, as the capture replaces it in a local folder; nothing else is touched.
        """
        if not self.remote:
            return
        from ..store import upload_trace

        local = self._staging / rel
        self._remove_trace(rel)
        upload_trace(local, self.url(rel), storage_options=self.storage_options)
        shutil.rmtree(local, ignore_errors=True)

    def _remove_trace(self, rel: str) -> None:
        """Delete every object of the trace ``rel`` (``traces/<run>.zarr``) of a URL's folder, if there are any."""
        if not (rel.startswith("traces/") and rel.endswith(".zarr") and rel.count("/") == 1 and ".." not in rel):
            raise AttnscopeError(f"trace {rel!r}: expected a run's trace path traces/<run>.zarr")
        path = self._fresh(rel)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)  # <path> and the objects under <path>/, not <run>.zarr.bak/…
        except Exception as exc:
            raise self._wrap(rel, exc) from exc
        finally:
            self.fs.invalidate_cache(path)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self._staging, ignore_errors=True)

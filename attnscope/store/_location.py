"""Where a trace lives: a local directory, or a URL read through fsspec (``s3://…``, ``file://…``).

The one place that turns "path or URL" into what the reader opens. :func:`locate` normalises the
location (a ``Path`` for local traces, ``file://`` URLs included; the URL string otherwise),
:func:`read_root` reads the root ``zarr.json`` bytes, :func:`zarr_store` gives what
``xarray.open_datatree`` opens, and ``_upload.upload_trace`` copies a local trace to a URL. Remote stores
are zarr's own ``FsspecStore``; every fsspec/botocore failure becomes one AttnscopeError that
repeats the location.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import AttnscopeError

__all__ = ["ROOT", "access_error", "filesystem", "is_url", "locate", "read_root", "zarr_store"]

#: ``scheme://`` at the start; two characters at least, so a Windows drive (``C:\``) is never a scheme
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
ROOT = "zarr.json"


def is_url(where: Any) -> bool:
    """True when ``where`` is a string that starts with ``scheme://``.

    >>> is_url("s3://bucket/run.zarr"), is_url("file:///tmp/run.zarr"), is_url("runs/a.zarr")
    (True, True, False)
    """
    return isinstance(where, str) and _URL.match(where) is not None


def locate(where: str | os.PathLike) -> Path | str:
    """A trace's location: a ``Path`` for a local path or ``file://`` URL, else the URL (no trailing slash).

    Raises AttnscopeError for a URL whose scheme fsspec does not know or whose backend is not installed.

    >>> locate("file:///tmp/runs/a%20b.zarr/"), locate("s3://bucket/a.zarr/")
    (PosixPath('/tmp/runs/a b.zarr'), 's3://bucket/a.zarr')
    >>> locate("foo://bucket/a.zarr")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: 'foo://bucket/a.zarr': unknown URL scheme 'foo' (no fsspec filesystem is registered for it)
    """
    if not is_url(where):
        return Path(where)
    url = str(where).rstrip("/")
    scheme = _URL.match(url).group(1).lower()
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise AttnscopeError(f"{url!r}: a file:// URL names a local path (file:///abs/path), not host {parts.netloc!r}")
        return Path(unquote(parts.path))
    try:
        from fsspec.registry import get_filesystem_class, known_implementations
    except ImportError as exc:
        raise AttnscopeError(f"{url!r}: reading URLs needs fsspec; pip install 'attnscope[s3]' (or fsspec)") from exc
    try:
        get_filesystem_class(scheme)
    except ImportError as exc:
        package = known_implementations[scheme]["class"].split(".")[0]
        hint = "pip install 'attnscope[s3]' (installs s3fs)" if package == "s3fs" else f"pip install {package}"
        raise AttnscopeError(f"{url!r}: the fsspec backend for {scheme}:// is not installed; {hint}") from exc
    except ValueError as exc:
        raise AttnscopeError(f"{url!r}: unknown URL scheme {scheme!r} (no fsspec filesystem is registered for it)") from exc
    return url


def filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The (synchronous) fsspec filesystem of ``url`` and the path inside it."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **dict(storage_options or {}))
    except Exception as exc:  # bad options: a TypeError from the backend's constructor, …
        raise AttnscopeError(f"{url!r}: cannot set up its filesystem with storage_options "
                             f"{sorted(storage_options or {})}: {type(exc).__name__}: {exc}") from exc


def access_error(url: str, exc: BaseException, storage_options: dict[str, Any] | None = None) -> AttnscopeError:
    """One AttnscopeError for a failure while reaching ``url``: the endpoint when it cannot be reached,
    else the failure's type and message.

    >>> str(access_error("s3://b/a.zarr", ConnectionRefusedError(111, "Connection refused"),
    ...                  {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}))
    "'s3://b/a.zarr': cannot reach the endpoint http://127.0.0.1:9 (ConnectionRefusedError: [Errno 111] Connection refused)"
    """
    chain, e = [], exc
    while e is not None and len(chain) < 8:  # the exception, its causes and botocore's wrapped error
        chain.append(e)
        e = e.__cause__ or e.__context__ or (getattr(e, "kwargs", None) or {}).get("error")
    names = {k.__name__ for c in chain for k in type(c).__mro__}
    if isinstance(exc, PermissionError):
        return AttnscopeError(f"{url!r}: access denied ({exc}); check the credentials (storage_options or the "
                              f"backend's environment, e.g. AWS_ACCESS_KEY_ID)")
    if names & {"ConnectionError", "ClientConnectorError", "ConnectTimeoutError", "TimeoutError"}:
        return AttnscopeError(f"{url!r}: cannot reach the endpoint {_endpoint(chain, storage_options)} "
                              f"({type(exc).__name__}: {exc})")
    return AttnscopeError(f"{url!r}: {type(exc).__name__}: {exc}")


def _endpoint(chain: list[BaseException], storage_options: dict[str, Any] | None) -> str:
    """scheme://host:port of the request that failed, else the configured endpoint."""
    for e in chain:
        request = (getattr(e, "kwargs", None) or {}).get("endpoint_url")
        if isinstance(request, str):
            parts = urlsplit(request)
            return f"{parts.scheme}://{parts.netloc}"
    opts = storage_options or {}
    return (opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL") or "(the backend's default endpoint)")


def read_root(where: Path | str, storage_options: dict[str, Any] | None = None) -> bytes | None:
    """The bytes of the root ``zarr.json`` at a :func:`locate`-d location, or None when there is none.

    Any other failure (unreachable endpoint, access denied) is an AttnscopeError.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> read_root(d) is None, (d / "zarr.json").write_text("{}"), read_root(locate(d.as_uri()))
    (True, 2, b'{}')
    """
    if isinstance(where, Path):
        meta = where / ROOT
        if not meta.is_file():
            return None
        try:
            return meta.read_bytes()
        except OSError as exc:
            raise AttnscopeError(f"{str(where)!r} is not an attnscope trace: unreadable zarr.json ({exc})") from exc
    fs, path = filesystem(where, storage_options)
    try:
        return fs.cat_file(f"{path}/{ROOT}")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except Exception as exc:
        raise access_error(where, exc, storage_options) from exc


def zarr_store(where: Path | str, storage_options: dict[str, Any] | None = None) -> Any:
    """What ``xarray.open_datatree(..., engine="zarr")`` opens: the local path as a string, or a read-only
    ``zarr.storage.FsspecStore`` for a URL.

    >>> zarr_store(locate("file:///tmp/a.zarr")), type(zarr_store("memory://a.zarr")).__name__
    ('/tmp/a.zarr', 'FsspecStore')
    """
    if isinstance(where, Path):
        return str(where)
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(where, storage_options=dict(storage_options or {}), read_only=True)
    except Exception as exc:
        raise access_error(where, exc, storage_options) from exc

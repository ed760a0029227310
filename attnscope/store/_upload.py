"""``upload_trace``: copy a complete local trace to a URL, its root ``zarr.json`` last."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import AttnscopeError
from ._location import ROOT, access_error, filesystem, is_url, locate
from ._reader import open_trace

__all__ = ["upload_trace"]


def upload_trace(src: str | os.PathLike, dst_url: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """Copy a local trace store to a URL (any fsspec URL: ``s3://bucket/key.zarr``, ``file://…``).

    The root ``zarr.json`` is read first and written last: until the upload finishes the destination
    is not a trace (``open_trace`` says so), and a trace still being captured uploads with the root
    it had when the upload began, so every step that root counts as written is in the copy. A failed
    upload can be retried to the same URL; a URL that already holds a trace is refused.

    Parameters
    ----------
    src : str or Path
        A local trace directory (or ``file://`` URL).
    dst_url : str
        Where to put it; a URL that holds no trace yet.
    storage_options : dict, optional
        Passed to fsspec for ``dst_url`` (e.g. ``{"key": …, "secret": …, "client_kwargs":
        {"endpoint_url": …}}`` for S3). Without them the backend's own environment configuration
        applies (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …).

    Returns
    -------
    str
        ``dst_url`` without a trailing slash; ``ats.open_trace`` opens it.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> d = tempfile.mkdtemp()
    >>> _ = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=d + "/a.zarr",
    ...                 num_inference_steps=2, height=32, width=32)
    >>> url = ats.store.upload_trace(d + "/a.zarr", "memory://traces/a.zarr")
    >>> ats.open_trace(url).tokens[3], ats.open_trace(url).path
    ('circle</w>', 'memory://traces/a.zarr')
    """
    source = locate(src)
    if not isinstance(source, Path):
        raise AttnscopeError(f"src={src!r}: upload_trace copies a local trace directory; got a URL")
    if not is_url(dst_url):
        raise AttnscopeError(f"dst_url={dst_url!r}: expected a URL such as s3://bucket/run.zarr or file:///abs/run.zarr")
    dest, url = locate(dst_url), dst_url.rstrip("/")  # locate: refuses a scheme without an installed backend
    open_trace(source)  # refuses what is not a trace
    root = (source / ROOT).read_bytes()  # the snapshot: every step it counts as written is on disk now
    files = sorted(p for p in source.rglob("*") if p.is_file() and p != source / ROOT
                   and not p.name.endswith(".partial"))  # zarr's temporaries while a writer runs
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(dest, Path):  # file://: the path open_trace reads (percent-decoded)
        fs, base = LocalFileSystem(auto_mkdir=True), dest.as_posix()
    else:
        fs, base = filesystem(url, storage_options)
    try:
        if fs.exists(f"{base}/{ROOT}"):
            raise AttnscopeError(f"dst_url={url!r} already holds a Zarr group; upload to a new URL or delete it first")
        fs.put([str(p) for p in files], [f"{base}/{p.relative_to(source).as_posix()}" for p in files])
        if isinstance(fs, LocalFileSystem):  # a local rename is atomic: no reader sees a half-written zarr.json
            fs.pipe_file(f"{base}/.{ROOT}.partial", root)
            fs.mv(f"{base}/.{ROOT}.partial", f"{base}/{ROOT}")
        else:  # an object store's PUT is atomic
            fs.pipe_file(f"{base}/{ROOT}", root)
    except AttnscopeError:
        raise
    except Exception as exc:
        raise access_error(url, exc, storage_options) from exc
    return url

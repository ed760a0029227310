"""The catalog of a sweep: one Parquet row per run, readable with pandas alone, and :class:`Catalog` over it."""

from __future__ import annotations

import io
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnscopeError, AttnscopeWarning
from ..store import is_url
from ._folder import SweepFolder, trace_problem
from ._runs import BASE_COLUMNS, RESERVED_COLUMNS

__all__ = ["CATALOG_FILE", "Catalog", "open_catalog", "write_catalog"]

CATALOG_FILE = "catalog.parquet"


def write_catalog(folder: SweepFolder) -> Any:
    """Gather every run's row file under ``folder/rows`` into ``folder/catalog.parquet``; return the DataFrame.

    The row files are the durable record (each written once its run finished), so the catalog can
    always be rebuilt from them: an interrupted sweep's catalog is rewritten when it resumes.
    """
    df = _frame_of_rows(folder, _row_files(folder))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    folder.write_bytes(CATALOG_FILE, buf.getvalue())
    return df


def _row_files(folder: SweepFolder) -> list[str]:
    return [name for name in folder.list("rows") if name.endswith(".json") and not name.startswith(".")]


def _frame_of_rows(folder: SweepFolder, names: list[str]) -> Any:
    """The catalog's DataFrame from the row files ``names`` under ``folder/rows`` (as the Parquet file holds it)."""
    import pandas as pd

    rows = [row for row in (folder.read_json(f"rows/{name}") for name in names) if isinstance(row, dict) and "run" in row]
    df = pd.DataFrame(rows, columns=None if rows else list(BASE_COLUMNS))  # no rows yet: the columns all the same
    own = [c for c in RESERVED_COLUMNS if c in df.columns]
    extras = sorted(c for c in df.columns if c not in own)
    df = df[own + extras]  # the catalog's columns first, then extras
    for column in extras:
        df[column] = _one_type(column, df[column])
    for column in df.columns:
        df[column] = _nullable_bools(df[column])
    if len(df):
        df = df.sort_values(["prompt", "seed"], kind="stable").reset_index(drop=True)
    return df


def _one_type(column: str, values: Any) -> Any:
    """An ``extra`` column whose runs gave values of several types (``7`` and ``"seven"``) as text, with a warning:
    a Parquet column has one type, and pyarrow refuses the mix."""
    present = [v for v in values if not _missing(v)]
    kinds = {"number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__ for v in present}
    if len(kinds) < 2:
        return values
    names = sorted({type(v).__name__ for v in present})
    warnings.warn(f"extra column {column!r} holds values of several types ({', '.join(names)}); written as text. "
                  f"Expected one type per column from extra=", AttnscopeWarning, stacklevel=3)
    return [None if _missing(v) else str(v) for v in values]


def _nullable_bools(values: Any) -> Any:
    """A column of bools that some runs lack (a failed run has no detector verdict) as pandas' ``boolean`` dtype: an
    object column of ``True`` / ``None`` breaks ``~cat.df.all_present`` and boolean masks; ``<NA>`` keeps them.

    >>> import pandas as pd
    >>> (~_nullable_bools(pd.Series([True, None, False]))).tolist(), _nullable_bools(pd.Series([1, "a", None], dtype=object)).tolist()
    ([False, <NA>, True], [1, 'a', None])
    """
    if values.dtype != object:
        return values
    present = [v for v in values if not _missing(v)]
    if not present or not all(isinstance(v, (bool, np.bool_)) for v in present):
        return values
    return values.astype("boolean")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class Catalog:
    """A sweep's runs: :attr:`df` (pandas, one row per run) and lazy access to each run's trace.

    Create it with :func:`open_catalog` (or get it from :func:`attnscope.sweep`). In :attr:`df` the
    ``trace`` and ``image`` columns are full paths or URLs; in the Parquet file they are relative
    to the sweep's folder, so the folder can be moved or uploaded whole.

    Attributes
    ----------
    location : str or Path
        The sweep's folder (local path or URL).
    df : pandas.DataFrame
        Columns: ``run``, ``prompt``, ``seed``, ``trace``, ``image``, ``status`` (``"complete"`` or
        ``"failed"``), ``error``, ``model``, ``model_hash``, ``steps``, ``seconds``, ``worker``,
        ``finished`` (Unix time), ``trace_id`` (the trace's root attribute ``run_id``: :meth:`trace` refuses a
        trace written over since); on the
        shapes model the detector's ``kind``, ``expected``, ``detected``, ``present``,
        ``all_present``, ``exact``, ``extra``, ``n_detected``; then any ``extra=`` columns.
    """

    def __init__(self, folder: SweepFolder, df: Any):
        self._folder = folder
        self.location = folder.location
        self.df = df

    def __repr__(self) -> str:
        counts = self.df["status"].value_counts().to_dict() if "status" in self.df else {}
        return f"<Catalog {str(self.location)!r}: {len(self.df)} runs {counts}>"

    def __len__(self) -> int:
        return len(self.df)

    @property
    def file(self) -> str:
        """The path or URL of the catalog's Parquet file."""
        return self._folder.url(CATALOG_FILE)

    def _row(self, run: str | int) -> Any:
        if isinstance(run, numbers.Integral) and not isinstance(run, (bool, np.bool_)):
            run = int(run)
            if not -len(self.df) <= run < len(self.df):
                raise AttnscopeError(f"run={run}: the catalog has {len(self.df)} rows")
            return self.df.iloc[run]
        hits = self.df[self.df["run"] == run] if "run" in self.df else self.df.iloc[:0]
        if not len(hits):
            raise AttnscopeError(f"run={run!r}: not in the catalog of {str(self.location)!r}")
        return hits.iloc[0]

    def trace(self, run: str | int) -> Any:
        """The trace of ``run`` (its id, or a row number of :attr:`df`), opened lazily.

        Examples
        --------
        >>> import tempfile, attnscope as ats
        >>> from attnscope.testing import tiny_sd_pipeline
        >>> cat = ats.sweep(tiny_sd_pipeline(), ["a red circle"], seeds=[0, 1], out=tempfile.mkdtemp() + "/s",
        ...                 progress=False, num_inference_steps=2, height=32, width=32)
        >>> cat.trace(0).manifest["run"]["seed"], cat.trace(cat.df.run[1]).manifest["run"]["seed"]
        (0, 1)
        """
        from ..store import open_trace

        row = self._row(run)
        if row.get("status") != "complete":
            raise AttnscopeError(f"run {row['run']!r} has status {row.get('status')!r} ({row.get('error')}); "
                                 f"rerun the sweep to redo it")
        problem = trace_problem(row["trace"], row.get("trace_id"), self.storage_options)
        if problem is not None:
            raise AttnscopeError(f"run {row['run']!r}: {problem}; rerun the sweep to redo it")
        return open_trace(row["trace"], storage_options=self.storage_options)

    def traces(self) -> Iterator[tuple[str, Any]]:
        """``(run, trace)`` for every complete run, opened one at a time."""
        for run in self.df.loc[self.df["status"] == "complete", "run"]:
            yield run, self.trace(run)

    @property
    def storage_options(self) -> dict | None:
        """The fsspec options the catalog's traces are read with (None for a local folder)."""
        return self._folder.storage_options if self._folder.remote else None

    def map_stats(self, fn: Callable[[Any], Any], client: Any = None, *, progress: bool = True) -> Any:
        """Apply ``fn(trace)`` to every complete run on dask.distributed; one tidy result with a ``run`` axis.

        See :func:`attnscope.sweep.map_stats`, which this calls with this catalog.
        """
        from ._distributed import map_stats

        return map_stats(self, fn, client=client, progress=progress)


def _resolve(folder: SweepFolder, df: Any) -> Any:
    df = df.copy()
    for column in ("trace", "image"):
        if column in df:
            df[column] = [folder.url(v) if isinstance(v, str) else None for v in df[column]]
    return df


def _rows_newer(folder: SweepFolder, names: list[str]) -> int:
    """How many of the row files ``names`` were written after the catalog: runs redone (a failed run, a trace deleted
    or written over) since the catalog was gathered, which the count of rows does not show."""
    written = folder.modified(CATALOG_FILE).get(CATALOG_FILE)
    if written is None or not names:
        return 0
    rows = folder.modified("rows")
    return sum(1 for name in names if rows.get(name, written) > written)


def open_catalog(location: str | Path, *, storage_options: dict | None = None) -> Catalog:
    """Open a sweep's catalog: the sweep's folder (or its ``catalog.parquet``), a local path or a URL.

    Parameters
    ----------
    location : str or Path
        ``runs/sweep1``, ``runs/sweep1/catalog.parquet``, ``s3://bucket/runs/sweep1``, ``file://…``.
    storage_options : dict, optional
        For URLs: passed to fsspec (``key``, ``secret``, ``client_kwargs={"endpoint_url": …}``);
        without them the backend's own environment settings apply (``AWS_ENDPOINT_URL``, …).

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> out = tempfile.mkdtemp() + "/s"
    >>> _ = ats.sweep(tiny_sd_pipeline(), ["a red circle", "a blue square"], seeds="0-1", out=out, progress=False,
    ...               num_inference_steps=2, height=32, width=32)
    >>> cat = ats.open_catalog(out)
    >>> len(cat), sorted(cat.df.status.unique()), list(cat.df.seed)
    (4, ['complete'], [0, 1, 0, 1])
    """
    import pandas as pd

    text = str(location).rstrip("/")
    if text.endswith(".parquet"):
        if text.rsplit("/", 1)[-1] != CATALOG_FILE:
            raise AttnscopeError(f"{text!r}: expected a sweep's folder or its {CATALOG_FILE}, got another Parquet file")
        text = text.rsplit("/", 1)[0] if is_url(text) else str(Path(text).parent)
    folder = SweepFolder(text, storage_options)
    try:
        data = folder.read_bytes(CATALOG_FILE)
    except FileNotFoundError:
        data = None
    names = _row_files(folder)
    if data is None and not names:
        raise AttnscopeError(f"{folder.url(CATALOG_FILE)!r}: no sweep catalog there (expected the folder that "
                             f"ats.sweep / attnscope sweep wrote)")
    try:
        df = pd.read_parquet(io.BytesIO(data)) if data is not None else None
    except Exception as exc:  # pyarrow's errors for a damaged file: one message naming it
        raise AttnscopeError(f"{folder.url(CATALOG_FILE)!r}: not a readable Parquet catalog ({exc})") from exc
    newer = _rows_newer(folder, names) if df is not None and len(df) >= len(names) else 0
    if df is None or len(df) < len(names) or newer:  # a sweep stopped before its catalog caught up: the rows are the record
        state = ("is missing" if df is None else f"lists {len(df)} runs" if len(df) < len(names)
                 else f"is older than {newer} of the {len(names)} row files (runs redone since it was written)")
        warnings.warn(f"{folder.url(CATALOG_FILE)!r} {state} but {len(names)} runs have finished (the sweep was "
                      f"interrupted before it rewrote its catalog): read from their row files; rerun the sweep to "
                      f"resume it and rewrite the catalog", AttnscopeWarning, stacklevel=2)
        df = _frame_of_rows(folder, names)
    missing = [c for c in ("run", "prompt", "seed", "trace", "status") if c not in df.columns] if len(df) else []
    if missing:
        raise AttnscopeError(f"{folder.url(CATALOG_FILE)!r}: catalog lacks columns {missing}")
    return Catalog(folder, _resolve(folder, df))

"""``map_stats``: a per-trace reduction over every run of a catalog, on dask.distributed.

Each task opens one trace, applies the user's function with dask's synchronous scheduler inside
the task (so a worker holds one trace's working set at a time, and nothing is concatenated lazily
across traces), loads the small result and sends it back. The results are then joined along a
``run`` axis in catalog order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import AttnscopeError

__all__ = ["map_stats"]

#: seconds a scheduler address has to answer dask's handshake and ``identity`` call
SCHEDULER_TIMEOUT = 5.0


def _apply(fn: Callable[[Any], Any], run: str, location: str, storage_options: dict | None,
           trace_id: str | None = None) -> tuple[str, str, Any]:
    """One task: ``("ok", value)`` or ``("skipped", reason)`` for a missing, unreadable or incomplete trace, or one
    that is not the trace the catalog recorded (``trace_id``: another capture wrote over it)."""
    import dask

    from ..store import open_trace
    from ._folder import trace_problem

    try:
        problem = trace_problem(location, trace_id, storage_options)
        if problem is not None:
            return run, "skipped", problem
        tr = open_trace(location, storage_options=storage_options)
    except AttnscopeError as exc:
        return run, "skipped", f"trace unreadable: {exc}"
    if not tr.complete:
        return run, "skipped", f"trace incomplete: {tr.written}"
    with dask.config.set(scheduler="synchronous"):
        try:
            value = fn(tr)
        except AttnscopeError as exc:  # this trace cannot give the statistic (a target word its prompt lacks, …)
            return run, "skipped", f"{type(exc).__name__}: {exc}"
        if hasattr(value, "load") and callable(value.load):  # xarray: compute here, send numbers back
            value = value.load()
    return run, "ok", value


@contextlib.contextmanager
def _client(client: Any) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if client is None:
        workers = max(1, min(4, os.cpu_count() or 1))
        with warnings.catch_warnings():  # another cluster's HTTP port in use: it takes a free one, nothing to tell
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR)
        with cluster, Client(cluster) as c:
            yield c
    elif isinstance(client, str):
        check_scheduler(client)
        try:
            c = Client(client, timeout=f"{SCHEDULER_TIMEOUT:g}s")
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise _cannot_connect(client, exc) from exc
        with c:
            yield c
    elif isinstance(client, Client):
        yield client
    else:
        raise AttnscopeError(f"client={client!r}: expected None (a LocalCluster), a distributed.Client or a "
                             f"scheduler address like 'tcp://host:8786'")


def _cannot_connect(address: str, exc: BaseException) -> AttnscopeError:
    """The error for an address where no dask scheduler answered, with what happened instead."""
    if isinstance(exc, MemoryError):  # dask read another protocol's bytes (HTTP's) as the length of a message
        reason = "the server there answered in another protocol than dask's, e.g. HTTP"
    else:
        reason = f"{type(exc).__name__}: " + (str(exc) or f"no answer within {SCHEDULER_TIMEOUT + 1:g} s")
    return AttnscopeError(f"scheduler {address!r}: cannot connect to a dask scheduler there ({reason}); expected the "
                          f"address of a running dask scheduler, e.g. tcp://host:8786 (not its dashboard's HTTP port, "
                          f"e.g. 8787)")


async def _identity(address: str) -> Any:
    """What the server at ``address`` says it is (dask's ``identity`` call), within :data:`SCHEDULER_TIMEOUT`."""
    from distributed.core import rpc
    from distributed.security import Security

    async def ask() -> Any:
        server = rpc(address, timeout=SCHEDULER_TIMEOUT, connection_args=Security().get_connection_args("client"))
        try:
            return await server.identity()
        finally:
            await server.close_rpc()

    return await asyncio.wait_for(ask(), SCHEDULER_TIMEOUT + 1)  # dask's own connect timeout says more: it goes first


def _check_address(address: str) -> None:
    """Refuse an address dask cannot parse: no port, a port that is not a number, an unknown scheme."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise AttnscopeError(f"scheduler {address!r}: not a dask scheduler address ({exc}); expected one like "
                             f"tcp://host:8786") from None


def check_scheduler(address: str) -> None:
    """Refuse ``address`` unless a dask scheduler answers there within :data:`SCHEDULER_TIMEOUT` seconds.

    ``distributed.Client(address, timeout=…)`` bounds only the TCP connection: a server that accepts
    it and then stays silent (or answers in HTTP, like a dashboard) made it wait forever or fail with
    a MemoryError. The probe runs on its own event loop in its own thread, so it works the same
    inside a running loop (Jupyter).

    >>> check_scheduler("tcp://localhost")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: scheduler 'tcp://localhost': not a dask scheduler address (missing port number in address 'localhost'); expected one like tcp://host:8786
    """
    _check_address(address)
    answer: dict[str, Any] = {}

    def probe() -> None:
        try:
            answer["identity"] = asyncio.run(_identity(address))
        except Exception as exc:  # noqa: BLE001 - whatever a non-dask server makes dask raise (MemoryError: HTTP)
            answer["error"] = exc

    thread = threading.Thread(target=probe, name="attnscope-scheduler-probe", daemon=True)
    thread.start()
    thread.join(2 * SCHEDULER_TIMEOUT + 1)  # the loop's own timeout ends it before: this is the backstop
    error = answer.get("error")
    if error is not None or "identity" not in answer:
        raise _cannot_connect(address, error or TimeoutError()) from error
    kind = answer["identity"].get("type") if isinstance(answer["identity"], dict) else None
    if kind != "Scheduler":
        raise AttnscopeError(f"scheduler {address!r}: the dask server there is a {kind or 'server of unknown type'}, "
                             f"not a scheduler; expected the scheduler's address, e.g. tcp://host:8786")


def _combine(runs: list[str], values: list[Any]) -> Any:
    """Join per-run results along ``run``: xarray objects with ``xr.concat``, anything else as DataFrame rows."""
    import pandas as pd
    import xarray as xr

    index = pd.Index(runs, name="run")
    if values and all(isinstance(v, (xr.Dataset, xr.DataArray)) for v in values):
        return xr.concat(values, dim=index, join="outer", coords="different", compat="equals",
                         combine_attrs="drop_conflicts")
    if values and all(isinstance(v, pd.DataFrame) for v in values):
        for run, v in zip(runs, values):
            if "run" in v.columns or "run" in v.index.names:
                raise AttnscopeError(f"fn returned a DataFrame with a 'run' column or index level for run {run!r}; "
                                     f"expected one without it (map_stats adds the run)")
            both = [name for name in v.index.names if name is not None and name in v.columns]
            if both:  # the level becomes a column: pandas' "cannot insert step, already exists" otherwise
                raise AttnscopeError(f"fn returned a DataFrame whose index level {both[0]!r} is also a column, for run "
                                     f"{run!r}; expected each name once (its named index levels become columns)")
        # a named index (``step``, …) is kept as columns; an unnamed one (0, 1, … or a filter's) says nothing
        frames = [v.reset_index() if any(name is not None for name in v.index.names) else v for v in values]
        return pd.concat(frames, keys=runs, names=["run"]).reset_index(level=0).reset_index(drop=True)
    records = []
    for v in values:
        if isinstance(v, pd.Series):
            v = v.to_dict()
        if not isinstance(v, dict):
            v = {"value": v}
        elif "run" in v:
            raise AttnscopeError(f"fn returned a result with a 'run' entry for run {runs[len(records)]!r}; expected "
                                 f"one without it (map_stats adds the run)")
        records.append(v)
    return pd.DataFrame.from_records(records, index=index)


def map_stats(catalog: Any, fn: Callable[[Any], Any], client: Any = None, *, progress: bool = True) -> Any:
    """Apply ``fn(trace)`` to every complete run of ``catalog`` on dask.distributed and join the results by run.

    Parameters
    ----------
    catalog : Catalog
        From :func:`attnscope.open_catalog` or :func:`attnscope.sweep`.
    fn : callable
        ``fn(trace)`` → a small result: an xarray Dataset/DataArray (e.g. ``ats.stats.dominance(tr,
        targets=[…]).mean("step")``), a pandas DataFrame or Series, a dict of scalars, or a scalar.
        It runs in the workers (dask serialises it with cloudpickle); an AttnscopeError it raises for
        a trace skips that run, any other exception stops the map with an AttnscopeError naming the run.
    client : None, distributed.Client or str
        None: a ``LocalCluster`` (one single-threaded worker process per core, at most 4) started
        and closed here; a Client; or a scheduler address (``"tcp://host:8786"``).
    progress : bool
        A progress bar over the runs.

    Returns
    -------
    xarray.Dataset / DataArray with a ``run`` dimension, or pandas.DataFrame
        A DataFrame result has a ``run`` column (DataFrames, whose named index levels become columns)
        or index (dicts, Series, scalars), in catalog order. Runs that were skipped — failed runs, missing, unreadable or incomplete
        traces, traces another capture wrote over since the sweep catalogued them — are left out, listed with the reason in ``result.attrs["skipped"]``, and a warning
        says how many.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> cat = ats.sweep(tiny_sd_pipeline(), ["a red circle", "a blue square"], seeds=[0, 1],
    ...                 out=tempfile.mkdtemp() + "/s", progress=False, num_inference_steps=2, height=32, width=32)
    >>> from distributed import Client
    >>> with Client(processes=False, n_workers=1, dashboard_address=None) as client:
    ...     df = cat.map_stats(lambda tr: {"sites": len(tr.sites), "seed": tr.manifest["run"]["seed"]},
    ...                        client=client, progress=False)
    >>> df.reset_index().values.tolist()[:2]  # doctest: +ELLIPSIS
    [['a-blue-square-...-s0', 7, 0], ['a-blue-square-...-s1', 7, 1]]
    """
    from tqdm.auto import tqdm

    if not callable(fn):
        raise AttnscopeError(f"fn={fn!r}: expected a function trace -> result")
    df = catalog.df
    if not len(df):
        raise AttnscopeError(f"catalog {str(catalog.location)!r} has no runs")
    skipped: dict[str, str] = {}
    todo = []
    for row in df.itertuples(index=False):
        if row.status == "complete":
            trace_id = getattr(row, "trace_id", None)  # catalogs written before it was recorded have none
            todo.append((row.run, row.trace, trace_id if isinstance(trace_id, str) else None))
        else:
            skipped[row.run] = f"run {row.status}: {getattr(row, 'error', None)}"
    options = catalog.storage_options
    results: dict[str, Any] = {}
    if todo:
        from distributed import as_completed

        with _client(client) as c:
            futures = {c.submit(_apply, fn, run, location, options, trace_id, pure=False): (run, location)
                       for run, location, trace_id in todo}
            with tqdm(total=len(futures), unit="trace", desc="map_stats", disable=not progress) as bar:
                for future in as_completed(futures):
                    try:
                        run, status, value = future.result()
                    except Exception as exc:  # a bug in fn: it stops the map, naming the run it failed on
                        run, location = futures[future]
                        raise AttnscopeError(f"map_stats: fn raised {type(exc).__name__}: {exc} on run {run!r} "
                                             f"({location}); expected fn to return a result for every complete "
                                             f"trace (raise AttnscopeError to skip one)") from exc
                    if status == "ok":
                        results[run] = value
                    else:
                        skipped[run] = value
                    bar.update(1)
    runs = [run for run in df["run"] if run in results]
    if not runs:
        raise AttnscopeError(f"map_stats: no run of {str(catalog.location)!r} could be analysed; "
                             + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]))
    out = _combine(runs, [results[r] for r in runs])
    out.attrs["skipped"] = skipped
    if skipped:
        warnings.warn(f"map_stats: skipped {len(skipped)} of {len(df)} runs (see .attrs['skipped']), e.g. "
                      + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:2]), stacklevel=2)
    return out

"""Faults of ``ats.sweep`` / ``map_stats`` found in an audit: folders on S3 written by several processes, runs
redone over their own stale trace, scheduler addresses that are not a dask scheduler, settings a folder must not
mix, and sweeps that stop before any run."""

import json
import re
import socket
import sys
import threading
import time

import numpy as np
import pytest

import attnscope as ats
from attnscope.sweep import plan_runs
from attnscope.sweep._folder import SweepFolder

from .conftest import BUCKET, cli

PROMPT = "a red circle and a blue square"
RUN = dict(num_inference_steps=2)


def _keys(s3, prefix: str) -> set[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


# --- S3: what other processes wrote is seen ---------------------------------------------------------------------


def test_an_s3_folder_lists_and_reads_what_another_process_wrote(s3):
    """s3fs caches directory listings per process: a row written by a worker process after this process had listed
    ``rows/`` stayed invisible to it (the catalog lost it, a resume redid a complete run)."""
    folder = SweepFolder(f"s3://{BUCKET}/faults/listing", s3.options)
    folder.write_json("rows/a.json", {"run": "a"})
    assert folder.list("rows") == ["a.json"]  # the listing is now in s3fs's cache
    s3.client.put_object(Bucket=BUCKET, Key="faults/listing/rows/b.json", Body=b'{"run": "b"}')  # another process
    assert folder.list("rows") == ["a.json", "b.json"]
    assert folder.exists("rows/b.json") and folder.read_json("rows/b.json") == {"run": "b"}


def test_an_s3_sweep_on_two_workers_catalogs_every_run_and_resumes_without_redoing_them(s3, monkeypatch):
    # the catalog is rewritten after every row (a long sweep does it every 30 s): that listing was cached and the
    # final catalog was built from it, with 1 of the 3 rows
    monkeypatch.setattr(sys.modules["attnscope.sweep._sweep"], "CATALOG_INTERVAL", 0.0)
    url = f"s3://{BUCKET}/faults/workers"
    cat = ats.sweep("shapes", [PROMPT], "0-2", out=url, workers=2, threads=1, storage_options=s3.options,
                    progress=False, **RUN)
    rows = {k for k in _keys(s3, "faults/workers/rows/") if k.endswith(".json")}
    assert len(rows) == 3 and len(cat) == 3 and set(cat.df.status) == {"complete"}
    assert len(ats.open_catalog(url, storage_options=s3.options)) == 3
    again = ats.sweep("shapes", [PROMPT], "0-2", out=url, storage_options=s3.options, progress=False, **RUN)
    assert set(again.df.status) == {"complete"}
    assert again.df.finished.tolist() == cat.df.finished.tolist()  # every run was complete: none redone


def test_an_s3_run_is_redone_over_its_own_stale_trace_and_nothing_else(s3, shapes, tmp_path):
    """A trace uploaded before its row was written (or with a failed row) made every resume fail the run: the
    upload refused a destination that held a trace."""
    url, prefix = f"s3://{BUCKET}/faults/redo", "faults/redo/"
    first = ats.sweep(shapes, [PROMPT], "0-2", out=url, storage_options=s3.options, progress=False, **RUN)
    r0, r1, r2 = plan_runs([PROMPT], "0-2")
    s3.client.delete_object(Bucket=BUCKET, Key=prefix + r1.row)  # interrupted between the upload and the row
    failed = {"run": r0.run, "prompt": PROMPT, "seed": 0, "trace": r0.trace, "status": "failed", "error": "X"}
    s3.client.put_object(Bucket=BUCKET, Key=prefix + r0.row, Body=json.dumps(failed).encode())  # a failed run
    stale = prefix + r1.trace + "/stale/c/0"  # left by an earlier upload of run 1's trace
    others = {prefix + r1.trace + ".bak/zarr.json", prefix + r2.trace + "/mine.txt", prefix + "traces/x.zarr/zarr.json"}
    for key in [stale, *others]:
        s3.client.put_object(Bucket=BUCKET, Key=key, Body=b"{}")
    again = ats.sweep(shapes, [PROMPT], "0-2", out=url, storage_options=s3.options, progress=False, **RUN)
    assert set(again.df.status) == {"complete"}, again.df.error.tolist()
    keys = _keys(s3, prefix)
    assert stale not in keys and others <= keys
    by_run = again.df.set_index("run").finished
    assert by_run[r2.run] == first.df.set_index("run").finished[r2.run]  # run 2 was not redone
    for run in (r0, r1):
        alone = ats.capture(shapes, PROMPT, seed=run.seed, store=tmp_path / f"{run.seed}.zarr", **RUN)
        tr = again.trace(run.run)
        np.testing.assert_array_equal(tr.attention(tr.sites[0]).values, alone.attention(alone.sites[0]).values)


# --- scheduler addresses ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, shapes):
    out = tmp_path_factory.mktemp("faults") / "s"
    return out, ats.sweep(shapes, [PROMPT], 0, out=out, progress=False, **RUN)


@pytest.fixture(scope="module")
def tcp_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


def _listener(reply: bytes | None):
    """A TCP server on localhost that accepts every connection and sends ``reply`` (None: says nothing)."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            if reply is not None:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return server, held


@pytest.mark.parametrize("kind", ["silent", "http", "dashboard", "worker"])
def test_map_stats_refuses_an_address_where_no_scheduler_answers_in_bounded_time(tiny_sweep, tcp_cluster, kind):
    """``Client(address, timeout=)`` bounds only the TCP connect: a silent listener or a dashboard's port hung
    forever, an HTTP server gave a MemoryError, a worker's address was taken for a scheduler."""
    _, cat = tiny_sweep
    server = None
    if kind in ("silent", "http"):
        server, held = _listener(None if kind == "silent" else b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    elif kind == "dashboard":
        address = f"tcp://127.0.0.1:{tcp_cluster.scheduler.http_server.port}"
    else:
        address = next(iter(tcp_cluster.scheduler_info["workers"]))
    expected = r"the dask server there is a Worker, not a scheduler" if kind == "worker" else \
        r"cannot connect to a dask scheduler there .*expected the address of a running dask scheduler"
    start = time.monotonic()
    try:
        with pytest.raises(ats.AttnscopeError, match=rf"^scheduler '{re.escape(address)}': {expected}"):
            cat.map_stats(len, client=address, progress=False)
    finally:
        if server is not None:
            server.close()
            for conn in held:
                conn.close()
    assert time.monotonic() - start < 20


def test_map_stats_on_a_scheduler_given_by_its_address(tiny_sweep, tcp_cluster):
    _, cat = tiny_sweep
    table = cat.map_stats(lambda tr: tr.manifest["run"]["seed"], client=tcp_cluster.scheduler_address, progress=False)
    assert table["value"].tolist() == [0]


@pytest.mark.parametrize("address, why", [
    ("tcp://localhost", r"not a dask scheduler address \(missing port number"),
    ("localhost:abc", r"not a dask scheduler address \(invalid literal for int"),
    ("bogus://x:1", r"not a dask scheduler address \(unknown address scheme 'bogus'"),
    ("tls://127.0.0.1:1", r"cannot connect to a dask scheduler there \(TypeError: TLS expects"),
])
def test_a_malformed_scheduler_address_is_one_error_naming_it(tiny_sweep, address, why):
    out, cat = tiny_sweep
    with pytest.raises(ats.AttnscopeError, match=rf"^scheduler '{re.escape(address)}': {why}"):
        cat.map_stats(len, client=address, progress=False)
    done = cli("sweep-stats", out, "--scheduler", address)  # a raw ValueError / TypeError would propagate here
    assert done.exit_code == 2 and done.stderr.startswith(f"error: scheduler '{address}': ")
    assert len(done.stderr.strip().splitlines()) == 1


# --- settings ---------------------------------------------------------------------------------------------------


def test_a_folder_refuses_another_scheduler_or_dtype_and_resumes_from_an_older_sweep_json(shapes, tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    out = tmp_path / "s"
    ats.sweep(shapes, [PROMPT], 0, out=out, progress=False, **RUN)
    recorded = json.loads((out / "sweep.json").read_text())
    config = {k: v for k, v in shapes.scheduler.config.items() if not k.startswith("_")}
    assert recorded["dtype"] == "float32"
    assert recorded["scheduler"] == {"class": type(shapes.scheduler).__name__, "config": config}
    with pytest.raises(ats.AttnscopeError, match=r"holds a sweep with other settings \(dtype: 'float32' then, "
                                                 r"'bfloat16' now\)"):
        ats.sweep("shapes", [PROMPT], "0-1", out=out, dtype="bfloat16", progress=False, **RUN)
    saved = shapes.scheduler
    try:
        shapes.scheduler = DPMSolverMultistepScheduler.from_config(saved.config)
        with pytest.raises(ats.AttnscopeError, match=r"\(scheduler: DDIMScheduler then, DPMSolverMultistepScheduler "
                                                     r"now\)"):
            ats.sweep(shapes, [PROMPT], "0-1", out=out, progress=False, **RUN)
        shapes.scheduler = DDIMScheduler.from_config(saved.config, timestep_spacing="leading")
        with pytest.raises(ats.AttnscopeError, match=r"\(scheduler: DDIMScheduler with \{'timestep_spacing': "
                                                     r"'trailing'\} then, with \{'timestep_spacing': 'leading'\} now\)"):
            ats.sweep(shapes, [PROMPT], "0-1", out=out, devices=["cpu"], threads=1, progress=False, **RUN)  # a worker
    finally:
        shapes.scheduler = saved
    assert len(list((out / "rows").iterdir())) == 1  # nothing ran
    older = {"model": "shapes", "capture": {"num_inference_steps": 2}}  # a sweep.json from before they were recorded
    (out / "sweep.json").write_text(json.dumps(older))
    cat = ats.sweep("shapes", [PROMPT], "0-1", out=out, progress=False, **RUN)
    assert len(cat) == 2 and set(cat.df.status) == {"complete"}
    assert json.loads((out / "sweep.json").read_text()) == older


def test_a_sweep_that_cannot_start_leaves_nothing_and_the_corrected_command_runs(tmp_path):
    """A mistyped --model or --devices recorded the sweep's settings before the model loaded: the corrected command
    on the same --out was refused as "a sweep with other settings"."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "s"
    common = (prompts, "--seeds", "0", "--out", out, "--steps", "2", "--threads", "1", "--no-progress")
    bad = cli("sweep", *common, "--model", tmp_path / "nonexistent")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --model ")
    assert not out.exists()
    bad = cli("sweep", *common, "--devices", "foo")
    assert bad.exit_code == 2 and "could not load model 'shapes'" in bad.stderr
    assert not out.exists()
    good = cli("sweep", *common)
    assert good.exit_code == 0, good.stderr
    assert "1 runs, 1 complete, 0 failed" in good.stdout


def test_out_that_is_a_file_is_one_error_and_the_file_is_left_alone(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    done = cli("sweep", prompts, "--seeds", "0", "--out", prompts, "--no-progress")
    assert done.exit_code == 2, done.output
    assert done.stderr.strip() == f"error: --out {str(prompts)!r} is a file; expected a folder (new, empty, or a " \
                                  f"sweep's) for the sweep"
    with pytest.raises(ats.AttnscopeError, match=rf"^out='{re.escape(str(prompts / 's'))}': '{re.escape(str(prompts))}' "
                                                 rf"is a file; expected a folder"):
        ats.sweep("shapes", [PROMPT], 0, out=prompts / "s", progress=False)
    assert prompts.read_text() == PROMPT + "\n"

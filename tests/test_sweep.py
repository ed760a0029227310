"""ats.sweep, the Parquet catalog, resume, worker processes (one killed on purpose) and map_stats on dask.distributed."""

import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import attnscope as ats
from attnscope.models import score_image
from attnscope.sweep import DominanceRow, plan_runs, run_id

from .conftest import BUCKET, cli

SHAPES_RUN = dict(num_inference_steps=4)
PROMPTS = ["a red circle and a blue square", "a green triangle and a green square"]


@pytest.fixture(scope="module")
def shapes_sweep(tmp_path_factory, shapes):
    out = tmp_path_factory.mktemp("sweep") / "s1"
    cat = ats.sweep(shapes, PROMPTS, "0-1", out=out, progress=False, **SHAPES_RUN)
    return out, cat


def _mtimes(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir()}


def test_one_trace_per_prompt_and_seed_equal_to_a_capture_of_that_run(shapes_sweep, shapes, tmp_path):
    out, cat = shapes_sweep
    assert len(cat) == 4 and set(cat.df.status) == {"complete"}
    assert sorted(zip(cat.df.prompt, cat.df.seed)) == sorted((p, s) for p in PROMPTS for s in (0, 1))
    row = cat.df[(cat.df.prompt == PROMPTS[0]) & (cat.df.seed == 1)].iloc[0]
    alone = ats.capture(shapes, PROMPTS[0], seed=1, store=tmp_path / "alone.zarr", **SHAPES_RUN)
    tr = cat.trace(row.run)
    site = tr.sites[0]
    np.testing.assert_array_equal(tr.attention(site).values, alone.attention(site).values)
    np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(alone.images[0]))
    assert row.trace == str(out / "traces" / f"{run_id(PROMPTS[0], 1)}.zarr")


def test_catalog_is_parquet_readable_with_pandas_alone_and_holds_the_detector_results(shapes_sweep):
    out, cat = shapes_sweep
    df = pd.read_parquet(out / "catalog.parquet")
    assert list(df.columns[:14]) == ["run", "prompt", "seed", "trace", "image", "status", "error", "model",
                                     "model_hash", "steps", "seconds", "worker", "finished", "trace_id"]
    assert df.trace.str.startswith("traces/").all()  # relative in the file: the folder can move
    assert set(df.model) == {"shapes"} and df.model_hash.nunique() == 1 and set(df.steps) == {4}
    for row in df.itertuples():
        from PIL import Image

        image = Image.open(out / row.image)
        scored = score_image(row.prompt, image)  # the detector run again on the saved PNG
        assert row.all_present == scored["all_present"] and row.exact == scored["exact"]
        assert list(row.present) == scored["present"] and row.kind == scored["kind"]
        assert row.n_detected == len(scored["detected"])


def test_rerun_skips_complete_runs_and_redoes_deleted_or_incomplete_ones(shapes_sweep, shapes, tmp_path):
    import shutil

    src, _ = shapes_sweep
    out = tmp_path / "s1"
    shutil.copytree(src, out)
    runs = plan_runs(PROMPTS, "0-1")
    shutil.rmtree(out / runs[0].trace)  # a trace deleted by hand
    meta = out / runs[3].trace / "zarr.json"  # a trace left incomplete (a kill between writes)
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    before = _mtimes(out)
    cat = ats.sweep(shapes, PROMPTS, "0-1", out=out, progress=False, **SHAPES_RUN)
    after = _mtimes(out)
    redone = {name for name in after if after[name] != before[name]}
    assert redone == {f"{runs[0].run}.json", f"{runs[3].run}.json"}
    assert set(cat.df.status) == {"complete"} and cat.trace(runs[3].run).complete
    # more seeds: only the new runs are captured, and the catalog holds the union
    cat = ats.sweep(shapes, PROMPTS[:1], "0-2", out=out, progress=False, **SHAPES_RUN)
    assert len(cat) == 5 and len(_mtimes(out)) == 5 and cat.df.seed.tolist().count(2) == 1


def test_a_folder_holds_one_setting(shapes_sweep, shapes):
    out, _ = shapes_sweep
    with pytest.raises(ats.AttnscopeError, match=r"holds a sweep with other settings \(capture: .*num_inference_steps"):
        ats.sweep(shapes, PROMPTS, 0, out=out, progress=False, num_inference_steps=5)


def test_the_command_resumes_a_python_sweep_with_the_same_settings(shapes_sweep, tmp_path):
    import shutil

    out = tmp_path / "s1"
    shutil.copytree(shapes_sweep[0], out)   # written by ats.sweep(shapes, ..., num_inference_steps=4)
    before = _mtimes(out)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # the command passes every capture option at its default (sites, heads, tokens, branch): the same sweep
    done = cli("sweep", prompts, "--seeds", "0-1", "--out", out, "--steps", "4", "--no-progress")
    assert done.exit_code == 0, done.stderr
    assert _mtimes(out) == before                                     # every run was complete: none redone
    other = cli("sweep", prompts, "--seeds", "0-1", "--out", out, "--steps", "4", "--heads", "all", "--no-progress")
    assert other.exit_code == 2 and "holds a sweep with other settings (capture: {'num_inference_steps': 4} then, " \
        "{'num_inference_steps': 4, 'heads': 'all'} now)" in other.stderr


def _kill_on_blue(tr):
    """``extra`` for the worker test: SIGKILLs its own worker process once, on the first prompt's seed 1."""
    marker = Path(os.environ["ATTNSCOPE_TEST_KILL_MARKER"])
    if tr.manifest["run"]["prompts"][0] == PROMPTS[0] and tr.manifest["run"]["seed"] == 1 and not marker.exists():
        marker.write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    return {"n_sites": len(tr.sites)}


def test_workers_match_the_in_process_sweep_and_a_killed_worker_costs_only_its_run(shapes_sweep, tmp_path, monkeypatch):
    _, single = shapes_sweep
    monkeypatch.setenv("ATTNSCOPE_TEST_KILL_MARKER", str(tmp_path / "killed"))
    out = tmp_path / "s2"
    cat = ats.sweep("shapes", PROMPTS, "0-1", out=out, workers=2, threads=1, extra=_kill_on_blue, progress=False,
                    **SHAPES_RUN)
    killed = run_id(PROMPTS[0], 1)
    status = dict(zip(cat.df.run, cat.df.status))
    assert status.pop(killed) == "failed" and set(status.values()) == {"complete"}
    error = cat.df.set_index("run").loc[killed, "error"]
    assert "exited with code -9" in error
    assert set(cat.df.worker) <= {"worker-0", "worker-1"}
    before = _mtimes(out)
    cat = ats.sweep("shapes", PROMPTS, "0-1", out=out, workers=2, threads=1, extra=_kill_on_blue, progress=False,
                    **SHAPES_RUN)
    after = _mtimes(out)
    assert {n for n in after if after[n] != before[n]} == {f"{killed}.json"}  # only the killed run was redone
    assert set(cat.df.status) == {"complete"} and set(cat.df.n_sites) == {7}
    for run in cat.df.run:  # same traces as the sweep in this process (one torch thread each)
        a, b = cat.trace(run), single.trace(run)
        np.testing.assert_array_equal(a.attention(a.sites[-1]).values, b.attention(b.sites[-1]).values)


def test_extra_columns_and_a_bad_extra_fails_each_run_with_its_message(sd_pipe, tmp_path):
    cat = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=tmp_path / "a", progress=False,
                    extra=lambda tr: {"first_timestep": float(tr.timesteps[0]), "note": "ok"}, num_inference_steps=2,
                    height=32, width=32)
    assert cat.df.note.tolist() == ["ok", "ok"] and (cat.df.first_timestep > 0).all()
    assert "all_present" not in cat.df  # the detector only scores the shapes model
    with pytest.raises(ats.AttnscopeError, match=r"every run failed.*extra column 'seed'.*catalog's own columns"):
        ats.sweep(sd_pipe, ["a red circle"], [0], out=tmp_path / "b", progress=False, extra=lambda tr: {"seed": 1},
                  num_inference_steps=2, height=32, width=32)

    def lookup(tr):  # a KeyError for seed 1 only: it aborted the whole sweep; now it fails its run
        return {"x": {0: 1.0}[tr.manifest["run"]["seed"]]}

    cat = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=tmp_path / "c", progress=False, extra=lookup,
                    num_inference_steps=2, height=32, width=32)
    assert cat.df.status.tolist() == ["complete", "failed"]
    assert cat.df.error.tolist()[1] == "AttnscopeError: extra='lookup' raised KeyError: 1"


@pytest.mark.parametrize("kwargs, message", [
    (dict(seeds="3-1"), r"seeds='3-1': expected ints or ranges"),
    (dict(prompts="a red circle"), r"prompts='a red circle': expected a list of prompts"),
    (dict(workers=0), r"workers=0: expected an int >= 1"),
    (dict(devices="cuda:0"), r"devices='cuda:0': expected a non-empty list"),
    (dict(store="x.zarr"), r"store are set per run by the sweep"),
    (dict(out="gs://bucket/s1"), r"'gs://bucket/s1': the fsspec backend for gs:// is not installed; pip install gcsfs"),
    (dict(out="nosuch://bucket/s1"), r"unknown URL scheme 'nosuch'"),
    (dict(workers=2, extra=lambda tr: {}), r"extra=<function .*<lambda>.*: worker processes cannot receive it .* "
                                           r"defined at the top level of a module"),
])
def test_bad_input_is_one_clear_error_before_anything_runs(sd_pipe, tmp_path, kwargs, message):
    args = dict(prompts=["a red circle"], seeds=0, out=tmp_path / "s")
    args.update(kwargs)
    with pytest.raises(ats.AttnscopeError, match=message):
        ats.sweep(sd_pipe, args.pop("prompts"), args.pop("seeds"), args.pop("out"), progress=False, **args)
    assert not (tmp_path / "s" / "rows").exists() and not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def test_map_stats_equals_the_statistic_of_each_trace_and_reports_skipped_runs(shapes_sweep, dask_client, tmp_path):
    import shutil

    src, _ = shapes_sweep
    out = tmp_path / "s1"
    shutil.copytree(src, out)
    cat = ats.open_catalog(out)
    fn = DominanceRow("objects", steps=[0, 1])
    whole = cat.map_stats(lambda tr: ats.stats.dominance(tr, targets=["square"], steps=[0, 1]), client=dask_client,
                          progress=False)
    assert whole.sizes["run"] == 4 and list(whole.run.values) == list(cat.df.run)
    for run in cat.df.run:
        expected = ats.stats.dominance(cat.trace(run), targets=["square"], steps=[0, 1])
        xr.testing.assert_allclose(whole.target_share.sel(run=run, drop=True), expected.target_share)
    runs = list(cat.df.run)
    shutil.rmtree(Path(cat.df.trace[0]))  # a row whose trace is gone
    meta = Path(cat.df.trace[1]) / "zarr.json"  # a row whose trace was left incomplete
    doc = json.loads(meta.read_text())
    doc["attributes"].update(complete=False, steps_written=2)
    meta.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 runs"):
        table = cat.map_stats(fn, client=dask_client, progress=False)
    assert list(table.index) == runs[2:]
    assert "is gone (deleted since the sweep catalogued it)" in table.attrs["skipped"][runs[0]]
    assert table.attrs["skipped"][runs[1]] == "trace incomplete: 2 of 4 steps written"
    for run in runs[2:]:
        row = fn(cat.trace(run))
        assert table.loc[run, "target_0"] == row["target_0"]
        assert table.loc[run, "share_1"] == pytest.approx(row["share_1"], rel=1e-12)


def test_map_stats_on_the_default_local_cluster_and_an_unreachable_scheduler(shapes_sweep):
    _, cat = shapes_sweep
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to warn about
        table = cat.map_stats(lambda tr: tr.manifest["run"]["seed"], progress=False)
    assert table["value"].tolist() == cat.df.seed.tolist()
    with pytest.raises(ats.AttnscopeError, match=r"scheduler 'tcp://127.0.0.1:9': cannot connect"):
        cat.map_stats(len, client="tcp://127.0.0.1:9", progress=False)


def test_open_catalog_errors(tmp_path):
    with pytest.raises(ats.AttnscopeError, match=r"no sweep catalog there"):
        ats.open_catalog(tmp_path)
    (tmp_path / "catalog.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ats.AttnscopeError, match=r"not a readable Parquet catalog"):
        ats.open_catalog(tmp_path / "catalog.parquet")


def test_cli_sweep_resumes_and_sweep_stats_writes_a_table(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two objects\na red circle and a blue square\n")
    out = tmp_path / "s"
    result = cli("sweep", prompts, "--seeds", "0-1", "--out", out, "--steps", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "2 runs, 2 complete, 0 failed" in result.stdout and "shapes detector: all objects present" in result.stdout
    before = _mtimes(out)
    assert cli("sweep", prompts, "--seeds", "0-1", "--out", out, "--steps", "3", "--no-progress").exit_code == 0
    assert _mtimes(out) == before
    table_path = tmp_path / "dominance.csv"
    result = cli("sweep-stats", out, "--steps", "0:2", "-o", table_path)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(table_path)
    assert table.target_0.tolist() == ["red circle"] * 2 and table.seed.tolist() == [0, 1]
    bad = cli("sweep", prompts, "--seeds", "x", "--out", out)
    assert bad.exit_code == 2 and "--seeds 'x'" in bad.stderr  # the CLI's flag, not the keyword


def test_a_sweep_written_to_s3_reads_back_like_a_local_one(sd_pipe, s3, dask_client, tmp_path):
    """A real S3-compatible server on localhost (moto's), written and read with s3fs through zarr's store classes."""
    run = dict(num_inference_steps=2, height=32, width=32)
    url = f"s3://{BUCKET}/sweeps/s1"
    remote = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=url, storage_options=s3.options, progress=False, **run)
    local = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=tmp_path / "s1", progress=False, **run)
    assert remote.df.trace.str.startswith(url + "/traces/").all()
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=BUCKET, Prefix="sweeps/s1/")["Contents"]}
    assert {"sweeps/s1/catalog.parquet", "sweeps/s1/sweep.json"} <= keys
    cat = ats.open_catalog(url + "/catalog.parquet", storage_options=s3.options)
    volatile = ["trace", "trace_id", "image", "seconds", "finished"]
    assert cat.df.drop(columns=volatile).equals(local.df.drop(columns=volatile))
    for r in cat.df.run:
        a, b = cat.trace(r), local.trace(r)
        assert a.path.startswith("s3://") and a.manifest["run"] == b.manifest["run"]
        np.testing.assert_array_equal(a.attention(a.sites[0]).values, b.attention(b.sites[0]).values)
    fn = DominanceRow(["circle"])
    pd.testing.assert_frame_equal(cat.map_stats(fn, client=dask_client, progress=False),
                                  local.map_stats(fn, client=dask_client, progress=False))
    seconds = cat.df.seconds.tolist()  # resuming on the URL skips what is there
    again = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=url, storage_options=s3.options, progress=False, **run)
    assert again.df.seconds.tolist() == seconds


def test_a_catalog_behind_its_row_files_is_read_from_them(shapes_sweep, tmp_path):
    """A sweep killed before its first catalog rewrite left no catalog (or a stale one): open_catalog said "no
    sweep catalog there" although the row files of the finished runs were on disk."""
    import shutil

    out, cat = shapes_sweep
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "catalog.parquet").unlink()
    with pytest.warns(ats.AttnscopeWarning, match=r"is missing but 4 runs have finished .* read from their row files"):
        rebuilt = ats.open_catalog(copy)
    pd.testing.assert_frame_equal(rebuilt.df.drop(columns=["trace", "image"]), cat.df.drop(columns=["trace", "image"]))
    stale = pd.read_parquet(out / "catalog.parquet").iloc[:1]
    stale.to_parquet(copy / "catalog.parquet", index=False)
    with pytest.warns(ats.AttnscopeWarning, match=r"lists 1 runs but 4 runs have finished"):
        assert len(ats.open_catalog(copy)) == 4


def test_a_script_without_the_main_guard_is_told_so(tmp_path):
    """Spawned workers import the calling script again: without `if __name__ == "__main__":` each one failed at
    start-up and the sweep said "rerun the same sweep to resume", which could never help."""
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text("import attnscope as ats\n"
                      f"ats.sweep('shapes', ['a red circle'], seeds='0-1', out={str(tmp_path / 'out')!r}, workers=2, "
                      "threads=1, num_inference_steps=2, progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert 'every worker process exited before it was ready' in done.stderr
    assert 'under `if __name__ == "__main__":`' in done.stderr

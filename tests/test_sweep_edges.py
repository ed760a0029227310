"""Edges of ats.sweep, the catalog and map_stats: resume against another model or pipeline, callable capture
settings, a catalog with no rows or mixed extra columns, results that keep their own index, errors naming the run."""

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import attnscope as ats
from attnscope.sweep import plan_runs
from attnscope.testing import tiny_sd_pipeline

RUN = dict(num_inference_steps=2, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, sd_pipe):
    out = tmp_path_factory.mktemp("edges") / "s"
    return out, ats.sweep(sd_pipe, ["a red circle", "a blue square"], [0, 1], out=out, **RUN)


def _rows(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir()}


def test_a_folder_refuses_another_model_with_the_same_reference(small_sweep, tmp_path):
    """Two pipelines without a reference (or one directory retrained in place) were taken for the same model."""
    out, cat = small_sweep
    before = _rows(out)
    other = tiny_sd_pipeline(seed=1)  # same structure, no reference, other weights
    with pytest.raises(
        ats.AttnscopeError,
        match=r"holds a sweep with other settings \(model_hash: '[0-9a-f]{16}' "
        r"then, '[0-9a-f]{16}' now\)",
    ):
        ats.sweep(other, ["a red circle"], [0, 1, 2], out=out, **RUN)
    assert _rows(out) == before  # nothing run, nothing mixed in
    assert json.loads((out / "sweep.json").read_text())["model_hash"] == cat.df.model_hash.iloc[0]


def _sites_predicate():
    """A fresh function object each call, as a rerun of the same script makes."""

    def up_sites(site):
        return site.name.startswith("up_blocks")

    return up_sites


def test_a_callable_site_selection_resumes_in_a_new_process_and_another_is_refused(sd_pipe, tmp_path):
    """``sites=fn`` was recorded by its repr, which holds the function's address: a rerun was always refused."""
    out = tmp_path / "s"
    cat = ats.sweep(sd_pipe, ["a red circle"], [0], out=out, sites=_sites_predicate(), **RUN)
    assert all(s.startswith("up_blocks") for s in cat.trace(0).sites)
    cat = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=out, sites=_sites_predicate(), **RUN)
    assert len(cat) == 2 and set(cat.df.status) == {"complete"}
    with pytest.raises(ats.AttnscopeError, match="holds a sweep with other settings"):
        ats.sweep(sd_pipe, ["a red circle"], [0, 1, 2], out=out, sites=lambda s: s.name.startswith("down"), **RUN)


def _interrupt(tr):
    raise KeyboardInterrupt


def test_a_sweep_interrupted_in_its_first_run_leaves_a_catalog_with_its_columns(sd_pipe, tmp_path, client):
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=out, extra=_interrupt, **RUN)
    df = pd.read_parquet(out / "catalog.parquet")  # pandas alone: the columns are there with no rows
    assert len(df) == 0 and list(df.columns[:6]) == ["run", "prompt", "seed", "trace", "image", "status"]
    cat = ats.open_catalog(out)
    assert len(cat) == 0 and list(cat.traces()) == [] and cat.df[cat.df.status == "complete"].empty
    with pytest.raises(ats.AttnscopeError, match=r"catalog '.*' has no runs"):
        cat.map_stats(len, client=client, progress=False)
    cat = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=out, **RUN)  # the resume runs both
    assert len(cat) == 2 and set(cat.df.status) == {"complete"}


def test_open_catalog_refuses_a_parquet_file_that_is_not_the_catalog(small_sweep):
    out, _ = small_sweep
    table = out.parent / "dominance.parquet"
    pd.DataFrame({"share": [0.5]}).to_parquet(table)
    with pytest.raises(
        ats.AttnscopeError,
        match=rf"^{re.escape(repr(str(table)))}: expected a sweep's folder or "
        r"its catalog\.parquet",
    ):
        ats.open_catalog(table)
    assert len(ats.open_catalog(out / "catalog.parquet")) == 4


def _mixed(tr):
    seed = tr.manifest["run"]["seed"]
    return {"label": 7 if seed == 0 else "seven", "score": float(seed)}


def test_an_extra_column_of_mixed_types_is_kept_as_text_and_the_catalog_is_written(sd_pipe, tmp_path):
    """pyarrow refused the column and the sweep ended in ArrowInvalid after every run, its catalog unwritten."""
    out = tmp_path / "s"
    with pytest.warns(ats.AttnscopeWarning, match=r"extra column 'label' holds values of several types \(int, str\)"):
        cat = ats.sweep(sd_pipe, ["a red circle"], [0, 1], out=out, extra=_mixed, **RUN)
    df = pd.read_parquet(out / "catalog.parquet")
    assert df.set_index("seed").label.to_dict() == {0: "7", 1: "seven"}
    assert df.set_index("seed").score.to_dict() == {0: 0.0, 1: 1.0}
    assert set(cat.df.status) == {"complete"}


def _per_step(tr):
    steps = list(range(tr.manifest["run"]["num_inference_steps"]))
    return pd.DataFrame({"seed": tr.manifest["run"]["seed"]}, index=pd.Index(steps, name="step"))


def test_map_stats_keeps_each_dataframe_index_as_a_column(small_sweep, client):
    """The frames' own index (here ``step``) was dropped: rows of a run could no longer be told apart."""
    _, cat = small_sweep
    table = cat.map_stats(_per_step, client=client, progress=False)
    assert list(table.columns) == ["run", "step", "seed"]
    expected = [(run, step, seed) for run, seed in zip(cat.df.run, cat.df.seed) for step in (0, 1)]
    assert list(table.itertuples(index=False, name=None)) == expected
    with pytest.raises(ats.AttnscopeError, match=r"fn returned a DataFrame with a 'run' column .* for run '"):
        cat.map_stats(lambda tr: pd.DataFrame({"run": [0]}), client=client, progress=False)


def _fails_on_square_seed_1(tr):
    if tr.manifest["run"]["seed"] == 1 and "square" in tr.manifest["run"]["prompts"][0]:
        raise ZeroDivisionError("no objects")
    return {"seed": tr.manifest["run"]["seed"]}


def test_an_error_in_fn_names_the_run_it_came_from(small_sweep, client):
    _, cat = small_sweep
    run = plan_runs(["a blue square"], 1)[0].run
    with pytest.raises(
        ats.AttnscopeError,
        match=rf"^map_stats: fn raised ZeroDivisionError: no objects on run "
        rf"'{run}' \(.*{run}\.zarr\)",
    ) as info:
        cat.map_stats(_fails_on_square_seed_1, client=client, progress=False)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_numpy_seeds_and_row_numbers_are_taken_as_ints(sd_pipe, tmp_path):
    cat = ats.sweep(sd_pipe, ["a red circle"], np.arange(2), out=tmp_path / "s", **RUN)
    assert cat.df.seed.tolist() == [0, 1]
    assert cat.trace(np.int64(1)).manifest["run"]["seed"] == 1


def test_workers_run_the_pipeline_given_in_its_dtype_and_refuse_weights_changed_since_loading(tmp_path):
    """Workers loaded the pipeline's reference in float32 whatever the pipeline given was: another model, silently."""
    pipe = ats.load_pipeline("shapes", dtype="bfloat16")
    cat = ats.sweep(pipe, ["a red circle"], [0], out=tmp_path / "bf16", devices=["cpu"], **RUN)
    assert cat.trace(0).manifest["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "sweep.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.1)  # e.g. fine-tuned after loading: its reference no longer loads it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ats.AttnscopeError,
            match=r"worker worker-0@cpu loaded 'shapes', whose weights differ from the "
            r"pipeline given \(model_hash",
        ):
            ats.sweep(pipe, ["a red circle"], [0], out=tmp_path / "tuned", devices=["cpu"], **RUN)
    assert not (tmp_path / "tuned").exists()


_CALLS = []


def _second_run_fails(pipe, step, timestep, callback_kwargs):
    _CALLS.append(step)
    if len(_CALLS) == 3:  # the second run's first step (two steps per run)
        raise KeyError("latents_of_step_two")  # any exception type the pipeline might raise mid-run
    return callback_kwargs


def test_any_exception_inside_a_run_fails_that_run_only(sd_pipe, tmp_path):
    """docs/sweep.md: an exception inside a run gives a failed row; before, only a few exception types did, and a
    KeyError (IndexError, NotImplementedError, ...) from the pipeline stopped the whole sweep."""
    _CALLS.clear()
    cat = ats.sweep(sd_pipe, ["a red circle"], [0, 1, 2], out=tmp_path / "s", callback_on_step_end=_second_run_fails,
                    **RUN)
    assert list(cat.df.status) == ["complete", "failed", "complete"]
    assert cat.df.error[1].startswith("KeyError: ") and "latents_of_step_two" in cat.df.error[1]


def test_a_model_directory_named_relative_then_absolute_is_the_same_model(tmp_path, monkeypatch):
    """The model was compared as typed: `models/m` and `/abs/models/m` were refused as two models."""
    tiny_sd_pipeline().save_pretrained(tmp_path / "models" / "m")
    monkeypatch.chdir(tmp_path)
    ats.sweep("models/m", ["a red circle"], [0], out="s", **RUN)
    cat = ats.sweep(str(tmp_path / "models" / "m"), ["a red circle"], [0, 1], out="s", **RUN)
    assert list(cat.df.status) == ["complete", "complete"]
    with pytest.raises(ats.AttnscopeError, match="other settings"):
        tiny_sd_pipeline(seed=1).save_pretrained(tmp_path / "other")
        ats.sweep("other", ["a red circle"], [0, 1], out="s", **RUN)



_FAILING = [True]


def _fails_while_asked(pipe, step, timestep, callback_kwargs):
    if _FAILING[0] and step == 0:  # of two: the trace is left incomplete
        raise KeyError("asked to fail")
    return callback_kwargs


def test_a_run_redone_leaves_no_partial_copies_of_its_trace(sd_pipe, tmp_path):
    """A failed run's redo wrote beside its partial trace (overwrite keeps a trace until a complete run replaces it)
    and, failing again, left one more `<run>.zarr.attnscope-new-<hex>` directory per resume: the sweep redoes a run
    from scratch, so what an earlier attempt left is deleted first."""
    out = tmp_path / "s"
    _FAILING[0] = True
    for _ in range(2):
        with pytest.raises(ats.AttnscopeError, match="every run failed"):
            ats.sweep(sd_pipe, ["a red circle"], [0], out=out, callback_on_step_end=_fails_while_asked, **RUN)
    assert [p.name for p in (out / "traces").iterdir() if ".attnscope-" in p.name] == []
    _FAILING[0] = False
    cat = ats.sweep(sd_pipe, ["a red circle"], [0], out=out, callback_on_step_end=_fails_while_asked, **RUN)
    assert list(cat.df.status) == ["complete"]
    assert [p.name for p in (out / "traces").iterdir()] == [cat.df.trace[0].rsplit("/", 1)[-1]]


def test_a_size_of_zero_pixels_is_refused_before_the_folder_is_made(sd_pipe, tmp_path):
    """`ats.sweep(..., height=0)` made the folder and failed every run in capture's check ("every run failed");
    only the command line refused it up front. The sweep now runs capture's check before anything is written."""
    with pytest.raises(ats.AttnscopeError, match=r"^height=0: expected a positive int"):
        ats.sweep(sd_pipe, ["a red circle"], [0], out=tmp_path / "s", num_inference_steps=2, height=0, width=32,
                  progress=False)
    assert not (tmp_path / "s").exists()

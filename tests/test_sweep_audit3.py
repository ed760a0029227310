"""Third audit of ats.sweep and its catalog: a catalog with a failed run keeps its detector verdicts usable as bools,
a catalog older than runs redone since is not trusted, a setting given at the pipeline's own default (or steps
written another way) resumes the same sweep, and a prompts file's lines end only at line ends."""

import json
import os
import shutil
import warnings

import pandas as pd
import pytest

import attnscope as ats
from attnscope.sweep import fit_neglect_risk, read_prompts, run_id

from .conftest import cli

RUN = dict(num_inference_steps=2, height=32, width=32, progress=False)
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as c:
        yield c


def _fail_run(out, prompt, seed):
    """Make the run's trace path a file, so that its capture fails (as any error inside a run does)."""
    for sub in ("traces", "rows"):  # a sweep's folder (a folder of other files is refused)
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "traces" / f"{run_id(prompt, seed)}.zarr").write_text("not a trace")


def _captured_steps(tr):
    return tr.attention(tr.sites[0]).step.values.tolist()


# --- a failed run among detector verdicts ------------------------------------------------------------------------


def test_a_failed_run_leaves_the_detector_verdicts_usable_as_bools(tmp_path):
    """A failed run has no image, so no verdict: the column was an object column of True / False / None, and the docs'
    own ``cat.df["lost"] = ~cat.df.all_present`` raised TypeError (a boolean mask raised too)."""
    out = tmp_path / "s"
    _fail_run(out, PROMPT, 1)
    cat = ats.sweep("shapes", [PROMPT], "0-2", out=out, progress=False, num_inference_steps=2)
    assert cat.df.status.tolist() == ["complete", "failed", "complete"]
    rows = [json.loads((out / "rows" / f"{run_id(PROMPT, s)}.json").read_text()) for s in (0, 2)]
    lost = ~cat.df.all_present
    assert lost[[0, 2]].tolist() == [not r["all_present"] for r in rows] and lost[1] is pd.NA
    assert len(cat.df[cat.df.all_present]) == sum(r["all_present"] for r in rows)
    assert cat.df.exact[[0, 2]].tolist() == [r["exact"] for r in rows] and cat.df.exact[1] is pd.NA
    again = pd.read_parquet(out / "catalog.parquet")  # pandas alone reads the same column back
    assert str(again.all_present.dtype) == "boolean" and again.all_present.isna().tolist() == [False, True, False]


def test_fit_neglect_risk_leaves_out_runs_whose_outcome_is_pandas_na(sd_pipe, tmp_path, client):
    """The docs: None or NaN is no outcome. pandas' own missing value of a nullable column (``<NA>``, what a partly
    labelled ``boolean`` column holds, and what ``~cat.df.all_present`` gives a failed run) was refused instead."""
    prompts = [PROMPT, "a green square and a red triangle", "a blue circle and a blue square",
               "a yellow triangle and a green circle"]
    cat = ats.sweep(sd_pipe, prompts, "0-2", out=tmp_path / "s", **RUN)
    lost = pd.Series([i % 3 == 0 for i in range(len(cat.df))], index=cat.df.index, dtype="boolean")
    lost.iloc[1] = pd.NA
    cat.df["lost"] = lost
    for missing in ("lost", cat.df.lost, list(cat.df.lost), dict(zip(cat.df.run, cat.df.lost))):
        model = fit_neglect_risk(cat, missing, steps=[1], folds=2, client=client, progress=False)
        assert model["runs"] == len(cat.df) - 1


# --- a catalog behind its rows ------------------------------------------------------------------------------------


def test_a_catalog_older_than_runs_redone_since_is_read_from_the_rows(sd_pipe, tmp_path):
    """A sweep that redid runs and stopped before rewriting its catalog (killed, power cut) left a catalog with as
    many rows as row files: open_catalog took it, so a redone run read as failed, and a run whose trace was redone was
    refused as 'replaced ... its data are not this run's' though they were."""
    out = tmp_path / "s"
    prompts = ["a red circle", "a blue square"]
    _fail_run(out, prompts[0], 1)
    first = ats.sweep(sd_pipe, prompts, "0-1", out=out, **RUN)
    failed, redone = run_id(prompts[0], 1), run_id(prompts[1], 0)
    assert first.df.set_index("run").status[failed] == "failed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an up-to-date catalog is read as it is, without a word
        assert ats.open_catalog(out).df.status.tolist() == first.df.status.tolist()
    old, written = (out / "catalog.parquet").read_bytes(), (out / "catalog.parquet").stat().st_mtime
    (out / "traces" / f"{failed}.zarr").unlink()
    shutil.rmtree(out / "traces" / f"{redone}.zarr")
    ats.sweep(sd_pipe, prompts, "0-1", out=out, **RUN)  # redoes both
    (out / "catalog.parquet").write_bytes(old)  # as if it had stopped before rewriting its catalog
    os.utime(out / "catalog.parquet", (written, written))
    with pytest.warns(ats.AttnscopeWarning, match=r"is older than 2 of the 4 row files"):
        cat = ats.open_catalog(out)
    df = cat.df.set_index("run")
    assert (df.status == "complete").all()
    row = json.loads((out / "rows" / f"{redone}.json").read_text())
    assert df.trace_id[redone] == row["trace_id"] and cat.trace(redone).manifest["run"]["seed"] == 0
    assert cat.trace(failed).manifest["run"]["seed"] == 1


# --- map_stats' joining rules ------------------------------------------------------------------------------------


def test_map_stats_refuses_a_result_that_names_the_run_or_a_column_twice(sd_pipe, tmp_path, client):
    """A frame whose named index level is also a column raised pandas' bare 'cannot insert step, already exists'; a
    dict with a 'run' entry gave a table with 'run' both as its index and as a column holding fn's value."""
    cat = ats.sweep(sd_pipe, ["a red circle"], 0, out=tmp_path / "s", **RUN)
    frame = pd.DataFrame({"step": [0, 1], "v": [1.0, 2.0]}).set_index("step", drop=False)
    with pytest.raises(ats.AttnscopeError, match=r"index level 'step' is also a column, for run 'a-red-circle-"):
        cat.map_stats(lambda tr: frame, client=client, progress=False)
    with pytest.raises(ats.AttnscopeError, match=r"a 'run' entry for run 'a-red-circle-.*map_stats adds the run"):
        cat.map_stats(lambda tr: {"run": "mine", "v": 1.0}, client=client, progress=False)
    table = cat.map_stats(lambda tr: frame.reset_index(drop=True).set_index("v"), client=client, progress=False)
    assert table.columns.tolist() == ["run", "v", "step"] and table.step.tolist() == [0, 1]  # the rule that holds


# --- the same sweep, set the same way or another ------------------------------------------------------------------


def test_the_command_line_resumes_a_sweep_left_at_the_pipelines_own_defaults(tmp_path):
    """``attnscope sweep`` passes --steps 20 (the shapes model's own default) and --capture-steps 0:2 as a slice; a
    folder from ``ats.sweep("shapes", …)`` without num_inference_steps and with steps=[0, 1] is the same sweep, but was
    refused: ``capture: {…} then, {'num_inference_steps': 20, …} now``."""
    out = tmp_path / "s"
    cat = ats.sweep("shapes", [PROMPT], 0, out=out, steps=[0, 1], progress=False)
    assert cat.df.steps.tolist() == [20] and _captured_steps(cat.trace(0)) == [0, 1]
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    done = cli("sweep", prompts, "--seeds", "0", "--out", out, "--capture-steps", "0:2", "--no-progress")
    assert done.exit_code == 0, done.stderr
    assert ats.open_catalog(out).df.seconds.equals(cat.df.seconds)  # skipped, not redone
    done = cli("sweep", prompts, "--seeds", "0", "--out", out, "--capture-steps", "0:3", "--no-progress")
    assert done.exit_code == 2 and "other settings" in done.stderr and "'steps': [0, 1]" in done.stderr


def test_steps_written_another_way_or_at_a_default_resume_the_same_sweep(sd_pipe, tmp_path):
    out = tmp_path / "s"
    run = dict(RUN, num_inference_steps=3)
    cat = ats.sweep(sd_pipe, ["a cat"], 0, out=out, steps=range(0, 2), **run)
    import numpy as np

    for steps in ([0, 1], (1, 0), np.arange(2), slice(None, 2)):
        again = ats.sweep(sd_pipe, ["a cat"], 0, out=out, steps=steps, guidance_scale=7.5, **run)  # SD's own 7.5
        assert again.df.seconds.equals(cat.df.seconds)
    with pytest.raises(ats.AttnscopeError, match=r"other settings .*'steps': \[0, 1\]"):
        ats.sweep(sd_pipe, ["a cat"], 0, out=out, steps=[0, 2], **run)
    with pytest.raises(ats.AttnscopeError, match=r"other settings .*'guidance_scale': 5"):
        ats.sweep(sd_pipe, ["a cat"], 0, out=out, steps=[0, 1], guidance_scale=5, **run)
    # a sweep.json written before steps were resolved holds the range's repr: it still resumes
    settings = json.loads((out / "sweep.json").read_text())
    settings["capture"]["steps"] = "range(0, 2)"
    (out / "sweep.json").write_text(json.dumps(settings))
    assert ats.sweep(sd_pipe, ["a cat"], 0, out=out, steps=[0, 1], **run).df.seconds.equals(cat.df.seconds)


# --- prompts files ------------------------------------------------------------------------------------------------


def test_a_prompts_file_line_ends_only_at_a_line_end(tmp_path):
    """str.splitlines() also split a line at a form feed, U+2028, U+0085, …: one prompt became two runs."""
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red circle\u2028and a cat\r\n# a comment\r\n\r\nün 猫\x0cdog\x85x\rlast".encode())
    assert read_prompts(f) == ["a red circle\u2028and a cat", "ün 猫\x0cdog\x85x", "last"]

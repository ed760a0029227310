"""Second audit of ats.sweep, the catalog and the early warning over a sweep: a run is one image, a prompts file
with a byte order mark, traces written over or deleted after the sweep catalogued them, and the outcomes that
``fit_neglect_risk`` takes."""

import shutil
import warnings

import pytest

import attnscope as ats
from attnscope.sweep import fit_neglect_risk, read_prompts, run_id

from .conftest import cli

RUN = dict(num_inference_steps=2, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as c:
        yield c


# --- a run is one image -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 2])
def test_images_per_prompt_other_than_one_is_refused_before_the_folder_is_made(sd_pipe, tmp_path, count):
    """0 failed every run (a folder of failed runs, though the value can be checked before); 2 ran, and the row, its
    PNG and the detector's columns held the first image only, without a word."""
    out = tmp_path / "s"
    with pytest.raises(ats.AttnscopeError, match=rf"num_images_per_prompt={count}"):
        ats.sweep(sd_pipe, ["a red circle"], 0, out=out, num_images_per_prompt=count, **RUN)
    assert not out.exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    result = cli("sweep", prompts, "--seeds", "0", "--out", out, "--steps", "2", "--set", f"num_images_per_prompt={count}")
    assert result.exit_code == 2 and f"num_images_per_prompt={count}" in result.stderr and not out.exists()


def test_a_prompts_file_with_a_byte_order_mark_reads_as_written(tmp_path):
    """Windows editors start UTF-8 files with a byte order mark: it was read into the first line, so a first-line
    comment became a prompt ('\\ufeff# ...') and a first prompt got another run id than the same prompt typed."""
    f = tmp_path / "prompts.txt"
    f.write_bytes("# two objects\r\na red circle and a blue square\r\n".encode("utf-8-sig"))
    assert read_prompts(f) == ["a red circle and a blue square"]
    f.write_bytes("a red circle\n".encode("utf-8-sig"))
    assert read_prompts(f) == ["a red circle"]


# --- the catalog agrees with the traces on disk ----------------------------------------------------------------------


def test_a_trace_written_over_after_cataloguing_is_never_taken_for_the_run(sd_pipe, tmp_path, client):
    """Another capture written over a run's trace path (overwrite=True) was handed out as that run's trace: the
    catalog said 'a blue square', seed 0, the trace held 'a red circle', seed 5; map_stats attributed its numbers to
    the run, and a resume took it as done."""
    out = tmp_path / "s"
    prompts = ["a blue square", "a red circle"]
    cat = ats.sweep(sd_pipe, prompts, 0, out=out, **RUN)
    blue, red = run_id(prompts[0], 0), run_id(prompts[1], 0)
    assert cat.df.trace_id.str.fullmatch("[0-9a-f]{32}").all()
    kw = {k: v for k, v in RUN.items() if k != "progress"}
    ats.capture(sd_pipe, "a red circle", seed=5, store=out / "traces" / f"{blue}.zarr", overwrite=True, **kw)
    for catalog in (cat, ats.open_catalog(out)):
        with pytest.raises(ats.AttnscopeError, match=rf"run '{blue}': its trace .* was replaced since the sweep "
                                                     rf"catalogued it.*rerun the sweep"):
            catalog.trace(blue)
    assert catalog.trace(red).manifest["run"]["prompts"] == ["a red circle"]
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        seeds = cat.map_stats(lambda tr: {"seed": tr.manifest["run"]["seed"]}, client=client, progress=False)
    assert list(seeds.index) == [red] and seeds.seed.tolist() == [0]
    assert "replaced since the sweep catalogued it" in seeds.attrs["skipped"][blue]

    finished = dict(zip(cat.df.run, cat.df.finished))
    again = ats.sweep(sd_pipe, prompts, 0, out=out, **RUN)  # the run whose trace is not its own is redone
    redone = dict(zip(again.df.run, again.df.finished))
    assert redone[red] == finished[red] and redone[blue] != finished[blue]
    run = again.trace(blue).manifest["run"]
    assert (run["prompts"], run["seed"]) == (["a blue square"], 0)

    shutil.rmtree(out / "traces" / f"{red}.zarr")  # a trace deleted after cataloguing: said so, naming the run
    with pytest.raises(ats.AttnscopeError, match=rf"run '{red}': its trace .* is gone \(deleted since the sweep "
                                                 rf"catalogued it\); rerun the sweep"):
        again.trace(red)


# --- fit_neglect_risk's outcomes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def risk_sweep(tmp_path_factory, sd_pipe):
    prompts = ["a red circle and a blue square", "a green square and a red triangle",
               "a blue circle and a blue square", "a yellow triangle and a green circle"]
    cat = ats.sweep(sd_pipe, prompts, "0-2", out=tmp_path_factory.mktemp("risk") / "s", **RUN)
    cat.df["lost"] = [i % 3 == 0 for i in range(len(cat.df))]
    return cat


def test_fit_neglect_risk_takes_a_column_of_the_catalog_aligned_by_its_rows(risk_sweep, client):
    """``missing=cat.df.lost`` (or its values as a list) is indexed by row number, not by run: no run matched, and
    the fit returned a model with no steps and no runs, without a word."""
    cat = risk_sweep
    fit = dict(steps=[1], client=client, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_run = fit_neglect_risk(cat, dict(zip(cat.df.run, cat.df.lost)), **fit)
        assert by_run["runs"] == 12 and list(by_run["steps"]) == ["1"]
        for missing in (cat.df["lost"], cat.df["lost"].tolist(), "lost"):
            model = fit_neglect_risk(cat, missing, **fit)
            assert model["steps"] == by_run["steps"] and model["missing_rate"] == pytest.approx(4 / 12)


def test_fit_neglect_risk_refuses_outcomes_that_are_not_bools_or_not_the_catalogs_runs(risk_sweep, client):
    """Text outcomes were cast with bool(): 'no' and 'False' counted as an object lost; run ids of another sweep (or
    row numbers of another frame) matched nothing and gave an empty model."""
    cat = risk_sweep
    fit = dict(steps=[1], client=client, progress=False)
    first = cat.df.run.iloc[0]
    with pytest.raises(ats.AttnscopeError, match=rf"missing: 'no' for run '{first}'; expected True"):
        fit_neglect_risk(cat, {run: "no" for run in cat.df.run}, **fit)
    with pytest.raises(ats.AttnscopeError, match=r"missing: 0\.5 for run"):
        fit_neglect_risk(cat, [0.5] * len(cat.df), **fit)
    with pytest.raises(ats.AttnscopeError, match=r"missing: none of its runs \('x', 'y'\) is a run of the catalog"):
        fit_neglect_risk(cat, {"x": True, "y": False}, **fit)
    with pytest.raises(ats.AttnscopeError, match=r"missing: 3 values for the 12 runs"):
        fit_neglect_risk(cat, [True, False, True], **fit)


@pytest.mark.parametrize("devices", [",", " ", ""])
def test_devices_that_name_no_device_are_one_error_repeating_the_flag(tmp_path, devices):
    """``--devices ,`` said ``--devices []: expected a non-empty list … ['cuda:0', 'cuda:1']`` (the parsed list in
    Python's words, not what was typed); ``--devices ''`` ran on one worker in this process, as if it were not given."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    result = cli("sweep", prompts, "--seeds", "0", "--out", tmp_path / "s", "--devices", devices)
    assert result.exit_code == 2 and result.stderr.strip() == (f"error: --devices {devices!r}: expected device names "
                                                                f"separated by commas, e.g. cuda:0,cuda:1")
    assert not (tmp_path / "s").exists()

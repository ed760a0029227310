"""Bad input on the command line (issue 17): one ``error:`` line in the CLI's own flags, exit status 2, no
traceback, and nothing written (no store, no image, no table) when the input is rejected; the same
inputs in Python raise ``ats.AttnscopeError``. Each test runs the commands as a user would (``cli``)."""

import json

import pytest
import torch

import attnscope as ats

from .conftest import RUN, cli, error_line

PROMPT = "a red circle and a blue square"
STEPS = 20  # the trace of the stats/plot tests: a 20-step run, as in the issue
BIG_SEED = "99999999999999999999"  # > 2**64 - 1: torch.Generator.manual_seed overflows


@pytest.fixture(scope="module")
def parent(shapes, tmp_path_factory):
    """A complete 20-step trace of the shapes model."""
    return ats.capture(shapes, PROMPT, seed=0, store=tmp_path_factory.mktemp("parent") / "a.zarr",
                       num_inference_steps=STEPS)


# -- losing nothing -----------------------------------------------------------------------------------------
def test_demo_refuses_to_replace_a_trace_and_its_images_without_overwrite(shapes, tmp_path):
    """`demo --out runs/a.zarr` over an earlier trace (and its PNGs) replaced them; now it refuses, as capture does."""
    store = tmp_path / "a.zarr"
    ats.capture(shapes, "a green triangle", seed=5, store=store, num_inference_steps=3)
    image, figure = tmp_path / "a.png", tmp_path / "a-heatmaps.png"
    image.write_bytes(b"my image")
    figure.write_bytes(b"my figure")
    line = error_line(cli("demo", "--out", store))
    assert f"store '{store}' exists; pass --overwrite to replace it" in line
    assert ats.open_trace(store).manifest["run"]["prompts"] == ["a green triangle"]
    assert image.read_bytes() == b"my image" and figure.read_bytes() == b"my figure"


def test_demo_refuses_to_replace_images_beside_a_new_trace(tmp_path):
    (tmp_path / "b-heatmaps.png").write_bytes(b"keep")
    line = error_line(cli("demo", "--out", tmp_path / "b.zarr"))
    assert "b-heatmaps.png" in line and "pass --overwrite to replace them" in line
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "b.png").exists()


def test_demo_overwrite_replaces_the_trace_and_its_images(shapes, tmp_path):
    store = tmp_path / "a.zarr"
    ats.capture(shapes, "a green triangle", seed=5, store=store, num_inference_steps=3)
    (tmp_path / "a.png").write_bytes(b"old")
    done = cli("demo", "--out", store, "--overwrite")
    assert done.exit_code == 0, done.stderr
    assert ats.open_trace(store).manifest["run"]["prompts"] == [PROMPT]
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("option, message", [
    (["--regulate", "hexagon"], "target 'hexagon' is not in the prompt"),
    (["--reweight", "hexagon=2"], "target 'hexagon' is not in the prompt"),
    (["--excite", "hexagon"], "target 'hexagon' is not in the prompt"),
    (["--layout", "hexagon=0.2,0.5"], "layout phrase 'hexagon' is not in the prompt"),
    (["--tgate", "50"], "TGate: --tgate 50 on a run of 20 steps"),
])
def test_a_rerun_whose_interventions_fail_leaves_no_store(parent, tmp_path, option, message):
    """It left an empty incomplete store, and the retry then failed with 'store exists'."""
    out = tmp_path / "x.zarr"
    assert message in error_line(cli("rerun", parent.path, *option, "-o", out))
    assert not out.exists()


def test_the_retry_of_a_rejected_rerun_runs(parent, tmp_path):
    out = tmp_path / "x.zarr"
    error_line(cli("rerun", parent.path, "--regulate", "hexagon", "-o", out))
    done = cli("rerun", parent.path, "--reweight", "square=2", "-o", out)
    assert done.exit_code == 0, done.stderr
    assert ats.open_trace(out).complete


def test_python_rerun_and_hooks_reject_unknown_targets_before_the_store(shapes, parent, tmp_path):
    reg = ats.regulate.AttentionRegulation(targets=["hexagon"])
    with pytest.raises(ats.AttnscopeError, match="'hexagon' is not in the prompt"):
        ats.rerun(parent, [reg], store=tmp_path / "r.zarr", pipe=shapes)
    assert not (tmp_path / "r.zarr").exists()
    # the same with the hook API: the intervention checks its words at the first step, before the recorder writes
    recorder = ats.Recorder(tmp_path / "h.zarr")
    with pytest.raises(ats.AttnscopeError, match="'hexagon' is not in the prompt"):
        with ats.hooks(shapes, ats.regulate.Reweight("hexagon", 2.0), recorder):
            shapes(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    assert not (tmp_path / "h.zarr").exists()


# -- capture --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "error: --steps 0: expected an int >= 1"),  # was a ZeroDivisionError
    (["--steps", "-3"], "error: --steps -3: expected an int >= 1"),  # was "the *output* is not an attnscope trace"
    (["--seed", BIG_SEED], f"error: --seed {BIG_SEED}: expected an int from 0 to 2**64 - 1"),
    (["--capture-steps", "30:40"], "error: --capture-steps 30:40: selects no step of this run's 3 steps"),
    (["--capture-steps", "0:3:0"], "error: --capture-steps 0:3:0: expected a slice whose STEP is not 0"),
    (["--seed", "-1"], "error: --seed -1: expected an int from 0 to 2**64 - 1"),         # was taken as 2**64 - 1
    (["--images-per-prompt", "0"], "error: --images-per-prompt 0: expected an int >= 1"),   # was a reshape error
    (["--device", "nonsense"], "error: --device 'nonsense': not a device this torch can use"),
])
def test_capture_rejects_bad_numbers_before_writing(tmp_path, args, message):
    out = tmp_path / "c.zarr"
    base = {"--steps": "3"}
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [x for kv in base.items() for x in kv]
    assert error_line(cli("capture", "--prompt", "a red circle", *flat, "--out", out)).startswith(message)
    assert not out.exists()


def test_capture_refuses_an_empty_prompt(shapes, tmp_path):
    """It captured a trace whose words were 'none: … prompt given as embeddings' for every later question."""
    out = tmp_path / "e.zarr"
    line = error_line(cli("capture", "--prompt", "", "--steps", "2", "--out", out))
    assert line.startswith("error: --prompt '': the prompt is empty") and not out.exists()
    with pytest.raises(ats.AttnscopeError, match=r"prompt\[1\]='  ': the prompt is empty"):
        ats.capture(shapes, ["a red circle", "  "], seed=0, store=out, num_inference_steps=2)
    assert not out.exists()


def test_a_prompt_longer_than_clip_keeps_is_refused(sd_pipe, shapes, tmp_path):
    """The pipeline would cut it silently (a transformers warning): say how many tokens it has and what goes."""
    prompt = "a red circle " * 30  # 90 words: 92 CLIP tokens with the start and end tokens
    with pytest.raises(ats.AttnscopeError, match=r"92 CLIP tokens .*more than the 77 the tokenizer keeps; the "
                                                 r"pipeline would cut the last 15"):
        ats.capture(sd_pipe, prompt, seed=0, store=tmp_path / "l.zarr", **RUN)
    assert not (tmp_path / "l.zarr").exists()
    ats.capture(sd_pipe, "a red circle " * 25, seed=0, store=tmp_path / "ok.zarr", **RUN)  # 77 tokens: kept whole
    # the shapes model's tokenizer keeps 16
    line = error_line(cli("capture", "--prompt", "a red circle and a blue square " * 3, "--out", tmp_path / "s.zarr"))
    assert "23 CLIP tokens" in line and "the 16 the tokenizer keeps" in line and "cut the last 7" in line


def test_messages_name_the_cli_flags_not_the_python_keywords(parent, tmp_path):
    line = error_line(cli("capture", "--prompt", "a red circle", "--steps", "2", "--out", parent.path))
    assert "pass --overwrite to replace it" in line and "overwrite=True" not in line
    out = tmp_path / "r.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = error_line(cli("rerun", parent.path, "-o", out, "--overwrite"))
    assert "--overwrite only replaces traces" in line and (out / "notes.txt").read_text() == "mine"


# -- seeds everywhere -----------------------------------------------------------------------------------------
def test_a_seed_beyond_64_bits_is_one_error_everywhere(parent, tmp_path):
    expected = f"{BIG_SEED}: expected an int from "
    assert expected in error_line(cli("demo", "--seed", BIG_SEED, "--out", tmp_path / "d.zarr"))
    assert not (tmp_path / "d.zarr").exists() and not (tmp_path / "d.png").exists()
    line = error_line(cli("eval", "--prompts", "two", "--n", "2", "--seed", BIG_SEED, "--json", tmp_path / "e.json"))
    assert line.startswith(f"error: --seed {BIG_SEED}: expected an int from") and not (tmp_path / "e.json").exists()
    last = str(2**64 - 1)  # prompt i runs with SEED + i: the second prompt's seed would overflow
    assert f"--seed {last}: expected an int from 0 to {2**64 - 2}" in error_line(
        cli("eval", "--prompts", "two", "--n", "2", "--seed", last))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for seeds in (BIG_SEED, "0-" + BIG_SEED):  # the range is refused before it is listed
        assert f"--seeds '{seeds}': expected at most" in error_line(
            cli("sweep", prompts, "--seeds", seeds, "--out", tmp_path / "s1", "--no-progress"))
    assert not (tmp_path / "s1").exists()
    # rerun takes the seed from the manifest: a crafted one is refused, not an overflow traceback
    crafted = tmp_path / "crafted.zarr"
    ats.rerun(parent, store=crafted)
    meta = json.loads((crafted / "zarr.json").read_text())
    meta["attributes"]["manifest"]["run"]["seed"] = int(BIG_SEED)
    (crafted / "zarr.json").write_text(json.dumps(meta))
    line = error_line(cli("rerun", crafted, "-o", tmp_path / "again.zarr"))
    assert f"seed={BIG_SEED} in its manifest" in line and not (tmp_path / "again.zarr").exists()


def test_python_seeds_are_checked(shapes, tmp_path):
    with pytest.raises(ats.AttnscopeError, match=rf"seed={BIG_SEED}: expected an int from 0 to 2\*\*64 - 1"):
        ats.capture(shapes, "a red circle", seed=int(BIG_SEED), store=tmp_path / "a.zarr", num_inference_steps=2)
    # torch takes -1 as 2**64 - 1: a negative seed would give one image two seeds, so it is refused
    with pytest.raises(ats.AttnscopeError, match=r"seed\[1\]=-1: expected an int from 0 to 2\*\*64 - 1"):
        ats.capture(shapes, "a red circle", seed=[0, -1], store=tmp_path / "a.zarr", num_inference_steps=2,
                    num_images_per_prompt=2)
    with pytest.raises(ats.AttnscopeError, match=r"seed\[1\]=-1\.5: expected an int"):
        ats.capture(shapes, "a red circle", seed=[0, -1.5], store=tmp_path / "a.zarr", num_inference_steps=2,
                    num_images_per_prompt=2)
    assert not (tmp_path / "a.zarr").exists()


def test_sweep_rejects_bad_capture_arguments_before_creating_its_folder(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    line = error_line(cli("sweep", prompts, "--seeds", "0", "--out", tmp_path / "s1", "--steps", "0", "--no-progress"))
    assert "--steps 0: expected an int >= 1" in line
    line = error_line(cli("sweep", prompts, "--seeds", "0", "--out", tmp_path / "s1", "--steps", "3",
                          "--capture-steps", "5:9", "--no-progress"))
    assert "--capture-steps 5:9: selects no step of this run's 3 steps" in line
    assert not (tmp_path / "s1").exists()


# -- stats and plot -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, message", [
    ("30:40", "error: --steps 30:40: selects no step of this run's 20 steps (0..19)"),
    ("5:2", "error: --steps 5:2: selects no step of this run's 20 steps (0..19): START 5 is not before STOP 2"),
])
def test_stats_steps_that_select_nothing(parent, steps, message):
    """They gave IndexError: argmax(): Expected reduction dim 3 to have non-zero size."""
    assert error_line(cli("stats", parent.path, "--steps", steps)) == message
    assert error_line(cli("stats", parent.path, "--steps", steps, "--convergence")) == message
    with pytest.raises(ats.AttnscopeError, match="selects no step"):
        ats.stats.dominance(parent, steps=slice(*map(int, steps.split(":"))))


@pytest.fixture(scope="module")
def empty_prompt_trace(shapes, tmp_path_factory):
    """A trace of an empty prompt, recorded with the hook API (capture refuses one now, older ones exist)."""
    recorder = ats.Recorder(tmp_path_factory.mktemp("empty") / "e.zarr")
    with ats.hooks(shapes, recorder):
        out = shapes("", generator=torch.Generator().manual_seed(0), num_inference_steps=3)
        recorder.add_images(out.images)
    return ats.open_trace(recorder.path)


def test_stats_and_plot_on_an_empty_prompt_trace(empty_prompt_trace, tmp_path):
    tr = empty_prompt_trace
    assert "its prompt has no words (an empty prompt" in error_line(cli("stats", tr.path))
    assert "its prompt has no words" in error_line(cli("plot", tr.path, "-o", tmp_path / "h.png"))
    assert not (tmp_path / "h.png").exists()
    with pytest.raises(ats.AttnscopeError, match="no word to measure"):
        ats.stats.dominance(tr)
    with pytest.raises(ats.AttnscopeError, match="its words are: none: the prompt is empty"):  # not "embeddings"
        ats.stats.dominance(tr, targets=["circle"])


class Killed(Exception):
    pass


@pytest.mark.filterwarnings("ignore::attnscope.AttnscopeWarning")  # "trace … is incomplete": said by the reader
def test_a_trace_with_no_step_written(shapes, tmp_path):
    """A capture stopped after its store was created and before its first step was stored (as a kill would)."""
    store = tmp_path / "k.zarr"

    class Kill:  # stops the run at its first attention call: the recorder has created the store, written no step
        role = "observer"

        def stages(self, ctx):
            raise Killed

    with pytest.raises(Killed), ats.hooks(shapes, ats.Recorder(store), Kill()):
        shapes(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    tr = ats.open_trace(store)
    assert not tr.complete and tr.steps_written == 0
    assert "has no step written" in error_line(cli("stats", store))
    assert "has no step written" in error_line(cli("plot", store, "-o", tmp_path / "k.png"))
    assert not (tmp_path / "k.png").exists()


def test_plot_checks_the_figure_format_first(parent, tmp_path):
    """matplotlib's 'Format 'zarr' is not supported' came after the figure was drawn, as a traceback."""
    line = error_line(cli("plot", parent.path, "-o", tmp_path / "out.zarr"))
    assert line.startswith(f"error: -o '{tmp_path / 'out.zarr'}': expected a file name ending in ") and ".png" in line
    assert not (tmp_path / "out.zarr").exists()
    (tmp_path / "fig.png").mkdir()
    assert "is a directory" in error_line(cli("plot", parent.path, "-o", tmp_path / "fig.png"))
    (tmp_path / "notes").write_text("mine")
    assert "is a file, not a directory" in error_line(cli("plot", parent.path, "-o", tmp_path / "notes" / "h.png"))


def test_outputs_of_eval_and_sweep_stats_are_checked_first(tmp_path):
    (tmp_path / "e.json").mkdir()
    line = error_line(cli("eval", "--prompts", "two", "--n", "1", "--steps", "2", "--json", tmp_path / "e.json"))
    assert "--json" in line and "is a directory" in line
    line = error_line(cli("sweep-stats", tmp_path / "no-sweep", "-o", tmp_path / "t.xlsx"))
    assert "expected a file name ending in .parquet or .csv" in line


def test_figure_json_and_table_outputs_are_not_replaced_without_overwrite(parent, tmp_path):
    """`plot -o`, `eval --json` and `sweep-stats -o` replaced an existing file silently; report and capture refused."""
    figure, result, table = tmp_path / "h.png", tmp_path / "e.json", tmp_path / "t.csv"
    for path in (figure, result, table):
        path.write_text("mine")
    assert error_line(cli("plot", parent.path, "-o", figure)) == f"error: -o '{figure}' exists; pass --overwrite to replace it"
    assert error_line(cli("eval", "--prompts", "two", "--n", "1", "--steps", "2", "--json", result)) == \
        f"error: --json '{result}' exists; pass --overwrite to replace it"
    assert error_line(cli("sweep-stats", tmp_path / "no-sweep", "-o", table)) == \
        f"error: -o '{table}' exists; pass --overwrite to replace it"
    assert {p.read_text() for p in (figure, result, table)} == {"mine"}
    done = cli("plot", parent.path, "-o", figure, "--overwrite")
    assert done.exit_code == 0 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = cli("eval", "--prompts", "two", "--n", "1", "--steps", "2", "--json", result, "--overwrite")
    assert done.exit_code == 0 and json.loads(result.read_text())["n"] == 1


def test_eval_rejects_zero_steps_before_generating(tmp_path):
    line = error_line(cli("eval", "--prompts", "two", "--n", "1", "--steps", "0", "--json", tmp_path / "e.json"))
    assert "--steps 0: expected an int >= 1" in line and not (tmp_path / "e.json").exists()


def test_an_intervention_acting_at_no_step_is_refused(shapes):
    with pytest.raises(ats.AttnscopeError, match="steps=30:40: selects no step of this run's 3 steps"):
        with ats.hooks(shapes, ats.regulate.Reweight("square", 2.0, steps=slice(30, 40))):
            shapes(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3)


def test_a_target_missing_from_one_of_several_prompts_names_that_prompt(shapes):
    prompts = [PROMPT, "a green triangle"]
    for client in (ats.regulate.Reweight("square", 2.0), ats.regulate.AttentionRegulation(["circle", "square"])):
        with pytest.raises(ats.AttnscopeError, match=r"^prompt 1 of 2 \('a green triangle'\): target '(square|circle)' "
                                                     r"is not in the prompt; its words are: a, green, triangle; to target "
                                                     r"other words per prompt, give targets as a function of the prompt$"):
            with ats.hooks(shapes, client):
                shapes(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    # a function of the prompt is the way: each prompt gets its own words
    per_prompt = ats.regulate.Reweight(lambda p: "square" if "square" in p else "triangle", 2.0)
    with ats.hooks(shapes, per_prompt):
        shapes(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=2)


# -- found by a new user's audit (2026-12-05): each was a traceback, a silent other run, or a folder that blocked
# the corrected command
def test_rerun_refuses_empty_targets_and_a_spatial_weight_without_a_layout(parent, tmp_path):
    out = tmp_path / "r.zarr"
    assert "--regulate ',': expected comma-separated words" in error_line(
        cli("rerun", parent.path, "--regulate", ",", "-o", out))                   # was a plain rerun
    assert "--excite '': expected comma-separated words" in error_line(cli("rerun", parent.path, "--excite", "", "-o", out))
    assert "--spatial-weight sets SpatialTemporal's λ: give --layout" in error_line(
        cli("rerun", parent.path, "--spatial-weight", "3", "-o", out))             # was ignored
    assert not out.exists()


def test_plot_dpi_and_report_tolerance_are_checked(parent, tmp_path):
    assert error_line(cli("plot", parent.path, "-o", tmp_path / "f.png", "--dpi", "0")) == \
        "error: --dpi 0: expected an int >= 1 (dots per inch)"
    assert error_line(cli("report", parent.path, "-o", tmp_path / "r.html", "--tol", "-1")) == \
        "error: --tol -1.0: expected a positive tolerance"                          # was a report saying so inside
    assert not (tmp_path / "f.png").exists() and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "error: --steps 0: expected an int >= 1"),                  # started 600 autoencoder steps
    (["--vae-steps", "-1"], "error: --vae-steps -1: expected an int >= 1"),
    (["--threads", "0"], "error: --threads 0: expected an int >= 1"),
    (["--checkpoint-every", "0"], "error: --checkpoint-every 0: expected an int >= 1"),   # was a ZeroDivisionError
    (["--resume"], "no run to resume there (the directory does not exist)"),
])
def test_train_shapes_checks_its_numbers_before_making_its_folder(tmp_path, args, message):
    out = tmp_path / "run"
    assert message in error_line(cli("train-shapes", "--out", out, *args))
    assert not out.exists()


def test_a_sweep_that_made_nothing_leaves_its_folder_to_the_corrected_command(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two objects\na red circle and a blue square\n")
    out = tmp_path / "s1"
    line = error_line(cli("sweep", prompts, "--seeds", "0", "--out", out, "--steps", "2", "--height", "20",
                          "--no-progress"))
    assert "every run failed" in line and "--height 20" in line
    done = cli("sweep", prompts, "--seeds", "0", "--out", out, "--steps", "2", "--no-progress")   # was "other settings"
    assert done.exit_code == 0, done.stderr
    assert ats.open_catalog(out).df.status.tolist() == ["complete"]
    assert "--dtype 'float64': expected one of float32" in error_line(
        cli("sweep", prompts, "--seeds", "0", "--out", tmp_path / "s2", "--dtype", "float64"))
    assert not (tmp_path / "s2").exists()


def test_a_sweep_refuses_a_trace_or_a_folder_of_other_files(parent, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    before = sorted(p.name for p in parent.path.iterdir())
    line = error_line(cli("sweep", prompts, "--seeds", "0", "--out", parent.path, "--steps", "2"))
    assert line.endswith("is an attnscope trace; give a new or empty folder for the sweep")
    assert sorted(p.name for p in parent.path.iterdir()) == before                  # nothing written into it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert "is a folder that is not a sweep (no sweep.json)" in error_line(
        cli("sweep", prompts, "--seeds", "0", "--out", mine, "--steps", "2"))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_eval_skips_comment_lines_of_a_prompts_file(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n# a note\n\na blue square\n")
    assert ats.models.eval_prompts(prompts) == ["a red circle", "a blue square"]   # '#' was a prompt


@pytest.mark.parametrize("command, setting, flag", [
    (["capture", "--prompt", PROMPT, "--steps", "2"], "num_inference_steps=3", "--steps"),
    (["capture", "--prompt", PROMPT, "--steps", "2"], "seed=3", "--seed"),
    (["capture", "--prompt", PROMPT, "--steps", "2"], "guidance_scale=5", "--guidance"),
])
def test_a_set_of_what_the_command_sets_itself_names_its_flag(tmp_path, command, setting, flag):
    """It was a TypeError traceback ('got multiple values for keyword argument'), or --set silently won."""
    out = tmp_path / "x.zarr"
    line = error_line(cli(*command, "--out", out, "--set", setting))
    name = setting.split("=")[0]
    assert f"--set {name}: the command sets {name} itself; use {flag}" in line
    assert not out.exists()


def test_a_set_the_pipeline_fails_on_is_one_error_saying_what_is_left(tmp_path):
    out = tmp_path / "e.zarr"
    line = error_line(cli("capture", "--prompt", PROMPT, "--steps", "2", "--out", out, "--set", "eta=abc"))
    assert "the pipeline failed: TypeError" in line and "check the --set values: eta=abc" in line
    if out.exists():  # the scheduler fails inside the first step: what was written is kept and said so
        assert "incomplete trace at --out" in line
    line = error_line(cli("capture", "--prompt", PROMPT, "--steps", "2", "--out", tmp_path / "f.zarr",
                          "--set", "return_dict=false"))
    assert "the command sets return_dict itself" in line
    with pytest.raises(ats.AttnscopeError, match="return_dict=False: capture reads the images"):
        ats.capture(ats.load_pipeline("shapes"), PROMPT, seed=0, store=tmp_path / "g.zarr", return_dict=False)


@pytest.mark.parametrize("command", [
    ["capture", "--prompt", PROMPT, "--steps", "2", "--out", "s3://bucket/x.zarr"],
    ["capture", "--prompt", PROMPT, "--steps", "2", "--out", "gs://bucket/x.zarr"],
    ["demo", "--out", "s3://bucket/demo.zarr"],
])
def test_a_url_given_as_a_store_is_refused_not_written_as_a_local_folder(tmp_path, monkeypatch, command):
    """typer's Path type turned s3://bucket/x.zarr into s3:/bucket/x.zarr, a local folder named 's3:'."""
    monkeypatch.chdir(tmp_path)
    line = error_line(cli(*command))
    assert "//bucket/" in line and ("local directory" in line or "pip install gcsfs" in line)
    assert list(tmp_path.iterdir()) == []


def test_a_url_given_as_an_output_file_is_refused(parent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["plot", str(parent.path), "-o", "s3://bucket/f.png"],
                    ["report", str(parent.path), "-o", "s3://bucket/r.html"],
                    ["eval", "--n", "1", "--json", "s3://bucket/e.json"]):
        assert "expected a local file path" in error_line(cli(*command))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n", ["0", "-1"])
def test_eval_refuses_a_count_below_one_for_a_prompt_file(tmp_path, n):
    """--n -1 on a 3-line file evaluated 2 prompts (a slice from the end), --n 0 all of them."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    assert f"--n {n}: expected a positive number of prompts" in error_line(cli("eval", "--prompts", prompts, "--n", n))


def test_a_negative_prompt_outside_the_vocabulary_names_its_own_flag(tmp_path):
    line = error_line(cli("capture", "--prompt", PROMPT, "--steps", "2", "--out", tmp_path / "n.zarr",
                          "--negative-prompt", "purple"))
    assert line.startswith("error: --negative-prompt 'purple': words outside")


def test_gated_steps_are_named_not_shown_blank(parent, tmp_path):
    """stats printed an all-'—' table and plot drew empty heat maps at steps TGATE gated, without a word."""
    gated = ats.rerun(parent, [ats.regulate.TGate(10)], store=tmp_path / "g.zarr")
    assert gated.gated_steps == list(range(10, STEPS))
    done = cli("stats", gated.path, "--steps", "15")
    assert done.exit_code == 0 and "note: step 15 gated (TGATE" in done.stdout and "choose other --steps" in done.stdout
    done = cli("stats", gated.path)
    assert done.exit_code == 0 and "note: steps 10–19 gated" in done.stdout and "left out of the means" in done.stdout
    assert "gated" not in cli("stats", parent.path).stdout
    line = error_line(cli("plot", gated.path, "--steps", "15", "-o", tmp_path / "p.png"))
    assert "step 15 gated" in line and not (tmp_path / "p.png").exists()
    done = cli("plot", gated.path, "--steps", "8:12", "-o", tmp_path / "q.png")
    assert done.exit_code == 0 and "warning: steps 10–11 gated" in done.stderr
    done = cli("plot", gated.path, "--kind", "violins", "-o", tmp_path / "v.png")
    assert done.exit_code == 0 and "warning" not in done.stderr   # the default steps are computed ones

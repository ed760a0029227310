"""Correct records (issue 17): what a TGATE rerun writes and prints is what ran, and a saved copy of the
embedded model loads back. Each test reproduces the fault the way a user met it."""

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.regulate import TGate

from .conftest import cli

PROMPT = "a red circle and a blue square"
STEPS = 5  # TGate(0.4) gates from step 2; before the fix the manifest said gate_step 1


@pytest.fixture(scope="module")
def pipe():
    p = ats.load_pipeline("shapes")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def parent(pipe, tmp_path_factory):
    store = tmp_path_factory.mktemp("records") / "a.zarr"
    return ats.capture(pipe, PROMPT, seed=0, store=store, num_inference_steps=STEPS)


def _gate_params(trace):
    (described,) = trace.manifest["interventions"]
    assert described["name"] == "TGate"
    return described["params"]


# -- 1. the manifest holds the gate step that ran ---------------------------------------------------------
def test_a_fraction_is_recorded_as_the_gate_step_the_run_used(parent, pipe, tmp_path):
    gated = ats.rerun(parent, [TGate(0.4)], store=tmp_path / "g.zarr", pipe=pipe)
    params = _gate_params(gated)
    assert params["gate_step"] == 2 and params["fraction"] == 0.4  # round(0.4 * 5): the index of the first gated step
    assert gated.gated_steps == list(range(params["gate_step"], STEPS))  # the root attribute agrees


def test_the_command_records_the_gate_step_of_a_fraction(parent, tmp_path):
    out = tmp_path / "cli.zarr"
    done = cli("rerun", parent.path, "--tgate", "0.4", "-o", out)
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    assert _gate_params(tr)["gate_step"] == 2 and tr.gated_steps == [2, 3, 4]


# -- 2. a gate beyond the run is refused before anything is written ---------------------------------------
def test_a_gate_beyond_the_run_is_refused_before_anything_is_written(parent, pipe, tmp_path):
    out = tmp_path / "g50.zarr"
    with pytest.raises(AttnscopeError, match=r"TGate: gate_step=50 on a run of 5 steps.*from 1 to 5"):
        ats.rerun(parent, [TGate(50)], store=out, pipe=pipe)
    assert not out.exists()
    # the same without rerun: refused at the run's first step, before the recorder creates its store
    recorder = ats.Recorder(tmp_path / "hooks.zarr", run_info={"num_inference_steps": STEPS})
    with pytest.raises(AttnscopeError, match="gate_step=50"), ats.hooks(pipe, TGate(50), recorder):
        pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert not (tmp_path / "hooks.zarr").exists()


@pytest.mark.parametrize("value, says", [("50", "TGate: --tgate 50 on a run of 5 steps"), ("0", "--tgate 0: expected"),
                                         ("-3", "--tgate -3: expected"), ("1.0", "--tgate 1.0: expected"),
                                         ("2.5", "--tgate 2.5: expected")])
def test_the_command_refuses_a_gate_outside_the_run(parent, tmp_path, value, says):
    out = tmp_path / "bad.zarr"
    done = cli("rerun", parent.path, "--tgate", value, "-o", out)
    last = done.stderr.strip().splitlines()[-1]  # (the lines before: the progress bars of loading the model)
    assert done.exit_code == 2 and last.startswith("error: ") and says in last, done.output
    assert "Traceback" not in done.output and not out.exists()


def test_a_gate_at_the_last_step_runs_every_step_in_full(pipe):
    gate = TGate(STEPS)
    with ats.hooks(pipe, gate):
        pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert gate.gate_step == STEPS and gate.gated_steps == []


# -- 3. the comparison says which steps it compared and which were gated ----------------------------------
def test_a_tgate_comparison_says_which_steps_were_compared_and_gated(parent, pipe, tmp_path):
    gated = ats.rerun(parent, [TGate(2)], store=tmp_path / "t.zarr", pipe=pipe)
    c = ats.compare(parent, gated, ["circle", "square"])
    assert c.stats.attrs["compared_steps"] == [0, 1] and c.stats.attrs["gated_steps"] == [2, 3, 4]
    note = "compared steps 0–1 (steps 2–4 gated: attention reused from the cache, no maps to compare)"
    assert c.table().splitlines()[-1] == note and c.steps_note() == note
    assert c.image_change() > 0  # the shares before the gate are the parent's; the image is where TGATE shows
    plain = ats.compare(parent, parent, ["circle"])
    assert plain.steps_note() == "compared steps 0–4" and plain.table().splitlines()[-1].split()[0] == "circle"
    assert plain.image_change() == 0


def test_the_rerun_command_says_which_steps_were_compared_and_gated(parent, tmp_path):
    done = cli("rerun", parent.path, "--tgate", "2", "-o", tmp_path / "t.zarr")
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "compared steps 0–1 (steps 2–4 gated: attention reused from the cache, no maps to compare)"
    change = next(line for line in lines if line.startswith("image change: "))
    assert float(change.split()[2]) > 0


# -- 4. a saved copy of the embedded model loads back -----------------------------------------------------
def test_a_saved_copy_of_the_shapes_model_loads_back_with_identical_outputs(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    saved = sorted(p.suffix for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert not {".bin", ".pt", ".pth", ".pkl", ".ckpt"} & set(saved)  # safetensors and JSON only
    copy = ats.load_pipeline(tmp_path / "copy")
    copy.set_progress_bar_config(disable=True)
    assert type(copy) is type(pipe)  # the shapes model's defaults (steps, guidance, size) come with it

    def image(p):
        return p(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    assert torch.get_num_threads() == 1
    assert np.array_equal(image(pipe), image(copy))


def test_the_auto_gate_tolerance_is_a_flag_of_rerun_and_the_message_names_it(parent, tmp_path):
    """`--tgate auto` on a curve that never settles said "tol > X would be needed", a flag rerun did not have."""
    mean = ats.stats.convergence(parent, tol=0.05)["mean_convergence"].values[:, 0]
    tail = min(np.nanmax(mean[i:]) for i in range(1, STEPS))  # the smallest tail maximum, by hand
    assert tail > 0.001  # so a tolerance of 0.001 cannot settle it
    done = cli("rerun", parent.path, "--tgate", "auto", "--tgate-tol", "0.001", "-o", tmp_path / "a.zarr")
    last = done.stderr.strip().splitlines()[-1]
    assert done.exit_code == 2 and last.startswith("error: no gate step at --tgate-tol 0.001: "), last
    suggested = float(last.split("so --tgate-tol ")[1].split()[0])
    assert tail < suggested <= tail * 1.01 + 1e-12 and not (tmp_path / "a.zarr").exists()
    done = cli("rerun", parent.path, "--tgate", "auto", "--tgate-tol", str(suggested), "-o", tmp_path / "a.zarr")
    assert done.exit_code == 0, done.stderr
    expected = ats.stats.suggest_gate_step(parent, tol=suggested)
    assert _gate_params(ats.open_trace(tmp_path / "a.zarr"))["gate_step"] == expected
    done = cli("rerun", parent.path, "--tgate", "2", "--tgate-tol", "0.1", "-o", tmp_path / "b.zarr")
    assert done.stderr.strip().splitlines()[-1] == "error: --tgate-tol 0.1 sets the tolerance of --tgate auto: give " \
                                                   "--tgate auto too"

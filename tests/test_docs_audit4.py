"""What a user copies from the README, the docs pages and each command's ``--help`` (fourth audit).

``attnscope train-shapes --seed -1`` printed a raw numpy traceback (``ValueError: expected non-negative integer``,
exit status 1) after making the run's folder and writing its tokenizer there; a seed above about 1.8 million failed
the same way inside torch at the first step ("Overflow when unpacking long long"). The seed is now checked with the
other numbers, before the folder is made.
"""

import shlex

import pytest

from attnscope.errors import AttnscopeError
from attnscope.models.shapes import TrainConfig, train_shapes

from .conftest import cli, error_line

TINY = dict(vae_steps=2, vae_batch=2, steps=2, batch=2, warmup=1)


def _largest_seed(steps: int) -> int:
    """By hand: step ``k`` of stage 1 seeds its generator with ``(seed · 1_000_003 + 1) · 10_000_019 + k`` < 2**64."""
    return ((2**64 - 1 - (steps - 1)) // 10_000_019 - 1) // 1_000_003


@pytest.mark.parametrize("seed", ["-1", "18446744073709551615"])
def test_train_shapes_command_checks_its_seed_before_making_its_folder(tmp_path, seed):
    out = tmp_path / "run"
    line = error_line(cli("train-shapes", "--out", out, "--seed", seed, "--steps", "4", "--vae-steps", "3"))
    assert line == (
        f"error: --seed {seed}: expected an int from 0 to {_largest_seed(4)} (the training seeds each "
        f"step's torch.Generator with it, which takes seeds up to 2**64 - 1)"
    )
    assert not out.exists()


@pytest.mark.parametrize("seed", [-1, True, 2.0, "0"])
def test_train_shapes_refuses_a_seed_that_is_not_a_non_negative_int(tmp_path, seed):
    with pytest.raises(AttnscopeError, match=rf"^seed={seed!r}: expected an int from 0 to "):
        train_shapes(tmp_path / "run", TrainConfig(seed=seed, **TINY), progress=False)
    assert not (tmp_path / "run").exists()


def test_train_shapes_takes_the_largest_seed_and_refuses_the_next(tmp_path):
    largest = _largest_seed(2)
    with pytest.raises(AttnscopeError, match=rf"^seed={largest + 1}: expected an int from 0 to {largest} "):
        train_shapes(tmp_path / "over", TrainConfig(seed=largest + 1, **TINY), progress=False)
    assert not (tmp_path / "over").exists()
    pipeline = train_shapes(tmp_path / "run", TrainConfig(seed=largest, **TINY), progress=False)
    assert (pipeline / "model_index.json").is_file()


def test_demo_next_commands_paste_into_a_shell_whatever_the_path(tmp_path, capsys):
    """``attnscope demo --out 'my runs/it's demo.zarr'`` suggested ``attnscope stats my runs/it's demo.zarr …``,
    which a shell splits into three paths (and an open quote), and a ``python -c`` line whose ``open_trace('…')``
    broke on the apostrophe. Each ``next:`` line, split as a POSIX shell does, must run on the demo's own trace."""
    out = tmp_path / "my runs" / "it's demo.zarr"
    done = cli("demo", "--out", out)
    assert done.exit_code == 0, done.output
    stats_line, python_line = [line[len("next: ") :] for line in done.stdout.splitlines() if line.startswith("next: ")]
    stats_args = shlex.split(stats_line)
    assert stats_args == ["attnscope", "stats", str(out), "--targets", "red circle,blue square", "--by", "step"]
    by_step = cli(*stats_args[1:])
    assert by_step.exit_code == 0 and "red circle" in by_step.stdout, by_step.output
    python_args = shlex.split(python_line)
    assert python_args[:2] == ["python", "-c"] and len(python_args) == 3
    capsys.readouterr()
    exec(python_args[2], {})
    printed = capsys.readouterr().out
    assert printed.startswith("<xarray.DataArray 'attention'") and "step: 20" in printed


def test_train_shapes_names_its_pipeline_as_a_model_flag_that_pastes(tmp_path):
    """``pipeline: … (use it with --model my run/pipeline …)``: the suggested flag split at the space."""
    import subprocess
    import sys

    out = tmp_path / "my run"
    args = ["--out", str(out), "--steps", "2", "--vae-steps", "2", "--batch", "2", "--threads", "1"]
    # a process of its own: training seeds torch's global generator, which the in-process runner forbids
    done = subprocess.run(
        [sys.executable, "-m", "attnscope", "train-shapes", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    flag = line[line.index("--model ") : line.index(", or ats.load_pipeline")]
    assert shlex.split(flag) == ["--model", str(out / "pipeline")]
    assert (out / "pipeline" / "model_index.json").is_file()


def test_a_trace_captured_with_a_relative_model_path_reruns_from_another_directory(sd_pipe, tmp_path, monkeypatch):
    """capture.md's ``attnscope capture --model ./my-sd-model …`` recorded the model as ``./my-sd-model``, so
    ``attnscope rerun`` from any other working directory failed ("its model cannot be loaded"), and the CLI has no
    flag to name the model again. The manifest now holds the directory's absolute path."""
    import numpy as np

    import attnscope as ats

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    sd_pipe.save_pretrained(project / "my-sd-model")
    monkeypatch.chdir(project)
    done = cli(
        "capture",
        "--model",
        "./my-sd-model",
        "--prompt",
        "a red circle",
        "--seed",
        "0",
        "--steps",
        "2",
        "--out",
        "runs/a.zarr",
    )
    assert done.exit_code == 0, done.output
    parent = ats.open_trace(project / "runs" / "a.zarr")
    assert parent.manifest["model"]["reference"] == str(project / "my-sd-model")
    monkeypatch.chdir(elsewhere)
    done = cli("rerun", project / "runs" / "a.zarr", "-o", "again.zarr")
    assert done.exit_code == 0, done.output
    again = ats.open_trace(elsewhere / "again.zarr")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(parent.images[0]))

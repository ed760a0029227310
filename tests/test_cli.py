"""The `attnscope` command line, run in this process (``cli``); ``python -m attnscope`` once as a real process."""

import subprocess
import sys

import pytest

import attnscope as ats

from .conftest import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sd_pipe):
    path = tmp_path_factory.mktemp("model")
    sd_pipe.save_pretrained(path)
    return path


def test_capture_command(model_dir, tmp_path):
    out = tmp_path / "run.zarr"
    done = cli("capture", "--model", str(model_dir), "--prompt", "a red circle", "--prompt", "a blue square",
               "--seed", "7", "--steps", "3", "--height", "32", "--width", "48", "--out", str(out),
               "--sites", "up_blocks.*", "--capture-steps", "0:3:2", "--tokens", "prompt")
    assert done.exit_code == 0, done.stderr
    assert f"trace: {out}" in done.stdout
    tr = ats.open_trace(out)
    assert tr.complete and tr.manifest["run"]["prompts"] == ["a red circle", "a blue square"]
    assert tr.manifest["run"]["seed"] == 7 and len(tr.images) == 2 and tr.images[0].size == (48, 32)
    da = tr.attention(tr.sites[0])
    assert da.step.values.tolist() == [0, 2] and da.sizes["token"] == 5
    assert all(s.startswith("up_blocks.") for s in tr.sites)


def test_capture_command_output_change(model_dir, tmp_path):
    out = tmp_path / "oc.zarr"
    done = cli("capture", "--model", str(model_dir), "--prompt", "a red circle", "--steps", "3",
               "--height", "32", "--width", "32", "--out", str(out), "--sites", "mid_block.*", "--output-change")
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    assert tr.manifest["capture"]["output_change"] is True
    ds = tr.output_change()
    assert dict(ds.output_norm.sizes) == {"step": 3, "site": 1, "sample": 1} and (ds.output_norm.values > 0).all()
    assert ats.stats.convergence(tr).attrs["of"] == "outputs"


def test_capture_command_errors(model_dir, tmp_path):
    done = cli("capture", "--model", str(model_dir), "--prompt", "a red circle", "--steps", "2",
               "--out", str(tmp_path / "x.zarr"), "--sites", "nope*")
    assert done.exit_code == 2 and "'nope*' matches no cross-attention site" in done.stderr
    assert not (tmp_path / "x.zarr").exists()
    done = cli("capture", "--model", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "y.zarr"))
    assert done.exit_code == 2 and "no model_index.json" in done.stderr


@pytest.mark.parametrize("command", ["capture", "demo", "eval", "train-shapes", "stats", "plot", "rerun"])
def test_help_shows_an_example(command):
    done = cli(command, "--help")
    assert done.exit_code == 0 and f"Example: attnscope {command} " in " ".join(done.stdout.split())


def test_module_entry_point_runs_as_a_process():
    """``python -m attnscope`` (``attnscope/__main__.py``) in a fresh interpreter, under its own program name."""
    done = subprocess.run([sys.executable, "-m", "attnscope", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "Usage: attnscope [OPTIONS] COMMAND" in text
    assert all(f" {command} " in text for command in ("capture", "demo", "eval", "train-shapes", "stats", "plot", "rerun"))

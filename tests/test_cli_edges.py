"""The command line used as a demanding user would: each ``--help`` example, odd characters, bad input (one
``error:`` line, exit status 2, no traceback) and outputs left whole on error. Each test runs the commands
with ``cli`` or as a real process, on real pipelines and real stores."""

import re
import shlex
import subprocess
import sys

import pytest

import attnscope as ats

from .conftest import cli
from .test_cli_errors import error_line

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def parent(shapes, tmp_path_factory):
    """A complete 4-step trace of the shapes model."""
    return ats.capture(
        shapes, PROMPT, seed=0, store=tmp_path_factory.mktemp("parent") / "a.zarr", num_inference_steps=4
    )


@pytest.fixture(scope="module")
def emoji_trace(sd_pipe, tmp_path_factory):
    """Tiny SD with an emoji in the prompt: the fonts matplotlib has lack it."""
    return ats.capture(
        sd_pipe,
        "a red circle 🙂",
        seed=0,
        store=tmp_path_factory.mktemp("emoji") / "u.zarr",
        num_inference_steps=2,
        height=32,
        width=32,
    )


@pytest.mark.parametrize("kind", ["heatmaps", "grid", "violins", "dominance"])
def test_plot_of_an_emoji_prompt_prints_no_glyph_warnings(emoji_trace, tmp_path, kind):
    """`attnscope plot` printed one 'Glyph 128578 … missing from font(s) DejaVu Sans' line per figure text."""
    out = tmp_path / f"{kind}.png"
    done = cli("plot", emoji_trace.path, "--kind", kind, "-o", out)
    assert done.exit_code == 0, done.stderr
    assert "missing from font" not in done.stderr, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


# -- typer's own usage errors: one line, in the commands' form, repeating the input ------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["stats", "TRACE", "--tol", "abc"], "error: Invalid value for '--tol' 'abc': Input should be a valid number"),
        (
            ["plot", "TRACE", "-o", "f.png", "--dpi", "high"],
            "error: Invalid value for '--dpi' 'high': Input should be a valid integer",
        ),
        (["eval", "--n", "2.5"], "error: Invalid value for '--n' '2.5': Input should be a valid integer"),
        (["capture", "--prompt", PROMPT], "error: Missing option '--out'."),
        (["stats"], "error: Missing argument 'trace'."),
        (["nosuch"], "error: No such command 'nosuch'."),
    ],
)
def test_usage_errors_are_one_line_naming_the_input(parent, args, expected):
    """typer printed a usage line, a hint and a boxed panel, and 'Input should be a valid number' without the input."""
    args = [parent.path if a == "TRACE" else a for a in args]
    line = error_line(cli(*args))
    assert line.startswith(expected), line
    assert line.endswith("--help' for help)"), line


def test_usage_error_of_the_module_entry_point_is_one_line(tmp_path):
    """The same as a real process: `python -m attnscope stats X --tol abc`, exit status 2, one line on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "attnscope", "stats", str(tmp_path), "--tol", "abc"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: Invalid value for '--tol' 'abc': Input should be a valid number, unable "
        "to parse string as a number (see 'attnscope stats --help' for help)"
    ]


# -- the examples of --help, pasted in order -----------------------------------------------------------------------
def help_examples(command: str) -> list[list[str]]:
    """The ``Example: attnscope …`` command lines of ``attnscope COMMAND --help``, as argument lists."""
    text = " ".join(cli(command, "--help").stdout.split())  # the help is wrapped at the terminal's width
    return [shlex.split(example) for example in re.findall(r"Example: attnscope (.+?)(?= Example:| \(|$)", text)]


def test_the_help_examples_work_when_pasted_in_order(tmp_path, monkeypatch):
    """`demo --help`'s example drew a green triangle and a yellow circle into runs/demo.zarr, which the examples of
    stats, plot, rerun and report read for 'circle,square': "target 'square' is not in the prompt"."""
    monkeypatch.chdir(tmp_path)
    (demo,) = help_examples("demo")
    stats = help_examples("stats")
    plot, regulate, report = help_examples("plot")[0], help_examples("rerun")[0], help_examples("report")[0]
    for args in (demo, *stats, plot, regulate, report):
        done = cli(*args)
        assert done.exit_code == 0, (args, done.stderr)
    assert {p.name for p in (tmp_path / "runs").iterdir()} >= {
        "demo.zarr",
        "heatmaps.png",
        "demo-reg.zarr",
        "demo-report.html",
    }


def test_eval_names_the_file_and_line_of_a_prompt_it_cannot_score(tmp_path):
    """It said "prompt='a purple hexagon': …", a Python keyword, not which file or line holds it."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n# a note\n\na purple hexagon\n")
    line = error_line(cli("eval", "--prompts", prompts, "--steps", "2"))
    assert line.startswith(
        f"error: --prompts '{prompts}', line 4: 'a purple hexagon': words outside the shapes "
        f"model's vocabulary: 'purple', 'hexagon'"
    ), line


def test_eval_refuses_a_prompts_file_that_is_not_text(tmp_path):
    """A binary file given as --prompts was a UnicodeDecodeError traceback."""
    prompts = tmp_path / "p.png"
    prompts.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    line = error_line(cli("eval", "--prompts", prompts, "--steps", "2"))
    assert line.startswith(f"error: --prompts '{prompts}': cannot be read as UTF-8 text"), line


@pytest.mark.parametrize(
    "command", [["capture", "--prompt", PROMPT, "--out"], ["sweep", "PROMPTS", "--seeds", "0", "--out"]]
)
@pytest.mark.parametrize("size", ["--height", "--width"])
def test_a_size_of_zero_pixels_is_refused_not_replaced_by_the_default(tmp_path, command, size):
    """diffusers takes `height or default`: --height 0 made a 32-pixel image without a word."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "x"
    args = [prompts if a == "PROMPTS" else a for a in command]
    assert (
        error_line(cli(*args, out, "--steps", "2", size, "0"))
        == f"error: {size} 0: expected a positive number of pixels"
    )
    assert not out.exists()


def test_eval_overwrite_without_json_is_refused():
    """`eval --overwrite` replaces the file at --json; without --json it was silently ignored."""
    done = cli("eval", "--n", "1", "--overwrite")
    assert done.exit_code == 2 and error_line(done) == "error: --overwrite replaces the file at --json: give --json too"


def test_sweep_stats_progress_bar_can_be_turned_off(sd_pipe, tmp_path):
    """`sweep-stats` always drew map_stats' bar on stderr; `--no-progress` turns it off, as on `sweep`."""
    out = tmp_path / "s"
    ats.sweep(sd_pipe, ["a red circle"], [0], out=out, num_inference_steps=2, height=32, width=32, progress=False)
    shown = cli("sweep-stats", out, "--targets", "circle")
    assert shown.exit_code == 0, shown.output
    assert "|" in shown.stderr  # the bar, drawn by tqdm
    quiet = cli("sweep-stats", out, "--targets", "circle", "--no-progress")
    assert quiet.exit_code == 0, quiet.output
    assert "|" not in quiet.stderr and "circle" in quiet.stdout

"""The command line as a demanding user meets it (second audit): an option the command would accept and then ignore
is refused, naming it; a guidance scale that is not a number and a repeated --intervention are refused before any
work; and every command line the README and docs/ show parses as written."""

import re
import shlex
from pathlib import Path

import pytest
import typer

import attnscope as ats
from attnscope.cli import app

from .conftest import cli, error_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parent(shapes, tmp_path_factory):
    """A complete 4-step trace of the shapes model."""
    return ats.capture(shapes, "a red circle and a blue square", seed=0,
                       store=tmp_path_factory.mktemp("parent") / "a.zarr", num_inference_steps=4)


@pytest.mark.parametrize("args, flag, applies", [
    (["stats", "{t}", "--tol", "0.2"], "--tol 0.2", "--convergence"),
    (["stats", "{t}", "--of", "outputs"], "--of 'outputs'", "--convergence"),
    (["stats", "{t}", "--convergence", "--by", "step"], "--by 'step'", "--convergence"),
    (["stats", "{t}", "--convergence", "--targets", "circle"], "--targets 'circle'", "--convergence"),
    (["stats", "{t}", "--json", "--by", "site"], "--by 'site'", "--json"),
    (["plot", "{t}", "-o", "{o}.png", "--tol", "0.3"], "--tol 0.3", "--kind convergence"),
    (["plot", "{t}", "-o", "{o}.png", "--kind", "dominance", "--of", "maps"], "--of 'maps'", "--kind convergence"),
    (["rerun", "{t}", "-o", "{o}.zarr", "--epochs", "5"], "--epochs 5", "--optimise"),
    (["rerun", "{t}", "-o", "{o}.zarr", "--layout", "auto", "--lr", "0.1"], "--lr 0.1", "--optimise"),
])
def test_an_option_the_command_would_ignore_is_refused(parent, tmp_path, args, flag, applies):
    """Each of these ran (exit 0) and left the option out of what it did: the table, figure or trace was the same
    as without it. Now it is one error naming the option and when it applies, and nothing is written."""
    out = tmp_path / "out"
    line = error_line(cli(*[a.format(t=parent.path, o=out) for a in args]))
    assert line.startswith(f"error: {flag}: ") and applies in line, line
    assert list(tmp_path.iterdir()) == []


def test_the_same_options_where_they_apply_still_act(parent, tmp_path):
    """--tol and --of with --convergence (stats) and --kind convergence (plot): accepted, and --tol is used."""
    loose = cli("stats", parent.path, "--convergence", "--tol", "10", "--of", "maps")
    assert loose.exit_code == 0, loose.stderr
    assert loose.stdout.rstrip().endswith("suggested gate step: 1")  # every change is below 10: stable from step 1
    done = cli("plot", parent.path, "-o", tmp_path / "c.png", "--kind", "convergence", "--tol", "0.1", "--of", "maps")
    assert done.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 0, done.stderr
    done = cli("plot", parent.path, "-o", tmp_path / "d.png", "--kind", "dominance", "--words", "circle,square")
    assert done.exit_code == 0 and (tmp_path / "d.png").stat().st_size > 0, done.stderr


def test_optimise_with_the_layout_of_the_trace_is_refused(parent, tmp_path):
    """--layout trace reuses the trace's λ: --optimise (and its --epochs) were dropped without a word."""
    line = error_line(cli("rerun", parent.path, "-o", tmp_path / "x.zarr", "--layout", "trace", "--optimise"))
    assert "--optimise" in line and "--layout trace" in line
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_guidance_that_is_not_a_finite_number_is_refused(tmp_path, value):
    """``nan > 1`` is false: a NaN guidance turned classifier-free guidance off and was recorded as the run's."""
    out = tmp_path / "g.zarr"
    line = error_line(cli("capture", "--prompt", "a red circle", "--steps", "2", "--out", out, "--guidance", value))
    assert line.startswith(f"error: --guidance {float(value)}: expected a finite number")
    assert not out.exists()
    line = error_line(cli("eval", "--n", "2", "--steps", "2", "--guidance", value, "--json", tmp_path / "e.json"))
    assert line.startswith(f"error: --guidance {float(value)}: expected a finite number")
    assert list(tmp_path.iterdir()) == []


def test_eval_refuses_an_intervention_given_twice(tmp_path):
    """``--intervention regulation`` twice installed two AttentionRegulation clients: regulation applied twice."""
    line = error_line(cli("eval", "--n", "2", "--steps", "2", "--intervention", "regulation", "--intervention", "tgate",
                          "--intervention", "regulation", "--json", tmp_path / "e.json"))
    assert line.startswith("error: --intervention 'regulation' given twice")
    assert not (tmp_path / "e.json").exists()


def _docs_command_lines() -> list[tuple[str, str]]:
    """(file:line, command) for every ``attnscope …`` line of the bash blocks of README.md and docs/*.md, with its
    comment and anything after a shell operator (``>``, ``|``, ``;``, ``&&``) cut off."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_bash = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_bash = line.strip() in ("```bash", "```sh", "```console")
                continue
            command = re.sub(r"^\$ ", "", line.strip())
            if in_bash and command.startswith("attnscope "):
                found.append((f"{path.relative_to(ROOT)}:{number}", command))
    return found


@pytest.mark.parametrize("where, command", _docs_command_lines(), ids=lambda v: v if ":" in str(v) else "")
def test_every_command_line_of_the_docs_parses(where, command):
    """Each docs command names a subcommand, options it has, values of their types and every required option (a
    shell operator such as ``|`` ends the command there, as the shell would)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = []
    for token in lexer:
        if set(token) <= set("|&;<>()"):
            break
        words.append(token)
    group = typer.main.get_command(app)
    name, args = words[1], words[2:]
    with group.make_context("attnscope", [name]) as ctx:
        command_obj = group.get_command(ctx, name)
        assert command_obj is not None, f"{where}: no command {name!r}"
        try:
            command_obj.make_context(name, args, parent=ctx)
        except Exception as exc:  # noqa: BLE001 - click's usage errors: the docs command does not run
            pytest.fail(f"{where}: {command!r} does not parse: {exc}")

"""The command line as a demanding user meets it (third audit): a word option given with no word in it is one error
naming it (it silently became the default words, or an error quoting ``[]``), and ``plot --kind convergence`` warns
that it leaves --words out (it ignored them without a word)."""

import pytest

import attnscope as ats

from .conftest import cli, error_line


@pytest.fixture(scope="module")
def parent(shapes, tmp_path_factory):
    """A complete 3-step trace of the shapes model."""
    return ats.capture(shapes, "a red circle and a blue square", seed=0,
                       store=tmp_path_factory.mktemp("parent") / "a.zarr", num_inference_steps=3)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A one-run sweep of the shapes model, in this process."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    ats.sweep("shapes", ["a red circle and a blue square"], "0", str(out), workers=1, progress=False,
              num_inference_steps=2)
    return out


@pytest.mark.parametrize("args, flag, spec", [
    (["plot", "{t}", "-o", "{o}/h.png", "--words", ","], "--words", ","),
    (["plot", "{t}", "-o", "{o}/h.png", "--words", ""], "--words", ""),
    (["plot", "{t}", "-o", "{o}/v.png", "--kind", "violins", "--words", " , "], "--words", " , "),
    (["plot", "{t}", "-o", "{o}/c.png", "--kind", "convergence", "--words", ","], "--words", ","),
    (["report", "{t}", "-o", "{o}/r.html", "--words", ","], "--words", ","),
    (["stats", "{t}", "--targets", ""], "--targets", ""),
    (["stats", "{t}", "--targets", ",,"], "--targets", ",,"),
])
def test_a_word_option_with_no_word_is_refused(parent, tmp_path, args, flag, spec):
    """``--words ','`` drew every word of the prompt (plot heatmaps, stats ``--targets ''``) as if the option were
    left out, or failed quoting ``[]`` instead of what was typed. Now: one error repeating the option as given, and
    nothing written."""
    line = error_line(cli(*[a.format(t=parent.path, o=tmp_path) for a in args]))
    assert line.startswith(f"error: {flag} {spec!r}: expected comma-separated words or phrases"), line
    assert list(tmp_path.iterdir()) == []


def test_sweep_stats_with_no_target_is_refused_before_any_run(sweep_dir, tmp_path):
    """sweep-stats ``--targets ','`` mapped the statistic over every run and failed each one ("no run … could be
    analysed", quoting ``--targets []`` per run); now it is refused once, before the runs, and -o is not written."""
    line = error_line(cli("sweep-stats", sweep_dir, "--targets", ",", "-o", tmp_path / "t.csv", "--no-progress"))
    assert line == ("error: --targets ',': expected comma-separated words or phrases, e.g. 'red circle,square'; "
                    "leave --targets out for the default")
    assert list(tmp_path.iterdir()) == []


def test_words_with_spaces_around_commas_still_name_the_targets(parent):
    """The same parsing keeps working for real words: ' red circle , square ' is the targets 'red circle' and
    'square', each share the sum of its words' mass shares (checked against the per-word table)."""
    done = cli("stats", parent.path, "--targets", " red circle , square ")
    assert done.exit_code == 0, done.stderr
    summary = next(line for line in done.stdout.splitlines() if line.startswith("targets: "))
    assert summary.startswith("targets: red circle ") and ", square " in summary, summary
    ds = ats.stats.dominance(parent)
    word = ds.mass_share.mean(["step", "site"]).isel(sample=0)
    red_circle = float(word.sel(token=[2, 3]).sum())  # positions of 'red' and 'circle' in the CLIP prompt
    assert f"red circle {100 * red_circle:.1f}%" in summary, (summary, red_circle)


def test_plot_convergence_says_it_leaves_words_out(parent, tmp_path):
    """--kind convergence draws the change of whole maps: --words changed nothing in the figure and was accepted
    without a word. Now the figure is drawn (one --words may serve every --kind of a script) with one warning naming
    --words, and no warning without it."""
    done = cli("plot", parent.path, "-o", tmp_path / "c.png", "--kind", "convergence", "--words", "circle")
    assert done.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 0, done.stderr
    assert done.stderr.strip() == ("warning: --words 'circle' left out: --kind convergence draws the step-to-step "
                                   "change of the whole maps, of no word"), done.stderr
    plain = cli("plot", parent.path, "-o", tmp_path / "d.png", "--kind", "convergence")
    assert plain.exit_code == 0 and plain.stderr.strip() == "", plain.stderr


@pytest.mark.parametrize(("option", "expected"), [
    (["--sites", "zz*"], "error: --sites: 'zz*' matches no cross-attention site; available sites: "),
    (["--steps", "5"], "error: --steps: [5] outside this run's steps 0..1 (2 steps)"),
])
def test_sweep_stats_checks_sites_and_steps_once_before_the_map(sweep_dir, option, expected):
    # each run used to fail alone inside the map: one long line repeating "sites: …" per run, after dask started
    done = cli("sweep-stats", sweep_dir, *option, "--no-progress")
    line = error_line(done)
    assert line.startswith(expected) and line.count("matches no") <= 1 and "map_stats" not in line, line
    ok = cli("sweep-stats", sweep_dir, "--sites", "up_*", "--steps", "-1", "--no-progress")
    assert ok.exit_code == 0, ok.stderr

"""`attnscope stats`: the readable tables and the JSON form say what the Dataset holds."""

import json
import math

import numpy as np
import pytest

import attnscope as ats
from attnscope import AttnscopeError

from .conftest import cli


@pytest.fixture(scope="module")
def trace(shapes, tmp_path_factory):
    """One prompt, 8 steps, every step and site captured, heads averaged (the capture defaults)."""
    store = tmp_path_factory.mktemp("report") / "a.zarr"
    return ats.capture(shapes, "a red circle and a blue square", seed=0, store=store, num_inference_steps=8)


def test_word_table_shows_the_mean_shares(trace):
    ds = ats.stats.dominance(trace, targets=["circle", "blue square"])
    table = ats.stats.dominance_table(ds)
    mean = ds.mean(["step", "site"]).isel(sample=0)
    circle = next(line for line in table.splitlines() if "circle</w>" in line)
    assert f"{100 * float(mean.mass_share.sel(token=3)):.1f}%" in circle and circle.rstrip().endswith("circle")
    blue = next(line for line in table.splitlines() if "blue</w>" in line)
    assert blue.rstrip().endswith("blue square")
    assert f"blue square {100 * float(mean.target_share.sel(target='blue square')):.1f}%" in table
    assert f"gini {float(mean.gini):.3g}" in table


def test_step_and_site_tables(trace):
    ds = ats.stats.dominance(trace, targets=["circle", "square"])
    by_step = ats.stats.dominance_table(ds, by="step").splitlines()
    assert len(by_step) == 2 + ds.sizes["step"]
    last = by_step[-1].split()
    assert last[0] == "7" and last[1] == f"{100 * float(ds.target_share.isel(step=-1, sample=0).mean('site')[0]):.1f}%"
    by_site = ats.stats.dominance_table(ds, by="site")
    assert all(site in by_site for site in trace.sites)
    with pytest.raises(AttnscopeError, match="by='layer'"):
        ats.stats.dominance_table(ds, by="layer")


def test_block_table_follows_the_forward_pass(trace):
    ds = ats.stats.dominance(trace, targets=["circle", "square"])
    assert ds["block"].values.tolist() == ["down", "down", "up", "up", "up", "up", "mid"]   # module order
    by_block = ats.stats.dominance_table(ds, by="block").splitlines()
    assert [line.split()[0] for line in by_block[2:]] == ["down", "mid", "up"]          # forward order
    up = ds.where(ds.block == "up", drop=True).target_share.isel(sample=0).mean(["step", "site"])
    assert by_block[4].split()[1] == f"{100 * float(up.sel(target='circle')):.1f}%"
    one = trace.attention(trace.sites[0])
    assert ats.stats.dominance(one, targets=["circle"])["block"].values.tolist() == ["down"]   # arrays carry it
    bare = ats.stats.dominance(one.assign_attrs(site={}), targets=["circle"])      # an array without a description
    with pytest.raises(AttnscopeError, match="no 'block' coordinate"):
        ats.stats.dominance_table(bare, by="block")


def test_json_holds_every_value(trace):
    ds = ats.stats.dominance(trace, targets=["circle", "square"])
    data = json.loads(json.dumps(ats.stats.dominance_json(ds)))
    assert data["dims"] == dict(ds.sizes)
    ratio = np.array([[[np.nan if v is None else (math.inf if v == "inf" else v) for v in row] for row in step]
                      for step in data["data_vars"]["dominance_ratio"]["data"]])
    np.testing.assert_allclose(ratio, ds.dominance_ratio.values)
    assert data["coords"]["word"]["data"] == [str(w) for w in ds.word.values]


def test_convergence_table_marks_the_stable_step(trace):
    ds = ats.stats.convergence(trace, tol=0.2)
    table = ats.stats.convergence_table(ds)
    stable = int(ds.stable_step[0])
    assert (f"stable from step {stable} (tol 0.2)" if stable >= 0 else "never below tol 0.2") in table
    assert len([line for line in table.splitlines() if line[:4].strip().isdigit()]) == ds.sizes["step"]


def test_stats_cli(trace):
    run = ["stats", str(trace.path)]
    out = cli(*run, "--targets", "red circle,square", "--by", "step")
    assert out.exit_code == 0, out.stderr
    assert "red circle" in out.stdout.splitlines()[1] and len(out.stdout.splitlines()) == 10
    js = cli(*run, "--json", "--steps", "0:4")
    assert json.loads(js.stdout)["dims"]["step"] == 4
    conv = cli(*run, "--convergence", "--tol", "0.1")
    assert "stable from step" in conv.stdout or "never below tol 0.1" in conv.stdout
    bad = cli(*run, "--targets", "hexagon")
    assert bad.exit_code == 2 and "'hexagon' is not in the prompt; its words are: a, red, circle" in bad.stderr
    missing = cli("stats", str(trace.path) + "-nope")
    assert missing.exit_code == 2 and "is not an attnscope trace" in missing.stderr


@pytest.mark.parametrize("kind", ["heatmaps", "grid", "violins", "dominance", "convergence"])
def test_plot_cli_writes_each_figure(trace, tmp_path, kind):
    from PIL import Image

    out = tmp_path / f"{kind}.png"
    proc = cli("plot", str(trace.path), "--words", "circle,blue square", "--kind", kind, "-o", str(out))
    assert proc.exit_code == 0, proc.stderr
    assert proc.stdout.strip() == f"figure: {out}" and min(Image.open(out).size) > 100


def test_plot_cli_errors(trace, tmp_path):
    run = ["plot", str(trace.path), "-o", str(tmp_path / "x.png")]
    bad = cli(*run, "--kind", "pie")
    assert bad.exit_code == 2 and "--kind 'pie': expected one of heatmaps" in bad.stderr
    word = cli(*run, "--words", "hexagon")
    assert word.exit_code == 2 and "'hexagon' is not in the prompt" in word.stderr
    assert not (tmp_path / "x.png").exists()

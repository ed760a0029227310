"""``ats.view``: the Jupyter widget over a lazy trace — its numbers against maps computed here by hand, its lazy
reading, its errors, in a real Jupyter kernel, and in a real JupyterLab in Debian's chromium."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("anywidget", reason="the viewer needs anywidget (pip install 'attnscope[notebooks]')")

import attnscope as ats  # noqa: E402
from attnscope.plot._view import TraceViewer, view  # noqa: E402
from attnscope.testing import tiny_sd3_pipeline  # noqa: E402

PROMPT = "a red circle and a blue square"
RUN = dict(num_inference_steps=3, height=32, width=32)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def heads_trace(sd_pipe, tmp_path_factory):
    """Tiny SD, every head kept (8 per site)."""
    return ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path_factory.mktemp("view") / "heads.zarr", heads="all", **RUN)


@pytest.fixture(scope="module")
def sd_trace(sd_pipe, tmp_path_factory):
    return ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path_factory.mktemp("view") / "sd.zarr", **RUN)


@pytest.fixture(scope="module")
def gated_trace(sd_pipe, sd_trace, tmp_path_factory):
    """A TGATE rerun of ``sd_trace``: step 2 of 3 gated (no maps)."""
    gated = ats.rerun(sd_trace, [ats.regulate.TGate(0.5)], pipe=sd_pipe,
                      store=tmp_path_factory.mktemp("view") / "gated.zarr")
    assert gated.gated_steps == [2]
    return gated


@pytest.fixture(scope="module")
def sd3_trace(tmp_path_factory):
    """Tiny SD3: joint sites, CLIP and T5 positions on one token axis."""
    return ats.capture(tiny_sd3_pipeline(), PROMPT, seed=0, store=tmp_path_factory.mktemp("view") / "sd3.zarr", **RUN)


def expected_maps(tr, words, sites, steps, head="mean", sample=0):
    """The viewer's maps computed here from ``tr.attention``: per site the words' token indices (``tr.words``)
    summed, the heads averaged (or one taken), the steps averaged, upsampled; then the mean over the sites."""
    out = []
    for word in words:
        tokens = sorted({i for part in word.split() for i in tr.words[part]})
        per_site = []
        for site in sites:
            da = tr.attention(site).sel(sample=sample, step=list(steps)).astype("float64")
            da = da.mean("head") if head == "mean" else da.isel(head=head)
            native = da.isel(token=tokens).sum("token").mean("step").transpose("y", "x").values
            per_site.append(ats.stats.upsample_maps(native, (32, 32)))
        out.append(np.mean(per_site, axis=0))
    return np.stack(out)


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("site, step", [(0, 1), (-1, 0), ("all", 2), (1, "all"), ("all", "all")])
def test_maps_equal_the_hand_computed_mean(family, site, step, sd_trace, sd3_trace):
    tr = sd_trace if family == "sd" else sd3_trace
    site_name = site if site == "all" else tr.sites[site]
    v = view(tr, words=["circle", "blue square"], site=site_name, step=step)
    sites = tr.sites if site == "all" else [site_name]
    steps = [0, 1, 2] if step == "all" else [step]
    want = expected_maps(tr, ["circle", "blue square"], sites, steps)
    got = v.current_map()
    assert got.shape == (2, 32, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert (v.map_min, v.map_max) == (pytest.approx(float(want.min()), rel=1e-5), pytest.approx(float(want.max()), rel=1e-5))
    # integer upsampling keeps the mean: the trait equals the native map's mean, read straight from the store
    for k, word in enumerate(["circle", "blue square"]):
        assert v.word_means[word] == pytest.approx(float(want[k].mean()), rel=1e-5)


def test_the_site_slider_runs_in_forward_order(sd_trace):
    v = view(sd_trace, words=["circle"])
    depths = [sd_trace.attention(s).attrs["site"]["depth"] for s in v.site_options]
    assert depths == sorted(depths) and sorted(v.site_options) == sorted(sd_trace.sites)
    assert v.site_options != sd_trace.sites  # diffusers registers the mid block last; the slider puts it between
    assert [label.split(".")[0] for label in v.site_labels][:3] == ["down0", "down1", "mid"]


def test_one_head_and_the_head_selector(heads_trace, sd_trace):
    site = heads_trace.sites[2]
    v = view(heads_trace, words=["circle"], site=site, step=1, head=3)
    assert v.head_count == 8
    np.testing.assert_allclose(v.current_map(), expected_maps(heads_trace, ["circle"], [site], [1], head=3), rtol=1e-5)
    v.head = "mean"
    np.testing.assert_allclose(v.current_map(), expected_maps(heads_trace, ["circle"], [site], [1]), rtol=1e-5)
    assert view(sd_trace).head_count == 1  # heads averaged at capture: the selector is hidden


def test_changing_the_step_changes_the_map_and_the_numbers(sd_trace):
    v = view(sd_trace, words=["circle"], site=sd_trace.sites[0], step=0)
    before, mean_before = v.current_map(), v.word_means["circle"]
    v.step = 2
    assert not np.allclose(before, v.current_map())
    assert v.word_means["circle"] != mean_before
    assert v.summary.startswith("down0.a0.t0 · step 2 (t=")
    v.step = 0
    np.testing.assert_array_equal(before, v.current_map())


@pytest.mark.parametrize("site, step", [(3, 1), ("all", "all")])
def test_dominance_table_is_ats_stats_dominance_of_the_selection(site, step, sd_trace):
    site_name = site if site == "all" else sd_trace.sites[site]
    v = view(sd_trace, words=["red circle", "square"], site=site_name, step=step)
    ds = ats.stats.dominance(sd_trace, targets=["red circle", "square"],
                             sites=None if site == "all" else [site_name], steps=None if step == "all" else [step])
    ds = ds.sel(sample=0).mean(("step", "site"))
    rows = {(r["key"], r["target"]): r["values"] for r in v.statistics["rows"]}
    assert v.statistics["columns"] == ["trace"]
    for target in ("red circle", "square"):
        assert rows["target_share", target] == [pytest.approx(float(ds.target_share.sel(target=target)))]
    for key in ("entropy", "gini", "sink_share"):
        assert rows[key, None] == [pytest.approx(float(ds[key]))]
    top, second = sorted(ds.target_share.values.tolist(), reverse=True)  # the ratio of the shares shown
    assert rows["dominance_ratio", None] == [pytest.approx(top / second)]
    if site != "all":  # one site and step: dominance's own ratio
        assert rows["dominance_ratio", None] == [pytest.approx(float(ds.dominance_ratio))]
    assert f"{float(ds.entropy):#.3g}" in v.table_html and "share of &#x27;red circle&#x27;" in v.table_html


def test_compare_shows_both_runs(sd_pipe, sd_trace, tmp_path):
    reg = ats.rerun(sd_trace, [ats.regulate.Reweight(["circle"], 4.0)], pipe=sd_pipe, store=tmp_path / "reg.zarr")
    v = view(sd_trace, compare=reg, words=["circle", "square"], site=sd_trace.sites[1], step=1)
    assert [p["role"] for p in v.panels] == ["before", "after"]
    assert [[m["word"] for m in p["maps"]] for p in v.panels] == [["circle", "square"]] * 2
    assert all(p["image"] and all(m["png"] for m in p["maps"]) for p in v.panels)
    a, b = v.current_map(), v.current_map(compare=True)
    np.testing.assert_allclose(b, expected_maps(reg, ["circle", "square"], [sd_trace.sites[1]], [1]), rtol=1e-5)
    assert b[0].mean() > a[0].mean()  # the reweighted word gets more attention
    assert v.map_min == pytest.approx(float(min(a.min(), b.min()))) and v.map_max == pytest.approx(float(max(a.max(), b.max())))
    assert v.statistics["columns"] == ["before", "after", "after − before"]
    before, after = (ats.stats.dominance(t, targets=["circle", "square"], sites=[sd_trace.sites[1]], steps=[1])
                     .sel(sample=0).mean(("step", "site")) for t in (sd_trace, reg))
    share = next(r for r in v.statistics["rows"] if r["target"] == "circle")["values"]
    want = [float(before.target_share.sel(target="circle")), float(after.target_share.sel(target="circle"))]
    assert share == [pytest.approx(want[0]), pytest.approx(want[1]), pytest.approx(want[1] - want[0])]


def test_gated_steps_are_no_map_and_left_out_of_the_mean(sd_trace, gated_trace):
    gated = gated_trace
    site = sd_trace.sites[0]
    v = view(gated, words=["circle"], site=site, step="all")
    np.testing.assert_allclose(v.current_map(), expected_maps(gated, ["circle"], [site], [0, 1]), rtol=1e-5)
    # "all" is the mean of the 2 steps computed, and says so (the slider's label reads this count)
    assert v.step_mean_count == 2 and "mean of 2 steps computed (gated 2 left out)" in v.summary
    v.step = 2
    assert np.isnan(v.current_map()).all() and v.word_means == {"circle": None}
    assert v.panels[0]["maps"][0]["note"] == "not computed here (a gated step)"
    # before and after over the same steps: the parent's step 2 is left out of its "all" mean, as ats.compare does
    both = view(sd_trace, compare=gated, words=["circle"], site=site, step="all")
    np.testing.assert_allclose(both.current_map(), expected_maps(sd_trace, ["circle"], [site], [0, 1]), rtol=1e-5)
    np.testing.assert_allclose(both.current_map(compare=True), expected_maps(gated, ["circle"], [site], [0, 1]),
                               rtol=1e-5)
    assert "mean of 2 steps computed in both runs (gated 2 left out)" in both.summary and both.step_mean_count == 2
    assert view(sd_trace, words=["circle"]).step_mean_count == 3  # nothing gated: every captured step
    before = ats.compare(sd_trace, gated, ["circle"], sites=[site]).before.target_share.sel(sample=0).mean()
    share = next(r for r in both.statistics["rows"] if r["target"] == "circle")["values"][0]
    assert share == pytest.approx(float(before))


def counting(tr, log):
    """Make ``tr.attention`` record which (site, step) maps are computed: the array is cut into one-step blocks,
    each noting itself when dask computes it (dask computes only the blocks a selection needs)."""
    original = tr.attention

    def attention(site, branch=None):
        da = original(site, branch)
        steps = da["step"].values.tolist()

        def note(block, block_info=None):
            if block_info is not None:
                lo, hi = block_info[0]["array-location"][0]
                log.extend((site, s) for s in steps[lo:hi])
            return block

        data = da.data.rechunk({0: 1}).map_blocks(note, dtype=da.dtype, meta=np.empty((0,) * da.ndim, da.dtype))
        return da.copy(data=data)

    tr.attention = attention
    return tr


def test_a_selection_reads_only_its_site_and_step_and_results_are_kept(sd_trace):
    log = []
    tr = counting(ats.open_trace(sd_trace.path), log)
    site = tr.sites[4]
    v = view(tr, words=["circle"], site=site, step=0)
    assert set(log) == {(site, 0)}
    log.clear()
    v.step = 1
    assert set(log) == {(site, 1)}  # one site, one step (the map, and the table's statistics)
    log.clear()
    v.step = 0  # kept
    assert log == []
    v.words = ["circle", "square"]  # the maps of steps already read are kept; the table's statistics read again
    assert set(log) == {(site, 0)}
    log.clear()
    v.site = "all"  # every site, one at a time
    assert set(log) == {(s, 0) for s in tr.sites}
    log.clear()
    v.site, v.step = site, "all"
    assert set(log) == {(site, 0), (site, 1), (site, 2)}


def test_bad_input_is_one_clear_error_and_changes_nothing(sd_trace, tmp_path, sd_pipe):
    v = view(sd_trace, words=["circle"], site=sd_trace.sites[0], step=1)
    cases = [("words", ["green"], r"words=\['green'\]: target 'green' is not in the prompt; its words are: a, red"),
             ("words", [], r"words=\[\]: expected one or more words"),
             ("words", [3], r"words=\[3\]: expected one or more words or phrases of the prompt"),
             ("step", 3, r"step=3: expected 'all' or one of the captured steps \[0, 1, 2\]"),
             ("step", -1, r"step=-1: expected"),
             ("site", "up_blocks.9.attn2", r"site='up_blocks.9.attn2': expected 'all' or one of the sites down_blocks"),
             ("head", 2, r"head=2: expected 'mean' or no head index: this trace stores the mean over heads"),
             ("sample", 1, r"sample=1: expected one of the samples \[0\]"),
             ("opacity", 1.5, r"opacity=1.5: expected a number from 0")]
    for name, value, message in cases:
        with pytest.raises(ats.AttnscopeError, match=message):
            setattr(v, name, value)
    v.words = "circle"  # one word as a string, or a tuple
    assert (v.words, v.site, v.step, v.head, v.sample, v.opacity) == (["circle"], sd_trace.sites[0], 1, "mean", 0, 0.6)
    with pytest.raises(ats.AttnscopeError, match=r"step=5: expected 'all' or one of the captured steps"):
        view(sd_trace, step=5)
    with pytest.raises(ats.AttnscopeError, match="cmap='nope'"):
        view(sd_trace, cmap="nope")
    with pytest.raises(ats.AttnscopeError, match="compare=True: this viewer shows one trace"):
        v.current_map(compare=True)
    other = ats.capture(sd_pipe, "a green triangle", seed=0, store=tmp_path / "other.zarr", **RUN)
    with pytest.raises(ats.AttnscopeError, match=r"compare='.*other.zarr': cannot compare .* their prompts differ "
                                                 r"\(\['a red circle and a blue square'\] vs \['a green triangle'\]\)"):
        view(sd_trace, compare=other, words=["circle"])


def test_compare_of_another_schedule_is_an_error_naming_both(sd_pipe, sd_trace, tmp_path):
    """Two runs of the prompt with 3 and 2 steps are not a before/after (as ats.compare says); the view does not
    pair their steps by number."""
    shorter = ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / "two.zarr", **{**RUN, "num_inference_steps": 2})
    with pytest.raises(ats.AttnscopeError) as caught:
        view(sd_trace, compare=shorter)
    message = str(caught.value)
    assert message.startswith(f"compare={str(shorter.path)!r}: cannot compare {str(sd_trace.path)!r} and ")
    assert "their num_steps differs (3 vs 2)" in message and "\n" not in message
    with pytest.raises(ats.AttnscopeError, match=r"their num_steps differs \(3 vs 2\)"):
        ats.compare(sd_trace, shorter, ["circle"])  # the same check


def test_samples_with_their_own_prompts(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, [PROMPT, "a green triangle"], seed=[0, 1], store=tmp_path / "two.zarr", **RUN)
    v = view(tr)
    assert v.sample_options == [0, 1] and v.words == ["red circle", "blue square"]
    v.sample = 1  # its prompt lacks the words: its own default words
    assert v.words == ["green triangle"] and "green" in v.word_options and v.panels[0]["prompt"] == "a green triangle"
    tokens = [i for i, (t, r) in enumerate(zip(tr.coords["token_text"].values[1], tr.coords["token_role"].values[1]))
              if r == "word" and t in ("green</w>", "triangle</w>")]
    want = np.mean([ats.stats.upsample_maps(tr.attention(s).sel(sample=1).isel(token=tokens).astype("float64")
                                            .sum("token").mean(("step", "head")).values, (32, 32)) for s in tr.sites], 0)
    np.testing.assert_allclose(v.current_map()[0], want, rtol=1e-5)


def test_in_a_jupyter_kernel(sd_trace, tmp_path):
    """A real kernel (nbclient) makes the viewer, moves the step and prints a number; it is the one computed here."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    site = sd_trace.sites[1]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import attnscope as ats\nfrom attnscope.plot._view import view\n"
        f"v = view(ats.open_trace({str(sd_trace.path)!r}), words=['circle'], site={site!r}, step=0)\nv"),
        nbformat.v4.new_code_cell("v.step = 2\nprint(repr(v.word_means['circle']), repr(v.map_max))")]
    NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(cwd), env={**os.environ, **ONE_THREAD})
    shown = nb.cells[0].outputs[-1]["data"]
    assert "application/vnd.jupyter.widget-view+json" in shown  # displayed as a widget, not as a repr
    mean, top = (float(x) for x in nb.cells[1].outputs[0]["text"].split())
    want = expected_maps(sd_trace, ["circle"], [site], [2])
    assert mean == pytest.approx(float(want.mean()), rel=1e-5) and top == pytest.approx(float(want.max()), rel=1e-5)
    assert not any(cwd.iterdir())


CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_ready():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the notebooks extra)")
    if shutil.which("jupyter") is None and not (Path(sys.executable).parent / "jupyter").exists():
        pytest.skip("the jupyter command is missing")


@contextlib.contextmanager
def jupyterlab_page(tmp_path, code):
    """A real JupyterLab on localhost serving a notebook of one cell, ``code``, opened in headless chromium and run;
    yields the page and the list the page's console errors go to."""
    _browser_ready()
    import nbformat
    from playwright.sync_api import sync_playwright

    root = tmp_path / "lab"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, root / "view.ipynb")
    port = _free_port()
    private = {"JUPYTER_CONFIG_DIR": ".cfg", "JUPYTER_RUNTIME_DIR": ".rt", "JUPYTERLAB_WORKSPACES_DIR": ".ws",
               "JUPYTERLAB_SETTINGS_DIR": ".settings", "IPYTHONDIR": ".ipy"}  # nothing written outside tmp_path
    env = {**os.environ, **ONE_THREAD, **{k: str(tmp_path / v) for k, v in private.items()}}
    quiet = tmp_path / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    quiet.parent.mkdir(parents=True)
    quiet.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--allow-root",
         "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"jupyter lab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "jupyter lab did not answer within 60 s"
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                errors = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{port}/lab/tree/view.ipynb")
                page.wait_for_function("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                                       " return w && w.sessionContext && w.sessionContext.session"
                                       " && w.sessionContext.session.kernel; }", timeout=60_000)
                page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
                page.wait_for_selector(".attnscope-viewer img.atv-map", timeout=60_000)
                yield page, errors
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def widget_errors(errors):
    return [e for e in errors if any(k in e.lower() for k in ("widget", "atv", "attnscope", "esm"))]


def move_slider(page, name, position):
    """Drag the viewer's ``name`` slider to ``position`` as a user does: input events while moving, change on release."""
    page.eval_on_selector(f".attnscope-viewer input.atv-{name}", f"""el => {{ el.value = {position};
        el.dispatchEvent(new Event('input', {{bubbles: true}}));
        el.dispatchEvent(new Event('change', {{bubbles: true}})); }}""")


def test_in_jupyterlab_in_chromium(sd_trace, tmp_path):
    """A real JupyterLab on localhost, opened in headless chromium: run the notebook, see the widget's maps, move
    the step slider in the page, see the maps change; the widget logs no error. Screenshots go to
    ``$ATTNSCOPE_VIEWER_SCREENSHOTS`` when set."""
    code = f"import attnscope as ats\nfrom attnscope.plot._view import view\nview(ats.open_trace({str(sd_trace.path)!r}), step=0)"
    with jupyterlab_page(tmp_path, code) as (page, errors):
        viewer = page.locator(".attnscope-viewer")
        assert viewer.locator(".atv-run figure").count() == 3  # the image, then one map per default word
        assert viewer.locator(".atv-max").inner_text() != "—"
        maps = viewer.locator(".atv-panels")
        first, source = maps.screenshot(), viewer.locator("img.atv-map").first.get_attribute("src")
        move_slider(page, "step", 3)
        page.wait_for_function("old => document.querySelector('.attnscope-viewer img.atv-map').src !== old",
                               arg=source, timeout=30_000)
        assert "step 2 (t=" in viewer.locator(".atv-summary").inner_text()
        second = maps.screenshot()
        assert first != second
        keep = os.environ.get("ATTNSCOPE_VIEWER_SCREENSHOTS")
        if keep:
            Path(keep, "before.png").write_bytes(first)
            Path(keep, "after.png").write_bytes(second)
        assert not widget_errors(errors), widget_errors(errors)


def test_in_chromium_the_all_position_counts_only_the_steps_averaged(gated_trace, tmp_path):
    """A TGATE trace with 3 steps, step 2 gated: the step slider's "all" reads "mean of 2" (the steps averaged),
    when drawn and when the slider is dragged back to it; the site slider counts every site."""
    code = (f"import attnscope as ats\nfrom attnscope.plot._view import view\n"
            f"view(ats.open_trace({str(gated_trace.path)!r}), words=['circle'], step='all')")
    with jupyterlab_page(tmp_path, code) as (page, errors):
        step = page.locator(".attnscope-viewer input.atv-step + .atv-value")
        site = page.locator(".attnscope-viewer input.atv-site + .atv-value")
        assert step.inner_text() == "all (mean of 2)"
        assert site.inner_text() == f"all (mean of {len(gated_trace.sites)})"
        assert "mean of 2 steps computed (gated 2 left out)" in page.locator(".attnscope-viewer .atv-summary").inner_text()
        move_slider(page, "step", 2)
        page.wait_for_function("() => document.querySelector('.attnscope-viewer .atv-summary').textContent"
                               ".includes('step 1 (t=')", timeout=30_000)
        page.eval_on_selector(".attnscope-viewer input.atv-step", """el => { el.value = 0;
            el.dispatchEvent(new Event('input', {bubbles: true})); }""")  # dragging: the label only
        assert step.inner_text() == "all (mean of 2)"
        assert not widget_errors(errors), widget_errors(errors)


def test_view_takes_a_path_and_says_what_it_is(sd_trace):
    v = view(str(sd_trace.path))
    assert isinstance(v, TraceViewer) and v.site_labels[0] == "down0.a0.t0"
    assert v.step_labels == [f"step {s} (t={t:g})" for s, t in enumerate(sd_trace.timesteps)]
    state = json.dumps({k: getattr(v, k) for k in ("words", "site", "step", "panels", "statistics", "word_means")})
    assert len(state) < 100_000  # small PNGs and numbers through the comm

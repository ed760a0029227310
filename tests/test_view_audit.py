"""Audit of ``ats.view`` as a demanding user meets it: edge-case traces (one step, one site, several prompts, a step
slice, non-square images, no images, NaN maps), the page in Debian's chromium (its numbers read back from the DOM
against numbers computed here, its keyboard use, prompts that look like HTML), each defect found checked here.

The browser tests render the real front end (``_view.js``) against a live :class:`TraceViewer`: a small stand-in
for anywidget's model passes what the page sets to the Python widget and its new state back, as the comm does
(every changed value set first, then the change events, as Backbone does). ``test_view.py`` runs it in JupyterLab.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

pytest.importorskip("anywidget", reason="the viewer needs anywidget (pip install 'attnscope[notebooks]')")

import attnscope as ats  # noqa: E402
import attnscope.plot._view as viewer  # noqa: E402
from attnscope.plot._view import view  # noqa: E402
from attnscope.tokens import resolve_targets  # noqa: E402

PROMPT = "a red circle and a blue square"
RUN = dict(num_inference_steps=3, height=32, width=32)
CHROMIUM = "/usr/bin/chromium"
XSS = 'a <img src=x onerror="__ran=1"> </script><script>__ran=2</script> "café" 🐱 square'


@pytest.fixture(scope="module")
def sd_trace(sd_pipe, tmp_path_factory):
    return ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path_factory.mktemp("audit") / "sd.zarr", **RUN)


def expected_maps(tr, words, sites, steps, sample=0):
    """Each word's map computed here: its token positions found in the sample's own tokens, summed, heads and steps
    averaged, upsampled to the image size per site, then the mean over the sites."""
    index = tr.coords["sample"].values.tolist().index(sample)
    tokens = [str(t) for t in tr.coords["token_text"].values[index]]
    roles = [str(r) for r in tr.coords["token_role"].values[index]]
    size = (tr.manifest["run"]["height"], tr.manifest["run"]["width"])
    out = []
    for word in words:
        positions = resolve_targets(tokens, [word], roles)[word]
        per_site = []
        for site in sites:
            da = tr.attention(site).sel(sample=sample, step=list(steps)).astype("float64").mean("head")
            native = da.isel(token=positions).sum("token").mean("step").transpose("y", "x").values
            per_site.append(ats.stats.upsample_maps(native, size))
        out.append(np.mean(per_site, axis=0))
    return np.stack(out)


# --- edge-case traces: the maps shown are the ones computed here -------------------------------------------------


@pytest.mark.parametrize("case", ["one step", "one site", "step slice", "non-square", "third prompt of three"])
def test_edge_case_traces_show_the_hand_computed_maps(case, sd_pipe, tmp_path):
    prompt, seed, run, capture, sample = PROMPT, 0, dict(RUN), {}, 0
    if case == "one step":
        run["num_inference_steps"] = 1
    elif case == "one site":
        capture["sites"] = lambda site: site.block == "mid"
    elif case == "step slice":
        run["num_inference_steps"], capture["steps"] = 6, slice(2, 5)
    elif case == "non-square":
        run["width"] = 64
    else:  # token lists of different lengths on one axis
        prompt, seed, sample = ["a cat", PROMPT, "a green triangle beside a small yellow star on grey"], [0, 1, 2], 2
    tr = ats.capture(sd_pipe, prompt, seed=seed, store=tmp_path / "t.zarr", **capture, **run)
    v = view(tr, sample=sample)
    steps = tr.attention(tr.sites[0])["step"].values.tolist()
    assert v.step_options == steps and v.step_mean_count == len(steps)
    for site, step in [("all", "all"), (v.site_options[-1], steps[-1])]:
        v.site, v.step = site, step
        want = expected_maps(tr, v.words, tr.sites if site == "all" else [site], steps if step == "all" else [step],
                             sample)
        np.testing.assert_allclose(v.current_map(), want, rtol=1e-5, atol=1e-8)
        assert v.current_map().shape[1:] == (run["height"], run["width"])
        assert (v.map_min, v.map_max) == (pytest.approx(want.min(), rel=1e-5), pytest.approx(want.max(), rel=1e-5))


def test_one_step_or_one_site_is_not_called_steps_or_sites(sd_pipe, tmp_path):
    """A trace of one step read 'mean of 1 steps'; of one site 'mean of 1 sites'."""
    one = ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / "one.zarr", sites=lambda site: site.block == "mid",
                      **{**RUN, "num_inference_steps": 1})
    assert view(one).summary.startswith("mean of 1 site · mean of 1 step · ")


def test_a_nan_map_that_was_not_gated_is_not_called_gated(sd_trace, tmp_path):
    """A map the model made NaN (an fp16 overflow, not TGATE) was captioned 'not computed here (a gated step)'."""
    path = tmp_path / "nan.zarr"
    shutil.copytree(sd_trace.path, path)
    site = sd_trace.sites[0]
    stored = zarr.open_array(str(path / "sites" / site / "attention"), mode="r+")
    values = stored[:]
    values[1] = np.nan
    stored[:] = values
    tr = ats.open_trace(path)
    assert tr.gated_steps == []
    v = view(tr, words=["circle"], site=site, step=1)
    assert np.isnan(v.current_map()).all() and v.word_means == {"circle": None}
    assert v.panels[0]["maps"][0]["note"] == "no value here (the stored map is NaN)"
    v.step = 0
    assert v.panels[0]["maps"][0]["note"] == "" and v.word_means["circle"] is not None


def cell_numbers(table_html):
    """The table's cells as ``{row label: [number or None, ...]}``, read back from its HTML."""
    rows = {}
    for label, cells in re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", table_html):
        texts = [re.sub(r"</?b>", "", c) for c in re.findall(r"<td>(.*?)</td>", cells)]
        rows[label] = [None if t == "—" else float(t) for t in texts]
    return rows


def test_the_table_keeps_three_significant_digits(sd_pipe, sd_trace, tmp_path):
    """The table printed three decimals: a Gini of 0.0026 read 0.003, a small after − before difference -0.000."""
    reg = ats.rerun(sd_trace, [ats.regulate.Reweight(["circle"], 1.05)], pipe=sd_pipe, store=tmp_path / "reg.zarr")
    v = view(sd_trace, compare=reg, words=["a", "circle"], site=sd_trace.sites[0], step=1)
    shown = cell_numbers(v.table_html)
    small = 0
    for row in v.statistics["rows"]:
        label = row["label"].replace("'", "&#x27;")
        for value, text in zip(row["values"], shown[label]):
            assert (value is None) == (text is None)
            if value is not None:
                assert text == pytest.approx(value, rel=5e-3), (row["label"], value, text)
                small += abs(value) < 0.01
    assert small >= 2  # the Gini and the differences: small numbers are read to three digits


# --- in chromium ---------------------------------------------------------------------------------------------------

STATE = [n for n in viewer.TraceViewer.class_trait_names(sync=True)
         if not n.startswith("_") and n not in ("layout", "tabbable", "tooltip")]

MOUNT = """
async ([source, state]) => {
  const module = await import(URL.createObjectURL(new Blob([source], {type: "text/javascript"})));
  const handlers = {};
  const fire = (names) => { for (const k of names) for (const f of [...(handlers["change:" + k] || [])]) f(); };
  window.pending = 0;
  const model = {
    state, changed: {},
    get(k) { return this.state[k]; },
    set(k, v) { this.state[k] = v; this.changed[k] = v; fire([k]); },
    on(e, f) { (handlers[e] = handlers[e] || []).push(f); },
    off(e, f) { handlers[e] = (handlers[e] || []).filter((g) => g !== f); },
    save_changes() {
      const sent = this.changed;
      this.changed = {};
      window.pending += 1;
      window.kernel(JSON.stringify(sent)).then((text) => {
        const next = JSON.parse(text);
        const names = Object.keys(next).filter((k) => JSON.stringify(next[k]) !== JSON.stringify(this.state[k]));
        for (const k of names) this.state[k] = next[k];
        fire(names);
        window.pending -= 1;
      });
    },
  };
  const el = document.createElement("div");
  document.body.appendChild(el);
  module.default.render({ model, el });
}
"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """The viewer ``v`` drawn in a fresh chromium page; ``errors`` gathers console errors, page errors, dialogs
    and the kernel side's exceptions."""

    def __init__(self, browser, v):
        self.v, self.errors = v, []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.expose_function("kernel", self._kernel)
        self.page.set_content("<!doctype html><meta charset='utf-8'><body></body>")
        source = Path(viewer.__file__).with_name("_view.js").read_text()
        self.page.evaluate(MOUNT, [source, json.loads(json.dumps(self._state()))])

    def _state(self):
        return {k: getattr(self.v, k) for k in STATE}

    def _kernel(self, text):
        try:
            with self.v.hold_trait_notifications():
                for name, value in json.loads(text).items():
                    setattr(self.v, name, value)
        except Exception as exc:  # noqa: BLE001  (reported as the kernel would log it)
            self.errors.append(f"kernel: {exc}")
        return json.dumps(self._state())

    def settle(self):
        self.page.wait_for_function("() => window.pending === 0", timeout=30_000)

    def text(self, selector):
        return self.page.inner_text(f".attnscope-viewer {selector}")

    def close(self):
        self.page.close()


def shown(text):
    return None if text == "—" else float(text)


def test_numbers_on_the_page_agree_with_the_maps_and_dominance(browser, sd_trace):
    """Every number the page shows (each panel's mean, the colour bar's ends, every table cell) read back from the
    DOM, against the maps and ``ats.stats.dominance`` computed here, to the three significant digits shown: the
    captions and the colour bar gave 0.013 for 0.01346, the table 0.003 for a Gini of 0.0026."""
    words, site, step = ["a", "circle", "blue square"], sd_trace.sites[2], 1
    page = Page(browser, view(sd_trace, words=words, site=site, step=step))
    try:
        want = expected_maps(sd_trace, words, [site], [step])
        captions = page.page.locator(".attnscope-viewer figure[data-word] .atv-mean").all_inner_texts()
        assert [shown(t.removeprefix("mean ")) for t in captions] == [pytest.approx(m, rel=5e-3)
                                                                       for m in want.mean(axis=(1, 2))]
        assert shown(page.text(".atv-min")) == pytest.approx(want.min(), rel=5e-3)
        assert shown(page.text(".atv-max")) == pytest.approx(want.max(), rel=5e-3)
        ds = ats.stats.dominance(sd_trace, targets=words, sites=[site], steps=[step])
        ds = ds.sel(sample=0, step=step, site=site)
        top, second = sorted(ds.target_share.values.tolist(), reverse=True)[:2]
        expected = {**{f"share of '{w}'": float(ds.target_share.sel(target=w)) for w in words},
                    "dominance ratio (top-1 / top-2 of these shares)": top / second,
                    "entropy (nats)": float(ds.entropy), "Gini of the shares": float(ds.gini),
                    "sink share (SOT, EOT, padding)": float(ds.sink_share)}
        rows = page.page.locator(".attnscope-viewer .atv-table tbody tr")
        table = {rows.nth(i).locator("th").inner_text(): shown(rows.nth(i).locator("td").inner_text())
                 for i in range(rows.count())}
        assert table == {k: pytest.approx(v, rel=5e-3) for k, v in expected.items()}
        assert min(abs(v) for v in expected.values()) < 0.01  # a small number is among them
        assert not page.errors, page.errors
    finally:
        page.close()


def test_prompts_and_tokens_that_look_like_html_are_shown_as_text(browser, sd_pipe, tmp_path):
    """A prompt holding ``<img onerror>``, ``</script><script>``, quotes and unicode is shown as written, its tokens
    as chips and table rows of text; nothing of it runs and no element of it is made."""
    tr = ats.capture(sd_pipe, [PROMPT, XSS], seed=[0, 1], store=tmp_path / "xss.zarr", **RUN)
    v = view(tr, sample=1)
    page = Page(browser, v)
    try:
        assert page.text(".atv-prompt") == f"“{XSS}”"
        chips = page.page.locator(".attnscope-viewer .atv-chip").all_inner_texts()
        assert set(v.word_options) == set(chips) and any("<" in c for c in chips)
        page.page.locator(".attnscope-viewer .atv-chip", has_text="</").first.click()  # a token of markup, drawn
        page.settle()
        assert "</" in v.words and "share of '</'" in page.text(".atv-table")
        root = page.page.locator(".attnscope-viewer")
        assert root.locator("script").count() == 0 and root.locator("[onerror]").count() == 0
        assert root.locator("img").count() == 2 + 2 * len(v.words)  # the image alone, under each map; the bar
        assert root.locator("b").count() == root.locator(".atv-table td > b").count() == 1  # the top share
        assert page.page.evaluate("() => window.__ran") is None
        page.page.select_option(".attnscope-viewer select.atv-sample", "0")
        page.settle()
        assert page.text(".atv-prompt") == f"“{PROMPT}”" and v.words == ["red circle", "blue square"]
        assert page.page.evaluate("() => window.__ran") is None and not page.errors, page.errors
    finally:
        page.close()


def test_a_map_without_an_image_keeps_the_colour_bar_colours(browser, sd_pipe, tmp_path):
    """A trace without images (``output_type="latent"``) draws each map alone; the opacity slider dimmed it over a
    black ground (opacity 0.6 from the start), so its colours no longer matched the colour bar."""
    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / "latent.zarr", output_type="latent", **RUN)
    assert not tr.images
    page = Page(browser, view(tr, words=["circle"]))
    try:
        opacity = "() => getComputedStyle(document.querySelector('.attnscope-viewer img.atv-map')).opacity"
        assert page.page.evaluate(opacity) == "1"
        page.page.locator(".attnscope-viewer input.atv-opacity").fill("30")
        page.settle()
        assert page.page.evaluate(opacity) == "1" and page.v.opacity == pytest.approx(0.3)
        assert not page.errors, page.errors
    finally:
        page.close()


def test_the_colour_bar_states_no_scale_when_no_map_is_drawn(browser, sd_pipe, sd_trace, tmp_path):
    """At a gated step no panel has a map; the colour bar read "0 … 0", a scale of nothing."""
    gated = ats.rerun(sd_trace, [ats.regulate.TGate(0.5)], pipe=sd_pipe, store=tmp_path / "gated.zarr")
    page = Page(browser, view(gated, words=["circle"], site=gated.sites[0], step=2))
    try:
        assert page.text(".atv-min") == page.text(".atv-max") == "—"
        assert page.text("figure[data-word] .atv-mean") == "not computed here (a gated step)"
        page.page.focus(".attnscope-viewer input.atv-step")
        page.page.keyboard.press("ArrowLeft")  # to step 1: computed
        page.settle()
        assert page.v.step == 1
        want = expected_maps(gated, ["circle"], [gated.sites[0]], [1])
        assert shown(page.text(".atv-min")) == pytest.approx(want.min(), rel=5e-3)
        assert shown(page.text(".atv-max")) == pytest.approx(want.max(), rel=5e-3)
        assert not page.errors, page.errors
    finally:
        page.close()


def test_the_keyboard_reaches_every_position_and_no_further(browser, sd_pipe, tmp_path):
    """Arrow keys, Home and End on the sliders and the selectors move through every position and stop at the ends;
    each position shows the selection it names, and gives it to a screen reader (which read the slider's
    position, "3", for "step 2 (t=1)")."""
    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / "heads.zarr", heads="all", **RUN)
    v = view(tr, words=["circle"])
    page = Page(browser, v)
    try:
        step = page.page.locator(".attnscope-viewer input.atv-step")
        step.focus()
        seen = []
        for _ in range(5):  # three steps after "all"; then the end
            page.page.keyboard.press("ArrowRight")
            page.settle()
            seen.append((v.step, page.text("input.atv-step + .atv-value")))
        assert [s for s, _ in seen] == [0, 1, 2, 2, 2]
        assert [label for _, label in seen[:3]] == v.step_labels
        assert step.get_attribute("aria-valuetext") == v.step_labels[-1]  # a screen reader says the step, not "3"
        page.page.keyboard.press("Home")
        page.settle()
        assert v.step == "all" and page.text("input.atv-step + .atv-value") == "all (mean of 3)"
        assert step.get_attribute("aria-valuetext") == "all (mean of 3)"
        page.page.locator(".attnscope-viewer input.atv-site").focus()
        page.page.keyboard.press("End")
        page.settle()
        assert v.site == v.site_options[-1] and page.text("input.atv-site + .atv-value") == v.site_labels[-1]
        page.page.locator(".attnscope-viewer select.atv-head").select_option("7")
        page.settle()
        assert v.head == 7 and page.text(".atv-summary").endswith("head 7 · sample 0")
        np.testing.assert_allclose(v.current_map(), ats.stats.upsample_maps(
            tr.attention(v.site).sel(sample=0, head=7).astype("float64").isel(token=tr.words["circle"])
            .sum("token").mean("step").values, (32, 32))[None], rtol=1e-5)
        assert not page.errors, page.errors
    finally:
        page.close()


def test_a_keyboard_user_toggling_word_chips_stays_on_the_chip(browser, sd_trace):
    """Space on a word chip redrew every chip and dropped the focus to the page: a second Space did nothing and
    Tab started again from the top."""
    v = view(sd_trace, words=["circle"])
    page = Page(browser, v)
    try:
        chip = page.page.locator(".attnscope-viewer .atv-chip", has_text=re.compile(r"^square$"))
        chip.focus()
        page.page.keyboard.press("Space")
        page.settle()
        assert v.words == ["circle", "square"]
        assert page.page.evaluate("() => document.activeElement.textContent") == "square"
        page.page.keyboard.press("Space")
        page.settle()
        assert v.words == ["circle"]
        assert not page.errors, page.errors
    finally:
        page.close()

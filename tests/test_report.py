"""``ats.report`` / ``attnscope report``: one self-contained HTML file, read as text and PNGs, opened in a real
browser (Debian's chromium driven by playwright), and written from the command line."""

import base64
import html
import html.parser
import inspect
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import attnscope as ats

from .conftest import cli

PROMPT = "a red circle and a blue square"
SECTIONS = ("summary", "images", "steps", "grid", "dominance", "convergence", "compare")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def traces(shapes, tmp_path_factory):
    """A 20-step shapes trace and its rerun with Attention Regulation."""
    folder = tmp_path_factory.mktemp("traces")
    tr = ats.capture(shapes, PROMPT, seed=0, store=folder / "a.zarr", num_inference_steps=20)
    reg = ats.rerun(tr, [ats.regulate.AttentionRegulation(["circle", "square"])], store=folder / "reg.zarr")
    return tr, reg


@pytest.fixture(scope="module")
def small(shapes, tmp_path_factory):
    """A 4-step trace, for the command line and the errors."""
    return ats.capture(shapes, PROMPT, seed=1, store=tmp_path_factory.mktemp("small") / "s.zarr", num_inference_steps=4)


@pytest.fixture(scope="module")
def written(traces, tmp_path_factory):
    tr, reg = traces
    path = ats.report(tr, tmp_path_factory.mktemp("html") / "report.html", compare=reg)
    return path, path.read_text(encoding="utf-8")


class Page(html.parser.HTMLParser):
    """The tags of a page that matter here: every ``<img>``'s attributes, the section ids, the scripts."""

    def __init__(self, text):
        super().__init__()
        self.images, self.sections, self.scripts, self.links = [], [], [], []
        self._script = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "script":
            self._script = [attrs.get("type"), attrs.get("id"), ""]
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])

    def handle_data(self, data):
        if self._script is not None:
            self._script[2] += data

    def handle_endtag(self, tag):
        if tag == "script":
            self.scripts.append(tuple(self._script))
            self._script = None


def png(uri):
    """The image a PNG data URI holds, checked to be a PNG that decodes."""
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64", uri[:40]
    raw = base64.b64decode(data, validate=True)
    Image.open(io.BytesIO(raw)).verify()
    picture = Image.open(io.BytesIO(raw))
    assert picture.format == "PNG"
    return np.asarray(picture.convert("RGB"))


def frames(text):
    """The slider's frames and labels, from the page's JSON block."""
    block = next(body for kind, ident, body in Page(text).scripts if ident == "step-frames")
    data = json.loads(block)
    return data["frames"], data["labels"]


def test_report_is_one_small_self_contained_file(written):
    path, text = written
    page = Page(text)
    assert path.stat().st_size < 2_000_000, f"{path.stat().st_size} bytes"
    assert "http://" not in text and "https://" not in text
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links), page.links
    assert "default-src 'none'" in text  # the Content-Security-Policy: the page may load nothing
    assert page.sections == list(SECTIONS)
    assert len(page.images) >= 8 and all(png(img["src"]).size for img in page.images)
    code = [body for kind, _, body in page.scripts if kind is None]
    assert len(code) == 1 and len(code[0]) < 2_000  # one small inline script
    assert f"“{PROMPT}”" in text and "Incomplete" not in text and "AttentionRegulation" in text


def test_the_slider_has_one_frame_per_step_and_they_differ(written, traces):
    _, text = written
    uris, labels = frames(text)
    assert len(uris) == len(labels) == 20
    assert labels[0].startswith("step 0 (t=") and labels[-1].startswith("step 19 (t=")
    pictures = [png(u) for u in uris]
    assert len({p.shape for p in pictures}) == 1  # the frames line up
    assert all(not np.array_equal(a, b) for a, b in zip(pictures, pictures[1:]))
    first = Page(text).images[[i.get("id") for i in Page(text).images].index("step-map")]
    assert first["src"] == uris[0]


def test_per_step_word_maps_are_the_maps_of_each_step(traces):
    tr, _ = traces
    words = ats.plot.report_words(tr)
    assert words == ["red circle", "blue square"]
    per_step = ats.plot.word_maps(tr, words, per_step=True)
    assert per_step.dims == ("step", "word", "y", "x") and per_step.sizes["step"] == 20
    for step in (0, 7, 19):
        np.testing.assert_allclose(per_step.sel(step=step).values, ats.plot.word_maps(tr, words, steps=[step]).values,
                                   rtol=1e-5, atol=1e-7)


def test_bad_input_is_one_clear_error_and_writes_nothing(small, shapes, tmp_path):
    out = tmp_path / "r.html"
    cases = [
        (dict(path=tmp_path), "is a directory; expected the path of an .html file"),
        (dict(path=tmp_path / "r.png"), "expected a file name ending in .html"),
        (dict(words=["circle", "cat"]), "target 'cat' is not in the prompt; its words are: a, red, circle"),
        (dict(words=[]), "words=[]: expected at least one word"),
        (dict(sample=3), "sample=3 is not in this trace"),
        (dict(compare=42), "compare=42: expected an attnscope Trace"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ats.AttnscopeError, match=None) as caught:
            ats.report(small, **{"path": out, **kwargs})
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    with pytest.raises(ats.AttnscopeError, match="expected an attnscope Comparison"):
        ats.plot.report(small, out, compare=small)
    other = ats.capture(shapes, "a green triangle", seed=1, store=tmp_path / "other.zarr", num_inference_steps=2)
    with pytest.raises(ats.AttnscopeError, match="their prompts differ"):
        ats.report(small, out, compare=other)
    bigger = ats.capture(shapes, PROMPT, seed=1, store=tmp_path / "big.zarr", num_inference_steps=2, height=48, width=48)
    with pytest.raises(ats.AttnscopeError, match="their height differs"):
        ats.report(small, out, compare=bigger)
    assert not out.exists() and not list(tmp_path.glob("*.html*"))
    out.write_text("keep")
    with pytest.raises(ats.AttnscopeError, match="exists; pass overwrite=True"):
        ats.report(small, out)
    assert out.read_text() == "keep"
    assert ats.report(small, out, overwrite=True) == out and out.read_text().startswith("<!DOCTYPE html>")


def table_rows(text, first_header):
    """The body rows (lists of cell texts) of the page's table whose first header cell is ``first_header``."""
    head = text.index(f"<table><thead><tr><th>{first_header}</th>")
    body = text[text.index("<tbody>", head) + len("<tbody>"):text.index("</tbody>", head)]
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)] for row in body.split("</tr>") if row]


def test_the_dominance_ratio_is_the_ratio_of_the_shares_shown(written, traces):
    """Each column's dominance ratio is its largest target share over the second: the shares computed here from
    ats.stats.dominance (sites averaged; the mean over steps, the first and the last step), as the table shows."""
    tr, _ = traces
    _, text = written
    one = ats.stats.dominance(tr, targets=["red circle", "blue square"]).sel(sample=0).mean("site").target_share
    steps = one["step"].values
    want_shares = np.array([[float(one.sel(target=t).mean()), float(one.sel(target=t, step=steps[0])),
                             float(one.sel(target=t, step=steps[-1]))] for t in ("red circle", "blue square")])
    shares = table_rows(text, "target share")
    assert [row[0] for row in shares] == ["red circle", "blue square"]
    shown = np.array([[float(cell.rstrip(" %")) / 100 for cell in row[1:]] for row in shares])
    np.testing.assert_allclose(shown, want_shares, atol=0.0005 + 1e-9)  # shown to 0.1 %
    ratio = next(row for row in table_rows(text, "statistic") if row[0] == "dominance ratio")
    want = want_shares.max(axis=0) / want_shares.min(axis=0)  # two targets: top-1 over top-2
    np.testing.assert_allclose([float(cell) for cell in ratio[1:]], want, rtol=0.005)  # shown to 3 digits


def test_a_word_given_twice_is_drawn_once(small, tmp_path):
    text = ats.plot.report(small, tmp_path / "twice.html", words=["circle", "square", "circle"]).read_text()
    assert [row[0] for row in table_rows(text, "target share")] == ["circle", "square"]
    assert text.count("<h3>circle</h3>") == 1 and "heat maps of circle, square" in text
    done = cli("report", small.path, "-o", tmp_path / "cli.html", "--words", "circle,circle")
    assert done.exit_code == 0, done.stderr
    assert [row[0] for row in table_rows((tmp_path / "cli.html").read_text(), "target share")] == ["circle"]


UNICODE_PROMPT = "A red Circle, café — naïve 🙂"


@pytest.fixture(scope="module")
def unicode_trace(sd_pipe, tmp_path_factory):
    """Tiny SD with a prompt CLIP's tokenizer rewrites: lower case, byte-level pieces (accents, a dash, an emoji),
    the comma split off."""
    return ats.capture(sd_pipe, UNICODE_PROMPT, seed=0, store=tmp_path_factory.mktemp("unicode") / "u.zarr",
                       num_inference_steps=2, height=32, width=32)


def test_the_title_is_the_prompt_as_given(unicode_trace, tmp_path):
    """The page's title and header show the prompt recorded in the manifest, not one spelled back from the tokens."""
    assert unicode_trace.manifest["run"]["prompts"] == [UNICODE_PROMPT]
    text = ats.report(unicode_trace, tmp_path / "u.html", words=["circle"]).read_text(encoding="utf-8")
    assert f"<title>attnscope report — {UNICODE_PROMPT}</title>" in text
    assert f'<p class="prompt">“{UNICODE_PROMPT}”</p>' in text


def test_an_emoji_in_the_prompt_draws_without_glyph_warnings(unicode_trace, tmp_path):
    """The fonts lack the emoji: its figures show a box, with no matplotlib warning per figure and glyph."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ats.report(unicode_trace, tmp_path / "u.html", words=["circle"])
    assert not [w for w in caught if "missing from font" in str(w.message)]


def _edited_copy(trace, dest, **attributes):
    """A copy of ``trace`` with root attributes replaced, read node by node (no consolidated metadata)."""
    shutil.copytree(trace.path, dest)
    root = json.loads((dest / "zarr.json").read_text())
    root["attributes"].update(attributes)
    root.pop("consolidated_metadata", None)
    (dest / "zarr.json").write_text(json.dumps(root))
    return dest


def test_incomplete_nan_and_gated_traces_say_so_at_the_top(small, tmp_path):
    site = small.sites[0]
    copy = _edited_copy(small, tmp_path / "inc.zarr", complete=False, steps_written=2, nan_maps={site: [1]})
    with pytest.warns(ats.AttnscopeWarning):
        text = ats.report(copy, tmp_path / "inc.html").read_text()
    top = text[:text.index("<section")]
    assert "Incomplete trace." in top and "after 2 of 4 steps" in top and "NaN attention." in top
    assert len(frames(text)[0]) == 2
    gated = ats.rerun(small, [ats.regulate.TGate(2)], store=tmp_path / "gated.zarr")
    text = ats.report(gated, tmp_path / "gated.html", compare=small).read_text()
    top = text[:text.index("<section")]
    assert "Gated steps." in top and "Steps 2–3 reused cached attention" in top
    assert frames(text)[1][2].endswith("— gated, no maps  ·  3 of 4") and "steps 2–3 gated" in text
    empty = _edited_copy(small, tmp_path / "empty.zarr", complete=False, steps_written=0)
    with pytest.warns(ats.AttnscopeWarning), pytest.raises(ats.AttnscopeError, match="has no step written"):
        ats.report(empty, tmp_path / "empty.html")


@pytest.fixture(scope="module")
def browser():
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the browser test needs Debian's chromium")
    with sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        try:
            yield launched
        finally:
            launched.close()


def test_the_report_works_in_a_browser(written, browser):
    path, _ = written
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    widths = page.evaluate("Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) >= 8 and all(w > 0 for w in widths), widths
    view, label, slider = page.locator("#step-map"), page.locator("#step-label"), page.locator("#step-slider")
    shots, labels = [view.screenshot()], [label.inner_text()]
    slider.focus()
    page.keyboard.press("End")  # a range input's End key: the last step, with an input event
    page.wait_for_function("() => document.getElementById('step-map').complete")
    shots.append(view.screenshot())
    labels.append(label.inner_text())
    slider.evaluate("(s) => { s.value = 10; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function("() => document.getElementById('step-map').complete")
    shots.append(view.screenshot())
    labels.append(label.inner_text())
    assert labels[0].startswith("step 0 ") and labels[1].startswith("step 19 ") and labels[2].startswith("step 10 ")
    assert shots[0] != shots[1] != shots[2]
    sizes = {Image.open(io.BytesIO(s)).size for s in shots}
    assert len(sizes) == 1 and min(next(iter(sizes))) > 100
    assert page.evaluate("document.getElementById('step-map').naturalWidth") > 0
    assert not problems, problems
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    page.close()


def test_report_command(small, tmp_path):
    out = tmp_path / "out" / "report.html"
    done = cli("report", small.path, "-o", out, "--words", "circle,blue square")
    assert done.exit_code == 0, done.stderr
    assert done.stdout.startswith(f"report: {out}  (") and out.exists()
    assert "“a red circle and a blue square”" in out.read_text() and 'id="compare"' not in out.read_text()
    again = cli("report", small.path, "-o", out)
    assert again.exit_code == 2 and again.stderr == f"error: -o {str(out)!r} exists; pass --overwrite to replace it\n"
    reweighted = ats.rerun(small, [ats.regulate.Reweight("square", 2.0)], store=tmp_path / "rw.zarr")
    done = cli("report", small.path, "-o", out, "--compare", reweighted.path, "--overwrite", "--sites", "up_blocks.*")
    assert done.exit_code == 0, done.stderr
    text = out.read_text()
    assert 'id="compare"' in text and "Reweight" in text and "7 sites" in text  # the run's sites; 4 drawn


@pytest.mark.parametrize("args, message", [
    (["-o", "{tmp}"], "error: -o '{tmp}' is a directory; expected the path of an .html file to write"),
    (["-o", "{tmp}/r.txt"], "error: -o '{tmp}/r.txt': expected a file name ending in .html"),
    (["-o", "{tmp}/r.html", "--words", "cat"], "error: target 'cat' is not in the prompt; its words are: a, red,"),
    (["-o", "{tmp}/r.html", "--sample", "2"], "error: --sample 2 is not in this trace; its samples are [0]"),
    (["-o", "{tmp}/r.html", "--compare", "{tmp}/nope.zarr"], "error: '{tmp}/nope.zarr' is not an attnscope trace"),
])
def test_report_command_errors_are_one_line(small, tmp_path, args, message):
    done = cli("report", small.path, *[a.format(tmp=tmp_path) for a in args])
    assert done.exit_code == 2 and done.stderr.startswith(message.format(tmp=tmp_path)), done.stderr
    assert done.stderr.count("\n") == 1 and not list(tmp_path.glob("*.html*"))


def test_report_is_public_with_an_example():
    assert "report" in ats.__all__ and "Examples" in inspect.getdoc(ats.report)
    assert ats.plot.report.__module__ == "attnscope.plot._report" and "Examples" in inspect.getdoc(ats.plot.report)
    done = cli("report", "--help")
    assert done.exit_code == 0 and "Example: attnscope report " in " ".join(done.stdout.split())

"""Regenerate the figures the docs show: ``python docs/_hooks/figures.py`` (about a minute on a CPU).

Every figure function of ``ats.plot`` on one trace of the embedded shapes model ("a green triangle and a yellow
circle", seed 4, 20 steps: the triangle goes missing) and its regulated rerun, written at the size a notebook
cell shows them into docs/images/; and, where Debian's chromium and playwright are installed, the screenshot of the
shapes demo's report (docs/images/report.png, its step slider at step 6).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import attnscope as ats

OUT = Path(__file__).resolve().parents[1] / "images"


def main() -> None:
    import torch

    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="attnscope-figures-"))
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    prompt, words = "a green triangle and a yellow circle", ["green triangle", "yellow circle"]
    tr = ats.capture(pipe, prompt, seed=4, store=work / "a.zarr", num_inference_steps=20)
    reg = ats.rerun(tr, [ats.regulate.AttentionRegulation(["triangle", "circle"])], store=work / "reg.zarr", pipe=pipe)
    figures = {
        "heatmaps": ats.plot.heatmaps(tr, words),
        "site_step_grid": ats.plot.site_step_grid(tr, "green triangle", steps=[0, 5, 10, 19]),
        "dominance_lines": ats.plot.dominance_lines(ats.stats.dominance(tr, targets=words)),
        "convergence": ats.plot.convergence(ats.stats.convergence(tr)),
        "violins": ats.plot.violins(tr, steps=[0, 10, 19]),
        "comparison": ats.plot.comparison(ats.compare(tr, reg, words)),
    }
    for name, fig in figures.items():
        fig.savefig(OUT / f"plot_{name}.png", dpi=80, bbox_inches="tight")
        print(OUT / f"plot_{name}.png")
    report_screenshot(pipe, work)


def report_screenshot(pipe: object, work: Path) -> None:
    """docs/images/report.png: the report of the demo in docs/report.md, in chromium, the slider at step 6."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("report.png left as it is: playwright is not installed")
        return
    if not chromium.exists():
        print(f"report.png left as it is: {chromium} is missing (apt-get install chromium)")
        return
    import os

    from PIL import Image

    os.chdir(work)  # the report shows the trace's path as given: runs/demo.zarr, as in docs/report.md
    tr = ats.capture(pipe, "a red circle and a blue square", seed=0, store="runs/demo.zarr", num_inference_steps=20)
    reg = ats.rerun(tr, [ats.regulate.AttentionRegulation(["circle", "square"])], store="runs/demo-reg.zarr",
                    pipe=pipe)
    page_path = ats.report(tr, "runs/demo-report.html", compare=reg).resolve()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1160, "height": 900})
        page.goto(page_path.as_uri(), wait_until="load")
        page.locator("#step-slider").evaluate("(s) => { s.value = 6; s.dispatchEvent(new Event('input')); }")
        page.wait_for_function("() => document.getElementById('step-map').complete")
        page.screenshot(path=str(OUT / "report.png"), full_page=True)
        browser.close()
    with Image.open(OUT / "report.png") as shot:  # a palette PNG: a third of the bytes, no visible change
        shot.convert("RGB").quantize(256).save(OUT / "report.png", optimize=True)
    print(OUT / "report.png")


if __name__ == "__main__":
    main()

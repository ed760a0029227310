"""Regenerate the figures the docs show: ``python docs/_hooks/figures.py`` (about a minute on a CPU).

Every figure function of ``ats.plot`` on one trace of the embedded shapes model ("a green triangle and a yellow
circle", seed 4, 20 steps: the triangle goes missing) and its regulated rerun, written at the size a notebook
cell shows them into docs/images/.
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


if __name__ == "__main__":
    main()

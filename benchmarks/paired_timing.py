"""What the with/without benchmarks share: the models, the common options, interleaved timing, the JSON.

Used by regulation_overhead.py, tgate_speed.py, spatial_overhead.py and spatial_optimisation.py
(``from paired_timing import ...`` from a script in this folder). Each script times the same generation twice per pair — plain, then with one hook
client — and reports the medians' ratio measured in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import attnscope as ats
from attnscope.testing import sd15_structure_pipeline

PROMPT = "a red circle and a blue square"
#: name -> label, builder, default image side (px) and timed pairs
MODELS = {
    "shapes": {"label": "embedded shapes model (7 sites)", "build": lambda: ats.load_pipeline("shapes"),
               "resolution": 32, "repeats": 5},
    "sd15": {"label": "SD-1.5 UNet structure, 860M random weights (16 sites)", "build": sd15_structure_pipeline,
             "resolution": 256, "repeats": 2},
}


def parser(doc: str, steps: str) -> argparse.ArgumentParser:
    """The options every paired benchmark takes; ``doc`` is the script's docstring (its first paragraph is
    the description, the rest, with the example command lines, the epilog of ``--help``); ``steps`` is the
    --steps help text."""
    description, _, epilog = doc.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shapes,sd15", help="comma-separated from: " + ", ".join(MODELS)
                   + " (default: shapes,sd15; shapes alone is the quick one)")
    p.add_argument("--steps", type=int, help=steps)
    p.add_argument("--repeats", type=int, help="timed pairs (default: shapes 5, sd15 2)")
    p.add_argument("--resolution", type=int, help="image side in px (default: shapes 32, sd15 256)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu or cuda (cuda: float16, synchronised timers)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", type=int, default=1, help="prompts per call (default 1; more: the first N prompts of "
                                                       "the 'two' evaluation set, one seed each)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``p.parse_args(argv)``, with --models checked against MODELS and --device cuda against the machine
    (one ``error:`` line instead of a traceback from inside torch)."""
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / machine")
    for flag in ("steps", "repeats", "resolution", "batch", "threads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            p.error(f"--{flag}: must be at least 1, got {value}")
    return args


def pipeline(name: str, device: str):
    """The model's pipeline on ``device`` (float16 off the CPU), progress bar off."""
    pipe = MODELS[name]["build"]()
    if device != "cpu":
        pipe = pipe.to(device, torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation(pipe, client, *, steps: int, side: int, batch: int = 1) -> Callable[[bool], None]:
    """``run(with_client)``: the same generation (prompts, seeds 0…, steps, size), with or without ``client``
    (handed the call first, as the runners do)."""
    from attnscope.hooks import prepare_clients
    from attnscope.models import eval_prompts

    prompts = [PROMPT] if batch == 1 else eval_prompts("two", n=batch, seed=0)

    def run(with_client: bool) -> None:
        call = dict(prompt=prompts, num_inference_steps=steps, height=side, width=side,
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
        if with_client:
            prepare_clients([client], pipe, call)  # timed too: Attend-and-Excite moves the start noise there
            with ats.hooks(pipe, client):
                pipe(**call)
        else:
            pipe(**call)
    return run


def timed(run: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of ``run()``, with the GPU synchronised before each clock read on CUDA."""
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(run: Callable[[bool], None], repeats: int, device: str = "cpu") -> dict:
    """One untimed warm-up of each, then ``repeats`` pairs (plain, with the client); medians and their ratio."""
    run(False), run(True)
    plain, treated = [], []
    for _ in range(repeats):
        plain.append(timed(lambda: run(False), device))
        treated.append(timed(lambda: run(True), device))
    return {"plain_s": plain, "with_s": treated, "plain_median_s": statistics.median(plain),
            "with_median_s": statistics.median(treated),
            "ratio": statistics.median(treated) / statistics.median(plain)}


def run_models(args: argparse.Namespace, measure: Callable[[str, argparse.Namespace], dict]) -> list[dict]:
    """``measure`` each model named in ``--models``; write ``--json`` if given."""
    torch.set_num_threads(args.threads)
    results = [measure(name.strip(), args) for name in args.models.split(",") if name.strip()]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": platform.machine(), "threads": args.threads, "results": results},
                                        indent=1))
    return results

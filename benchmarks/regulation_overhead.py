"""Wall-time cost of Attention Regulation: the same generation with and without it, in one process.

For each model: build the pipeline, one untimed warm-up of each kind, then ``--repeats`` interleaved
pairs (plain, regulated) of the same generation (prompt, seed, steps, size); medians and their ratio.
Regulation runs with its defaults: the deepest down/up level whose maps are >= 8 px, the first half
of the steps, 20 descent iterations per site and step. The target is a ratio <= 1.25; the paper
reports +48.8 % for the official implementation.

    python benchmarks/regulation_overhead.py                   # shapes + sd15-structure, CPU
    python benchmarks/regulation_overhead.py --models shapes --json benchmarks/results/reg.json
    python benchmarks/regulation_overhead.py --models sd15 --device cuda --resolution 512
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import attnscope as ats
from attnscope.testing import sd15_structure_pipeline

TARGET = 1.25
SETUPS = {
    "shapes": {"label": "embedded shapes model (7 sites, 8x8 regulated)", "build": lambda: ats.load_pipeline("shapes"),
               "prompt": "a red circle and a blue square", "targets": ["red circle", "blue square"],
               "resolution": 32, "steps": 20, "repeats": 5},
    "sd15": {"label": "SD-1.5 UNet structure, 860M random weights (16 sites)", "build": sd15_structure_pipeline,
             "prompt": "a red circle and a blue square", "targets": ["circle", "square"],
             "resolution": 256, "steps": 10, "repeats": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shapes,sd15", help="comma-separated from: " + ", ".join(SETUPS))
    p.add_argument("--steps", type=int, help="denoising steps (default: shapes 20, sd15 10)")
    p.add_argument("--repeats", type=int, help="timed pairs (default: shapes 5, sd15 2)")
    p.add_argument("--resolution", type=int, help="image side in px (default: shapes 32, sd15 256)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: float16, synchronised timers)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    return p.parse_args(argv)


def measure(name: str, args: argparse.Namespace) -> dict:
    setup = SETUPS[name]
    pipe = setup["build"]()
    if args.device != "cpu":
        pipe = pipe.to(args.device, torch.float16)
    pipe.set_progress_bar_config(disable=True)
    steps, side = args.steps or setup["steps"], args.resolution or setup["resolution"]
    regulation = ats.regulate.AttentionRegulation(setup["targets"])

    def generate(regulated: bool) -> float:
        kwargs = dict(num_inference_steps=steps, height=side, width=side, generator=torch.Generator().manual_seed(0))
        if args.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if regulated:
            with ats.hooks(pipe, regulation):
                pipe(setup["prompt"], **kwargs)
        else:
            pipe(setup["prompt"], **kwargs)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(False), generate(True)  # warm-up
    plain, regulated = [], []
    for _ in range(args.repeats or setup["repeats"]):
        plain.append(generate(False))
        regulated.append(generate(True))
    calls = len(regulation.history)
    result = {"model": name, "label": setup["label"], "steps": steps, "resolution": side, "device": args.device,
              "plain_s": plain, "regulated_s": regulated, "regulated_calls": calls,
              "ratio": statistics.median(regulated) / statistics.median(plain)}
    print(f"{setup['label']}, {side} px, {steps} steps, {args.device}: plain {statistics.median(plain):.3f} s, "
          f"regulated {statistics.median(regulated):.3f} s ({calls} site x step optimisations) -> ratio "
          f"{result['ratio']:.3f} (target <= {TARGET}: {'met' if result['ratio'] <= TARGET else 'NOT met'})")
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(name.strip(), args) for name in args.models.split(",") if name.strip()]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": platform.machine(), "threads": args.threads, "results": results},
                                        indent=1))
    return results


if __name__ == "__main__":
    main()

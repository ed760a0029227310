"""Wall time of TGATE: the same generation with ``ats.regulate.TGate(gate)`` and without, in one process.

For each model: build the pipeline, one untimed warm-up of each kind, then ``--repeats`` interleaved
pairs (plain, gated) of the same generation (prompt, seed, steps, size); medians and the time saved,
``1 − gated / plain``. Default: 25 steps, gate 10 (TGATE's SD-1.5 setting). The target is ≥ 40 %
less time; the paper reports −38.7 % on SD-1.5 (7.03 s → 4.31 s on a 1080 Ti).

    python benchmarks/tgate_speed.py                         # shapes + sd15-structure, CPU
    python benchmarks/tgate_speed.py --models shapes --json benchmarks/results/tgate.json
    python benchmarks/tgate_speed.py --models sd15 --device cuda --resolution 512
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from paired_timing import interleaved

import attnscope as ats
from attnscope.testing import sd15_structure_pipeline

TARGET = 0.40
SETUPS = {
    "shapes": {"label": "embedded shapes model (7 sites)", "build": lambda: ats.load_pipeline("shapes"),
               "resolution": 32, "repeats": 5},
    "sd15": {"label": "SD-1.5 UNet structure, 860M random weights (16 sites)", "build": sd15_structure_pipeline,
             "resolution": 256, "repeats": 2},
}
PROMPT = "a red circle and a blue square"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shapes,sd15", help="comma-separated from: " + ", ".join(SETUPS))
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--gate", type=int, default=10, help="TGate gate step (default 10)")
    p.add_argument("--sp-interval", type=int, help="also cache self-attention (TGATE V2) at this interval")
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
    side = args.resolution or setup["resolution"]
    gate = ats.regulate.TGate(args.gate, sp_interval=args.sp_interval)

    def generate(gated: bool) -> None:
        kwargs = dict(num_inference_steps=args.steps, height=side, width=side, generator=torch.Generator().manual_seed(0))
        if gated:
            with ats.hooks(pipe, gate):
                pipe(PROMPT, **kwargs)
        else:
            pipe(PROMPT, **kwargs)

    timing = interleaved(lambda: generate(False), lambda: generate(True), args.repeats or setup["repeats"], args.device)
    saved = 1 - timing["ratio"]
    result = {"model": name, "label": setup["label"], "steps": args.steps, "gate": args.gate,
              "sp_interval": args.sp_interval, "resolution": side, "device": args.device, **timing, "saved": saved}
    print(f"{setup['label']}, {side} px, {args.steps} steps, gate {args.gate}, {args.device}: plain "
          f"{timing['baseline_median_s']:.3f} s, TGate {timing['variant_median_s']:.3f} s -> {saved:.1%} less time "
          f"(target >= {TARGET:.0%}: {'met' if saved >= TARGET else 'NOT met'})")
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

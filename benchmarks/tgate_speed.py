"""Wall time of TGATE: the same generation with ``ats.regulate.TGate(gate)`` and without, in one process.

For each model: one untimed warm-up of each kind, then ``--repeats`` interleaved pairs (plain,
gated) of the same generation (prompt, seed, steps, size); medians and the time saved,
``1 − gated / plain``. Default: 25 steps, gate 10 (TGATE's SD-1.5 setting). The target is ≥ 40 %
less time; the paper reports −38.7 % on SD-1.5 (7.03 s → 4.31 s on a 1080 Ti).

    python benchmarks/tgate_speed.py                         # shapes + sd15-structure, CPU
    python benchmarks/tgate_speed.py --models shapes --sp-interval 3     # TGATE V2
    python benchmarks/tgate_speed.py --models shapes --steps 5 --gate 2 --repeats 1   # a quick look (seconds)
    python benchmarks/tgate_speed.py --models sd15 --device cuda --resolution 512
"""

from __future__ import annotations

from paired_timing import MODELS, generation, interleaved, parse_args, parser, pipeline, run_models

import attnscope as ats

TARGET = 0.40


def measure(name: str, args) -> dict:
    model = MODELS[name]
    side, steps = args.resolution or model["resolution"], args.steps or 25
    gate = ats.regulate.TGate(args.gate, sp_interval=args.sp_interval)
    run = generation(pipeline(name, args.device), gate, steps=steps, side=side, batch=args.batch)
    timing = interleaved(run, args.repeats or model["repeats"], args.device)
    saved = 1 - timing["ratio"]
    version = f"V2, sp_interval {args.sp_interval}" if args.sp_interval else "V1"
    print(f"{model['label']}, {side} px, {steps} steps, gate {args.gate} ({version}), {args.device}: plain "
          f"{timing['plain_median_s']:.3f} s, TGate {timing['with_median_s']:.3f} s -> {saved:.1%} less time "
          f"(target >= {TARGET:.0%}: {'met' if saved >= TARGET else 'NOT met'})")
    return {"model": name, "label": model["label"], "steps": steps, "gate": args.gate, "sp_interval": args.sp_interval,
            "resolution": side, "device": args.device, **timing, "saved": saved}


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__, "denoising steps (default 25)")
    p.add_argument("--gate", type=int, default=10, help="TGate gate step (default 10)")
    p.add_argument("--sp-interval", type=int, help="also cache self-attention (TGATE V2) at this interval")
    args = parse_args(p, argv)
    if args.gate >= (args.steps or 25):  # TGate would never gate: the "saving" would be noise
        p.error(f"--gate {args.gate} must be below --steps ({args.steps or 25}); e.g. --steps 5 --gate 2 for a quick run")
    return run_models(args, measure)


if __name__ == "__main__":
    main()

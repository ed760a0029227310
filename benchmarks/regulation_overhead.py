"""Wall-time cost of Attention Regulation (or Attend-and-Excite): the same generation with and without it, in one process.

For each model: one untimed warm-up of each kind, then ``--repeats`` interleaved pairs (plain,
regulated) of the same generation (prompt, seed, steps, size); medians and their ratio.
Regulation runs with its defaults on each prompt's object nouns (as ``attnscope eval`` does): the
deepest down/up level whose maps are >= 8 px, the first half of the steps, 20 descent iterations
per site and step. The target is a ratio <= 1.25; the paper
reports +48.8 % for the official implementation.

    python benchmarks/regulation_overhead.py                   # shapes + sd15-structure, CPU
    python benchmarks/regulation_overhead.py --models shapes --json benchmarks/results/reg.json
    python benchmarks/regulation_overhead.py --models shapes --batch 16        # 16 prompts per call
    python benchmarks/regulation_overhead.py --models shapes --steps 4 --repeats 1   # a quick look (seconds)
    python benchmarks/regulation_overhead.py --models sd15 --device cuda --resolution 512
    python benchmarks/regulation_overhead.py --models shapes --method attend-excite   # the latent-moving baseline

``--method attend-excite`` times ``AttendAndExcite`` with its official settings on the same nouns
(its start-noise step in ``prepare`` is timed too); the paper of seed 000 reports +414.6 % for it.
"""

from __future__ import annotations

from paired_timing import MODELS, generation, interleaved, parse_args, parser, pipeline, run_models

from attnscope.models import named_interventions

TARGET = 1.25
#: default steps per model
STEPS = {"shapes": 20, "sd15": 10}


def measure(name: str, args) -> dict:
    model = MODELS[name]
    side, steps = args.resolution or model["resolution"], args.steps or STEPS[name]
    client = named_interventions([args.method])[0]  # what `attnscope eval --intervention METHOD` installs
    run = generation(pipeline(name, args.device), client, steps=steps, side=side, batch=args.batch)
    timing = interleaved(run, args.repeats or model["repeats"], args.device)
    calls = len(client.history)
    what = "site x step optimisations" if args.method == "regulation" else "steps whose latent was moved"
    print(f"{model['label']}, {side} px, {steps} steps, batch {args.batch}, {args.device}, {args.method}: plain "
          f"{timing['plain_median_s']:.3f} s, with it {timing['with_median_s']:.3f} s ({calls} {what}) -> ratio "
          f"{timing['ratio']:.3f}" + (f" (target <= {TARGET}: {'met' if timing['ratio'] <= TARGET else 'NOT met'})"
                                      if args.method == "regulation" else " (a baseline: no target)"))
    return {"model": name, "label": model["label"], "method": args.method, "steps": steps, "resolution": side,
            "batch": args.batch, "device": args.device,
            **timing, "regulated_calls": calls}


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__, "denoising steps (default: shapes 20, sd15 10)")
    p.add_argument("--method", choices=("regulation", "attend-excite"), default="regulation",
                   help="what to time against the plain run (default: regulation)")
    return run_models(parse_args(p, argv), measure)


if __name__ == "__main__":
    main()

"""Wall-time cost of SpatialTemporal with fixed weights: the same generation with and without it, in one process.

For each model: one untimed warm-up of each kind, then ``--repeats`` interleaved pairs (plain, with
SpatialTemporal) of the same generation; medians and their ratio. The layout is each prompt's
default (``layout_from_prompt``: two objects side by side for "a red circle and a blue square"), λ = 1.
Per site and step the rule adds one attention of the conditional queries over each object's local
prompt (77 keys), its ``to_out``, and the masked sum.

    python benchmarks/spatial_overhead.py --models shapes
    python benchmarks/spatial_overhead.py --models shapes --steps 4 --repeats 1   # a quick look (seconds)
    python benchmarks/spatial_overhead.py --models sd15 --device cuda --resolution 512
"""

from __future__ import annotations

from paired_timing import MODELS, generation, interleaved, parse_args, parser, pipeline, run_models

import attnscope as ats

#: default steps per model
STEPS = {"shapes": 20, "sd15": 10}


def measure(name: str, args) -> dict:
    model = MODELS[name]
    side, steps = args.resolution or model["resolution"], args.steps or STEPS[name]
    run = generation(pipeline(name, args.device), ats.regulate.SpatialTemporal(), steps=steps, side=side,
                     batch=args.batch)
    timing = interleaved(run, args.repeats or model["repeats"], args.device)
    print(f"{model['label']}, {side} px, {steps} steps, batch {args.batch}, {args.device}: plain "
          f"{timing['plain_median_s']:.3f} s, with SpatialTemporal {timing['with_median_s']:.3f} s -> ratio "
          f"{timing['ratio']:.3f}")
    return {"model": name, "label": model["label"], "steps": steps, "resolution": side, "batch": args.batch,
            "device": args.device, **timing}


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__, "denoising steps (default: shapes 20, sd15 10)")
    return run_models(parse_args(p, argv), measure)


if __name__ == "__main__":
    main()

"""Where in the forward pass Attention Regulation helps: the shapes model's sites by depth band.

A diffusion transformer (PixArt, Sana) is a flat stack of identical layers, so the official rule
for choosing sites (the deepest UNet level with maps of 16 px at 512 px) has no meaning there, and
no transformer with trained weights can be evaluated on these machines. The one model that can be
evaluated is the embedded shapes UNet. This script asks it the question the flat-stack default
answers: regulating the **early**, **middle** or **late** third of the sites in forward-pass order
(``attnscope.hooks.families.depth_band`` of each site's ``depth``, the same rule that names
a flat stack's thirds), against the UNet's own default and all sites. For each choice it runs
``attnscope eval``'s two-object set (targets: the object nouns) and prints the rates of "all
objects present" and "exactly the objects asked", with 95 % bootstrap intervals and the paired
difference to the plain run.

    python benchmarks/regulation_depth.py --n 400 --seed 5001     # a tuning set
    python benchmarks/regulation_depth.py --n 400 --seed 9001     # a report set, drawn separately
    python benchmarks/regulation_depth.py --n 8                   # a quick look (plumbing, not the figure)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnscope as ats
from attnscope.hooks.families import depth_band
from attnscope.models import evaluate, object_nouns, paired_differences


def choices(pipe) -> dict[str, list[str] | None]:
    sites = ats.discover_sites(pipe)
    bands = {band: [s.name for s in sites if depth_band(s.depth, len(sites)) == band]
             for band in ("early", "middle", "late")}
    return {**bands, "default": None, "all": [s.name for s in sites]}


def main(argv: list[str] | None = None) -> int:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="two-object prompts (default 400)")
    p.add_argument("--seed", type=int, default=5001, help="prompt set and seeds (prompt i: seed SEED+i)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    plain = evaluate(pipe, "two", n=args.n, seed=args.seed, progress=False)
    rows = {"plain": (plain, None, None)}
    for label, names in choices(pipe).items():
        t0 = time.perf_counter()
        reg = evaluate(pipe, "two", n=args.n, seed=args.seed, progress=False,
                       interventions=[ats.regulate.AttentionRegulation(object_nouns, sites=names)])
        rows[label] = (reg, paired_differences(plain, reg, seed=args.seed), names)
        print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nshapes model, two-object prompts, n={args.n}, seed {args.seed}; sites in forward order:")
    for label, (_, _, names) in rows.items():
        if names:
            print(f"  {label:<8} {', '.join(names)}")
    print(f"\n{'sites':<8} {'all present':>22} {'paired diff':>22} {'exact':>22} {'paired diff':>22}")
    result = {}
    for label, (res, diff, names) in rows.items():
        cells = []
        for metric in ("all_present", "exact"):
            m = res["metrics"][metric]
            cells.append(f"{100 * m['rate']:.1f} [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]")
            d = diff["metrics"][metric] if diff else None
            cells.append("" if d is None else
                         f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]")
        print(f"{label:<8} " + " ".join(f"{c:>22}" for c in cells))
        result[label] = {"sites": names, "metrics": res["metrics"], "paired": diff}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "results": result}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does each object land in its box? Two-object prompts with user layouts on the shapes model.

For ``attnscope eval``'s two-object prompts ("a red circle and a blue square"), the first object gets
the left box (0.0, 0.1, 0.5, 0.9) and the second the right one (0.5, 0.1, 1.0, 0.9). Each image is
generated plainly and with ``SpatialTemporal`` (λ = 1) on the same seeds; the detector finds the
objects; an object is "in its box" when it is found and its centre lies in its box. Prints the rate
of objects in their box and of prompts with both in their boxes, with 95 % bootstrap intervals
and the paired difference.

    python benchmarks/spatial_boxes.py --n 300 --seed 9001
    python benchmarks/spatial_boxes.py --n 4      # a quick look (plumbing, not the figure)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import attnscope as ats
from attnscope.models import eval_prompts
from attnscope.models.shapes import detect, parse_prompt

BOXES = ((0.0, 0.1, 0.5, 0.9), (0.5, 0.1, 1.0, 0.9))


def in_boxes(image: np.ndarray, prompt: str) -> list[bool]:
    objects, _ = parse_prompt(prompt)
    found = {(o.colour, o.shape): o.centre for o in detect(image)}
    h, w = image.shape[:2]
    out = []
    for obj, (x0, y0, x1, y1) in zip(objects, BOXES):
        c = found.get(tuple(obj))
        out.append(c is not None and x0 * w <= c[0] <= x1 * w and y0 * h <= c[1] <= y1 * h)
    return out


def generate(pipe, prompts: list[str], seed: int, control: bool, batch: int = 16) -> list[np.ndarray]:
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        if control:
            for prompt, gen in zip(chunk, gens):  # one layout per prompt: its own two phrases in the two boxes
                layout = dict(zip(prompt.split(" and "), BOXES))
                with ats.hooks(pipe, ats.regulate.SpatialTemporal(layout)):
                    images.append(pipe(prompt, generator=gen, output_type="np").images[0])
        else:
            images += list(pipe(chunk, generator=gens, output_type="np").images)
    return [(im * 255).round().astype(np.uint8) for im in images]


def main(argv: list[str] | None = None) -> int:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="two-object prompts (default 300)")
    p.add_argument("--seed", type=int, default=9001, help="prompt set and seeds (prompt i: seed SEED+i; default 9001)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts("two", n=args.n, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    rows = {}
    for label, control in (("plain", False), ("SpatialTemporal", True)):
        rows[label] = np.array([in_boxes(im, pr) for im, pr in zip(generate(pipe, prompts, args.seed, control), prompts)])
    resample = rng.integers(0, args.n, size=(2000, args.n))
    print(f"two-object prompts, n={args.n}, seed {args.seed}; boxes: first object left half, second right half")
    for label, r in rows.items():
        obj, both = r.mean(1), r.all(1).astype(float)
        print(f"{label:<16} objects in their box {100 * r.mean():.1f} % [{100 * np.percentile(obj[resample].mean(1), 2.5):.1f}, "
              f"{100 * np.percentile(obj[resample].mean(1), 97.5):.1f}]   both in their boxes {100 * both.mean():.1f} % "
              f"[{100 * np.percentile(both[resample].mean(1), 2.5):.1f}, {100 * np.percentile(both[resample].mean(1), 97.5):.1f}]")
    diff = rows["SpatialTemporal"].all(1).astype(float) - rows["plain"].all(1).astype(float)
    lo, hi = np.percentile(diff[resample].mean(1), [2.5, 97.5])
    print(f"paired difference, both in their boxes: {100 * diff.mean():+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What ``capture(..., keep_bits=k)`` saves and costs: the sites' bytes and the change of the statistics.

Each prompt × seed is captured losslessly and with each ``keep_bits`` on the shapes model (one thread, so the
runs are the same), and the lossy maps are compared with the lossless ones: the sites' bytes on disk (apparent
size), the largest relative error of a normal float16 value (the bound is 2**-(k + 1)), and the largest change
of ``ats.stats.dominance``'s mass shares, entropy, Gini and sink share. Results: docs/store-format.md.

    python benchmarks/lossy_maps.py                     # 32 and 128 px, keep_bits 7 5 4 3
    python benchmarks/lossy_maps.py --sizes 32 --bits 3  # a quick look
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

PROMPTS = ["a red circle and a blue square", "a green triangle and a yellow circle", "a blue square",
           "a yellow triangle to the left of a red square"]
STATS = ("mass_share", "entropy", "gini", "sink_share")


def site_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "sites").rglob("*") if f.is_file())


def main() -> None:
    description, _, epilog = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="image sizes in px (default 32 128)")
    parser.add_argument("--bits", type=int, nargs="+", default=[7, 5, 4, 3], help="keep_bits values (default 7 5 4 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12], help="seeds (default 11 12)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import attnscope as ats

    pipe = ats.load_pipeline("shapes")
    out = Path(tempfile.mkdtemp())
    for size in args.sizes:
        traces = {}
        for bits in [None, *args.bits]:
            total, rel, change = 0, 0.0, dict.fromkeys(STATS, 0.0)
            for i, prompt in enumerate(PROMPTS):
                for seed in args.seeds:
                    path = out / f"{size}-{bits}-{i}-{seed}.zarr"
                    tr = ats.capture(pipe, prompt, seed=seed, store=path, num_inference_steps=args.steps, height=size,
                                     width=size, keep_bits=bits)
                    traces[bits, i, seed] = tr
                    total += site_bytes(path)
                    if bits is None:
                        continue
                    ref = traces[None, i, seed]
                    for site in tr.sites:
                        a = ref.attention(site).values.astype(np.float64)
                        b = tr.attention(site).values.astype(np.float64)
                        normal = np.abs(a) >= 2.0**-14
                        rel = max(rel, float(np.abs(b[normal] / a[normal] - 1).max()))
                    targets = [w for w in ("circle", "square", "triangle") if w in prompt]
                    d, d0 = ats.stats.dominance(tr, targets=targets), ats.stats.dominance(ref, targets=targets)
                    for name in STATS:
                        change[name] = max(change[name], float(np.nanmax(np.abs(d[name].values - d0[name].values))))
            if bits is None:
                lossless = total
                print(f"{size} px lossless: sites {total / 1e6:.1f} MB")
                continue
            print(f"{size} px keep_bits={bits}: sites {total / lossless:.3f} of lossless, largest relative error "
                  f"{rel:.4f} (bound {2.0 ** -(bits + 1):.4f}), largest change "
                  + ", ".join(f"{name} {value:.1e}" for name, value in change.items()), flush=True)


if __name__ == "__main__":
    main()

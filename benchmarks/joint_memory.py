"""Peak memory of capturing joint attention (SD3, Flux) against the plain run, and the size of the square.

A joint site's maps are the image-query × text-key block of a softmax over image *and* text keys.
attnscope computes that block from the attention kernel's log-sum-exp and never builds the
``(N+T)²`` score matrix. This script measures what capture adds to the peak resident memory of one
generation, next to the size of the text block and of the full square, for one model at a time.

Each measurement runs in a fresh subprocess (so the allocator's cache of an earlier run does not
hide a peak): build the pipeline, run one untimed 1-step warm-up, then sample the process's RSS
every 2 ms during the measured call; the figure is the peak RSS during the call minus the RSS just
before it.

    python benchmarks/joint_memory.py                      # flux and sd3 structures at 256 px, CPU
    python benchmarks/joint_memory.py --models flux --resolution 128
    python benchmarks/joint_memory.py --resolution 64      # a quick look (plumbing, not the figure)

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODELS = ("flux", "sd3")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(model: str, mode: str, px: int, steps: int, threads: int) -> dict:
    """In this process: the peak extra RSS of one ``mode`` ("plain" or "capture") generation."""
    import torch

    import attnscope as ats
    from attnscope.testing import flux_structure_pipeline, sd3_structure_pipeline

    torch.set_num_threads(threads)
    pipe = flux_structure_pipeline() if model == "flux" else sd3_structure_pipeline()
    kw = dict(height=px, width=px, guidance_scale=7.0) if model == "sd3" else dict(height=px, width=px)
    store = Path(tempfile.mkdtemp(prefix="attnscope-mem-"))

    def run(steps: int, name: str) -> None:
        if mode == "plain":
            pipe("a red cat and a blue dog", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kw)
        else:
            ats.capture(pipe, "a red cat and a blue dog", seed=0, store=store / name, num_inference_steps=steps, **kw)

    run(1, "warm.zarr")
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    before = _rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    run(steps, "run.zarr")
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    site = ats.discover_sites(pipe)[0]
    factor = pipe.vae_scale_factor * site.patch
    n = (px // factor) ** 2
    t = 512 if model == "flux" else 77 + 256
    batch = 2 if model == "sd3" else 1
    return {"model": model, "mode": mode, "resolution": px, "steps": steps, "seconds": seconds,
            "peak_extra_bytes": peak[0] - before, "image_tokens": n, "text_tokens": t, "heads": site.heads,
            "batch_rows": batch, "text_block_bytes": batch * site.heads * n * t * 4,
            "square_bytes": batch * site.heads * (n + t) ** 2 * 4}


def main(argv: list[str] | None = None) -> None:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux,sd3", help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--resolution", type=int, default=256, help="image side in px (default 256: 4096 image tokens)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps of the measured call (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child (default 2)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.resolution, args.steps, args.threads)))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models: choose from {', '.join(MODELS)}")
    results = []
    for model in models:
        row = {}
        for mode in ("plain", "capture"):
            out = subprocess.run([sys.executable, __file__, "--child", model, mode, "--resolution", str(args.resolution),
                                  "--steps", str(args.steps), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout
            row[mode] = json.loads(out.strip().splitlines()[-1])
        plain, cap = row["plain"], row["capture"]
        mib = 1 << 20
        print(f"{model}: {args.resolution} px, {cap['image_tokens']} image + {cap['text_tokens']} text tokens, "
              f"{cap['heads']} heads, {cap['batch_rows']} batch rows, {args.steps} step(s)")
        print(f"  peak extra RSS during the call: plain {plain['peak_extra_bytes'] / mib:.0f} MiB, "
              f"capture {cap['peak_extra_bytes'] / mib:.0f} MiB "
              f"(capture adds {(cap['peak_extra_bytes'] - plain['peak_extra_bytes']) / mib:.0f} MiB)")
        print(f"  one site's text block (float32): {cap['text_block_bytes'] / mib:.0f} MiB; "
              f"the full (N+T)^2 square: {cap['square_bytes'] / mib:.0f} MiB")
        print(f"  time: plain {plain['seconds']:.1f} s, capture {cap['seconds']:.1f} s")
        results.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Throughput of ``ats.stats.dominance`` against just reading and decompressing the same trace.

Writes a synthetic trace of SD-1.5 shape (16 cross-attention sites at 64², 32², 16² and 8² for a
512 px image, 77 CLIP tokens, heads averaged, float16, the store's default codec) through
attnscope's own ``TraceWriter`` — ≥ 2 GB on disk by default — then times, interleaved in one process:

* **read**: every chunk of every site read and decompressed through the same dask path the
  statistics use (one task per stored chunk), with a function that does nothing with the data;
* **stats**: ``ats.stats.dominance(trace, targets=[...])`` — every statistic of docs/analysis.md.

One untimed pass of each over the smallest site comes first (imports, dask's first graph).

Prints both rates (stored and raw MB/s), their ratio (target ≥ 0.80) and, with ``--json``, writes them.
The store is written once per run into ``--dir`` (default: a temporary directory, deleted after).
Both passes read from the page cache when the machine has the memory for it (this one has 24 GB):
the comparison is of the CPU work, decompression vs decompression + statistics.

    python benchmarks/analysis_throughput.py                     # ~2.9 GB store, 3 rounds
    python benchmarks/analysis_throughput.py --samples 2 --steps 10 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import attnscope as ats
from attnscope.store import SITE_DIMS, SiteLayout, StoreLayout, TraceWriter

TARGET = 0.80
#: SD-1.5 cross-attention sites at 512 px: (name, map side)
SITES = ([(f"down_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2", 64 >> b) for b in range(3) for i in range(2)]
         + [("mid_block.attentions.0.transformer_blocks.0.attn2", 8)]
         + [(f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2", 8 << b) for b in range(1, 4) for i in range(3)])
PROMPT = "a photo of a red cat and a blue dog"
TOKENS = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "cat</w>", "and</w>", "a</w>",
          "blue</w>", "dog</w>"] + ["<|endoftext|>"] * 66


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="denoising steps in the trace (default 50)")
    p.add_argument("--samples", type=int, default=16, help="images in the trace (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved read/stats rounds (default 3)")
    p.add_argument("--dir", type=Path, help="where to write the store (kept); default a temporary directory")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--no-checksum", action="store_true",
                   help="write the store without the chunks' crc32c (the format before it existed), to measure its cost")
    return p.parse_args(argv)


def synthetic_maps(side: int, rng: np.random.Generator, variants: int = 8) -> np.ndarray:
    """Softmax maps with smooth spatial structure and a few strong tokens: (variants, 1, side, side, 77)."""
    coarse = rng.normal(size=(variants, 1, max(side // 8, 1), max(side // 8, 1), 77)) * 1.5
    logits = coarse.repeat(side // coarse.shape[2], 2).repeat(side // coarse.shape[3], 3)
    logits = logits + rng.normal(size=logits.shape) * 0.3
    logits[..., 0] += 4.0  # the SOT sink
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float16)


def write_trace(path: Path, steps: int, samples: int, checksum: bool = True) -> None:
    rng = np.random.default_rng(0)
    pools = {side: synthetic_maps(side, rng) for side in {s for _, s in SITES}}
    layout = StoreLayout(
        num_steps=steps, samples=samples, prompt_of_sample=tuple(range(samples)), image_of_sample=(0,) * samples,
        token_positions=tuple(range(77)), token_text=[TOKENS] * samples,
        sites=[SiteLayout(name, {}, heads=1, spatial=(side, side), branches=("cond",), steps=tuple(range(steps)))
               for name, side in SITES],
        attrs={"manifest": {"synthetic": True, "run": {"prompts": [PROMPT] * samples}, "capture": {"tokens": "all"}},
               "sites": [name for name, _ in SITES]},
        timesteps=tuple(float(999 - i * (1000 // steps)) for i in range(steps)),
    )
    writer = TraceWriter(path, checksum=checksum)
    writer.init(layout)
    for step in range(steps):
        for k, (name, side) in enumerate(SITES):
            pool = pools[side]
            pick = (step * 7 + np.arange(samples) * 3 + k) % len(pool)
            writer.put(name, "cond", step, pool[pick])
    writer.close(complete=True)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_only(trace, sites=None) -> None:
    """Read and decompress every chunk through the same dask path as the statistics (one task per
    stored chunk, whole maps per task), doing nothing with the data."""
    import dask

    def touch(chunk: np.ndarray) -> np.ndarray:
        return np.zeros(chunk.shape[:2] + (1,))

    lazy = [trace.attention(s).transpose(*SITE_DIMS).data.map_blocks(
        touch, drop_axis=[2, 3, 4, 5], new_axis=[2], chunks=(*trace.attention(s).data.chunks[:2], (1,)), dtype=float)
        for s in (trace.sites if sites is None else sites)]
    dask.compute(*lazy)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="attnscope-analysis-"))
    path = root / "synthetic.zarr"
    try:
        if path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        write_trace(path, args.steps, args.samples, checksum=not args.no_checksum)
        stored = disk_bytes(path)
        raw = sum(args.steps * args.samples * side * side * 77 * 2 for _, side in SITES)
        print(f"trace: {path}  {stored / 1e9:.2f} GB on disk ({raw / 1e9:.2f} GB raw float16), "
              f"{len(SITES)} sites, {args.steps} steps x {args.samples} samples; written in {time.perf_counter() - t0:.0f} s")
        trace = ats.open_trace(path)
        # one untimed pass of each over the smallest site: lazy imports, dask's first graph and the codecs'
        # first call would otherwise land in the first timed read (~1.5 s here, all of a --rounds 1 quick look)
        warm = [min(SITES, key=lambda s: s[1])[0]]
        read_only(trace, warm)
        ats.stats.dominance(trace, targets=["cat", "dog"], sites=warm)
        times: dict[str, list[float]] = {"read": [], "stats": []}
        for _ in range(args.rounds):
            for kind in ("read", "stats"):
                t = time.perf_counter()
                if kind == "read":
                    read_only(trace)
                else:
                    ds = ats.stats.dominance(trace, targets=["cat", "dog"])
                times[kind].append(time.perf_counter() - t)
        read_s, stats_s = statistics.median(times["read"]), statistics.median(times["stats"])
        ratio = read_s / stats_s
        result = {
            "stored_bytes": stored, "raw_bytes": raw, "sites": len(SITES), "steps": args.steps,
            "samples": args.samples, "rounds": args.rounds, "read_s": times["read"], "stats_s": times["stats"],
            "checksum": not args.no_checksum, "read_MBps": stored / read_s / 1e6, "stats_MBps": stored / stats_s / 1e6, "ratio": ratio,
            "target": TARGET, "cpus": os.cpu_count(), "machine": platform.machine(),
            "dominance_ratio_mean": float(ds.dominance_ratio.mean()),
        }
        print(f"read + decompress: {result['read_MBps']:.0f} MB/s stored ({raw / read_s / 1e6:.0f} MB/s raw), "
              f"median {read_s:.2f} s of {args.rounds}")
        print(f"dominance stats  : {result['stats_MBps']:.0f} MB/s stored ({raw / stats_s / 1e6:.0f} MB/s raw), "
              f"median {stats_s:.2f} s of {args.rounds}")
        print(f"ratio stats/read : {ratio:.2f}  (stats rate / read rate = read time / stats time; "
              f"target >= {TARGET:.2f}: {'met' if ratio >= TARGET else 'NOT met'})")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
        return result
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Wall-time overhead of ``attnscope.capture`` over a plain pipeline call.

For each model, in one process: build the pipeline, run one untimed warm-up of the plain call and
one of the capture (the first capture also computes the weights fingerprint, which is cached per
module afterwards), then time ``--repeats`` interleaved pairs ``plain, capture, plain, capture, …``
of the same generation (same prompt, seed, steps, size) and report the medians and their ratio.

Capture settings: every cross-attention site, every step, ``heads="mean"``, ``branch="cond"``,
``tokens="auto"`` (the default: all 77 positions on UNets; on SD3/Flux the prompt's positions, plus
each pixel's text mass), float16 maps, into a fresh temporary store per run (deleted afterwards). The capture time covers the
whole ``attnscope.capture`` call, including the writer thread's flush, consolidation and reopening.

    python benchmarks/capture_overhead.py                         # tiny + sd15-structure, CPU
    python benchmarks/capture_overhead.py --models tiny --json benchmarks/results/tiny.json
    python benchmarks/capture_overhead.py --models tiny --steps 2 --repeats 1     # a quick look (~20 s)
    python benchmarks/capture_overhead.py --models sd15 --device cuda --resolution 512
    python benchmarks/capture_overhead.py --models tiny --profile # where the capture time goes
    python benchmarks/capture_overhead.py --models flux,sd3       # joint attention (transformers), CPU
    python benchmarks/capture_overhead.py --models flux,sd3 --device cuda --resolution 256 [--backend _native_flash]
                                                                  # 4096 image tokens (1024 px); peak GPU memory
    python benchmarks/capture_overhead.py --models pixart,sana    # flat stacks of cross-attention, CPU
    python benchmarks/capture_overhead.py --models flux2          # FLUX.2 klein structure (Qwen3 chat template)

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attnscope
from attnscope.hooks import find_denoiser
from attnscope.store import weights_fingerprint
from attnscope.testing import (
    flux2_structure_pipeline,
    flux_structure_pipeline,
    pixart_structure_pipeline,
    sana_structure_pipeline,
    sd3_structure_pipeline,
    sd15_structure_pipeline,
    tiny_sd_pipeline,
)

PROMPT = "a photo of a red cat and a blue dog"
TOKENS = "auto"  # capture's default: every position on UNets, the prompt's positions on SD3/Flux
SEED = 0
CPU_TARGET = 1.10
GPU_TARGET = 1.03  # SD-1.5 at 512 px
JOINT_GPU_TARGET = 1.05  # Flux/SD3 structure at 4096 image tokens (FLUX.1 / SD3 at 1024 px)
#: on CUDA: the peak memory allocated during the last plain call and the last capture (bytes above the start)
PEAK: dict[str, int] = {}
MODELS = {
    "tiny": {"build": tiny_sd_pipeline, "label": "tiny-sd (random weights)", "resolution": 64, "steps": 20, "repeats": 5},
    "sd15": {"build": sd15_structure_pipeline, "label": "sd15-structure (860M, random weights)", "resolution": 256,
             "steps": 10, "repeats": 3},
    "flux": {"build": flux_structure_pipeline, "resolution": 128, "steps": 4, "repeats": 5,
             "label": "flux-structure (4 double + 8 single blocks, 8x64 heads, random weights; "
                      "1024 image + 512 T5 tokens at 128 px, as FLUX.1 at 512 px)"},
    "sd3": {"build": sd3_structure_pipeline, "resolution": 128, "steps": 4, "repeats": 5,
            "label": "sd3-structure (6 joint blocks, 8x64 heads, random weights; "
                     "1024 image + 77 CLIP + 256 T5 tokens at 128 px, as SD3 at 512 px)"},
    "flux2": {"build": flux2_structure_pipeline, "resolution": 128, "steps": 4, "repeats": 5,
              "call": {"guidance_scale": 1.0},
              "label": "flux2-structure (4 double + 8 single blocks, 8x64 heads, random weights, guidance 1; "
                       "1024 image + 512 chat-template tokens at 128 px, as FLUX.2 klein at 512 px)"},
    "pixart": {"build": pixart_structure_pipeline, "resolution": 128, "steps": 4, "repeats": 5,
               "call": {"use_resolution_binning": False, "clean_caption": False},
               "label": "pixart-structure (4 layers, 16x72 heads, random weights; "
                        "1024 image + 120 T5 tokens at 128 px, as PixArt-alpha at 512 px)"},
    "sana": {"build": sana_structure_pipeline, "resolution": 64, "steps": 4, "repeats": 5,
             "call": {"use_resolution_binning": False},
             "label": "sana-structure (4 layers, width 2240, cross 20x112, random weights; "
                      "1024 image + 300 Gemma tokens at 64 px, as Sana at 1024 px)"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,sd15", help="comma-separated, from: " + ", ".join(MODELS) + " (default: tiny,sd15)")
    p.add_argument("--steps", type=int, help="denoising steps (default: tiny 20, sd15 10, the transformers 4; "
                                             "pixart needs at least 2)")
    p.add_argument("--repeats", type=int, help="timed runs of each kind (default: tiny 5, sd15 3, the transformers 5)")
    p.add_argument("--resolution", type=int, help="image height = width in px (default: tiny 64, sd15 256, "
                                                  "flux/sd3/flux2/pixart 128, sana 64)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: float16 pipeline on the GPU")
    p.add_argument("--backend", help="diffusers attention backend of the denoiser (set_attention_backend), e.g. "
                                     "_native_flash or flash; transformers whose processors take one (Flux, Flux.2; "
                                     "SD3's, PixArt's and Sana's call torch's SDPA themselves and keep it; the JSON's "
                                     "'backend' says which ran) (default: the model's own)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="after timing, run one extra capture per model under cProfile and print the top functions")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / machine")
    for flag in ("steps", "repeats", "resolution", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag}: must be at least 1, got {value}")
    if args.steps == 1 and "pixart" in args.models:
        # diffusers' PixArt pipeline takes a 1-step call for a DMD one (scheduler.step(...)[1]): IndexError
        p.error("--steps 1: the PixArt pipeline needs at least 2 steps")
    return args


def backend_processors(denoiser) -> int:
    """How many of ``denoiser``'s attention processors run on a diffusers attention backend (have one set)."""
    return sum(getattr(getattr(m, "processor", None), "_attention_backend", None) is not None
               for m in denoiser.modules())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def store_size(path: Path) -> tuple[int, int, int]:
    """(apparent bytes, bytes allocated on disk, number of files) under ``path``."""
    apparent = allocated = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(root, name))
            apparent += st.st_size
            allocated += getattr(st, "st_blocks", 0) * 512
            files += 1
    return apparent, allocated, files


def _start_peak(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _end_peak(device: str, kind: str, start: int) -> None:
    if device == "cuda":
        PEAK[kind] = torch.cuda.max_memory_allocated() - start


def run_plain(pipe, steps: int, px: int, device: str, call: dict | None = None):
    gc.collect()
    sync(device)
    start = _start_peak(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), num_inference_steps=steps, height=px, width=px,
               **(call or {}))
    sync(device)
    _end_peak(device, "plain", start)
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_capture(pipe, steps: int, px: int, device: str, keep: bool = False, profiler: cProfile.Profile | None = None,
                call: dict | None = None):
    """Time one capture into a fresh temporary store; return (wall s, process CPU s, info about the store)."""
    tmp = Path(tempfile.mkdtemp(prefix="attnscope-bench-"))
    store = tmp / "trace.zarr"
    try:
        gc.collect()
        sync(device)
        if profiler is not None:
            profiler.enable()
        start = _start_peak(device)
        t0, c0 = time.perf_counter(), time.process_time()
        trace = attnscope.capture(pipe, PROMPT, seed=SEED, store=store, sites=None, steps=None, heads="mean",
                                  tokens=TOKENS, branch="cond", num_inference_steps=steps, height=px, width=px,
                                  **(call or {}))
        sync(device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        _end_peak(device, "capture", start)
        if profiler is not None:
            profiler.disable()
        spec = trace.manifest["capture"]
        branches = 2 if spec["branch"] == "both" else 1
        apparent, allocated, files = store_size(store)
        info = {
            "complete": trace.complete, "steps_written": trace.steps_written, "sites": len(trace.sites),
            "maps_written": len(spec["sites"]) * len(spec["steps"]) * branches,
            "store_bytes": apparent, "store_disk_bytes": allocated, "store_files": files,
        }
        if keep:
            info["images"] = trace.images
        return seconds, cpu, info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def target_for(model: str, device: str, px: int) -> tuple[float | None, str]:
    if device == "cpu":
        return CPU_TARGET, f"CPU <= {CPU_TARGET:.2f}"
    if model == "sd15":
        note = "" if px == 512 else f" (defined at 512 px, run at {px})"
        return GPU_TARGET, f"GPU SD-1.5 @ 512 px <= {GPU_TARGET:.2f}{note}"
    if model in ("flux", "sd3"):
        note = "" if px == 256 else f" (defined at 256 px, run at {px})"
        return JOINT_GPU_TARGET, f"GPU {model} structure @ 4096 image tokens (256 px) <= {JOINT_GPU_TARGET:.2f}{note}"
    return None, "no GPU target for this model"


def bench_model(name: str, args: argparse.Namespace) -> dict:
    cfg = MODELS[name]
    steps = args.steps or cfg["steps"]
    repeats = args.repeats or cfg["repeats"]
    px = args.resolution or cfg["resolution"]
    print(f"\n== {name}: {cfg['label']}, {px}x{px} px, {steps} steps, {repeats} repeats, device {args.device}"
          + (f", attention backend {args.backend}" if args.backend else ""), flush=True)

    t0 = time.perf_counter()
    pipe = cfg["build"]()
    if args.device == "cuda":
        pipe = pipe.to("cuda", torch.float16)
    backend = None  # the backend the denoiser's attention really runs on (None: its own)
    if args.backend:
        denoiser = find_denoiser(pipe)[1]
        if not hasattr(denoiser, "set_attention_backend"):
            raise SystemExit(f"--backend {args.backend}: {type(denoiser).__name__} has no set_attention_backend")
        denoiser.set_attention_backend(args.backend)
        if backend_processors(denoiser):
            backend = args.backend
        else:  # e.g. SD3's JointAttnProcessor2_0 calls torch's SDPA itself: set_attention_backend skips it, silently
            print(f"   --backend {args.backend}: no attention processor of {type(denoiser).__name__} takes a backend "
                  "(they call torch's scaled_dot_product_attention themselves): measured with its own attention",
                  flush=True)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    sites = attnscope.discover_sites(pipe)
    latent = (px // pipe.vae_scale_factor, px // pipe.vae_scale_factor)
    print(f"   built in {build_s:.1f} s; {len(sites)} cross-attention sites; latent {latent[0]}x{latent[1]}", flush=True)

    call = MODELS[name].get("call", {})  # pipeline arguments a tiny-VAE structure model needs (no resolution binning)
    warm_plain_s, _, plain_out = run_plain(pipe, steps, px, args.device, call)
    warm_capture_s, _, warm_info = run_capture(pipe, steps, px, args.device, keep=True, call=call)
    a, b = np.asarray(plain_out.images[0], dtype=np.int16), np.asarray(warm_info.pop("images")[0], dtype=np.int16)
    image_diff = int(np.abs(a - b).max())
    print(f"   warm-up (untimed): plain {warm_plain_s:.3f} s, capture {warm_capture_s:.3f} s "
          f"(the first capture also computes the weights fingerprint, cached per module for the timed runs); "
          f"image max |plain - capture| = {image_diff} (uint8)", flush=True)
    t0 = time.perf_counter()
    weights_fingerprint(pipe)
    fingerprint_ms = (time.perf_counter() - t0) * 1e3
    print(f"   weights_fingerprint(pipe) after the warm-up: {fingerprint_ms:.1f} ms per call "
          f"(each timed capture pays this; ~0 if the cache hits)", flush=True)

    plain, capture, plain_cpu, capture_cpu, info = [], [], [], [], warm_info
    for i in range(repeats):
        p, pc, _ = run_plain(pipe, steps, px, args.device, call)
        c, cc, info = run_capture(pipe, steps, px, args.device, call=call)
        plain.append(p)
        capture.append(c)
        plain_cpu.append(pc)
        capture_cpu.append(cc)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"   run {i + 1}/{repeats}: plain {p:.3f} s, capture {c:.3f} s ({c / p:.3f}x); "
              f"process CPU {pc:.2f} / {cc:.2f} s; load average {load:.2f}", flush=True)
    assert info["complete"] and info["steps_written"] == steps, info
    if PEAK:
        print(f"   peak GPU memory above the start, last pair: plain {PEAK['plain'] / 2**20:.1f} MiB, capture "
              f"{PEAK['capture'] / 2**20:.1f} MiB (+{(PEAK['capture'] - PEAK['plain']) / 2**20:.1f} MiB)", flush=True)

    med_p, med_c = statistics.median(plain), statistics.median(capture)
    target, target_text = target_for(name, args.device, px)
    ratio = med_c / med_p
    result = {
        "model": name, "label": cfg["label"], "device": args.device, "resolution": px, "latent": list(latent),
        "steps": steps, "repeats": repeats, "sites": len(sites), "build_s": build_s,
        "warmup_plain_s": warm_plain_s, "warmup_capture_s": warm_capture_s, "image_max_abs_diff": image_diff,
        "fingerprint_after_warmup_ms": fingerprint_ms,
        "plain_s": plain, "capture_s": capture, "median_plain_s": med_p, "median_capture_s": med_c,
        "ratio": ratio, "plain_cpu_s": plain_cpu, "capture_cpu_s": capture_cpu,
        "cpu_ratio": statistics.median(capture_cpu) / statistics.median(plain_cpu), "overhead_per_step_ms": (med_c - med_p) / steps * 1e3,
        "target": target, "target_text": target_text, "meets_target": None if target is None else ratio <= target,
        **{k: info[k] for k in ("maps_written", "store_bytes", "store_disk_bytes", "store_files")},
        "backend": backend, "backend_requested": args.backend, **({"peak_plain_bytes": PEAK["plain"], "peak_capture_bytes": PEAK["capture"]}
                                    if PEAK else {}),
    }
    if args.profile:
        result["profile"] = profile_capture(pipe, steps, px, args.device, call=call)
    del pipe
    gc.collect()
    return result


def profile_capture(pipe, steps: int, px: int, device: str, top: int = 25, call: dict | None = None) -> str:
    """One capture under cProfile (main thread only: the writer thread's work is not in it)."""
    prof = cProfile.Profile()
    run_capture(pipe, steps, px, device, profiler=prof, call=call)
    text = []
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key)
        stats.print_stats(top)
        text.append(f"--- top {top} by {title} ---\n" + buf.getvalue().split("\n\n", 1)[-1].strip())
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(r"attnscope[/\\]", top)
    text.append("--- attnscope functions by cumulative time ---\n" + buf.getvalue().split("\n\n", 1)[-1].strip())
    report = "\n\n".join(text)
    print("\n   cProfile of one capture (main thread; the writer thread is not profiled):\n" + report, flush=True)
    return report


def print_table(results: list[dict]) -> None:
    head = ["model", "px", "steps", "reps", "plain med s", "capture med s", "ratio", "target", "ok",
            "+ms/step", "cpu-time ratio", "maps", "store bytes", "files"]
    rows = []
    for r in results:
        ok = "-" if r["meets_target"] is None else ("PASS" if r["meets_target"] else "FAIL")
        rows.append([r["model"], str(r["resolution"]), str(r["steps"]), str(r["repeats"]),
                     f"{r['median_plain_s']:.3f}", f"{r['median_capture_s']:.3f}", f"{r['ratio']:.3f}",
                     r["target_text"], ok, f"{r['overhead_per_step_ms']:.1f}", f"{r['cpu_ratio']:.3f}", str(r["maps_written"]),
                     f"{r['store_bytes']:,}", str(r["store_files"])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\nTargets: CPU ratio <= {CPU_TARGET:.2f}; GPU SD-1.5 at 512 px <= {GPU_TARGET:.2f}; "
          f"GPU flux/sd3 structures at 256 px (4096 image tokens) <= {JOINT_GPU_TARGET:.2f}. "
          "ratio = median(capture) / median(plain); timed runs interleaved plain, capture, ...; "
          "one untimed warm-up of each first (attnscope caches the weights fingerprint after the first capture; "
          "the per-call cost left after the warm-up is printed above). "
          "store bytes = apparent size of the last capture's store (fp16, heads='mean', branch='cond'). "
          "cpu-time ratio = same for the process CPU time (all threads): a cross-check on a shared machine.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {
        "torch": torch.__version__, "attnscope": attnscope.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(f"capture overhead benchmark: torch {env['torch']}, {env['torch_threads']} torch threads, "
          f"{env['cpu_count']} CPUs, device {args.device}{' (' + env['gpu'] + ')' if env['gpu'] else ''}, "
          f"load average {env['loadavg_start']}")
    print(f"prompt {PROMPT!r}, seed {SEED}; capture: all sites, every step, heads='mean', tokens={TOKENS!r}, branch='cond', float16")
    results = [bench_model(name, args) for name in args.models]
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "prompt": PROMPT, "seed": SEED, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

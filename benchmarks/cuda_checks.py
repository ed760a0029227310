"""Correctness on a GPU: what the CPU tests check, run on CUDA (the tests themselves run on the CPU).

Each check prints one ``PASS``/``FAIL`` line with the number it compared; ``--json`` keeps them all.

1. capture: the shapes model's maps captured on CUDA (float32) equal the CPU capture of the same
   generation within 1e-3, and so do the images (the CUDA path of the hook core and the writer);
2. capture in float16 on CUDA: every stored row of the SD-1.5 structure at 512 px sums to 1 over
   the 77 tokens within 1e-2, and the maps are finite;
3. rerun: a plain ``ats.rerun`` of a CUDA trace gives the same image, byte for byte (same device);
4. batch invariance, plain and with each intervention: eight prompts, each alone and all in one
   batch, and one as the first of two images of its prompt; the images must agree within 1e-3
   (issue 12's CUDA criterion). The per-sample differences are printed: the denoiser's own
   batch-size rounding (~1e-6) is amplified by Attention Regulation's descent on some samples
   (docs/regulation.md, "A sample does not depend on its batch").

Float32 runs in IEEE float32: TF32 is turned off (cuDNN convolutions use it by default; it keeps 10
bits of each factor's mantissa, ~5e-4 relative error per product, the order of these limits), so the
checks measure attnscope's CUDA path, not TF32's rounding.

    python benchmarks/cuda_checks.py --json benchmarks/results/cuda_checks.json
    python benchmarks/cuda_checks.py --device cpu --skip-sd15      # the same checks on the CPU (a dry run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import attnscope as ats
from attnscope.hooks import prepare_clients
from attnscope.models import eval_prompts, object_nouns
from attnscope.testing import sd15_structure_pipeline

PROMPT = "a red circle and a blue square"
STEPS = 8
RESULTS: list[dict] = []


def exact_float32() -> None:
    """Float32 convolutions and matrix products in IEEE float32 on CUDA (cuDNN's default is TF32)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def check(name: str, value: float, limit: float, *, below: bool = True) -> None:
    ok = bool(value <= limit) if below else bool(value > limit)
    RESULTS.append({"check": name, "value": float(value), "limit": limit, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3g} ({'<=' if below else '>'} {limit})", flush=True)


def shapes(device: str):
    pipe = ats.load_pipeline("shapes").to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, prompts: list[str], seeds: list[int], client=None, **call) -> np.ndarray:
    """The images of one call (prompt i with a CPU generator seeded seeds[i]), with ``client`` installed if given."""
    call = {"prompt": prompts, "generator": [torch.Generator().manual_seed(s) for s in seeds],
            "num_inference_steps": STEPS, "output_type": "np", **call}
    if client is None:
        return pipe(**call).images
    prepare_clients([client], pipe, call)
    with ats.hooks(pipe, client):
        return pipe(**call).images


def capture_matches_cpu(device: str, tmp: Path) -> None:
    gpu = ats.capture(shapes(device), PROMPT, seed=0, store=tmp / "gpu.zarr", num_inference_steps=STEPS)
    cpu = ats.capture(shapes("cpu"), PROMPT, seed=0, store=tmp / "cpu.zarr", num_inference_steps=STEPS)
    worst = max(float(np.abs(gpu.attention(s).values.astype(float) - cpu.attention(s).values.astype(float)).max())
                for s in gpu.sites)
    check(f"capture on {device} vs cpu: largest map difference", worst, 1e-3)
    diff = np.abs(np.asarray(gpu.images[0], float) - np.asarray(cpu.images[0], float)).max()
    check(f"capture on {device} vs cpu: largest pixel difference (0-255)", diff, 2)
    again = ats.rerun(gpu, store=tmp / "again.zarr")
    same = np.abs(np.asarray(again.images[0], float) - np.asarray(gpu.images[0], float)).max()
    check(f"plain rerun on {device}: largest pixel difference (0-255)", same, 0)


def half_capture_rows(device: str, tmp: Path) -> None:
    pipe = sd15_structure_pipeline().to(device, torch.float16 if device == "cuda" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp / "sd15.zarr", num_inference_steps=2, height=512, width=512,
                     tokens="all")
    worst, finite = 0.0, True
    for site in tr.sites:
        maps = tr.attention(site).values.astype(np.float64)
        finite &= bool(np.isfinite(maps).all())
        worst = max(worst, float(np.abs(maps.sum(-1) - 1).max()))
    check("sd15-structure 512 px capture: largest |row sum - 1| over 77 tokens", worst, 1e-2)
    check("sd15-structure 512 px capture: non-finite maps (0 = none)", 0.0 if finite else 1.0, 0)


def batch_invariance(device: str, name: str, make, n: int = 8) -> None:
    """Each of ``n`` prompts alone and in one batch of ``n``; plus one as the first of two images of its prompt."""
    pipe = shapes(device)
    prompts = eval_prompts("two", n=n, seed=31)
    seeds = list(range(50, 50 + n))
    alone = [images(pipe, [p], [s], make())[0] for p, s in zip(prompts, seeds)]
    batch = images(pipe, prompts, seeds, make())
    gaps = [float(np.abs(batch[i] - alone[i]).max()) for i in range(n)]
    within = sum(g <= 1e-3 for g in gaps)
    print(f"      {name}: per-sample largest pixel difference, alone vs batch of {n}: "
          + ", ".join(f"{g:.1e}" for g in gaps))
    check(f"{name} on {device}: samples of a batch of {n} that differ from alone by more than 1e-3 (0-1)",
          n - within, 0)
    two = images(pipe, prompts[:1], [seeds[0], 99], make(), num_images_per_prompt=2)
    check(f"{name} on {device}: alone vs one of two images of its prompt (0-1)",
          float(np.abs(two[0] - alone[0]).max()), 1e-3)
    if name != "plain":
        plain = images(pipe, prompts[:1], seeds[:1])[0]
        check(f"{name} on {device}: it changed the image (largest pixel difference, 0-1)",
              float(np.abs(plain - alone[0]).max()), 0.05, below=False)


def main(argv: list[str] | None = None) -> int:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--skip-sd15", action="store_true", help="leave out the float16 SD-1.5-structure capture")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    torch.set_num_threads(2)
    exact_float32()
    with tempfile.TemporaryDirectory() as tmp:
        capture_matches_cpu(args.device, Path(tmp))
        if not args.skip_sd15:
            half_capture_rows(args.device, Path(tmp))
    batch_invariance(args.device, "plain", lambda: None)
    batch_invariance(args.device, "AttentionRegulation", lambda: ats.regulate.AttentionRegulation(object_nouns))
    batch_invariance(args.device, "AttendAndExcite", lambda: ats.regulate.AttendAndExcite(object_nouns))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                         "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                                         "tf32": torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32,
                                         "results": RESULTS}, indent=1))
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

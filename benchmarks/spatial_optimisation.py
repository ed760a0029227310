"""SpatialTemporal's λ optimisation: its cost and peak memory against a plain run, and what it changes.

``cost``: in one process, medians of ``--repeats`` interleaved rounds of the same generation — plain,
with fixed λ, and optimised (``--epochs`` trajectories with gradients, the last pass without, then
the generation itself) — and their ratios. Peak memory: each of plain, optimisation with
checkpointing and without it runs in its own child process after a warm-up generation; the figure is
the rise of the process's peak RSS (``ru_maxrss``) over the warm-up's (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA).

``quality``: relation prompts of the shapes model (prompt i with seed ``--seed`` + i), layouts from
the relation words, λ fixed at 1 vs optimised from 1 against the attention objective; the paired
difference of the outcomes and the objective before/after per image.

    python benchmarks/spatial_optimisation.py cost --models shapes
    python benchmarks/spatial_optimisation.py cost --models shapes --steps 4 --epochs 1 --repeats 1   # a quick look
    python benchmarks/spatial_optimisation.py quality --n 4 --batch 4 --epochs 1                     # a quick look
    python benchmarks/spatial_optimisation.py quality --n 100 --seed 9001
    python benchmarks/spatial_optimisation.py cost --models sd15 --memory-only --steps 4 --epochs 1
    python benchmarks/spatial_optimisation.py cost --models sd15 --device cuda --resolution 512 --steps 50
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from paired_timing import MODELS, PROMPT, pipeline, timed

import attnscope as ats

RELATION = "a red circle to the left of a blue square"
STEPS = {"shapes": 20, "sd15": 10}


def _call(name: str, args) -> dict:
    side = args.resolution or MODELS[name]["resolution"]
    return dict(prompt=RELATION if name == "shapes" else PROMPT, num_inference_steps=args.steps or STEPS[name],
                height=side, width=side)


def _control(args, layout_from: str):
    layout = ats.regulate.layout_from_prompt(layout_from)
    return ats.regulate.SpatialTemporal(layout, objective="attention", epochs=args.epochs, lr=args.lr)


def _generate(pipe, call: dict, *clients) -> None:
    with ats.hooks(pipe, *clients):
        pipe(generator=torch.Generator().manual_seed(0), **call)


def cost(name: str, args) -> dict:
    call = _call(name, args)
    memory = {mode: _child_memory(name, mode, args) for mode in ("plain", "checkpointed", "no-checkpointing")}
    if args.memory_only:
        print(f"{MODELS[name]['label']}, {call['height']} px, {call['num_inference_steps']} steps, {args.device}, "
              f"{args.epochs} epochs: peak memory rise over the warm-up's: "
              + ", ".join(f"{k} {v:.0f} MB" for k, v in memory.items()))
        return {"model": name, "device": args.device, "epochs": args.epochs, "peak_memory_rise_mb": memory, **call}
    pipe = pipeline(name, args.device)
    fixed = ats.regulate.SpatialTemporal(ats.regulate.layout_from_prompt(call["prompt"]))

    def optimised() -> None:
        control = _control(args, call["prompt"])
        control.optimize(pipe, generator=torch.Generator().manual_seed(0), **call)
        _generate(pipe, call, control)

    runs = {"plain": lambda: _generate(pipe, call), "fixed": lambda: _generate(pipe, call, fixed),
            "optimised": optimised}
    for run in runs.values():  # warm-up
        run()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, run in runs.items():
            times[k].append(timed(run, args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": name, "device": args.device, "epochs": args.epochs, **{f"{k}_median_s": v for k, v in med.items()},
           "fixed_ratio": med["fixed"] / med["plain"], "optimised_ratio": med["optimised"] / med["plain"],
           "peak_memory_rise_mb": memory, **call}
    print(f"{MODELS[name]['label']}, {call['height']} px, {call['num_inference_steps']} steps, {args.device}: plain "
          f"{med['plain']:.3f} s, fixed λ {med['fixed']:.3f} s ({out['fixed_ratio']:.2f}x), optimised "
          f"({args.epochs} epochs + the run) {med['optimised']:.3f} s ({out['optimised_ratio']:.2f}x); peak memory "
          f"rise over the warm-up's: " + ", ".join(f"{k} {v:.0f} MB" for k, v in memory.items()))
    return out


def _child_memory(name: str, mode: str, args) -> float:
    """Peak memory rise (MB) of one generation (``plain``) or one optimisation, measured in a fresh process."""
    argv = [sys.executable, __file__, "memory-child", "--models", name, "--mode", mode, "--device", args.device,
            "--epochs", str(args.epochs), "--threads", str(args.threads)]
    for flag in ("steps", "resolution"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    return float(done.stdout.strip().splitlines()[-1])


def memory_child(args) -> None:
    name = args.models
    pipe, call = pipeline(name, args.device), _call(name, args)
    _generate(pipe, call)  # warm-up: the model, the first allocations

    def peak() -> float:
        if args.device != "cpu":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    base = peak()
    if args.mode == "plain":
        _generate(pipe, call)
    else:
        control = _control(args, call["prompt"])
        control._checkpointing = args.mode == "checkpointed"
        control.optimize(pipe, generator=torch.Generator().manual_seed(0), **call)
    print(peak() - base)


class _Recording(ats.regulate.SpatialTemporal):
    """SpatialTemporal that keeps every optimisation's objective values (evaluate() calls prepare per batch)."""

    histories: list

    def prepare(self, pipe, call):
        super().prepare(pipe, call)
        self.histories.extend(zip(*self.optimisation["objective"]))  # per sample: its value per pass


def quality(args) -> dict:
    from attnscope.models import evaluate, format_paired, paired_differences

    pipe = ats.load_pipeline("shapes")
    run = dict(n=args.n, seed=args.seed, batch_size=args.batch, progress=True)
    fixed = evaluate(pipe, "relation", interventions=[ats.regulate.SpatialTemporal()], **run)
    control = _Recording(objective="attention", epochs=args.epochs, lr=args.lr)
    control.histories = []
    optimised = evaluate(pipe, "relation", interventions=[control], **run)
    paired = paired_differences(fixed, optimised)
    before = [h[0] for h in control.histories]
    after = [h[-1] for h in control.histories]
    lowered = sum(a < b for a, b in zip(after, before))
    print(f"relation prompts, n={args.n}, seed {args.seed}, epochs {args.epochs}, lr {args.lr}: fixed λ=1 -> optimised")
    print(format_paired(paired))
    print(f"attention objective (1 - inside share): mean {statistics.mean(before):.4f} -> {statistics.mean(after):.4f}, "
          f"lowered for {lowered}/{len(before)} images")
    return {"n": args.n, "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "paired": paired,
            "objective_before_mean": statistics.mean(before), "objective_after_mean": statistics.mean(after),
            "lowered": lowered, "fixed": fixed["metrics"], "optimised": optimised["metrics"]}


def main(argv: list[str] | None = None) -> dict:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["cost", "quality", "memory-child"])
    p.add_argument("--models", default="shapes", help="cost: comma-separated from " + ", ".join(MODELS))
    p.add_argument("--steps", type=int, help="denoising steps (default: shapes 20, sd15 10)")
    p.add_argument("--resolution", type=int, help="image side in px (default: shapes 32, sd15 256)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cost: cpu or cuda (cuda: float16, peak memory from max_memory_allocated)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="cost: timed rounds (default 3)")
    p.add_argument("--memory-only", action="store_true", help="cost: peak memory only, no timing")
    p.add_argument("--epochs", type=int, default=3, help="optimisation epochs (default 3)")
    p.add_argument("--lr", type=float, default=5e-3, help="optimisation learning rate (default 0.005)")
    p.add_argument("--n", type=int, default=100, help="quality: prompts")
    p.add_argument("--seed", type=int, default=9001, help="quality: prompt i gets seed + i")
    p.add_argument("--batch", type=int, default=8, help="quality: prompts per call")
    p.add_argument("--mode", default="checkpointed", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / machine")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    if args.what == "memory-child":
        memory_child(args)
        return {}
    result = ({"cost": [cost(name, args) for name in args.models.split(",")]} if args.what == "cost"
              else {"quality": quality(args)})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

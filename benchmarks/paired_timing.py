"""Timing two variants of the same generation in one process: interleaved pairs, medians, their ratio.

Shared by the benchmark scripts; import it from a script in this folder (``from paired_timing import ...``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(run: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of ``run()``, with the GPU synchronised before each clock read on CUDA."""
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(baseline: Callable[[], object], variant: Callable[[], object], repeats: int,
                device: str = "cpu") -> dict:
    """One untimed warm-up of each, then ``repeats`` pairs (baseline, variant); medians and ratio variant/baseline."""
    baseline(), variant()
    base, var = [], []
    for _ in range(repeats):
        base.append(timed(baseline, device))
        var.append(timed(variant, device))
    ratio = statistics.median(var) / statistics.median(base)
    return {"baseline_s": base, "variant_s": var, "baseline_median_s": statistics.median(base),
            "variant_median_s": statistics.median(var), "ratio": ratio}

"""Fidelity evaluation on the shapes world: generate with fixed seeds, detect, count what is there.

The offline analogue of the detection-rate tables in the seed papers: for every prompt the
detector says which of the requested objects (colour *and* shape) are present, whether all are,
and for relation prompts whether the relation holds. Rates come with percentile-bootstrap 95 %
confidence intervals over prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..hooks import hooks
from .shapes import KINDS, detect, parse_prompt, relation_holds, sample_scene

__all__ = ["INTERVENTIONS", "PROMPT_SETS", "evaluate", "eval_prompts", "format_report", "named_interventions",
           "object_phrases"]

PROMPT_SETS = ("single", "two", "relation", "three")
def object_phrases(prompt: str) -> list[str]:
    """The object phrases of a shapes-world prompt, the targets of regulation in ``eval``.

    >>> object_phrases("a red circle to the left of a blue square")
    ['red circle', 'blue square']
    """
    return [f"{colour} {shape}" for colour, shape in parse_prompt(prompt)[0]]


def _regulation() -> Any:
    from ..regulate import AttentionRegulation

    return AttentionRegulation(object_phrases)


def _tgate() -> Any:
    from ..regulate import TGate

    return TGate(0.4)  # TGATE's 10 of 25 steps, as a share of whatever the run's steps are


#: ``attnscope eval --intervention NAME`` -> factory of a hook client (targets chosen per prompt).
INTERVENTIONS: dict[str, Callable[[], Any]] = {"regulation": _regulation, "tgate": _tgate}
_METRICS = {
    "object_present": "objects present",
    "all_present": "all objects present",
    "exact": "exactly the objects asked",
    "relation_correct": "relation correct",
}


def eval_prompts(prompts: str | Path | Sequence[str], n: int | None = None, seed: int = 0) -> list[str]:
    """The prompt list for an evaluation: a named set (``"single"``, ``"two"``, ``"relation"``,
    ``"three"``; ``n`` prompts drawn with ``seed``), a text file with one prompt per line, or a list.

    >>> from attnscope.models import eval_prompts
    >>> eval_prompts("two", n=4)[2:]
    ['a blue square and a blue triangle', 'a green square and a green circle']
    """
    if isinstance(prompts, str) and prompts in PROMPT_SETS:
        if n is None or n < 1:
            raise AttnscopeError(f"n={n!r}: expected a positive number of prompts for the {prompts!r} set")
        rng = np.random.default_rng([seed, 7919, KINDS.index(prompts)])
        return [sample_scene(rng, prompts).caption for _ in range(n)]
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise AttnscopeError(f"prompts={str(prompts)!r}: expected one of {', '.join(PROMPT_SETS)} or a text file")
        items = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        items = list(prompts)
    if not items:
        raise AttnscopeError(f"prompts={prompts!r}: no prompts")
    for item in items:
        parse_prompt(item)  # refuses prompts the detector cannot score
    return items[:n] if n else items


def named_interventions(names: Sequence[str]) -> list[Any]:
    """Hook clients for intervention names given on the command line (see :data:`INTERVENTIONS`).

    >>> from attnscope.models import named_interventions
    >>> named_interventions([])
    []
    """
    unknown = [name for name in names if name not in INTERVENTIONS]
    if unknown:
        raise AttnscopeError(f"intervention={unknown[0]!r}: unknown; available: {', '.join(sorted(INTERVENTIONS))}")
    return [INTERVENTIONS[name]() for name in names]


def _score(prompt: str, image: Any) -> dict[str, Any]:
    expected, relation = parse_prompt(prompt)
    found = detect(image)
    remaining = list(found)
    matches = []
    for colour, shape in expected:
        hit = next((o for o in remaining if (o.colour, o.shape) == (colour, shape)), None)
        if hit is not None:
            remaining.remove(hit)
        matches.append(hit)
    row = {
        "prompt": prompt,
        "expected": [f"{c} {s}" for c, s in expected],
        "detected": [{"colour": o.colour, "shape": o.shape, "box": list(o.box)} for o in found],
        "present": [m is not None for m in matches],
        "all_present": all(m is not None for m in matches),
        "exact": all(m is not None for m in matches) and not remaining,
        "relation_correct": None,
    }
    if relation is not None:
        a, b = matches
        row["relation_correct"] = bool(a is not None and b is not None and relation_holds(relation, a.centre, b.centre))
    return row


def _rate(successes: np.ndarray, totals: np.ndarray, rng: np.random.Generator, resamples: int) -> dict[str, Any]:
    """Rate sum(successes)/sum(totals) over prompts, with a percentile bootstrap CI over prompts."""
    idx = rng.integers(0, len(totals), size=(resamples, len(totals)))
    boot = successes[idx].sum(1) / np.maximum(totals[idx].sum(1), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"rate": float(successes.sum() / totals.sum()), "ci95": [float(lo), float(hi)],
            "count": int(successes.sum()), "total": int(totals.sum())}


def evaluate(pipe: Any, prompts: str | Path | Sequence[str], *, n: int | None = None, seed: int = 0,
             interventions: Sequence[Any] = (), batch_size: int = 16, bootstrap: int = 2000,
             json_path: str | Path | None = None, progress: bool = True, **pipeline_kwargs: Any) -> dict[str, Any]:
    """Generate one image per prompt (prompt ``i`` with seed ``seed + i``), detect, and report rates.

    Parameters
    ----------
    pipe : diffusers pipeline
        Usually ``ats.load_pipeline("shapes")``.
    prompts : {"single", "two", "relation", "three"}, path or list of str
        See :func:`eval_prompts`.
    interventions : sequence of hook clients
        Installed with :func:`attnscope.hooks` around every generation (any observer or intervention).
    batch_size : int
        Prompts per pipeline call; each image still has its own seeded generator.
    json_path : str or Path, optional
        Also write the result there (the same dict, as JSON).
    **pipeline_kwargs
        Passed to the pipeline (``num_inference_steps``, ``guidance_scale``, …).

    Returns
    -------
    dict
        ``{"prompts", "n", "seed", "model", "settings", "interventions", "metrics", "per_prompt"}``;
        ``metrics[name] = {"rate", "ci95", "count", "total"}`` for ``object_present`` (per object),
        ``all_present``, ``exact`` (all present and nothing else) and, for relation prompts,
        ``relation_correct`` (both present and the relation holds between their centres).

    Examples
    --------
    >>> import attnscope as ats
    >>> from attnscope.models import evaluate
    >>> result = evaluate(ats.load_pipeline("shapes"), "single", n=2, num_inference_steps=4, progress=False)
    >>> sorted(result["metrics"])
    ['all_present', 'exact', 'object_present']
    """
    import torch
    from tqdm.auto import tqdm

    items = eval_prompts(prompts, n, seed)
    if batch_size < 1:
        raise AttnscopeError(f"batch_size={batch_size!r}: expected a positive integer")
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(items), desc="eval", disable=not progress)
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
            with hooks(pipe, *interventions):
                images = pipe(batch, generator=generators, **pipeline_kwargs).images
            for i, (prompt, image) in enumerate(zip(batch, images)):
                rows.append({**_score(prompt, image), "seed": seed + start + i})
            bar.update(len(batch))
    finally:
        bar.close()
        pipe.set_progress_bar_config(disable=None)

    rng = np.random.default_rng(seed)
    present = np.array([sum(r["present"]) for r in rows], float)
    objects = np.array([len(r["present"]) for r in rows], float)
    ones = np.ones(len(rows))
    metrics = {
        "object_present": _rate(present, objects, rng, bootstrap),
        "all_present": _rate(np.array([r["all_present"] for r in rows], float), ones, rng, bootstrap),
        "exact": _rate(np.array([r["exact"] for r in rows], float), ones, rng, bootstrap),
    }
    relational = [r["relation_correct"] for r in rows if r["relation_correct"] is not None]
    if relational:
        metrics["relation_correct"] = _rate(np.array(relational, float), np.ones(len(relational)), rng, bootstrap)
    result = {
        "prompts": str(prompts) if isinstance(prompts, (str, Path)) else "list",
        "n": len(rows),
        "seed": seed,
        "model": pipe.config.get("_name_or_path"),
        "settings": {"batch_size": batch_size, **{k: v for k, v in pipeline_kwargs.items() if _plain(v)}},
        "interventions": [repr(c) for c in interventions],
        "metrics": metrics,
        "per_prompt": rows,
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate` result.

    >>> from attnscope.models import format_report
    >>> m = {"rate": 0.5, "ci95": [0.25, 0.75], "count": 1, "total": 2}
    >>> print(format_report({"prompts": "two", "n": 2, "seed": 0, "model": "shapes", "settings": {},
    ...                      "interventions": [], "metrics": {"all_present": m}}))
    prompts two, n=2, seed 0, model shapes
    metric                        rate    95% CI           count
    all objects present          50.0 %   [25.0, 75.0]     1/2
    """
    settings = ", ".join(f"{k} {v}" for k, v in result["settings"].items())
    lines = [f"prompts {result['prompts']}, n={result['n']}, seed {result['seed']}, model {result['model']}"
             + (f", {settings}" if settings else "")]
    if result["interventions"]:
        lines.append("interventions: " + "; ".join(result["interventions"]))
    lines.append(f"{'metric':<28}{'rate':>6}    {'95% CI':<17}count")
    for name, m in result["metrics"].items():
        lo, hi = m["ci95"]
        ci = f"[{100 * lo:.1f}, {100 * hi:.1f}]"
        lines.append(f"{_METRICS[name]:<28}{100 * m['rate']:>5.1f} %   {ci:<17}{m['count']}/{m['total']}")
    return "\n".join(lines)

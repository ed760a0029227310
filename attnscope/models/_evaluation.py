"""Fidelity evaluation on the shapes world: generate with fixed seeds, detect, count what is there.

The offline analogue of the detection-rate tables in the seed papers: for every prompt the
detector says which of the requested objects (colour *and* shape) are present, whether all are,
and for relation prompts whether the relation holds. Rates come with percentile-bootstrap 95 %
confidence intervals over prompts.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..capture import check_num_steps, check_scale
from ..errors import AttnscopeError
from ..hooks import hooks, prepare_clients
from ..selection import SEEDS
from ..store import jsonable
from .shapes import KINDS, detect, parse_prompt, relation_holds, sample_scene

__all__ = ["INTERVENTIONS", "PROMPT_KINDS", "PROMPT_SETS", "evaluate", "eval_prompts", "format_paired", "format_report",
           "named_interventions", "object_nouns", "object_phrases", "paired_differences", "prompt_kind", "score_image"]

PROMPT_SETS = ("single", "two", "relation", "three")
#: what :func:`prompt_kind` says about a prompt, in report order
PROMPT_KINDS = ("single", "distinct", "shared colour", "shared shape", "three")


def prompt_kind(prompt: str) -> str:
    """How a shapes-world prompt's objects relate: ``"distinct"`` (two objects, colours and shapes
    differ), ``"shared colour"``, ``"shared shape"``; ``"single"`` and ``"three"`` by count.

    >>> [prompt_kind(p) for p in ("a red circle and a blue square", "a red circle above a red square",
    ...                           "a red circle and a blue circle", "a red circle")]
    ['distinct', 'shared colour', 'shared shape', 'single']
    """
    return _kind(parse_prompt(prompt)[0])


def _kind(objects: list[tuple[str, str]]) -> str:
    """:func:`prompt_kind` of a prompt's parsed (colour, shape) objects."""
    if len(objects) != 2:
        return {1: "single", 3: "three"}[len(objects)]
    (colour_a, shape_a), (colour_b, shape_b) = objects
    return "shared colour" if colour_a == colour_b else "shared shape" if shape_a == shape_b else "distinct"


def object_nouns(prompt: str) -> list[str]:
    """The object nouns of a shapes-world prompt, once per object: the targets of regulation and
    reweighting in ``eval`` (a repeated noun is its next occurrence, see ``AttentionRegulation``).

    >>> object_nouns("a red circle and a blue circle")
    ['circle', 'circle']
    """
    return [shape for _, shape in parse_prompt(prompt)[0]]


def object_phrases(prompt: str) -> list[str]:
    """The object phrases of a shapes-world prompt, the targets of regulation in ``eval``.

    >>> object_phrases("a red circle to the left of a blue square")
    ['red circle', 'blue square']
    """
    return [f"{colour} {shape}" for colour, shape in parse_prompt(prompt)[0]]


def _regulation() -> Any:
    from ..regulate import AttentionRegulation

    return AttentionRegulation(object_nouns)


def _attend_excite() -> Any:
    from ..regulate import AttendAndExcite

    return AttendAndExcite(object_nouns)  # the latent-moving baseline, official settings, the nouns as subjects


def _reweight() -> Any:
    from ..regulate import Reweight

    return Reweight(object_nouns, 2.0)  # the cheap baseline: twice the attention on both objects


def _tgate() -> Any:
    from ..regulate import TGate

    return TGate(0.4)  # TGATE's 10 of 25 steps, as a share of whatever the run's steps are


#: ``attnscope eval --intervention NAME`` -> factory of a hook client (targets chosen per prompt).
def _spatial() -> Any:
    from ..regulate import SpatialTemporal

    return SpatialTemporal()  # each prompt's layout from its relation words (layout_from_prompt), λ = 1


def _spatial_optimised() -> Any:
    from ..regulate import SpatialTemporal

    return SpatialTemporal(objective="attention")  # λ from 1, optimised per image: Adam lr 5e-3, 3 epochs


INTERVENTIONS: dict[str, Callable[[], Any]] = {"regulation": _regulation, "reweight": _reweight,
                                               "attend-excite": _attend_excite, "tgate": _tgate,
                                               "spatial": _spatial, "spatial-optimised": _spatial_optimised}
_METRICS = {
    "object_present": "objects present",
    "all_present": "all objects present",
    "exact": "exactly the objects asked",
    "extra": "extra objects",
    "relation_correct": "relation correct",
}
#: pipeline arguments ``evaluate`` sets itself: given too, the image scored would not be the prompt's and seed's
_OWN_ARGUMENTS = ("prompt", "prompt_embeds", "generator", "latents", "num_images_per_prompt", "output_type", "return_dict")
#: per-prompt outcomes that ``paired_differences`` compares (``extra``: lower is better)
PAIRED = ("all_present", "exact", "extra")


def eval_prompts(prompts: str | Path | Sequence[str], n: int | None = None, seed: int = 0) -> list[str]:
    """The prompt list for an evaluation: a named set (``"single"``, ``"two"``, ``"relation"``,
    ``"three"``; ``n`` prompts drawn with ``seed``), a text file with one prompt per line (blank lines and lines
    starting with ``#`` skipped), or a list.

    >>> from attnscope.models import eval_prompts
    >>> eval_prompts("two", n=4)[2:]
    ['a blue square and a blue triangle', 'a green square and a green circle']
    """
    n, seed = _plain_int(n), _plain_int(seed)
    if isinstance(prompts, str) and prompts in PROMPT_SETS:
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise AttnscopeError(f"n={n!r}: expected a positive number of prompts for the {prompts!r} set")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise AttnscopeError(f"seed={seed!r}: expected an int >= 0 (the {prompts!r} set is drawn with it)")
        rng = np.random.default_rng([seed, 7919, KINDS.index(prompts)])
        return [sample_scene(rng, prompts).caption for _ in range(n)]
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise AttnscopeError(f"prompts={str(prompts)!r}: expected one of {', '.join(PROMPT_SETS)} or a text file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AttnscopeError(f"prompts={str(prompts)!r}: cannot be read as UTF-8 text ({exc})") from None
        lines = enumerate((line.strip() for line in text.splitlines()), 1)
        numbered = [(f"prompts={str(prompts)!r}, line {i}: ", line)  # where a prompt is: its file and line
                    for i, line in lines if line and not line.startswith("#")]  # as sweep's prompt files
    else:
        numbered = [("", item) for item in prompts]
    items = [item for _, item in numbered]
    if not items:
        raise AttnscopeError(f"prompts={prompts!r}: no prompts")
    for where, item in numbered:
        try:
            parse_prompt(item)  # refuses prompts the detector cannot score
        except AttnscopeError as exc:
            if not where:
                raise
            raise AttnscopeError(where + str(exc).removeprefix("prompt=")) from None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise AttnscopeError(f"n={n!r}: expected a positive number of prompts (or None for all)")
    return items[:n] if n else items


def _settings(client: Any) -> Any:
    """A client's JSON-able ``describe()`` (its name alone when it has none)."""
    describe = getattr(client, "describe", None)
    if callable(describe):
        try:
            return jsonable(describe())
        except TypeError:
            pass
    return {"name": type(client).__name__}


def named_interventions(names: Sequence[str]) -> list[Any]:
    """Hook clients for intervention names given on the command line (see :data:`INTERVENTIONS`).

    >>> from attnscope.models import named_interventions
    >>> named_interventions([])
    []
    >>> named_interventions(["reweight", "reweight"])
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: intervention='reweight' given twice: each is installed once (twice would apply it twice); give it once
    """
    unknown = [name for name in names if name not in INTERVENTIONS]
    if unknown:
        raise AttnscopeError(f"intervention={unknown[0]!r}: unknown; available: {', '.join(sorted(INTERVENTIONS))}")
    repeated = [name for i, name in enumerate(names) if name in names[:i]]
    if repeated:
        raise AttnscopeError(f"intervention={repeated[0]!r} given twice: each is installed once (twice would apply it "
                             f"twice); give it once")
    return [INTERVENTIONS[name]() for name in names]


def score_image(prompt: str, image: Any) -> dict[str, Any]:
    """What the detector finds in one image of the shapes model, against its prompt (one row of :func:`evaluate`).

    Each object the prompt asks for is matched to the first detection of the same colour and shape;
    ``relation_correct`` (relation prompts; None otherwise) needs both matched and the relation to hold
    between their centres (either way round when the two objects are the same, "a red circle above a red
    circle": nothing says which of two identical objects the prompt names first).

    Examples
    --------
    >>> from attnscope.models.shapes import render, sample_scene
    >>> scene = sample_scene(3, "relation")
    >>> scene.caption
    'a red square to the left of a green triangle'
    >>> row = score_image(scene.caption, render(scene))
    >>> row["all_present"], row["extra"], row["relation_correct"]
    (True, False, True)
    >>> score_image("a green triangle to the left of a red square", render(scene))["relation_correct"]
    False
    """
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
        "kind": _kind(expected),
        "expected": [f"{c} {s}" for c, s in expected],
        "detected": [{"colour": o.colour, "shape": o.shape, "box": list(o.box)} for o in found],
        "present": [m is not None for m in matches],
        "all_present": all(m is not None for m in matches),
        "exact": all(m is not None for m in matches) and not remaining,
        "extra": bool(remaining),
        "extra_objects": [f"{o.colour} {o.shape}" for o in remaining],
        "relation_correct": None,
    }
    if relation is not None:
        a, b = matches
        holds = a is not None and b is not None and relation_holds(relation, a.centre, b.centre)
        if expected[0] == expected[1] and a is not None and b is not None:
            # "a red circle above a red circle": which detection is "the first" is arbitrary (left to right)
            holds = holds or relation_holds(relation, b.centre, a.centre)
        row["relation_correct"] = bool(holds)
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
        Installed with :func:`attnscope.hooks` around every generation (any observer or intervention);
        one with a ``prepare(pipe, call)`` method is handed each pipeline call first.
    batch_size : int
        Prompts per pipeline call; each image still has its own seeded generator.
    json_path : str or Path, optional
        Also write the result there (the same dict, as JSON).
    **pipeline_kwargs
        Passed to the pipeline (``num_inference_steps``, ``guidance_scale``, …); not the arguments evaluate sets
        itself (``prompt``, ``prompt_embeds``, ``generator``, ``latents``, ``num_images_per_prompt``,
        ``output_type``, ``return_dict``): given, they would make the image scored not the prompt's and seed's.

    Returns
    -------
    dict
        ``{"prompts", "n", "seed", "model", "settings", "interventions", "intervention_settings", "metrics",
        "per_kind", "per_prompt"}``; ``interventions`` names each client, ``intervention_settings`` holds each
        one's full ``describe()`` (every parameter, as a rerun's manifest records it);
        ``metrics[name] = {"rate", "ci95", "count", "total"}`` for ``object_present`` (per object),
        ``all_present``, ``exact`` (all present and nothing else) and, for relation prompts,
        ``relation_correct`` (both present and the relation holds between their centres).

    Examples
    --------
    >>> import attnscope as ats
    >>> from attnscope.models import evaluate
    >>> result = evaluate(ats.load_pipeline("shapes"), "single", n=2, num_inference_steps=4, progress=False)
    >>> sorted(result["metrics"])
    ['all_present', 'exact', 'extra', 'object_present']
    """
    import torch
    from tqdm.auto import tqdm

    n, seed, batch_size, bootstrap = _plain_int(n), _plain_int(seed), _plain_int(batch_size), _plain_int(bootstrap)
    if "num_inference_steps" in pipeline_kwargs:
        pipeline_kwargs["num_inference_steps"] = _plain_int(pipeline_kwargs["num_inference_steps"])
    check_num_steps(pipeline_kwargs.get("num_inference_steps"))
    check_scale("guidance_scale", pipeline_kwargs.get("guidance_scale"))  # NaN would turn guidance off without a word
    own = [name for name in _OWN_ARGUMENTS if name in pipeline_kwargs]
    if own:
        value = pipeline_kwargs[own[0]]
        shown = repr(value) if _plain(value) else f"<{type(value).__name__}>"
        raise AttnscopeError(f"{own[0]}={shown}: set by evaluate itself (prompt i of the list, one "
                             f"image each, generated with seed SEED+i and scored as a PIL image); leave it out")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttnscopeError(f"batch_size={batch_size!r}: expected a positive integer")
    _check_bootstrap(bootstrap)
    if isinstance(interventions, (str, bytes)) or not isinstance(interventions, Sequence):
        raise AttnscopeError(f"interventions={interventions!r}: expected a sequence of hook clients, e.g. "
                             f"[ats.regulate.TGate(0.4)] (named_interventions(['regulation']) makes them from names)")
    if json_path is not None and Path(json_path).is_dir():
        raise AttnscopeError(f"json_path={str(json_path)!r} is a directory; expected the path of a JSON file to write")
    _check_seed(seed, 1)
    items = eval_prompts(prompts, n, seed)
    _check_seed(seed, len(items))
    negatives = _negative_prompts(pipeline_kwargs.get("negative_prompt"), len(items))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(items), desc="eval", disable=not progress)
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
            call = {"prompt": batch, "generator": generators, **pipeline_kwargs}
            if negatives is not None:  # diffusers takes a list of prompts only with a list of negative prompts
                call["negative_prompt"] = negatives[start:start + batch_size]
            prepare_clients(interventions, pipe, call)  # e.g. SpatialTemporal(objective=...) optimises its λ
            with hooks(pipe, *interventions):
                images = pipe(**call).images
            for i, (prompt, image) in enumerate(zip(batch, images)):
                rows.append({**score_image(prompt, image), "seed": seed + start + i})
            bar.update(len(batch))
    finally:
        bar.close()
        pipe.set_progress_bar_config(disable=None)

    rng = np.random.default_rng(seed)
    metrics = _metrics(rows, rng, bootstrap)
    per_kind = {kind: _metrics([r for r in rows if r["kind"] == kind], rng, bootstrap)
                for kind in PROMPT_KINDS if any(r["kind"] == kind for r in rows)}
    result = {
        "prompts": str(prompts) if isinstance(prompts, (str, Path)) else "list",
        "n": len(rows),
        "seed": seed,
        "model": pipe.config.get("_name_or_path"),
        "settings": {"batch_size": batch_size, **{k: v for k, v in pipeline_kwargs.items() if _plain(v)}},
        "interventions": [repr(c) for c in interventions],
        "intervention_settings": [_settings(c) for c in interventions],
        "metrics": metrics,
        "per_kind": per_kind,
        "per_prompt": rows,
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


def _plain_int(value: Any) -> Any:
    """numpy's ints (an ``np.arange`` item) as Python ints, so that the checks take them and the JSON can hold them;
    anything else as it is.

    >>> _plain_int(np.int64(3)), _plain_int(True), _plain_int(2.0)
    (3, True, 2.0)
    """
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _negative_prompts(value: Any, count: int) -> list[str] | None:
    """The negative prompt of each of the ``count`` prompts: one string for all, or one per prompt.

    >>> _negative_prompts("a red circle", 2), _negative_prompts(None, 2)
    (['a red circle', 'a red circle'], None)
    >>> _negative_prompts(["a red circle"], 2)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: negative_prompt=['a red circle']: expected one string for every prompt, or a list of one per prompt (2)
    """
    if value is None or isinstance(value, str):
        return None if value is None else [value] * count
    if isinstance(value, (list, tuple)) and len(value) == count:
        return list(value)
    raise AttnscopeError(f"negative_prompt={value!r}: expected one string for every prompt, or a list of one per "
                         f"prompt ({count})")


def _check_seed(seed: Any, count: int) -> None:
    """Prompt ``i`` of ``count`` is generated with seed ``seed + i``: every one must seed a ``torch.Generator``.

    >>> _check_seed(0, 100)
    >>> _check_seed(2**64 - 2, 3)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: seed=18446744073709551614: expected an int from 0 to 18446744073709551613: prompt i of 3 is generated with seed SEED+i, and a torch.Generator takes seeds up to 2**64 - 1
    >>> _check_seed(-5, 1)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: seed=-5: expected an int from 0 to 18446744073709551615: prompt i is generated with seed SEED+i, and a torch.Generator takes seeds up to 2**64 - 1
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEEDS.stop - count:
        which = f"prompt i of {count} is" if count > 1 else "prompt i is"  # 1: checked before the prompts are read
        raise AttnscopeError(f"seed={seed!r}: expected an int from 0 to {SEEDS.stop - count}: {which} generated with "
                             f"seed SEED+i, and a torch.Generator takes seeds up to 2**64 - 1")


def _check_bootstrap(bootstrap: Any) -> None:
    """The number of bootstrap resamples must be an int >= 1.

    >>> _check_bootstrap(0)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: bootstrap=0: expected an int >= 1 (the number of bootstrap resamples)
    """
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        raise AttnscopeError(f"bootstrap={bootstrap!r}: expected an int >= 1 (the number of bootstrap resamples)")


def _metrics(rows: list[dict[str, Any]], rng: np.random.Generator, bootstrap: int) -> dict[str, Any]:
    """The rates of :func:`evaluate` over some of its rows."""
    present = np.array([sum(r["present"]) for r in rows], float)
    objects = np.array([len(r["present"]) for r in rows], float)
    ones = np.ones(len(rows))
    metrics = {"object_present": _rate(present, objects, rng, bootstrap)}
    for name in PAIRED:
        metrics[name] = _rate(np.array([r[name] for r in rows], float), ones, rng, bootstrap)
    relational = [r["relation_correct"] for r in rows if r["relation_correct"] is not None]
    if relational:
        metrics["relation_correct"] = _rate(np.array(relational, float), np.ones(len(relational)), rng, bootstrap)
    return metrics


def paired_differences(before: dict[str, Any], after: dict[str, Any], *, bootstrap: int = 2000,
                       seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two :func:`evaluate` results on the same prompts and seeds.

    For each per-prompt outcome (all objects present, exactly the objects asked, extra objects; the
    relation correct, when every prompt states one):
    the rates before and after, their difference with a percentile-bootstrap 95 % CI over prompts
    (resampling prompts, so each keeps its pair), and how many prompts changed each way. ``fixed``
    counts prompts that went from failing to succeeding, ``broken`` the reverse; for ``extra``,
    success is having none. Also per prompt kind (``"per_kind"``).

    Examples
    --------
    >>> row = lambda ok, extra: {"prompt": "a red circle and a blue square", "seed": 0, "kind": "distinct",
    ...                          "all_present": ok, "exact": ok and not extra, "extra": extra}
    >>> before = {"per_prompt": [row(False, False), row(True, True), row(True, False)]}
    >>> after = {"per_prompt": [row(True, False), row(True, False), row(True, False)]}
    >>> d = paired_differences(before, after)["metrics"]
    >>> round(d["all_present"]["difference"], 3), d["all_present"]["fixed"], d["extra"]["fixed"]
    (0.333, 1, 1)
    """
    bootstrap, seed = _plain_int(bootstrap), _plain_int(seed)
    _check_bootstrap(bootstrap)
    rows_before, rows_after = before["per_prompt"], after["per_prompt"]
    pairs = [(r["prompt"], r["seed"]) for r in rows_before]
    if pairs != [(r["prompt"], r["seed"]) for r in rows_after]:
        raise AttnscopeError("paired_differences: the two results are not on the same prompts and seeds "
                             f"({len(rows_before)} and {len(rows_after)} rows); run both with the same prompts, n and seed")
    rng = np.random.default_rng(seed)

    def compare(index: list[int]) -> dict[str, Any]:
        out = {}
        resamples = rng.integers(0, len(index), size=(bootstrap, len(index)))
        relational = all(rows_before[i].get("relation_correct") is not None for i in index)
        for name in PAIRED + (("relation_correct",) if relational and index else ()):
            a = np.array([rows_before[i][name] for i in index], float)
            b = np.array([rows_after[i][name] for i in index], float)
            good_a, good_b = (1 - a, 1 - b) if name == "extra" else (a, b)
            lo, hi = np.percentile((b - a)[resamples].mean(1), [2.5, 97.5])
            out[name] = {"before": float(a.mean()), "after": float(b.mean()), "difference": float((b - a).mean()),
                         "ci95": [float(lo), float(hi)], "fixed": int(((good_b > 0) & (good_a == 0)).sum()),
                         "broken": int(((good_a > 0) & (good_b == 0)).sum()), "n": len(index)}
        return out

    kinds = [r.get("kind") for r in rows_before]
    per_kind = {kind: compare([i for i, k in enumerate(kinds) if k == kind])
                for kind in PROMPT_KINDS if kind in kinds}
    return {"metrics": compare(list(range(len(pairs)))), "per_kind": per_kind}


def format_paired(paired: dict[str, Any], per_kind: bool = False) -> str:
    """A plain-text table of :func:`paired_differences` (points, 95 % CI, fixed/broken counts).

    >>> d = {"before": 0.5, "after": 0.75, "difference": 0.25, "ci95": [0.1, 0.4], "fixed": 3, "broken": 1, "n": 8}
    >>> print(format_paired({"metrics": {"all_present": d}, "per_kind": {}}))
    paired (same prompts and seeds)    before    after   difference [95% CI]      fixed broken
    all objects present                50.0 %   75.0 %    +25.0 [+10.0, +40.0]        3      1
    """
    kinds = {kind: (metrics["all_present"]["n"], metrics) for kind, metrics in paired["per_kind"].items()}
    return "\n".join(_tables(_paired_table, "paired (same prompts and seeds)", paired["metrics"],
                             kinds if per_kind else {}))


def _tables(table: Callable[[str, dict[str, Any]], list[str]], title: str, metrics: dict[str, Any],
            kinds: dict[str, tuple[int, dict[str, Any]]]) -> list[str]:
    """``table`` of the whole set, then one per prompt kind (``kinds``: kind → (prompts, metrics))."""
    lines = table(title, metrics)
    for kind, (size, kind_metrics) in kinds.items():
        lines += table(f"{kind} (n={size})", kind_metrics)
    return lines


def _paired_table(title: str, metrics: dict[str, Any]) -> list[str]:
    lines = [f"{title:<33}{'before':>8} {'after':>8}   {'difference [95% CI]':<24}{'fixed':>6} {'broken':>6}"]
    for name, d in metrics.items():
        lo, hi = d["ci95"]
        lines.append(f"{_METRICS[name]:<33}{100 * d['before']:>6.1f} % {100 * d['after']:>6.1f} %   "
                     f"{100 * d['difference']:>+6.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]".ljust(77)
                     + f"{d['fixed']:>6} {d['broken']:>6}")
    return lines


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def format_report(result: dict[str, Any], per_kind: bool = False) -> str:
    """A plain-text table of an :func:`evaluate` result; ``per_kind`` adds one table per prompt kind.

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
    kinds = {kind: (metrics["all_present"]["total"], metrics) for kind, metrics in result.get("per_kind", {}).items()}
    lines += _tables(_metric_table, "metric", result["metrics"], kinds if per_kind else {})
    return "\n".join(lines)


def _metric_table(title: str, metrics: dict[str, Any]) -> list[str]:
    lines = [f"{title:<28}{'rate':>6}    {'95% CI':<17}count"]
    for name, m in metrics.items():
        lo, hi = m["ci95"]
        ci = f"[{100 * lo:.1f}, {100 * hi:.1f}]"
        lines.append(f"{_METRICS[name]:<28}{100 * m['rate']:>5.1f} %   {ci:<17}{m['count']}/{m['total']}")
    return lines

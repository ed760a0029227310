"""The early-warning study (issue 16): can the attention of the first steps predict a missing object?

Stages (each resumable; run them in order):

    python studies/early_warning.py capture  --root runs/early-warning   # 2 sweeps of the shapes model (~35 min)
    python studies/early_warning.py features --root runs/early-warning   # per-step features, map_stats (~8 min)
    python studies/early_warning.py analyse  --root runs/early-warning   # ROC AUC per candidate × step -> auc.csv
    python studies/early_warning.py fit      --root runs/early-warning   # writes attnscope/stats/neglect_risk.json
    python studies/early_warning.py policy   --root runs/early-warning   # selective vs always-on regulation (~12 min)
    python studies/early_warning.py rank     --root runs/early-warning --seeds 200-207 --flagged 0.4  # rank rule, fresh seeds
    python studies/early_warning.py rank     --root runs/early-warning --seeds 300-307 --flagged 0.5  # (~12 min each)

A quick look at the plumbing (not the study's numbers; the shipped model is left alone):

    python studies/early_warning.py capture  --root /tmp/ew --n-prompts 3 --workers 1
    python studies/early_warning.py features --root /tmp/ew
    python studies/early_warning.py analyse  --root /tmp/ew
    python studies/early_warning.py fit      --root /tmp/ew --model-out /tmp/ew/neglect_risk.json
    python studies/early_warning.py policy   --root /tmp/ew --limit 4

Numbers and what they mean: docs/sweep.md, "The early warning". Measured on 2026-12-03 on a 2-core CPU.

The shapes world has 132 distinct two-object prompts ("a C1 S1 and a C2 S2": 72 distinct, 24
shared colour, 36 shared shape). They are split in two halves, stratified by kind, with a random
permutation drawn with seed 16001: the *tuning* half (image seeds 0-7) is where the feature, the
step and the threshold are chosen; the *report* half (other prompts, image seeds 100-107) is only
scored with the choice made on the tuning half. 2 × 66 prompts × 8 seeds = 1056 generations of 20
steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

SPLITS = {"tune": "0-7", "report": "100-107"}
SPLIT_SEED = 16001
STEPS = 20


def split_prompts() -> dict[str, list[str]]:
    """The two disjoint halves of the 132 two-object prompts, stratified by kind."""
    import numpy as np

    from attnscope.models import prompt_kind
    from attnscope.models.shapes import COLOURS, SHAPES

    prompts = [f"a {c1} {s1} and a {c2} {s2}" for c1 in COLOURS for s1 in SHAPES for c2 in COLOURS for s2 in SHAPES
               if (c1, s1) != (c2, s2)]
    rng = np.random.default_rng(SPLIT_SEED)
    halves: dict[str, list[str]] = {"tune": [], "report": []}
    for kind in ("distinct", "shared colour", "shared shape"):
        group = [p for p in prompts if prompt_kind(p) == kind]
        order = rng.permutation(len(group))
        halves["tune"] += [group[i] for i in order[: len(group) // 2]]
        halves["report"] += [group[i] for i in order[len(group) // 2:]]
    return halves


def capture(root: Path, workers: int, n_prompts: int | None) -> None:
    import attnscope as ats

    for split, prompts in split_prompts().items():
        seeds = SPLITS[split]
        prompts = prompts[:n_prompts] if n_prompts else prompts
        cat = ats.sweep("shapes", prompts, seeds, out=root / split, workers=workers, num_inference_steps=STEPS)
        df = cat.df
        print(f"{split}: {len(df)} runs, {int((df.status == 'complete').sum())} complete, "
              f"all objects present {100 * df.all_present.mean():.1f} %")


FEATURE_STEPS = range(10)


def step_features(trace) -> pd.DataFrame:
    """Candidate features of one trace, one row per step 0-9 and site (``site="mean"``: averaged over the 7).

    Targets are the prompt's two object phrases ("red circle", "blue circle": a phrase tells two objects
    of one shape apart, where a repeated noun would name both). ``share_min``:
    the smaller target's mass share; ``share_ratio``: smaller / larger; ``dominance_ratio``: larger /
    smaller; ``entropy``, ``gini``, ``sink_share`` (ats.stats.dominance); ``p2m_min``, ``top_min``,
    ``spread_min``: the smaller of the two targets' peak-to-mean, top-10 % share and spread;
    ``overlap``: the histogram intersection of the two maps; ``centre_dist``: the distance between
    their centres of mass (ats.stats.map_shape).
    """
    import numpy as np
    import pandas as pd

    import attnscope as ats
    from attnscope.models import object_phrases

    phrases = object_phrases(trace.manifest["run"]["prompts"][0])
    dom = ats.stats.dominance(trace, targets=phrases, steps=FEATURE_STEPS).isel(sample=0).load()
    shape = ats.stats.map_shape(trace, phrases, steps=FEATURE_STEPS).isel(sample=0).load()
    frames = []
    for site in [*map(str, dom.site.values), "mean"]:
        d, m = (dom.mean("site"), shape.mean("site")) if site == "mean" else (dom.sel(site=site), shape.sel(site=site))
        shares = d["target_share"].values  # (step, 2)
        dist = np.hypot(*(np.diff(m[c].values, axis=1)[:, 0] for c in ("centre_x", "centre_y")))
        frames.append(pd.DataFrame({
            "step": d["step"].values, "site": site,
            "share_min": shares.min(1), "share_ratio": shares.min(1) / shares.max(1),
            "dominance_ratio": d["dominance_ratio"].values, "entropy": d["entropy"].values,
            "gini": d["gini"].values, "sink_share": d["sink_share"].values,
            "p2m_min": m["peak_to_mean"].values.min(1), "top_min": m["top_share"].values.min(1),
            "spread_min": m["spread"].values.min(1), "overlap": m["overlap"].values[:, 0], "centre_dist": dist,
        }))
    return pd.concat(frames, ignore_index=True)


def features(root: Path) -> None:
    import attnscope as ats

    for split in SPLITS:
        cat = ats.open_catalog(root / split)
        table = cat.map_stats(step_features)
        table = table.merge(cat.df[["run", "prompt", "seed", "kind", "all_present", "exact", "extra"]], on="run")
        table.to_parquet(root / f"features-{split}.parquet")
        print(f"{split}: {table.run.nunique()} runs, {len(table)} rows -> {root / f'features-{split}.parquet'}")


FEATURES = ("share_min", "share_ratio", "dominance_ratio", "entropy", "gini", "sink_share", "p2m_min", "top_min",
            "spread_min", "overlap", "centre_dist")


def auc(score, missing) -> float:
    """ROC AUC of ``score`` for ``missing`` (ats.stats.roc_auc: Mann-Whitney, ties counted half)."""
    import attnscope as ats

    return ats.stats.roc_auc(score, missing)


def prompt_bootstrap(df, column: str, rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile CI of the AUC of ``df[column]``, resampling prompts (a prompt's seeds stay together)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = [g for _, g in df.groupby("prompt")]
    values = []
    for _ in range(rounds):
        sample = [groups[i] for i in rng.integers(len(groups), size=len(groups))]
        score = np.concatenate([g[column].to_numpy() for g in sample])
        missing = np.concatenate([g["missing"].to_numpy() for g in sample])
        if missing.any() and (~missing).any():
            values.append(auc(score, missing))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def wide(table, through: bool):
    """One row per run: each feature at each site at step k (``through=False``) or averaged over steps 0..k,
    as ``feature[site]@k``; then the run's prompt, seed, kind and ``missing`` (not all objects present)."""
    import numpy as np
    import pandas as pd

    table = table.sort_values(["run", "site", "step"])
    cols = {}
    for f in FEATURES:
        pivot = table.pivot_table(index="run", columns=["site", "step"], values=f)
        for site in pivot.columns.get_level_values(0).unique():
            block = pivot[site]
            if through:
                block = block.cumsum(axis=1) / np.arange(1, block.shape[1] + 1)  # steps 0..k
            for k in block.columns:
                cols[f"{f}[{site}]@{k}"] = block[k]
    out = pd.DataFrame(cols)
    meta = table.drop_duplicates("run").set_index("run")[["prompt", "seed", "kind", "all_present"]]
    out = out.join(meta)
    out["missing"] = ~out["all_present"].astype(bool)
    return out


def fit_logistic(x, y, l2: float = 1.0):
    """L2-regularised logistic regression on standardised columns: (mean, std, weights) (the library's fitter)."""
    from attnscope.stats._risk_fit import fit_logistic as fit

    return fit(x, y, l2)


def logistic_score(model, x):
    from attnscope.stats._risk_fit import logistic_score as score

    return score(model, x)


def grouped_cv_auc(df, columns, folds: int = 5, seed: int = 0, l2: float = 1.0) -> float:
    """AUC of the logistic model on ``columns`` by cross-validation over prompts (within one split)."""
    return auc(out_of_fold_scores(df, columns, folds, seed, l2), df.missing.to_numpy(bool))


def out_of_fold_scores(df, columns, folds: int = 5, seed: int = 0, l2: float = 1.0):
    """Each run's logistic score from a model fitted on the other folds' prompts."""
    from attnscope.stats._risk_fit import out_of_fold_scores as scores

    return scores(df[columns].to_numpy(float), df.missing.to_numpy(float), df.prompt.to_numpy(), folds, seed, l2)


def analyse(root: Path, max_step: int = 5) -> dict:
    """Every single feature (per site and site mean, at step k or averaged over 0..k) and two logistic
    models per step, scored by ROC AUC. The choice (the feature and its sign, or the model's weights)
    is made on the tuning split; the report split only scores it (CI: bootstrap over prompts)."""
    import json

    import pandas as pd

    tables = {split: pd.read_parquet(root / f"features-{split}.parquet") for split in SPLITS}
    rows, scored = [], {}
    for through in (False, True):
        aggregate = "mean 0..k" if through else "at k"
        tune, report = wide(tables["tune"], through), wide(tables["report"], through)
        for column in [c for c in tune.columns if "@" in c]:
            a_tune = auc(tune[column], tune["missing"])
            sign = 1.0 if a_tune >= 0.5 else -1.0  # the direction is chosen on the tuning split only
            name, step = column.rsplit("@", 1)
            key = (name, int(step), aggregate)
            rows.append({"candidate": name, "step": int(step), "aggregate": aggregate, "sign": sign,
                         "auc_tune": max(a_tune, 1 - a_tune), "auc_report": auc(sign * report[column], report["missing"])})
            scored[key] = report.assign(s=sign * report[column])
        for k in range(10):
            for label, site_filter in (("logistic: 11 features [mean]", "[mean]@"), ("logistic: 11 features x 8 sites", "]@")):
                columns = [c for c in tune.columns if c.endswith(f"@{k}") and site_filter in c]
                model = fit_logistic(tune[columns].to_numpy(float), tune.missing.to_numpy(float))
                score = logistic_score(model, report[columns].to_numpy(float))
                key = (label, k, aggregate)
                rows.append({"candidate": label, "step": k, "aggregate": aggregate, "sign": 1.0,
                             "auc_tune": grouped_cv_auc(tune, columns), "auc_report": auc(score, report["missing"])})
                scored[key] = report.assign(s=score)
    res = pd.DataFrame(rows)
    early = res[res.step <= max_step].sort_values("auc_tune", ascending=False)
    best = early.iloc[0]
    low, high = prompt_bootstrap(scored[(best["candidate"], int(best["step"]), best["aggregate"])], "s")
    summary = {"best_on_tune": {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items()},
               "report_auc": float(best.auc_report), "report_ci95": [low, high],
               "missing_rate": {s: float(wide(t, False)["missing"].mean()) for s, t in tables.items()},
               "runs": {s: int(t.run.nunique()) for s, t in tables.items()},
               "top10_on_tune_steps_le_5": early.head(10).to_dict("records")}
    res.to_csv(root / "auc.csv", index=False)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    mean_rows = res[res.candidate.str.contains(r"\[mean\]")]
    print(mean_rows.pivot_table(index=["candidate", "aggregate"], columns="step", values="auc_report").round(2).to_string())
    print(json.dumps(summary, indent=1, default=str))
    return summary


MODEL_PATH = Path(__file__).resolve().parents[1] / "attnscope" / "stats" / "neglect_risk.json"


def fit(root: Path, model_path: Path = MODEL_PATH) -> dict:
    """Fit the shipped risk model: per step 0-9, a logistic regression over the 11 site-mean features of
    that step on the tuning split (L2 = 1 on standardised features); score it on the report split."""
    import json

    import pandas as pd

    import attnscope as ats
    from attnscope.models import object_phrases

    tables = {split: pd.read_parquet(root / f"features-{split}.parquet") for split in SPLITS}
    tune, report = wide(tables["tune"], False), wide(tables["report"], False)
    steps = {}
    for k in FEATURE_STEPS:
        columns = [f"{f}[mean]@{k}" for f in FEATURES]
        mean, std, w = fit_logistic(tune[columns].to_numpy(float), tune.missing.to_numpy(float))
        score = logistic_score((mean, std, w), report[columns].to_numpy(float))
        low, high = prompt_bootstrap(report.assign(s=score), "s")
        steps[str(k)] = {"mean": mean.tolist(), "std": std.tolist(), "weights": w.tolist(),
                         "auc_tune_cv": grouped_cv_auc(tune, columns), "auc_report": auc(score, report.missing),
                         "auc_report_ci95": [low, high]}
        print(f"step {k}: AUC tune (5-fold CV over prompts) {steps[str(k)]['auc_tune_cv']:.3f}, "
              f"report {steps[str(k)]['auc_report']:.3f} [{low:.3f}, {high:.3f}]")
    model = {"features": list(ats.stats.NEGLECT_FEATURES), "steps": steps,
             "fitted_on": "attnscope shapes model, 20 steps, 66 two-object prompts x 8 seeds (studies/early_warning.py, "
                          "tuning split); targets: the two object phrases",
             "missing_rate_tune": float(tune.missing.mean())}
    assert model["features"] == list(FEATURES)
    model_path.write_text(json.dumps(model, indent=1) + "\n")
    # the shipped function recomputes the study's features from the traces: check it on a few report runs
    cat = ats.open_catalog(root / "report")
    for run in cat.df.run[:5]:
        tr = cat.trace(run)
        f = ats.stats.neglect_features(tr, object_phrases(tr.manifest["run"]["prompts"][0]), step=5)
        for name in FEATURES:
            assert abs(float(f[name][0]) - report.loc[run, f"{name}[mean]@5"]) < 1e-9, (run, name)
    print(f"model -> {model_path}")
    return model


def policy(root: Path, step: int = 5, flagged: float = 0.4, batch: int = 16, limit: int | None = None) -> dict:
    """Selective vs always-on Attention Regulation on the report split's prompts and seeds.

    The threshold is fixed on the tuning split before anything is regulated: the risk (shipped model,
    decision step ``step``) above which ``flagged`` of the tuning generations fall. Three conditions on
    the same batches: plain, regulation always on (the default schedule, steps 0-9), and regulation
    ``when=risk_above(θ, step=step)`` (nothing until the decision, then steps step+1..9 for the
    samples at risk). Each image is scored by the shapes detector."""
    import json
    import time

    import numpy as np
    import pandas as pd
    import torch

    import attnscope as ats
    from attnscope.models import object_nouns, object_phrases, score_image

    tune = wide(pd.read_parquet(root / "features-tune.parquet"), False)
    x = tune[[f"{f}[mean]@{step}" for f in FEATURES]].to_numpy(float)
    z = logistic_score(_model_at(step), x)
    threshold = float(np.quantile(1 / (1 + np.exp(-z)), 1 - flagged))
    runs = ats.open_catalog(root / "report").df.sort_values(["prompt", "seed"])
    runs = runs.head(limit) if limit else runs
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    conditions = {
        "plain": lambda: [],
        "always": lambda: [ats.regulate.AttentionRegulation(object_nouns)],
        "selective": lambda: [ats.regulate.AttentionRegulation(
            object_nouns, when=ats.regulate.risk_above(threshold, step=step, targets=object_phrases))],
    }
    rows, seconds = [], dict.fromkeys(conditions, 0.0)
    for start in range(0, len(runs), batch):
        part = runs.iloc[start:start + batch]
        prompts, seeds = part.prompt.tolist(), part.seed.tolist()
        out = {}
        for name, make in conditions.items():
            clients = make()
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
            t = time.perf_counter()
            with ats.hooks(pipe, *clients):
                images = pipe(prompts, generator=generators, num_inference_steps=STEPS).images
            seconds[name] += time.perf_counter() - t
            out[name] = [score_image(p, im) for p, im in zip(prompts, images)]
            if name == "selective":
                gate = clients[0].when
                out["risk"], out["at_risk"] = gate.risk, gate.at_risk
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            row = {"prompt": prompt, "seed": seed, "kind": out["plain"][i]["kind"], "risk": out["risk"][i],
                   "at_risk": out["at_risk"][i]}
            for name in conditions:
                for metric in ("all_present", "exact", "extra"):
                    row[f"{name}_{metric}"] = out[name][i][metric]
            rows.append(row)
        print(f"{len(rows)}/{len(runs)} runs", flush=True)
    df = pd.DataFrame(rows)
    df.to_parquet(root / f"policy-step{step}.parquet")
    meta = {"threshold": threshold, "flagged_on_tune": flagged, "decision_step": step, "seconds": seconds}
    (root / f"policy-step{step}-meta.json").write_text(json.dumps(meta, indent=1))
    return summarise_policy(root, step)


def regulated_outcomes(root: Path, split: str, batch: int = 16) -> pd.DataFrame:
    """Plain and always-on regulated outcomes of every run of ``split``, in batches of ``batch`` (cached)."""
    import pandas as pd
    import torch

    import attnscope as ats
    from attnscope.models import object_nouns, score_image

    path = root / f"regulated-{split}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    runs = ats.open_catalog(root / split).df.sort_values(["prompt", "seed"])
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for start in range(0, len(runs), batch):
        part = runs.iloc[start:start + batch]
        out = {}
        for name, clients in (("plain", []), ("always", [ats.regulate.AttentionRegulation(object_nouns)])):
            generators = [torch.Generator().manual_seed(int(s)) for s in part.seed]
            with ats.hooks(pipe, *clients):
                images = pipe(part.prompt.tolist(), generator=generators, num_inference_steps=STEPS).images
            out[name] = [score_image(p, im)["all_present"] for p, im in zip(part.prompt, images)]
        rows += [{"run": r, "plain": a, "always": b} for r, a, b in zip(part.run, out["plain"], out["always"])]
        print(f"{split}: {len(rows)}/{len(runs)}", flush=True)
    df = pd.DataFrame(rows)
    df.to_parquet(path)
    return df


def tune_threshold(root: Path, step: int = 5, keep: float = 0.85) -> dict:
    """Choose θ on the tuning half: the largest risk threshold whose rerun policy keeps ``keep`` of the
    always-on gain there (regulating the tuning runs once, plain and always on); then score it on the
    report half's policy runs (the ``policy`` stage's). The tuning runs' risks are out-of-fold (5 folds
    over prompts): the shipped model was fitted on them, and its in-sample risks are too confident."""
    import json

    import numpy as np
    import pandas as pd

    tune = wide(pd.read_parquet(root / "features-tune.parquet"), False)
    columns = [f"{f}[mean]@{step}" for f in FEATURES]
    tune["risk"] = 1 / (1 + np.exp(-out_of_fold_scores(tune, columns)))
    outcomes = regulated_outcomes(root, "tune").set_index("run").join(tune["risk"])
    gain = outcomes.always.mean() - outcomes.plain.mean()

    def kept(df, theta):
        chosen = np.where(df.risk > theta, df.always, df.plain)
        return _share(chosen.mean() - df.plain.mean(), df.always.mean() - df.plain.mean())

    if not gain > 0:
        raise SystemExit(f"threshold: always-on regulation gains {gain:+.3f} on the tuning runs; no threshold keeps "
                         f"{keep:.0%} of a gain (too few runs? see --n-prompts)")
    candidates = np.unique(outcomes.risk.round(4))
    theta = float(max(t for t in candidates if kept(outcomes, t) >= keep))
    report = pd.read_parquet(root / f"policy-step{step}.parquet")
    report = report.rename(columns={"plain_all_present": "plain", "always_all_present": "always"})
    at = report.risk > theta
    chosen = np.where(at, report.always, report.plain)
    summary = {"keep_on_tune": keep, "threshold": theta, "tune_gain": float(gain),
               "tune_flagged": float((outcomes.risk > theta).mean()),
               "report_flagged": float(at.mean()), "report_kept": float(kept(report, theta)),
               "report_gain": float(chosen.mean() - report.plain.mean()),
               "report_fixed": int((~report.plain & chosen).sum()), "report_broken": int((report.plain & ~chosen).sum()),
               "report_exact": float(np.where(at, report.always_exact, report.plain_exact).mean())}
    (root / f"threshold-step{step}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


FRESH_SEEDS = "200-207"  # image seeds no stage before ``rank`` generated: the rank rule is scored on these only
OLD_THRESHOLD = 0.19275  # the absolute θ the ``policy`` stage fixed on the tuning half (40 % of its runs above)


def rank_policy(root: Path, flag: float = 0.4, step: int = 5, batch: int = 16, limit: int | None = None,
                seeds: str = FRESH_SEEDS) -> dict:
    """The rank rule, scored on fresh generations: rerun the riskiest ``flag`` of a sweep with regulation.

    The absolute threshold of ``policy`` did not transfer between prompt halves (the risk's level
    shifts), so this rule ranks the runs of the sweep at hand instead: ``θ = ats.stats.risk_threshold
    (risks, flag)``. ``flag`` = 0.4 is the share the ``policy`` stage fixed on the tuning half before
    anything was regulated; it is not re-tuned here. Because the report half's policy runs (seeds
    100-107) have been looked at, the rule is scored on new generations: the report half's prompts
    (never used for fitting) with image seeds 200-207, never generated before.

    Three passes per batch of ``batch``: plain (timed), the risk at ``step`` computed live by a gate
    that acts on no sample (``risk_above(1.0)`` under ``exact=True``: its images are checked
    bit-identical to plain), and regulation always on (timed). A rerun of a flagged run is its
    always-on image (a sample's regulated image does not depend on its batch).

    Which seeds answer what (2026-12-04): seeds 200-207 scored ``flag`` = 0.4 (71.6 % of the gain kept)
    and were then used to choose ``flag`` = 0.5, the smallest share in steps of 0.05 keeping ≥ 85 % of
    the gain there; seeds 300-307 (``--seeds 300-307 --flagged 0.5``) only score that choice."""
    import json
    import time

    import numpy as np
    import pandas as pd
    import torch

    import attnscope as ats
    from attnscope.models import object_nouns, object_phrases, prompt_kind, score_image
    from attnscope.sweep import parse_seeds

    runs = [(p, s) for p in sorted(split_prompts()["report"]) for s in parse_seeds(seeds)]
    runs = runs[:limit] if limit else runs
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    rows, seconds = [], {"plain": 0.0, "always": 0.0}
    for start in range(0, len(runs), batch):
        part = runs[start:start + batch]
        prompts, part_seeds = [p for p, _ in part], [s for _, s in part]

        def generate(clients, exact=False, prompts=prompts, part_seeds=part_seeds):
            generators = [torch.Generator().manual_seed(int(s)) for s in part_seeds]
            t = time.perf_counter()
            with ats.hooks(pipe, *clients, exact=exact):
                images = pipe(prompts, generator=generators, num_inference_steps=STEPS).images
            return images, time.perf_counter() - t

        plain, dt = generate([], exact=True)
        seconds["plain"] += dt
        watch = ats.regulate.AttentionRegulation(object_nouns, when=ats.regulate.risk_above(1.0, step=step,
                                                                                             targets=object_phrases))
        watched, _ = generate([watch], exact=True)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(watched, plain)), \
            "the watching gate changed a plain image"
        always, dt = generate([ats.regulate.AttentionRegulation(object_nouns)])
        seconds["always"] += dt
        for i, (prompt, seed) in enumerate(part):
            row = {"prompt": prompt, "seed": seed, "kind": prompt_kind(prompt), "risk": watch.when.risk[i]}
            for name, images in (("plain", plain), ("always", always)):
                scored = score_image(prompt, images[i])
                for metric in ("all_present", "exact", "extra"):
                    row[f"{name}_{metric}"] = scored[metric]
            rows.append(row)
        print(f"{len(rows)}/{len(runs)} runs", flush=True)
    df = pd.DataFrame(rows)
    df.to_parquet(root / f"rank-policy-{seeds}.parquet")
    theta = ats.stats.risk_threshold(df.risk, flag)
    summary = {"runs": len(df), "seeds": seeds, "flag": flag, "prompts": "report half", "decision_step": step,
               "seconds": seconds, "time_always_vs_plain": seconds["always"] / seconds["plain"],
               "plain": _rates(df, "plain"), "always": _rates(df, "always"),
               "always_vs_plain": _versus(df, "always")}
    gain = summary["always_vs_plain"]["all_present_gain"]
    for label, threshold in ((f"rank top {flag:.0%}", theta), (f"absolute theta {OLD_THRESHOLD}", OLD_THRESHOLD)):
        at = df.risk > threshold
        for metric in ("all_present", "exact", "extra"):
            df[f"rerun_{metric}"] = np.where(at, df[f"always_{metric}"], df[f"plain_{metric}"])
        versus = _versus(df, "rerun")
        summary[label] = {"threshold": float(threshold), "flagged": float(at.mean()),
                          "recall_of_missing": float(at[~df.plain_all_present].mean()),
                          **_rates(df, "rerun"), **versus, "kept_share_of_gain": _share(versus["all_present_gain"], gain),
                          "compute_extra_vs_plain_sweep": float(at.mean()) * summary["time_always_vs_plain"]}
    summary["auc_on_fresh"] = ats.stats.roc_auc(df.risk, ~df.plain_all_present.astype(bool))
    (root / f"rank-policy-{seeds}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def _share(part: float, whole: float) -> float:
    """``part / whole``, NaN when always-on regulation gained nothing (a small trial run can have no missing object)."""
    return part / whole if whole else float("nan")


def _rates(df, name: str) -> dict:
    out = {m: float(df[f"{name}_{m}"].mean()) for m in ("all_present", "exact", "extra")}
    out["per_kind"] = {k: {m: round(float(g[f"{name}_{m}"].mean()), 4) for m in ("all_present", "exact")}
                       for k, g in df.groupby("kind")}
    return out


def _versus(df, name: str) -> dict:
    """Gains of ``name`` over plain (95 % CI: bootstrap over prompts), fixed and broken counts."""
    import numpy as np
    import pandas as pd

    groups = [g for _, g in df.groupby("prompt")]
    rng = np.random.default_rng(0)
    diffs = {"all_present": [], "exact": []}
    for _ in range(1000):
        sample = pd.concat([groups[i] for i in rng.integers(len(groups), size=len(groups))])
        for m in diffs:
            diffs[m].append(sample[f"{name}_{m}"].mean() - sample[f"plain_{m}"].mean())
    plain, other = df.plain_all_present.astype(bool), df[f"{name}_all_present"].astype(bool)
    return {"all_present_gain": float(other.mean() - plain.mean()),
            "all_present_gain_ci95": [float(np.percentile(diffs["all_present"], q)) for q in (2.5, 97.5)],
            "exact_gain": float(df[f"{name}_exact"].mean() - df.plain_exact.mean()),
            "exact_gain_ci95": [float(np.percentile(diffs["exact"], q)) for q in (2.5, 97.5)],
            "fixed": int((~plain & other).sum()), "broken": int((plain & ~other).sum())}


def _model_at(step: int):
    """The shipped risk model's (mean, std, weights) at ``step``, as :func:`logistic_score` takes them."""
    import numpy as np

    import attnscope as ats

    m = ats.stats.neglect_model()["steps"][str(step)]
    return np.asarray(m["mean"]), np.asarray(m["std"]), np.asarray(m["weights"])


def summarise_policy(root: Path, step: int = 5) -> dict:
    """Rates, gains (bootstrap CI over prompts), fixed/broken counts and cost of each policy.

    ``live``: the gate decides during the run at ``step`` and regulates steps step+1..9 of the samples
    at risk (measured). ``rerun``: the plain run's risk at ``step`` decides, and the samples at risk are
    regenerated with the whole regulation (``ats.rerun`` of a sweep's traces with ``when=risk_above``):
    its images are the always-on images of the samples at risk and the plain images of the others
    (a sample's regulated image does not depend on its batch), so it is read off the same runs."""
    import json

    import numpy as np
    import pandas as pd

    df = pd.read_parquet(root / f"policy-step{step}.parquet")
    meta = json.loads((root / f"policy-step{step}-meta.json").read_text())
    for metric in ("all_present", "exact", "extra"):
        df[f"rerun_{metric}"] = np.where(df.at_risk, df[f"always_{metric}"], df[f"plain_{metric}"])
    df = df.rename(columns={c: c.replace("selective_", "live_") for c in df.columns})
    groups = [g for _, g in df.groupby("prompt")]

    def diff_ci(name: str, metric: str) -> list[float]:
        rng = np.random.default_rng(0)
        values = []
        for _ in range(1000):
            sample = pd.concat([groups[i] for i in rng.integers(len(groups), size=len(groups))])
            values.append(sample[f"{name}_{metric}"].mean() - sample[f"plain_{metric}"].mean())
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    seconds = meta["seconds"]
    flagged_share = float(df.at_risk.mean())
    summary = {**meta, "runs": len(df), "flagged_on_report": flagged_share,
               "recall_of_missing": float(df.loc[~df.plain_all_present, "at_risk"].mean()),
               "time_vs_plain": {"always": seconds["always"] / seconds["plain"], "live": seconds["selective"] / seconds["plain"],
                                 "rerun_extra": flagged_share * seconds["always"] / seconds["plain"]}}
    for name in ("plain", "always", "live", "rerun"):
        summary[name] = {m: float(df[f"{name}_{m}"].mean()) for m in ("all_present", "exact", "extra")}
        summary[name]["per_kind_all_present"] = df.groupby("kind")[f"{name}_all_present"].mean().round(4).to_dict()
    for name in ("always", "live", "rerun"):
        summary[f"{name}_vs_plain"] = {
            "all_present_gain": summary[name]["all_present"] - summary["plain"]["all_present"],
            "all_present_gain_ci95": diff_ci(name, "all_present"),
            "exact_gain": summary[name]["exact"] - summary["plain"]["exact"], "exact_gain_ci95": diff_ci(name, "exact"),
            "fixed": int((~df.plain_all_present & df[f"{name}_all_present"]).sum()),
            "broken": int((df.plain_all_present & ~df[f"{name}_all_present"]).sum())}
    gain = summary["always_vs_plain"]["all_present_gain"]
    summary["kept_share_of_gain"] = {n: _share(summary[f"{n}_vs_plain"]["all_present_gain"], gain) for n in ("live", "rerun")}
    (root / f"policy-step{step}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["capture", "features", "analyse", "fit", "policy", "policy-summary",
                                          "threshold", "rank"])
    parser.add_argument("--root", type=Path, default=Path("runs/early-warning"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-prompts", type=int, default=None, help="only the first N prompts of each half")
    parser.add_argument("--step", type=int, default=5, help="policy: the decision step")
    parser.add_argument("--flagged", type=float, default=0.4, help="policy: share of tuning runs above the threshold")
    parser.add_argument("--limit", type=int, default=None, help="policy: only the first N report runs")
    parser.add_argument("--seeds", default=FRESH_SEEDS, help="rank: the image seeds of the report prompts")
    parser.add_argument("--model-out", type=Path, default=MODEL_PATH,
                        help="fit: where to write the fitted model (default: the shipped "
                             "attnscope/stats/neglect_risk.json; give another path for a trial run)")
    args = parser.parse_args()
    if args.stage == "capture":
        capture(args.root, args.workers, args.n_prompts)
    elif args.stage == "features":
        features(args.root)
    elif args.stage == "analyse":
        analyse(args.root)
    elif args.stage == "fit":
        fit(args.root, args.model_out)
    elif args.stage == "policy":
        policy(args.root, step=args.step, flagged=args.flagged, limit=args.limit)
    elif args.stage == "rank":
        rank_policy(args.root, flag=args.flagged, step=args.step, limit=args.limit, seeds=args.seeds)
    elif args.stage == "threshold":
        tune_threshold(args.root, step=args.step)
    else:
        summarise_policy(args.root, step=args.step)


if __name__ == "__main__":
    main()

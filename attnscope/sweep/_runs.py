"""One run of a sweep: capture its trace, save its image, score it, and write its catalog row last."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

from ..errors import AttnscopeError
from ._folder import SweepFolder, root_attributes
from ._plan import Run

__all__ = ["BASE_COLUMNS", "RESERVED_COLUMNS", "execute_run", "failed_row", "model_hash"]

#: columns every row has
BASE_COLUMNS = ("run", "prompt", "seed", "trace", "image", "status", "error", "model", "model_hash", "steps",
                "seconds", "worker", "finished", "trace_id")
#: columns of the catalog's own; a user's ``extra`` scalars may not reuse these names
RESERVED_COLUMNS = (*BASE_COLUMNS, "kind", "expected", "detected", "present", "all_present", "exact", "extra",
                    "n_detected")


def model_hash(fingerprint: dict[str, str]) -> str:
    """A short hash of a manifest's ``weights_fingerprint`` (one value per model, for the catalog).

    >>> h = model_hash({"unet": "ab", "vae": "cd"})
    >>> len(h), h == model_hash({"vae": "cd", "unet": "ab"})
    (16, True)
    """
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _base_row(run: Run, worker: str) -> dict[str, Any]:
    return {"run": run.run, "prompt": run.prompt, "seed": run.seed, "trace": run.trace, "image": None,
            "status": "failed", "error": None, "model": None, "model_hash": None, "steps": None, "seconds": None,
            "worker": worker, "finished": None, "trace_id": None}


def failed_row(run: Run, worker: str, error: str) -> dict[str, Any]:
    """The row of a run that did not finish (it is redone when the sweep is resumed)."""
    row = _base_row(run, worker)
    row["error"] = error
    return row


def _detector_columns(prompt: str, image: Any) -> dict[str, Any]:
    from ..models import score_image

    scored = score_image(prompt, image)
    return {"kind": scored["kind"], "expected": scored["expected"],
            "detected": [f"{d['colour']} {d['shape']}" for d in scored["detected"]],
            "present": scored["present"], "all_present": scored["all_present"], "exact": scored["exact"],
            "extra": scored["extra"], "n_detected": len(scored["detected"])}


def _extra_columns(extra: Callable[[Any], Any], trace: Any, run: Run) -> dict[str, Any]:
    try:
        values = extra(trace)
    except Exception as exc:  # noqa: BLE001 - the user's function: any error fails this run, not the sweep
        raise AttnscopeError(f"extra={getattr(extra, '__name__', extra)!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(values, dict):
        raise AttnscopeError(f"extra={extra!r} returned {type(values).__name__} for run {run.run!r}: "
                             f"expected a dict of column name -> scalar")
    for key, value in values.items():
        if not isinstance(key, str) or key in RESERVED_COLUMNS:
            raise AttnscopeError(f"extra column {key!r}: expected a string that is not one of the catalog's own "
                                 f"columns ({', '.join(RESERVED_COLUMNS)})")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            try:
                value = getattr(value, "item", lambda v=value: v)()  # numpy / torch scalars (an array of one value too)
            except (ValueError, RuntimeError):  # an array of several values: the check below names the column
                pass
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise AttnscopeError(f"extra column {key!r} = {value!r}: expected a scalar (bool, int, float, str or None)")
        values[key] = value if not (isinstance(value, float) and math.isnan(value)) else None
    return values


def execute_run(pipe: Any, run: Run, folder: SweepFolder, capture_kwargs: dict[str, Any],
                extra: Callable[[Any], Any] | None, worker: str, detector: bool) -> dict[str, Any]:
    """Capture ``run`` with ``pipe`` into ``folder`` and return its row; the row file is written last.

    An exception inside the run gives a ``failed`` row (written too, so the catalog shows the error);
    an interrupt or a kill leaves no row, and either way the run is redone on resume.
    """
    from ..capture import capture

    start = time.perf_counter()
    row = _base_row(run, worker)
    try:
        folder.clear_staged(run.trace)
        tr = capture(pipe, run.prompt, seed=run.seed, store=folder.staging_path(run.trace), overwrite=True,
                     **capture_kwargs)
        images = tr.images
        if images:
            folder.write_png(run.image, images[0])
            row["image"] = run.image
        manifest = tr.manifest
        # the capture's own id (the root attribute ``run_id``): a trace another capture writes there later is not this run's
        row["trace_id"] = (root_attributes(folder.staging_path(run.trace)) or {}).get("run_id")
        row.update(model=manifest["model"].get("reference"),
                   model_hash=model_hash(manifest["model"].get("weights_fingerprint", {})),
                   steps=manifest["run"].get("num_inference_steps"))
        if detector and images:
            row.update(_detector_columns(run.prompt, images[0]))
        if extra is not None:
            row.update(_extra_columns(extra, tr, run))
        folder.publish_trace(run.trace)
        row["status"] = "complete"
    except Exception as exc:  # noqa: BLE001 - any error inside the run fails this run, not the sweep
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - start, 4)
    row["finished"] = round(time.time(), 3)  # Unix time: with ``seconds``, when the run ran
    folder.write_json(run.row, row)
    return row

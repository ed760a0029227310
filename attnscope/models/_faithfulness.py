"""Heat-map faithfulness on the shapes model: does a word's heat map sit on the object the detector finds?"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..stats import box_iou
from .shapes import detect, parse_prompt

__all__ = ["heatmap_iou"]


def heatmap_iou(trace: Any, *, threshold: float = 0.4, sites: Any = None, steps: Any = None) -> Any:
    """Per sample and object of the prompt: the IoU of its word's heat map with the box of the object the detector finds.

    The DAAM-style check on a model where the truth is known: each object's noun (``"circle"``; the
    colour and noun, ``"red circle"``, when the noun is in the prompt twice) gets its heat map
    (:func:`attnscope.plot.word_maps`: heads and steps averaged, each site upsampled to the image,
    sites averaged), binarised at ``threshold · its max`` and compared with the box of the first
    detection of that colour and shape not already taken by an earlier object of the prompt
    (:func:`attnscope.stats.box_iou`; as ``attnscope eval`` counts, "a red circle and a red circle" needs two
    red circles). An object the detector does not find gets ``detected=False`` and NaN.

    Returns
    -------
    pandas.DataFrame
        Columns ``sample``, ``prompt``, ``object``, ``word``, ``detected``, ``iou``.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.models import heatmap_iou
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=8)
    >>> heatmap_iou(tr)[["object", "word", "detected"]].values.tolist()
    [['red circle', 'circle', True], ['blue square', 'square', True]]
    """
    import pandas as pd

    from ..plot import word_maps  # plotting loads on first use, not with import attnscope

    run = trace.manifest.get("run") if isinstance(trace.manifest.get("run"), dict) else {}
    prompts, per_prompt = run.get("prompts"), run.get("num_images_per_prompt") or 1
    images = trace.images
    if not prompts or not images:
        raise AttnscopeError(f"trace {str(getattr(trace, 'path', trace))!r}: heatmap_iou needs the run's prompts and "
                             f"images (a trace written by attnscope.capture with images)")
    rows = []
    for sample, image in enumerate(images):
        prompt = prompts[sample // per_prompt]
        objects, _ = parse_prompt(prompt)
        remaining = detect(image)  # each detection is matched to one object at most
        nouns = [shape for _, shape in objects]
        for colour, shape in objects:
            word = shape if nouns.count(shape) == 1 else f"{colour} {shape}"
            hit = next((o for o in remaining if (o.colour, o.shape) == (colour, shape)), None)
            iou = np.nan
            if hit is not None:
                remaining.remove(hit)
                heat = word_maps(trace, [word], sites, steps, sample).values[0]
                iou = float(box_iou(heat, hit.box, threshold))
            rows.append({"sample": sample, "prompt": prompt, "object": f"{colour} {shape}", "word": word,
                         "detected": hit is not None, "iou": iou})
    return pd.DataFrame(rows, columns=["sample", "prompt", "object", "word", "detected", "iou"])

"""What gets hooked: ``load_pipeline``, the embedded shapes model, and its evaluation and demo.

``load_pipeline`` loads the embedded model, a local diffusers directory or a cached hub id (never
the network). The shapes world's detector makes object presence a fidelity metric: ``evaluate``
is ``attnscope eval``, ``run_demo`` is ``attnscope demo``.

>>> import attnscope as ats
>>> ats.load_pipeline is load_pipeline, ats.shapes is shapes
(True, True)
"""

from . import shapes
from ._demo import run_demo
from ._evaluation import (
           INTERVENTIONS,
           PROMPT_KINDS,
           PROMPT_SETS,
           eval_prompts,
           evaluate,
           format_paired,
           format_report,
           named_interventions,
           object_nouns,
           object_phrases,
           paired_differences,
           prompt_kind,
           score_image,
)
from ._faithfulness import heatmap_iou
from ._loading import load_pipeline

__all__ = ["INTERVENTIONS", "PROMPT_KINDS", "PROMPT_SETS", "eval_prompts", "evaluate", "format_paired", "format_report",
           "heatmap_iou",
           "load_pipeline", "named_interventions", "object_nouns", "object_phrases", "paired_differences",
           "prompt_kind", "run_demo", "score_image", "shapes"]

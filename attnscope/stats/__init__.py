"""Numbers from traces: attention-dominance statistics, convergence, and the ``.attn`` xarray accessor.

``ats.stats.dominance`` (definitions in docs/analysis.md), ``ats.stats.convergence`` and
``ats.stats.suggest_gate_step``, ``ats.stats.region_share`` (attention inside a layout's regions), ``ats.stats.map_shape``
(concentration, centre, spread and overlap of targets' maps), ``ats.stats.neglect_risk`` (an early warning of
a missing object from one early step's maps; ``fit_neglect_model`` fits one, ``risk_threshold``
flags the riskiest share of a sweep, ``roc_auc`` scores it),
text/JSON reports, one formula function per statistic, and the upsampling that heat maps use.
Importing this package registers ``DataArray.attn``. It reads traces through ``attnscope.store``
and never imports the hook core.

>>> import attnscope as ats
>>> ats.stats.dominance, ats.stats.convergence  # doctest: +ELLIPSIS
(<function dominance at ...>, <function convergence at ...>)
"""

from . import _accessor  # noqa: F401  (registers the `.attn` xarray accessor)
from ._convergence import convergence, stable_step, suggest_gate_step
from ._dominance import dominance
from ._formulas import argmax_coverage, dominance_ratio, entropy, gini, map_sums, mass_share, sink_share, target_share
from ._regions import layout_regions, layout_tokens, region_mask, region_share
from ._reports import convergence_table, dominance_json, dominance_table
from ._risk import NEGLECT_FEATURES, check_neglect_model, neglect_features, neglect_model, neglect_risk
from ._risk_fit import fit_neglect_model, risk_threshold, roc_auc
from ._shape import box_iou, centre_of_mass, histogram_intersection, map_shape, peak_to_mean, spread, top_share
from ._upsample import image_size, upsample_maps

__all__ = ["NEGLECT_FEATURES", "argmax_coverage", "box_iou", "centre_of_mass", "check_neglect_model", "convergence", "convergence_table", "dominance", "dominance_json",
           "dominance_ratio", "dominance_table", "entropy", "fit_neglect_model", "gini", "histogram_intersection", "image_size", "layout_regions",
           "layout_tokens", "map_shape", "map_sums", "mass_share", "neglect_features", "neglect_model", "neglect_risk", "peak_to_mean", "region_mask", "region_share",
           "risk_threshold", "roc_auc", "sink_share", "spread", "stable_step", "suggest_gate_step", "target_share", "top_share", "upsample_maps"]

"""Many runs: ``sweep`` (one trace per prompt × seed, resumable, on worker processes), the Parquet
catalog of a sweep (``open_catalog``, :class:`Catalog`) and ``map_stats`` (a per-trace reduction over
every run on dask.distributed); the early warning over a sweep (``fit_neglect_risk``, ``NeglectRiskRow``).

>>> import attnscope as ats
>>> ats.sweep is sweep, ats.open_catalog is open_catalog
(True, True)
"""

from ._catalog import Catalog, open_catalog
from ._distributed import map_stats
from ._plan import Run, parse_seeds, plan_runs, read_prompts, run_id
from ._risk import NeglectFeatureRows, NeglectRiskRow, fit_neglect_risk
from ._summaries import DominanceRow
from ._sweep import sweep

__all__ = ["Catalog", "DominanceRow", "NeglectFeatureRows", "NeglectRiskRow", "Run", "fit_neglect_risk", "map_stats", "open_catalog", "parse_seeds", "plan_runs", "read_prompts", "run_id", "sweep"]

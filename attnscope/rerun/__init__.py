"""On top of capture: regenerate a trace exactly, with interventions, compare two traces, and report on them.

>>> import attnscope as ats
>>> ats.rerun is rerun, ats.compare is compare, ats.Comparison is Comparison, ats.report is report
(True, True, True, True)
"""

from ._compare import Comparison, compare
from ._report import report
from ._rerun import CAPTURE_OPTIONS, manifest_sha256, rerun

__all__ = ["CAPTURE_OPTIONS", "Comparison", "compare", "manifest_sha256", "report", "rerun"]

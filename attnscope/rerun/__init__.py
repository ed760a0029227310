"""On top of capture: regenerate a trace exactly, with interventions, and compare two traces.

>>> import attnscope as ats
>>> ats.rerun is rerun, ats.compare is compare, ats.Comparison is Comparison
(True, True, True)
"""

from ._compare import Comparison, compare
from ._rerun import CAPTURE_OPTIONS, manifest_sha256, rerun

__all__ = ["CAPTURE_OPTIONS", "Comparison", "compare", "manifest_sha256", "rerun"]

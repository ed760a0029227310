"""attnscope: see and steer what text-to-image diffusion models attend to.

The public API (see docs/index.md). The packages follow the data flow: ``models`` (what gets
hooked) → ``hooks`` (interception) → ``capture`` → ``store`` → ``stats`` → ``plot``, and
``hooks`` → ``regulate`` (interventions) → ``rerun`` (reproduce and compare); ``sweep`` runs many
captures and analyses them together.

>>> import attnscope as ats
>>> ats.capture, ats.open_trace, ats.hooks  # doctest: +ELLIPSIS
(<function capture at ...>, <function open_trace at ...>, <function hooks at ...>)
>>> ats.shapes.detect  # the embedded model's world and detector  # doctest: +ELLIPSIS
<function detect at ...>
"""

from . import plot, regulate, stats
from ._lazy import lazy_exports
from .capture import Recorder, capture
from .errors import AttnscopeError, AttnscopeWarning
from .hooks import (
    STAGES,
    CallContext,
    CrossAttentionSite,
    HookClient,
    HookSession,
    RowLayout,
    StepContext,
    discover_sites,
    hooks,
)
from .models import load_pipeline, shapes
from .rerun import Comparison, compare, report, rerun
from .store import Trace, open_trace
from .sweep import Catalog, open_catalog, sweep

__all__ = [
    "AttnscopeError", "AttnscopeWarning", "CallContext", "Catalog", "Comparison", "CrossAttentionSite", "HookClient", "HookSession", "Recorder",
    "RowLayout", "STAGES", "StepContext", "Trace", "capture", "compare", "discover_sites", "hooks", "load_pipeline",
    "open_catalog", "open_trace", "plot", "regulate", "report", "rerun", "shapes", "stats", "sweep", "view",
]
__version__ = "0.1.0"

# ats.view: the Jupyter viewer (anywidget, matplotlib) is imported on first use
__getattr__, _dir = lazy_exports(__name__, {"view": ".plot._view"}, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *_dir()})

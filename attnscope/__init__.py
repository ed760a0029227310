"""attnscope: see and steer what text-to-image diffusion models attend to.

The public API (see docs/index.md):

>>> import attnscope as ats
>>> ats.capture, ats.open_trace, ats.hooks  # doctest: +ELLIPSIS
(<function capture at ...>, <function open_trace at ...>, <function hooks at ...>)
>>> ats.shapes.detect  # the embedded model's world and detector  # doctest: +ELLIPSIS
<function detect at ...>
"""

from . import accessor as accessor  # registers the `.attn` xarray accessor
from . import plot, regulate, shapes, stats
from .comparison import compare
from .context import CallContext, RowLayout, StepContext
from .errors import AttnscopeError
from .hook_core import STAGES, HookSession, hooks
from .pipeline import load_pipeline
from .recording import Recorder, capture
from .reruns import rerun
from .sites import CrossAttentionSite, discover_sites
from .trace import Trace, open_trace

__all__ = [
    "AttnscopeError", "CallContext", "CrossAttentionSite", "HookSession", "Recorder", "RowLayout", "STAGES",
    "StepContext", "Trace", "capture", "compare", "discover_sites", "hooks", "load_pipeline", "open_trace", "plot",
    "regulate", "rerun", "shapes", "stats",
]
__version__ = "0.1.0"

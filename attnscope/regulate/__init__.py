"""Interventions on cross-attention, all clients of the one hook API (``ats.hooks``).

Attention Regulation (seed 000), spatial-temporal control (seed 001), TGATE (seed 002), the
prompt-to-prompt reweighting baseline and the Attend-and-Excite baseline (which moves the latent);
the objectives SpatialTemporal's λ optimisation minimises (:class:`AttentionObjective`,
:class:`ClipObjective`, or yours: see :mod:`._objectives`' docstring); :func:`risk_above` gates an
intervention to the generations an early-warning risk flags; :class:`InterventionScope` is where
and when an intervention acts, shared by all of them. This package uses the hook core only through
``attnscope.hooks``' public names.

>>> import attnscope as ats
>>> sorted(ats.regulate.__all__)  # doctest: +NORMALIZE_WHITESPACE
['AttendAndExcite', 'AttentionObjective', 'AttentionRegulation', 'ClipObjective', 'InterventionScope', 'Reweight',
 'RiskGate', 'SampledRun', 'SpatialTemporal', 'TGate', 'default_regulation_sites', 'excite_loss', 'gaussian_basis',
 'layout_from_prompt', 'region_mask', 'regulation_loss', 'risk_above', 'smoothing_kernel']
"""

from ._basis import gaussian_basis
from ._excite import AttendAndExcite, excite_loss, smoothing_kernel
from ._gate import RiskGate, risk_above
from ._layout import layout_from_prompt, region_mask
from ._objectives import AttentionObjective, ClipObjective, SampledRun
from ._regulation import AttentionRegulation, regulation_loss
from ._reweight import Reweight
from ._scope import InterventionScope, default_regulation_sites
from ._spatial import SpatialTemporal
from ._tgate import TGate

__all__ = ["AttendAndExcite", "AttentionObjective", "AttentionRegulation", "ClipObjective", "InterventionScope", "Reweight", "RiskGate",
           "SampledRun", "SpatialTemporal", "TGate", "default_regulation_sites", "gaussian_basis", "layout_from_prompt",
           "region_mask", "regulation_loss", "risk_above", "excite_loss", "smoothing_kernel"]

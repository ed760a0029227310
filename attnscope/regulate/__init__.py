"""Interventions on cross-attention, all clients of the one hook API (``ats.hooks``).

>>> import attnscope as ats
>>> sorted(ats.regulate.__all__)
['AttentionRegulation', 'Reweight', 'TGate', 'default_regulation_sites', 'gaussian_basis', 'regulation_loss']
"""

from .attention_regulation import AttentionRegulation, regulation_loss
from .basis import gaussian_basis
from .reweight import Reweight
from .scope import default_regulation_sites
from .tgate import TGate

__all__ = ["AttentionRegulation", "Reweight", "TGate", "default_regulation_sites", "gaussian_basis", "regulation_loss"]

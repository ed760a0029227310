"""Interception: the one hook API every other part of attnscope is a client of.

``with ats.hooks(pipe, *clients):`` installs observers and interventions (objects following
:class:`HookClient`) on every cross-attention site of a diffusers pipeline. Sites are found per
model family by the adapters in :mod:`attnscope.hooks.families`. This package imports nothing of
capture, store, stats, plot, regulate or rerun: they build on it.

>>> import attnscope as ats
>>> ats.hooks is hooks, STAGES
(True, ('logits', 'probs', 'output'))
"""

from ._added_tokens import added_tokens
from ._cfg_batch import select_rows
from ._client import OPTIONAL_METHODS, ROLES, STAGES, HookClient, client_role, prepare_clients
from ._context import CallContext, RowLayout, StepContext
from ._core import HookSession, hooks
from ._discovery import discover_self_sites, discover_sites, find_adapter, find_denoiser, segment_name, text_segments
from ._sites import CrossAttentionSite

__all__ = ["CallContext", "CrossAttentionSite", "HookClient", "HookSession", "OPTIONAL_METHODS", "ROLES", "RowLayout", "STAGES",
           "StepContext", "added_tokens", "client_role", "discover_self_sites", "discover_sites", "find_adapter", "find_denoiser", "hooks",
           "prepare_clients", "segment_name", "select_rows", "text_segments"]

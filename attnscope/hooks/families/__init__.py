"""Model-family adapters: one module per denoiser family, each finding its denoiser and its sites.

An adapter module has ``FAMILY`` (its name, stored in each site), ``SUPPORTS`` (what it covers, for
error messages), ``denoiser(pipe)`` (the pipeline's denoiser when the family applies, else None) and
``sites(denoiser, cross=True)`` (its :class:`~attnscope.hooks.CrossAttentionSite` list in module
order; ``cross=False``: the self-attention modules). Add a family by adding a module and listing it
in :data:`ADAPTERS`.

>>> [adapter.FAMILY for adapter in ADAPTERS]
['unet']
"""

from . import unet

__all__ = ["ADAPTERS"]

#: The adapters, tried in this order.
ADAPTERS = (unet,)

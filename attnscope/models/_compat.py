"""Small accommodations of the diffusers versions attnscope supports, shared by the model loaders."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_loading"]


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence two notes a model load prints that say nothing about the user's code: diffusers' note that
    ``torch_dtype`` is renamed ``dtype`` (attnscope passes ``torch_dtype``, which every supported diffusers
    version reads; older ones do not know ``dtype``), and transformers' note that its image processors fall
    back to PIL without torchvision (attnscope's pipelines carry no image processor)."""
    fallback = logging.getLogger("transformers.utils.import_utils")
    level = fallback.level
    fallback.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
            yield
    finally:
        fallback.setLevel(level)

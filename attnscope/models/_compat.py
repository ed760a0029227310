"""Small accommodations of the diffusers versions attnscope supports, shared by the model loaders."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["quiet_dtype_deprecation"]


@contextlib.contextmanager
def quiet_dtype_deprecation() -> Iterator[None]:
    """Silence diffusers' note that ``torch_dtype`` is renamed ``dtype``: attnscope passes ``torch_dtype``,
    which every supported diffusers version reads (older ones do not know ``dtype``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        yield

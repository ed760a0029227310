"""The one error class attnscope raises for bad input and unusable state."""

from __future__ import annotations

__all__ = ["AttnscopeError"]


class AttnscopeError(ValueError):
    """Raised when an input cannot be used; the message names the input and what was expected.

    Examples
    --------
    >>> import attnscope as ats
    >>> try:
    ...     ats.open_trace("/nonexistent/run.zarr")
    ... except ats.AttnscopeError as e:
    ...     print("no trace")
    no trace
    """

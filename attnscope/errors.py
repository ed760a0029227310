"""The one error class attnscope raises for bad input and unusable state."""

from __future__ import annotations

__all__ = ["AttnscopeError", "AttnscopeWarning"]


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


class AttnscopeWarning(UserWarning):
    """Warned when a result can be used but is not what it seems: an incomplete trace, NaN maps, steps left out.

    Examples
    --------
    >>> import warnings
    >>> issubclass(AttnscopeWarning, UserWarning)
    True
    """

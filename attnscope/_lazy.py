"""Package exports imported on first use, so ``import attnscope`` stays light (PEP 562).

A package that defines its heavy exports in modules it should not import up front (matplotlib's
figures, diffusers' pipelines) declares where each name lives; the module is imported when the
name is first looked up, and the value is then kept in the package's namespace.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: Mapping[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names ``homes`` maps to relative module paths.

    >>> import json.encoder
    >>> namespace = {}
    >>> getattr_, dir_ = lazy_exports("json", {"JSONEncoder": ".encoder"}, namespace)
    >>> getattr_("JSONEncoder") is json.encoder.JSONEncoder, list(namespace), dir_()
    (True, ['JSONEncoder'], ['JSONEncoder'])
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, package), name)
        namespace[name] = value  # later lookups find it directly
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *homes})

    return __getattr__, __dir__

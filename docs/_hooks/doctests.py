"""A griffe extension: doctest examples in docstrings render as code, wherever they stand.

numpydoc puts examples under an ``Examples`` heading, but short docstrings carry them in their body; there
Markdown would read ``>>>`` as nested quotes and ``[0, 1]`` as a link. Each block of ``>>>`` / ``...``
lines and their output (up to a blank line) is fenced as ``pycon``.
"""

from __future__ import annotations

import griffe


def fence_doctests(text: str) -> str:
    """Wrap every doctest block of ``text`` (a docstring) in a ``pycon`` code fence.

    >>> print(fence_doctests("Sum.\\n\\n>>> 1 + 1\\n2\\n\\nEnd."))
    Sum.
    <BLANKLINE>
    ```pycon
    >>> 1 + 1
    2
    ```
    <BLANKLINE>
    End.
    """
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(">>>") and not (out and out[-1].lstrip().startswith("```")):
            indent = line[: len(line) - len(stripped)]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [f"{indent}```pycon", *block, f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class FenceDoctests(griffe.Extension):
    """Fence the doctest blocks of every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)

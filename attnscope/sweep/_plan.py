"""What a sweep runs: one :class:`Run` per (prompt, seed), named so that a rerun finds it again."""

from __future__ import annotations

import hashlib
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AttnscopeError
from ..selection import SEEDS, check_seed

__all__ = ["MAX_SEEDS", "Run", "parse_seeds", "plan_runs", "read_prompts", "run_id"]

#: the most seeds a sweep's seed text may list (a range beyond it is refused before it is listed)
MAX_SEEDS = 1_000_000


@dataclass(frozen=True)
class Run:
    """One generation of a sweep: a prompt, a seed and the name its files get under the sweep's folder."""

    run: str
    prompt: str
    seed: int

    @property
    def trace(self) -> str:
        """The trace's path relative to the sweep's folder."""
        return f"traces/{self.run}.zarr"

    @property
    def image(self) -> str:
        """The image's path relative to the sweep's folder."""
        return f"images/{self.run}.png"

    @property
    def row(self) -> str:
        """The run's catalog row (JSON, written once its trace is complete) relative to the sweep's folder."""
        return f"rows/{self.run}.json"


def run_id(prompt: str, seed: int) -> str:
    """The stable name of a (prompt, seed) run: the prompt's words, a hash of the whole prompt, and the seed.

    It depends on nothing else (not the prompt's place in the list), so a sweep extended with more
    prompts or seeds finds the runs it already has.

    >>> run_id("a red circle and a blue square", 7)
    'a-red-circle-and-a-blue-square-04cc8f0c-s7'
    """
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "prompt"
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return f"{slug}-{digest}-s{seed}"


def parse_seeds(spec: str | int | Iterable[int]) -> list[int]:
    """Seeds from ``"0-99"``, ``"0,3,7"``, ``"0-9,20-24"``, an int or a list of ints (numpy's too; each ≥ 0, no repeats).

    >>> parse_seeds("0-3,10"), parse_seeds(5), parse_seeds(range(2)), parse_seeds(np.arange(2))
    ([0, 1, 2, 3, 10], [5], [0, 1], [0, 1])
    >>> parse_seeds("3-1")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: seeds='3-1': expected ints or ranges A-B with A <= B, e.g. '0-99' or '0,3,7'
    >>> parse_seeds("0-99999999999999999999")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: seeds='0-99999999999999999999': expected at most 1000000 seeds, each from 0 to 2**64 - 1 (18446744073709551615), the seeds a torch.Generator takes
    """
    if isinstance(spec, bool):
        raise AttnscopeError(f"seeds={spec!r}: expected an int, a list of ints, or text like '0-99' or '0,3,7'")
    if isinstance(spec, numbers.Integral):
        seeds = [int(spec)]
    elif isinstance(spec, str):
        seeds = []
        for part in (p.strip() for p in spec.split(",")):
            match = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]+))?", part)  # ASCII digits: \d takes "٣" as 3
            if not match or (match[2] is not None and int(match[2]) < int(match[1])):
                raise AttnscopeError(f"seeds={spec!r}: expected ints or ranges A-B with A <= B, e.g. '0-99' or '0,3,7'")
            low, high = int(match[1]), int(match[2] or match[1])
            if high not in SEEDS or len(seeds) + high - low >= MAX_SEEDS:  # before a range too large to list
                raise AttnscopeError(f"seeds={spec!r}: expected at most {MAX_SEEDS} seeds, each from 0 to "
                                     f"2**64 - 1 ({SEEDS.stop - 1}), the seeds a torch.Generator takes")
            seeds.extend(range(low, high + 1))
    else:
        try:
            seeds = list(spec)
        except TypeError:
            raise AttnscopeError(f"seeds={spec!r}: expected an int, a list of ints, or text like '0-99'") from None
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_)) for s in seeds):
            raise AttnscopeError(f"seeds={spec!r}: expected ints")
        seeds = [int(s) for s in seeds]  # numpy's too: a row's seed is a plain int
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise AttnscopeError(f"seeds={spec!r}: expected at least one seed, all >= 0 and none repeated")
    for s in seeds:
        check_seed("seeds", s)
    return seeds


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line; blank lines and lines starting with ``#`` are skipped. A UTF-8 byte
    order mark at the start (Windows editors write one) is not part of the first line. A line ends at ``\\n``,
    ``\\r\\n`` or ``\\r`` only: a form feed or U+2028 inside a prompt stays in it.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "prompts.txt"
    >>> _ = f.write_text("# two objects\\na red circle and a blue square\\n\\na green triangle\\n")
    >>> read_prompts(f)
    ['a red circle and a blue square', 'a green triangle']
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AttnscopeError(f"prompts file {str(p)!r}: cannot be read as UTF-8 text ({exc})") from exc
    # lines end at \n, \r\n or \r only: str.splitlines() also splits at form feeds, U+2028, U+0085, … inside a prompt
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise AttnscopeError(f"prompts file {str(p)!r}: no prompts (expected one prompt per line)")
    return prompts


def plan_runs(prompts: Sequence[str], seeds: str | int | Iterable[int]) -> list[Run]:
    """Every (prompt, seed) pair, prompt-major: the runs of a sweep.

    >>> [(r.prompt, r.seed) for r in plan_runs(["a red circle", "a blue square"], "0-1")]
    [('a red circle', 0), ('a red circle', 1), ('a blue square', 0), ('a blue square', 1)]
    >>> plan_runs(["a red circle", "a red circle"], 0)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: prompts: 'a red circle' is listed twice; each prompt once (seeds give the repeats)
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise AttnscopeError(f"prompts={prompts!r}: expected a non-empty list of strings")
    seen: set[str] = set()
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise AttnscopeError(f"prompts: {p!r} is not a non-empty string")
        if p in seen:
            raise AttnscopeError(f"prompts: {p!r} is listed twice; each prompt once (seeds give the repeats)")
        seen.add(p)
    seed_list = parse_seeds(seeds)
    return [Run(run_id(p, s), p, s) for p in prompts for s in seed_list]

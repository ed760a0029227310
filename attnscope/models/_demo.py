"""``attnscope demo``: one generation with the embedded model, captured and summarised."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .. import plot
from ..capture import capture
from ..errors import AttnscopeError
from ..stats import dominance, dominance_table
from ..store import check_store_path
from ._evaluation import score_image
from ._loading import load_pipeline
from .shapes import parse_prompt

__all__ = ["run_demo"]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def demo_outputs(out: str | Path, overwrite: bool = False) -> tuple[Path, Path, Path]:
    """The files ``attnscope demo`` writes for ``out``: the trace, the image and the heat maps beside it.

    Without ``overwrite`` none of them may exist; with it, ``out`` must be a trace (or an empty directory),
    never another kind of directory.

    >>> import tempfile
    >>> [p.name for p in demo_outputs(tempfile.mkdtemp() + "/demo.zarr")]
    ['demo.zarr', 'demo.png', 'demo-heatmaps.png']
    """
    store = check_store_path(out, overwrite)  # a local path or file:// URL: a store URL is refused there
    files = (store.with_suffix(".png"), store.with_name(store.stem + "-heatmaps.png"))
    if store in files:
        raise AttnscopeError(f"out={str(out)!r}: expected the path of a trace store (a .zarr directory); the image "
                             f"and heat maps are written beside it as {files[0].name} and {files[1].name}")
    found = [str(f) for f in files if f.exists()]
    if found and not overwrite:
        raise AttnscopeError(f"out={str(out)!r}: the demo's images beside it are already there ({', '.join(found)}); "
                             f"pass overwrite=True to replace them")
    return (store, *files)


def run_demo(prompt: str = "a red circle and a blue square", *, seed: int = 0, out: str | Path = "runs/demo.zarr",
             device: str | None = None, overwrite: bool = False) -> str:
    """Capture ``prompt`` on the shapes model into ``out``, save the image and the word heat maps beside
    it, and return a summary: the trace, the sites, the detected objects and the dominance table of the
    requested objects (definitions in docs/analysis.md).

    An existing trace at ``out``, or an image beside it (``<stem>.png``, ``<stem>-heatmaps.png``), is
    an error unless ``overwrite=True`` (which replaces only a trace, never another directory).

    >>> import tempfile
    >>> from attnscope.models import run_demo
    >>> out = tempfile.mkdtemp() + "/demo.zarr"
    >>> print(run_demo(out=out))  # doctest: +ELLIPSIS
    trace: .../demo.zarr (... MB)
    ...
    >>> run_demo(out=out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: store '.../demo.zarr' exists; pass overwrite=True to replace it
    """
    expected, _ = parse_prompt(prompt)
    _, image_path, figure_path = demo_outputs(out, overwrite)
    pipe = load_pipeline("shapes", device=device)
    trace = capture(pipe, prompt, seed=seed, store=out, overwrite=overwrite)
    image = trace.images[0]
    image.resize((image.width * 8, image.height * 8), resample=0).save(image_path)
    site_maps = {}
    for site in trace.sites:
        shape = tuple(trace.attention(site).sizes[d] for d in ("y", "x"))
        site_maps[shape] = site_maps.get(shape, 0) + 1
    resolutions = ", ".join(f"{n} at {h}x{w}" for (h, w), n in sorted(site_maps.items(), reverse=True))
    lines = [
        f"trace: {trace.path} ({_size(Path(trace.path)) / 1e6:.1f} MB)",
        f"image: {image_path} ({image.width}x{image.height}, shown 8x)",
        f"prompt: {prompt!r}, seed {seed}, {len(trace.timesteps)} steps",
        f"sites: {len(trace.sites)} cross-attention layers ({resolutions})",
        f"tokens: {len(trace.tokens)} positions; words at " + ", ".join(f"{w} {p}" for w, p in trace.words.items()),
    ]
    row = score_image(prompt, image)  # as `attnscope eval` counts: a repeated object needs two detections
    for phrase, present in zip(row["expected"], row["present"]):
        lines.append(f"  {phrase}: {'present' if present else 'MISSING'}")
    if row["extra_objects"]:
        lines.append(f"  also found: {', '.join(row['extra_objects'])}")
    objects = [f"{c} {s}" for c, s in expected]
    stats = dominance(trace, targets=objects)
    plot.heatmaps(trace, objects).savefig(figure_path, dpi=150, bbox_inches="tight")
    lines += ["", "attention dominance (mean over steps and sites; attnscope stats for more):",
              dominance_table(stats), f"heat maps: {figure_path}"]
    lines += _next_commands(out, objects)
    return "\n".join(lines)


def _next_commands(out: str | Path, objects: list[str]) -> list[str]:
    """The two commands the demo suggests next, quoted for a POSIX shell so they can be pasted whatever ``out`` holds.

    >>> for line in _next_commands("runs/demo.zarr", ["red circle", "blue square"]):
    ...     print(line)
    next: attnscope stats runs/demo.zarr --targets 'red circle,blue square' --by step
    next: python -c 'import attnscope as ats; tr = ats.open_trace("runs/demo.zarr"); print(tr.attention(tr.sites[0]))'
    >>> print(_next_commands("my runs/it's.zarr", ["red circle"])[0])
    next: attnscope stats 'my runs/it'"'"'s.zarr' --targets 'red circle' --by step
    """
    path = str(out)
    code = f"import attnscope as ats; tr = ats.open_trace({json.dumps(path, ensure_ascii=False)}); print(tr.attention(tr.sites[0]))"
    return [f"next: attnscope stats {shlex.quote(path)} --targets {shlex.quote(','.join(objects))} --by step",
            f"next: python -c {shlex.quote(code)}"]

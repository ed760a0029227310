"""mkdocs hooks for the documentation site.

* **API reference.** One page per public package, generated from its ``__all__`` at build time: every
  public name gets a mkdocstrings entry, so a name added to ``__all__`` is documented without touching
  the docs, and a public name whose docstring does not render fails the strict build.
* **Notebooks.** ``notebooks/*.ipynb`` become pages (mkdocs-jupyter). Where the tests saved executed copies
  (``ATTNSCOPE_EXECUTED_NOTEBOOKS``, set by ``.ci/run``), those are shown, with their output. Their links to
  guide pages (``../docs/analysis.md#...``, right on the repository) are pointed at the site's pages.
* **Files outside docs/.** Links from the guide to ``../benchmarks/README.md`` and the model card are
  served as pages of the site.
"""

from __future__ import annotations

import importlib
import logging
import os
import posixpath
import re
import types
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("mkdocs.hooks.attnscope")

#: package -> (page, one line on what it holds)
PACKAGES = {
    "attnscope": ("api/attnscope.md", "The top level: `import attnscope as ats`."),
    "attnscope.stats": ("api/stats.md", "Numbers from traces: dominance, convergence, spatial statistics, the early warning."),
    "attnscope.plot": ("api/plot.md", "Figures: heat maps, step × site grids, violins, lines, comparisons."),
    "attnscope.regulate": ("api/regulate.md", "Interventions: Attention Regulation, Reweight, TGATE, spatial-temporal control."),
    "attnscope.rerun": ("api/rerun.md", "Regenerate a stored trace, with interventions, and compare."),
    "attnscope.sweep": ("api/sweep.md", "Many runs: sweeps, the catalog, map_stats, the early warning over a sweep."),
    "attnscope.store": ("api/store.md", "The Zarr trace store: open_trace, Trace, the writer, integrity checks."),
    "attnscope.capture": ("api/capture.md", "Hooks to store: capture and the Recorder client."),
    "attnscope.hooks": ("api/hooks.md", "The hook core: hooks(), the client protocol, call contexts, sites."),
    "attnscope.models": ("api/models.md", "Pipelines: load_pipeline, the embedded shapes model, its evaluation."),
    "attnscope.tokens": ("api/tokens.md", "Word ↔ token alignment, token roles, target resolution."),
    "attnscope.testing": ("api/testing.md", "Tiny pipelines built from config, for tests and examples."),
}
OUTSIDE = {"benchmarks/README.md": "benchmarks/README.md",
           "attnscope/models/shapes/weights/MODEL_CARD.md": "attnscope/models/shapes/weights/MODEL_CARD.md"}


#: id of an object already documented -> (page, public name, mkdocstrings identifier): documented once, linked elsewhere
_DOCUMENTED: dict[int, tuple[str, str, str]] = {}


def _entry(package: str, name: str) -> str:
    """The mkdocstrings block for ``package.name``, or a link when the name is a package of its own or an
    object another page documents."""
    module = importlib.import_module(package)
    static = name in vars(module)  # lazily exported names (PEP 562) are found through their defining module
    obj = getattr(module, name)
    public = f"{package}.{name}"
    page = PACKAGES[package][0]
    if (isinstance(obj, type) or callable(obj)) and not isinstance(obj, types.ModuleType):
        if id(obj) in _DOCUMENTED and _DOCUMENTED[id(obj)][0] != page:
            _, other, identifier = _DOCUMENTED[id(obj)]
            return f"## {public}\n\nThe same object as [`{other}`][{identifier}].\n"
    if isinstance(obj, types.ModuleType):
        page = PACKAGES.get(obj.__name__, (None,))[0]
        link = f"[{obj.__name__}]({Path(page).name})" if page else f"`{obj.__name__}`"
        return f"## {public}\n\nA package: {link}.\n"
    if not (isinstance(obj, type) or callable(obj)):  # a constant: its value (griffe misses unpacked assignments)
        text = repr(obj)
        text = text if len(text) <= 300 else text[:300] + " …"
        return f"## {public}\n\n```python\n{name} = {text}\n```\n"
    where = public
    if not static or getattr(obj, "__module__", package) != package:
        qualname = getattr(obj, "__qualname__", None)
        if qualname and getattr(obj, "__module__", None):
            where = f"{obj.__module__}.{qualname}"
    _DOCUMENTED[id(obj)] = (page, public, where)
    return f"::: {where}\n    options:\n      heading: \"{public}\"\n      toc_label: \"{name}\"\n"


def api_page(package: str) -> str:
    page, summary = PACKAGES[package]
    module = importlib.import_module(package)
    names = list(getattr(module, "__all__", []))
    lines = [f"# {package}", "", summary, "", f"`{package}.__all__`: " + ", ".join(f"`{n}`" for n in names), ""]
    lines += [_entry(package, name) for name in names]
    return "\n".join(lines)


def api_index() -> str:
    rows = "\n".join(f"| [{pkg}]({Path(page).name}) | {summary} |" for pkg, (page, summary) in PACKAGES.items())
    return ("# API reference\n\nEvery public name of every package, from its docstring (numpydoc). The pages are "
            "generated from each package's `__all__` when the site is built.\n\n| package | what it holds |\n"
            f"|---|---|\n{rows}\n")


def _notebook_source() -> Path:
    executed = os.environ.get("ATTNSCOPE_EXECUTED_NOTEBOOKS")
    if executed and (Path(executed) / "notebooks").is_dir():
        log.info("notebooks: the executed copies in %s", executed)
        return Path(executed)
    log.info("notebooks: the stored notebooks, without output (set ATTNSCOPE_EXECUTED_NOTEBOOKS to show executed ones)")
    return ROOT


_LINK = re.compile(r"\]\((?![a-z]+:|#|/)([^)\s#]+)(#[^)\s]*)?\)")


def site_link(page_repo_path: str, target: str) -> str | None:
    """A relative link written for the repository (``page_repo_path`` links to ``target``) as the site needs it.

    Guide pages live in docs/ in the repository and at the site's root; the OUTSIDE files keep their paths.

    >>> site_link("docs/benchmarks.md", "../benchmarks/README.md")
    'benchmarks/README.md'
    >>> site_link("benchmarks/README.md", "../docs/spatial.md")
    '../spatial.md'
    >>> site_link("docs/capture.md", "hooks.md") is None   # already right
    True
    """
    repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), target))
    if repo_target.startswith("docs/"):
        site_target = repo_target[len("docs/"):]
    elif repo_target in OUTSIDE:
        site_target = repo_target
    else:
        return None
    site_page = page_repo_path[len("docs/"):] if page_repo_path.startswith("docs/") else page_repo_path
    new = posixpath.relpath(site_target, posixpath.dirname(site_page) or ".")
    return None if new == target else new


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Links written for the repository (guide pages in docs/, files outside it) made right for the site."""
    src = page.file.src_uri
    repo_path = src if src in OUTSIDE else f"docs/{src}"

    def fix(match: re.Match) -> str:
        new = site_link(repo_path, match.group(1))
        return match.group(0) if new is None else f"]({new}{match.group(2) or ''})"

    return _LINK.sub(fix, markdown)


_HREF = re.compile(r'href="(?![a-z]+:|#|/)([^"#]+)(#[^"]*)?"')


def on_page_content(html: str, page, config, files) -> str:
    """A notebook's links written for the repository (``../docs/x.md``) made into links to the site's pages.

    mkdocs-jupyter renders notebooks to HTML itself, so :func:`on_page_markdown` never sees them; the strict
    build does not check these links, so one that names no page is an error here.
    """
    src = page.file.src_uri
    if not src.endswith(".ipynb"):
        return html

    def fix(match: re.Match) -> str:
        target = match.group(1)
        new = site_link(src, target)
        if new is None:
            if target.endswith((".md", ".ipynb")):
                raise ValueError(f"{src}: the link {target!r} names no page of the site")
            return match.group(0)
        found = files.get_file_from_path(posixpath.normpath(posixpath.join(posixpath.dirname(src), new)))
        if found is None:
            raise ValueError(f"{src}: the link {target!r} names no page of the site")
        return f'href="{found.url_relative_to(page.file)}{match.group(2) or ""}"'

    return _HREF.sub(fix, html)


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    _DOCUMENTED.clear()
    for package in [*list(PACKAGES)[1:], "attnscope"]:  # objects are documented on their package's page
        files.append(File.generated(config, PACKAGES[package][0], content=api_page(package)))
    files.append(File.generated(config, "api/index.md", content=api_index()))
    source = _notebook_source()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        rel = f"notebooks/{notebook.name}"
        src_dir = source if (source / rel).exists() else ROOT
        files.append(File(rel, str(src_dir), config["site_dir"], config["use_directory_urls"]))
    for rel in OUTSIDE:
        files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files

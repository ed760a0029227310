"""The documentation site's build hooks: every public name gets an API entry, links written for the repository
are made right for the site, doctest examples render as code. (`mkdocs build --strict` itself runs in .ci/run.)"""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
HOOKS = Path(__file__).resolve().parent.parent / "docs" / "_hooks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"docs_hooks_{name}", HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_an_api_entry():
    site = _load("site")
    site._DOCUMENTED.clear()
    pages = {pkg: site.api_page(pkg) for pkg in [*list(site.PACKAGES)[1:], "attnscope"]}
    for package, text in pages.items():
        names = importlib.import_module(package).__all__
        assert names, package
        for name in names:
            public = f"{package}.{name}"
            # a mkdocstrings block headed with the public name, a rendered constant, or a link to where it is documented
            assert re.search(rf'heading: "{re.escape(public)}"|^## {re.escape(public)}$', text, re.M), public
    # an object exported twice is documented once (on its package's page) and linked from the top level
    assert 'heading: "attnscope.store.Trace"' in pages["attnscope.store"]
    assert "## attnscope.Trace\n\nThe same object as [`attnscope.store.Trace`]" in pages["attnscope"]
    # lazily exported names are found through their defining module
    assert "::: attnscope.plot._heatmaps.heatmaps" in pages["attnscope.plot"]


def test_every_public_package_has_a_page():
    site = _load("site")
    packages = {p.stem for p in (HOOKS.parent.parent / "attnscope").iterdir()
                if p.is_dir() and (p / "__init__.py").exists() and not p.stem.startswith("_")}
    modules = {f"attnscope.{p}" for p in packages} | {"attnscope", "attnscope.tokens", "attnscope.testing"}
    assert modules == set(site.PACKAGES)


@pytest.mark.parametrize("page, target, expected", [
    ("docs/benchmarks.md", "../benchmarks/README.md", "benchmarks/README.md"),
    ("docs/shapes-model.md", "../attnscope/models/shapes/weights/MODEL_CARD.md",
     "attnscope/models/shapes/weights/MODEL_CARD.md"),
    ("benchmarks/README.md", "../docs/spatial.md", "../spatial.md"),
    ("attnscope/models/shapes/weights/MODEL_CARD.md", "../../../../docs/shapes-model.md", "../../../../shapes-model.md"),
    ("docs/capture.md", "hooks.md", None),
    ("docs/capture.md", "../README.md", None),  # outside the site: left alone (the strict build reports it)
])
def test_site_link(page, target, expected):
    assert _load("site").site_link(page, target) == expected


def test_on_page_markdown_rewrites_only_relative_links():
    site = _load("site")

    class File:
        src_uri = "benchmarks.md"

    class Page:
        file = File()

    text = "[a](../benchmarks/README.md#x) [b](hooks.md) [c](https://x.org/../benchmarks/README.md) [d](#top)"
    assert site.on_page_markdown(text, Page(), None, None) == (
        "[a](benchmarks/README.md#x) [b](hooks.md) [c](https://x.org/../benchmarks/README.md) [d](#top)")


def test_a_notebooks_links_to_guide_pages_point_at_the_site_pages(tmp_path):
    from mkdocs.structure.files import File, Files
    from mkdocs_jupyter.plugin import NotebookFile  # how mkdocs-jupyter makes a notebook a page, as in the build

    site = _load("site")
    out = str(tmp_path / "site")
    files = Files([NotebookFile(File("notebooks/01_a.ipynb", str(tmp_path), out, True), True, out),
                   *(File(p, str(tmp_path), out, True) for p in ("analysis.md", "index.md"))])

    class Page:
        file = files.get_file_from_path("notebooks/01_a.ipynb")

    html = ('<a href="../docs/analysis.md#the-statistics">s</a> <a href="https://x.org/a.md">x</a> '
            '<a href="#top">t</a> <a href="data.csv">d</a>')
    assert site.on_page_content(html, Page(), None, files) == (
        '<a href="../../analysis/#the-statistics">s</a> <a href="https://x.org/a.md">x</a> '
        '<a href="#top">t</a> <a href="data.csv">d</a>')
    with pytest.raises(ValueError, match=r"notebooks/01_a.ipynb: the link '../docs/gone.md' names no page"):
        site.on_page_content('<a href="../docs/gone.md">g</a>', Page(), None, files)

    class Guide:  # a guide page's links were fixed in its markdown already
        file = files.get_file_from_path("analysis.md")

    assert site.on_page_content('<a href="../docs/gone.md">g</a>', Guide(), None, files) == '<a href="../docs/gone.md">g</a>'


def test_doctests_are_fenced():
    fence = _load("doctests").fence_doctests
    text = "Summary.\n\n    >>> f([1, 2])\n    [1, 2]\n\nMore text.\n\n```pycon\n>>> g()\n```\n"
    assert fence(text) == ("Summary.\n\n    ```pycon\n    >>> f([1, 2])\n    [1, 2]\n    ```\n\nMore text.\n\n"
                           "```pycon\n>>> g()\n```\n")

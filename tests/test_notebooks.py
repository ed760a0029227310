"""The notebooks run top to bottom in a real Jupyter kernel (nbclient), offline, on the CPU, on one torch thread,
and write nothing beside themselves."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = {  # a line each notebook must print, so a silently empty run cannot pass
    "01_diagnose_dominance.ipynb": "peak-to-mean, failed:",
    "02_programmatic_capture.ipynb": "generations lost an object",
    "03_regulated_rerun.ipynb": "fixed by regulation",
    "04_spatial_control.ipynb": "relation fixed by the layout:",
    "05_sweep_and_predict.ipynb": "with regulation (risk >",
}
# cells a user may well run a second time (after changing a parameter): run again at the end, they must not fail
# (a join of columns already there, a rerun into a store already written); each marker is a line of such a cell
RUN_TWICE = {
    "04_spatial_control.ipynb": ["before = pd.DataFrame(", "after = pd.DataFrame("],
    "05_sweep_and_predict.ipynb": ["for run in table.index[table.risk > theta]:"],
}
# The kernel is a process of its own: it gets one torch (OpenMP/MKL) thread explicitly, as the test processes do
# (conftest.py). With torch's default pool a notebook that takes 30 s idle can pass the 600 s cell timeout on a
# machine where another process holds a core: the pool's threads spin at every barrier waiting for that core.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _noise(output) -> bool:
    """stderr, and tqdm's progress widgets: a static page has no widget state, so they would show frozen at 0 %."""
    return ((output.get("output_type") == "stream" and output.get("name") == "stderr")
            or "application/vnd.jupyter.widget-view+json" in output.get("data", {}))


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name, tmp_path):
    """The kernel's working directory stands in for notebooks/ (where Jupyter starts a notebook's kernel): it must
    stay empty — no runs/, no stores, no PNGs. TMPDIR points into tmp_path, so the notebook's default output folder
    (tempfile.mkdtemp()) lands there, is checked to be used, and is cleaned up with tmp_path."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    before = _listing(NOTEBOOKS)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for marker in RUN_TWICE.get(name, []):
        again = [cell for cell in nb.cells if cell.cell_type == "code" and marker in cell.source]
        assert len(again) == 1, f"{name}: {len(again)} cells hold {marker!r}, expected 1"
        nb.cells.append(nbformat.v4.new_code_cell(again[0].source))
    nb.cells.append(nbformat.v4.new_code_cell("import torch; print('torch threads:', torch.get_num_threads())"))
    NotebookClient(nb, timeout=600, kernel_name="python3").execute(cwd=str(cwd),
                                                                   env={**os.environ, **ONE_THREAD, "TMPDIR": str(tmp)})
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    keep = os.environ.get("ATTNSCOPE_EXECUTED_NOTEBOOKS")  # .ci/run: the docs site shows these, with their output
    if keep:
        (Path(keep) / "notebooks").mkdir(parents=True, exist_ok=True)
        executed = nbformat.read(NOTEBOOKS / name, as_version=4)  # without the thread-check cell added above
        executed.cells = nb.cells[:len(executed.cells)]
        for cell in executed.cells:  # progress bars and library warnings on stderr are noise on a docs page
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if not _noise(o)]
        nbformat.write(executed, Path(keep) / "notebooks" / name)
    assert EXPECTED[name] in printed
    assert "torch threads: 1\n" in printed
    assert not any(cwd.iterdir()), f"{name} wrote into its working directory: {sorted(_listing(cwd))[:10]}"
    assert _listing(NOTEBOOKS) == before, f"{name} wrote into notebooks/: {sorted(_listing(NOTEBOOKS) - before)}"
    assert any(p.name.startswith(f"attnscope-nb{name[:2]}-") for p in tmp.iterdir()), \
        f"{name} did not write into its temporary output folder (OUT)"


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)

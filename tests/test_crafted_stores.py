"""Property-based: a trace is untrusted input. Real traces' metadata is mutated on disk (shapes, dtypes,
dimension names, chunking, attributes, manifest fields) and then opened and analysed as a user would;
every outcome must be a result or the project's own AttnscopeError: never another exception, never a
hang, never an allocation far above what the trace declares.

``ATTNSCOPE_CRAFTED_EXAMPLES`` sets the examples per test (default 40; the issue note gives a larger run).
Allocations are bounded by lowering this process's address-space limit to its current size plus
:data:`HEADROOM` while a trace is read: a larger allocation fails (MemoryError, a test failure).
"""

import json
import os
import resource
import shutil
import signal
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnscope as ats

from .conftest import RUN

EXAMPLES = int(os.environ.get("ATTNSCOPE_CRAFTED_EXAMPLES", "40"))
#: the most a reader may add to the process's address space on these traces (each holds under 1 MB of maps;
#: the rest is room for dask's threads and the libraries' lazy imports)
HEADROOM = 1 << 30
SECONDS = 30

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2, 3, 7, 10**6, 2**40])
    | st.floats(allow_nan=True) | st.text(max_size=12) | st.sampled_from(["../../x", "float16", "step", "a.b"]),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
sizes = st.lists(st.integers(-1, 2**40) | st.sampled_from([0, 1, 2, 3, 4, 77, 100_000]), min_size=0, max_size=7)
dtypes = st.sampled_from(["float16", "float32", "float64", "int64", "uint8", "int8", "bool", "string",
                          "complex128", "bogus"])


@pytest.fixture(scope="module")
def traces(tmp_path_factory, sd_pipe):
    """A complete trace and an incomplete copy of it (read node by node instead of from consolidated metadata)."""
    base = tmp_path_factory.mktemp("crafted")
    ats.capture(sd_pipe, "a red circle and a blue square", seed=0, store=base / "complete.zarr", **RUN)
    shutil.copytree(base / "complete.zarr", base / "incomplete.zarr")
    root = json.loads((base / "incomplete.zarr" / "zarr.json").read_text())
    root["attributes"].update(complete=False, steps_written=2)
    del root["consolidated_metadata"]
    (base / "incomplete.zarr" / "zarr.json").write_text(json.dumps(root))
    return base


def _arrays(root: dict) -> list[str]:
    return sorted(p for p, m in root["consolidated_metadata"]["metadata"].items() if m.get("node_type") == "array")


def _timeout(signum, frame):
    raise TimeoutError(f"a read took over {SECONDS} s")


def _address_space() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def _use(path, workdir) -> None:
    """Open, read and analyse a trace as a user would; only AttnscopeError may come out."""
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(SECONDS)
    limits = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + HEADROOM, limits[1]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = ats.open_trace(path)
            repr(tr), tr.sites, tr.gated_steps, tr.nan_maps
            words = list(tr.words)
            _ = tr.images
            ds = ats.stats.dominance(tr, targets=words[:2] or None)
            ds.load()
            ats.stats.convergence(tr, of="maps").load()
            tr.output_change()
    except ats.AttnscopeError:
        pass
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.alarm(0)


def _mutate(base, kind, workdir, edit) -> os.PathLike:
    """A fresh copy of the ``kind`` trace with ``edit(meta)`` applied to one node's metadata everywhere it is held."""
    path = workdir / "t.zarr"
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(base / f"{kind}.zarr", path)
    return path


def _edit_array(path, name, edit) -> None:
    node = path / name / "zarr.json"
    meta = json.loads(node.read_text())
    edit(meta)
    node.write_text(json.dumps(meta))
    root = json.loads((path / "zarr.json").read_text())
    if "consolidated_metadata" in root:
        edit(root["consolidated_metadata"]["metadata"][name])
        (path / "zarr.json").write_text(json.dumps(root))


_settings = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_settings
@given(kind=st.sampled_from(["complete", "incomplete"]), which=st.integers(0, 10**6),
       field=st.sampled_from(["shape", "data_type", "dimension_names", "chunk", "shard", "fill_value", "attributes",
                              "drop"]),
       shape=sizes, dtype=dtypes, value=json_values)
def test_mutated_array_metadata(traces, tmp_path_factory, kind, which, field, shape, dtype, value):
    workdir = tmp_path_factory.mktemp("m", numbered=True)
    path = _mutate(traces, kind, workdir, None)
    root = json.loads((traces / "complete.zarr" / "zarr.json").read_text())
    name = _arrays(root)[which % len(_arrays(root))]

    def edit(meta):
        if field == "shape":
            meta["shape"] = shape
        elif field == "data_type":
            meta["data_type"] = dtype
        elif field == "dimension_names":
            meta["dimension_names"] = value if isinstance(value, list) else list(reversed(meta.get("dimension_names") or []))
        elif field == "chunk":
            meta["chunk_grid"]["configuration"]["chunk_shape"] = shape
        elif field == "shard" and meta["codecs"][0]["name"] == "sharding_indexed":
            meta["codecs"][0]["configuration"]["chunk_shape"] = shape
        elif field == "fill_value":
            meta["fill_value"] = value
        elif field == "attributes":
            meta["attributes"] = value if isinstance(value, dict) else {"x": value}
        elif field == "drop":
            meta.clear()
    _edit_array(path, name, edit)
    _use(path, workdir)


MANIFEST_FIELDS = ["num_steps", "samples", "height", "width", "prompts", "seed", "tokens", "token_ids", "token_roles",
                   "segments", "num_images_per_prompt", "guidance", "latent_shape", "generated_size"]
ROOT_FIELDS = ["sites", "steps_written", "complete", "gated_steps", "nan_maps", "attnscope_format", "format_min_reader",
               "coordinates", "images", "manifest"]


@_settings
@given(kind=st.sampled_from(["complete", "incomplete"]),
       where=st.sampled_from([("run", f) for f in MANIFEST_FIELDS] + [("capture", f) for f in ("steps", "sites", "heads")]
                             + [("root", f) for f in ROOT_FIELDS] + [("site", f) for f in ("steps", "site")]),
       value=json_values)
def test_mutated_attributes(traces, tmp_path_factory, kind, where, value):
    workdir = tmp_path_factory.mktemp("a", numbered=True)
    path = _mutate(traces, kind, workdir, None)
    section, field = where
    if section == "site":
        site = json.loads((path / "zarr.json").read_text())["attributes"]["sites"][0]

        def edit(meta):
            meta.setdefault("attributes", {})[field] = value
        _edit_array(path, f"sites/{site}", edit)
    else:
        root = json.loads((path / "zarr.json").read_text())
        attrs = root["attributes"]
        target = attrs if section == "root" else attrs["manifest"].setdefault(section, {})
        target[field] = value
        (path / "zarr.json").write_text(json.dumps(root))
    _use(path, workdir)

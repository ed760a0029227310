"""Audit of benchmarks/: the GPU device run (gpu_wheels.sh, gpu_checks.sh) and the benchmark scripts."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

#: The GPU image's Python packages (the device tool's KINDS.md, "Python packages already there", read on
#: 2026-11-17): what gpu_wheels.sh need not carry.
IMAGE = set(
    map(
        canonicalize_name,
        """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split(),
    )
)
#: attnscope's dependencies the GPU checks never import (catalog.map_stats alone runs on dask.distributed)
NOT_ON_THE_GPU_PATH = {"distributed"}
#: the device image's interpreter
IMAGE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "extra": "",
}


def _carried() -> set[str]:
    """The distributions gpu_wheels.sh downloads (its ``pip download`` command)."""
    text = (BENCH / "gpu_wheels.sh").read_text()
    command = text[text.index("pip download") :].split("\nls ")[0]
    words = command.replace("\\\n", " ").split()[2:]
    names, value_next = [], False
    for word in words:
        if value_next or word.startswith("-"):  # an option, or the value of one (--dest .whl, --platform TAG)
            value_next = word.startswith("-") and "=" not in word
            continue
        names.append(re.match(r'"?([A-Za-z0-9_.-]+)', word).group(1))
    return {canonicalize_name(n) for n in names}


def _needs(dist: str) -> set[str]:
    """``dist``'s requirements that apply on the image (no extras), as installed here."""
    out = set()
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(IMAGE_ENV):
            out.add(canonicalize_name(req.name))
    return out


def test_gpu_wheels_carry_every_dependency_the_image_lacks():
    carried = _carried()
    assert {"diffusers", "zarr", "dask"} <= carried, carried
    ours = _needs("attnscope") - NOT_ON_THE_GPU_PATH
    missing = {d: "attnscope" for d in ours - IMAGE - carried}
    for dist in carried:  # what a carried wheel needs must be in the image or carried too (pip runs --no-deps)
        try:
            missing.update({d: dist for d in _needs(dist) - IMAGE - carried})
        except md.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed here")
    assert not missing, f"gpu_wheels.sh lacks (needed by): {missing}"


def test_cuda_checks_compare_in_ieee_float32(monkeypatch, tmp_path):
    """cuda_checks compares CUDA float32 against the CPU within 1e-3: every check must run with TF32 off (cuDNN
    convolutions default to TF32, ~1e-3 relative per product), or the comparison measures TF32, not attnscope."""
    import json
    import sys

    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("cuda_checks", None)
    import cuda_checks

    seen = []

    def record(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))

    for name in ("capture_matches_cpu", "half_capture_rows", "batch_invariance"):
        monkeypatch.setattr(cuda_checks, name, record)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # TF32 allowed throughout
    try:
        assert cuda_checks.main(["--device", "cpu", "--json", str(tmp_path / "c.json")]) == 0
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert len(seen) == 5 and set(seen) == {(False, False)}, seen
    assert json.loads((tmp_path / "c.json").read_text())["tf32"] is False


def test_capture_overhead_records_the_backend_that_ran(monkeypatch, tmp_path, capsys):
    """``--backend`` reaches Flux's processors; SD3's JointAttnProcessor2_0 calls torch's SDPA itself, so diffusers'
    set_attention_backend skips it silently: its result must not be labelled with the backend."""
    import json
    import sys

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("capture_overhead", None)
    import capture_overhead

    out = tmp_path / "o.json"
    argv = ["--models", "flux,sd3", "--backend", "native", "--steps", "1", "--repeats", "1", "--resolution", "32"]
    assert capture_overhead.main([*argv, "--threads", "1", "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["sd3"]["backend"] is None and rows["flux"]["backend"] == "native"
    assert rows["sd3"]["backend_requested"] == rows["flux"]["backend_requested"] == "native"
    assert "no attention processor of SD3Transformer2DModel takes a backend" in capsys.readouterr().out

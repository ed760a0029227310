#!/usr/bin/env bash
# The wheels the GPU machine's image lacks, for its Python 3.12 on x86_64, into .whl/ (git-ignored).
#
# The device image (../.library/device/KINDS.md, "Python packages already there") has torch,
# transformers, xarray, pandas, pyarrow, seaborn, typer ... but no diffusers, no zarr and no dask
# (a trace's maps are read as dask arrays: trace.attention needs it). This downloads those three,
# zarr's codecs and config (numcodecs, google-crc32c, donfig), dask's partd and locket, and
# diffusers' importlib_metadata with its lazy-importer, at the versions installed here, with no other
# dependencies (the image has the rest: toolz, cloudpickle, fsspec, pyyaml, click, zipp ...). Then carry ".whl"
# in the device run and start it with benchmarks/gpu_checks.sh, which installs them offline.
#
#   bash benchmarks/gpu_wheels.sh            # run from the repo with its venv active
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl
mkdir -p .whl
pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "diffusers==$(version diffusers)" "zarr==$(version zarr)" "numcodecs==$(version numcodecs)" \
    "donfig==$(version donfig)" "google-crc32c==$(version google-crc32c)" \
    "dask==$(version dask)" "partd==$(version partd)" "locket==$(version locket)" \
    "importlib_metadata==$(version importlib_metadata)" "lazy-importer==$(version lazy-importer)"
ls .whl
du -sh .whl

"""How long ``import attnscope`` takes, and which heavy libraries it pulls in.

Each repeat is a fresh interpreter (``python -c "import attnscope"``), so nothing is cached in
memory but the OS file cache; the first, cold run is reported apart from the median of the rest.

    python benchmarks/import_time.py              # 7 runs
    python benchmarks/import_time.py --repeats 15
    python benchmarks/import_time.py --repeats 2    # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "xarray", "pandas", "zarr", "matplotlib", "seaborn", "dask")
_PROBE = (
    "import time, sys, json; t = time.perf_counter(); import attnscope; dt = time.perf_counter() - t; "
    f"print(json.dumps({{'seconds': dt, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))"
)


def one_import() -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    description, _, epilog = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="fresh interpreters, at least 2 (default 7)")
    args = parser.parse_args()
    runs = [one_import() for _ in range(max(2, args.repeats))]
    warm = [r["seconds"] for r in runs[1:]]
    print(f"import attnscope: first run {runs[0]['seconds']:.2f} s, median of the next {len(warm)} "
          f"{statistics.median(warm):.2f} s (min {min(warm):.2f}, max {max(warm):.2f})")
    print(f"heavy libraries loaded by the import: {', '.join(runs[-1]['loaded']) or 'none'}")
    print(f"not loaded: {', '.join(m for m in HEAVY if m not in runs[-1]['loaded'])}")


if __name__ == "__main__":
    main()

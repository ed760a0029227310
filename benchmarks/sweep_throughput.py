"""Throughput of ``ats.sweep`` and ``catalog.map_stats`` on the shapes model, locally and on a local S3 server.

Measured in one run, on the same prompts and seeds (shapes model, 20 steps, one torch thread per
process):

* **plain**: a loop of ``pipe(prompt, generator=…)`` calls, no capture — generations/s;
* **capture loop**: a loop of ``ats.capture`` calls into a folder (what a sweep does per run, without
  the sweep's machinery);
* **sweep, 1 worker** (in this process) and **sweep, 2 workers** (processes, one thread each; their
  start-up, loading the model, is included in the total; the steady rate, from the first run's start
  to the last run's end in the catalog's ``finished``/``seconds``, leaves it out);
* **sweep to S3**: 1 worker, ``out=s3://…`` on a moto server on localhost (traces staged locally and
  uploaded). The moto server runs in this process (a thread): it competes with the sweep for the GIL,
  so this is a worst case for the upload, not a measure of a real object store.

Ratios printed: capture loop / sweep(1 worker) (the cost of the sweep machinery, target ≤ 1.15 in
time, i.e. throughput ratio ≥ 0.87), plain / sweep for 1 and 2 workers (what capturing a sweep costs
against generating without it), and for ``map_stats`` (a ``DominanceRow`` over every trace, on a
LocalCluster of 2 single-threaded workers): its time against reading the same bytes (every site
array of every trace read and decompressed, on the same cluster): target ≥ 0.7.

    python benchmarks/sweep_throughput.py --runs 24          # ~5 min on 2 cores
    python benchmarks/sweep_throughput.py --runs 8 --no-s3   # a quick look
    python benchmarks/sweep_throughput.py --map-only runs/bench1000 --runs 1000 --rounds 3   # map_stats alone
    python benchmarks/sweep_throughput.py --map-only runs/bench1000 --s3 --runs 200 --rounds 3   # local vs S3

``--map-only DIR`` measures only ``map_stats`` against reading, on the sweep in DIR (swept there first, with
2 workers, when DIR holds none), in ``--rounds`` interleaved read/map rounds; it prints each round's ratio
and the median. With ``--s3`` the first ``--runs`` complete runs of DIR are also uploaded to a moto S3 server
started as a separate process on localhost (so it does not share this process's GIL), and the same rounds
run on both copies, local and S3 alternating, over the same runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import attnscope as ats  # noqa: E402
from attnscope.sweep import DominanceRow, plan_runs  # noqa: E402

PROMPTS = ["a red circle and a blue square", "a green triangle and a green square", "a yellow circle and a red circle",
           "a blue triangle and a yellow square"]
STEPS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, _, epilog = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=24, help="generations per measurement (prompts × seeds; default 24)")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 measurements")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--map-only", type=Path, metavar="DIR", help="only map_stats vs reading, on the sweep in DIR (kept)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved read/map rounds (default 1)")
    p.add_argument("--s3", action="store_true", help="with --map-only: also on an S3 copy of the first --runs runs")
    args = p.parse_args(argv)
    if args.s3 and not args.map_only:
        p.error("--s3 goes with --map-only DIR (a full run measures S3 unless --no-s3)")
    if args.no_s3 and args.map_only:
        p.error("--no-s3: --map-only measures S3 only with --s3")
    if args.runs < 1 or args.rounds < 1:
        p.error("--runs and --rounds must be at least 1")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    return args


def _seeds(runs: int) -> list[int]:
    return list(range(-(-runs // len(PROMPTS))))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _read_all(trace) -> int:
    """Every site array of a trace read and decompressed in one ``dask.compute`` (the bytes map_stats reads, no
    statistics)."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        return sum(int(a.nbytes) for a in dask.compute(*[trace.attention(site).data for site in trace.sites]))


def _warm(cat, client) -> None:
    """One untimed read of every trace: the workers' imports and the page cache (or the server's) warmed."""
    cat.map_stats(_read_all, client=client, progress=False)


def _round(cat, client) -> dict:
    """One timed read of every trace, then one timed ``map_stats(DominanceRow)``."""
    fn = DominanceRow("objects")
    return {"read_s": _timed(lambda: cat.map_stats(_read_all, client=client, progress=False)),
            "map_stats_s": _timed(lambda: cat.map_stats(fn, client=client, progress=False))}


def _summary(rounds: list[dict]) -> dict:
    """Medians of the rounds' read and map times and of their ratios."""
    import statistics

    return {"read_s": statistics.median(r["read_s"] for r in rounds),
            "map_stats_s": statistics.median(r["map_stats_s"] for r in rounds),
            "ratio_read_over_map": statistics.median(r["read_s"] / r["map_stats_s"] for r in rounds), "rounds": rounds}


def measure_map(cat, client, rounds: int = 1) -> dict:
    """Reading every trace, then ``map_stats(DominanceRow)``, ``rounds`` times interleaved; the median round's ratio."""
    _warm(cat, client)
    return _summary([_round(cat, client) for _ in range(rounds)])


def map_only(args: argparse.Namespace) -> dict:
    """``--map-only``: map_stats against reading on one sweep folder, swept first if it holds none."""
    from distributed import Client, LocalCluster

    if not (args.map_only / "catalog.parquet").exists():
        ats.sweep("shapes", PROMPTS, _seeds(args.runs), out=args.map_only, workers=2, threads=1, progress=True,
                  num_inference_steps=STEPS)
    cat = ats.open_catalog(args.map_only)
    if args.s3:
        return map_local_and_s3(cat, args)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        m = measure_map(cat, client, args.rounds)
    n = int((cat.df["status"] == "complete").sum())
    for i, r in enumerate(m["rounds"]):
        print(f"  round {i + 1}: read {r['read_s']:.1f} s, DominanceRow {r['map_stats_s']:.1f} s, "
              f"read / map = {r['read_s'] / r['map_stats_s']:.2f}")
    print(f"map_stats over {n} traces ({STEPS} steps, shapes model), LocalCluster of 2 single-threaded workers: "
          f"median read / map = {m['ratio_read_over_map']:.2f} (target >= 0.7); {n / m['map_stats_s']:.1f} traces/s")
    if args.json:
        args.json.write_text(json.dumps({"traces": n, **m}, indent=1))
    return m


def _moto_process():
    """A moto S3 server in its own process on a free localhost port: (process, endpoint URL)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not answer on {endpoint}")


def map_local_and_s3(cat, args: argparse.Namespace) -> dict:
    """``--map-only DIR --s3``: the first ``--runs`` complete runs, read and mapped locally and from S3, alternating."""
    import boto3
    import fsspec
    from distributed import Client, LocalCluster

    from attnscope.store import upload_trace
    from attnscope.sweep._catalog import Catalog

    df = cat.df[cat.df["status"] == "complete"].iloc[:args.runs]
    root = Path(args.map_only)
    proc, endpoint = _moto_process()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="bench")
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        start = time.perf_counter()
        fs = fsspec.filesystem("s3", **options)
        for name in ("catalog.parquet", "sweep.json"):
            fs.put_file(str(root / name), f"bench/s/{name}")
        for trace in df["trace"]:   # the sweep's own upload of a finished trace
            upload_trace(trace, f"s3://bench/s/{Path(trace).relative_to(root).as_posix()}", storage_options=options)
        upload_s = time.perf_counter() - start
        print(f"uploaded {len(df)} traces to {endpoint} in {upload_s:.0f} s")
        remote = ats.open_catalog("s3://bench/s", storage_options=options)
        cats = {"local": Catalog(cat._folder, df), "s3": Catalog(remote._folder, remote.df[remote.df["run"].isin(set(df["run"]))])}
        rounds: dict[str, list] = {key: [] for key in cats}
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            for c in cats.values():
                _warm(c, client)
            for _ in range(args.rounds):
                for key, c in cats.items():
                    rounds[key].append(_round(c, client))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out: dict = {"traces": len(df), "upload_s": upload_s}
    for key, rs in rounds.items():
        out[key] = m = _summary(rs)
        ratios = ", ".join(f"{r['read_s'] / r['map_stats_s']:.2f}" for r in rs)
        print(f"  {key:5s}: rounds read / map = {ratios}; "
              f"median read {m['read_s']:.1f} s, DominanceRow {m['map_stats_s']:.1f} s "
              f"({len(df) / m['map_stats_s']:.1f} traces/s), read / map = {m['ratio_read_over_map']:.2f} (target >= 0.7)")
    print(f"S3 / local DominanceRow time: {out['s3']['map_stats_s'] / out['local']['map_stats_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.map_only:
        return map_only(args)
    seeds = _seeds(args.runs)
    runs = plan_runs(PROMPTS, seeds)
    n = len(runs)
    pipe = ats.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    root = Path(tempfile.mkdtemp(prefix="attnscope-sweep-bench-"))
    result: dict = {"runs": n, "steps": STEPS, "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                    "torch": torch.__version__}
    try:
        pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up
        result["plain_s"] = _timed(lambda: [pipe(r.prompt, num_inference_steps=STEPS,
                                                 generator=torch.Generator().manual_seed(r.seed)) for r in runs])
        result["capture_loop_s"] = _timed(lambda: [ats.capture(pipe, r.prompt, seed=r.seed, store=root / "loop" / f"{r.run}.zarr",
                                                               num_inference_steps=STEPS) for r in runs])
        result["sweep1_s"] = _timed(lambda: ats.sweep(pipe, PROMPTS, seeds, out=root / "s1", progress=False,
                                                      num_inference_steps=STEPS))
        result["sweep2_s"] = _timed(lambda: ats.sweep("shapes", PROMPTS, seeds, out=root / "s2", workers=2, threads=1,
                                                      progress=False, num_inference_steps=STEPS))
        for key, folder in (("sweep1", "s1"), ("sweep2", "s2")):  # from the first run's start to the last's end
            df = ats.open_catalog(root / folder).df
            result[f"{key}_steady_per_s"] = len(df) / (df.finished.max() - (df.finished - df.seconds).min())
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            result["map_local"] = measure_map(ats.open_catalog(root / "s1"), client, args.rounds)
            if not args.no_s3:
                result.update(_s3(pipe, seeds, client, args.rounds))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for key in ("plain", "capture_loop", "sweep1", "sweep2", "sweep_s3"):
        if f"{key}_s" in result:
            result[f"{key}_per_s"] = n / result[f"{key}_s"]
    result["machinery_ratio"] = result["sweep1_s"] / result["capture_loop_s"]
    result["plain_over_sweep1"] = result["sweep1_s"] / result["plain_s"]
    result["plain_over_sweep2"] = result["sweep2_s"] / result["plain_s"]
    print(f"{n} generations of {STEPS} steps, shapes model, 1 thread per process")
    for key, label in (("plain", "plain pipe() loop"), ("capture_loop", "ats.capture loop"), ("sweep1", "sweep, 1 worker"),
                       ("sweep2", "sweep, 2 workers"), ("sweep_s3", "sweep to S3, 1 worker")):
        if f"{key}_s" in result:
            print(f"  {label:24s} {result[f'{key}_s']:7.1f} s  {result[f'{key}_per_s']:.2f} generations/s")
    print(f"  steady state (first run's start to last run's end, model loading excluded): "
          f"1 worker {result['sweep1_steady_per_s']:.2f}, 2 workers {result['sweep2_steady_per_s']:.2f} generations/s")
    print(f"  sweep(1) time / capture loop time: {result['machinery_ratio']:.3f} (target <= 1.15)")
    print(f"  sweep time / plain time: 1 worker {result['plain_over_sweep1']:.2f}, 2 workers {result['plain_over_sweep2']:.2f}")
    for key in ("map_local", "map_s3"):
        if key in result:
            m = result[key]
            print(f"  map_stats {key[4:]:5s}: read {m['read_s']:.1f} s, DominanceRow {m['map_stats_s']:.1f} s, "
                  f"read / map = {m['ratio_read_over_map']:.2f} (target >= 0.7)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def _s3(pipe, seeds, client, rounds: int = 1) -> dict:
    """The sweep written to, and map_stats read from, a moto S3 server on localhost."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="bench")
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        url = "s3://bench/s1"
        out = {"sweep_s3_s": _timed(lambda: ats.sweep(pipe, PROMPTS, seeds, out=url, storage_options=options,
                                                      progress=False, num_inference_steps=STEPS))}
        out["map_s3"] = measure_map(ats.open_catalog(url, storage_options=options), client, rounds)
        return out
    finally:
        server.stop()


if __name__ == "__main__":
    main()

"""Download throughput of `ettin.data.remote.fetch_split` from an S3-compatible server on
loopback (moto in server mode, `pip install moto[server]`): serial (1 thread) vs parallel.

    .venv/bin/python bench/bench_remote.py [--shards 48] [--shard-mb 2] [--workers 8] [--latency-ms 0]

Prints MB/s for each and the parallel/serial ratio. Loopback has no network latency, so the gain
there comes only from overlapping request handling; `--latency-ms` adds a fixed delay to every
request the server answers (a crude stand-in for a remote store's round trip), where threads
help most. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=48)
    ap.add_argument("--shard-mb", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    from moto.server import ThreadedMotoServer

    if args.latency_ms:
        from moto.moto_server import werkzeug_app

        real = werkzeug_app.DomainDispatcherApplication.__call__

        def slow(self, environ, start_response):
            time.sleep(args.latency_ms / 1000)
            return real(self, environ, start_response)

        werkzeug_app.DomainDispatcherApplication.__call__ = slow

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["S3_ENDPOINT_URL"] = f"http://{host}:{port}"
    import boto3

    from ettin.data.remote import fetch_split, upload_tree

    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        from streaming import MDSWriter

        rng = np.random.default_rng(0)
        per = int(args.shard_mb * (1 << 20))
        with MDSWriter(
            out=str(work / "phase" / "train"),
            columns={"input_ids": "ndarray:uint32", "id": "str"},
            hashes=["sha1", "xxh64"],
            size_limit=per,
        ) as w:
            for i in range(int(args.shards * per / (4 * 1024 + 16))):
                w.write({"input_ids": rng.integers(0, 50000, 1024, dtype=np.uint32), "id": str(i)})
        total = sum(p.stat().st_size for p in (work / "phase" / "train").glob("*.mds"))
        n = len(list((work / "phase" / "train").glob("*.mds")))
        upload_tree(work / "phase", "s3://bench/phase", quiet=True)
        rates = {}
        for workers in (1, args.workers):
            best = 0.0
            for _ in range(args.repeats):
                shutil.rmtree(work / "cache", ignore_errors=True)
                t0 = time.perf_counter()
                fetch_split(
                    "s3://bench/phase", "train", work / "cache", workers=workers, quiet=True
                )
                best = max(best, total / (time.perf_counter() - t0) / 1e6)
            rates[workers] = best
            print(f"workers={workers:2d}: {best:7.1f} MB/s ({n} shards, {total / 1e6:.0f} MB)")
        ratio = rates[args.workers] / rates[1]
        print(
            f"parallel/serial download throughput: {ratio:.2f}x "
            f"({args.workers} workers, latency {args.latency_ms:g} ms, {os.cpu_count()} CPUs)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    main()

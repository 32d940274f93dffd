#!/usr/bin/env python3
"""Cold start: time from exec of `keel serve` on an empty data dir to the first
/readyz 200, measured from outside the process. Prints min / median / p90 / max in ms.

usage: bench/cold_start.py [--bin target/release/keel] [--runs 30]
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time


def one_run(binary: str) -> float:
    data = tempfile.mkdtemp(prefix="keel-cold-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=data, text=True,
    )
    try:
        addr = None
        for line in proc.stdout:
            if '"message":"listening"' in line:
                addr = json.loads(line)["addr"]
                break
        if addr is None:
            raise RuntimeError("keel exited before listening")
        host, port = addr.rsplit(":", 1)
        while True:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            try:
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return (time.perf_counter() - start) * 1000
            except OSError:
                pass
            finally:
                conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/keel")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    one_run(args.bin)  # warm the page cache for the binary itself
    times = sorted(one_run(args.bin) for _ in range(args.runs))
    p90 = times[int(0.9 * (len(times) - 1))]
    print(f"cold start to /readyz 200 over {len(times)} runs: "
          f"min {times[0]:.1f} ms, median {statistics.median(times):.1f} ms, "
          f"p90 {p90:.1f} ms, max {times[-1]:.1f} ms")


if __name__ == "__main__":
    main()

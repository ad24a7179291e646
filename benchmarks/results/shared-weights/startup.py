"""Start-up cost of verifying an engine folder: full sha256 at every start against the
verified-once stamp (runtime/manifest.py), and the whole EchoRuntime construction.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/shared-weights/startup.py ENGINE_DIR [--precision fp32]

Files are read from the page cache (warm: the folder was just read), so the hash time is sha256's
own speed on one core; a cold disk adds its read time to the full hash and nothing to a stamp.
Stamps go to a temporary ECHO_CACHE_DIR. Each number is the median of --repeat runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def _median(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", type=Path)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    os.environ["ECHO_CACHE_DIR"] = tempfile.mkdtemp(prefix="echo-stamps-")
    from runtime import EchoRuntime
    from runtime.manifest import load_manifest, sha256_file

    d = a.engine
    total = sum(f.stat().st_size for f in d.iterdir())
    w = d / f"weights.{a.precision}.bin"
    sha256_file(w)  # warm the page cache
    t_hash = _median(lambda: sha256_file(w), a.repeat)
    rate = w.stat().st_size / t_hash / 1e6
    print(f"folder {total / 1e6:.0f} MB; {w.name} {w.stat().st_size / 1e6:.0f} MB hashes in {t_hash:.3f} s = {rate:.0f} MB/s")

    os.environ["ECHO_VERIFY"] = "full"
    full = _median(lambda: load_manifest(d), a.repeat)
    os.environ["ECHO_VERIFY"] = "stamp"
    t = time.perf_counter()
    load_manifest(d)  # first start: hash + stamp (files older than STAMP_SETTLE_NS)
    first = time.perf_counter() - t
    stamped = _median(lambda: load_manifest(d), a.repeat)
    print(f"load_manifest: full hash {full:.3f} s | stamp, first start {first:.3f} s | stamp, later starts {stamped:.4f} s")

    rows = {}
    for verify in ("full", "stamp"):
        for share in (False, True):
            os.environ["ECHO_VERIFY"] = verify
            rows[(verify, share)] = _median(lambda: EchoRuntime(d, precision=a.precision, threads=1, share_weights=share),
                                            a.repeat)
    for (verify, share), s in rows.items():
        print(f"EchoRuntime(...) verify={verify:<5} share_weights={share!s:<5} {s:.3f} s")
    size_05b = 2.3e9
    print(f"extrapolated to 2.3 GB of fp32 weights at {rate:.0f} MB/s: full hash {size_05b / rate / 1e6:.1f} s per start")


if __name__ == "__main__":
    main()

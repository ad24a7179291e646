"""Wall time of `generate_synth` at the default size (not a test): python -m echo_train.data.synth.timing [OUT]."""
from __future__ import annotations

import sys
import tempfile
import time

from .generate import generate_synth


def main(argv: list[str]) -> None:
    out = argv[0] if argv else tempfile.mkdtemp(prefix="synth_timing_")
    workers = int(argv[1]) if len(argv) > 1 else 2
    t0 = time.perf_counter()
    meta = generate_synth(out, n_train=2000, n_val=200, n_test=200, image_size=128, seed=0, workers=workers)
    dt = time.perf_counter() - t0
    n = sum(meta["counts"].values())
    print(f"generate_synth: {n} studies at 128 px with {workers} workers in {dt:.1f} s ({n / dt:.0f} studies/s) -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env bash
# The one prepared device run: synthesise the test split there, then benchmarks/gpu_bench.sh
# (PyTorch eager on CUDA + transformers generate(), block 8, batch 1) on the carried runs/.
set -uo pipefail
: "${OUT:?}"
export PYTHONPATH=$PWD PY=python
python -m echo_train.cli synth --out data/synth --n-train 2000 --n-val 200 --n-test 200 --workers 12 > "$OUT/synth.log" 2>&1
N=${N:-40} THREADS=8 bash benchmarks/gpu_bench.sh --metrics finding_f1,bleu,rouge,validity

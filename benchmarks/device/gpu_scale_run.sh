#!/usr/bin/env bash
# The prepared device run of issue 19 (run it with the device's `run` tool, timeout_s 600):
#   1. the CUDA-graph decode loops against the reference decoders, captured on the GPU
#      (tests/test_cuda_graph_decode.py; it skips without CUDA);
#   2. python -m benchmarks.gpu_scale: 0.5B, 1.5B and 7B decoder shapes in bf16, batch 1 and 8,
#      block 8 and 16, 256-token reports, eager and CUDA graphs, transformers generate() beside.
# Results under $OUT (results.md, results.json, logs); cells are written as they finish, and no
# new shape starts after GPU_SCALE_SECONDS (default 330), so a run cut short keeps what it measured.
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
export PYTHONPATH=$PWD
PY=${PY:-python}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -m pytest -q -p no:cacheprovider tests/test_cuda_graph_decode.py > "$OUT/cuda_graph_test.log" 2>&1
echo "cuda graph test exit $?" | tee -a "$OUT/cuda_graph_test.log"
$PY -m benchmarks.gpu_scale --max-seconds "${GPU_SCALE_SECONDS:-330}" --out "$OUT/gpu_scale" 2>&1 | tee "$OUT/gpu_scale.log"

#!/usr/bin/env bash
# PyTorch eager on a CUDA GPU: AR / multi-step teacher / naive one-step / DCD one-step at block 8,
# batch 1, plus the transformers generate() baseline on the same AR weights. CPU engines are skipped.
#
#   OUT=/path/to/output benchmarks/gpu_bench.sh [extra echo-bench options]
#
# Needs runs/ar, runs/base, runs/echo and data/synth in the working tree (carry them to the GPU
# machine). Environment knobs: N (studies, default 100), BF16=1 (bf16 autocast), REPEATS (default 1),
# PY (python with torch + this project importable; default .venv/bin/python, else python3).
# Writes $OUT/bench/{results.json,results.md,quality_vs_latency.png}, $OUT/bench.log, $OUT/nvidia-smi.txt.
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/.."
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
EXTRA=()
if [ "${BF16:-0}" = "1" ]; then EXTRA+=(--bf16); fi
"$PY" -m benchmarks.cli \
  --device cuda --engines pytorch,hf --methods ar,teacher,naive,dcd --block-sizes 8 \
  --throughput-batch 1 --n "${N:-100}" --repeats "${REPEATS:-1}" --warmup 3 --threads "${THREADS:-4}" \
  --data "${DATA:-data/synth}" --ar-ckpt runs/ar --teacher-ckpt runs/base --echo-ckpt runs/echo \
  --out "$OUT/bench" --name gpu "${EXTRA[@]}" "$@" 2>&1 | tee "$OUT/bench.log"

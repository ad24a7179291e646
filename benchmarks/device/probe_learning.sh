#!/usr/bin/env bash
# One prepared GPU run: how many steps each stage needs on the tiny preset (a learning-curve
# probe, not a benchmark). Writes logs and a JSON summary into $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/probe_out}
mkdir -p "$OUT"
PY=python
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
# the device has torch+CUDA; bring the rest from carried wheels when missing
$PY -c "import transformers, tokenizers, safetensors, click, tqdm, PIL" 2>/dev/null || \
  pip install -q --no-index --find-links .wheels transformers tokenizers safetensors click tqdm pillow > "$OUT/pip.log" 2>&1
$PY -c "import transformers; print('transformers', transformers.__version__)" >> "$OUT/env.txt" 2>&1
export PYTHONPATH=$PWD
D=/tmp/synth; R=/tmp/runs
$PY -m echo_train.cli synth --out $D --n-train 2000 --n-val 200 --n-test 200 --workers 12 > "$OUT/synth.log" 2>&1
ev() { $PY -m echo_train.cli generate --ckpt "$1" --data $D --mode "$2" ${3:-} --n 200 --batch-size 50 --device cuda 2>/dev/null | tr -d '\n' ; echo; }
for s in 300 800 1500; do
  $PY -m echo_train.cli stage1 --data $D --out $R/ar --steps $s --eval-every 100000 --save-every 100000 --device cuda >> "$OUT/stage1.log" 2>&1
  echo "stage1@$s $(ev $R/ar ar)" | tee -a "$OUT/summary.txt"
done
for s in 300 800; do
  $PY -m echo_train.cli stage2 --data $D --init $R/ar --out $R/base --steps $s --eval-every 100000 --save-every 100000 --device cuda >> "$OUT/stage2.log" 2>&1
  echo "stage2@$s multistep $(ev $R/base multistep)" | tee -a "$OUT/summary.txt"
  echo "stage2@$s naive $(ev $R/base onestep-unfused)" | tee -a "$OUT/summary.txt"
done
for s in 200 500; do
  $PY -m echo_train.cli stage3 --data $D --init $R/base --out $R/echo --steps $s --save-every 100000 --device cuda >> "$OUT/stage3.log" 2>&1
  echo "stage3@$s onestep $(ev $R/echo onestep)" | tee -a "$OUT/summary.txt"
done

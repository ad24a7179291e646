#!/bin/bash
# 3B rung in int4: random Qwen2.5-VL-3B folder -> import (fixed grid) -> AR twin (hard link)
# -> echo-export build --precision int4 with both families, verify on 2 images.
set -x
cd /work/main; export PYTHONPATH=$PWD OMP_NUM_THREADS=1
Q=/tmp/q3i; PY=/work/main/.venv/bin/python
date
$PY -m benchmarks.random_qwen_vl --size 3b --out $Q/hf > $Q/write.log 2>&1 || exit 1
/usr/bin/time -v $PY -m echo_train.cli import-hf $Q/hf --out $Q/ck --stage dcd --block-size 8 --fixed-grid \
   --max-response-tokens 64 > $Q/import.log 2>&1 || exit 1
mkdir -p $Q/ck-ar && ln -f $Q/ck/model.safetensors $Q/ck-ar/model.safetensors && cp $Q/ck/tokenizer.json $Q/ck-ar/
$PY - <<'PY'
import json; p="/tmp/q3i/ck/config.json"; c=json.load(open(p)); c["stage"]="ar"
json.dump(c, open("/tmp/q3i/ck-ar/config.json","w"), indent=1)
PY
rm -rf $Q/hf
date
/usr/bin/time -v $PY -m echo_export.cli build --ckpt $Q/ck --ar-ckpt $Q/ck-ar --out $Q/engine \
  --precision int4 --batch-sizes 1 --verify-n 2 --calib-size 2 --max-new-tokens 32 \
  --data /work/ladder-runs/data --summary-json $Q/summary.json --force > $Q/build.log 2>&1
echo "rc=$?" >> $Q/build.log
date

#!/bin/bash
# Issue 28: the Qwen2.5-VL-3B-shaped folder imported in the official layout at native resolution,
# built fp16 on this 24 GB machine, then a report on a real-size (2000 x 2500 px) radiograph.
# Each step's time and peak RSS go to $Q/<step>.time; the logs beside them.
set -e
cd "$(dirname "$0")/../../../.."
Q=${Q:-/tmp/q3bn}
R=${R:-benchmarks/results/scale/qwen2.5-vl-3b-native}; mkdir -p $R
mkdir -p $Q
step() { name=$1; shift; echo "=== $name: $*"; /usr/bin/time -o $Q/$name.time -f "%e s, max RSS %M kB" "$@" > $Q/$name.log 2>&1; cat $Q/$name.time; tail -5 $Q/$name.log; }
[ -f $Q/hf/config.json ] || step write .venv/bin/python -m benchmarks.random_qwen_vl --size 3b $WRITE_ARGS --out $Q/hf
[ -f $Q/data/test.json ] || step synth .venv/bin/python -m echo_train.cli synth --out $Q/data --n-train 2 --n-val 1 --n-test 2 --image-size 512
step import .venv/bin/python -m echo_train.cli import-hf $Q/hf --out $Q/ckpt --stage dcd --block-size 8 --force
step build .venv/bin/python -m echo_export.cli build --ckpt $Q/ckpt --out $Q/engine --precision fp16 --batch-sizes 1 \
  --verify-n 1 --max-new-tokens 16 --data $Q/data --summary-json $Q/build.json --force
# a radiograph at a real detector size: the synthetic study rendered at 2048 px, resized to 2000 x 2500
.venv/bin/python -m echo_train.cli synth --out $Q/big --n-train 1 --n-val 1 --n-test 1 --image-size 2048 > /dev/null
.venv/bin/python - "$Q" <<'PY'
import json, sys
from pathlib import Path
from PIL import Image
q = Path(sys.argv[1])
rec = json.loads((q / "big" / "test.json").read_text())[0]
Image.open(q / "big" / rec["images"][0]).resize((2000, 2500), Image.BICUBIC).save(q / "radiograph_2000x2500.png")
PY
step report .venv/bin/python -m runtime.cli --engine-dir $Q/engine --precision fp32 --format json --max-new-tokens 16 -v \
  $Q/radiograph_2000x2500.png
cp $Q/build.json $R/build.summary.json; cp $Q/engine/verify.json $R/verify.json
for s in write synth import build report; do [ -f $Q/$s.time ] && echo "$s: $(cat $Q/$s.time)"; done > $R/steps.txt
cp $Q/import.log $R/import.log; cp $Q/build.log $R/build.log; cp $Q/report.log $R/echo-report.log
du -sh $Q/engine >> $R/steps.txt

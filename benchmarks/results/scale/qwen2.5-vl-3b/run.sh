#!/bin/bash
# The 3B-shaped import + fp16 export on this 24 GB machine; each step's time and peak RSS.
set -e
cd /work/main
Q=/tmp/q3b
T="/usr/bin/time -f %e_s_%M_kB"
touch /tmp/echo_heavy
step() { name=$1; shift; echo "=== $name: $*"; /usr/bin/time -o $Q/$name.time -f "%e s, max RSS %M kB" "$@" > $Q/$name.log 2>&1; cat $Q/$name.time; tail -5 $Q/$name.log; }
[ -f $Q/hf/config.json ] || step write .venv/bin/python -m benchmarks.random_qwen_vl --size 3b --out $Q/hf
[ -f $Q/ckpt/model.safetensors ] || step import .venv/bin/echo-train import-hf $Q/hf --out $Q/ckpt --stage dcd --block-size 8
step build .venv/bin/echo-export build --ckpt $Q/ckpt --out $Q/engine --precision fp16 --batch-sizes 1 --verify-n 2 \
  --max-new-tokens 16 --data $Q/data --summary-json $Q/build.json --force
df -h /tmp | tail -1
du -sh $Q/*
rm -f /tmp/echo_heavy

#!/bin/bash
# 3B then 7B int4 runtime probes (RSS, fused + AR decode tokens/s, isolated t(1)/t(2B), roofline), 2 threads
cd /work/main; export PYTHONPATH=$PWD OMP_NUM_THREADS=2
IMG=$(cat /tmp/probe-images.txt)

for q in q3i q7f; do
  date; cat /proc/loadavg
  /usr/bin/time -v .venv/bin/python -m benchmarks.scale --probe /tmp/$q/engine --probe-precision int4 --max-new-tokens 16 \
     --threads 2 --pass-repeats 5 --probe-out /tmp/$q/runtime.int4.ar.json $IMG > /tmp/$q/probe.log 2>&1
  echo "$q rc=$?"; cat /proc/loadavg
done
date

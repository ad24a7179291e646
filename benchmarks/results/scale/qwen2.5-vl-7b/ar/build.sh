#!/bin/bash
# 7B rung, both families in int4: the one-step student and its AR twin (same weights, hard link), so
# the runtime can time t(1) (ar_step) beside t(2B) (block_step) and the achieved DCD/AR speed-up.
cd /work/main; export PYTHONPATH=$PWD
Q=/tmp/q7f
# wait for the 3B build and the 1.5B rung's build (memory)
while pgrep -f 'echo_export.cli build --ckpt /tmp/q3i' >/dev/null || pgrep -f 'benchmarks.scale --rungs qwen2.5-1.5b' >/dev/null; do sleep 15; done
date; touch /work/7b.lock
/usr/bin/time -v /work/main/.venv/bin/python -m echo_export.cli build --ckpt $Q/ck --ar-ckpt $Q/ck-ar --out $Q/engine \
  --precision int4 --batch-sizes 1 --verify-n 0 --precision-opt int4.method=rtn --max-new-tokens 16 \
  --data /work/ladder-runs/data --summary-json $Q/summary-ar.json --force > $Q/build-ar.log 2>&1 &
pid=$!
: > $Q/mem-ar.log
while kill -0 $pid 2>/dev/null; do
  avail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
  if [ "$avail" -lt 1000000 ]; then echo "WATCHDOG: MemAvailable ${avail} kB, stopping build $pid" >> $Q/build-ar.log; pkill -P $pid; kill $pid; fi
  py=$(pgrep -P $pid | head -1)
  if [ -n "$py" ]; then
    echo "$(date +%s) $(awk '/RssAnon|RssFile|VmRSS/{printf "%s %s ", $1, $2}' /proc/$py/status 2>/dev/null) avail $avail" >> $Q/mem-ar.log
  fi
  sleep 2
done
wait $pid; echo "rc=$?" >> $Q/build-ar.log
rm -f /work/7b.lock; date

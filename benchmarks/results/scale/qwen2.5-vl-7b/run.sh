#!/bin/bash
# build with a memory watchdog: kill the build (only it) if MemAvailable drops under 2.5 GB
cd /work/wt-dtype; export PYTHONPATH=$PWD
/usr/bin/time -v /work/main/.venv/bin/python -m echo_export.cli build --ckpt /tmp/q7/ck --out /tmp/q7/engine \
  --precision fp16 --batch-sizes 1 --verify-n 1 --data /work/ladder-runs/data --summary-json /tmp/q7/summary.json --force "$@" &
pid=$!
while kill -0 $pid 2>/dev/null; do
  avail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
  if [ "$avail" -lt 2500000 ]; then echo "WATCHDOG: MemAvailable ${avail} kB, stopping build $pid"; pkill -P $pid; kill $pid; fi
  sleep 1
done
wait $pid; echo "rc=$?"

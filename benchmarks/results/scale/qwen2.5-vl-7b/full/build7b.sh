#!/bin/bash
cd /work/wt-int2; export PYTHONPATH=$PWD
Q=/tmp/q7f
touch /work/7b.lock; date
/usr/bin/time -v /work/main/.venv/bin/python -m echo_export.cli build --ckpt $Q/ck --out $Q/engine \
  --precision fp16,int4 --batch-sizes 1 --verify-n 2 --precision-opt int4.method=rtn --max-new-tokens 16 \
  --data /work/ladder-runs/data --summary-json $Q/summary.json --force > $Q/build.log 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  avail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
  if [ "$avail" -lt 1200000 ]; then echo "WATCHDOG: MemAvailable ${avail} kB, stopping build $pid" >> $Q/build.log; pkill -P $pid; kill $pid; fi
  py=$(pgrep -P $pid | head -1)
  if [ -n "$py" ]; then
    echo "$(date +%s) $(awk '/RssAnon|RssFile|VmRSS/{printf "%s %s ", $1, $2}' /proc/$py/status 2>/dev/null) avail $avail" >> $Q/mem.log
  fi
  sleep 2
done
wait $pid; echo "rc=$?" >> $Q/build.log
rm -f /work/7b.lock

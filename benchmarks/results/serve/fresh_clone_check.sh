#!/bin/bash
# echo-serve on the engines of a `make demo` run, checked against echo-report by curl and tritonclient:
#   benchmarks/results/serve/fresh_clone_check.sh CLONE [WORK]
# CLONE: a checkout where `make demo` ran (engines/echo, data/synth); WORK: scratch folder.
set -eu
CLONE=$(cd "${1:?a checkout where make demo ran}" && pwd); WORK=${2:-/tmp/echo_serve_check}
M=$(cd "$(dirname "$0")/../../.." && pwd); PY=$M/.venv/serve/bin/python
ENG=$CLONE/engines/echo; DATA=$CLONE/data/synth
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
IMGS=$($PY -c "import json;d=json.load(open('$DATA/test.json'));print(' '.join('$DATA/'+s['images'][0] for s in d[:3]))")
$M/.venv/serve/bin/echo-report --engine-dir "$ENG" --format json $IMGS > expected.jsonl
$M/.venv/serve/bin/echo-serve --engine-dir "$ENG" --instances 2 --port 8710 --grpc-port 8711 --metrics-port 8712 \
  > triton.log 2> serve.err &
PID=$!; trap 'kill $PID 2>/dev/null || true' EXIT
for i in $(seq 1 180); do
  c=$(curl -s localhost:8710/v2/health/ready -o /dev/null -w '%{http_code}' || true); [ "$c" = 200 ] && break; sleep 1
done
echo "ready after ${i} s: HTTP $c"
n=0
for p in $IMGS; do
  curl -s localhost:8710/v2/models/echo/infer -H 'Content-Type: application/json' -d \
    "{\"inputs\":[{\"name\":\"image\",\"shape\":[1,1],\"datatype\":\"BYTES\",\"data\":[\"$(base64 -w0 $p)\"]}]}" > "unary.$n.json"
  curl -sN localhost:8710/v2/models/echo_stream/generate_stream -d "{\"image\":\"$(base64 -w0 $p)\"}" > "stream.$n.sse"
  n=$((n + 1))
done
(cd "$M" && $PY tests/test_serve_client.py 127.0.0.1:8710 127.0.0.1:8711 $IMGS) > tritonclient.json
curl -s localhost:8712/metrics | grep '^nv_inference_request_success' || true
$PY - <<'PY'
import json
want = [json.loads(line) for line in open("expected.jsonl")]
tc = json.load(open("tritonclient.json"))
ok = 0
for i, w in enumerate(want):
    unary = {o["name"]: o["data"] for o in json.load(open(f"unary.{i}.json"))["outputs"]}["text"][0]
    events = [json.loads(l[5:]) for l in open(f"stream.{i}.sse").read().splitlines() if l.startswith("data:")]
    same = [unary == w["text"], events[-1]["text"] == w["text"], tc["http"][i]["text"] == w["text"],
            tc["stream"][i]["events"][-1]["text"] == w["text"]]
    ok += all(same)
    print(f"image {i}: curl unary / curl stream ({len(events)} events) / tritonclient http / grpc stream "
          f"equal echo-report: {same}; {w['forward_passes']} passes")
print(f"{ok} of {len(want)} images: every path equals echo-report")
print("bad bytes on the gRPC stream:", tc["bad_stream"]["error"])
raise SystemExit(0 if ok == len(want) else 1)
PY

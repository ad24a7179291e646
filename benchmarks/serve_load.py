"""Load and faults of `echo-serve` (issue 18, item 4): its own server, only 127.0.0.1, bounded.

    .venv/serve/bin/python -m benchmarks.serve_load [--engine-dir engines/echo] [--images data/synth/images]
        [--instances 1,2] [--concurrency 1,4,16,64] [--requests N] [--max-seconds S] [--out benchmarks/results/serve]

For each instance count it starts `python -m echo_serve` (a subprocess in its own session, on free
ports of 127.0.0.1), takes each test image's report from one lone request (the reference), then
drives each concurrency level with N requests (default max(32, 4 x concurrency); a level stops
issuing after --max-seconds) as KServe v2 HTTP requests with the image as binary tensor data and a
request id. Per level: p50/p95 latency, reports/s, every request answered exactly once (the id in
each answer checked against the ids sent: none lost, none twice, none foreign), each answer's text
equal to the reference for its image, and the batches Triton formed: from its metrics endpoint
(nv_inference_count / nv_inference_exec_count) and from each answer's batch_items (images decoded
together) and graph_batch (the engine batch size).

On the last server (the most instances) it then sends bad inputs (corrupt image bytes, a text
file, a 50 MB body, an empty image, an empty body, an unknown model name, and a corrupt image
batched with good ones), each checked for a 4xx answer carrying the runtime's message and
followed by a good request. Then, for each of --kill (default echo_0_1,echo_0_0), on a fresh
server of that instance count: SIGKILL to that instance's Python-backend stub during a
concurrency-16 run; it reports how many requests failed and whether (and when) the server
answered again from every instance (echo-serve restarts itself when a stub dies; where it does
not recover, one model reload through Triton's repository API is tried and reported). Writes
load.json and load.md under --out; exits 1 when a load answer was lost, duplicated, foreign or
failed, or a bad input was not a 4xx.

Standard library only on the client side (http.client), so tests in either environment can
import it; the server side needs the serve environment (.venv/serve).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import http.client
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from .sysinfo import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "echo"
OUTPUTS = ("text", "error", "batch_items", "graph_batch", "instance")
BIG_BODY = 50 * 1024 * 1024


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EchoServe:
    """`python -m echo_serve` on free ports of 127.0.0.1, in its own session (process group)."""

    def __init__(self, engine_dir: str, instances: int, extra: tuple[str, ...] = (), python: str = sys.executable,
                 log_dir: Optional[Path] = None, ready_timeout: float = 300) -> None:
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.url = f"127.0.0.1:{self.http}"
        self.instances = instances
        cmd = [python, "-m", "echo_serve", "--engine-dir", str(engine_dir), "--instances", str(instances),
               "--host", "127.0.0.1", "--port", str(self.http), "--grpc-port", str(self.grpc),
               "--metrics-port", str(self.metrics), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.lines: list[str] = []
        self.triton_lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=env, start_new_session=True)
        self._readers = [threading.Thread(target=self._read, args=(f, out), daemon=True)
                         for f, out in ((self.proc.stderr, self.lines), (self.proc.stdout, self.triton_lines))]
        for t in self._readers:
            t.start()
        t0 = time.time()
        while not any(x.startswith("echo-serve: ready") for x in self.lines):
            if self.proc.poll() is not None or time.time() - t0 > ready_timeout:
                self.stop()
                raise RuntimeError(f"echo-serve did not get ready (exit {self.proc.returncode}):\n{self.log}")
            time.sleep(0.05)
        self.ready_s = time.time() - t0

    @staticmethod
    def _read(stream, out: list) -> None:
        for line in stream:
            out.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.triton_lines[-30:] + ["-- echo-serve:"] + self.lines[-30:])

    def stub_pids(self) -> dict[str, int]:
        """The Python-backend stub processes of this server: {instance name (echo_0_1, ...): pid}."""
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.getpgid(int(d.name)) != self.proc.pid:
                    continue
                args = (d / "cmdline").read_bytes().split(b"\0")
            except (OSError, ProcessLookupError):
                continue
            if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 8:
                out[args[8].decode()] = int(d.name)
        return out

    def stop(self, timeout: float = 90) -> Optional[int]:
        t0 = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # Triton and its stubs share the group: none may outlive the run
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.stop_s = round(time.time() - t0, 1)
        return self.proc.returncode


# ----------------------------------------------------------------------------- the client
def infer_body(image: bytes, rid: Optional[str], outputs=OUTPUTS) -> tuple[bytes, dict]:
    """A KServe v2 infer request with the image as binary tensor data (what tritonclient sends)."""
    header = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": 4 + len(image)}}],
              "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in outputs]}
    if rid is not None:
        header["id"] = rid
    h = json.dumps(header).encode()
    return h + len(image).to_bytes(4, "little") + image, {"Inference-Header-Content-Length": str(len(h)),
                                                         "Content-Type": "application/octet-stream"}


def post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    conn.request("POST", path, body=body, headers=headers)
    r = conn.getresponse()
    raw = r.read()
    try:
        return r.status, json.loads(raw) if raw else {}
    except ValueError:
        return r.status, {"error": raw.decode("utf-8", "replace")}


def answer(resp: dict) -> dict:
    """The outputs of one `echo` answer as {name: first value}, plus its id."""
    out = {o["name"]: o["data"][0] for o in resp.get("outputs", [])}
    out["id"] = resp.get("id")
    return out


def metrics(port: int, model: str = MODEL) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
                 "nv_inference_request_failure"):
        vals = re.findall(rf'^{name}{{([^}}]*)}} (\S+)$', body, re.M)
        out[name] = sum(float(v) for labels, v in vals if f'model="{model}"' in labels)
    return out


def drive(url: str, jobs: list[tuple[str, bytes]], concurrency: int, max_seconds: float,
          on_answer: Optional[Callable[[int], None]] = None, timeout: float = 300) -> dict:
    """Send jobs [(request id, image bytes)] from `concurrency` threads, each on its own keep-alive
    connection, until done or max_seconds have passed (then no new ones start). Returns per job
    that was sent: its id, status, answer or error, latency."""
    host, port = url.split(":")
    lock = threading.Lock()
    nxt = [0]
    sent: list[dict] = []
    t_end = time.perf_counter() + max_seconds

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        while True:
            with lock:
                if nxt[0] >= len(jobs) or time.perf_counter() > t_end:
                    break
                rid, image = jobs[nxt[0]]
                nxt[0] += 1
            rec = {"sent_id": rid, "status": None}
            body, headers = infer_body(image, rid)
            t = time.perf_counter()
            try:
                rec["status"], resp = post(conn, f"/v2/models/{MODEL}/infer", body, headers)
                if rec["status"] == 200:
                    rec["answer"] = answer(resp)
                else:
                    rec["error"] = resp.get("error", "")
            except (OSError, http.client.HTTPException) as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
            rec["latency_s"] = time.perf_counter() - t
            with lock:
                sent.append(rec)
                n = len(sent)
            if on_answer is not None:
                on_answer(n)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"records": sent, "wall_s": time.perf_counter() - t0, "not_sent": len(jobs) - len(sent)}


def exactly_once(records: list[dict], expected_text: dict[str, str]) -> dict:
    """Check each answered request against the ids sent: lost (no answer carrying its id, nor an
    error answer), duplicated (an id answered twice), foreign (an answer carrying an id that was
    not sent on that request), wrong text (an answer whose text is not its image's reference),
    failed (no 200: an error answer, or none)."""
    sent = Counter(r["sent_id"] for r in records)
    got = Counter(r["answer"]["id"] for r in records if "answer" in r)
    errored = {r["sent_id"] for r in records if r.get("status") not in (None, 200)}  # an error answer is an answer
    foreign = sum(1 for r in records if "answer" in r and r["answer"]["id"] != r["sent_id"])
    wrong = sum(1 for r in records if "answer" in r and r["answer"]["text"] != expected_text.get(r["sent_id"]))
    return {"sent": sum(sent.values()), "answered_200": sum(got.values()),
            "failed": sum(1 for r in records if r.get("status") != 200),
            "lost": sum(1 for i in sent if got[i] == 0 and i not in errored),
            "duplicated": sum(1 for i in got if got[i] > 1),
            "foreign": foreign, "wrong_text": wrong}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cell(server: EchoServe, images: list[tuple[str, bytes]], reference: dict[str, str], concurrency: int,
         n: int, max_seconds: float, tag: str, on_answer=None, timeout: float = 300) -> dict:
    jobs = [(f"{tag}-{k}", images[k % len(images)][1]) for k in range(n)]
    expected = {rid: reference[images[k % len(images)][0]] for k, (rid, _) in enumerate(jobs)}
    m0 = metrics(server.metrics)
    run = drive(server.url, jobs, concurrency, max_seconds, on_answer=on_answer, timeout=timeout)
    m1 = metrics(server.metrics)
    recs = run["records"]
    ok = [r for r in recs if "answer" in r]
    lat = [r["latency_s"] * 1000 for r in ok]
    d = {k: m1[k] - m0[k] for k in m0}
    items = Counter(int(r["answer"]["batch_items"]) for r in ok)
    return {
        "instances": server.instances, "concurrency": concurrency, "requests": n, "not_sent": run["not_sent"],
        **exactly_once(recs, expected),
        "wall_s": round(run["wall_s"], 3), "reports_per_s": round(len(ok) / run["wall_s"], 2) if run["wall_s"] else 0,
        "p50_ms": round(pct(lat, 0.5), 1), "p95_ms": round(pct(lat, 0.95), 1),
        "triton_inferences": d["nv_inference_count"], "triton_executions": d["nv_inference_exec_count"],
        "triton_mean_batch": round(d["nv_inference_count"] / d["nv_inference_exec_count"], 2)
        if d["nv_inference_exec_count"] else None,
        "triton_failures": d["nv_inference_request_failure"],
        # batch_items = requests Triton put in that execution (one image each): k answers per batch of k
        "batches_by_size": {str(k): round(c / k, 2) for k, c in sorted(items.items())},
        "graph_batch": {str(k): c for k, c in sorted(Counter(int(r["answer"]["graph_batch"]) for r in ok).items())},
        "answers_by_instance": {str(k): c for k, c in sorted(Counter(int(r["answer"]["instance"]) for r in ok).items())},
        "errors": sorted({_short(r.get("error", "")) for r in recs if r.get("status") != 200}),
    }


def _short(msg: str, head: int = 160, tail: int = 400) -> str:
    """A long error (a traceback) as its first and last lines: the last say what went wrong."""
    msg = msg.strip()
    return msg if len(msg) <= head + tail else msg[:head] + " [...] " + msg[-tail:]


# ----------------------------------------------------------------------------- bad inputs and faults
def one(url: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        return post(conn, path, body, headers)
    except (OSError, http.client.HTTPException) as e:
        return -1, {"error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def runtime_message(data: bytes) -> Optional[str]:
    """What the runtime's decoder says about these bytes (None: it reads them)."""
    from runtime.errors import ImageReadError
    from runtime.preprocess import decode_image_bytes

    try:
        decode_image_bytes(data, "image")
    except ImageReadError as e:
        return str(e)
    return None


def bad_inputs(server: EchoServe, good: tuple[str, bytes], reference: dict[str, str],
               only: Optional[list[str]] = None) -> list[dict]:
    name, png = good
    path = f"/v2/models/{MODEL}/infer"
    text = b"ECHO load test: this is a text file, not an image.\n" * 20
    cases = {
        "corrupt_image": ("image", png[: len(png) // 3]),
        "text_file": ("image", text),
        "50MB_body": ("image", os.urandom(BIG_BODY)),
        "empty_image": ("image", b""),
        "empty_body": ("raw", b""),
        "unknown_model": ("model", png),
    }
    out = []
    for case, (kind, data) in cases.items():
        if only and case not in only:
            continue
        if kind == "raw":
            code, resp = one(server.url, path, data, {"Content-Type": "application/json"})
            want = None  # Triton's own parser answers: no image reached the runtime
        else:
            body, headers = infer_body(data, f"bad-{case}")
            code, resp = one(server.url, "/v2/models/no_such_model/infer" if kind == "model" else path, body, headers)
            want = runtime_message(data) if kind == "image" else None
        msg = resp.get("error", "") if code != 200 else ""
        after_code, after = one(server.url, path, *infer_body(png, f"after-{case}"))
        out.append({"case": case, "body_bytes": len(data), "status": code, "message": msg[:400],
                    "runtime_message": want, "carries_runtime_message": (want in msg) if want else None,
                    "is_4xx": 400 <= code < 500,
                    "good_request_after": after_code == 200 and answer(after)["text"] == reference[name]})
    return out


def mixed_batch(server: EchoServe, images: list[tuple[str, bytes]], reference: dict[str, str], n_good: int) -> dict:
    """n_good good requests and one corrupt image at once: Triton batches them together; only the
    corrupt one may fail."""
    bad = images[0][1][:200]
    jobs = [(f"mix-{k}", images[k % len(images)][1]) for k in range(n_good)] + [("mix-bad", bad)]
    m0 = metrics(server.metrics)
    run = drive(server.url, jobs, len(jobs), 120)
    m1 = metrics(server.metrics)
    recs = {r["sent_id"]: r for r in run["records"]}
    goods = [recs[f"mix-{k}"] for k in range(n_good)]
    b = recs["mix-bad"]
    ok = sum(1 for k, r in enumerate(goods) if r.get("status") == 200
             and r["answer"]["text"] == reference[images[k % len(images)][0]])
    return {"good_requests": n_good, "good_answered_200_right_text": ok, "bad_status": b.get("status"),
            "bad_message": b.get("error", "")[:300], "bad_runtime_message": runtime_message(bad),
            "max_batch_items_of_good": max((int(r["answer"]["batch_items"]) for r in goods if "answer" in r), default=0),
            "triton_inferences": m1["nv_inference_count"] - m0["nv_inference_count"],
            "triton_executions": m1["nv_inference_exec_count"] - m0["nv_inference_exec_count"]}


def get_code(url: str, path: str, method: str = "GET") -> int:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        r = conn.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException):
        return -1
    finally:
        conn.close()


def probe_until_served(server: EchoServe, images: list[tuple[str, bytes]], seconds: float, t_ref: float) -> dict:
    """Rounds of 2 x instances concurrent good requests until one round is all 200 from every
    instance, or `seconds` have passed. Returns the probes and when (from t_ref) it recovered."""
    probes, recovered = [], None
    t0 = time.perf_counter()
    k = 0
    while time.perf_counter() - t0 < seconds:
        jobs = [(f"probe-{k}-{j}", images[j % len(images)][1]) for j in range(2 * server.instances)]
        k += 1
        run = drive(server.url, jobs, len(jobs), 60, timeout=60)
        codes = Counter(r.get("status") for r in run["records"])
        inst = sorted({int(r["answer"]["instance"]) for r in run["records"] if "answer" in r})
        probes.append({"t_s": round(time.perf_counter() - t_ref, 1), "codes": {str(c): v for c, v in codes.items()},
                       "instances": inst, "model_ready": get_code(server.url, f"/v2/models/{MODEL}/ready"),
                       "server_ready": get_code(server.url, "/v2/health/ready")})
        if codes.get(200, 0) == len(jobs) and len(inst) == server.instances:
            recovered = time.perf_counter() - t_ref
            break
        time.sleep(1)
    return {"probes": probes, "recovered_s": None if recovered is None else round(recovered, 1)}


def kill_instance(server: EchoServe, images: list[tuple[str, bytes]], reference: dict[str, str], n: int,
                  kill_after: int, recover_s: float, concurrency: int = 16, target: str = f"{MODEL}_0_1",
                  request_timeout: float = 60) -> dict:
    """A concurrency-16 run (by default) during which the Python-backend stub of one `echo`
    instance (Triton's name: echo_0_K) is SIGKILLed after kill_after answers; then up to
    recover_s seconds of probing until every instance answers; where it does not, one reload of
    the model through Triton's repository API (POST /v2/repository/models/echo/load) and as long
    again of probing."""
    stubs = server.stub_pids()
    killed: dict = {}

    def on_answer(k: int) -> None:
        if k >= kill_after and not killed:
            killed["at_answer"] = k
            killed["pid"] = stubs.get(target)
            killed["t"] = time.perf_counter()
            killed["log_from"] = len(server.triton_lines)
            killed["serve_from"] = len(server.lines)
            if killed["pid"]:
                os.kill(killed["pid"], signal.SIGKILL)

    res = cell(server, images, reference, concurrency, n, 600, f"kill-{target}", on_answer=on_answer,
               timeout=request_timeout)
    t_kill = killed.get("t", time.perf_counter())
    first = probe_until_served(server, images, recover_s, t_kill)
    after = server.stub_pids()
    out = {"killed": target, "killed_pid": killed.get("pid"), "at_answer": killed.get("at_answer"),
           "request_timeout": request_timeout, "serve_lines_after_kill": [],
           "stubs_before": sorted(stubs), "stub_alive_after": target in after, "stub_pid_after": after.get(target),
           "run": res, "recovered": first["recovered_s"] is not None, "recovered_s_after_kill": first["recovered_s"],
           "probes": first["probes"][-3:], "probe_rounds": len(first["probes"])}
    if first["recovered_s"] is None:  # what an operator could do without restarting echo-serve
        t = time.perf_counter()
        out["reload_status"], out["reload_message"] = one(server.url, f"/v2/repository/models/{MODEL}/load", b"",
                                                          {"Content-Type": "application/json"})
        out["reload_message"] = _short(out["reload_message"].get("error", ""))
        out["reload_s"] = round(time.perf_counter() - t, 1)
        second = probe_until_served(server, images, recover_s, t_kill)
        out.update(recovered_after_reload=second["recovered_s"] is not None,
                   recovered_s_after_kill=second["recovered_s"], probes_after_reload=second["probes"][-3:])
    out["server_alive"] = server.proc.poll() is None
    out["serve_lines_after_kill"] = [x for x in server.lines[killed.get("serve_from", 0):]
                                     if x.startswith("echo-serve:")][:6]
    out["triton_log_after_kill"] = [_short(x, 100, 300) for x in server.triton_lines[killed.get("log_from", 0):]
                                    if x[:1] and x[0] in "EW" or "healthy" in x or "Stub" in x][:6]
    return out


# ----------------------------------------------------------------------------- the report
def write_markdown(res: dict, path: Path) -> None:
    L = ["# echo-serve under load", "",
         f"`{res['command']}`", "",
         f"{res['machine']['cpus']} CPU cores ({res['machine']['cpu']}), engine `{res['engine_dir']}` "
         f"(batch sizes {res['batch_sizes']}), {len(res['images'])} test images, {res['date']}. "
         "HTTP KServe v2, image as binary tensor data, one request = one image; latency is per request, "
         "client side. `batches` = executions Triton formed, by size (from each answer's batch_items); "
         "`mean batch` = nv_inference_count / nv_inference_exec_count from Triton's metrics.", "",
         "| instances | concurrency | requests | p50 ms | p95 ms | reports/s | mean batch | batches (size: count) "
         "| engine batch (b: answers) | lost | dup | wrong text | failed |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        L.append(f"| {c['instances']} | {c['concurrency']} | {c['sent']} | {c['p50_ms']} | {c['p95_ms']} | "
                 f"{c['reports_per_s']} | {c['triton_mean_batch']} | "
                 + ", ".join(f"{k}: {v:g}" for k, v in c["batches_by_size"].items())
                 + " | " + ", ".join(f"b{k}: {v}" for k, v in c["graph_batch"].items())
                 + f" | {c['lost']} | {c['duplicated']} | {c['wrong_text']} | {c['failed']} |")
    if res.get("c16_2_vs_1") is not None:
        L += ["", f"Throughput at concurrency 16: 2 instances {res['c16_2_vs_1']['2']} reports/s against 1 instance "
              f"{res['c16_2_vs_1']['1']} reports/s: x{res['c16_2_vs_1']['ratio']}."]
    tot = {k: sum(c[k] for c in res["cells"]) for k in ("sent", "lost", "duplicated", "foreign", "wrong_text", "failed")}
    L += ["", f"All cells: {tot['sent']} requests sent, {tot['lost']} lost, {tot['duplicated']} duplicated, "
          f"{tot['foreign']} answered with another request's id, {tot['wrong_text']} with a text other than the "
          f"image's lone-request reference, {tot['failed']} failed."]
    if res.get("bad_inputs"):
        L += ["", f"## Bad inputs ({res['faults_instances']} instances)", "",
              "| case | body bytes | status | message | runtime's message in it | good request after |",
              "|---|---|---|---|---|---|"]
        for b in res["bad_inputs"]:
            msg = b["message"].replace("|", "\\|").replace("\n", " ")[:160]
            L.append(f"| {b['case']} | {b['body_bytes']} | {b['status']} | {msg} | "
                     f"{'-' if b['carries_runtime_message'] is None else ('yes' if b['carries_runtime_message'] else 'NO')} | "
                     f"{'yes' if b['good_request_after'] else 'NO'} |")
    if res.get("mixed_batch"):
        m = res["mixed_batch"]
        L += ["", f"Mixed batch: {m['good_requests']} good requests and one corrupt image sent at once "
              f"({m['triton_inferences']:g} inferences in {m['triton_executions']:g} Triton executions; good answers "
              f"decoded up to {m['max_batch_items_of_good']} together): {m['good_answered_200_right_text']} of "
              f"{m['good_requests']} good ones answered 200 with their reference text; the corrupt one "
              f"{m['bad_status']}: {m['bad_message'][:160]}"]
    for k in res.get("kills", []):
        r = k["run"]
        L += ["", f"## A model instance killed mid-load: `{k['killed']}`", "",
              f"The Python-backend stub of `{k['killed']}` (pid {k['killed_pid']}; stubs of `echo`: "
              f"{', '.join(x for x in k['stubs_before'] if x.startswith(MODEL + '_'))}) got SIGKILL after "
              f"{k['at_answer']} answers of a concurrency-{r['concurrency']} run of {r['requests']} requests on "
              f"{res['faults_instances']} instances (a fresh server): {r['answered_200']} answered 200, "
              f"{r['failed']} failed, {r['lost']} of them without any answer (a connection error, or none in "
              f"{k['request_timeout']:g} s), {r['duplicated']} duplicated, "
              f"{r['wrong_text']} wrong text. Errors: "
              + ("; ".join(f"`{e.replace(chr(10), ' ')[:500]}`" for e in r["errors"]) or "none") + ".", ""]
        probes = "; ".join(f"{p['t_s']} s: codes {p['codes']}, instances {p['instances']}, model ready "
                           f"{p['model_ready']}, server ready {p['server_ready']}" for p in k["probes"])
        if k["recovered"]:
            L.append(f"Recovered: every instance answered again {k['recovered_s_after_kill']} s after the kill "
                     f"(stub alive after: {k['stub_alive_after']}, pid {k['stub_pid_after']}). Last probes: {probes}.")
        else:
            L.append(f"Not recovered in {res['recover_seconds']:g} s of probing ({k['probe_rounds']} rounds; stub alive "
                     f"after: {k['stub_alive_after']}; echo-serve alive: {k['server_alive']}). Last probes: {probes}.")
            if "reload_status" in k:
                p2 = "; ".join(f"{p['t_s']} s: codes {p['codes']}, instances {p['instances']}"
                               for p in k["probes_after_reload"])
                L.append("")
                L.append(f"Then `POST /v2/repository/models/{MODEL}/load` answered {k['reload_status']} "
                         f"({k['reload_message']!r}) in "
                         f"{k['reload_s']} s, and the server "
                         + (f"served from every instance again {k['recovered_s_after_kill']} s after the kill"
                            if k["recovered_after_reload"] else "still did not serve")
                         + f". Probes after the reload: {p2}.")
        if k.get("serve_lines_after_kill"):
            L += ["", "echo-serve said after the kill:", "", "```"] + k["serve_lines_after_kill"] + ["```"]
        log = [x for x in k.get("triton_log_after_kill", []) if x.strip()]
        if log:
            L += ["", "Triton's log after the kill (first lines):", "", "```"] + log + ["```"]
    if res.get("kill_note"):
        L += ["", res["kill_note"]]
    path.write_text("\n".join(L) + "\n")


def load_images(folder: Path, n: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    test = [p for p in files if p.name.startswith("test")] or files
    if not test:
        raise SystemExit(f"serve_load: no images in {folder} (make demo writes data/synth/images)")
    return [(p.name, p.read_bytes()) for p in test[:n]]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", default="engines/echo")
    ap.add_argument("--images", default="data/synth/images", help="a folder of test images (PNG, JPEG, DICOM)")
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--instances", default="1,2")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=None, help="per level (default max(32, 4 x concurrency))")
    ap.add_argument("--max-seconds", type=float, default=60, help="per level: no new requests after this")
    ap.add_argument("--bad", default="all", help="bad-input cases, comma-separated, 'all' or 'none'")
    ap.add_argument("--kill", default=f"{MODEL}_0_1,{MODEL}_0_0",
                    help="Triton instance names whose stub to kill during a concurrency-16 run, each on a fresh "
                         "server of the last instance count ('' for none)")
    ap.add_argument("--kill-requests", type=int, default=96)
    ap.add_argument("--kill-concurrency", type=int, default=16)
    ap.add_argument("--kill-after", type=int, default=16, help="answers before the kill")
    ap.add_argument("--recover-seconds", type=float, default=90)
    ap.add_argument("--out", default="benchmarks/results/serve")
    ap.add_argument("--serve-arg", action="append", default=[], help="passed to echo-serve (repeatable)")
    a = ap.parse_args(argv)
    images = load_images(Path(a.images), a.n_images)
    insts = [int(x) for x in a.instances.split(",")]
    concs = [int(x) for x in a.concurrency.split(",")]
    t_start = time.time()
    res: dict = {"command": "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "engine_dir": a.engine_dir,
                 "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
                 "images": [n for n, _ in images], "cells": []}
    for i, n_inst in enumerate(insts):
        server = EchoServe(a.engine_dir, n_inst, tuple(a.serve_arg))
        try:
            ready = next(x for x in server.lines if x.startswith("echo-serve: ready"))
            res["batch_sizes"] = re.search(r"batch sizes (\[[^\]]*\])", ready).group(1)
            print(f"serve_load: {n_inst} instance(s) ready in {server.ready_s:.1f} s", file=sys.stderr)
            reference = {}
            for name, data in images:  # the lone-request answer of each image
                code, resp = one(server.url, f"/v2/models/{MODEL}/infer", *infer_body(data, f"ref-{name}"))
                if code != 200:
                    raise RuntimeError(f"reference request for {name}: {code} {resp}")
                reference[name] = answer(resp)["text"]
            for c in concs:
                n = a.requests or max(32, 4 * c)
                r = cell(server, images, reference, c, n, a.max_seconds, f"i{n_inst}-c{c}")
                res["cells"].append(r)
                print(f"serve_load: instances {n_inst} concurrency {c}: {r['sent']} sent, p50 {r['p50_ms']} ms, "
                      f"p95 {r['p95_ms']} ms, {r['reports_per_s']} reports/s, mean batch {r['triton_mean_batch']}, "
                      f"batches {r['batches_by_size']}, lost {r['lost']} dup {r['duplicated']} "
                      f"wrong {r['wrong_text']} failed {r['failed']}", file=sys.stderr)
            if i == len(insts) - 1:
                res["faults_instances"] = n_inst
                if a.bad != "none":
                    only = None if a.bad == "all" else a.bad.split(",")
                    res["bad_inputs"] = bad_inputs(server, images[0], reference, only)
                    for b in res["bad_inputs"]:
                        print(f"serve_load: bad input {b['case']}: {b['status']} {b['message'][:120]!r}; "
                              f"good after: {b['good_request_after']}", file=sys.stderr)
                    res["mixed_batch"] = mixed_batch(server, images, reference, 7)
                    print(f"serve_load: mixed batch: {res['mixed_batch']}", file=sys.stderr)
        finally:
            res.setdefault("server_exit", {})[str(n_inst)] = server.stop()
            res.setdefault("server_stop_s", {})[str(n_inst)] = server.stop_s
    res["recover_seconds"] = a.recover_seconds
    for target in [t for t in a.kill.split(",") if t]:  # each on a fresh server of the last instance count
        server = EchoServe(a.engine_dir, insts[-1], tuple(a.serve_arg))
        try:
            res.setdefault("kills", []).append(kill_instance(server, images, reference, a.kill_requests, a.kill_after,
                                                             a.recover_seconds, a.kill_concurrency, target))
            k = res["kills"][-1]
            print(f"serve_load: killed {k['killed']} at answer {k['at_answer']}: {k['run']['failed']} failed, "
                  f"{k['run']['lost']} lost; recovered {k['recovered']} ({k['recovered_s_after_kill']} s)"
                  + (f"; after a reload ({k['reload_status']}): {k['recovered_after_reload']}" if "reload_status" in k
                     else ""), file=sys.stderr)
        finally:
            res.setdefault("server_exit", {})[f"kill-{target}"] = server.stop()
            res.setdefault("server_stop_s", {})[f"kill-{target}"] = server.stop_s
            if res["server_exit"][f"kill-{target}"] != 0:
                print(f"serve_load: echo-serve exited {res['server_exit'][f'kill-{target}']} after "
                      f"{server.stop_s} s:\n{server.log}", file=sys.stderr)
    by = {(c["instances"], c["concurrency"]): c["reports_per_s"] for c in res["cells"]}
    if (1, 16) in by and (2, 16) in by and by[(1, 16)]:
        res["c16_2_vs_1"] = {"1": by[(1, 16)], "2": by[(2, 16)], "ratio": round(by[(2, 16)] / by[(1, 16)], 2)}
    res["total_s"] = round(time.time() - t_start, 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out / "load.md")
    print(f"serve_load: wrote {out / 'load.json'} and {out / 'load.md'} in {res['total_s']} s", file=sys.stderr)
    bad = sum(c["lost"] + c["duplicated"] + c["foreign"] + c["failed"] for c in res["cells"])
    bad += sum(1 for b in res.get("bad_inputs", []) if not (b["is_4xx"] and b["good_request_after"]
                                                             and b["carries_runtime_message"] is not False))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""echo-serve end to end: a real Triton Inference Server (PyTriton) started from the serve
environment (.venv/serve: the base package + the [serve] extra, no torch) on the shared test
engine folder, called over plain HTTP (KServe v2 JSON, as curl does; curl itself where it is
installed), with tritonclient over HTTP and gRPC streaming, and from headless Chromium through
the report page (Playwright). The server is started and stopped here; EnginePool is also tested
in-process. Skips, saying why, only where the serve environment or Chromium is missing
(`make test` installs both)."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from click.testing import CliRunner

from test_runtime_graphs import images, runtime_engine  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SERVE_PY = Path(os.environ.get("ECHO_SERVE_PYTHON", ROOT / ".venv" / "serve" / "bin" / "python"))
# the committed screenshot is rewritten only on request, so `make test` leaves the tree clean
SCREENSHOT = ROOT / "benchmarks" / "results" / "serve" / "report_page_test_engine.png"
UPDATE_SCREENSHOT = os.environ.get("ECHO_UPDATE_SCREENSHOT") == "1"
INSTANCES = 2


@functools.lru_cache(maxsize=None)
def _serve_env_problem() -> Optional[str]:
    how = "`make test` builds it: python3 -m venv .venv/serve && .venv/serve/bin/pip install -e '.[serve,dicom]'"
    if not SERVE_PY.exists():
        return f"no serve environment at {SERVE_PY} ({how})"
    p = subprocess.run([str(SERVE_PY), "-c", "import pytriton, tritonclient.grpc, echo_serve.triton_models"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        return f"{SERVE_PY} cannot import the serve stack ({how}): {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: bytes, headers: Optional[dict] = None, timeout: float = 120) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class Server:
    """`python -m echo_serve` in the serve environment, on free ports, its output collected."""

    def __init__(self, engine_dir, *extra: str, wait: bool = True) -> None:
        self.http, self.grpc, self.metrics, self.ui = (free_port() for _ in range(4))
        self.url = f"http://127.0.0.1:{self.http}"
        cmd = [str(SERVE_PY), "-m", "echo_serve", "--engine-dir", str(engine_dir), "--port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--ui-port", str(self.ui), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.lines: list[str] = []  # echo-serve's own lines (stderr)
        self.triton_lines: list[str] = []  # Triton's log (stdout)
        self.first_ready: Optional[dict] = None  # what the log said when /v2/health/ready first answered
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=env, start_new_session=True)
        self._readers = [threading.Thread(target=self._read, args=(f, out), daemon=True)
                         for f, out in ((self.proc.stderr, self.lines), (self.proc.stdout, self.triton_lines))]
        for t in self._readers:
            t.start()
        if wait:
            threading.Thread(target=self._poll_ready, daemon=True).start()
            self.wait_ready()

    @staticmethod
    def _read(stream, out: list) -> None:
        for line in stream:
            out.append(line.rstrip("\n"))

    def _poll_ready(self) -> None:
        while self.proc.poll() is None and self.first_ready is None:
            try:
                code, _ = _get(self.url + "/v2/health/ready", timeout=1)
            except OSError:  # not listening yet
                time.sleep(0.02)
                continue
            self.first_ready = {"code": code, "log": list(self.lines),
                                "models": {m: _get(f"{self.url}/v2/models/{m}/ready")[0]
                                           for m in ("echo", "echo_stream")}}

    @property
    def log(self) -> str:
        """Triton's errors and the last 30 lines of its log, then echo-serve's own lines."""
        t = self.triton_lines
        keep = [x for x in t[:-30] if x.startswith(("E", "Traceback"))]
        return "\n".join(keep + t[-30:] + ["-- echo-serve (stderr):"] + self.lines)

    def wait_ready(self, timeout: float = 180) -> None:
        t0 = time.time()
        while not any(x.startswith("echo-serve: ready") for x in self.lines):
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"echo-serve exited {self.proc.returncode} before ready:\n{self.log}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"echo-serve not ready after {timeout} s:\n{self.log}")
            time.sleep(0.05)

    def exit_code(self, timeout: float = 120) -> int:
        """For a server expected to give up: its exit status, once its output is all read."""
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its Triton
                self.proc.wait(10)
                raise AssertionError(f"echo-serve did not stop on SIGTERM:\n{self.log}")
        # Triton, its Python-backend stubs and their helpers share the server's process group:
        # none may outlive it
        t0 = time.time()
        while _group_alive(self.proc.pid):
            if time.time() - t0 > 15:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise AssertionError(f"processes of echo-serve outlived it:\n{self.log}")
            time.sleep(0.2)
        return self.proc.returncode

    def infer(self, data: bytes, name: Optional[str] = None, fmt: Optional[str] = None, rid: Optional[str] = None,
              model: str = "echo") -> tuple[int, dict]:
        """One KServe v2 JSON request, the image as base64 text: what curl sends."""
        inputs = [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}]
        for k, v in (("name", name), ("format", fmt)):
            if v is not None:
                inputs.append({"name": k, "shape": [1, 1], "datatype": "BYTES", "data": [v]})
        body = {"inputs": inputs, **({"id": rid} if rid else {})}
        code, raw, _ = _post(f"{self.url}/v2/models/{model}/infer", json.dumps(body).encode())
        return code, json.loads(raw)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def outputs(resp: dict) -> dict:
    out = {}
    for o in resp["outputs"]:
        v = o["data"]
        out[o["name"]] = v if o["name"] == "tokens" else v[0]
    return out


# ----------------------------------------------------------------------------- inputs and the reference
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two PNGs and a DICOM test image (with study UIDs), as files."""
    from PIL import Image

    from test_report_formats import cxr_dicom

    d = tmp_path_factory.mktemp("serve")
    x = images(6, size=64)  # 2, 3 and 5: three different reports of 6 to 7 passes from the test engine
    paths = []
    for i in (2, 3):
        p = d / f"cxr{i}.png"
        Image.fromarray(((x[i, 0] + 1) * 127.5).astype(np.uint8)).save(p)
        paths.append(str(p))
    dcm = d / "cxr5.dcm"
    dcm.write_bytes(cxr_dicom(pixels=x[5, 0]))
    return paths + [str(dcm)]


@pytest.fixture(scope="module")
def expected(runtime_engine, inputs):
    """echo-report's answer for each input: what every server path must reproduce."""
    from runtime.cli import main

    r = CliRunner().invoke(main, ["--engine-dir", str(runtime_engine.path), "--format", "json", *inputs],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = {o["path"]: o for o in map(json.loads, r.stdout.splitlines())}
    assert len({o["text"] for o in out.values()}) == len(inputs)  # distinct reports: a mix-up cannot pass
    return out


# ----------------------------------------------------------------------------- the pool, in process
def test_graph_batch_for_picks_the_smallest_built_size_that_holds_the_batch():
    from echo_serve.pool import graph_batch_for

    assert [graph_batch_for(n, [1, 4, 8]) for n in (1, 2, 4, 5, 8, 9, 20)] == [1, 4, 4, 8, 8, 8, 8]
    assert graph_batch_for(1, [2]) == 2


def test_pool_pads_and_splits_into_built_sizes_and_keeps_order(runtime_engine, inputs, expected):
    from echo_serve.pool import EnginePool, Item
    from runtime.errors import EchoRuntimeError

    with pytest.raises(EchoRuntimeError, match="verified=false"):
        EnginePool(runtime_engine.path)
    pool = EnginePool(runtime_engine.path, instances=1, threads=1, allow_unverified=True)
    assert pool.built == [2]
    data = [Path(p).read_bytes() for p in inputs]
    broken = data[0][:100]
    items = [Item(d, p) for d, p in zip(data, inputs)] + [Item(broken, "broken.png"), Item(data[1], inputs[1], "xml")]
    res = pool.decode(items)  # 3 good images on b2 graphs: split into 2 + 1 (padded)
    assert [r.report.text for r in res[:3]] == [expected[p]["text"] for p in inputs]
    assert [r.report.tokens for r in res[:3]] == [expected[p]["tokens"] for p in inputs]
    assert [(r.graph_batch, r.batch_items) for r in res[:3]] == [(2, 3)] * 3
    assert res[3].report.error.startswith("broken.png: ") and res[3].graph_batch == 0
    assert "unknown report format 'xml'" in res[4].report.error
    one = pool.decode([Item(data[2], "x.dcm", "fhir")])[0]  # padded to the b2 graph
    assert (one.graph_batch, one.batch_items, one.report.text) == (2, 1, expected[inputs[2]]["text"])
    assert json.loads(one.document)["imagingStudy"][0]["identifier"]["system"] == "urn:dicom:uid"


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(runtime_engine):
    why = _serve_env_problem()
    if why:
        pytest.skip(why)
    s = Server(runtime_engine.path, "--allow-unverified", "--instances", str(INSTANCES), "--threads", "1",
               "--max-queue-delay-us", "20000", "--ui")
    yield s
    assert s.stop() == 0, s.log
    # Triton went with it: nothing answers on its ports any more
    for port in (s.http, s.grpc, s.metrics, s.ui):
        with socket.socket() as c, pytest.raises(OSError):
            c.settimeout(1)
            c.connect(("127.0.0.1", port))


def test_the_serve_environment_has_no_torch():
    if _serve_env_problem():
        pytest.skip(_serve_env_problem())
    p = subprocess.run([str(SERVE_PY), "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "No module named 'torch'" in p.stderr


def test_ready_only_after_the_engines_are_loaded_and_verified(server):
    first = server.first_ready
    assert first is not None, server.log
    assert first["code"] == 200 and first["models"] == {"echo": 200, "echo_stream": 200}
    loaded = [x for x in first["log"] if x.startswith("echo-serve: engines loaded and verified")]
    assert loaded, f"Triton answered before the engines were loaded:\n{server.log}"
    ready = next(x for x in server.lines if x.startswith("echo-serve: ready"))
    assert "127.0.0.1" in ready and "0.0.0.0" not in ready and "batch sizes [2]" in ready


def test_a_tampered_or_unverified_engine_is_refused_before_listening(runtime_engine, tmp_path):
    why = _serve_env_problem()
    if why:
        pytest.skip(why)
    s = Server(runtime_engine.path, wait=False)  # no --allow-unverified: the test engine was built with verify_n=0
    assert s.exit_code() == 2 and not any(x.startswith("echo-serve: ready") for x in s.lines)
    err = "\n".join(s.lines)
    assert "verified=false" in err and "Traceback" not in err, s.log
    bad = tmp_path / "engine"
    shutil.copytree(runtime_engine.path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    graph = bad / next(f for f in manifest["files"] if f.endswith(".onnx"))
    raw = bytearray(graph.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    graph.write_bytes(bytes(raw))
    s = Server(bad, "--allow-unverified", wait=False)
    assert s.exit_code() == 2, s.log
    err = "\n".join(s.lines)
    assert "sha256 does not match the manifest" in err and "Traceback" not in err, s.log


def test_unary_over_plain_http_equals_echo_report(server, inputs, expected):
    for p in inputs:
        code, resp = server.infer(Path(p).read_bytes(), name=Path(p).name, rid=f"id-{Path(p).name}")
        assert code == 200, resp
        out = outputs(resp)
        assert resp["id"] == f"id-{Path(p).name}" and out["error"] == ""
        want = expected[p]
        assert (out["text"], out["forward_passes"], out["stop"]) == (want["text"], want["forward_passes"], want["stop"])
        assert [t for t in out["tokens"] if t >= 0] == want["tokens"]
        assert out["graph_batch"] == 2 and 0 <= out["instance"] < INSTANCES
    curl = shutil.which("curl")
    if curl:  # the same request from curl itself
        body = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                            "data": [base64.b64encode(Path(inputs[0]).read_bytes()).decode()]}]}
        p = subprocess.run([curl, "-sS", "--fail-with-body", "-H", "Content-Type: application/json", "--data-binary",
                            "@-", f"{server.url}/v2/models/echo/infer"], input=json.dumps(body), capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr + p.stdout
        assert outputs(json.loads(p.stdout))["text"] == expected[inputs[0]]["text"]


def test_tritonclient_http_and_grpc_stream_equal_echo_report(server, inputs, expected):
    from runtime.errors import ImageReadError
    from runtime.preprocess import decode_image_bytes

    p = subprocess.run([str(SERVE_PY), str(ROOT / "tests" / "test_serve_client.py"), f"127.0.0.1:{server.http}",
                        f"127.0.0.1:{server.grpc}", *inputs], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)
    for path, unary, stream in zip(inputs, got["http"], got["stream"]):
        want = expected[path]
        assert unary["text"] == want["text"] and unary["error"] == ""
        assert stream["error"] is None, stream["error"]
        blocks, final = stream["events"][:-1], stream["events"][-1]
        assert final["final"] == 1 and final["text"] == want["text"]
        assert final["forward_passes"] == want["forward_passes"]
        assert [b["final"] for b in blocks] == [0] * len(blocks) and len(blocks) == want["forward_passes"] - 1 >= 2
        assert [b["block"] for b in blocks] == list(range(len(blocks)))
        assert [t for b in blocks for t in b["tokens"] if t >= 0] == want["tokens"]
        assert blocks[-1]["text"].startswith(want["text"][:1])  # text grows block by block
    with pytest.raises(ImageReadError) as e:
        decode_image_bytes(b"this is not an image", "image")
    assert str(e.value) in got["bad_stream"]["error"]  # the runtime's own message reaches the client
    assert "Traceback" not in got["bad_stream"]["error"], got["bad_stream"]["error"]


def test_dynamic_batching_answers_every_request_exactly_once(server, inputs, expected):
    data = {p: Path(p).read_bytes() for p in inputs}
    jobs = [(f"req-{i}", inputs[i % len(inputs)]) for i in range(12)]

    def call(job):
        rid, path = job
        return rid, path, server.infer(data[path], rid=rid)

    before = _metrics(server)
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(call, jobs))
    ids = []
    for rid, path, (code, resp) in answers:
        assert code == 200, resp
        ids.append(resp["id"])
        out = outputs(resp)
        assert resp["id"] == rid and out["text"] == expected[path]["text"] and out["error"] == ""
    assert sorted(ids) == sorted(r for r, _ in jobs)  # each answered once, none lost, none twice
    sizes = [outputs(r)["batch_items"] for _, _, (_, r) in answers]
    assert max(sizes) == 2, sizes  # Triton batched concurrent requests (max: the largest built size)
    assert {outputs(r)["instance"] for _, _, (_, r) in answers} == set(range(INSTANCES))
    after = _metrics(server)
    n_inf = after["nv_inference_count"] - before["nv_inference_count"]
    n_exec = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert n_inf == len(jobs) and n_exec < n_inf, (n_inf, n_exec)  # the metrics endpoint shows the batching


def _metrics(server) -> dict[str, float]:
    code, body = _get(f"http://127.0.0.1:{server.metrics}/metrics")
    assert code == 200
    out = {}
    for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success"):
        m = re.search(rf'^{name}{{model="echo",version="1"}} (\S+)$', body.decode(), re.M)
        assert m, f"{name} not in the metrics"
        out[name] = float(m.group(1))
    return out


def test_bad_inputs_get_the_runtimes_message_and_the_server_keeps_serving(server, inputs, expected):
    from runtime.errors import ImageReadError
    from runtime.preprocess import decode_image_bytes

    broken = Path(inputs[0]).read_bytes()[:100]
    with pytest.raises(ImageReadError) as e:
        decode_image_bytes(broken, "broken.png")
    code, resp = server.infer(broken, name="broken.png")  # a 400 with the runtime's message (per_request_errors)
    assert code == 400 and resp == {"error": str(e.value)}, (code, resp)
    code, resp = server.infer(Path(inputs[0]).read_bytes(), fmt="hl7v2")
    assert code == 400 and "unknown report format 'hl7v2'" in resp["error"]
    # in one dynamic batch with good requests, the bad one fails alone: its batch-mates are answered
    good = Path(inputs[1]).read_bytes()
    before = _metrics(server)
    with cf.ThreadPoolExecutor(5) as ex:
        futs = [ex.submit(server.infer, broken, name="broken.png", rid="mix-2") if k == 2
                else ex.submit(server.infer, good, rid=f"mix-{k}") for k in range(5)]
        answers = [f.result() for f in futs]
    after = _metrics(server)
    assert [c for c, _ in answers] == [200, 200, 400, 200, 200], answers
    assert all(outputs(r)["text"] == expected[inputs[1]]["text"] for c, r in answers if c == 200)
    assert answers[2][1]["error"] == str(e.value)
    assert after["nv_inference_exec_count"] - before["nv_inference_exec_count"] < 5  # they were batched
    code, raw, _ = _post(f"{server.url}/v2/models/echo/infer", b"")
    assert 400 <= code < 500, raw
    code, raw, _ = _post(f"{server.url}/v2/models/no_such_model/infer", b'{"inputs": []}')
    assert 400 <= code < 500 and b"no_such_model" in raw
    code, resp = server.infer(Path(inputs[1]).read_bytes())
    assert code == 200 and outputs(resp)["text"] == expected[inputs[1]]["text"]


def _binary_output(raw: bytes, headers: dict, name: str) -> bytes:
    """One BYTES element of a binary-data output (KServe v2 binary tensor data extension)."""
    n = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    header, offset = json.loads(raw[:n]), n
    for o in header["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size", 0)
        if o["name"] == name:
            (length,) = struct.unpack("<I", raw[offset : offset + 4])
            return raw[offset + 4 : offset + 4 + length]
        offset += size
    raise KeyError(name)


def test_fhir_and_dicom_sr_from_the_server(server, inputs, expected):
    import pydicom

    from test_report_formats import validate_r4_diagnostic_report

    code, resp = server.infer(Path(inputs[0]).read_bytes(), fmt="fhir")
    fhir = json.loads(outputs(resp)["document"])
    validate_r4_diagnostic_report(fhir)
    assert base64.b64decode(fhir["presentedForm"][0]["data"]).decode() == expected[inputs[0]]["text"]
    body = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                        "data": [base64.b64encode(Path(inputs[2]).read_bytes()).decode()]},
                       {"name": "format", "shape": [1, 1], "datatype": "BYTES", "data": ["dicom-sr"]}],
            "outputs": [{"name": "document", "parameters": {"binary_data": True}}]}
    code, raw, headers = _post(f"{server.url}/v2/models/echo/infer", json.dumps(body).encode())
    assert code == 200, raw[:500]
    sr = pydicom.dcmread(io.BytesIO(_binary_output(raw, headers, "document")))
    src = pydicom.dcmread(inputs[2])
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.Modality == "SR"
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


# ----------------------------------------------------------------------------- the report page, in Chromium
def _chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_page_streams_the_report_in_headless_chromium(server, inputs, expected, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the serve-test extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (`make test` runs apt-get install -y chromium as root)")
    png = inputs[1]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 560})
            page.goto(f"http://127.0.0.1:{server.ui}/")
            assert "ECHO" in page.title()
            page.set_input_files("#file", png)
            page.wait_for_selector('#status[data-state="done"], #status[data-state="error"]', timeout=60_000)
            state = page.evaluate("window.echo")
            assert state["error"] is None, state["error"]
            assert page.inner_text("#report") == expected[png]["text"]
            assert page.evaluate("document.getElementById('preview').naturalWidth") == 64  # the image is shown
            blocks = [e for e in state["events"] if np.ravel(e["final"])[0] == 0]
            assert len(blocks) == state["blocks"] == expected[png]["forward_passes"] - 1 >= 2  # block by block
            meta = page.inner_text("#meta")
            assert f"{expected[png]['forward_passes']} forward passes" in meta and " ms" in meta
            shot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / SCREENSHOT.name
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            assert 0 < shot.stat().st_size < 5_000_000
        finally:
            browser.close()



def test_a_busy_report_page_port_is_an_error_before_triton_starts(runtime_engine):
    if _serve_env_problem():
        pytest.skip(_serve_env_problem())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = Server(runtime_engine.path, "--allow-unverified", "--ui", "--ui-port", str(port), wait=False)
        assert s.exit_code() == 2, s.log
    err = "\n".join(s.lines)
    assert f"cannot serve the report page on 127.0.0.1:{port}" in err and "Traceback" not in err, s.log
    assert "starting Triton" not in err and not s.triton_lines

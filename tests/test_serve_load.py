"""benchmarks/serve_load.py, small: its own echo-serve (2 instances) on the shared test engine,
12 requests at concurrency 4 with every answer checked against its request id and its image's
reference text, one bad input (a corrupt image: a 400 with the runtime's message, then a good
request) and a corrupt image batched with good ones. The full run (concurrency 1-64, 1 and 2
instances, every bad input, an instance killed) is `python -m benchmarks.serve_load`
(benchmarks/results/serve/load.md). Skips, saying why, where the serve environment is missing."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from test_runtime_graphs import images, runtime_engine  # noqa: F401
from test_serve import ROOT, SERVE_PY, _serve_env_problem


def test_exactly_once_catches_lost_duplicated_foreign_and_wrong_answers():
    from benchmarks.serve_load import exactly_once

    def rec(sent, got=None, text="a", status=200):
        r = {"sent_id": sent, "status": status}
        if got is not None:
            r["answer"] = {"id": got, "text": text}
        return r

    want = {"r0": "a", "r1": "a", "r2": "a", "r3": "a"}
    clean = exactly_once([rec("r0", "r0"), rec("r1", "r1"), rec("r2", "r2"), rec("r3", "r3")], want)
    assert (clean["lost"], clean["duplicated"], clean["foreign"], clean["wrong_text"], clean["failed"]) == (0,) * 5
    bad = exactly_once([rec("r0", "r0"), rec("r1", "r0"), rec("r2", status=500), rec("r3", "r3", text="b")], want)
    # r1 came back with r0's answer (r1 lost, r0 twice), r2 got a 500 (failed, not lost), r3 the wrong text
    assert (bad["lost"], bad["duplicated"], bad["foreign"], bad["wrong_text"], bad["failed"]) == (1, 1, 1, 1, 1)
    assert exactly_once([rec("r0")], want)["lost"] == 1  # no answer at all (a connection error)


def test_serve_load_small_run_answers_every_request_once(runtime_engine, tmp_path):
    why = _serve_env_problem()
    if why:
        pytest.skip(why)
    from PIL import Image

    from test_report_formats import cxr_dicom

    imgs = tmp_path / "images"
    imgs.mkdir()
    x = images(6, size=64)
    for i in (2, 3):  # two PNGs and a DICOM with different reports from the test engine
        Image.fromarray(((x[i, 0] + 1) * 127.5).astype(np.uint8)).save(imgs / f"cxr{i}.png")
    (imgs / "cxr5.dcm").write_bytes(cxr_dicom(pixels=x[5, 0]))
    out = tmp_path / "out"
    cmd = [str(SERVE_PY), "-m", "benchmarks.serve_load", "--engine-dir", str(runtime_engine.path),
           "--images", str(imgs), "--instances", "2", "--concurrency", "4", "--requests", "12",
           "--max-seconds", "60", "--bad", "corrupt_image", "--kill=", "--out", str(out),
           "--serve-arg=--allow-unverified", "--serve-arg=--threads=1", "--serve-arg=--max-queue-delay-us=20000"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((out / "load.json").read_text())
    (c,) = res["cells"]
    assert (c["instances"], c["concurrency"], c["sent"], c["answered_200"]) == (2, 4, 12, 12), c
    assert (c["lost"], c["duplicated"], c["foreign"], c["wrong_text"], c["failed"]) == (0, 0, 0, 0, 0), c
    assert c["triton_inferences"] == 12 and c["triton_executions"] < 12, c  # Triton batched them
    assert sum(int(k) * round(n) for k, n in c["batches_by_size"].items()) == 12, c
    (b,) = res["bad_inputs"]
    assert b["case"] == "corrupt_image" and b["status"] == 400 and b["carries_runtime_message"], b
    assert b["runtime_message"] in b["message"] and b["good_request_after"], b
    m = res["mixed_batch"]
    assert m["good_answered_200_right_text"] == m["good_requests"] == 7 and m["bad_status"] == 400, m
    assert m["triton_executions"] < m["triton_inferences"], m
    md = (out / "load.md").read_text()
    assert "| 2 | 4 | 12 |" in md and "corrupt_image | " in md


def test_a_killed_model_instance_makes_echo_serve_start_again(runtime_engine, tmp_path):
    """Triton neither restarts nor retires a model instance whose Python-backend stub died (its
    requests fail, readiness stays 200): echo-serve sees the stub go, stops and starts again, and
    every instance answers again (restart_if_a_stub_dies)."""
    why = _serve_env_problem()
    if why:
        pytest.skip(why)
    from PIL import Image

    imgs = tmp_path / "images"
    imgs.mkdir()
    x = images(6, size=64)
    Image.fromarray(((x[2, 0] + 1) * 127.5).astype(np.uint8)).save(imgs / "cxr2.png")
    out = tmp_path / "out"
    cmd = [str(SERVE_PY), "-m", "benchmarks.serve_load", "--engine-dir", str(runtime_engine.path),
           "--images", str(imgs), "--instances", "2", "--concurrency", "1", "--requests", "2", "--bad", "none",
           "--kill", "echo_0_1", "--kill-concurrency", "2", "--kill-requests", "8", "--kill-after", "2", "--recover-seconds", "90",
           "--out", str(out), "--serve-arg=--allow-unverified", "--serve-arg=--threads=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    res = json.loads((out / "load.json").read_text())
    (k,) = res["kills"]
    assert k["killed_pid"] and k["recovered"], (k, p.stderr[-3000:])
    assert k["stub_alive_after"] and k["stub_pid_after"] != k["killed_pid"], k
    assert any("a Triton model instance died" in x and "starts again" in x for x in k["serve_lines_after_kill"]), k
    assert k["run"]["duplicated"] == k["run"]["foreign"] == k["run"]["wrong_text"] == 0, k
    assert res["server_exit"]["kill-echo_0_1"] == 0, (res["server_exit"], res["server_stop_s"], p.stderr[-4000:])


def test_a_stop_that_hangs_is_ended_by_the_stop_timeout(runtime_engine):
    """SIGTERM ends echo-serve even when Triton does not stop (here: SIGSTOPped, so its SIGINT
    waits): after --stop-timeout it SIGKILLs Triton and the stubs and exits 0, nothing left behind."""
    why = _serve_env_problem()
    if why:
        pytest.skip(why)
    import os
    import signal
    import time
    from pathlib import Path

    from benchmarks.serve_load import EchoServe

    server = EchoServe(str(runtime_engine.path), 1, ("--allow-unverified", "--threads=1", "--stop-timeout=2"),
                       python=str(SERVE_PY))
    try:
        group = lambda: {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()  # noqa: E731
                         and _pgid(int(d.name)) == server.proc.pid and int(d.name) != server.proc.pid
                         and _state(int(d.name)) != "Z"}  # a zombie is dead; here PID 1 may not reap it
        members = group()
        triton = [pid for pid in members if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver"]
        assert triton and len(members) >= 2, members  # Triton and its model instance's stub
        os.kill(triton[0], signal.SIGSTOP)
        t0 = time.time()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        took = time.time() - t0
        time.sleep(0.5)
        assert took < 15, took
        assert not group(), group()  # no Triton, no stub outlives it
        assert any("did not finish within 2 s" in x for x in server.lines), server.log
    finally:
        server.stop()


def _pgid(pid: int) -> int:
    import os

    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return -1


def _state(pid: int) -> str:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2]

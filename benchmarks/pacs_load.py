"""Load run of the DICOM node (issue 35, item 4): 200 studies at once, Orthanc restarted midway.

    python -m benchmarks.pacs_load --tiny-engine /tmp/pacs_engine [--studies 200] [--senders 4]
        [--restart-at 0.5] [--down-seconds 2] [--max-seconds 600] [--out benchmarks/results/pacs]
    python -m benchmarks.pacs_load --engine-dir engines/echo ...

Starts a real Orthanc (the PACS; benchmarks/pacs_orthanc.py: free loopback ports, temporary
storage) and `python -m echo_dicom listen` (the node) reporting to it. --senders parallel C-STORE
associations (pynetdicom, AE title MODALITY) push every study's images to the node at once: each
study has a PA image, every fourth a lateral too (sent first). When --restart-at of the studies
have their SR in Orthanc, Orthanc is stopped, kept down --down-seconds and started again on the
same storage and ports; the node's outbox retries meanwhile. The run ends when every study has an
SR (or at --max-seconds), then waits quiet-time + 3 s more for a late duplicate.

Counted from Orthanc itself: lost (studies with no SR), duplicated (studies with more than one),
wrong text (SR texts not equal to EchoRuntime.generate on the study's PA image), throughput
(studies / seconds from the first push to the last SR stored). Also: the node's send attempts that
failed (its state file), the time Orthanc was down. Writes results.json, results.md, command.txt.
Only 127.0.0.1; every loop is bounded in count and time. Exit 1 when a study was lost,
duplicated or got a wrong text.

--tiny-engine DIR: build (once, into DIR) the test suite's tiny random engine
(tests/test_runtime_graphs.shared_engine: fp32+fp16, batch 2); its report texts are noise, the
point here is delivery, not text quality.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from benchmarks.pacs_orthanc import NodeProcess, Orthanc, cxr_instance, free_port, structured_image, why_no_orthanc

ROOT = Path(__file__).resolve().parents[1]
SENDER_AET = "MODALITY"


def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.8.498.77." + ".".join(str(p) for p in parts)


def build_tiny_engine(folder: Path) -> Path:
    """The tests' tiny engine, built into folder/echo unless it is there already."""
    if (folder / "echo" / "manifest.json").is_file():
        return folder / "echo"
    sys.path.insert(0, str(ROOT / "tests"))
    from test_runtime_graphs import shared_engine

    return Path(shared_engine(folder).path)


def make_studies(n: int, folder: Path) -> list[dict[str, Any]]:
    """n studies: a PA image each (pixels varied by study), every fourth with a lateral first."""
    studies = []
    for i in range(n):
        files = []
        views = ["LL", "PA"] if i % 4 == 3 else ["PA"]
        for k, view in enumerate(views):
            px = structured_image(i * 2 + k)
            data = cxr_instance(px, uid(i), uid(i, 1), uid(i, 1, k + 1), view=view,
                                modality="CR" if i % 2 else "DX", instance_no=k + 1, patient_id=f"P-{i:04d}")
            path = folder / f"s{i}_{k}.dcm"
            path.write_bytes(data)
            files.append(str(path))
        studies.append({"uid": uid(i), "files": files, "pa": files[-1]})
    return studies


def push(files: list[str], port: int, senders: int, timeout_s: float) -> dict[str, Any]:
    """C-STORE every file to the node over `senders` parallel associations; statuses counted."""
    from pydicom import dcmread
    from pynetdicom import AE

    from echo_dicom.intake import CR_IMAGE, DX_FOR_PRESENTATION

    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def run(share: list[str]) -> None:
        ae = AE(ae_title=SENDER_AET)
        for sop in (CR_IMAGE, DX_FOR_PRESENTATION):
            ae.add_requested_context(sop, ["1.2.840.10008.1.2.1"])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        assoc = ae.associate("127.0.0.1", port, ae_title="ECHO")
        for f in share:
            st = assoc.send_c_store(dcmread(f)) if assoc.is_established else None
            with lock:
                key = f"0x{int(st.Status):04X}" if st is not None and "Status" in st else "no answer"
                statuses[key] = statuses.get(key, 0) + 1
        if assoc.is_established:
            assoc.release()

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(files[i::senders],)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return {"instances": len(files), "statuses": statuses, "seconds": round(time.monotonic() - t0, 2)}


def watch(o: Orthanc, n: int, restart_at: float, down_s: float, deadline: float, kill: bool) -> dict[str, Any]:
    """Poll Orthanc's SR count until n (or the deadline); restart Orthanc once at restart_at * n
    (SIGKILL when kill: down at once, mid-association, as a crash; else SIGTERM, a clean stop)."""
    t0, restarted, last_change, last_n, first = time.monotonic(), None, time.monotonic(), 0, None
    while time.monotonic() < deadline:
        try:
            count = len(o.sr_instances())
        except (OSError, RuntimeError):  # mid-restart
            count = last_n
        if count != last_n:
            last_n, last_change = count, time.monotonic()
            first = first if first is not None else round(last_change - t0, 2)
        if restarted is None and count >= restart_at * n:
            t = time.monotonic()
            o.restart(down_s, kill=kill)
            restarted = {"at_srs": count, "at_s": round(t - t0, 2), "down_s": round(time.monotonic() - t, 2)}
        if count >= n:
            break
        time.sleep(0.2)
    return {"srs_seen": last_n, "first_sr_s": first, "last_sr_s": round(last_change - t0, 2), "restart": restarted}


def check(o: Orthanc, studies: list[dict[str, Any]], engine_dir: Path) -> dict[str, Any]:
    """Per study: how many SRs Orthanc has, and whether the text equals EchoRuntime's for its PA."""
    import pydicom

    from runtime.engine import EchoRuntime
    from runtime.report_formats import sections

    rt = EchoRuntime(engine_dir, batch_size=None)
    want = [r.text for r in rt.generate([s["pa"] for s in studies])]
    lost, dup, wrong = [], [], []
    for s, text in zip(studies, want):
        srs = o.srs(s["uid"])
        if not srs:
            lost.append(s["uid"])
            continue
        if len(srs) > 1:
            dup.append(s["uid"])
        ds = pydicom.dcmread(io.BytesIO(srs[0]))
        tree = {it.ConceptNameCodeSequence[0].CodeValue: it for it in ds.ContentSequence}
        got = tuple(tree[c].ContentSequence[0].TextValue if "ContentSequence" in tree[c] else ""
                    for c in ("121070", "121072"))
        if got != sections(text):
            wrong.append(s["uid"])
    return {"lost": len(lost), "duplicated": len(dup), "wrong_text": len(wrong), "distinct_texts": len(set(want)),
            "lost_uids": lost[:10], "duplicated_uids": dup[:10], "wrong_text_uids": wrong[:10]}


def node_state(state_dir: Path) -> dict[str, Any]:
    """Send attempts from the node's own state: how often the outbox had to retry."""
    from echo_dicom.store import Store

    store = Store(state_dir)
    reports = list(store.reports())
    store.close()
    attempts = sum(r["attempts"] for r in reports)
    return {"reports": len(reports), "send_attempts": attempts, "failed_attempts": attempts - len(reports),
            "max_attempts_one_report": max((r["attempts"] for r in reports), default=0)}


def run(a: argparse.Namespace, engine_dir: Path, work: Path) -> dict[str, Any]:
    """One load run: Orthanc, the node, the push, the restart, the counts."""
    port = free_port()
    o = Orthanc(work / "orthanc", node=("ECHO", port))
    o.start()
    state = work / "state"
    args = ["listen", "--engine-dir", str(engine_dir), "--state-dir", str(state), "--port", str(port),
            "--allow-aet", SENDER_AET, "--pacs", f"ORTHANC@127.0.0.1:{o.dicom_port}", "--quiet-seconds",
            str(a.quiet_seconds), "--retry-base", "0.5", "--retry-cap", "4", "--batch", str(a.batch)]
    node = NodeProcess(args, work / "node.log")
    try:
        node.wait_ready()
        studies = make_studies(a.studies, work)
        # lateral images first, so a study is never complete before its PA arrives
        files = [f for s in studies for f in s["files"]]
        deadline = time.monotonic() + a.max_seconds
        box: dict[str, Any] = {}
        watcher = threading.Thread(target=lambda: box.update(watch(o, a.studies, a.restart_at, a.down_seconds,
                                                                   deadline, a.restart_signal == "kill")))
        watcher.start()
        pushed = push(files, port, a.senders, timeout_s=60)
        watcher.join(a.max_seconds + 60)
        time.sleep(a.quiet_seconds + 3)  # a late duplicate would show now
        counts = check(o, studies, engine_dir)
    finally:
        rc = node.stop()
        o.stop()
    secs = box.get("last_sr_s") or float("nan")
    return {"push": pushed, "watch": box, **counts, "node_exit": rc, "node": node_state(state),
            "seconds_to_last_sr": secs, "studies_per_s": round(a.studies / secs, 2) if secs == secs else None,
            "refusals_in_log": node.log.count("refused instance")}


def write_results(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "command.txt").write_text(res["command"] + "\n")
    w, p, n = res["watch"], res["push"], res["node"]
    r = w.get("restart") or {}
    lines = [
        "# echo-dicom under load (issue 35)", "", f"`{res['command']}`", "",
        f"{res['machine']['cpus']} CPU cores, {res['date']}, Orthanc {res['orthanc']}, engine `{res['engine']}`, "
        f"quiet time {res['args']['quiet_seconds']} s, {res['args']['senders']} parallel C-STORE associations, "
        f"Orthanc restarted once by SIG{res['args']['restart_signal'].upper()}.",
        "", "| studies | instances pushed | push s | SRs found | lost | duplicated | wrong text | "
        "first push to last SR, s | studies/s | Orthanc restart at SR | Orthanc down s | failed send attempts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {res['studies']} | {p['instances']} ({', '.join(f'{k}: {v}' for k, v in p['statuses'].items())}) | "
        f"{p['seconds']} | {res['studies'] - res['lost']} | {res['lost']} | {res['duplicated']} | {res['wrong_text']} | "
        f"{res['seconds_to_last_sr']} | {res['studies_per_s']} | {r.get('at_srs', 'none')} | {r.get('down_s', '-')} | "
        f"{n['failed_attempts']} |", "",
        f"SRs counted in Orthanc per StudyInstanceUID after the run plus quiet time + 3 s; texts compared with "
        f"EchoRuntime.generate on each study's PA image ({res['distinct_texts']} distinct texts among the studies). "
        f"The node's outbox made {n['send_attempts']} send attempts for {n['reports']} reports "
        f"(at most {n['max_attempts_one_report']} for one). First SR in Orthanc {w.get('first_sr_s')} s after the "
        f"first push (the push itself, then the quiet time); Orthanc was stopped "
        f"(SIG{res['args']['restart_signal'].upper()}) at {r.get('at_s')} s.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def orthanc_version() -> str:
    import subprocess

    try:
        first = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True, timeout=10).stdout
        return first.splitlines()[0].replace("Orthanc ", "") if first else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine-dir", help="an engine folder built by `echo-export build`")
    src.add_argument("--tiny-engine", help="build the tests' tiny engine into this folder (once) and use it")
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--senders", type=int, default=4, help="parallel C-STORE associations pushing the studies")
    ap.add_argument("--batch", type=int, default=8, help="the node's --batch")
    ap.add_argument("--quiet-seconds", type=float, default=2.0, help="the node's study-complete quiet time")
    ap.add_argument("--restart-at", type=float, default=0.5, help="restart Orthanc when this share of SRs is in")
    ap.add_argument("--down-seconds", type=float, default=2.0, help="how long Orthanc stays down")
    ap.add_argument("--restart-signal", choices=["kill", "term"], default="kill",
                    help="kill: SIGKILL, Orthanc gone at once (a crash); term: a clean stop, which lets it finish "
                         "the associations it has open")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="give up waiting for SRs after this")
    ap.add_argument("--out", default="benchmarks/results/pacs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, state, Orthanc storage)")
    a = ap.parse_args(argv)
    if why_no_orthanc():
        print(f"pacs_load: {why_no_orthanc()}", file=sys.stderr)
        return 2
    engine_dir = Path(a.engine_dir) if a.engine_dir else build_tiny_engine(Path(a.tiny_engine))
    work = Path(tempfile.mkdtemp(prefix="pacs_load_"))
    try:
        res = run(a, engine_dir, work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    res.update(studies=a.studies, args=vars(a), engine=str(engine_dir), orthanc=orthanc_version(),
               command="python -m benchmarks.pacs_load " + " ".join(argv if argv is not None else sys.argv[1:]),
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               machine={"cpus": os.cpu_count(), "python": platform.python_version()})
    write_results(res, Path(a.out))
    print((Path(a.out) / "results.md").read_text())
    return 1 if res["lost"] or res["duplicated"] or res["wrong_text"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""The DICOM node (echo_dicom, issue 35) against a real Orthanc that the tests start.

Orthanc (Debian's package, its DICOMweb plugin) runs on free loopback ports with a temporary
configuration and storage; the node is `python -m echo_dicom` as a subprocess on the shared tiny
test engine (tests/test_runtime_graphs.py). Test studies are DICOM CR/DX instances of the runtime
tests' structured images, uploaded to Orthanc over REST; Orthanc sends them to the node (C-STORE),
the node sends the SR back (C-STORE) or, in DICOMweb mode, finds them (QIDO-RS), fetches them
(WADO-RS) and stores the SR (STOW-RS). Each SR is read back from Orthanc with pydicom: same
StudyInstanceUID, its texts equal to what EchoRuntime.generate gives for the study's frontal
image, one SR per study, even when the node is SIGKILLed mid-study and restarted. The node runs
with torch made unimportable, as on an edge box with the base package and [dicom-node] only.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from test_runtime_graphs import images, runtime_engine  # noqa: F401

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom", reason="the [dicom-node] extra (pynetdicom) is not installed")

from benchmarks.pacs_orthanc import NodeProcess, Orthanc, cxr_instance, free_port, why_no_orthanc  # noqa: E402
from runtime.report_formats import sections  # noqa: E402

pytestmark = pytest.mark.skipif(why_no_orthanc() is not None, reason=str(why_no_orthanc()))

QUIET_S = 1.5
PIXELS = images(6, size=64)  # 2, 3 and 5 give three different reports from the test engine


def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.8.498.35." + ".".join(str(p) for p in parts)


class Study:
    """A test study: (view, pixel index, modality) per image; its DICOM files under `folder`."""

    def __init__(self, n: int, images_spec: list[tuple[str, int, str]], folder: Path) -> None:
        self.uid, self.files = uid(n), []
        for k, (view, px, modality) in enumerate(images_spec):
            data = cxr_instance(PIXELS[px, 0], self.uid, uid(n, 1), uid(n, 1, k + 1), view=view, modality=modality,
                                instance_no=k + 1, patient_id=f"P-{n:04d}")
            path = folder / f"s{n}_{k}.dcm"
            path.write_bytes(data)
            self.files.append(path)
        # the image the node must report: the frontal one (PA, then AP)
        order = sorted(range(len(images_spec)), key=lambda k: (["PA", "AP"] + [images_spec[k][0]]).index(
            images_spec[k][0]))
        self.frontal = self.files[order[0]]


def wait_for(cond, timeout_s: float, what: str, step_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def sr_texts(raw: bytes) -> tuple[str, str]:
    """(findings, impression) of an ECHO SR read back with pydicom."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    tree = {it.ConceptNameCodeSequence[0].CodeValue: it for it in ds.ContentSequence}
    get = lambda code: tree[code].ContentSequence[0].TextValue if "ContentSequence" in tree[code] else ""  # noqa
    return get("121070"), get("121072")


@pytest.fixture(scope="module")
def expected_text(runtime_engine):  # noqa: F811
    """What EchoRuntime.generate says for a DICOM file: the node's texts must equal it."""
    from runtime.engine import EchoRuntime

    rt = EchoRuntime(runtime_engine.path, batch_size=None)
    cache: dict[str, str] = {}

    def text(path: Path) -> str:
        if str(path) not in cache:
            r = rt.generate([str(path)])[0]
            assert r.error is None, r.error
            cache[str(path)] = r.text
        return cache[str(path)]

    return text


def check_sr(raw: bytes, study: Study, expected: str, version_hint: str) -> None:
    """The SR joins the study, carries the device and the flags, and holds the expected text."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    src = pydicom.dcmread(study.frontal)
    assert ds.StudyInstanceUID == study.uid and ds.Modality == "SR"
    assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "COMPLETE"
    assert ds.SeriesDescription == "machine-generated, not for diagnostic use"
    eq = ds.ContributingEquipmentSequence[0]
    assert (eq.Manufacturer, eq.PurposeOfReferenceCodeSequence[0].CodeValue) == ("echo-cxr", "109102")
    assert eq.ManufacturerModelName and version_hint in eq.SoftwareVersions and pydicom.uid.UID(eq.DeviceUID).is_valid
    ev = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ev.ReferencedSOPInstanceUID == src.SOPInstanceUID  # the frontal image, not the lateral
    assert sr_texts(raw) == sections(expected)


def count_line(label: str, sent: int, found: int, equal: int, dups: int) -> str:
    return f"{label}: studies sent {sent}, SRs found {found}, texts equal {equal}, duplicates {dups}"


@pytest.fixture()
def orthanc_and_node_port(tmp_path):
    port = free_port()
    o = Orthanc(tmp_path / "orthanc", node=("ECHO", port))
    o.start()
    yield o, port
    o.stop()


def listen_args(engine, state: Path, port: int, o: Orthanc) -> list[str]:
    return ["listen", "--engine-dir", str(engine), "--state-dir", str(state), "--port", str(port),
            "--allow-aet", "ORTHANC", "--pacs", f"ORTHANC@127.0.0.1:{o.dicom_port}",
            "--quiet-seconds", str(QUIET_S), "--retry-base", "0.5", "--retry-cap", "2", "--threads", "1"]


def test_cstore_round_trip_with_a_kill_mid_study(runtime_engine, expected_text,  # noqa: F811
                                                 orthanc_and_node_port, tmp_path, capsys):
    """Orthanc -> node -> Orthanc over C-STORE; SIGKILL after half of study B, restart, B resent whole."""
    o, port = orthanc_and_node_port
    a = Study(1, [("PA", 2, "DX")], tmp_path)
    b = Study(2, [("LL", 3, "DX"), ("PA", 5, "DX")], tmp_path)  # lateral first: the PA must be reported
    c = Study(3, [("AP", 3, "CR")], tmp_path)
    ids = {s.uid: [o.upload(f.read_bytes())["ID"] for f in s.files] for s in (a, b, c)}
    state, log = tmp_path / "state", tmp_path / "node.log"
    node = NodeProcess(listen_args(runtime_engine.path, state, port, o), log, block_torch=True)
    try:
        node.wait_ready()
        o.send_to_node(ids[a.uid] + ids[c.uid])
        wait_for(lambda: o.sr_instances(a.uid) and o.sr_instances(c.uid), 60, "the SRs of studies A and C")
        o.send_to_node(ids[b.uid][:1])  # B's lateral only: B is not complete yet
        node.kill()  # mid-study, within B's quiet time
        assert not o.sr_instances(b.uid)
        node = NodeProcess(listen_args(runtime_engine.path, state, port, o), log, block_torch=True)
        node.wait_ready()
        o.send_to_node([o.study_id(b.uid), o.study_id(a.uid)])  # the PACS resends B whole, and A again
        wait_for(lambda: o.sr_instances(b.uid), 60, "the SR of study B")
        time.sleep(QUIET_S + 1.5)  # time for any duplicate (A resent) to appear
    finally:
        rc = node.stop()
    assert rc == 0, node.log[-3000:]
    found = {s.uid: o.srs(s.uid) for s in (a, b, c)}
    dups = sum(len(v) - 1 for v in found.values())
    texts = {s.uid: expected_text(s.frontal) for s in (a, b, c)}
    assert len(set(texts.values())) == 3  # three different reports: a mix-up cannot pass
    for s in (a, b, c):
        check_sr(found[s.uid][0], s, texts[s.uid], "fp32")
    with capsys.disabled():
        print("\n" + count_line("C-STORE round trip (node SIGKILLed mid-study, restarted)", 3,
                                sum(len(v) for v in found.values()), 3, dups))
    assert dups == 0 and all(len(v) == 1 for v in found.values())


def test_dicomweb_round_trip_qido_wado_stow(runtime_engine, expected_text, tmp_path, capsys):  # noqa: F811
    """The node polls Orthanc's DICOMweb plugin, fetches the images and STOWs the SR; a restart
    of the node (a fresh poll of every study) adds no second SR."""
    from benchmarks.pacs_orthanc import dicomweb_plugin

    if dicomweb_plugin() is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian: orthanc-dicomweb)")
    o = Orthanc(tmp_path / "orthanc", dicomweb=True)
    o.start()
    studies = [Study(11, [("PA", 2, "DX")], tmp_path), Study(12, [("LL", 5, "CR"), ("AP", 3, "CR")], tmp_path)]
    for s in studies:
        for f in s.files:
            o.upload(f.read_bytes())
    args = ["poll", "--engine-dir", str(runtime_engine.path), "--state-dir", str(tmp_path / "state"),
            "--dicomweb-url", o.dicomweb_url, "--poll-seconds", "0.5", "--quiet-seconds", str(QUIET_S),
            "--threads", "1"]
    try:
        node = NodeProcess(args, tmp_path / "node.log", block_torch=True)
        node.wait_ready()
        wait_for(lambda: all(o.sr_instances(s.uid) for s in studies), 60, "the SRs of both studies")
        assert node.stop() == 0, node.log[-3000:]
        node = NodeProcess(args, tmp_path / "node.log", block_torch=True)  # same state: nothing to do
        node.wait_ready()
        time.sleep(QUIET_S + 2)
        assert node.stop() == 0, node.log[-3000:]
        found = {s.uid: o.srs(s.uid) for s in studies}
    finally:
        node.stop()
        o.stop()
    dups = sum(len(v) - 1 for v in found.values())
    for s in studies:
        check_sr(found[s.uid][0], s, expected_text(s.frontal), "fp32")
    with capsys.disabled():
        print("\n" + count_line("DICOMweb round trip (QIDO-RS, WADO-RS, STOW-RS; node restarted)", len(studies),
                                sum(len(v) for v in found.values()), len(studies), dups))
    assert dups == 0

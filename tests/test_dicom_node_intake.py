"""The DICOM node's refusals, outbox and retries (echo_dicom, issue 35), in process.

Refusals: a pynetdicom SCU sends the node's C-STORE SCP what it must not take, and each answer is
the DICOM status intake.py names, recorded with the study UID; the allow-list and the transfer
syntaxes are refused at association. Outbox: with the PACS (a real Orthanc) down, the SR waits
with doubling backoff, survives a restart of the node (a new Node on the same state folder), and
is stored once Orthanc is up; sending it again (a crash between the PACS's Success and "marked
sent") leaves one SR in Orthanc, because its UIDs derive from the study and the engine version.
"""
from __future__ import annotations

import io
import time

import pytest

from test_runtime_graphs import images, runtime_engine  # noqa: F401

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom", reason="the [dicom-node] extra (pynetdicom) is not installed")

from benchmarks.pacs_orthanc import Orthanc, cxr_instance, free_port, why_no_orthanc  # noqa: E402
from echo_dicom import intake  # noqa: E402
from echo_dicom.node import Node, NodeOptions, backoff  # noqa: E402
from echo_dicom.reporter import pick_image, sr_uids  # noqa: E402
from echo_dicom.store import Instance  # noqa: E402

PIXELS = images(6, size=64)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.8.498.36." + ".".join(str(p) for p in parts)


def instance(n: int, **fields) -> pydicom.Dataset:
    raw = cxr_instance(PIXELS[2, 0], uid(n), uid(n, 1), uid(n, 1, 1), **fields)
    return pydicom.dcmread(io.BytesIO(raw))


class NoPacs:
    """A sender for tests that only look at intake: every send fails, nothing leaves."""

    def send(self, paths):
        return ["no PACS in this test"] * len(paths)


@pytest.fixture()
def node(runtime_engine, tmp_path):  # noqa: F811
    n = Node(NodeOptions(engine_dir=str(runtime_engine.path), state_dir=str(tmp_path / "state"), quiet_s=0.2,
                         retry_base_s=0.3, retry_cap_s=1.0, threads=1), NoPacs())
    yield n
    n.shutdown()


@pytest.fixture()
def scp(node):
    from echo_dicom.scp import StoreHandler, make_ae, start_scp

    port = free_port()
    server = start_scp(make_ae("ECHO", ["MODALITY"]), "127.0.0.1", port,
                       StoreHandler(node.store, node.check_pixels, node.version))
    yield port
    server.shutdown()


def associate(port: int, contexts: list[tuple[str, list[str]]], aet: str = "MODALITY"):
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    for sop, syntaxes in contexts:
        ae.add_requested_context(sop, syntaxes)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title="ECHO")


EXPLICIT = ["1.2.840.10008.1.2.1"]


def refusal_cases() -> list[tuple[str, pydicom.Dataset, int]]:
    """(what, data set, expected status) for each kind of instance the node must answer."""
    good = instance(1)
    ct = instance(2)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ct.Modality = "CT"
    not_cxr = instance(3, Modality="MG")
    knee = instance(4, BodyPartExamined="KNEE")
    cut = instance(5)
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 3 // 2 * 2]  # a third of the pixels, even length
    no_study = instance(6)
    del no_study.StudyInstanceUID
    return [("a DX chest image", good, 0x0000), ("a CT image", ct, 0x0122), ("DX class, modality MG", not_cxr, 0xA900),
            ("a knee", knee, 0xA900), ("truncated pixel data", cut, 0xC200), ("no Study Instance UID", no_study, 0xC100)]


def test_each_refusal_gets_its_dicom_status_and_is_recorded_with_the_study(node, scp):
    cases = refusal_cases()
    contexts = [(intake.DX_FOR_PRESENTATION, EXPLICIT), (CT_IMAGE, EXPLICIT)]
    assoc = associate(scp, contexts)
    assert assoc.is_established
    try:
        got = {what: int(assoc.send_c_store(ds).Status) for what, ds, _ in cases}
    finally:
        assoc.release()
    assert got == {what: status for what, _, status in cases}
    rows = node.store.refusal_rows()
    assert [(r["study_uid"], r["status"], r["calling_aet"]) for r in rows] == [
        (uid(2), 0x0122, "MODALITY"), (uid(3), 0xA900, "MODALITY"), (uid(4), 0xA900, "MODALITY"),
        (uid(5), 0xC200, "MODALITY"), ("", 0xC100, "MODALITY")]
    assert "StudyInstanceUID" in rows[-1]["reason"] and "MG" in rows[1]["reason"] and "KNEE" in rows[2]["reason"]
    assert node.store.counts()["instances"] == 1  # only the good one was kept
    assert not list((node.store.instances_dir / uid(5)).glob("*.dcm"))  # the refused file was not left behind


def test_allow_list_and_undecodable_transfer_syntax_are_refused_at_association(node, scp, caplog):
    with caplog.at_level("WARNING", logger="echo_dicom"):
        intruder = associate(scp, [(intake.DX_FOR_PRESENTATION, EXPLICIT)], aet="INTRUDER")
        assert intruder.is_rejected
        assoc = associate(scp, [(intake.DX_FOR_PRESENTATION, [JPEG_LS])])
        # the node accepts the association with that context rejected; pynetdicom's requestor
        # then aborts it, having nothing it can send
        assert not (assoc.is_established and assoc.accepted_contexts)
        if assoc.is_established:
            assoc.release()
        time.sleep(0.5)
    if JPEG_LS in intake.decodable_transfer_syntaxes():
        pytest.skip("this install decodes JPEG-LS: no undecodable syntax to offer")
    assert any("presentation context" in r.message and JPEG_LS in r.message for r in caplog.records)
    assert any("INTRUDER" in r.message and "allow-list" in r.message for r in caplog.records)


def test_the_frontal_image_is_picked_whatever_the_order():
    lat = Instance("9", "s", "x", "lat.dcm", "LL", 1, 1)
    ap = Instance("8", "s", "x", "ap.dcm", "AP", 1, 3)
    pa = Instance("7", "s", "x", "pa.dcm", "PA", 2, 2)
    assert pick_image([lat, ap, pa]).path == pick_image([pa, lat, ap]).path == "pa.dcm"
    assert pick_image([lat, ap]).path == "ap.dcm"
    assert pick_image([Instance("2", "s", "x", "b", "", 1, 2), Instance("1", "s", "x", "a", "", 1, 1)]).path == "a"


def test_backoff_doubles_up_to_the_cap():
    assert [backoff(n, 2.0, 300.0) for n in range(10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert backoff(10_000, 2.0, 300.0) == 300.0


@pytest.mark.skipif(why_no_orthanc() is not None, reason=str(why_no_orthanc()))
def test_outbox_waits_for_a_pacs_that_is_down_survives_a_restart_and_stores_once(runtime_engine, tmp_path):  # noqa: F811
    from echo_dicom.senders import CStoreSender, PacsAddress

    o = Orthanc(tmp_path / "orthanc", node=("ECHO", free_port()))  # ports chosen, not started: the PACS is down
    sender = CStoreSender(PacsAddress("ORTHANC", "127.0.0.1", o.dicom_port), "ECHO", timeout_s=10)
    opts = NodeOptions(engine_dir=str(runtime_engine.path), state_dir=str(tmp_path / "state"), quiet_s=0.0,
                       retry_base_s=0.5, retry_cap_s=1.0, threads=1)
    node = Node(opts, sender)
    intake.save_instance(node.store, instance(20), node.check_pixels)
    assert node.reporter.report_ready() == 1
    assert node.flush_outbox() == 0  # refused connection: attempt 1 failed
    [r] = list(node.store.reports())
    assert (r["state"], r["attempts"]) == ("outbox", 1) and "association" in r["last_error"]
    assert node.flush_outbox() == 0 and not node.store.due(8)  # backing off: not due again yet
    node.shutdown()

    o.start()
    try:
        node = Node(opts, sender)  # a restart: the outbox is read back from the state folder
        deadline = time.monotonic() + 10
        while node.flush_outbox() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        [r] = list(node.store.reports())
        assert (r["state"], r["attempts"]) == ("sent", 2)
        # a crash after the PACS said Success but before "sent" was written: the SR goes again
        sr_path = next(node.store.outbox_dir.glob("*.sr.dcm"))
        assert sender.send([str(sr_path)]) == [None]
        srs = o.srs(uid(20))
        assert len(srs) == 1  # same SOP Instance UID: Orthanc keeps one
        assert pydicom.dcmread(io.BytesIO(srs[0])).SOPInstanceUID == sr_uids(uid(20), node.version)[1]
        node.shutdown()
    finally:
        o.stop()


def test_explicit_trigger_completes_a_study_and_status_counts_it(runtime_engine, tmp_path):  # noqa: F811
    """--complete-on trigger: no quiet time ever completes a study; `echo-dicom trigger` does."""
    import json

    from click.testing import CliRunner

    from echo_dicom.cli import main

    state = tmp_path / "state"
    node = Node(NodeOptions(engine_dir=str(runtime_engine.path), state_dir=str(state), quiet_s=None, threads=1),
                NoPacs())
    try:
        intake.save_instance(node.store, instance(30), node.check_pixels, now=time.time() - 3600)
        assert node.reporter.report_ready() == 0  # an hour of quiet is not a trigger
        r = CliRunner().invoke(main, ["trigger", "--state-dir", str(state), uid(30), uid(31)])
        assert r.exit_code == 1 and f"no image of study {uid(31)}" in r.output  # the unknown one is named
        assert node.reporter.report_ready() == 1 and node.reporter.report_ready() == 0  # once
        r = CliRunner().invoke(main, ["status", "--state-dir", str(state), "--reports"])
        counts, report = map(json.loads, r.output.splitlines())
        assert counts == {"instances": 1, "studies": 1, "refusals": 0, "reports_outbox": 1}
        assert (report["study_uid"], report["state"], report["image_sop_uid"]) == (uid(30), "outbox", uid(30, 1, 1))
    finally:
        node.shutdown()


def test_cli_refuses_to_listen_without_an_allow_list(runtime_engine, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from echo_dicom.cli import main

    r = CliRunner().invoke(main, ["listen", "--engine-dir", str(runtime_engine.path), "--state-dir",
                                  str(tmp_path / "s"), "--pacs", "ORTHANC@127.0.0.1:4242"])
    assert r.exit_code == 2 and "--allow-aet" in r.output
    r = CliRunner().invoke(main, ["listen", "--engine-dir", str(runtime_engine.path), "--state-dir",
                                  str(tmp_path / "s"), "--allow-aet", "X", "--pacs", "ORTHANC:4242"])
    assert r.exit_code == 2 and "AET@HOST:PORT" in r.output


def test_sr_options_give_the_device_the_flags_and_fixed_uids():
    """Without Orthanc: what the node asks of runtime.report_formats.dicom_sr."""
    from runtime.engine import Report
    from runtime.report_formats import EngineInfo, SourceStudy, SROptions, dicom_sr

    from echo_dicom.reporter import SERIES_DESCRIPTION

    engine = EngineInfo("echo-test", "fp32", "ab" * 32)
    series, sop = sr_uids(uid(40), engine.version())
    assert (series, sop) == sr_uids(uid(40), engine.version()) and series != sop  # fixed by the pair
    assert sr_uids(uid(40), "other:fp32:0") != (series, sop) and sr_uids(uid(41), engine.version()) != (series, sop)
    src = SourceStudy.from_bytes(cxr_instance(PIXELS[2, 0], uid(40), uid(40, 1), uid(40, 1, 1)))
    opts = SROptions(series_description=SERIES_DESCRIPTION, sop_uid=sop, series_uid=series,
                     contributing_equipment=True, software_version=engine.version())
    rep = Report(path="x.dcm", text="FINDINGS: Clear. IMPRESSION: Normal.")
    ds = pydicom.dcmread(io.BytesIO(dicom_sr(rep, src, engine, options=opts)))
    assert (ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID, ds.SeriesInstanceUID) == (sop, sop, series)
    assert (ds.StudyInstanceUID, ds.VerificationFlag, ds.SeriesDescription) == (uid(40), "UNVERIFIED",
                                                                                "machine-generated, not for diagnostic use")
    eq = ds.ContributingEquipmentSequence[0]
    assert (eq.Manufacturer, eq.ManufacturerModelName, eq.SoftwareVersions, eq.DeviceUID) == (
        "echo-cxr", "echo-test", "echo-test:fp32:abababababababab", engine.device_uid())
    plain = pydicom.dcmread(io.BytesIO(dicom_sr(rep, src, engine)))  # no options: as before
    assert "ContributingEquipmentSequence" not in plain and plain.SeriesDescription == "ECHO machine-generated report"


def test_a_restart_gives_unreported_studies_their_quiet_time_again(runtime_engine, tmp_path):  # noqa: F811
    """A study cut off mid-transfer by the node's own downtime is not reported at once on restart
    from the part that had arrived: its sender gets the quiet time to resume."""
    opts = NodeOptions(engine_dir=str(runtime_engine.path), state_dir=str(tmp_path / "state"), quiet_s=30.0,
                       threads=1)
    node = Node(opts, NoPacs())
    intake.save_instance(node.store, instance(50, view="LL"), node.check_pixels, now=time.time() - 3600)
    node.shutdown()
    node = Node(opts, NoPacs())  # an hour later
    try:
        assert node.reporter.report_ready() == 0  # waits: the PA may still come
        assert node.store.ready_studies(node.version, 30.0, 8, now=time.time() + 31) == [uid(50)]
    finally:
        node.shutdown()

"""Clinical output formats (runtime/report_formats.py, echo-report --format): DICOM SR read back
with pydicom and its content tree checked; FHIR R4 DiagnosticReport validated against the R4
(4.0.1) models of fhirclient (SMART on FHIR) plus the value sets and primitive formats those
models leave open; both from a real engine through echo-report, for a PNG and a DICOM input."""
from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_runtime_graphs import images, runtime_engine  # noqa: F401

from runtime.engine import Report
from runtime.report_formats import (MACHINE_GENERATED, EngineInfo, ReportFormatError, SourceStudy, dicom_sr,
                                    fhir_diagnostic_report, render, sections)

pydicom = pytest.importorskip("pydicom")

TEXT = ("FINDINGS: The cardiac silhouette is enlarged. There is a small left pleural effusion. "
        "IMPRESSION: Cardiomegaly with a small left effusion.")
NOW = dt.datetime(2026, 12, 2, 21, 30, 5, tzinfo=dt.timezone.utc)
STUDY = {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1001", "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1002",
         "PatientID": "P-0042", "PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "PatientSex": "F",
         "StudyDate": "20261201", "StudyTime": "083015", "AccessionNumber": "ACC-7", "StudyID": "S7"}


def cxr_dicom(seed: int = 0, pixels=None, **fields) -> bytes:
    """One of the DICOM test images (tests/test_preprocess.py) inside a study: UIDs, patient, dates.
    pixels: an image in [-1, 1] (test_runtime_graphs.images) as 12-bit values, else noise."""
    from test_preprocess import dicom_bytes

    arr = np.random.default_rng(seed).integers(0, 4096, (48, 48)) if pixels is None else (pixels + 1) * 2047.5
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(arr)))
    for k, v in {**STUDY, **fields}.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def report(text: str = TEXT, path: str = "cxr.png") -> Report:
    return Report(path=path, text=text, tokens=[5, 6, 7], forward_passes=3, stop="eos")


# ----------------------------------------------------------------------------- sections
@pytest.mark.parametrize("text, want", [
    (TEXT, ("The cardiac silhouette is enlarged. There is a small left pleural effusion.",
            "Cardiomegaly with a small left effusion.")),
    ("No headings at all.", ("No headings at all.", "")),
    ("IMPRESSION: Normal.", ("", "Normal.")),
    ("findings:  a  b impression: c FINDINGS: d", ("a b d", "c")),
    ("", ("", "")),
])
def test_sections_split_at_the_reports_own_headings(text, want):
    assert sections(text) == want


# ----------------------------------------------------------------------------- DICOM SR
def _code(item, key="ConceptNameCodeSequence"):
    c = getattr(item, key)[0]
    return (c.CodeValue, c.CodingSchemeDesignator)


def _tree(ds) -> dict:
    """{concept code: item} of the root's children, and the section texts."""
    return {_code(it): it for it in ds.ContentSequence}


def test_sr_from_a_png_reads_back_with_its_content_tree():
    raw = dicom_sr(report(), None, EngineInfo("echo-test", "fp32", "ab" * 32), now=NOW)
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.BasicTextSRStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.Modality == "SR" and ds.ValueType == "CONTAINER" and _code(ds) == ("18748-4", "LN")
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2000" and ds.ContentDate == "20261202"
    # a new study of its own (the input carried none), every UID valid and distinct
    uids = [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    assert len(set(uids)) == 3 and all(pydicom.uid.UID(u).is_valid for u in uids)
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds and ds.PatientID == ""
    tree = _tree(ds)
    assert _code(tree[("121005", "DCM")], "ConceptCodeSequence") == ("121007", "DCM")  # observer: a device
    assert tree[("121012", "DCM")].UID == EngineInfo("echo-test", "fp32", "ab" * 32).device_uid()
    assert tree[("121015", "DCM")].TextValue == "echo-test"
    find, imp = tree[("121070", "DCM")], tree[("121072", "DCM")]
    assert [it.RelationshipType for it in (find, imp)] == ["CONTAINS", "CONTAINS"]
    f_text, i_text = find.ContentSequence[0], imp.ContentSequence[0]
    assert (_code(f_text), f_text.ValueType, f_text.TextValue) == (("121071", "DCM"), "TEXT", sections(TEXT)[0])
    assert (_code(i_text), i_text.TextValue) == (("121073", "DCM"), sections(TEXT)[1])
    assert "ContentSequence" not in f_text  # no image to point at


def test_sr_from_a_dicom_test_image_keeps_the_studys_uids(tmp_path):
    src_bytes = cxr_dicom()
    src = pydicom.dcmread(io.BytesIO(src_bytes))
    study = SourceStudy.from_bytes(src_bytes)
    (tmp_path / "a.dcm").write_bytes(src_bytes)
    assert SourceStudy.from_path(tmp_path / "a.dcm") == study
    ds = pydicom.dcmread(io.BytesIO(dicom_sr(report("FINDINGS: Clear lungs. IMPRESSION: Normal é."), study)))
    assert ds.StudyInstanceUID == src.StudyInstanceUID == STUDY["StudyInstanceUID"]
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyID"):
        assert str(ds[k].value) == str(src[k].value), k
    ev = ds.CurrentRequestedProcedureEvidenceSequence[0]
    series = ev.ReferencedSeriesSequence[0]
    sop = series.ReferencedSOPSequence[0]
    assert (ev.StudyInstanceUID, series.SeriesInstanceUID) == (src.StudyInstanceUID, src.SeriesInstanceUID)
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
    finding = _tree(ds)[("121070", "DCM")].ContentSequence[0]
    img = finding.ContentSequence[0]  # the finding was inferred from the source image
    assert (img.RelationshipType, img.ValueType) == ("INFERRED FROM", "IMAGE")
    assert img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert _tree(ds)[("121072", "DCM")].ContentSequence[0].TextValue == "Normal é."  # UTF-8 survives


def test_source_study_is_none_for_non_dicom_or_unusable_input(tmp_path):
    from test_preprocess import dicom_bytes, png_bytes

    assert SourceStudy.from_bytes(png_bytes(np.zeros((8, 8), np.uint8))) is None
    assert SourceStudy.from_bytes(dicom_bytes(np.zeros((8, 8)))) is None  # no Study Instance UID
    assert SourceStudy.from_bytes(cxr_dicom()[:200]) is None  # cut inside the header
    assert SourceStudy.from_path(tmp_path / "missing.dcm") is None


# ----------------------------------------------------------------------------- FHIR R4
# R4 (4.0.1) primitive formats (http://hl7.org/fhir/R4/datatypes.html) and the DiagnosticReport status value set
R4_INSTANT = re.compile(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
                        r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))")
R4_DATETIME = re.compile(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
                         r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|"
                         r"14:00)))?)?)?")
R4_STATUS = {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled",
             "entered-in-error", "unknown"}


def validate_r4_diagnostic_report(res: dict) -> None:
    """Raises unless `res` is a valid FHIR R4 DiagnosticReport: fhirclient's R4 models in strict
    mode (unknown elements, types, cardinality, required elements), then what they leave open."""
    from fhirclient.models.diagnosticreport import DiagnosticReport

    model = DiagnosticReport(res, strict=True)
    assert model.as_json() == res  # every element was understood (nothing dropped or altered)
    assert res["status"] in R4_STATUS, res["status"]
    assert res["code"].get("coding") or res["code"].get("text")
    assert R4_INSTANT.fullmatch(res["issued"]), res["issued"]
    if "effectiveDateTime" in res:
        assert R4_DATETIME.fullmatch(res["effectiveDateTime"]), res["effectiveDateTime"]
    for form in res.get("presentedForm", []):
        base64.b64decode(form["data"], validate=True)
        assert R4_DATETIME.fullmatch(form["creation"])
    assert res["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')


def test_fhir_report_from_a_png_is_valid_r4_and_marked_machine_generated():
    from fhirclient.models.fhirabstractbase import FHIRValidationError

    res = fhir_diagnostic_report(report(), now=NOW)
    validate_r4_diagnostic_report(res)
    assert res["status"] == "preliminary" and res["issued"] == "2026-12-02T21:30:05Z"
    assert base64.b64decode(res["presentedForm"][0]["data"]).decode() == TEXT
    assert res["conclusion"] == "Cardiomegaly with a small left effusion."
    assert res["meta"]["security"][0]["code"] == "AIAST" and MACHINE_GENERATED in res["text"]["div"]
    assert "subject" not in res and "imagingStudy" not in res and "effectiveDateTime" not in res
    # the checker can fail: a missing required element, an unknown one, a bad status or instant
    for broken in ({k: v for k, v in res.items() if k != "code"}, {**res, "bogus": 1}, {**res, "status": "draft"},
                   {**res, "issued": "2026-12-02 21:30"}):
        with pytest.raises((AssertionError, FHIRValidationError)):
            validate_r4_diagnostic_report(broken)


def test_fhir_report_from_a_dicom_names_the_study_and_patient():
    res = fhir_diagnostic_report(report("FINDINGS: Clear <lungs> & heart."), SourceStudy.from_bytes(cxr_dicom()), now=NOW)
    validate_r4_diagnostic_report(res)
    assert res["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid",
                                                    "value": "urn:oid:" + STUDY["StudyInstanceUID"]}
    assert res["subject"] == {"identifier": {"value": "P-0042"}, "display": "Doe Jane"}
    assert res["effectiveDateTime"] == "2026-12-01T08:30:15Z"
    assert "conclusion" not in res and "Clear &lt;lungs&gt; &amp; heart." in res["text"]["div"]


def test_render_dispatches_and_refuses_unknown_formats():
    r = report()
    assert render("text", r) == TEXT.encode()
    assert json.loads(render("json", r)) == {"path": "cxr.png", "text": TEXT, "tokens": [5, 6, 7], "forward_passes": 3,
                                             "stop": "eos", "error": None}
    assert json.loads(render("fhir", r))["resourceType"] == "DiagnosticReport"
    assert render("dicom-sr", r)[128:132] == b"DICM"
    with pytest.raises(ReportFormatError, match="unknown report format 'hl7v2'"):
        render("hl7v2", r)


# ----------------------------------------------------------------------------- echo-report --format, end to end
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("formats")
    x = images(2, size=64)
    png = d / "cxr0.png"
    Image.fromarray(((x[0, 0] + 1) * 127.5).astype(np.uint8)).save(png)
    dcm = d / "cxr1.dcm"
    dcm.write_bytes(cxr_dicom(seed=3))
    return str(png), str(dcm)


def _run(*args):
    from runtime.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_echo_report_writes_fhir_and_dicom_sr_from_a_real_engine(runtime_engine, inputs, tmp_path):
    png, dcm = inputs
    text = _run("--engine-dir", runtime_engine.path, "--format", "json", png, dcm)
    assert text.exit_code == 0, text.output
    want = {o["path"]: o["text"] for o in map(json.loads, text.stdout.splitlines())}

    r = _run("--engine-dir", runtime_engine.path, "--format", "fhir", png, dcm)
    assert r.exit_code == 0, r.output
    res = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(res) == 2
    for path, x in zip((png, dcm), res):
        validate_r4_diagnostic_report(x)
        assert base64.b64decode(x["presentedForm"][0]["data"]).decode() == want[path]
        assert x["meta"]["tag"][0]["display"].startswith(f"written by the ECHO engine {Path(runtime_engine.path).name}")
    assert "imagingStudy" not in res[0] and res[1]["imagingStudy"][0]["identifier"]["value"].endswith(
        STUDY["StudyInstanceUID"])

    out = tmp_path / "sr"
    r = _run("--engine-dir", runtime_engine.path, "--format", "dicom-sr", "--out-dir", out, png, dcm, png)
    assert r.exit_code == 0, r.output
    written = r.stdout.split()
    assert written == [str(out / "cxr0.png.sr.dcm"), str(out / "cxr1.dcm.sr.dcm"), str(out / "cxr0.png-1.sr.dcm")]
    png_sr, dcm_sr = pydicom.dcmread(written[0]), pydicom.dcmread(written[1])
    src = pydicom.dcmread(dcm)
    assert dcm_sr.StudyInstanceUID == src.StudyInstanceUID and png_sr.StudyInstanceUID != src.StudyInstanceUID
    ref = dcm_sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert (ref.SeriesInstanceUID, ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == (
        src.SeriesInstanceUID, src.SOPInstanceUID)
    for path, ds in ((png, png_sr), (dcm, dcm_sr)):
        f, i = sections(want[path])
        secs = {_code(c): (c.ContentSequence[0].TextValue if "ContentSequence" in c else "") for c in ds.ContentSequence
                if c.ValueType == "CONTAINER"}
        assert secs == {("121070", "DCM"): f, ("121072", "DCM"): i}


def test_echo_report_format_errors_are_one_line(runtime_engine, inputs, tmp_path):
    png, _ = inputs
    r = _run("--engine-dir", runtime_engine.path, "--format", "fhir", "--stream", png)
    assert r.exit_code == 2 and "--stream prints text or json, not fhir" in r.stderr and r.stdout == ""
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _run("--engine-dir", runtime_engine.path, "--format", "dicom-sr", "--out-dir", blocker / "sub", png)
    assert r.exit_code == 2 and "cannot write" in r.stderr and "Traceback" not in r.output
    r = _run("--engine-dir", runtime_engine.path, "--format", "fhir", png, str(tmp_path / "missing.png"))
    assert r.exit_code == 1 and len(r.stdout.splitlines()) == 1 and "missing.png: file not found" in r.stderr

"""Clinical output formats of a generated report: text, JSON, DICOM SR, FHIR R4 DiagnosticReport.

    render(fmt, report, source=None, engine=None) -> bytes     (fmt in FORMATS)

`report` is a runtime Report (anything with .path, .text, .tokens, .forward_passes, .stop).
`source` is the SourceStudy of the input image when it was DICOM (SourceStudy.from_bytes /
from_path; None for PNG and JPEG): the SR then joins the image's study and references its
Study / Series / SOP Instance UIDs, and the FHIR resource names the study and the patient.

dicom-sr   a Basic Text SR (DICOM PS3.3 A.35.1) following TID 2000 "Basic Diagnostic Imaging
           Report": a FINDINGS and an IMPRESSION section, the text split at the report's own
           "FINDINGS:" / "IMPRESSION:" headings; the observer is a device (this engine), the
           document UNVERIFIED and PRELIMINARY. Needs pydicom (the [dicom] extra). SROptions adds
           what a DICOM node filing it into a PACS needs (echo_dicom): a series description,
           fixed UIDs, the engine as Contributing Equipment.
fhir       a FHIR R4 (4.0.1) DiagnosticReport, status "preliminary", the whole text in
           presentedForm (base64 text/plain), the impression in conclusion, marked
           machine-generated twice: meta.security AIAST ("Artificial Intelligence asserted",
           HL7 v3 ObservationValue) and the narrative's first line.
Torch-free; used by `echo-report --format` and by `echo-serve`.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import io
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import EchoRuntimeError

FORMATS = ("text", "json", "dicom-sr", "fhir")
MACHINE_GENERATED = "Machine-generated preliminary report (ECHO): not reviewed by a radiologist."
SOFTWARE = "echo-cxr"

# codes (DICOM PS3.16: DCM, LOINC as LN)
_REPORT_TITLE = ("18748-4", "LN", "Diagnostic Imaging Report")
_FINDINGS_SECTION = ("121070", "DCM", "Findings")
_FINDING = ("121071", "DCM", "Finding")
_IMPRESSION_SECTION = ("121072", "DCM", "Impressions")
_IMPRESSION = ("121073", "DCM", "Impression")
_LANGUAGE = ("121049", "DCM", "Language of Content Item and Descendants")
_ENGLISH = ("en", "RFC5646", "English")
_OBSERVER_TYPE = ("121005", "DCM", "Observer Type")
_DEVICE = ("121007", "DCM", "Device")
_DEVICE_UID = ("121012", "DCM", "Device Observer UID")
_DEVICE_NAME = ("121013", "DCM", "Device Observer Name")
_DEVICE_MAKER = ("121014", "DCM", "Device Observer Manufacturer")
_DEVICE_MODEL = ("121015", "DCM", "Device Observer Model Name")
_PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")

_FHIR_AI = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
            "display": "Artificial Intelligence asserted"}
_XHTML = "http://www.w3.org/1999/xhtml"
NEEDS_DICOM = "dicom-sr output needs the [dicom] extra (pip install 'echo-cxr[dicom]')"
_HEADING = re.compile(r"\b(FINDINGS|IMPRESSION)\s*:", re.IGNORECASE)


class ReportFormatError(EchoRuntimeError):
    """A report could not be written in the asked format (unknown format, missing extra)."""


@dataclass
class SourceStudy:
    """What a DICOM input says about its study, series, instance and patient."""

    study_uid: str
    series_uid: str = ""
    sop_uid: str = ""
    sop_class_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician: str = ""
    study_description: str = ""

    @classmethod
    def from_bytes(cls, data: bytes) -> Optional["SourceStudy"]:
        """The study of DICOM bytes; None for anything else (PNG, JPEG, unreadable, no Study UID)."""
        if len(data) < 132 or data[128:132] != b"DICM":
            return None
        try:
            import pydicom
            from pydicom.errors import InvalidDicomError
        except ImportError:
            return None
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
            return None
        study = str(ds.get("StudyInstanceUID", "") or "")
        if not study:
            return None

        def s(key: str) -> str:
            v = ds.get(key, "")
            return "" if v is None else str(v)

        return cls(study_uid=study, series_uid=s("SeriesInstanceUID"), sop_uid=s("SOPInstanceUID"),
                   sop_class_uid=s("SOPClassUID"), patient_id=s("PatientID"), patient_name=s("PatientName"),
                   patient_birth_date=s("PatientBirthDate"), patient_sex=s("PatientSex"), study_date=s("StudyDate"),
                   study_time=s("StudyTime"), study_id=s("StudyID"), accession_number=s("AccessionNumber"),
                   referring_physician=s("ReferringPhysicianName"), study_description=s("StudyDescription"))

    @classmethod
    def from_path(cls, path: str | Path) -> Optional["SourceStudy"]:
        """The study of a DICOM file (reads the header only); None for other files."""
        try:
            with open(path, "rb") as f:
                head = f.read(132)
                if head[128:132] != b"DICM":
                    return None
                return cls.from_bytes(head + f.read())
        except OSError:
            return None


@dataclass
class EngineInfo:
    """Which engine wrote the report: named in the SR's device observer and the FHIR resource."""

    name: str = "echo"
    precision: str = "fp32"
    manifest_sha256: str = ""  # identifies the engine folder; the device observer UID derives from it

    @classmethod
    def of_engine_dir(cls, engine_dir: str | Path, precision: str = "fp32") -> "EngineInfo":
        d = Path(engine_dir).resolve()
        try:
            sha = hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
        except OSError:
            sha = ""
        return cls(name=d.name, precision=precision, manifest_sha256=sha)

    def device_uid(self) -> str:
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=[SOFTWARE, self.name, self.manifest_sha256 or self.name])

    def version(self) -> str:
        """The engine's version: name, precision and the manifest's hash (what a report is unique on)."""
        return f"{self.name}:{self.precision}:{(self.manifest_sha256 or 'unhashed')[:16]}"


@dataclass
class SROptions:
    """Optional parts of the SR for a node that files it into a PACS (echo_dicom).

    sop_uid / series_uid: fixed UIDs (None: new random ones). A node that derives them from the
    study and the engine version makes a re-sent SR the same instance, so a PACS keeps one copy.
    contributing_equipment: the engine as Contributing Equipment (0018,A001): manufacturer, model,
    software version and device UID, purpose "Processing Equipment" (DCM 109102)."""

    series_description: str = "ECHO machine-generated report"
    sop_uid: Optional[str] = None
    series_uid: Optional[str] = None
    contributing_equipment: bool = False
    software_version: str = ""


def sections(text: str) -> tuple[str, str]:
    """(findings, impression) from a report's "FINDINGS: ... IMPRESSION: ..." text.

    Text before any heading, or a report without headings, counts as findings; a repeated
    heading's text is appended to its section."""
    parts = {"FINDINGS": [], "IMPRESSION": []}
    pos, current = 0, "FINDINGS"
    for m in _HEADING.finditer(text):
        parts[current].append(text[pos : m.start()])
        current, pos = m.group(1).upper(), m.end()
    parts[current].append(text[pos:])
    return tuple(" ".join(" ".join(parts[k]).split()) for k in ("FINDINGS", "IMPRESSION"))  # type: ignore[return-value]


def report_dict(report, timings: bool = False) -> dict[str, Any]:
    """The JSON object of a report (the echo-report --format json line)."""
    d = {"path": report.path, "text": report.text, "tokens": list(report.tokens),
         "forward_passes": int(report.forward_passes), "stop": report.stop, "error": report.error}
    if timings:
        d["timings"] = report.timings
    return d


# ----------------------------------------------------------------------------- DICOM SR
def _code(ds_cls, code: tuple[str, str, str]):
    c = ds_cls()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = code
    return c


def _item(ds_cls, relationship: str, value_type: str, concept: Optional[tuple[str, str, str]], **values):
    it = ds_cls()
    it.RelationshipType, it.ValueType = relationship, value_type
    if concept is not None:
        it.ConceptNameCodeSequence = [_code(ds_cls, concept)]
    for k, v in values.items():
        setattr(it, k, v)
    return it


def _contributing_equipment(ds_cls, engine: EngineInfo, opts: SROptions, date: str, time_: str):
    """One Contributing Equipment item naming the engine that wrote the document."""
    eq = ds_cls()
    eq.PurposeOfReferenceCodeSequence = [_code(ds_cls, _PROCESSING_EQUIPMENT)]
    eq.Manufacturer = SOFTWARE
    eq.ManufacturerModelName = engine.name
    eq.SoftwareVersions = opts.software_version or engine.version()
    eq.DeviceUID = engine.device_uid()
    eq.ContributionDateTime = date + time_
    eq.ContributionDescription = MACHINE_GENERATED
    return eq


def dicom_sr(report, source: Optional[SourceStudy] = None, engine: Optional[EngineInfo] = None,
             now: Optional[_dt.datetime] = None, options: Optional[SROptions] = None) -> bytes:
    """The report as a DICOM Basic Text SR file (bytes, Part 10, explicit VR little endian)."""
    try:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
    except ImportError:
        raise ReportFormatError(NEEDS_DICOM) from None
    engine, opts = engine or EngineInfo(), options or SROptions()
    now = now or _dt.datetime.now(_dt.timezone.utc)
    date, time_ = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = opts.sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_
    _patient_and_study(ds, source, generate_uid)
    _sr_series_and_equipment(ds, engine, opts, date, time_, generate_uid)
    _sr_document_general(ds, source, date, time_)
    _sr_content(ds, report, source, engine)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _patient_and_study(ds, src: Optional[SourceStudy], generate_uid: Callable[[], str]) -> None:
    """Patient and General Study modules: the source study's, so the SR files under it."""
    ds.PatientName = src.patient_name if src else ""
    ds.PatientID = src.patient_id if src else ""
    ds.PatientBirthDate = src.patient_birth_date if src else ""
    ds.PatientSex = src.patient_sex if src else ""
    ds.StudyInstanceUID = src.study_uid if src else generate_uid()
    ds.StudyDate = src.study_date if src else ""
    ds.StudyTime = src.study_time if src else ""
    ds.ReferringPhysicianName = src.referring_physician if src else ""
    ds.StudyID = src.study_id if src else ""
    ds.AccessionNumber = src.accession_number if src else ""
    if src and src.study_description:
        ds.StudyDescription = src.study_description


def _sr_series_and_equipment(ds, engine: EngineInfo, opts: SROptions, date: str, time_: str,
                             generate_uid: Callable[[], str]) -> None:
    """SR Document Series and General Equipment modules (and the contributing equipment: ECHO)."""
    ds.Modality = "SR"
    ds.SeriesInstanceUID = opts.series_uid or generate_uid()
    ds.SeriesNumber = 9001
    ds.SeriesDescription = opts.series_description
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = SOFTWARE
    ds.ManufacturerModelName = engine.name
    ds.SoftwareVersions = f"{SOFTWARE} {engine.precision}"
    if opts.contributing_equipment:
        ds.ContributingEquipmentSequence = [_contributing_equipment(type(ds), engine, opts, date, time_)]


def _sr_document_general(ds, src: Optional[SourceStudy], date: str, time_: str) -> None:
    """SR Document General module: an unverified, preliminary report, with the image it was read from."""
    D = type(ds)
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    ds.ContentDate, ds.ContentTime = date, time_
    ds.PerformedProcedureCodeSequence = []
    if src and src.sop_uid and src.series_uid:
        sop = D()
        sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = src.sop_class_uid, src.sop_uid
        series = D()
        series.SeriesInstanceUID, series.ReferencedSOPSequence = src.series_uid, [sop]
        study = D()
        study.StudyInstanceUID, study.ReferencedSeriesSequence = src.study_uid, [series]
        ds.CurrentRequestedProcedureEvidenceSequence = [study]


def _sr_content(ds, report, src: Optional[SourceStudy], engine: EngineInfo) -> None:
    """SR Document Content: the root container and its tree (TID 2000): language, the observer (this
    device), then the findings and impression sections, the finding inferred from the source image."""
    D = type(ds)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(D, _REPORT_TITLE)]
    ds.ContinuityOfContent = "SEPARATE"
    tpl = D()
    tpl.MappingResource, tpl.TemplateIdentifier = "DCMR", "2000"
    ds.ContentTemplateSequence = [tpl]
    tree = [
        _item(D, "HAS CONCEPT MOD", "CODE", _LANGUAGE, ConceptCodeSequence=[_code(D, _ENGLISH)]),
        _item(D, "HAS OBS CONTEXT", "CODE", _OBSERVER_TYPE, ConceptCodeSequence=[_code(D, _DEVICE)]),
        _item(D, "HAS OBS CONTEXT", "UIDREF", _DEVICE_UID, UID=engine.device_uid()),
        _item(D, "HAS OBS CONTEXT", "TEXT", _DEVICE_NAME, TextValue="ECHO"),
        _item(D, "HAS OBS CONTEXT", "TEXT", _DEVICE_MAKER, TextValue=SOFTWARE),
        _item(D, "HAS OBS CONTEXT", "TEXT", _DEVICE_MODEL, TextValue=engine.name),
    ]
    findings, impression = sections(report.text)
    for section, entry, text in ((_FINDINGS_SECTION, _FINDING, findings),
                                 (_IMPRESSION_SECTION, _IMPRESSION, impression)):
        container = _item(D, "CONTAINS", "CONTAINER", section, ContinuityOfContent="SEPARATE")
        if text:
            t = _item(D, "CONTAINS", "TEXT", entry, TextValue=text)
            if src and src.sop_uid and entry is _FINDING:  # the finding was read from this image
                ref = D()
                ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = src.sop_class_uid, src.sop_uid
                t.ContentSequence = [_item(D, "INFERRED FROM", "IMAGE", None, ReferencedSOPSequence=[ref])]
            container.ContentSequence = [t]
        tree.append(container)
    ds.ContentSequence = tree


# ----------------------------------------------------------------------------- FHIR R4
def _fhir_instant(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _fhir_date_time(date: str, time_: str) -> Optional[str]:
    """A DICOM DA (+TM) as a FHIR dateTime: a date alone, or date and time with a zone (UTC
    assumed: DICOM times carry none unless Timezone Offset From UTC is set)."""
    if not re.fullmatch(r"\d{8}", date or ""):
        return None
    d = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?", time_ or "")
    if not m:
        return d
    return f"{d}T{m.group(1)}:{m.group(2) or '00'}:{m.group(3) or '00'}Z"


def fhir_diagnostic_report(report, source: Optional[SourceStudy] = None, engine: Optional[EngineInfo] = None,
                           now: Optional[_dt.datetime] = None) -> dict[str, Any]:
    """The report as a FHIR R4 DiagnosticReport resource (a JSON-ready dict)."""
    engine = engine or EngineInfo()
    now = now or _dt.datetime.now(_dt.timezone.utc)
    findings, impression = sections(report.text)
    rid = str(uuid.uuid4())
    res: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "meta": {"security": [dict(_FHIR_AI)],
                 "tag": [{"system": "urn:echo-cxr", "code": "machine-generated",
                          "display": f"written by the ECHO engine {engine.name} ({engine.precision})"}]},
        "text": {"status": "generated", "div": _fhir_narrative(findings, impression)},
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{rid}"}],
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "Chest X-ray report"},
        "issued": _fhir_instant(now),
        "presentedForm": [{"contentType": "text/plain; charset=utf-8", "language": "en",
                           "data": base64.b64encode(report.text.encode("utf-8")).decode("ascii"),
                           "title": f"Chest X-ray report. {MACHINE_GENERATED}", "creation": _fhir_instant(now)}],
    }
    if source is not None:
        res.update(_fhir_study_fields(source))
    if impression:
        res["conclusion"] = impression
    return res


def _fhir_narrative(findings: str, impression: str) -> str:
    """The resource's XHTML narrative: the machine-generated notice, then the sections there are."""
    paras = [f"<p><b>{html.escape(MACHINE_GENERATED)}</b></p>"]
    if findings:
        paras.append(f"<p>FINDINGS: {html.escape(findings)}</p>")
    if impression:
        paras.append(f"<p>IMPRESSION: {html.escape(impression)}</p>")
    return f'<div xmlns="{_XHTML}">' + "".join(paras) + "</div>"


def _fhir_study_fields(source: SourceStudy) -> dict[str, Any]:
    """subject, effectiveDateTime and imagingStudy of a report read from a DICOM study."""
    out: dict[str, Any] = {}
    if source.patient_id:
        subj: dict[str, Any] = {"identifier": {"value": source.patient_id}}
        if source.patient_name:
            subj["display"] = source.patient_name.replace("^", " ").strip()
        out["subject"] = subj
    eff = _fhir_date_time(source.study_date, source.study_time)
    if eff:
        out["effectiveDateTime"] = eff
    out["imagingStudy"] = [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{source.study_uid}"},
                            "display": f"DICOM study {source.study_uid}"}]
    return out


# ----------------------------------------------------------------------------- one entry point
def render(fmt: str, report, source: Optional[SourceStudy] = None, engine: Optional[EngineInfo] = None,
           timings: bool = False, now: Optional[_dt.datetime] = None) -> bytes:
    """The report in `fmt` (one of FORMATS) as bytes: UTF-8 text/JSON, or a DICOM file."""
    if fmt == "text":
        return report.text.encode("utf-8")
    if fmt == "json":
        return json.dumps(report_dict(report, timings)).encode("utf-8")
    if fmt == "dicom-sr":
        return dicom_sr(report, source, engine, now)
    if fmt == "fhir":
        return json.dumps(fhir_diagnostic_report(report, source, engine, now)).encode("utf-8")
    raise ReportFormatError(f"unknown report format {fmt!r}; choose from {FORMATS}")


__all__ = ["FORMATS", "SourceStudy", "EngineInfo", "SROptions", "ReportFormatError", "sections", "report_dict",
           "dicom_sr", "fhir_diagnostic_report", "render", "MACHINE_GENERATED"]

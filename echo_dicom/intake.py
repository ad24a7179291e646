"""Which instances the node takes, and the DICOM status of each refusal (PS3.4 B.2.3, PS3.7 C).

    check_instance(ds)            -> (study, series, sop) UIDs, or raises Refused(status, reason)
    save_instance(store, ds, ...) -> the Instance recorded (file written, pixels readable)

Statuses the C-STORE SCP answers:
  0x0000  Success: stored; the study will be reported (an ECHO SR coming back with its study: Success,
          not stored)
  0x0122  Refused: SOP Class Not Supported (not a CR or DX image: CT, MR, SR, secondary capture...)
  0xA900  Error: Data Set Does Not Match SOP Class (a CR/DX SOP class whose Modality is not CR/DX,
          or whose Body Part Examined says it is not a chest)
  0xC100  Cannot Understand: a Study, Series or SOP Instance UID is missing
  0xC200  Cannot Understand: pixel data the runtime cannot read (corrupt, empty, truncated)
  0xC210  Cannot Understand: the data set itself could not be decoded
  0xA700  Refused: Out of Resources (the node could not write the file or its state)
A transfer syntax the node cannot decode is refused earlier, at association: its presentation
context is rejected (transfer syntaxes not supported), which is how DICOM says it and lets a
PACS such as Orthanc transcode and try again; no data set, hence no study UID, is sent then.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .store import Instance, Store

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CXR_SOP_CLASSES = {CR_IMAGE: "CR", DX_FOR_PRESENTATION: "DX", DX_FOR_PROCESSING: "DX"}
CXR_MODALITIES = ("CR", "DX")
# Body Part Examined (0018,0015) values that are a chest; absent or empty is taken as a chest too,
# since many CR/DX devices leave it out
CHEST_BODY_PARTS = ("", "CHEST", "THORAX", "LUNG")

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
DOES_NOT_MATCH = 0xA900
MISSING_UID = 0xC100
BAD_PIXELS = 0xC200
UNDECODABLE = 0xC210
OUT_OF_RESOURCES = 0xA700

# transfer syntaxes the node proposes to accept; those whose pixel decoder is missing in this
# install (pydicom plugins) are dropped at start-up (decodable_transfer_syntaxes)
CANDIDATE_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old devices)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)


BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
NODE_MANUFACTURER = "echo-cxr"  # runtime.report_formats.SOFTWARE: what the node's SRs say they were made by


def is_own_report(ds) -> bool:
    """An SR this project wrote: a PACS that resends a whole study sends it back with the images.
    It is answered Success and not stored (refusing it would fail the PACS's whole send)."""
    return _s(ds, "SOPClassUID") == BASIC_TEXT_SR and _s(ds, "Manufacturer") == NODE_MANUFACTURER


class Refused(Exception):
    """An instance the node will not take: the DICOM status to answer and why."""

    def __init__(self, status: int, reason: str, study_uid: str = "", sop_uid: str = "") -> None:
        super().__init__(reason)
        self.status, self.reason, self.study_uid, self.sop_uid = status, reason, study_uid, sop_uid


def decodable_transfer_syntaxes() -> list[str]:
    """CANDIDATE_SYNTAXES whose pixel data pydicom can decode here (uncompressed ones always)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    out = []
    for ts in CANDIDATE_SYNTAXES:
        try:
            if not UID(ts).is_compressed or get_decoder(UID(ts)).is_available:
                out.append(ts)
        except (NotImplementedError, ValueError):  # no decoder of that syntax at all in this pydicom
            continue
    return out


def _s(ds, key: str) -> str:
    v = ds.get(key, "")
    return "" if v is None else str(v).strip()


def check_instance(ds) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of a chest X-ray instance, or Refused with its status."""
    study, series, sop = _s(ds, "StudyInstanceUID"), _s(ds, "SeriesInstanceUID"), _s(ds, "SOPInstanceUID")
    missing = [k for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                              ("SOPInstanceUID", sop)) if not v]
    if missing:
        raise Refused(MISSING_UID, f"missing {', '.join(missing)}", study, sop)
    sop_class = _s(ds, "SOPClassUID")
    if sop_class not in CXR_SOP_CLASSES:
        raise Refused(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class or '(none)'} is not a CR or DX image", study, sop)
    modality, body = _s(ds, "Modality").upper(), _s(ds, "BodyPartExamined").upper()
    if modality not in CXR_MODALITIES:
        raise Refused(DOES_NOT_MATCH, f"modality {modality or '(none)'} is not CR or DX", study, sop)
    if body not in CHEST_BODY_PARTS:
        raise Refused(DOES_NOT_MATCH, f"body part {body} is not a chest", study, sop)
    return study, series, sop


def _int(ds, key: str) -> int:
    try:
        return int(ds.get(key, 0) or 0)
    except (TypeError, ValueError):
        return 0


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file, fsync, rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_instance(store: Store, ds, check_pixels: Callable[[str], None], now: Optional[float] = None) -> Instance:
    """Check, write and record one instance (ds with file_meta). Refused for anything not taken;
    check_pixels(path) raises (any EchoRuntimeError) when the runtime cannot read the image."""
    study, series, sop = check_instance(ds)
    path = store.instances_dir / safe_name(study) / f"{safe_name(sop)}.dcm"
    try:
        write_atomically(path, lambda p: ds.save_as(p, enforce_file_format=True))
    except OSError as e:
        raise Refused(OUT_OF_RESOURCES, f"cannot write {path}: {e.strerror or e}", study, sop) from None
    except Exception as e:  # pydicom could not encode what it decoded: a damaged element
        raise Refused(UNDECODABLE, f"cannot re-encode the data set: {type(e).__name__}: {e}", study, sop) from None
    try:
        check_pixels(str(path))
    except Exception as e:  # the runtime's ImageReadError says which element and why
        path.unlink(missing_ok=True)
        raise Refused(BAD_PIXELS, f"pixel data unusable: {e}", study, sop) from None
    inst = Instance(sop, study, series, str(path), _s(ds, "ViewPosition").upper(), _int(ds, "SeriesNumber"),
                    _int(ds, "InstanceNumber"))
    try:
        store.add_instance(inst, now)
    except Exception as e:  # sqlite: disk full, locked past its timeout
        raise Refused(OUT_OF_RESOURCES, f"cannot record the instance: {e}", study, sop) from None
    return inst


def safe_name(uid: str) -> str:
    """A UID as a file name: itself when it is digits and dots, else its hash (a malformed UID can
    neither climb out of the folder nor collide with another one)."""
    if uid and len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid) and uid.strip(".") == uid:
        return uid
    return "h" + hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:40]

"""A real Orthanc for the DICOM node's tests and load run (Debian's `orthanc`, its DICOMweb plugin).

    o = Orthanc(tmp_dir, node=("ECHO", node_port)); o.start()
    o.upload(dicom_bytes); o.send_to_node([orthanc_id]); o.srs(study_uid) -> [SR bytes]
    o.restart(); o.stop()

A temporary configuration and storage folder; DICOM and HTTP ports picked free on 127.0.0.1.
Orthanc 1.10 has no bind-address option, so it is kept to loopback by its own rules instead:
RemoteAccessAllowed false (HTTP from 127.0.0.1 only), and C-STORE / C-ECHO only from the one
declared modality (the node: its AE title at 127.0.0.1, DicomCheckModalityHost). Every wait is
bounded. Standard library only (http.client): the tests and the benchmark import it.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

ORTHANC_AET = "ORTHANC"
DICOMWEB_PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                         "/usr/lib/orthanc/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> Optional[str]:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.path.exists(p)), None)


def dicomweb_plugin() -> Optional[str]:
    return next((p for p in DICOMWEB_PLUGIN_PATHS if os.path.exists(p)), None)


def why_no_orthanc() -> Optional[str]:
    """None when Orthanc can run here, else the reason (for pytest.skip)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; `make venv` tries)"
    return None


class Orthanc:
    """One Orthanc process on free loopback ports, its storage under root (kept across restarts)."""

    def __init__(self, root: str | Path, node: Optional[tuple[str, int]] = None, dicomweb: bool = True) -> None:
        self.root = Path(root)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.node, self.proc = node, None
        self.plugin = dicomweb_plugin() if dicomweb else None
        self.log_path = self.root / "orthanc.log"

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "echo-test", "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db"),
            "DicomAet": ORTHANC_AET, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpsVerifyPeers": False,
            "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
            "SaveJobs": False, "StableAge": 3600, "DicomScuTimeout": 30, "DicomAssociationCloseDelay": 0,
            "ConcurrentJobs": 2, "HttpThreadsCount": 8, "DicomThreadsCount": 4, "Plugins": [],
            "DicomModalities": {},
        }
        if self.node:
            aet, port = self.node
            cfg["DicomModalities"] = {"echo": {"AET": aet, "Host": "127.0.0.1", "Port": port}}
        if self.plugin:
            cfg["Plugins"] = [self.plugin]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1",
                               "Ssl": False}
        return cfg

    def start(self, timeout_s: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([orthanc_binary(), str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.log_path}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; see {self.log_path}")

    def stop(self, kill: bool = False, timeout_s: float = 30.0) -> None:
        """SIGTERM (or SIGKILL), then wait; the storage stays for the next start."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_s: float = 0.0, kill: bool = False) -> None:
        self.stop(kill=kill)
        time.sleep(down_s)
        self.start()

    # -- REST ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Optional[bytes] = None, timeout_s: float = 60.0,
                content_type: str = "application/json") -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": content_type} if body else {})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status >= 400:
                raise RuntimeError(f"Orthanc {method} {path}: HTTP {resp.status}: {data[:300]!r}")
            return data
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path, timeout_s=10.0))

    def upload(self, dicom: bytes) -> dict[str, Any]:
        """POST /instances: {"ID", "ParentStudy", "Status", ...}."""
        return json.loads(self.request("POST", "/instances", dicom, content_type="application/dicom"))

    def send_to_node(self, resources: list[str], timeout_s: float = 120.0) -> dict[str, Any]:
        """C-STORE the given Orthanc resources (instances, series or studies) to the node, synchronously."""
        body = json.dumps({"Resources": resources, "Synchronous": True}).encode()
        return json.loads(self.request("POST", "/modalities/echo/store", body, timeout_s=timeout_s))

    def study_id(self, study_uid: str) -> Optional[str]:
        body = json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode()
        found = json.loads(self.request("POST", "/tools/find", body))
        return found[0] if found else None

    def sr_instances(self, study_uid: Optional[str] = None) -> list[str]:
        """Orthanc ids of the SR instances, of one study or of all."""
        query: dict[str, str] = {"Modality": "SR"}
        if study_uid:
            query["StudyInstanceUID"] = study_uid
        body = json.dumps({"Level": "Instance", "Query": query}).encode()
        return json.loads(self.request("POST", "/tools/find", body))

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_id}/file", timeout_s=30.0)

    def srs(self, study_uid: str) -> list[bytes]:
        return [self.instance_file(i) for i in self.sr_instances(study_uid)]


class NodeProcess:
    """`python -m echo_dicom listen|poll ...` in its own session, its log collected, ready when it says so."""

    def __init__(self, args: list[str], log_path: str | Path, python: Optional[str] = None,
                 root: Optional[Path] = None, block_torch: bool = False) -> None:
        import sys

        root = root or Path(__file__).resolve().parents[1]
        self.log_path = Path(log_path)
        self._start = self.log_path.stat().st_size if self.log_path.exists() else 0  # this run's lines begin here
        path = [str(root)]
        if block_torch:  # a torch that cannot be imported, first on the path: the node must run as on an edge box
            blocker = self.log_path.parent / "torch_blocker"
            (blocker / "torch").mkdir(parents=True, exist_ok=True)
            (blocker / "torch" / "__init__.py").write_text(
                "raise ImportError('torch is blocked here: echo-dicom must run without PyTorch')\n")
            path.insert(0, str(blocker))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([python or sys.executable, "-m", "echo_dicom", *args], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
        log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def own_log(self) -> str:
        """This process's lines only (the file may hold an earlier run's)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._start)
            return f.read().decode("utf-8", "replace")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if " listening as " in self.own_log or " polling " in self.own_log:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"echo-dicom exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"echo-dicom not ready within {timeout_s} s:\n{self.log[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a power cut or the OOM killer would."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


# ----------------------------------------------------------------------------- test studies
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def cxr_instance(pixels, study_uid: str, series_uid: str, sop_uid: str, view: str = "PA", modality: str = "DX",
                 instance_no: int = 1, patient_id: str = "P-0001", **fields) -> bytes:
    """A chest X-ray DICOM instance (Part 10, explicit VR LE, 12 bits in 16): pixels in [-1, 1]
    (2-D array), the SOP class of `modality` (CR or DX; any other modality keeps DX's class, for
    refusal tests), View Position `view`. `fields` set or override any other element by keyword."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE if modality == "CR" else DX_PRESENTATION_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = patient_id, "Test^Patient", "20261207", "080000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC-" + patient_id[-4:], "1", ""
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", view
    ds.SeriesNumber, ds.InstanceNumber = 1, instance_no
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    arr = np.asarray(pixels, dtype=np.float64)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip((arr + 1) * 2047.5, 0, 4095).astype(np.uint16).tobytes()
    for k, v in fields.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def structured_image(i: int, size: int = 64):
    """Structured test pixels in [-1, 1] (the runtime tests' images(): noise all looks alike to a
    random vision tower), varied by i."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.sin(xx * (1 + 2 * (i % 7) + 0.37 * (i // 7))) * np.cos(yy * (3 - 0.5 * (i % 5))) * (1 - 0.3 * (i % 6))
    return np.clip(img, -1, 1)

"""Where reports go: C-STORE to a PACS (pynetdicom) or STOW-RS to a DICOMweb server.

Both take a batch of SR files and say, per file, None (the PACS took it: DICOM Success or a
Warning status; STOW: in ReferencedSOPSequence) or why not. A batch is one association (C-STORE)
or one request per file (STOW), so 200 reports do not open 200 associations.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

log = logging.getLogger("echo_dicom")

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


@dataclass
class PacsAddress:
    """AET@HOST:PORT of the PACS the node C-STOREs its reports to."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "PacsAddress":
        try:
            aet, hostport = text.split("@", 1)
            host, port = hostport.rsplit(":", 1)
            addr = cls(aet.strip(), host.strip(), int(port))
        except ValueError:
            raise ValueError(f"PACS address {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242") from None
        if not addr.ae_title or len(addr.ae_title) > 16 or not addr.host or not 0 < addr.port < 65536:
            raise ValueError(f"PACS address {text!r}: AE title of 1-16 characters, a host and a port 1-65535")
        return addr

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class CStoreSender:
    """SRs to a PACS as the node's own AE title, a batch split over `associations` parallel
    associations: a C-STORE waits on the PACS's answer (most of it TCP delayed-ACK against Orthanc on
    loopback: docs/pacs.md), so parallel associations are what raises throughput."""

    def __init__(self, pacs: PacsAddress, ae_title: str, timeout_s: float = 10.0, associations: int = 1) -> None:
        self.pacs, self.ae_title, self.timeout_s = pacs, ae_title, timeout_s
        self.associations = max(1, associations)

    def send(self, paths: Sequence[str]) -> list[Optional[str]]:
        """Per path, None (stored) or why not; the order of `paths` kept."""
        k = min(self.associations, len(paths))
        if k <= 1:
            return self._send_one_association(paths)
        from concurrent.futures import ThreadPoolExecutor

        shares = [list(range(i, len(paths), k)) for i in range(k)]
        with ThreadPoolExecutor(k, thread_name_prefix="echo-dicom-cstore") as pool:
            answers = list(pool.map(lambda idx: self._send_one_association([paths[i] for i in idx]), shares))
        out: list[Optional[str]] = [None] * len(paths)
        for idx, ans in zip(shares, answers):
            for i, a in zip(idx, ans):
                out[i] = a
        return out

    def _send_one_association(self, paths: Sequence[str]) -> list[Optional[str]]:
        from pydicom import dcmread
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(BASIC_TEXT_SR, [EXPLICIT_LE, IMPLICIT_LE])
        # each wait is bounded: a PACS that accepts the connection and then hangs cannot stall the node.
        # pynetdicom also waits out dimse_timeout when the PACS dies mid-C-STORE (it logs "Connection
        # closed" but does not wake the waiting send), so this is how long a crash of the PACS stalls
        # one batch; a late answer is harmless, the SR is resent with the same UIDs
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = min(self.timeout_s, 10.0)
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
            return [f"association with {self.pacs} failed ({why})"] * len(paths)
        out: list[Optional[str]] = []
        try:
            for p in paths:
                out.append(self._store_one(assoc, dcmread(p)))
                if not assoc.is_established:  # the PACS went away mid-batch: the rest wait for the retry
                    out += [f"association with {self.pacs} lost"] * (len(paths) - len(out))
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return out

    def _store_one(self, assoc, ds) -> Optional[str]:
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError as e:  # pynetdicom: the association ended between two sends
            return f"association with {self.pacs} lost ({e})"
        if "Status" not in status:  # pynetdicom: an empty Dataset when the exchange itself failed
            return f"no C-STORE response from {self.pacs}"
        code = int(status.Status)
        # Success, or a Warning (0xB000 coercion, 0xB006, 0xB007): the PACS keeps the instance
        return None if code == 0 or 0xB000 <= code <= 0xBFFF else f"{self.pacs} answered status 0x{code:04X}"


class StowSender:
    """SRs to a DICOMweb server with STOW-RS (one request per SR; dicomweb-client)."""

    def __init__(self, client) -> None:
        self.client = client

    def send(self, paths: Sequence[str]) -> list[Optional[str]]:
        from pydicom import dcmread

        out: list[Optional[str]] = []
        for p in paths:
            ds = dcmread(p)
            try:
                resp = self.client.store_instances(datasets=[ds], study_instance_uid=ds.StudyInstanceUID)
            except Exception as e:  # requests' ConnectionError, HTTPError and friends: retried later
                out.append(f"STOW-RS failed: {type(e).__name__}: {e}")
                continue
            out.append(_stow_outcome(resp, ds.SOPInstanceUID))
        return out


def _stow_outcome(resp, sop_uid: str) -> Optional[str]:
    """None when the STOW-RS response lists the instance as stored, else the failure reason."""
    for item in getattr(resp, "FailedSOPSequence", None) or []:
        if item.get("ReferencedSOPInstanceUID") == sop_uid:
            return f"STOW-RS refused the SR (failure reason {item.get('FailureReason', '?')})"
    refs = [it.get("ReferencedSOPInstanceUID") for it in getattr(resp, "ReferencedSOPSequence", None) or []]
    return None if sop_uid in refs else "STOW-RS response does not list the SR as stored"

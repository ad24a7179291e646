"""DICOMweb intake: find new CR/DX studies with QIDO-RS, fetch their images with WADO-RS.

Each poll asks QIDO-RS for studies whose ModalitiesInStudy has CR, then DX (paged, at most
max_pages pages each: a poll is bounded), skips those this engine has reported, lists each other
study's instances (QIDO-RS, with Modality and SOP Class) and retrieves only the CR/DX images not
yet in the store (WADO-RS). They go through the same checks and store as C-STORE intake
(echo_dicom.intake); a refusal is logged and recorded with its study UID (over HTTP there is no
DICOM status to answer). The quiet-time rule then applies as for C-STORE: a study is reported once
no new image of it has been seen for quiet_s.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from .intake import CXR_MODALITIES, CXR_SOP_CLASSES, Refused, save_instance
from .store import Store

log = logging.getLogger("echo_dicom")

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS, MODALITY = "0020000D", "0020000E", "00080018", "00080016", "00080060"


def make_client(url: str, timeout_s: float = 20.0):
    """A dicomweb-client without its own retry loop: the node's outbox and next poll retry instead."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"), timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _value(obj: dict, tag: str) -> str:
    vals = (obj.get(tag) or {}).get("Value") or [""]
    return str(vals[0])


class WebSource:
    """Polls a DICOMweb server for new chest X-ray studies and puts their images in the store."""

    def __init__(self, client, store: Store, check_pixels: Callable[[str], None], engine_version: str,
                 page: int = 100, max_pages: int = 20) -> None:
        self.client, self.store, self.check_pixels = client, store, check_pixels
        self.engine_version, self.page, self.max_pages = engine_version, page, max_pages

    def studies(self) -> Iterator[str]:
        """Study UIDs with a CR or DX series, each once per poll."""
        seen: set[str] = set()
        for modality in CXR_MODALITIES:
            for n in range(self.max_pages):
                found = self.client.search_for_studies(search_filters={"ModalitiesInStudy": modality},
                                                       limit=self.page, offset=n * self.page)
                for st in found:
                    uid = _value(st, STUDY_UID)
                    if uid and uid not in seen:
                        seen.add(uid)
                        yield uid
                if len(found) < self.page:
                    break

    def poll(self) -> int:
        """One pass over the server; how many new images were stored."""
        new = 0
        for study in self.studies():
            if self.store.reported(study, self.engine_version):
                continue
            new += self._fetch_study(study)
        return new

    def _fetch_study(self, study: str) -> int:
        instances = self.client.search_for_instances(study_instance_uid=study,
                                                     fields=[SOP_CLASS, MODALITY, SERIES_UID])
        new = 0
        for it in instances:
            sop, series = _value(it, SOP_UID), _value(it, SERIES_UID)
            if _value(it, MODALITY) not in CXR_MODALITIES or _value(it, SOP_CLASS) not in CXR_SOP_CLASSES:
                continue  # the study's other objects (our own SR among them) are not ours to read
            if not sop or self.store.has_instance(sop):
                continue
            ds = self.client.retrieve_instance(study, series, sop)
            if self._take(ds, study, sop):
                new += 1
        return new

    def _take(self, ds, study: str, sop: str) -> bool:
        try:
            save_instance(self.store, ds, self.check_pixels)
            return True
        except Refused as r:
            log.warning("refused instance %s of study %s from DICOMweb: %s (would be status 0x%04X)",
                        sop, study, r.reason, r.status)
            self.store.refuse(study, sop, "DICOMweb", r.status, r.reason)
            return False


def describe_error(e: Exception) -> str:
    """One line for a failed poll (the server down, a bad answer): the next poll tries again."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

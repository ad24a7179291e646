"""The C-STORE SCP: the node's DICOM listener (pynetdicom).

Associations from calling AE titles outside the allow-list are rejected (A-ASSOCIATE-RJ, "calling
AE title not recognised"). CR and DX storage is accepted in every transfer syntax this install can
decode; every other storage SOP class is accepted too, uncompressed, only so that a study that mixes
it in gets a per-instance 0x0122 (logged with its study UID) instead of a failed association.
C-ECHO (verification) answers Success, so a PACS can test the node.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from .intake import CXR_SOP_CLASSES, UNDECODABLE, Refused, decodable_transfer_syntaxes, is_own_report, save_instance
from .store import Store

log = logging.getLogger("echo_dicom")

VERIFICATION = "1.2.840.10008.1.1"
UNCOMPRESSED = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]


def make_ae(ae_title: str, allowed_aets: Sequence[str]):
    """The node's AE, its accepted contexts and allow-list (empty allow-list: any calling AE)."""
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=ae_title)
    syntaxes = decodable_transfer_syntaxes()
    for sop in CXR_SOP_CLASSES:
        ae.add_supported_context(sop, syntaxes)
    for ctx in StoragePresentationContexts:
        if ctx.abstract_syntax not in CXR_SOP_CLASSES:
            ae.add_supported_context(ctx.abstract_syntax, UNCOMPRESSED)
    ae.add_supported_context(VERIFICATION)
    if allowed_aets:
        ae.require_calling_aet = list(allowed_aets)
    ae.maximum_associations = 16  # bounded: a flood of senders waits instead of exhausting threads
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
    return ae


class StoreHandler:
    """EVT_C_STORE: check, write and record each instance; the status is the answer."""

    def __init__(self, store: Store, check_pixels: Callable[[str], None], engine_version: str) -> None:
        self.store, self.check_pixels, self.engine_version = store, check_pixels, engine_version

    def __call__(self, event) -> int:
        calling = _calling_aet(event)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as e:  # pydicom could not decode what arrived
            return self._refused(Refused(UNDECODABLE, f"data set not decodable: {type(e).__name__}: {e}"), calling)
        if is_own_report(ds):
            log.info("study %s: ECHO SR %s sent back with its study; taken, not stored", ds.get("StudyInstanceUID", "?"),
                     ds.get("SOPInstanceUID", "?"))
            return 0x0000
        try:
            inst = save_instance(self.store, ds, self.check_pixels)
        except Refused as r:
            return self._refused(r, calling)
        if self.store.reported(inst.study_uid, self.engine_version):
            log.info("study %s: instance %s stored; the study is already reported by %s, not again",
                     inst.study_uid, inst.sop_uid, self.engine_version)
        return 0x0000

    def _refused(self, r: Refused, calling: str) -> int:
        log.warning("refused instance %s of study %s from %s: %s (status 0x%04X)", r.sop_uid or "?",
                    r.study_uid or "?", calling, r.reason, r.status)
        try:
            self.store.refuse(r.study_uid, r.sop_uid, calling, r.status, r.reason)
        except Exception as e:  # the log line above is the record when the state file cannot take it
            log.error("could not record the refusal: %s", e)
        return r.status


def _calling_aet(event) -> str:
    aet = event.assoc.requestor.ae_title
    return aet.decode("ascii", "replace").strip() if isinstance(aet, bytes) else str(aet).strip()


def on_rejected(event) -> None:
    """Log who was turned away at association (allow-list) and from where."""
    req = event.assoc.requestor
    log.warning("association from %s (%s:%s) rejected: calling AE title not in the allow-list",
                _calling_aet(event), req.address, req.port)


def on_accepted(event) -> None:
    """Log presentation contexts refused at negotiation: usually a transfer syntax this node cannot decode."""
    for ctx in event.assoc.rejected_contexts:
        log.warning("from %s: presentation context %s refused (result %s; offered syntaxes %s)",
                    _calling_aet(event), ctx.abstract_syntax, ctx.result,
                    ", ".join(str(t) for t in ctx.transfer_syntax))


def start_scp(ae, host: str, port: int, handler: StoreHandler):
    """Listen in pynetdicom's own threads; returns the server (shutdown() stops it)."""
    from pynetdicom import evt

    handlers = [(evt.EVT_C_STORE, handler), (evt.EVT_REJECTED, on_rejected), (evt.EVT_ACCEPTED, on_accepted)]
    return ae.start_server((host, port), block=False, evt_handlers=handlers)

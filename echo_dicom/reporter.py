"""From a complete study to an SR in the outbox: pick the image, generate, write the SR.

The model reads one image, so a study gets one report, from its frontal view: View Position PA,
then AP, then any other; ties broken by Series Number, Instance Number, SOP Instance UID, so the
same study always gives the same image (and the same text) whatever order its instances came in.

The SR (runtime.report_formats.dicom_sr) joins the study, names the engine as Contributing
Equipment, says UNVERIFIED, and its series description says machine-generated, not for diagnostic
use. Its Series and SOP Instance UIDs derive from (StudyInstanceUID, engine version): a report
regenerated or re-sent after a crash is the same DICOM instance, which a PACS stores once.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from runtime.report_formats import EngineInfo, SourceStudy, SROptions, dicom_sr

from .intake import safe_name, write_atomically
from .store import Instance, Store

log = logging.getLogger("echo_dicom")

SERIES_DESCRIPTION = "machine-generated, not for diagnostic use"
FRONTAL_VIEWS = ("PA", "AP")


def pick_image(instances: Sequence[Instance]) -> Instance:
    """The study's image to report: the frontal view, then the lowest series/instance numbers."""
    if not instances:
        raise ValueError("a study without instances has nothing to report")

    def rank(i: Instance) -> tuple:
        view = FRONTAL_VIEWS.index(i.view) if i.view in FRONTAL_VIEWS else len(FRONTAL_VIEWS)
        return view, i.series_no, i.instance_no, i.sop_uid

    return min(instances, key=rank)


def sr_uids(study_uid: str, engine_version: str) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of the study's SR from this engine: fixed by the pair."""
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["echo-dicom SR series", study_uid, engine_version])
    sop = generate_uid(entropy_srcs=["echo-dicom SR instance", study_uid, engine_version])
    return series, sop


class Reporter:
    """Turns the store's complete studies into SR files in the outbox, a batch at a time."""

    def __init__(self, runtime, engine: EngineInfo, store: Store, quiet_s: Optional[float],
                 batch: int = 8, max_new_tokens: Optional[int] = None) -> None:
        self.rt, self.engine, self.store = runtime, engine, store
        self.version = engine.version()
        self.quiet_s, self.batch, self.max_new_tokens = quiet_s, batch, max_new_tokens

    def report_ready(self) -> int:
        """Report up to `batch` complete studies in one generate call; how many were put in the outbox."""
        studies = self.store.ready_studies(self.version, self.quiet_s, self.batch)
        chosen: list[tuple[str, Instance]] = []
        for uid in studies:
            insts = self.store.study_instances(uid)
            if insts:
                chosen.append((uid, pick_image(insts)))
        if not chosen:
            return 0
        reports = self.rt.generate([inst.path for _, inst in chosen], max_new_tokens=self.max_new_tokens)
        done = 0
        for (uid, inst), rep in zip(chosen, reports):
            if rep.error is not None:  # intake read the pixels, so only a file changed on disk since
                log.error("study %s: no report, image %s unusable: %s", uid, inst.sop_uid, rep.error)
                self.store.put_error(uid, self.version, rep.error)
                continue
            self._outbox(uid, inst, rep)
            done += 1
        return done

    def _outbox(self, study_uid: str, inst: Instance, rep) -> None:
        series_uid, sop_uid = sr_uids(study_uid, self.version)
        opts = SROptions(series_description=SERIES_DESCRIPTION, sop_uid=sop_uid, series_uid=series_uid,
                         contributing_equipment=True, software_version=self.version)
        sr = dicom_sr(rep, SourceStudy.from_path(inst.path), self.engine, options=opts)
        path = self.store.outbox_dir / f"{safe_name(study_uid)}.sr.dcm"
        write_atomically(path, lambda p: p.write_bytes(sr))  # the file first: the row points at it
        self.store.put_report(study_uid, self.version, str(path), sop_uid, inst.sop_uid, rep.text)
        log.info("study %s: report from image %s (%s) in the outbox as SR %s", study_uid, inst.sop_uid,
                 inst.view or "view unknown", sop_uid)

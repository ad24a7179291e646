"""The node: intake (C-STORE SCP or DICOMweb polling), the reporter and the outbox, as threads.

    reporter thread   every tick: complete studies -> EchoRuntime.generate -> SR files in the outbox
    outbox thread     every tick: due SRs -> the PACS; failures wait min(base * 2**attempts, cap) s
    intake            pynetdicom's server threads (listen), or a poll thread (DICOMweb)

Every loop sleeps on one stop event, so SIGTERM/SIGINT stops the node within a tick; what was not
done is in the store and is done by the next start.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from runtime.report_formats import EngineInfo

from .reporter import Reporter
from .store import Store

log = logging.getLogger("echo_dicom")


@dataclass
class NodeOptions:
    engine_dir: str
    state_dir: str
    precision: str = "fp32"
    quiet_s: Optional[float] = 10.0  # None: only an explicit trigger completes a study
    tick_s: float = 0.5
    batch: int = 8  # studies per generate call and SRs per association
    retry_base_s: float = 2.0
    retry_cap_s: float = 300.0
    threads: Optional[int] = None


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before retry number attempts+1: doubling from base, at most cap."""
    return min(cap, base * (2 ** min(attempts, 30)))


class Node:
    """Owns the store, the runtime and the worker threads; intake is attached by the caller."""

    def __init__(self, opts: NodeOptions, sender) -> None:
        from runtime.engine import EchoRuntime

        self.opts, self.sender = opts, sender
        self.store = Store(opts.state_dir)
        self.rt = EchoRuntime(opts.engine_dir, precision=opts.precision, threads=opts.threads, batch_size=None)
        self.engine = EngineInfo.of_engine_dir(opts.engine_dir, opts.precision)
        self.version = self.engine.version()
        self.reporter = Reporter(self.rt, self.engine, self.store, opts.quiet_s, batch=opts.batch)
        waiting = self.store.restart_quiet_time(self.version)
        if waiting:
            log.info("%d unreported studies from before this start wait their quiet time again", waiting)
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def check_pixels(self, path: str) -> None:
        """Intake's corrupt-image check: the runtime's own reader and preprocessing."""
        self.rt.preprocess(Path(path))

    def flush_outbox(self) -> int:
        """Send the due SRs in one batch; how many the PACS took."""
        due = self.store.due(self.opts.batch * getattr(self.sender, "associations", 1))
        if not due:
            return 0
        results = self.sender.send([p.sr_path for p in due])
        sent = 0
        for p, err in zip(due, results):
            if err is None:
                self.store.mark_sent(p)
                sent += 1
                log.info("study %s: SR %s stored in the PACS", p.study_uid, p.sr_uid)
            else:
                wait = backoff(p.attempts, self.opts.retry_base_s, self.opts.retry_cap_s)
                self.store.mark_failed(p, err, wait)
                log.warning("study %s: SR not stored (%s); attempt %d, next in %.1f s", p.study_uid, err,
                            p.attempts + 1, wait)
        return sent

    def _loop(self, name: str, step: Callable[[], int]) -> None:
        """Run step until stop; straight again while it has work, else wait a tick."""
        while not self.stop.is_set():
            try:
                busy = step() > 0
            except Exception:  # one bad round must not end the node: log it, wait, go on
                log.exception("%s: unexpected error; retrying after a tick", name)
                busy = False
            if not busy:
                self.stop.wait(self.opts.tick_s)

    def start_workers(self, extra: Optional[dict[str, Callable[[], int]]] = None) -> None:
        steps = {"reporter": self.reporter.report_ready, "outbox": self.flush_outbox, **(extra or {})}
        for name, step in steps.items():
            t = threading.Thread(target=self._loop, args=(name, step), name=f"echo-dicom-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout_s)
        self.store.close()

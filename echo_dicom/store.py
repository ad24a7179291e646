"""The node's state on disk: received instances, studies, the report outbox and refusals (sqlite).

Everything the node must not lose lives here, committed before the node answers or moves on:
an instance is in the table (and its file on disk) before its C-STORE gets Success; a report is
in the outbox (its SR file written) before it is sent; it is marked sent only after the PACS said
Success. A restart reads the same file and carries on where the last process stopped.

A report is unique on (StudyInstanceUID, engine version): the primary key of `reports`. The SR's
UIDs derive from that pair (echo_dicom.reporter.sr_uids), so an SR sent again after a crash between
"PACS said Success" and "marked sent" is the same instance to the PACS, which keeps one copy.

One connection shared by the node's threads under a lock (sqlite objects are not thread-safe),
WAL journal so `echo-dicom status` / `trigger` from another process can read and write meanwhile.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT, path TEXT NOT NULL,
  view TEXT, series_no INTEGER, instance_no INTEGER, received REAL NOT NULL);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS studies (
  study_uid TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  triggered INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reports (
  study_uid TEXT NOT NULL, engine TEXT NOT NULL, state TEXT NOT NULL,
  sr_path TEXT, sr_uid TEXT, image_sop_uid TEXT, text TEXT, attempts INTEGER NOT NULL DEFAULT 0,
  next_try REAL NOT NULL DEFAULT 0, last_error TEXT, created REAL NOT NULL, sent REAL,
  PRIMARY KEY (study_uid, engine));
CREATE TABLE IF NOT EXISTS refusals (
  time REAL NOT NULL, study_uid TEXT, sop_uid TEXT, calling_aet TEXT, status INTEGER, reason TEXT);
"""

# report states: outbox (SR written, not yet acknowledged by the PACS), sent, error (no SR possible)
OUTBOX, SENT, ERROR = "outbox", "sent", "error"


@dataclass
class Instance:
    sop_uid: str
    study_uid: str
    series_uid: str
    path: str
    view: str = ""
    series_no: int = 0
    instance_no: int = 0


@dataclass
class Pending:
    """One report waiting in the outbox."""

    study_uid: str
    engine: str
    sr_path: str
    sr_uid: str
    attempts: int


class Store:
    """The sqlite file of one node (state_dir/state.sqlite) and its folders of instances and SRs."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.instances_dir, self.outbox_dir = self.dir / "instances", self.dir / "outbox"
        for d in (self.dir, self.instances_dir, self.outbox_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # timeout: another process (echo-dicom trigger/status) may hold the write lock briefly
        self._db = sqlite3.connect(self.dir / "state.sqlite", timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the node answers
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- intake ------------------------------------------------------------------------
    def add_instance(self, inst: Instance, now: Optional[float] = None) -> None:
        """Record a received instance (its file already on disk) and restart its study's quiet time."""
        now = time.time() if now is None else now
        self._transaction([
            ("INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?)",
             (inst.sop_uid, inst.study_uid, inst.series_uid, inst.path, inst.view, inst.series_no, inst.instance_no,
              now)),
            ("INSERT INTO studies(study_uid, first_seen, last_seen) VALUES (?,?,?) "
             "ON CONFLICT(study_uid) DO UPDATE SET last_seen=excluded.last_seen", (inst.study_uid, now, now)),
        ])

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self._run("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)))

    def refuse(self, study_uid: str, sop_uid: str, calling_aet: str, status: int, reason: str) -> None:
        self._run("INSERT INTO refusals VALUES (?,?,?,?,?,?)",
                  (time.time(), study_uid, sop_uid, calling_aet, status, reason))

    def trigger(self, study_uid: str) -> bool:
        """The explicit study-complete signal; False when the node has no instance of that study."""
        with self._lock:
            cur = self._db.execute("UPDATE studies SET triggered=1 WHERE study_uid=?", (study_uid,))
            return cur.rowcount > 0

    # -- studies ready to report -------------------------------------------------------
    def ready_studies(self, engine: str, quiet_s: Optional[float], limit: int, now: Optional[float] = None) -> list[str]:
        """Studies with no report for `engine` yet that are complete: triggered, or (quiet_s not
        None) quiet for quiet_s seconds since their last instance. Oldest first."""
        now = time.time() if now is None else now
        quiet_cut = now - quiet_s if quiet_s is not None else -1.0
        rows = self._run(
            "SELECT s.study_uid FROM studies s WHERE (s.triggered=1 OR s.last_seen <= ?) AND NOT EXISTS "
            "(SELECT 1 FROM reports r WHERE r.study_uid=s.study_uid AND r.engine=?) ORDER BY s.first_seen LIMIT ?",
            (quiet_cut, engine, limit))
        return [r[0] for r in rows]

    def restart_quiet_time(self, engine: str, now: Optional[float] = None) -> int:
        """At start-up: the unreported studies' quiet time starts again now. While the node was down
        a sender may have been cut off mid-study; without this, a study whose last image came before
        the downtime would be reported at once from the part that had arrived. Returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            cur = self._db.execute(
                "UPDATE studies SET last_seen=? WHERE last_seen < ? AND NOT EXISTS "
                "(SELECT 1 FROM reports r WHERE r.study_uid=studies.study_uid AND r.engine=?)", (now, now, engine))
            return cur.rowcount

    def study_instances(self, study_uid: str) -> list[Instance]:
        rows = self._run("SELECT sop_uid, study_uid, series_uid, path, view, series_no, instance_no FROM instances "
                         "WHERE study_uid=?", (study_uid,))
        return [Instance(*r) for r in rows]

    def reported(self, study_uid: str, engine: str) -> bool:
        return bool(self._run("SELECT 1 FROM reports WHERE study_uid=? AND engine=?", (study_uid, engine)))

    # -- the outbox --------------------------------------------------------------------
    def put_report(self, study_uid: str, engine: str, sr_path: str, sr_uid: str, image_sop_uid: str, text: str) -> None:
        """Into the outbox (the SR file already written). Ignored if this pair is there already."""
        self._run("INSERT OR IGNORE INTO reports(study_uid, engine, state, sr_path, sr_uid, image_sop_uid, text, "
                  "created) VALUES (?,?,?,?,?,?,?,?)",
                  (study_uid, engine, OUTBOX, sr_path, sr_uid, image_sop_uid, text, time.time()))

    def put_error(self, study_uid: str, engine: str, error: str) -> None:
        """A study no report can be written for (every image refused by the engine): not retried."""
        self._run("INSERT OR IGNORE INTO reports(study_uid, engine, state, last_error, created) VALUES (?,?,?,?,?)",
                  (study_uid, engine, ERROR, error, time.time()))

    def due(self, limit: int, now: Optional[float] = None) -> list[Pending]:
        now = time.time() if now is None else now
        rows = self._run("SELECT study_uid, engine, sr_path, sr_uid, attempts FROM reports "
                         "WHERE state=? AND next_try <= ? ORDER BY next_try, created LIMIT ?", (OUTBOX, now, limit))
        return [Pending(*r) for r in rows]

    def mark_sent(self, p: Pending) -> None:
        self._run("UPDATE reports SET state=?, sent=?, attempts=attempts+1, last_error=NULL "
                  "WHERE study_uid=? AND engine=?", (SENT, time.time(), p.study_uid, p.engine))

    def mark_failed(self, p: Pending, error: str, retry_in: float) -> None:
        self._run("UPDATE reports SET attempts=attempts+1, next_try=?, last_error=? WHERE study_uid=? AND engine=?",
                  (time.time() + retry_in, error, p.study_uid, p.engine))

    # -- reading it back ---------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        """What `echo-dicom status` prints: instances, studies, reports by state, refusals."""
        out: dict[str, Any] = {
            "instances": self._run("SELECT COUNT(*) FROM instances")[0][0],
            "studies": self._run("SELECT COUNT(*) FROM studies")[0][0],
            "refusals": self._run("SELECT COUNT(*) FROM refusals")[0][0],
        }
        for state, n in self._run("SELECT state, COUNT(*) FROM reports GROUP BY state"):
            out[f"reports_{state}"] = n
        return out

    def reports(self) -> Iterator[dict[str, Any]]:
        cols = ("study_uid", "engine", "state", "sr_uid", "image_sop_uid", "text", "attempts", "last_error")
        for row in self._run(f"SELECT {', '.join(cols)} FROM reports ORDER BY created"):
            yield dict(zip(cols, row))

    def refusal_rows(self) -> list[dict[str, Any]]:
        cols = ("time", "study_uid", "sop_uid", "calling_aet", "status", "reason")
        return [dict(zip(cols, r)) for r in self._run(f"SELECT {', '.join(cols)} FROM refusals ORDER BY time")]

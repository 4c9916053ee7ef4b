"""What every scored head said about each served request, and the true labels clients send back.

One SQLite file in the service's state directory, shared by every worker (WAL mode: readers never wait for the
writer). ``scores`` has one row per request and scored head: the head's top-1 label and confidence and its role
(``live``: it answered; ``shadow``: scored beside it). ``labels`` has one row per request that got feedback.
Accuracy per head is read over each head's most recent labelled requests. Rows older than ``retention`` seconds
are pruned, so the file stays bounded. Request ids (:func:`request_ids`) are made here for both servers.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .errors import BadRequest, Conflict, NotFound

FEEDBACK_DB = "feedback.sqlite"
LIVE, SHADOW = "live", "shadow"
ScoreRow = tuple[str, str, str, str, float, float]  # request_id, head "name:version", role, top-1 label, score, time


def request_ids(count: int) -> list[str]:
    """One id per image: the time in ms (11 hex digits) and 16 random hex digits, suffixed ``-<i>`` per image when
    a request holds several."""
    base = f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(8)}"
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]


def issued_recently(request_id: str, seconds: float = 5.0) -> bool:
    """Whether an id of :func:`request_ids` was issued in the last ``seconds`` (its record may still be queued)."""
    try:
        issued = int(request_id[:11], 16) / 1000
    except ValueError:
        return False
    return 0 <= time.time() - issued < seconds


class FeedbackStore:
    """The scores and labels of one service (one SQLite file), safe to use from several threads and processes."""

    def __init__(self, path: str | Path, retention: float = 7 * 86400):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention = retention
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript("""
                CREATE TABLE IF NOT EXISTS scores (request_id TEXT NOT NULL, head TEXT NOT NULL, role TEXT NOT NULL,
                    label TEXT NOT NULL, score REAL NOT NULL, time REAL NOT NULL, PRIMARY KEY (request_id, head));
                CREATE INDEX IF NOT EXISTS scores_time ON scores (time);
                CREATE TABLE IF NOT EXISTS labels (request_id TEXT PRIMARY KEY, label TEXT NOT NULL,
                    time REAL NOT NULL);
                CREATE INDEX IF NOT EXISTS labels_time ON labels (time);
            """)
        self._pruned = 0.0

    def record(self, rows: Iterable[ScoreRow]) -> None:
        """Add score rows (one transaction); prunes old rows at most once a minute."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)", rows)
                if now - self._pruned > 60:
                    self._db.execute("DELETE FROM scores WHERE time < ?", (now - self.retention,))
                    self._db.execute("DELETE FROM labels WHERE time < ?", (now - self.retention,))
                    self._pruned = now
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def scores(self, request_id: str) -> list[tuple[str, str, str]]:
        """``(head, role, top-1 label)`` of every head scored on ``request_id`` (empty when unknown)."""
        with self._lock:
            return self._db.execute(
                "SELECT head, role, label FROM scores WHERE request_id = ? ORDER BY head", (request_id,)
            ).fetchall()

    def label(
        self, request_id: str, label: str, known_labels: Iterable[str]
    ) -> tuple[bool, list[tuple[str, str, bool]]]:
        """Record the true ``label`` of a scored request: whether it is new, and ``(head, role, correct)`` per
        scored head.

        NotFound for a request id with no scores, BadRequest for a label outside ``known_labels``, Conflict when
        the request already has another label (sending the same label again changes nothing)."""
        if label not in set(known_labels):
            raise BadRequest(f"unknown label {label!r}: the heads know {', '.join(sorted(known_labels))}")
        scored = self.scores(request_id)
        if not scored:
            raise NotFound(
                f"unknown request_id {request_id!r}: not answered by this service, older than its "
                f"{self.retention / 86400:g}-day retention, or not recorded (see "
                "tl_models_judge_dropped_total)"
            )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT label FROM labels WHERE request_id = ?", (request_id,)).fetchone()
                if row is None:
                    self._db.execute("INSERT INTO labels VALUES (?, ?, ?)", (request_id, label, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if row is not None and row[0] != label:
            raise Conflict(f"request {request_id!r} already has label {row[0]!r}")
        return row is None, [(head, role, top1 == label) for head, role, top1 in scored]

    def accuracy(self, window: int = 1000) -> dict[tuple[str, str], dict[str, float]]:
        """``(head, role) -> {"labelled", "correct", "accuracy"}`` over each head's last ``window`` labelled
        requests."""
        with self._lock:
            rows = self._db.execute(
                """
                SELECT head, role, COUNT(*), SUM(correct) FROM (
                    SELECT s.head, s.role, s.label = l.label AS correct,
                           ROW_NUMBER() OVER (PARTITION BY s.head, s.role ORDER BY l.time DESC) AS recent
                    FROM scores s JOIN labels l ON s.request_id = l.request_id)
                WHERE recent <= ? GROUP BY head, role""",
                (window,),
            ).fetchall()
        return {
            (head, role): {"labelled": n, "correct": int(correct), "accuracy": correct / n}
            for head, role, n, correct in rows
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""The embedding log: a sampled record of served requests (embedding and every scored head's top-k) and the
labels clients sent back, on disk, size-bounded, readable with numpy alone.

Layout of a log folder (the format is numpy shards with a JSON index: no dependency beyond numpy, and every
column is an array a data person loads with ``np.load``):

* ``shard-<utc time>-<pid>-<n>.npz``: one shard per flush, columns ``request_id`` (str), ``time`` (float64,
  Unix seconds), ``embedding`` (float32 N×D), ``head`` (str, "name:version" that answered), ``predictions``
  (str, JSON ``{"name:version": [[label, score], ...]}`` for every head scored on that request) and ``path``
  (str: whose embeddings ``embedding`` is: ``""`` the frozen backbone's, else the fine-tuned version's key whose
  own tail made them; shards written before the column existed read as ``""``);
* ``index.json``: the build, backbone sha256, embedding size, and the shards with their record counts, time
  ranges and sizes (written under a lock, so several workers can share one folder);
* ``feedback.jsonl``: one JSON line per label received: ``{"request_id", "label", "time"}``.

When the shards pass ``max_bytes`` the oldest are deleted (and leave the index).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BuildError
from .files import atomic_write_bytes, atomic_write_json, file_lock

log = logging.getLogger(__name__)

COLUMNS = ("request_id", "time", "embedding", "head", "predictions", "path")  # of every shard (LogRecords.columns)
FROZEN_PATH = ""  # the ``path`` of the frozen backbone's embeddings
LOG_INDEX = "index.json"
LOG_FEEDBACK = "feedback.jsonl"
LOG_FORMAT = 1


@dataclass
class LogRecords:
    """Columns of logged requests (one row per image)."""

    request_id: list[str] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    embedding: list[np.ndarray] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.request_id)

    def columns(self) -> dict[str, np.ndarray]:
        return {
            "request_id": np.asarray(self.request_id, dtype=str),
            "time": np.asarray(self.time, np.float64),
            "embedding": np.stack(self.embedding).astype(np.float32),
            "head": np.asarray(self.head, dtype=str),
            "predictions": np.asarray(self.predictions, dtype=str),
            "path": np.asarray(self.path, dtype=str),
        }


class EmbeddingLogWriter:
    """Buffers records and writes them as one shard per :meth:`flush`; keeps the folder under ``max_bytes``."""

    def __init__(self, folder: str | Path, facts: dict, max_bytes: int = 1 << 30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.facts = facts
        self.max_bytes = max_bytes
        self.pending = LogRecords()
        self._shards = 0
        with self._locked():
            index = self._index()
            if index["shards"] and {k: index.get(k) for k in facts} != facts:
                raise BuildError(
                    f"the embedding log {self.folder} holds another build's embeddings "
                    f"({ {k: index.get(k) for k in facts} }); give this service its own log folder"
                )
            atomic_write_json(self.folder / LOG_INDEX, {**index, **facts})

    def add(
        self, request_id: str, when: float, embedding: np.ndarray, head: str, predictions: dict, path: str = FROZEN_PATH
    ) -> None:
        """Buffer one record (written at the next :meth:`flush`); ``path``: whose embeddings ``embedding`` is."""
        records = self.pending
        records.request_id.append(request_id)
        records.time.append(when)
        records.embedding.append(embedding)
        records.head.append(head)
        records.predictions.append(json.dumps(predictions, separators=(",", ":")))
        records.path.append(path)

    def flush(self) -> int:
        """Write the buffered records as a new shard (nothing when none); deletes the oldest shards past
        ``max_bytes``. Returns the number of records written. When writing fails the records stay buffered for
        the next flush and no shard of theirs is left behind."""
        records = self.pending
        if not records:
            return 0
        buffer = io.BytesIO()
        np.savez(buffer, **records.columns())
        self._shards += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(records.time[0]))
        name = f"shard-{stamp}-{os.getpid()}-{self._shards:06d}.npz"
        try:
            self._write(name, records, buffer)
        except BaseException:
            (self.folder / name).unlink(missing_ok=True)
            raise
        self.pending = LogRecords()
        return len(records)

    def _write(self, name: str, records: LogRecords, buffer: io.BytesIO) -> None:
        """One shard and its entry in the index, under the folder's lock; the oldest shards past ``max_bytes`` go."""
        with self._locked():
            atomic_write_bytes(self.folder / name, buffer.getvalue())
            index = self._index()
            index["shards"].append(
                {
                    "file": name,
                    "records": len(records),
                    "first": records.time[0],
                    "last": records.time[-1],
                    "bytes": buffer.tell(),
                }
            )
            index["shards"].sort(key=lambda shard: shard["file"])
            while sum(s["bytes"] for s in index["shards"]) > self.max_bytes and len(index["shards"]) > 1:
                (self.folder / index["shards"].pop(0)["file"]).unlink(missing_ok=True)
            atomic_write_json(self.folder / LOG_INDEX, index)

    def _locked(self) -> AbstractContextManager[None]:
        return file_lock(self.folder / ".lock")

    def _index(self) -> dict:
        path = self.folder / LOG_INDEX
        return json.loads(path.read_text()) if path.is_file() else {"format": LOG_FORMAT, "shards": []}


def append_feedback(folder: str | Path, request_id: str, label: str, when: float) -> None:
    """One line of ``feedback.jsonl`` (a single O_APPEND write: lines from several workers never interleave)."""
    line = json.dumps({"request_id": request_id, "label": label, "time": when}, separators=(",", ":")) + "\n"
    fd = os.open(Path(folder) / LOG_FEEDBACK, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass
class EmbeddingLog:
    """A whole log folder read back: the index's facts, every record's columns, and the labels received."""

    facts: dict
    columns: dict[str, np.ndarray]
    labels: dict[str, str]

    def labelled(self, path: str = FROZEN_PATH) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(embeddings N×D, labels, times)`` of the records of one ``path`` (the frozen backbone's embeddings by
        default) that got feedback."""
        paths = self.columns["path"]
        keep = [
            i for i, rid in enumerate(self.columns["request_id"]) if str(rid) in self.labels and str(paths[i]) == path
        ]
        return (
            self.columns["embedding"][keep],
            [self.labels[str(self.columns["request_id"][i])] for i in keep],
            self.columns["time"][keep],
        )


def read_log(folder: str | Path) -> EmbeddingLog:
    """Read a log folder; BuildError when it is no embedding log or holds no readable records. A damaged shard (cut
    short, not a shard) or feedback line is skipped with a warning naming it; ``facts["skipped"]`` lists them."""
    folder = Path(folder)
    index_path = folder / LOG_INDEX
    if not index_path.is_file():
        raise BuildError(f"{folder} is no embedding log (no {LOG_INDEX}); serve with TL_MODELS_LOG_SHARE above 0")
    try:
        index = json.loads(index_path.read_text())
        shards = [str(shard["file"]) for shard in index["shards"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise BuildError(f"{index_path} is damaged ({type(exc).__name__}: {exc})") from None
    parts, skipped = [], []
    for name in shards:
        path = folder / name
        if path.is_file():
            try:
                with np.load(path) as data:
                    part = {key: data[key] for key in COLUMNS if key != "path"}
                    count = len(part["request_id"])
                    part["path"] = data["path"] if "path" in data.files else np.full(count, FROZEN_PATH, dtype=str)
                    parts.append(part)
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
                log.warning("skipping damaged shard %s of the embedding log: %s: %s", path, type(exc).__name__, exc)
                skipped.append(name)
    if not parts:
        raise BuildError(
            f"the embedding log {folder} holds no readable records"
            + (f" ({len(skipped)} damaged shards)" if skipped else " yet")
        )
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    labels: dict[str, str] = {}
    feedback = folder / LOG_FEEDBACK
    if feedback.is_file():
        for number, line in enumerate(feedback.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                    labels.setdefault(str(entry["request_id"]), str(entry["label"]))
                except (ValueError, TypeError, KeyError):
                    log.warning("skipping damaged line %d of %s", number, feedback)
                    skipped.append(f"{LOG_FEEDBACK}:{number}")
    facts = {key: value for key, value in index.items() if key != "shards"} | {"skipped": skipped}
    return EmbeddingLog(facts, columns, labels)

"""The head catalog of a BentoML service: ``name:version -> HeadSource`` in a JSON file of the state directory,
shared by every worker (a worker routed to a version it has not loaded finds it here)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from ..core.files import atomic_write_json, file_lock
from ..core.heads import HeadSource


class HeadCatalog:
    """``name:version -> HeadSource`` in a JSON file of the state directory, shared by every worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cache: dict[str, HeadSource] = {}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    def entries(self) -> dict[str, HeadSource]:
        """All entries (re-read when the file changed)."""
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                return {}
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = json.loads(self.path.read_text())
                self._cache = {key: HeadSource.from_dict(value) for key, value in data.items()}
                self._stamp = stamp
            return dict(self._cache)

    def get(self, name: str, version: int) -> HeadSource | None:
        return self.entries().get(f"{name}:{version}")

    def locked(self) -> AbstractContextManager[None]:
        """Exclusive lock across processes (state changes by admin calls and startup are serialised)."""
        return file_lock(self.path.with_name(self.path.name + ".lock"))

    def put(self, sources: Sequence[HeadSource]) -> None:
        """Add or replace entries (call under :meth:`locked`; the registry refuses other bytes for a known version)."""
        entries = self.entries()
        entries.update((source.key, source) for source in sources)
        atomic_write_json(self.path, {key: value.to_dict() for key, value in sorted(entries.items())})

    def remove(self, key: str) -> None:
        """Forget one ``name:version`` (call under :meth:`locked`)."""
        entries = self.entries()
        entries.pop(key, None)
        atomic_write_json(self.path, {k: value.to_dict() for k, value in sorted(entries.items())})

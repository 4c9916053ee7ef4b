"""Embeddings on several paths in one BentoML worker: the frozen backbone's, and each fine-tuned version's own
(``training.tails``: the build's trunk, then the version's tail).

A request whose head versions (the one that answers and the shadows drawn for it, ``core.plan``) all take the
frozen backbone's embeddings runs the whole backbone, as before any tuned version existed. A request that needs a
tuned version's embeddings runs the trunk once (batched with the other such requests, in lanes like the
backbone's), then each tail it needs on its activation: the frozen tail for the frozen heads, the version's tail
for the version. Each tail is one ONNX Runtime session per worker (not one per lane), behind a batcher of its own,
so the tail passes of concurrent requests are batched too.

One cut per worker: the first tuned version admitted sets the trunk; a version cut elsewhere is refused in one line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from ..core.errors import Refused
from ..core.heads import LoadedHead, TailSource, read_verified
from ..core.names import ACTIVATION, EMBEDDING, IMAGE
from ..core.runtime import create_session
from .batching import MicroBatcher, Prepare

log = logging.getLogger(__name__)

FROZEN = ""  # the frozen backbone's path (``LoadedHead.path``)
DRAIN = 60.0  # seconds a tail batcher of a version swapped out may take to answer what it was given

# sessions (lanes, solo) of a graph -> a batcher over them; the engine's layout and locks
MakeBatcher = Callable[[list[Any], Any | None, str, str], MicroBatcher]


def run_graph(session: Any, input_name: str, output_name: str, batch: np.ndarray) -> np.ndarray:
    """One pass of an ONNX Runtime session: its one output for ``batch``."""
    output: np.ndarray = session.run([output_name], {input_name: batch})[0]
    return output


class TailPaths:
    """The trunk and tails of one worker, made when the first tuned version is admitted (:meth:`admit`)."""

    def __init__(
        self,
        trunk_sessions: Callable[[bytes], tuple[list[Any], Any | None]],
        make_batcher: MakeBatcher,
        providers: str | None = None,
        threads: int | None = None,
    ):
        self._trunk_sessions = trunk_sessions
        self._make_batcher = make_batcher
        self._providers = providers
        self._threads = threads
        self._lock = threading.Lock()
        self.cut: TailSource | None = None  # the first tuned version's: its trunk and frozen tail
        self.trunk: MicroBatcher | None = None
        self.frozen: MicroBatcher | None = None
        self._tails: dict[str, tuple[Any, MicroBatcher]] = {}  # version key -> (its tail session, its batcher)

    def admit(self, tail: TailSource, what: str) -> None:
        """Make the trunk and the frozen tail of ``tail``'s cut, once; Refused for a version cut elsewhere (another
        stage count, another trunk graph) or a trunk file that fails its sha256 check."""
        with self._lock:
            if self.cut is not None:
                if (tail.stages, tail.trunk_sha256) != (self.cut.stages, self.cut.trunk_sha256):
                    raise Refused(
                        f"{what} is cut before its last {tail.stages} stage(s) (trunk {tail.trunk_sha256[:12]}…); "
                        f"this worker runs tuned versions cut before their last {self.cut.stages} "
                        f"(trunk {self.cut.trunk_sha256[:12]}…): one cut per service"
                    )
                return
            trunk = read_verified(tail.trunk, tail.trunk_sha256, f"{what}'s trunk")
            frozen = read_verified(tail.frozen_tail, tail.frozen_tail_sha256, f"{what}'s frozen tail")
            lanes, solo = self._trunk_sessions(trunk)
            frozen_session = create_session(frozen, self._providers, self._threads, "frozen tail", spin=False)
            self.trunk = self._make_batcher(lanes, solo, IMAGE, ACTIVATION)
            self.frozen = self._make_batcher([frozen_session], None, ACTIVATION, EMBEDDING)
            self.cut = tail
            log.info("tuned versions run on trunk %s (cut before the last %d stages)", tail.trunk, tail.stages)

    def _tail(self, head: LoadedHead) -> MicroBatcher:
        """The batcher over ``head``'s tail session (made on first use; a new session of the same version, after a
        reload, gets a new one)."""
        key = head.source.key
        held = self._tails.get(key)
        if held is None or held[0] is not head.tail:
            with self._lock:
                held = self._tails.get(key)
                if held is None or held[0] is not head.tail:
                    if held is not None:  # its requests in flight are answered first
                        threading.Thread(target=held[1].close, args=(DRAIN,), daemon=True).start()
                    held = self._tails[key] = (head.tail, self._make_batcher([head.tail], None, ACTIVATION, EMBEDDING))
        return held[1]

    async def embeddings(
        self, heads: Sequence[LoadedHead], item: Any, prepare: Prepare | None
    ) -> dict[str, np.ndarray]:
        """``path -> embeddings`` of one request for every path ``heads`` take: the trunk once, each tail once."""
        assert self.trunk is not None and self.frozen is not None  # a tuned version was admitted first
        activation = await self.trunk.submit(item, prepare)
        paths = {head.path: head for head in heads}
        tails = [self.frozen if path == FROZEN else self._tail(head) for path, head in paths.items()]
        results = await asyncio.gather(*(tail.submit(activation) for tail in tails))
        return dict(zip(paths, results))

    def forget(self, keep: set[str]) -> None:
        """Close the tail batchers of versions this worker no longer holds (a swap or an unload took them out), in
        the background once the requests that chose them before the change are answered."""
        with self._lock:
            gone = [self._tails.pop(key)[1] for key in [key for key in self._tails if key not in keep]]
        for batcher in gone:
            threading.Thread(target=batcher.close, args=(DRAIN,), name="tail-close", daemon=True).start()

    def close(self) -> None:
        """Stop every batcher's threads (passes running end first)."""
        with self._lock:
            batchers = [b for b in (self.trunk, self.frozen) if b is not None] + [b for _, b in self._tails.values()]
            self._tails.clear()
        for batcher in batchers:
            batcher.close()


def graph_runner(session: Any, input_name: str, output_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """``run_graph`` bound to one session and its tensor names: a batcher's way."""
    return partial(run_graph, session, input_name, output_name)

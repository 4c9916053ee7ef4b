"""Embeddings on several paths in one BentoML worker: the frozen backbone's, and each fine-tuned version's own
(``training.tails``: the build's trunk, then the version's tail).

A request whose head versions (the one that answers and the shadows drawn for it, ``core.plan``) all take the
frozen backbone's embeddings runs the whole backbone, as before any tuned version existed. The other requests are
batched into passes of their own: each pass runs the trunk once on all its rows, then each tail once on the rows
of the requests that need it (the frozen tail for the frozen heads, a version's tail for that version), in the same
lane thread. The trunk has the backbone's lane layout; each tail is one ONNX Runtime session per worker, shared by
the lanes (single-threaded on the CPU, like a lane), not one per lane.

One cut per worker: the first tuned version admitted sets the trunk; a version cut elsewhere is refused in one line.
"""

from __future__ import annotations

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
from .batching import MicroBatcher, Prepare, Run

log = logging.getLogger(__name__)

FROZEN = ""  # the frozen backbone's path (``LoadedHead.path``)

# ways (lanes, solo) -> a batcher of ``parts`` over them, with the engine's pass size and locks
MakeBatcher = Callable[[list[Run], Run | None, bool], MicroBatcher]


def run_graph(session: Any, input_name: str, output_name: str, batch: np.ndarray) -> np.ndarray:
    """One pass of an ONNX Runtime session: its one output for ``batch``."""
    output: np.ndarray = session.run([output_name], {input_name: batch})[0]
    return output


Need = tuple[tuple[str, Any], ...]  # a request's paths, each with the tail session that makes it


class TailPaths:
    """The trunk and tails of one worker, made when the first tuned version is admitted (:meth:`admit`)."""

    def __init__(
        self,
        trunk_sessions: Callable[[bytes], tuple[list[Any], Any | None]],
        make_batcher: MakeBatcher,
        providers: str | None = None,
        threads: int | None = 1,
    ):
        self._trunk_sessions = trunk_sessions
        self._make_batcher = make_batcher
        self._providers = providers
        self._threads = threads
        self._lock = threading.Lock()
        self.cut: TailSource | None = None  # the first tuned version's: its trunk and frozen tail
        self.trunk: MicroBatcher | None = None  # passes of trunk + tails
        self.frozen: Any | None = None  # the frozen tail's session

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
            self.frozen = create_session(frozen, self._providers, self._threads, "frozen tail", spin=False)
            self.trunk = self._make_batcher(
                [partial(trunk_and_tails, lane) for lane in lanes],
                partial(trunk_and_tails, solo) if solo is not None else None,
                True,
            )
            self.cut = tail
            log.info("tuned versions run on trunk %s (cut before the last %d stages)", tail.trunk, tail.stages)

    async def embeddings(
        self, heads: Sequence[LoadedHead], item: Any, prepare: Prepare | None
    ) -> dict[str, np.ndarray]:
        """``path -> embeddings`` of one request for every path ``heads`` take: a pass of the trunk, then each tail it
        needs, batched with the other requests that take these paths."""
        assert self.trunk is not None  # a tuned version was admitted first
        need: Need = tuple({head.path: self.frozen if head.tail is None else head.tail for head in heads}.items())
        answer: dict[str, np.ndarray] = await self.trunk.submit(item, prepare, need)
        return answer

    def close(self) -> None:
        """Stop the trunk's passes (those running end first)."""
        if self.trunk is not None:
            self.trunk.close()


def trunk_and_tails(trunk: Any, batch: np.ndarray, needs: list[tuple[int, Need]]) -> list[dict[str, np.ndarray]]:
    """One pass: ``trunk`` once on ``batch``, then each tail once on the rows of the requests that need it; per
    request (``needs``: its row count and its paths with their tail sessions) ``path -> embeddings``."""
    activation = run_graph(trunk, IMAGE, ACTIVATION, batch)
    starts = np.cumsum([0, *(count for count, _ in needs)])
    rows: dict[str, list[np.ndarray]] = {}
    sessions: dict[str, Any] = {}
    for (count, need), start in zip(needs, starts):
        for path, session in need:
            rows.setdefault(path, []).append(np.arange(start, start + count))
            sessions[path] = session
    embeddings = {}
    for path, parts in rows.items():
        taken = np.concatenate(parts)
        embeddings[path] = (taken, run_graph(sessions[path], ACTIVATION, EMBEDDING, activation[taken]))
    answers = []
    for (count, need), start in zip(needs, starts):
        answer = {}
        for path, _ in need:
            taken, values = embeddings[path]
            at = np.searchsorted(taken, start)  # the request's rows are consecutive in ``taken``
            answer[path] = values[at : at + count]
        answers.append(answer)
    return answers


def graph_runner(session: Any, input_name: str, output_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """``run_graph`` bound to one session and its tensor names: a batcher's way."""
    return partial(run_graph, session, input_name, output_name)

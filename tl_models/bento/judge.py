"""Judging heads on live traffic inside a BentoML worker.

* **Shadow heads** are scored on the embedding the request already computed (one small matmul each), on the
  request path, and never returned: per shadow head, top-1 agreement with the head that answered, both heads'
  mean top-1 confidence and the time scoring took (Prometheus counters, summed over workers in ``/heads``).
  A shadow head that fails is counted and dropped from shadowing; the request is answered.
* **Request ids**: every answered image gets one. The recorder, a thread off the request path fed by a bounded
  queue (full: the record is dropped and counted, the request never waits), writes what every scored head said
  into the feedback store (:mod:`tl_models.core.feedback`), pushes the embedding into the drift window
  (:mod:`tl_models.core.drift`) and writes a sampled share into the embedding log
  (:mod:`tl_models.core.embedding_log`).
* **Feedback** (``POST /feedback``) labels a request id: per head and role, accuracy over its recent labelled
  requests.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.drift import DRIFT_THRESHOLD, DRIFT_WINDOW, DriftWindow
from ..core.embedding_log import EmbeddingLogWriter, append_feedback
from ..core.errors import BadRequest, Refused
from ..core.feedback import FEEDBACK_DB, LIVE, SHADOW, FeedbackStore, issued_recently
from ..core.heads import BackboneSource, LoadedHead, softmax
from ..core.identity import identity_facts
from ..core.plan import BatchPlan, Planned
from .metrics import Metrics

log = logging.getLogger(__name__)

LOG_DIR = "embedding-log"  # default log folder inside the state directory
# the recorder takes up to RECORD_BATCH queued requests at a time; after a smaller batch it pauses RECORD_PAUSE s
# so that the next batch gathers more (at 130 req/s it woke for every request: 2-4% of a BentoML worker's CPU
# in Queue.get alone, `bench serve --profile`); the request path never waits for it (put_nowait)
RECORD_BATCH = 256
RECORD_PAUSE = 0.05


@dataclass
class JudgeConfig:
    """Knobs of judging, from ``TL_MODELS_*`` environment variables (:meth:`from_env`)."""

    log_dir: Path
    log_share: float = 0.0
    log_max_bytes: int = 1 << 30
    log_flush: float = 10.0
    queue_size: int = 10000
    drift_window: int = DRIFT_WINDOW
    drift_threshold: float = DRIFT_THRESHOLD
    feedback_window: int = 1000
    retention_days: float = 7.0
    record: bool = True  # False: no recorder (no feedback store writes, drift or log); shadows still scored

    @classmethod
    def from_env(cls, state_dir: Path) -> JudgeConfig:
        env = os.environ
        config = cls(
            log_dir=Path(env.get("TL_MODELS_LOG_DIR") or state_dir / LOG_DIR),
            log_share=float(env.get("TL_MODELS_LOG_SHARE", "0")),
            log_max_bytes=int(float(env.get("TL_MODELS_LOG_MAX_MB", "1024")) * (1 << 20)),
            log_flush=float(env.get("TL_MODELS_LOG_FLUSH", "10")),
            queue_size=int(env.get("TL_MODELS_JUDGE_QUEUE", "10000")),
            drift_window=int(env.get("TL_MODELS_DRIFT_WINDOW", str(DRIFT_WINDOW))),
            drift_threshold=float(env.get("TL_MODELS_DRIFT_THRESHOLD", str(DRIFT_THRESHOLD))),
            feedback_window=int(env.get("TL_MODELS_FEEDBACK_WINDOW", "1000")),
            retention_days=float(env.get("TL_MODELS_RETENTION_DAYS", "7")),
            record=env.get("TL_MODELS_RECORD", "1") != "0",
        )
        if not 0 <= config.log_share <= 1:
            raise BadRequest(f"TL_MODELS_LOG_SHARE must be a share between 0 and 1, got {config.log_share}")
        if not config.record and config.log_share > 0:
            raise BadRequest("TL_MODELS_LOG_SHARE needs the recorder: unset TL_MODELS_RECORD=0, or the log share")
        if config.queue_size < 1 or config.drift_window < 1 or config.feedback_window < 1:
            raise BadRequest(
                "TL_MODELS_JUDGE_QUEUE, TL_MODELS_DRIFT_WINDOW and TL_MODELS_FEEDBACK_WINDOW must be at least 1"
            )
        return config


@dataclass
class Scored:
    """One answered request, as the recorder needs it: ids, embeddings and every scored head's logits."""

    request_ids: list[str]
    time: float
    embedding: np.ndarray  # on the answering head's path (``answered.path``)
    answered: LoadedHead
    shadows: list[tuple[LoadedHead, np.ndarray]]
    logits: np.ndarray
    embeddings: dict[str, np.ndarray] | None = None  # every path's embeddings the request computed (None: just one)


def _top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 index and its softmax probability per row."""
    top = logits.argmax(axis=1)
    shifted = logits - logits[np.arange(len(logits)), top][:, None]
    return top, 1.0 / np.exp(shifted).sum(axis=1)


def _top(head: LoadedHead, logits: np.ndarray, k: int) -> list[list[list]]:
    """Top-k ``[label, score]`` per row."""
    scores = softmax(logits)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[[head.source.labels[i], round(float(row[i]), 6)] for i in idx] for row, idx in zip(scores, order)]


class Judge:
    """Shadow scoring on the request path; recording, drift and the embedding log on a thread of its own."""

    def __init__(
        self, state_dir: Path, config: JudgeConfig, backbone: BackboneSource, embedding_dim: int, top_k: int = 5
    ):
        self.config = config
        self.metrics = Metrics.get()
        self.top_k = top_k
        self.store = FeedbackStore(state_dir / FEEDBACK_DB, retention=config.retention_days * 86400)
        self.embedding_dim = embedding_dim
        self.drift_window = DriftWindow(embedding_dim, config.drift_window)  # the frozen backbone's embeddings
        self._windows: dict[str, DriftWindow] = {"": self.drift_window}  # per path: a tuned version's own
        self.log = None
        if config.log_share > 0:
            self.log = EmbeddingLogWriter(
                config.log_dir,
                {"build": backbone.build, **identity_facts(backbone.sha256), "embedding_dim": embedding_dim},
                max_bytes=config.log_max_bytes,
            )
        self._dropped: dict[str, str] = {}  # this worker's failed shadow heads: key -> reason
        self._children: dict[str, tuple] = {}
        self._queue: queue.Queue[Scored] = queue.Queue(maxsize=config.queue_size)
        if config.record:
            threading.Thread(target=self._record_forever, name="tl-models-judge", daemon=True).start()

    # -- the request path

    def drop(self, key: str, reason: str) -> None:
        """Stop scoring shadow head ``key`` in this worker (it failed to load or to run); ``reason`` is shown in
        ``/heads``."""
        if key not in self._dropped:
            log.warning("shadow head %s is dropped from shadowing: %s", key, reason)
        self._dropped[key] = reason

    @property
    def dropped_keys(self) -> Container[str]:
        """The shadow heads (``"name:version"``) dropped in this worker: the plan draws none of them."""
        return self._dropped.keys()

    def dropped_shadows(self) -> dict[str, str]:
        """This worker's dropped shadow heads: key -> reason."""
        return dict(self._dropped)

    def shadow(
        self,
        planned: Planned,
        answered: LoadedHead,
        logits: np.ndarray,
        embeddings: dict[str, np.ndarray],
        shadows: list[LoadedHead],
    ) -> tuple[list[tuple[LoadedHead, np.ndarray]], list[str]]:
        """Score the shadow heads the request's plan drew (``shadows``, loaded), each on its path's embeddings
        (``embeddings``: path -> rows); agreement with ``answered`` by the plan's rule
        (:meth:`~tl_models.core.plan.BatchPlan.agreement`). ``(head, logits)`` of those that ran, and the keys of
        those that failed (dropped here; the caller takes them out of the route)."""
        scored, failed = [], []
        answer_top, answer_confidence = _top1(logits)
        plan = BatchPlan([planned], [len(logits)])
        answers = {planned.key: (answered.source.labels, answer_top)}
        for head in shadows:
            key = head.source.key
            if key in self._dropped:
                continue
            start = time.perf_counter()
            try:
                shadow_logits = head.logits(embeddings[head.path])
                if shadow_logits.shape[0] != len(logits):
                    raise ValueError(f"{shadow_logits.shape[0]} rows of logits for {len(logits)} images")
                top, confidence = _top1(shadow_logits)
            except Exception as exc:  # a shadow head never fails the request
                self._shadow_metrics(head)[5].inc()
                self.drop(key, f"{type(exc).__name__}: {exc}")
                failed.append(key)
                continue
            _, same = plan.agreement((head.name, head.version), head.source.labels, top, answers)
            seconds, images, agreements, confidences, answer_confidences, _ = self._shadow_metrics(head)
            seconds.inc(time.perf_counter() - start)
            images.inc(len(logits))
            agreements.inc(same)
            confidences.inc(float(confidence.sum()))
            answer_confidences.inc(float(answer_confidence.sum()))
            scored.append((head, shadow_logits))
        return scored, failed

    def _shadow_metrics(self, head: LoadedHead) -> tuple:
        """The labelled counters of one shadow head (looked up once: ``labels()`` costs more than ``inc()``)."""
        key = head.source.key
        children = self._children.get(key)
        if children is None:
            labels = (head.name, str(head.version))
            m = self.metrics
            children = self._children[key] = tuple(
                family.labels(*labels)
                for family in (
                    m.shadow_seconds,
                    m.shadow_scored,
                    m.shadow_agreed,
                    m.shadow_confidence,
                    m.shadow_answer_confidence,
                    m.shadow_errors,
                )
            )
        return children

    def submit(self, scored: Scored) -> bool:
        """Queue a request for recording; False (counted) when the queue is full: the request never waits. With
        the recorder off, nothing (False, not counted)."""
        if not self.config.record:
            return False
        try:
            self._queue.put_nowait(scored)
        except queue.Full:
            self.metrics.dropped.inc(len(scored.request_ids))
            return False
        return True

    # -- the recorder thread

    def _record_forever(self) -> None:
        last_flush = last_drift = time.monotonic()
        seen: dict[str, LoadedHead] = {}  # heads scored since the drift gauge was last set
        while True:
            try:
                batch = [self._queue.get(timeout=1.0)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < RECORD_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._record(batch)
            except Exception:  # the recorder must outlive a bad disk moment; the batch is in neither store nor log
                log.exception("recording %d requests failed", len(batch))
                self.metrics.dropped.inc(sum(len(s.request_ids) for s in batch))
            for scored in batch:
                seen.update((h.source.key, h) for h in [scored.answered, *(h for h, _ in scored.shadows)])
            now = time.monotonic()
            if seen and now - last_drift >= 1.0:
                self.drift(list(seen.values()))
                seen, last_drift = {}, now
            if (
                self.log is not None
                and self.log.pending
                and (now - last_flush >= self.config.log_flush or len(self.log.pending) >= 4096)
            ):
                try:
                    self.metrics.logged.inc(self.log.flush())
                except Exception:  # the records stay pending (they are in the store): the next flush retries
                    log.exception(
                        "writing the embedding log failed; %d records wait for the next flush", len(self.log.pending)
                    )
                last_flush = now
            for _ in batch:
                self._queue.task_done()
            if 0 < len(batch) < RECORD_BATCH:  # let requests gather: one wake-up and one commit for many
                time.sleep(RECORD_PAUSE)

    def _record(self, batch: list[Scored]) -> None:
        """Commit a batch to the feedback store, then (only then) to the drift window and the embedding log's
        buffer: a store failure leaves the batch out of both, and the caller counts it as dropped."""
        rows, logged = [], []
        for scored in batch:
            heads = [(scored.answered, scored.logits, LIVE)] + [(h, lg, SHADOW) for h, lg in scored.shadows]
            tops = {head.source.key: _top(head, logits, self.top_k) for head, logits, _ in heads}
            for head, _, role in heads:
                for rid, top in zip(scored.request_ids, tops[head.source.key]):
                    rows.append((rid, head.source.key, role, top[0][0], top[0][1], scored.time))
            if self.log is not None:
                logged += [
                    (
                        rid,
                        scored.time,
                        scored.embedding[i],
                        scored.answered.source.key,
                        {key: top[i] for key, top in tops.items()},
                        scored.answered.path,  # whose embeddings they are: the log's path column
                    )
                    for i, rid in enumerate(scored.request_ids)
                    if random.random() < self.config.log_share
                ]
        if rows:
            self.store.record(rows)
            self.metrics.recorded.inc(sum(len(s.request_ids) for s in batch))
        for scored in batch:
            for path, embedding in (scored.embeddings or {scored.answered.path: scored.embedding}).items():
                self._window(path).add(embedding)
        if self.log is not None:
            for record in logged:
                self.log.add(*record)

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until everything this worker queued is recorded; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- feedback and status

    def feedback(self, request_id: str, label: str, known_labels: set[str]) -> dict:
        """Record the true label of an answered image; per scored head whether it was right."""
        if not isinstance(request_id, str) or not request_id:
            raise BadRequest("give the request_id an answer carried, and the true label")
        if not self.config.record:
            raise Refused("feedback is not recorded: this service runs with TL_MODELS_RECORD=0 (recorder off)")
        deadline = time.monotonic() + 2.0  # an answer from a moment ago may still sit in a recorder's queue
        while not self.store.scores(request_id) and issued_recently(request_id) and time.monotonic() < deadline:
            self.settle(0.1)
            time.sleep(0.05)
        new, judged = self.store.label(request_id, label, known_labels)
        if new:
            for key, role, correct in judged:
                name, _, version = key.partition(":")
                self.metrics.feedback.labels(name, version, role).inc()
                if correct:
                    self.metrics.feedback_correct.labels(name, version, role).inc()
            if self.log is not None:
                append_feedback(self.config.log_dir, request_id, label, time.time())
        return {
            "request_id": request_id,
            "label": label,
            "recorded": new,
            "heads": [{"head": key, "role": role, "correct": correct} for key, role, correct in judged],
        }

    def _window(self, path: str) -> DriftWindow:
        """The drift window of one path's embeddings (made on first use: a tuned version's own)."""
        window = self._windows.get(path)
        if window is None:
            window = self._windows[path] = DriftWindow(self.embedding_dim, self.config.drift_window)
        return window

    def drift(self, heads: Iterable[LoadedHead]) -> dict[str, float | None]:
        """``"name:version" -> drift`` of the recent window of its path's embeddings (the frozen backbone's, or a
        tuned version's own) against each head's training embeddings (None when the head has no reference or the
        window is too small); also sets the gauge."""
        means = {path: window.mean()[0] for path, window in list(self._windows.items())}  # the recorder adds some
        values: dict[str, float | None] = {}
        for head in heads:
            mean = means.get(head.path)
            value = None if mean is None or head.reference is None else head.reference.drift(mean)
            values[head.source.key] = value
            if value is not None:
                self.metrics.drift.labels(head.name, str(head.version)).set(value)
        return values

    def status(self, live: list[LoadedHead], shadows: list[tuple[LoadedHead, float]]) -> dict:
        """The judging part of ``GET /heads``: per live and shadow head its feedback accuracy, drift and (shadow)
        agreement; the recorder's counts and the drift window."""
        accuracy = self.store.accuracy(self.config.feedback_window)
        drift = self.drift({**{h.source.key: h for h in live}, **{h.source.key: h for h, _ in shadows}}.values())
        families = (
            "tl_models_shadow_scored",
            "tl_models_shadow_agreed",
            "tl_models_shadow_confidence",
            "tl_models_shadow_answer_confidence",
            "tl_models_shadow_seconds",
            "tl_models_shadow_errors",
            "tl_models_judge_recorded",
            "tl_models_judge_dropped",
            "tl_models_log_records",
        )
        totals = Metrics.totals(*families)

        def judged(head: LoadedHead, role: str) -> dict:
            feedback = accuracy.get((head.source.key, role), {"labelled": 0, "correct": 0, "accuracy": None})
            value = drift.get(head.source.key)
            reference = head.reference
            return {
                "feedback": feedback,
                "drift": value,
                "drifted": None if value is None else value > self.config.drift_threshold,
                "drift_baseline": None if reference is None else reference.baseline,
            }

        def shadow_entry(head: LoadedHead, share: float) -> dict:
            key = (head.name, str(head.version))
            scored = totals["tl_models_shadow_scored"].get(key, 0.0)

            def per(family: str) -> float | None:
                return totals[family].get(key, 0.0) / scored if scored else None

            seconds = totals["tl_models_shadow_seconds"].get(key, 0.0)
            return {
                "name": head.name,
                "version": head.version,
                "share": share,
                "scored": int(scored),
                "agreement": per("tl_models_shadow_agreed"),
                "confidence": per("tl_models_shadow_confidence"),
                "answer_confidence": per("tl_models_shadow_answer_confidence"),
                "added_ms_per_image": seconds / scored * 1000 if scored else None,
                "errors": int(totals["tl_models_shadow_errors"].get(key, 0.0)),
                "dropped": self._dropped.get(head.source.key),
                **judged(head, SHADOW),
            }

        window_mean, count = self.drift_window.mean()
        return {
            "live": {head.source.key: judged(head, LIVE) for head in live},
            "shadow": [shadow_entry(head, share) for head, share in shadows],
            "drift": {
                "window": count,
                "size": self.config.drift_window,
                "threshold": self.config.drift_threshold,
                "ready": window_mean is not None,
                "tuned": {path: w.mean()[1] for path, w in list(self._windows.items()) if path},  # own windows
            },
            "recorder": {
                "enabled": self.config.record,
                "recorded": int(totals["tl_models_judge_recorded"].get((), 0.0)),
                "dropped": int(totals["tl_models_judge_dropped"].get((), 0.0)),
                "logged": int(totals["tl_models_log_records"].get((), 0.0)),
                "log_share": self.config.log_share,
                "log_dir": str(self.config.log_dir) if self.log is not None else None,
            },
        }

    def close(self) -> None:
        """Record what is queued and write the log's last shard."""
        self.settle()
        if self.log is not None:
            self.metrics.logged.inc(self.log.flush())
        self.store.close()

"""Per-head Prometheus metrics of the serving core."""

from __future__ import annotations

import os


class Metrics:
    """Per-head Prometheus metrics. prometheus_client is imported on first use: BentoML sets
    PROMETHEUS_MULTIPROC_DIR in its workers, and the client must see it to aggregate across workers."""

    _instance: Metrics | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        labels = ["head", "version", "endpoint"]
        self.requests = Counter("tl_models_head_requests", "Requests routed to a head", labels)
        self.errors = Counter("tl_models_head_errors", "Requests routed to a head that failed", labels + ["reason"])
        self.latency = Histogram(
            "tl_models_head_request_duration_seconds",
            "Time from routing to answer, per head",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch = Histogram(
            "tl_models_backbone_batch_size",
            "Images per backbone pass (adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        shadow = ["head", "version"]
        self.shadow_scored = Counter("tl_models_shadow_scored", "Images a shadow head was scored on", shadow)
        self.shadow_agreed = Counter(
            "tl_models_shadow_agreed", "Images where a shadow head's top-1 equals the answering head's", shadow
        )
        self.shadow_confidence = Counter(
            "tl_models_shadow_confidence", "Sum of a shadow head's top-1 confidence", shadow
        )
        self.shadow_answer_confidence = Counter(
            "tl_models_shadow_answer_confidence",
            "Sum of the answering head's top-1 confidence on the images a shadow head was scored on",
            shadow,
        )
        self.shadow_seconds = Counter("tl_models_shadow_seconds", "Time spent scoring a shadow head", shadow)
        self.shadow_errors = Counter(
            "tl_models_shadow_errors",
            "Shadow scorings that failed (the head is dropped from shadowing; the request is answered)",
            shadow,
        )
        judged = ["head", "version", "role"]
        self.feedback = Counter(
            "tl_models_feedback",
            "Labelled requests a head was scored on (role: live answered it, shadow was scored beside)",
            judged,
        )
        self.feedback_correct = Counter("tl_models_feedback_correct", "Labelled requests a head got right", judged)
        self.recorded = Counter("tl_models_judge_recorded", "Images recorded for feedback (and drift)")
        self.dropped = Counter("tl_models_judge_dropped", "Images not recorded: the recorder queue was full")
        self.logged = Counter("tl_models_log_records", "Images written to the embedding log")
        self.route_damaged = Gauge(
            "tl_models_route_damaged",
            "1 while the route file is damaged (the worker serves its last good route; GET /heads: route_error)",
            multiprocess_mode="livemax",
        )
        self.drift = Gauge(
            "tl_models_embedding_drift",
            "Distance of the recent served embeddings' mean from a head's training mean, in training spreads",
            ["head", "version"],
            multiprocess_mode="livemax",
        )

    @classmethod
    def get(cls) -> Metrics:
        """The process-wide instance (metrics can be registered only once per process)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    LABEL_ORDER = ("head", "version", "endpoint", "role", "reason")  # order of label values in :meth:`totals` keys

    @staticmethod
    def totals(*families: str) -> dict[str, dict[tuple[str, ...], float]]:
        """``family -> label values (in :data:`LABEL_ORDER`) -> counter total``, summed over every worker of the
        server (the multiprocess collector reorders labels, so keys follow one fixed order)."""
        from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

        registry = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        totals: dict[str, dict[tuple[str, ...], float]] = {family: {} for family in families}
        for family in registry.collect():
            if family.name not in totals:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = tuple(sample.labels[n] for n in Metrics.LABEL_ORDER if n in sample.labels)
                    totals[family.name][key] = totals[family.name].get(key, 0.0) + sample.value
        return totals

    @staticmethod
    def request_counts() -> dict[str, dict[str, float]]:
        """``head -> version -> requests``, summed over every worker of the server."""
        counts: dict[str, dict[str, float]] = {}
        for (head, version, _), value in Metrics.totals("tl_models_head_requests")["tl_models_head_requests"].items():
            by_version = counts.setdefault(head, {})
            by_version[version] = by_version.get(version, 0.0) + value
        return counts

"""Per-head Prometheus metrics of the serving core."""

from __future__ import annotations

import os


class Metrics:
    """Per-head Prometheus metrics. prometheus_client is imported on first use: BentoML sets
    PROMETHEUS_MULTIPROC_DIR in its workers, and the client must see it to aggregate across workers."""

    _instance: "Metrics | None" = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        labels = ["head", "version", "endpoint"]
        self.requests = Counter("tl_models_head_requests", "Requests routed to a head", labels)
        self.errors = Counter("tl_models_head_errors", "Requests routed to a head that failed",
                              labels + ["reason"])
        self.latency = Histogram("tl_models_head_request_duration_seconds",
                                 "Time from routing to answer, per head", labels,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("tl_models_backbone_batch_size", "Images per backbone pass (adaptive batching)",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    @classmethod
    def get(cls) -> "Metrics":
        """The process-wide instance (metrics can be registered only once per process)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @staticmethod
    def request_counts() -> dict[str, dict[str, float]]:
        """``head -> version -> requests``, summed over every worker of the server."""
        from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

        registry = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        counts: dict[str, dict[str, float]] = {}
        for family in registry.collect():
            if family.name != "tl_models_head_requests":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    by_version = counts.setdefault(sample.labels["head"], {})
                    version = sample.labels["version"]
                    by_version[version] = by_version.get(version, 0.0) + sample.value
        return counts

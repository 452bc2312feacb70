"""Prometheus metrics (one registry per app, so tests and workers never collide) and a live
latency window for the JSON view."""

from __future__ import annotations

import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from app.registry import Registry, percentile

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WINDOW = 2048  # recent requests per variant kept for the JSON view's live percentiles


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        labels = ("variant", "keep", "granularity")
        self.accuracy = Gauge("prune_variant_test_accuracy_percent",
                              "Test accuracy measured by training (mean over seeds)", labels, registry=self.registry)
        self.accuracy_drop = Gauge("prune_variant_accuracy_drop_points", "Accuracy points lost vs dense",
                                   labels, registry=self.registry)
        self.parameters = Gauge("prune_variant_parameters", "Parameter counts (kind: total, prunable, nonzero)",
                                (*labels, "kind"), registry=self.registry)
        self.resident_bytes = Gauge("prune_variant_resident_bytes", "Bytes of tensors the variant's compact "
                                    "network holds in memory", labels, registry=self.registry)
        self.checkpoint_bytes = Gauge("prune_variant_checkpoint_bytes", "Size of the variant's checkpoint file",
                                      labels, registry=self.registry)
        self.startup_latency = Gauge("prune_variant_startup_latency_seconds",
                                     "Median forward latency measured at start-up", (*labels, "batch"),
                                     registry=self.registry)
        self.request_latency = Histogram("prune_request_latency_seconds", "POST /predict latency",
                                         ("variant", "status"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("prune_requests", "POST /predict requests", ("variant", "status"),
                                registry=self.registry)
        self.images = Counter("prune_images", "Images classified", ("variant",), registry=self.registry)
        self.batch_size = Histogram("prune_batch_size_images", "Images per forward pass (micro-batching)",
                                    ("variant",), buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("prune_queue_depth_images", "Images waiting for a forward pass", ("variant",),
                                 registry=self.registry)
        self._window: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def describe_variants(self, registry: Registry) -> None:
        for v in registry.variants:
            labels = (v.name, f"{v.keep:g}", v.granularity)
            self.accuracy.labels(*labels).set(v.test_acc_mean)
            self.accuracy_drop.labels(*labels).set(v.drop)
            self.checkpoint_bytes.labels(*labels).set(v.bytes)
            self.resident_bytes.labels(*labels).set(v.net.nbytes())
            for kind, count in v.params.items():
                self.parameters.labels(*labels, kind).set(count)
            for batch, stats in v.latency.items():
                self.startup_latency.labels(*labels, str(batch)).set(stats["p50_ms"] / 1e3)
            self.queue_depth.labels(v.name).set(0)

    def observe_request(self, variant: str, status: int, seconds: float, images: int = 0) -> None:
        self.request_latency.labels(variant, str(status)).observe(seconds)
        self.requests.labels(variant, str(status)).inc()
        if status == 200:
            self.images.labels(variant).inc(images)
            with self._lock:
                self._window.setdefault(variant, deque(maxlen=WINDOW)).append(seconds)

    def live_latency(self, variant: str) -> dict[str, float | int | None]:
        with self._lock:
            values = list(self._window.get(variant, ()))
        if not values:
            return {"requests": 0, "p50_ms": None, "p95_ms": None}
        return {"requests": len(values), "p50_ms": percentile(values, 50) * 1e3,
                "p95_ms": percentile(values, 95) * 1e3}

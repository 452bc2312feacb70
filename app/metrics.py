"""Prometheus metrics and a live latency window for the JSON view.

One worker: a private registry per app (tests and apps never collide), plus the process collector.
Several workers (`prune-serve --workers N` sets PROMETHEUS_MULTIPROC_DIR for all of them before
prometheus_client is imported): every worker writes its values to that directory and a scrape,
whichever worker answers it, sums them (prometheus-client's multiprocess mode). Counters and
histograms are summed over workers and stay monotonic when a worker exits; queue depth is summed
over live workers; figures that are the same in every worker (accuracy, sizes) are read once;
figures that are per worker (start-up latency, resident memory) carry a ``pid`` label.
"""

from __future__ import annotations

import os
import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import multiprocess as prometheus_multiprocess

from app.registry import Registry, Variant, percentile, resident_memory_bytes

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WINDOW = 2048  # recent requests per variant kept for the JSON view's live percentiles
VARIANT_LABELS = ("variant", "keep", "granularity")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry()
        if not self.multiprocess:
            ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        labels = VARIANT_LABELS

        def gauge(name: str, doc: str, labelnames: tuple[str, ...], mode: str) -> Gauge:
            return Gauge(name, doc, labelnames, registry=self.registry, multiprocess_mode=mode)

        # The same in every worker (from the manifest and the files): one value, whichever worker wrote it.
        self.accuracy = gauge("prune_variant_test_accuracy_percent",
                              "Test accuracy measured by training (mean over seeds)", labels, "max")
        self.accuracy_drop = gauge("prune_variant_accuracy_drop_points", "Accuracy points lost vs dense", labels, "max")
        self.parameters = gauge("prune_variant_parameters", "Parameter counts (kind: total, prunable, nonzero)",
                                (*labels, "kind"), "max")
        self.resident_bytes = gauge("prune_variant_resident_bytes", "Bytes of tensors the variant's compact "
                                    "network holds in memory", labels, "max")
        self.checkpoint_bytes = gauge("prune_variant_checkpoint_bytes", "Size of the variant's checkpoint file",
                                      labels, "max")
        # Per worker: each measures or loads its own (a pid label in multiprocess mode).
        self.startup_latency = gauge("prune_variant_startup_latency_seconds",
                                     "Median forward latency from the execution plan or measured at start-up",
                                     (*labels, "batch"), "liveall")
        self.worker_resident = gauge("prune_worker_resident_memory_bytes",
                                     "Resident memory of the worker (updated at each scrape it answers)", (), "liveall")
        self.request_latency = Histogram("prune_request_latency_seconds", "POST /predict latency",
                                         ("variant", "status"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("prune_requests", "POST /predict requests", ("variant", "status"),
                                registry=self.registry)
        self.images = Counter("prune_images", "Images classified", ("variant",), registry=self.registry)
        self.batch_size = Histogram("prune_batch_size_images", "Images per forward pass (micro-batching)",
                                    ("variant",), buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = gauge("prune_queue_depth_images", "Images waiting for or in a forward pass "
                                 "(summed over live workers)", ("variant",), "livesum")
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
            self.queue_depth.labels(v.name).set(0)

    def describe_latency(self, v: Variant) -> None:
        labels = (v.name, f"{v.keep:g}", v.granularity)
        self.resident_bytes.labels(*labels).set(v.net.nbytes())  # sparse structures or an ONNX graph may be added
        for batch, stats in v.latency.items():
            self.startup_latency.labels(*labels, str(batch)).set(stats["p50_ms"] / 1e3)

    def observe_request(self, variant: str, status: int, seconds: float, images: int = 0) -> None:
        self.request_latency.labels(variant, str(status)).observe(seconds)
        self.requests.labels(variant, str(status)).inc()
        if status == 200:
            self.images.labels(variant).inc(images)
            with self._lock:
                self._window.setdefault(variant, deque(maxlen=WINDOW)).append(seconds)

    def exposition_registry(self) -> CollectorRegistry:
        """What a scrape reads: this app's registry, or every worker's values summed."""
        rss = resident_memory_bytes()
        if rss is not None:
            self.worker_resident.set(rss)
        if not self.multiprocess:
            return self.registry
        merged = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(merged)
        return merged

    def worker_stopped(self) -> None:
        """Drop this worker's live gauges (queue depth, latency, memory) from the shared view."""
        if self.multiprocess:
            prometheus_multiprocess.mark_process_dead(os.getpid())

    def live_latency(self, variant: str) -> dict[str, float | int | None]:
        with self._lock:
            values = list(self._window.get(variant, ()))
        if not values:
            return {"requests": 0, "p50_ms": None, "p95_ms": None}
        return {"requests": len(values), "p50_ms": percentile(values, 50) * 1e3,
                "p95_ms": percentile(values, 95) * 1e3}

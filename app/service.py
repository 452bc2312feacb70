"""The running service's state (one per app): settings, loaded variants, batchers, metrics."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import HTTPException, Request
from torch import Tensor

from app.batching import MicroBatcher
from app.metrics import Metrics
from app.registry import Registry, Variant
from app.settings import Settings
from training.data import normalize


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.models_dir, settings.inference_precision(), settings.latency_probe_runs,
                                 settings.onnx_runtime)
        self.metrics = Metrics()
        # One inference thread: torch's intra-op threads already use every core we are given.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.batchers: dict[str, MicroBatcher] = {}
        self._loading: asyncio.Task | None = None

    async def start(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        loop = asyncio.get_running_loop()
        # Load in the inference thread so /health answers while checkpoints are verified and timed.
        self._loading = loop.create_task(self._load(loop))

    async def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        await loop.run_in_executor(self.executor, self.registry.load)
        if self.registry.ready:
            self.metrics.describe_variants(self.registry)

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self.executor.shutdown(wait=True)

    def batcher(self, variant: Variant) -> MicroBatcher:
        if variant.name not in self.batchers:
            gauge = self.metrics.queue_depth.labels(variant.name)
            histogram = self.metrics.batch_size.labels(variant.name)
            self.batchers[variant.name] = MicroBatcher(
                run=lambda images, v=variant: self.registry.forward(v, images),
                executor=self.executor, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
                queue_size=self.settings.queue_size, on_batch=histogram.observe,
            )
            gauge.set_function(lambda b=self.batchers[variant.name]: b.pending_images)
        return self.batchers[variant.name]

    async def predict(self, variant: Variant, images_uint8: Tensor) -> Tensor:
        images = normalize(images_uint8, self.registry.mean, self.registry.std)
        return await self.batcher(variant).submit(images)


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_ready_service(request: Request) -> Service:
    service = get_service(request)
    if not service.registry.ready:
        reason = service.registry.error or "models are still loading"
        raise HTTPException(503, detail=f"service not ready: {reason}", headers={"Retry-After": "5"})
    return service

"""Dynamic micro-batching that never makes a request wait for company.

Each variant has a queue and one collector task. When the variant is idle, the collector dispatches
the first request at once, together with whatever is already queued (up to MAX_BATCH images):
requests are only batched when they arrived while the previous forward pass was running, as in
Triton's dynamic batcher with no queue delay. MAX_WAIT_MS > 0 brings back a batching window (wait
that long for more requests before dispatching). A batch's tensor work (joining the requests'
images, the forward pass) runs in the worker thread, never on the event loop, and each request
gets its own rows (views of the output). The queue is bounded in images: past
QUEUE_SIZE a request is refused at once (503) instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger("app.batching")


class QueueFull(Exception):
    """The variant's queue holds QUEUE_SIZE images already."""


class ShuttingDown(Exception):
    """The service stopped before this request's batch could run."""


@dataclass
class _Job:
    images: Tensor
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, run: Callable[[Tensor], Tensor], executor: Executor, max_batch: int,
                 max_wait_ms: float, queue_size: int,
                 on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending_images = 0
        self._task: asyncio.Task | None = None
        self._closed = False
        self._held: list[_Job] = []  # taken from the queue by the collector, not yet answered

    def _set_depth(self, delta: int) -> None:
        self.pending_images += delta
        if self._on_depth is not None:
            self._on_depth(self.pending_images)

    def start(self) -> None:
        if self._task is not None and self._task.done():
            # The collector died (a bug, not a bad request): say so, fail nobody silently, start anew.
            if not self._task.cancelled() and self._task.exception() is not None:
                log.error("batch collector died (%r); restarting it", self._task.exception())
            self._task = None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect())
            self._task.add_done_callback(self._collector_ended)

    def _collector_ended(self, task: asyncio.Task) -> None:
        """A collector that ends for any reason fails the requests still queued, so none waits forever."""
        reason = ShuttingDown("the service is shutting down") if task.cancelled() or self._closed else \
            RuntimeError(f"batch collector failed: {task.exception()!r}")
        held, self._held = self._held, []
        for job in held:
            if not job.future.done():
                job.future.set_exception(reason)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(reason)
        self._set_depth(-self.pending_images)  # nothing is queued or running for this collector any more

    async def stop(self, grace_s: float = 2.0) -> None:
        """Refuse new requests, give queued ones up to ``grace_s`` to finish, then fail the rest."""
        self._closed = True
        if self._task is None:
            return
        deadline = time.monotonic() + grace_s
        while self.pending_images and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - its waiters were told in _collector_ended
            pass
        self._task = None

    def admit(self, images: int) -> None:
        """Raise QueueFull (or ShuttingDown) if ``images`` more could not be queued now. Cheap: routes
        call it before reading and decoding a request's images."""
        if self._closed:
            raise ShuttingDown("the service is shutting down")
        if self.pending_images + images > self.queue_size:
            raise QueueFull(f"{self.pending_images} images already queued (QUEUE_SIZE={self.queue_size})")

    async def submit(self, images: Tensor) -> Tensor:
        """Probabilities for ``images`` [N, 3, 32, 32]; raises QueueFull when the queue is full."""
        self.admit(len(images))
        self.start()
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._set_depth(len(images))
        self._queue.put_nowait(job)
        try:
            return await asyncio.shield(job.future)  # a client that goes away never cancels the batch
        finally:
            if not job.future.done():  # cancelled caller: the batch still runs, the result is dropped
                job.future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        carried: _Job | None = None
        while True:
            first = carried or await self._queue.get()
            carried = None
            jobs, count = [first], len(first.images)
            self._held = jobs
            deadline = loop.time() + self.max_wait
            while count < self.max_batch:
                if not self._queue.empty():
                    job = self._queue.get_nowait()  # arrived while the last batch ran: batch it
                elif self.max_wait > 0 and loop.time() < deadline:
                    try:
                        job = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                else:
                    break  # idle and nothing waiting: dispatch now
                if count + len(job.images) > self.max_batch:
                    carried = job  # does not fit: it leads the next batch
                    self._held = [*jobs, job]
                    break
                jobs.append(job)
                count += len(job.images)
            await self._run_jobs(jobs, count)
            self._held = [carried] if carried else []

    async def _run_jobs(self, jobs: list[_Job], count: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            probs, sizes = await loop.run_in_executor(self._executor, self._execute, [job.images for job in jobs])
            if self._on_batch is not None:
                for size in sizes:
                    self._on_batch(size)
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(probs[start:start + len(job.images)])
                start += len(job.images)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about a failed batch
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            # Also on cancellation (shutdown): the waiters of a cancelled batch are failed by
            # _collector_ended, which sees them in _held.
            self._set_depth(-count)

    def _execute(self, parts: list[Tensor]) -> tuple[Tensor, list[int]]:
        """Runs in the executor: every tensor operation of a batch, the concatenation included; returns
        the probabilities and the size of each forward pass (at most MAX_BATCH images). A
        large tensor op on the event loop would start a second OpenMP thread team, and with more
        OpenMP threads than cores libgomp stops spinning between parallel regions, which slowed every
        forward pass of the process (channel-keep0.25, batch 64: 16.1 → 26.4 ms; docs/engine.md)."""
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        chunks = batch.split(self.max_batch)
        outputs = [self._run(chunk) for chunk in chunks]
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), [len(chunk) for chunk in chunks]

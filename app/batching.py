"""Dynamic micro-batching: concurrent requests for one variant share a forward pass.

Each variant has a queue and one collector task. The collector takes the first waiting request,
then keeps gathering until MAX_BATCH images are in hand or MAX_WAIT_MS has passed, runs one forward
pass in a worker thread (never on the event loop), and hands every request its own rows. The queue
is bounded in images: past QUEUE_SIZE a request is refused at once (503) instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor


class QueueFull(Exception):
    """The variant's queue holds QUEUE_SIZE images already."""


@dataclass
class _Job:
    images: Tensor
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, run: Callable[[Tensor], Tensor], executor: ThreadPoolExecutor, max_batch: int,
                 max_wait_ms: float, queue_size: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending_images = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Finish what is queued, then stop the collector (graceful shutdown)."""
        if self._task is None:
            return
        while self.pending_images:
            await asyncio.sleep(0.005)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def submit(self, images: Tensor) -> Tensor:
        """Probabilities for ``images`` [N, 3, 32, 32]; raises QueueFull when the queue is full."""
        if self.pending_images + len(images) > self.queue_size:
            raise QueueFull(f"{self.pending_images} images already queued (QUEUE_SIZE={self.queue_size})")
        self.start()
        job = _Job(images, asyncio.get_running_loop().create_future())
        self.pending_images += len(images)
        await self._queue.put(job)
        try:
            return await asyncio.shield(job.future)  # a client that goes away never cancels the batch
        finally:
            if not job.future.done():  # cancelled caller: the batch still runs, the result is dropped
                job.future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            count = len(jobs[0].images)
            deadline = loop.time() + self.max_wait
            while count < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    job = self._queue.get_nowait() if self._queue.qsize() else \
                        await asyncio.wait_for(self._queue.get(), max(timeout, 0))
                except TimeoutError:
                    break
                if count + len(job.images) > self.max_batch:
                    await self._run_jobs(jobs, count)  # the batch is full: run it, start the next with job
                    jobs, count = [job], len(job.images)
                    deadline = loop.time() + self.max_wait
                    continue
                jobs.append(job)
                count += len(job.images)
            await self._run_jobs(jobs, count)

    async def _run_jobs(self, jobs: list[_Job], count: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            batch = torch.cat([job.images for job in jobs])
            chunks = [batch[i:i + self.max_batch] for i in range(0, len(batch), self.max_batch)]
            outputs = [await loop.run_in_executor(self._executor, self._run, chunk) for chunk in chunks]
            probs = torch.cat(outputs)
            if self._on_batch is not None:
                for chunk in chunks:
                    self._on_batch(len(chunk))
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
            self.pending_images -= count

"""The running service's state (one per app and worker): settings, loaded variants, batchers, metrics.

Start-up is two steps. Loading (checkpoints verified, compact networks built: seconds) makes the
service ready, every variant on its compact dense path. Then, in the background, each variant gets
its execution paths and latency figures, one at a time and each switch atomic: from a plan in
models/plans/ or the plan cache that matches this machine, else by calibrating here. A plan measured
here is written to the cache, so the next start, and every other worker, reuse it; while one worker
calibrates (it holds the plan's lock) the others serve on dense paths and wait for its plan.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TypeVar

import torch
from fastapi import HTTPException, Request
from torch import Tensor

from app.batching import MicroBatcher
from app.metrics import Metrics
from app.registry import Interrupted, Registry, Variant
from app.settings import Settings
from core.hardware import retain_freed_memory
from core.preprocess import normalize
from engine import plan as plans

log = logging.getLogger("app.service")
T = TypeVar("T")
PLAN_POLL_S = 0.5  # how often a worker waiting for another's calibration looks for its plan


# Above this MAX_BATCH one activation of a pass can outgrow the largest mmap threshold glibc accepts (32 MiB:
# block1's output is 16 MiB at 64 images in float32), and only large_buffers keeps it out of a fresh mmap.
LARGE_BUFFERS_ABOVE_BATCH = 64


def configure_process(settings: Settings, precision: str) -> dict:
    """Threads and allocator as the service runs, set before any model is loaded (so every buffer is
    served the same way); returns the execution-plan key they imply. ``prune-serve --check`` shares it."""
    torch.set_num_threads(settings.threads())
    retained = settings.retain_freed_memory and retain_freed_memory(
        large_buffers=settings.max_batch > LARGE_BUFFERS_ABOVE_BATCH)
    if settings.retain_freed_memory and not retained:
        log.info("freed memory goes back to the OS (no glibc mallopt here, or MALLOC_* / GLIBC_TUNABLES set)")
    return plans.plan_key(precision, torch.get_num_threads(), memory_retained=retained)


def freeze_long_lived_objects() -> None:
    """Move every object alive now (torch, the app, the loaded networks: ~260,000 with models/) out of
    the cyclic garbage collector's view. Each full collection used to walk them all, stalling the event
    loop and the inference thread for up to 136 ms every few seconds under load: that was the latency
    tail (channel-keep0.25 at 1 view, 4 clients × 64 images: p50 27 ms, p99 136 ms; frozen, p99 50 ms).
    Frozen objects are still freed by reference counting; only cycles among them would be kept, and
    start-up objects live as long as the process."""
    gc.collect()
    gc.freeze()


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.models_dir, settings.inference_precision(), settings.latency_probe_runs,
                                 settings.onnx_runtime)
        self.metrics = Metrics()
        # One inference thread: torch's intra-op threads already use every core this worker is given.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.batchers: dict[tuple[str, int], MicroBatcher] = {}  # (variant name, TTA level) → its batcher
        # loading → dense → checking plan → applying plan | calibrating | waiting for plan → done
        self.execution = "loading"
        self.plan_source: str | None = None
        self.plan_key: dict = {}
        self._loading: asyncio.Task | None = None
        self.plot_cache: tuple[str, bytes] | None = None  # (the figures it shows, the PNG)
        self.onnx_files: dict[str, tuple[bytes, bytes]] = {}  # variant → its ONNX export (plain, gzip), made once

    async def start(self) -> None:
        self._hear_exit_signals()
        self.plan_key = configure_process(self.settings, self.registry.precision)
        # Load in the inference thread so /health answers (and signals are heard) meanwhile.
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.registry.load_models)
        if not self.registry.ready:
            self.execution = "failed"
            return
        self.metrics.describe_variants(self.registry)
        freeze_long_lived_objects()
        self.execution = "dense"
        try:
            await self._optimise(loop)
        except Interrupted:
            return
        except Exception:  # noqa: BLE001 - serving goes on, on the dense paths
            log.exception("execution plan step failed; variants without figures stay on their dense paths")
        freeze_long_lived_objects()
        self.execution = "done"

    async def _optimise(self, loop: asyncio.AbstractEventLoop) -> None:
        directories, cache = self.settings.plan_directories(), self.settings.plan_cache()

        async def fitting_plan() -> tuple[dict, Path] | None:  # a plan that holds here (Registry.check_plan)
            return await loop.run_in_executor(self.executor, self.registry.fitting_plan, directories, self.plan_key)

        self.execution = "checking plan"
        found = await fitting_plan()
        lock = None
        if found is None and cache is not None:
            lock = plans.CalibrationLock(cache / plans.plan_filename(self.plan_key))
            try:
                while not lock.acquire():  # another worker is calibrating: serve dense, wait for its plan
                    self.execution = "waiting for plan"
                    await asyncio.sleep(PLAN_POLL_S)
                    found = await fitting_plan()
                    if found is not None:
                        break
                else:
                    found = await fitting_plan()  # it may have appeared meanwhile
            except OSError as exc:
                log.warning("plan cache %s unusable (%s): calibrating without sharing", cache, exc)
                lock = None
        plan, path = found if found else (None, None)
        self.plan_source = str(path) if path else None
        self.execution = "applying plan" if plan else "calibrating"
        log.info("execution plan: %s", path or f"none for {self.plan_key}; calibrating here")
        measured = False
        try:
            for variant in self.registry.variants:
                if self.registry.stopping.is_set():
                    raise Interrupted("shutting down")
                entry = plans.entry_for(plan, variant.name, variant.sha256)
                measured |= await loop.run_in_executor(self.executor, self.registry.optimise, variant, entry,
                                                       str(path or ""))
                self.metrics.describe_latency(variant)
            if measured and cache is not None:
                self._store_plan(cache / plans.plan_filename(self.plan_key), plan)
        finally:
            if lock is not None:
                lock.release()

    def _store_plan(self, path: Path, previous: dict | None) -> None:
        new = plans.new_plan(self.plan_key, f"prune-serve (pid {os.getpid()}, measured at start-up)",
                             rounds=1, tta=self.registry.tta)
        if previous:
            new["variants"].update(previous.get("variants", {}))
        for variant in self.registry.variants:
            new["variants"][variant.name] = self.registry.plan_entry(variant)
        try:
            plans.write(path, new)
        except OSError as exc:
            log.warning("could not write the execution plan to %s: %s", path, exc)
            return
        # This process's figures are now the plan's, which every other worker reads: say so alike.
        self.plan_source = str(path)
        for variant in self.registry.variants:
            variant.latency_source = f"plan: {path}"
        log.info("execution plan written to %s", path)

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    def _hear_exit_signals(self) -> None:
        """Stop loading and calibration as soon as SIGTERM/SIGINT arrives. uvicorn first waits up to the
        grace period for accepted requests and only then runs the shutdown that calls ``stop``; a
        calibration still holding the inference thread meanwhile made those requests miss the grace
        period (500s on a busy machine). Chains to uvicorn's handler, which it restores at exit."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (a TestClient runs the app in another)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue  # no graceful handler to chain to: the default action ends the process anyway

            def heard(signum: int, frame: FrameType | None, previous: Callable = previous) -> None:
                self.registry.stopping.set()
                previous(signum, frame)

            signal.signal(sig, heard)

    async def stop(self) -> None:
        """Stop loading and calibration at their next step, let accepted requests finish within the
        grace period, and release the inference thread without waiting for it."""
        self.registry.stopping.set()
        grace = self.settings.shutdown_grace_s
        await asyncio.gather(*(batcher.stop(grace) for batcher in self.batchers.values()))
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.worker_stopped()

    async def in_inference_thread(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in the inference thread. Tensor work belongs there and nowhere else: a
        second thread that runs a parallel torch op starts a second OpenMP team, after which libgomp
        (more threads than cores) stops spinning between parallel regions and every forward pass of
        the process slows down (MicroBatcher._execute has the figures)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def queued_images(self, variant: str | None = None) -> int:
        """Images waiting or running in any batcher (they share the inference thread), or in those of the
        variant named ``variant`` (one per TTA level requested)."""
        return sum(batcher.pending_images for (name, _), batcher in self.batchers.items()
                   if variant is None or name == variant)

    def batcher(self, variant: Variant, tta: int | None = None) -> MicroBatcher:
        """The micro-batcher of ``variant`` at TTA level ``tta`` (None: the served one); requests are
        batched only with requests for the same network and level."""
        key = (variant.name, self.registry.level(tta))
        if key not in self.batchers:
            depth = self.metrics.queue_depth.labels(variant.name)  # the variant's batchers together
            self.batchers[key] = MicroBatcher(
                run=lambda images, v=variant, level=key[1]: self.registry.forward(v, self._normalize(images), level),
                executor=self.executor, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
                queue_size=self.settings.queue_size, on_batch=self.metrics.batch_size.labels(variant.name).observe,
                on_depth=lambda _, name=variant.name, depth=depth: depth.set(self.queued_images(name)),
            )
        return self.batchers[key]

    async def predict(self, variant: Variant, images_uint8: Tensor, tta: int | None = None) -> Tensor:
        """Probabilities for uint8 [N, 3, 32, 32] at TTA level ``tta`` (None: the served one); normalised
        in the inference thread with the rest of the batch's tensor work (see MicroBatcher._execute: no
        tensor math on the event loop)."""
        return await self.batcher(variant, tta).submit(images_uint8)

    def _normalize(self, images_uint8: Tensor) -> Tensor:
        return normalize(images_uint8, self.registry.mean, self.registry.std)


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_ready_service(request: Request) -> Service:
    service = get_service(request)
    if not service.registry.ready:
        reason = service.registry.error or "models are still loading"
        raise HTTPException(503, detail=f"service not ready: {reason}", headers={"Retry-After": "5"})
    return service

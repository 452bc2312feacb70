"""Device and precision chosen from the hardware, for training and serving alike.

The rules (each measured, see README "Hardware"):
  * CUDA when present: model and data on the GPU, bfloat16 autocast where the GPU supports it
    (Ampere and newer), else float16 with a gradient scaler.
  * CPU: bfloat16 only where the CPU computes it natively (AMX or AVX512-BF16). Elsewhere bf16 is
    emulated: a training step of the shipped network took 30 s under bf16 autocast against 1.75 s in
    float32 on an AVX2-only AMD EPYC, while an AVX512-BF16 EPYC ran it 2.5x faster than float32.

Every decision is a pure function of a ``Capabilities`` record, so tests inject any machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

DEVICES_HELP = "auto (CUDA if present, else CPU), cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers; ``detect()`` reads it, tests build it by hand."""

    cpu_model: str = "unknown CPU"
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    # The microarchitecture, from CPUID ("family 25 model 17") or the ARM part: virtual machines often
    # name every AMD CPU "AMD EPYC", and a Zen 4 and a Zen 5 EPYC then look alike by model name alone.
    cpu_id: str = ""
    cuda_devices: tuple[str, ...] = ()  # GPU names, index = CUDA ordinal
    cuda_bf16: tuple[bool, ...] = ()  # per GPU: bfloat16 supported (compute capability >= 8.0)

    @property
    def cpu_native_bf16(self) -> bool:
        return bool({"amx_bf16", "avx512_bf16"} & self.cpu_flags)


# /proc/cpuinfo fields that identify the microarchitecture: x86 (CPUID family and model), then ARM.
CPU_ID_FIELDS = (("cpu family", "family"), ("model", "model"), ("CPU implementer", "implementer"),
                 ("CPU part", "part"))


def _cpuinfo() -> tuple[str, frozenset[str], str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", frozenset(), ""
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str], str]:
    """Model name, flags and microarchitecture id ("family 25 model 17") of the first processor listed."""
    model, flags = None, None
    ids: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not key and (model or flags):
            break  # the first processor's entry speaks for all
        if key == "model name" and model is None:
            model = value
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
        else:
            ids.setdefault(key, value)
    cpu_id = " ".join(f"{label} {ids[field]}" for field, label in CPU_ID_FIELDS if ids.get(field))
    return model or platform.processor() or "unknown CPU", flags or frozenset(), cpu_id


@lru_cache
def detect() -> Capabilities:
    model, flags, cpu_id = _cpuinfo()
    names: list[str] = []
    bf16: list[bool] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            names.append(torch.cuda.get_device_name(index))
            bf16.append(torch.cuda.get_device_capability(index)[0] >= 8)
    return Capabilities(cpu_model=model, cpu_flags=flags, cpu_id=cpu_id, cuda_devices=tuple(names),
                        cuda_bf16=tuple(bf16))


def select_device(requested: str = "auto", caps: Capabilities | None = None) -> torch.device:
    """``auto`` → the first GPU if any, else the CPU; ``cuda[:N]`` must exist (ValueError otherwise)."""
    caps = caps or detect()
    requested = requested.strip().lower()
    if requested == "auto":
        return torch.device("cuda:0") if caps.cuda_devices else torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or requested.startswith("cuda:"):
        index = 0 if requested == "cuda" else requested.split(":", 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise ValueError(f"bad device {requested!r}; use {DEVICES_HELP}") from None
        if index >= len(caps.cuda_devices) or index < 0:
            found = len(caps.cuda_devices)
            raise ValueError(f"device {requested!r} asked for, but this machine has {found} CUDA device(s)")
        return torch.device(f"cuda:{index}")
    raise ValueError(f"bad device {requested!r}; use {DEVICES_HELP}")


def select_precision(requested: str, device: torch.device, caps: Capabilities | None = None) -> str:
    """``auto`` → bf16 on a bf16-capable GPU, fp16 on an older GPU, bf16 on a CPU with native bf16 units,
    else fp32. An explicit choice is honoured, except fp16 on a CPU (no fast kernels there): refused."""
    caps = caps or detect()
    if requested not in PRECISIONS:
        raise ValueError(f"bad precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if requested != "auto":
            return requested
        index = device.index or 0
        return "bf16" if index < len(caps.cuda_bf16) and caps.cuda_bf16[index] else "fp16"
    if requested == "fp16":
        raise ValueError("fp16 is for GPUs; on a CPU use fp32 or bf16 (auto picks the faster)")
    if requested != "auto":
        return requested
    return "bf16" if caps.cpu_native_bf16 else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device | str, precision: str) -> torch.autocast:
    """Autocast for ``precision`` on ``device`` (a no-op for fp32)."""
    device_type = torch.device(device).type
    dtype = autocast_dtype(precision)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# glibc mallopt parameters (malloc.h) and the values retain_freed_memory sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD_BYTES = 32 * 2**20  # the most glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 2**30
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def retain_freed_memory(large_buffers: bool = False) -> bool:
    """Make glibc keep freed activation buffers for reuse instead of handing them back to the OS.

    By default glibc serves a buffer above its (adaptive) mmap threshold with a fresh mmap and trims
    the heap top once 128 KiB of it is free, so every inference pass pays page faults to get its
    activations back: a batch-64 bf16 pass of the dense network took 8,128 minor faults and 34.7 ms,
    24.1 ms with no faults once both thresholds were raised (AMD EPYC, 2 threads). Whether a process
    lands in the slow state depended on what it had allocated before, so the same variant measured
    1.4x apart from one process to the next. Raises both thresholds (mmap only above 32 MiB, trim
    only above 1 GiB): the process then keeps its peak heap. Returns True if applied; False where
    the C library has no mallopt (not glibc) or the operator chose thresholds (MALLOC_ENV set).

    ``large_buffers`` (training) also serves buffers above 32 MiB from the heap (M_MMAP_MAX 0: no mmap
    at all), since no threshold reaches them: a batch-1024 training step of the 64/256/256 network
    allocates activations far above it (block1's output alone is 128 MiB in bf16) and took 1,878 ms
    with 515,317 page faults, 1,249 ms with 2,726 once they stayed in the heap (bf16, AMD EPYC, 2
    threads; docs/training.md). The heap then keeps the largest step's peak (2.0 → 2.3–2.7 GiB
    resident in that probe)."""
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                     TRIM_THRESHOLD_BYTES))
    return applied and (not large_buffers or bool(mallopt(M_MMAP_MAX, 0)))


def describe(device: torch.device, precision: str, caps: Capabilities | None = None) -> dict:
    """What the manifest records about where a run happened."""
    caps = caps or detect()
    info = {"device": str(device), "precision": precision, "cpu_model": caps.cpu_model, "cpu_id": caps.cpu_id,
            "cpu_native_bf16": caps.cpu_native_bf16, "torch_version": torch.__version__}
    if device.type == "cuda":
        info["gpu_model"] = caps.cuda_devices[device.index or 0]
    return info

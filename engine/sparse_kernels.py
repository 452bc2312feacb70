"""Direct sparse convolution: a compiled (numba) kernel that touches only the surviving weights.

Generic sparse kernels pay for an im2col copy (9× the input) before a CSR GEMM, which costs more
than the zeros save (see engine/compact.py). Direct sparse convolution (Park et al., "Faster CNNs
with direct sparse convolutions", 2017) needs no copy: for every nonzero weight W[o, c, kh, kw] it
adds W · (input channel c shifted by (kh, kw)) to output channel o. With the input laid out as
[C, H+2, W+2, N] (padded, batch innermost), each shifted row is one contiguous run of W·N floats,
so the inner loop is a plain vectorised multiply-add. Output channels run in parallel.

Work is nnz × N × H × W multiply-adds instead of out × in × 9 × N × H × W, so at 95% sparsity a
layer does ~1/20 of the arithmetic. numba is optional: without it the path is simply unavailable
and calibration never picks it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

AVAILABLE = numba is not None

if AVAILABLE:

    @njit(parallel=True, fastmath=False, nogil=True, cache=False)
    def _direct_conv(xpad: np.ndarray, indptr: np.ndarray, taps: np.ndarray, values: np.ndarray,
                     bias: np.ndarray, out: np.ndarray, channels_out: int, height: int, width: int, batch: int,
                     k: int) -> None:  # pragma: no cover - compiled
        # Flat arrays, explicit offsets: xpad is [C, H+k-1, W+k-1, N], out is [O, H, W, N].
        padded_h, padded_w = height + k - 1, width + k - 1
        row = width * batch
        plane = height * row
        for o in prange(channels_out):
            out_base = o * plane
            out[out_base:out_base + plane] = bias[o]
            for j in range(indptr[o], indptr[o + 1]):
                tap = taps[j]
                c = tap // (k * k)
                kh = (tap // k) % k
                kw = tap % k
                v = values[j]
                for h in range(height):
                    src = ((c * padded_h + h + kh) * padded_w + kw) * batch
                    dst = out_base + h * row
                    # Views with a range index: no negative-index wraparound, so LLVM vectorises.
                    target = out[dst:dst + row]
                    source = xpad[src:src + row]
                    for t in range(row):
                        target[t] += v * source[t]


class DirectSparseConv:
    """The surviving weights of one conv in CSR form (row = output channel), ready for the kernel."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        if not AVAILABLE:
            raise RuntimeError("numba is not installed: the direct sparse path is unavailable")
        self.out_channels, _, self.k, _ = weight.shape
        flat = weight.detach().float().flatten(1).cpu()
        nonzero = flat != 0
        self.indptr = np.concatenate([[0], np.cumsum(nonzero.sum(1).numpy())]).astype(np.int64)
        self.taps = nonzero.nonzero()[:, 1].numpy().astype(np.int32)  # c·k·k + kh·k + kw, row-major
        self.values = flat[nonzero].numpy().astype(np.float32)
        self.bias = bias.detach().float().cpu().numpy().astype(np.float32)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.indptr, self.taps, self.values, self.bias))

    def __call__(self, x: Tensor) -> Tensor:
        """[N, C, H, W] (any memory format, float32 or bfloat16) → [N, out, H, W], same dtype."""
        n, _, h, w = x.shape
        pad = self.k // 2
        # [C, H+2p, W+2p, N] contiguous: every shifted input row is one contiguous run.
        batch_innermost = x.permute(1, 2, 3, 0)
        if batch_innermost.is_contiguous():  # e.g. the previous layer ran this kernel: one padded copy
            xpad = F.pad(batch_innermost.float(), (0, 0, pad, pad, pad, pad))
        else:  # via NCHW: torch transposes channels-last to batch-innermost ~8x slower directly
            xpad = F.pad(x.float().contiguous(), (pad, pad, pad, pad)).permute(1, 2, 3, 0).contiguous()
        xpad = xpad.numpy().reshape(-1)
        out = np.empty(self.out_channels * h * w * n, dtype=np.float32)
        _direct_conv(xpad, self.indptr, self.taps, self.values, self.bias, out, self.out_channels, h, w, n, self.k)
        return torch.from_numpy(out).view(self.out_channels, h, w, n).permute(3, 0, 1, 2).to(x.dtype)


def set_threads(threads: int) -> None:
    """Use as many kernel threads as torch uses intra-op threads (both share the same cores), and leave
    torch's own count as it was: the first call launches numba's OpenMP threading layer, which sets the
    process-wide OpenMP thread count to every core, and torch reads that count. A service worker told
    to use 1 thread (TORCH_THREADS=1, or --workers 2 on 2 cores) ran on 2 after its first calibration,
    and `prune-bench plan --threads 1` measured with 2 (its plan matched the 2-thread one)."""
    if AVAILABLE:
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        torch.set_num_threads(torch_threads)

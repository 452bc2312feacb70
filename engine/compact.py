"""Compact execution: the network a pruned variant actually runs, smaller and faster than dense.

Zeroed weights inside dense tensors save nothing. ``compact(model)`` turns a folded, pruned
GatedNet into a CompactNet that does less work and computes the same function (to float rounding):

1. BatchNorm is folded into the conv before it (eval statistics). Where a max-pool sits between
   conv and BN it stays a per-channel affine after the pool (a max does not commute with a
   negative scale), which costs a quarter of the pixels.
2. Channels are physically dropped. A channel is
     unused    when no surviving weight reads it (the next layer's column, or the head's, is all
               zero): its filter, BN entry and readers go;
     constant  when no surviving weight produces it (its filter is all zero): its value is
               gelu(BN shift), a constant, whose effect on the next conv is precomputed as a
               per-pixel bias map (zero padding makes the borders differ) and on the head as a
               bias. Then it goes too.
   Weight-granularity pruning empties many channels at high sparsity; channel-granularity
   pruning (training/prune.py) empties them by design, so its variants run as narrower dense nets.
3. Per layer and batch size, the convolution runs dense (oneDNN on the compacted weight), as a
   CSR sparse GEMM over unfolded patches ("sparse"), or as a direct sparse convolution that only
   touches the surviving weights ("direct", engine/sparse_kernels.py), whichever ``calibrate``
   measured fastest. Sparse paths are only tried where the compacted weight is sparse enough to
   have a chance (``SPARSE_MAX_DENSITY``).
4. Per batch size, the whole network runs in PyTorch, all dense or with those per-layer paths (kept
   only where the whole network with them was measured faster), or, where onnxruntime is installed
   and was measured faster, as an ONNX graph of the compacted dense network in ONNX Runtime (built
   in memory; its outputs are checked against PyTorch's first).

The bias maps depend on the input size, so a CompactNet is built for one (32×32 by default).
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.model import GatedNet
from engine import sparse_kernels
from engine.sparse_kernels import DirectSparseConv

PATHS = ("dense", "sparse", "direct")
# From this many elements on, a 2×2 max-pool runs as the maximum of four strided views instead of
# max_pool2d, which also writes an int64 index per output: per 64-image batch at TTA 2 that saved
# 0-7 % with freed memory retained (as served) and 5-11 % with glibc's defaults (bf16, AMD EPYC, 2
# threads; docs/engine.md). Below it (batch 1, 8) the four extra operator calls cost more than they save.
POOL_SLICES_MIN_ELEMENTS = 1 << 19
# ONNX Runtime is tried up to this batch size. Its win is lower per-operator overhead (~1.9x dense
# PyTorch at batch 1 here); at batch 64 oneDNN is as fast, and without a per-session arena (see
# OnnxSession) ONNX Runtime re-allocates its large buffers every run: it won calibration at batch 64
# for some variants yet ran 0.84-0.89x dense PyTorch in prune-bench.
ONNX_MAX_BATCH = 8
BATCH_BUCKETS = (1, 8, 64)
# Test-time augmentation views run stacked in one forward pass while it stays within the largest
# calibrated batch (core.model.tta_logits ``rows_per_call``): 6 views of one image as one call of 6
# rows ran 1.9-3.4x faster than 6 calls of 1 (bf16, 2 cores; prune-bench speed --views), and no stacked
# call is larger (in memory, or beyond the batch sizes the paths were chosen for) than a batch-64
# request's per-view call (docs/engine.md).
VIEW_ROWS_PER_CALL = BATCH_BUCKETS[-1]
_EXPORT_LOCK = threading.Lock()
# Above this share of nonzero weights a CSR GEMM over unfolded patches never beat oneDNN's dense
# conv on the machines we measured (the unfold and layout copies cost more than the zeros save).
SPARSE_MAX_DENSITY = 0.3
# A path or backend must beat the default (dense, PyTorch) by this factor to be chosen: timings are
# noisy, and the default is the safe choice.
MARGIN = 0.9


def max_pool_2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)``, bit for bit (NaN included), by the faster route for this tensor's size.
    Exports (ONNX tracing) always get the MaxPool operator."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # checked first: shapes are traced values
        return F.max_pool2d(x, 2)
    h, w = x.shape[-2:]
    if x.numel() < POOL_SLICES_MIN_ELEMENTS or h % 2 or w % 2:
        return F.max_pool2d(x, 2)
    top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
    return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class CompactConv(nn.Module):
    """conv (+ bias map) [→ max-pool → affine] → GELU, on the channels that survived."""

    def __init__(self, weight: Tensor, bias: Tensor, bias_map: Tensor | None, pool: bool,
                 pool_scale: Tensor | None = None, pool_shift: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        self.register_buffer("bias_map", bias_map)
        self.pool = pool
        self.register_buffer("pool_scale", pool_scale.view(1, -1, 1, 1) if pool else None)
        self.register_buffer("pool_shift", pool_shift.view(1, -1, 1, 1) if pool else None)
        self.sparse_weight: Tensor | None = None  # CSR [out, in·k·k], kept only if a bucket chooses it
        self.direct: DirectSparseConv | None = None  # the same for the direct kernel
        self.paths: dict[int, str] = {}  # batch bucket → one of PATHS; unset buckets run dense

    @property
    def density(self) -> float:
        return float(torch.count_nonzero(self.weight)) / max(1, self.weight.numel())

    def conv(self, x: Tensor, path: str) -> Tensor:
        if path == "direct" and self.direct is not None:
            return self.direct(x)
        if path == "sparse" and self.sparse_weight is not None:
            n, _, h, w = x.shape
            patches = F.unfold(x, self.weight.shape[-1], padding=self.weight.shape[-1] // 2)  # [N, in·9, HW]
            patches = patches.transpose(0, 1).reshape(patches.shape[1], n * h * w)
            y = torch.sparse.mm(self.sparse_weight, patches)  # [out, N·HW]
            y = y.view(-1, n, h, w).transpose(0, 1) + self.bias.view(1, -1, 1, 1)
            return y.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)

    def forward(self, x: Tensor, path: str = "dense") -> Tensor:
        y = self.conv(x, path)
        if self.bias_map is not None:
            y = y + self.bias_map
        if self.pool:
            y = torch.addcmul(self.pool_shift, max_pool_2x2(y), self.pool_scale)
        return F.gelu(y)

    def enable_sparse(self) -> None:
        """Build the sparse paths' weight structures (the direct one only where numba is installed)."""
        if self.sparse_weight is None:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": measured, not assumed
                warnings.simplefilter("ignore", UserWarning)
                self.sparse_weight = self.weight.detach().flatten(1).to_sparse_csr()
        if self.direct is None and sparse_kernels.AVAILABLE:
            self.direct = DirectSparseConv(self.weight, self.bias)

    def available_paths(self) -> list[str]:
        return ["dense"] + ["sparse"] * (self.sparse_weight is not None) + ["direct"] * (self.direct is not None)

    def drop_unused_paths(self) -> None:
        used = set(self.paths.values())
        if "sparse" not in used:
            self.sparse_weight = None
        if "direct" not in used:
            self.direct = None


class CompactNet(nn.Module):
    """A pruned GatedNet with emptied channels removed and BN folded; same outputs as the masked net."""

    def __init__(self, convs: list[CompactConv], head_weight: Tensor, head_bias: Tensor, logit_scale: float,
                 input_hw: tuple[int, int], layer_names: list[str], dense_channels: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.head_weight = nn.Parameter(head_weight.contiguous(), requires_grad=False)
        self.head_bias = nn.Parameter(head_bias.contiguous(), requires_grad=False)
        self.logit_scale = logit_scale
        self.input_hw = input_hw
        self.layer_names = layer_names
        self.dense_channels = dense_channels  # output channels of each conv before compaction
        self.backends: dict[int, str] = {}  # batch bucket → "torch" | "onnxruntime"; unset: torch
        self.onnx_session: OnnxSession | None = None

    @staticmethod
    def bucket(batch: int) -> int:
        """The calibrated batch size nearest to ``batch`` on a log scale."""
        return min(BATCH_BUCKETS, key=lambda b: abs(math.log(max(batch, 1)) - math.log(b)))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(f"this compact network was built for {self.input_hw} inputs, got {tuple(x.shape[-2:])}")
        bucket = self.bucket(x.shape[0])
        if self.backends.get(bucket) == "onnxruntime" and self.onnx_session is not None:
            return self.onnx_session(x)
        return self.torch_forward(x, bucket)

    def torch_forward(self, x: Tensor, bucket: int | None = None) -> Tensor:
        """The PyTorch backend; ``bucket=None`` runs every layer dense (what the ONNX export traces)."""
        x = x.to(self.head_weight.dtype)
        for conv in self.convs:
            x = conv(x, "dense" if bucket is None else conv.paths.get(bucket, "dense"))
        x = torch.amax(x, dim=(2, 3))
        return F.linear(x, self.head_weight, self.head_bias) * self.logit_scale

    def describe(self) -> list[dict]:
        """Per layer: channels kept of the dense count, nonzero share of the compacted weight, paths."""
        return [{"layer": name, "channels": f"{conv.weight.shape[0]}/{dense}", "density": round(conv.density, 4),
                 "paths": {f"batch_{b}": conv.paths.get(b, "dense") for b in BATCH_BUCKETS}}
                for name, conv, dense in zip(self.layer_names, self.convs, self.dense_channels)]

    def macs(self) -> int:
        """Multiply-adds per image on the dense path of the compacted shapes (what runs before any
        sparse path is chosen): the service's speed estimate until latency is measured."""
        total, (h, w) = 0, self.input_hw
        for conv in self.convs:
            total += conv.weight.numel() * h * w
            if conv.pool:
                h, w = h // 2, w // 2
        return total + self.head_weight.numel()

    def path_summary(self) -> str:
        """Per bucket: 'ORT' (ONNX Runtime) or one letter per layer: D dense, S CSR GEMM, X direct sparse,
        e.g. 'b1: ORT | b8: DDDDXXX | b64: DDDDDDX'."""
        letters = {"dense": "D", "sparse": "S", "direct": "X"}
        return " | ".join(f"b{b}: " + ("ORT" if self.backends.get(b) == "onnxruntime" else
                                       "".join(letters[c.paths.get(b, "dense")] for c in self.convs))
                          for b in BATCH_BUCKETS)

    def reset_paths(self) -> None:
        """Back to plain dense PyTorch everywhere (and free the sparse and ONNX structures)."""
        self.backends, self.onnx_session = {}, None
        for conv in self.convs:
            conv.paths = {}
            conv.drop_unused_paths()

    def backend_summary(self) -> dict[str, str]:
        return {f"batch_{b}": self.backends.get(b, "torch") for b in BATCH_BUCKETS}

    def nbytes(self) -> int:
        """Bytes of tensors this network holds (weights, bias maps, sparse copies)."""
        total = sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])
        for conv in self.convs:
            if conv.sparse_weight is not None:
                sw = conv.sparse_weight
                total += sum(t.numel() * t.element_size() for t in (sw.values(), sw.crow_indices(), sw.col_indices()))
            if conv.direct is not None:
                total += conv.direct.nbytes()
        if self.onnx_session is not None:
            total += self.onnx_session.nbytes
        return total


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as y = x·scale + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


@torch.no_grad()
def compact(model: GatedNet, input_hw: tuple[int, int] = (32, 32)) -> CompactNet:
    """Build the compact network of a (folded or masked) pruned model in eval mode. Exact in float64
    algebra; in float32 it matches the masked model to rounding (tests check 1e-4)."""
    if model.training:
        raise ValueError("compact() needs a model in eval mode (BN running statistics)")
    chain = model.conv_chain()
    weights = [layer.effective_weight().detach().float() for _, layer, _, _ in chain]
    head_w = model.head.effective_weight().detach().float()
    head_b = model.head.bias.detach().float().clone()
    affine = [_bn_affine(bn) for _, _, bn, _ in chain]
    n = len(chain)

    # Which channels produce nothing (zero filter) and which nobody reads (backward from the head).
    constant = [w.flatten(1).eq(0).all(1) for w in weights]
    unused: list[Tensor] = [torch.zeros(0, dtype=torch.bool)] * n
    reader_rows = torch.ones(head_w.shape[0], dtype=torch.bool)
    reader = head_w
    for i in reversed(range(n)):
        read = reader[reader_rows]
        unused[i] = read.flatten(2).abs().sum(dim=(0, 2)).eq(0) if read.dim() == 4 else read.abs().sum(0).eq(0)
        reader_rows, reader = ~unused[i], weights[i]
    kept = [~u & ~c for u, c in zip(unused, constant)]
    for k in kept:  # never leave a layer empty: one computed channel is always exact
        if not k.any():
            k[0] = True
    folded_into_next = [c & ~u & ~k for c, u, k in zip(constant, unused, kept)]

    convs: list[CompactConv] = []
    hw = input_hw
    kept_in = torch.ones(weights[0].shape[1], dtype=torch.bool)
    for i, (_, _, _, pool) in enumerate(chain):
        w = weights[i]
        scale, shift = affine[i]
        bias_map = None
        if i > 0 and folded_into_next[i - 1].any():
            # Constant input channels: their value everywhere, zero padding around, through this conv.
            prev_shift = affine[i - 1][1]
            value = F.gelu(prev_shift) * folded_into_next[i - 1]
            planes = value.view(1, -1, 1, 1).expand(1, w.shape[1], *hw)
            bias_map = F.conv2d(planes, w, padding=w.shape[-1] // 2)[0][kept[i]]
        w = w[kept[i]][:, kept_in]
        if pool:  # conv → pool → BN: the affine must wait until after the max
            convs.append(CompactConv(w, torch.zeros(w.shape[0]), bias_map, True,
                                     scale[kept[i]], shift[kept[i]]))
            hw = (hw[0] // 2, hw[1] // 2)
        else:
            s = scale[kept[i]]
            convs.append(CompactConv(w * s.view(-1, 1, 1, 1), shift[kept[i]],
                                     None if bias_map is None else bias_map * s.view(-1, 1, 1), False))
        kept_in = kept[i]
    last_shift = affine[-1][1]
    head_b += head_w[:, folded_into_next[-1]] @ F.gelu(last_shift[folded_into_next[-1]])
    net = CompactNet(convs, head_w[:, kept[-1]], head_b, model.config.logit_scale, input_hw,
                     [name for name, _, _, _ in chain], [w.shape[0] for w in weights])
    return net.eval().to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime backend
# ---------------------------------------------------------------------------------------------
class _DenseGraph(nn.Module):
    """What is exported: the compact network with every layer on its dense path, in float32."""

    def __init__(self, net: CompactNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.torch_forward(x)


ONNX_OPSET = 17  # pinned: the files prune-export writes must load the same way everywhere


def onnx_bytes(module: nn.Module, example: Tensor) -> bytes:
    """``module`` as an ONNX model (float32, input "x" [batch, 3, H, W] with a dynamic batch, output "logits")."""
    buffer = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():  # the exporter keeps global state: one export at a time
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET)
    return buffer.getvalue()


def dense_graph(net: CompactNet) -> nn.Module:
    """The compact network with every layer dense, as a float32 copy without the sparse structures
    (a CSR tensor cannot be deep-copied; the graph is the dense one anyway)."""
    memo = {id(part): None for conv in net.convs for part in (conv.sparse_weight, conv.direct)}
    memo[id(net.onnx_session)] = None
    return _DenseGraph(copy.deepcopy(net, memo).float().eval())


class OnnxSession:
    """A float32 module exported in memory to ONNX and run by ONNX Runtime's CPU provider. Its outputs
    are checked against the module's on ``example`` (1e-4) before it is used.

    ``shared=True`` (the service: one session per variant, sharing the process) turns off two
    defaults that cost the rest of the process; ``shared=False`` keeps ONNX Runtime's defaults, its
    best case on an otherwise idle machine (prune-bench's baseline)."""

    def __init__(self, module: nn.Module, example: Tensor, threads: int, shared: bool = True) -> None:
        import onnxruntime as ort

        model = onnx_bytes(module, example)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if shared:
            # An arena per session would keep each one's peak activations (batch 64) resident for
            # good (measured: +630 MiB for 11 variants). Without it, buffers are returned after each run.
            options.enable_cpu_mem_arena = False
            # No busy-waiting between runs: worker threads otherwise keep spinning after a run and take
            # a core from PyTorch and the HTTP server (measured: dense-kernel variants fell to 0.89x
            # while a spinning session shared the machine, 1.00-1.03x without).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.nbytes = len(model)
        with torch.inference_mode():
            expected = module(example)
        got = self(example)
        if not torch.allclose(got, expected, atol=1e-4, rtol=0):
            raise RuntimeError(f"ONNX Runtime differs from PyTorch by {(got - expected).abs().max():.2e}")

    @classmethod
    def of_compact(cls, net: CompactNet, threads: int) -> OnnxSession:
        """The compact network, every layer dense, in ONNX Runtime."""
        return cls(dense_graph(net), torch.randn(2, 3, *net.input_hw), threads)

    def __call__(self, x: Tensor) -> Tensor:
        array = x.float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"x": array})[0])


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Choosing dense or sparse per layer and batch size
# ---------------------------------------------------------------------------------------------
def choose_path(timings: dict[str, float], default: str = "dense", margin: float = MARGIN) -> str:
    """``default`` unless the fastest alternative was measured faster by the margin (missing or failed
    timings lose). Used for per-layer paths and for the whole network's backend."""
    alternatives = {name: seconds for name, seconds in timings.items() if name != default}
    if not alternatives:
        return default
    best = min(alternatives, key=alternatives.__getitem__)
    return best if alternatives[best] < timings.get(default, math.inf) * margin else default


Timer = Callable[[dict[str, Callable[[], object]]], dict[str, float]]


def interleaved_medians(candidates: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    """Seconds per call of each candidate: the median over ``rounds`` rounds that each run every
    candidate once, in an order rotated every round. Interleaving puts drift (another process, clock
    speed, a cache another candidate warmed) on every candidate alike, which timing one candidate's
    rounds and then the next's does not; at ~1 ms per call that drift once flipped a choice."""
    names = list(candidates)
    for name in names:
        candidates[name]()  # warm-up: oneDNN primitive cache, allocator
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            began = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.inference_mode()
def calibrate(net: CompactNet, buckets: Iterable[int] = BATCH_BUCKETS, timer: Timer = interleaved_medians,
              max_density: float = SPARSE_MAX_DENSITY, onnx: bool = True,
              sparse: bool = True) -> dict[str, dict[int, dict[str, float]]]:
    """Measure each layer's candidate paths at each batch bucket and set ``paths``, then confirm them
    on the whole network and choose its backend per bucket, and set ``backends``. Returns the timings
    (layer or "network" → bucket → path or backend → seconds). ``timer`` times a set of candidates
    together (see interleaved_medians) and is injectable so tests need no clock.

    A layer's sparse path that won alone must also win in the network: per bucket, the network with
    the layers' choices ("torch_sparse") is timed against the all-dense network ("torch") and, up to
    ONNX_MAX_BATCH, ONNX Runtime; if "torch_sparse" does not win by MARGIN, that bucket's layers go
    back to dense. (A layer timed alone sees warm caches and no neighbours; in the network two CSR
    layers that had each won once ran the network at 0.61x dense.)

    Only float32 networks get the sparse paths and the ONNX Runtime backend (both compute in
    float32): a bfloat16 network mixing them per batch size would give a batch of 8 and a batch of
    1 answers that differ by bfloat16 rounding. ``sparse=False`` or ``onnx=False`` turn them off."""
    buckets = tuple(buckets)
    float32 = net.head_weight.dtype == torch.float32
    # With sparse paths off, no layer qualifies: every layer is reset to dense without measuring.
    report = _calibrate_layers(net, buckets, timer, max_density if sparse and float32 else -math.inf)
    net.backends = {}
    net.onnx_session = None
    if onnx and float32 and onnxruntime_available():
        try:
            net.onnx_session = OnnxSession.of_compact(net, torch.get_num_threads())
        except Exception as exc:  # noqa: BLE001 - any export or runtime failure: PyTorch stays the backend
            warnings.warn(f"ONNX Runtime backend unavailable for this network: {exc}", stacklevel=2)
    report["network"] = {}
    for batch in buckets:
        x = torch.randn(batch, 3, *net.input_hw).contiguous(memory_format=torch.channels_last)
        candidates = {"torch": lambda x=x: net.torch_forward(x)}  # every layer dense
        if any(conv.paths.get(batch, "dense") != "dense" for conv in net.convs):
            candidates["torch_sparse"] = lambda x=x, b=batch: net.torch_forward(x, b)
        if net.onnx_session is not None and batch <= ONNX_MAX_BATCH:
            candidates["onnxruntime"] = lambda x=x: net.onnx_session(x)
        if len(candidates) == 1:
            continue  # nothing to choose between
        timings = timer(candidates)
        report["network"][batch] = timings
        chosen = choose_path(timings, default="torch")
        if chosen != "torch_sparse":
            for conv in net.convs:
                conv.paths.pop(batch, None)
        if chosen == "onnxruntime":
            net.backends[batch] = "onnxruntime"
    for conv in net.convs:
        conv.drop_unused_paths()  # do not keep copies nobody uses
    if "onnxruntime" not in net.backends.values():
        net.onnx_session = None  # not used: do not keep the graph
    return report


def _calibrate_layers(net: CompactNet, buckets: tuple[int, ...], timer: Timer,
                      max_density: float) -> dict[str, dict[int, dict[str, float]]]:
    report: dict[str, dict[int, dict[str, float]]] = {}
    sparse_kernels.set_threads(torch.get_num_threads())
    hw = net.input_hw
    dtype = net.head_weight.dtype
    for name, conv in zip(net.layer_names, net.convs):
        in_hw = hw
        hw = (hw[0] // 2, hw[1] // 2) if conv.pool else hw
        conv.paths = {}
        report[name] = {}
        if conv.density > max_density:
            continue  # dense without measuring (see SPARSE_MAX_DENSITY)
        conv.enable_sparse()
        for batch in buckets:
            x = torch.randn(batch, conv.weight.shape[1], *in_hw, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            runnable = {}
            for path in conv.available_paths():
                try:
                    conv.conv(x, path)
                except (RuntimeError, TypeError):  # e.g. no sparse kernel for this dtype: path unavailable
                    continue
                runnable[path] = lambda c=conv, x=x, p=path: c.conv(x, p)
            report[name][batch] = timings = timer(runnable)
            chosen = choose_path(timings)
            if chosen != "dense":
                conv.paths[batch] = chosen
    return report

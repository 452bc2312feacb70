"""Compact execution (engine/compact.py) computes what the masked dense model computes, on less work."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
from torch import nn

from core import checkpoint
from core.model import GatedNet
from engine import compact as compact_module
from engine.compact import (
    BATCH_BUCKETS,
    POOL_SLICES_MIN_ELEMENTS,
    CompactNet,
    calibrate,
    choose_path,
    compact,
    interleaved_medians,
    max_pool_2x2,
)
from tests.conftest import tiny_model
from tests.live import ROOT
from training.prune import (
    channel_counts,
    channel_importance,
    channel_masks,
    channel_ranking_scores,
    channel_widths,
    prune,
    prune_channels,
    round_to_multiple,
    taylor_channel_importance,
)

TOL = 1e-4


def _with_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so folding and the constants are really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(c, generator=generator))  # negative scales too: pool order matters
                module.bias.copy_(torch.randn(c, generator=generator))
    return model.eval()


def _all_paths(net: CompactNet, path: str) -> None:
    for conv in net.convs:
        if path != "dense":
            conv.enable_sparse()
            assert path in conv.available_paths()
        conv.paths = {b: path for b in BATCH_BUCKETS}


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.2, 0.05, 0.01])
@pytest.mark.parametrize("path", ["dense", "sparse", "direct"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_weight_variants_equal_the_masked_model(keep: float, path: str, batch: int) -> None:
    model = _with_bn_statistics(tiny_model(3))
    if keep < 1.0:
        prune(model, "gate", keep)
    x = torch.randn(batch, 3, 32, 32)
    expected = model(x)
    net = compact(model)
    _all_paths(net, path)
    assert torch.allclose(net(x), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.25])
def test_channel_variants_keep_exactly_k_channels_and_equal_the_masked_model(keep: float) -> None:
    model = _with_bn_statistics(tiny_model(4), seed=1)
    prune_channels(model, keep)
    net = compact(model)
    # exactly K channels per conv survive, and the compact net is physically that narrow
    expected_widths = [channel_counts(w, keep) for w in net.dense_channels]
    assert [conv.weight.shape[0] for conv in net.convs] == expected_widths
    assert [conv.weight.shape[1] for conv in net.convs[1:]] == expected_widths[:-1]
    assert net.head_weight.shape[1] == expected_widths[-1]
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(net(x), model(x), atol=TOL, rtol=0)


def test_stage_scales_move_channels_from_the_large_feature_maps_to_the_small() -> None:
    """channel_widths: all 1 is the even cut; the stem goes with block1 (same 32×32 input); a scaled keep
    is capped at every channel; and the masks keep exactly those widths."""
    model = GatedNet()  # 32 / 64, 64 / 256, 256 / 256, 256
    assert channel_widths(model, 0.625) == {name: channel_counts(conv.out_channels, 0.625)
                                            for name, conv, _, _ in model.conv_chain()}
    late = channel_widths(model, 0.625, (0.8, 0.8, 1.2))
    assert list(late.values()) == [16, 32, 32, 128, 128, 192, 192]
    assert list(channel_widths(model, 0.75, (0.5, 1.0, 2.0)).values()) == [16, 24, 24, 192, 192, 256, 256]
    assert list(channel_widths(model, 0.75, (0.5, 1.0, 2.0), multiple=1).values()) == [12, 24, 24, 192, 192, 256, 256]
    # Scaled widths land on multiples of 8 (ties up, at least 8); 1 is exact; the even cut is never rounded.
    assert list(channel_widths(model, 0.5, (0.8, 0.8, 1.2)).values()) == [16, 24, 24, 104, 104, 152, 152]
    assert list(channel_widths(model, 0.5, (0.8, 0.8, 1.2), multiple=1).values()) == [13, 26, 26, 102, 102, 154, 154]
    assert list(channel_widths(model, 0.25, (0.8, 0.8, 1.2)).values()) == [8, 16, 16, 48, 48, 80, 80]
    assert list(channel_widths(model, 0.625, multiple=8).values())[0] == 20  # round(0.625 × 32), as before
    assert round_to_multiple(20, 8, 256) == 24 and round_to_multiple(2, 8, 256) == 8 and round_to_multiple(2, 8, 4) == 4
    with pytest.raises(ValueError, match="multiple of 1 or more"):
        round_to_multiple(20, 0, 256)
    masks = channel_masks(model, 0.625, counts=late)
    assert [int(masks[name].flatten(1).any(1).sum()) for name in late] == list(late.values())
    for bad in [(1.0, 1.0), (0.0, 1.0, 1.0), (1.0, -1.0, 2.0)]:
        with pytest.raises(ValueError, match="stage scales"):
            channel_widths(model, 0.5, bad)


def test_channel_masks_remove_producer_and_readers() -> None:
    model = tiny_model(5)
    masks = channel_masks(model, 0.5)
    chain = model.conv_chain()
    for (name, _, _, _), (reader, _, _, _) in zip(chain, chain[1:]):
        alive_rows = masks[name].flatten(1).any(1)
        alive_reads = masks[reader].transpose(0, 1).flatten(1).any(1)
        assert torch.equal(alive_rows, alive_reads)
        assert int(alive_rows.sum()) == channel_counts(len(alive_rows), 0.5)


def test_taylor_ranking_scores_an_unread_channel_zero_and_prunes_it_first() -> None:
    model = tiny_model(5)
    with torch.no_grad():
        model.block2.conv1.weight[:, 3].zero_()  # nobody reads channel 3 of block1.conv2
    torch.manual_seed(0)
    images, labels = torch.randn(24, 3, 32, 32), torch.randint(0, 3, (24,))
    before, mode = [p.requires_grad for p in model.parameters()], model.training
    scores = taylor_channel_importance(model, images, labels, batch_size=10)
    assert scores["block1.conv2"][3] == 0 and (scores["block1.conv2"][torch.arange(8) != 3] > 0).all()
    assert set(scores) == {name for name, _, _, _ in model.conv_chain()}
    assert [p.requires_grad for p in model.parameters()] == before and model.training == mode
    assert all(p.grad is None for p in model.parameters())
    masks = channel_masks(model, 0.5, scores)
    assert not masks["block1.conv2"][3].any() and not masks["block2.conv1"][:, 3].any()
    # The ranking decides: the same masks come back for the same scores, other masks for other scores.
    assert all(torch.equal(m, channel_masks(model, 0.5, scores)[k]) for k, m in masks.items())
    flipped = {k: -v for k, v in scores.items()}
    assert masks["block1.conv2"][3].any() != channel_masks(model, 0.5, flipped)["block1.conv2"][3].any()
    # The flag's names: 'taylor' is this ranking, 'mass' the default one; anything else is refused.
    by_flag = channel_ranking_scores(model, "taylor", images, labels)
    assert all(torch.allclose(by_flag[k], scores[k], rtol=1e-4, atol=0) for k in scores)
    mass = channel_ranking_scores(model, "mass", images, labels)
    assert all(torch.equal(mass[k], v) for k, v in channel_importance(model).items())
    with pytest.raises(ValueError, match="unknown channel ranking"):
        channel_ranking_scores(model, "l1", images, labels)


def test_emptied_filter_becomes_a_constant_and_unread_channel_is_dropped() -> None:
    """A zero filter (constant channel, folded into the next layer's bias map) and a channel nobody
    reads are both removed; the output does not change, borders included."""
    model = _with_bn_statistics(tiny_model(6), seed=2)
    with torch.no_grad():
        model.block1.conv2.weight[3].zero_()  # channel 3 of block1.conv2 produces a constant
        model.block2.conv1.weight[:, 5].zero_()  # channel 5 of block1.conv2 is never read
        model.block3.conv2.weight[2].zero_()  # a constant into the head: becomes head bias
    model.fold()
    net = compact(model)
    assert net.convs[2].weight.shape[0] == 8 - 2
    assert net.convs[2].weight.shape[0] == net.convs[3].weight.shape[1]
    assert net.convs[3].bias_map is not None
    assert net.convs[6].weight.shape[0] == 16 - 1
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(net(x), model(x), atol=TOL, rtol=0)


def test_a_fully_emptied_layer_still_runs() -> None:
    model = _with_bn_statistics(tiny_model(7), seed=3)
    with torch.no_grad():
        model.block2.conv2.weight.zero_()  # every channel constant: the rest sees only constants
    model.fold()
    net = compact(model)
    assert min(conv.weight.shape[0] for conv in net.convs) >= 1
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), model(x), atol=TOL, rtol=0)


def test_direct_kernel_equals_conv2d_for_any_layout_and_dtype() -> None:
    from engine.sparse_kernels import DirectSparseConv

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=generator) * (torch.rand(6, 5, 3, 3, generator=generator) < 0.2)
    weight[2] = 0  # an empty row: the output is the bias
    bias = torch.randn(6, generator=generator)
    kernel = DirectSparseConv(weight, bias)
    for batch in (1, 2, 7):
        x = torch.randn(batch, 5, 6, 4, generator=generator)  # non-square on purpose
        expected = torch.nn.functional.conv2d(x, weight, bias, padding=1)
        assert torch.allclose(kernel(x), expected, atol=1e-5)
        assert torch.allclose(kernel(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
        batch_innermost = x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # what the kernel returns
        assert torch.allclose(kernel(batch_innermost), expected, atol=1e-5)
        assert kernel(x.bfloat16()).dtype == torch.bfloat16
    assert kernel.values.size == int(torch.count_nonzero(weight))


def test_the_sparse_kernels_leave_torchs_thread_count_alone() -> None:
    # numba's OpenMP layer, launched by the first set_threads, sets the process-wide OpenMP count to every
    # core (NUMBA_NUM_THREADS): a worker told to use 1 thread ran on 2. Once per process, so in a fresh one.
    pytest.importorskip("numba")
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from engine.compact import calibrate, compact\n"
            "from tests.conftest import tiny_model\n"
            "from training.prune import prune\n"
            "model = tiny_model(); prune(model, 'gate', 0.1); net = compact(model)\n"
            "calibrate(net, onnx=False)\n"
            "print(torch.get_num_threads())\n")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


def test_mixed_paths_per_layer_equal_the_masked_model() -> None:
    model = _with_bn_statistics(tiny_model(12), seed=4)
    prune(model, "gate_magnitude", 0.1)
    net = compact(model)
    for i, conv in enumerate(net.convs):
        conv.enable_sparse()
        conv.paths = {b: ("dense", "sparse", "direct")[(i + b) % 3] for b in BATCH_BUCKETS}
    for batch in (1, 5, 30):
        x = torch.randn(batch, 3, 32, 32)
        assert torch.allclose(net(x), model(x), atol=TOL, rtol=0)


def test_compact_round_trips_through_a_checkpoint(tmp_path) -> None:
    model = _with_bn_statistics(tiny_model(8))
    prune(model, "gate_magnitude", 0.1)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    _, sha = checkpoint.save_pruned(model, tmp_path / "v.safetensors")
    loaded = checkpoint.load_model(tmp_path / "v.safetensors", sha)
    assert torch.allclose(compact(loaded)(x), expected, atol=TOL, rtol=0)


def test_compact_rejects_training_mode_and_other_input_sizes() -> None:
    model = tiny_model(0)
    with pytest.raises(ValueError, match="eval mode"):
        compact(model.train())
    net = compact(model.eval())
    with pytest.raises(ValueError, match="built for"):
        net(torch.randn(1, 3, 16, 16))


def test_compact_is_smaller_when_channels_go() -> None:
    model = tiny_model(9)
    dense_bytes = compact(model).nbytes()
    prune_channels(model, 0.5)
    assert compact(model).nbytes() < 0.5 * dense_bytes


# -- the dense/sparse decision, with injected timings -----------------------------------------------
def test_choose_path_prefers_dense_unless_a_sparse_path_clearly_wins() -> None:
    assert choose_path({"dense": 1.0, "sparse": 0.5}) == "sparse"
    assert choose_path({"dense": 1.0, "sparse": 0.5, "direct": 0.3}) == "direct"
    assert choose_path({"dense": 1.0, "sparse": 0.95, "direct": 0.97}) == "dense"  # within the noise margin
    assert choose_path({"dense": 1.0, "sparse": 2.0}) == "dense"
    assert choose_path({"dense": 1.0}) == "dense"  # sparse paths failed to run or are unavailable
    assert choose_path({}) == "dense"


def _scripted_timer(layer_timings: list[dict[str, float]], network: dict[str, float] | list[dict[str, float]]):
    """A timer without a clock: every candidate really runs once, the layers' timings come from
    ``layer_timings`` in call order (cycled), the whole network's from ``network`` (one table, or one
    per call)."""
    layer_calls = itertools.cycle(layer_timings)
    network_calls = itertools.cycle([network] if isinstance(network, dict) else network)

    def timer(candidates: dict) -> dict[str, float]:
        for fn in candidates.values():
            fn()
        table = next(network_calls) if "torch" in candidates else next(layer_calls)
        return {name: table[name] for name in candidates}
    return timer


def test_interleaved_medians_rotate_the_order_and_take_each_candidates_median(monkeypatch) -> None:
    clock, order = [0.0], []

    def candidate(name: str, cost: float):
        def run() -> None:
            order.append(name)
            clock[0] += cost
        return run

    monkeypatch.setattr(compact_module.time, "perf_counter", lambda: clock[0])
    timings = interleaved_medians({"a": candidate("a", 3.0), "b": candidate("b", 1.0), "c": candidate("c", 2.0)},
                                  rounds=4)
    assert timings == {"a": 3.0, "b": 1.0, "c": 2.0}
    assert order == ["a", "b", "c",  # warm-up
                     "a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # each round starts one later


def test_calibrate_sets_paths_per_layer_and_batch_from_measured_timings() -> None:
    model = tiny_model(10)
    prune(model, "gate", 0.05)
    net = compact(model)
    # per bucket: direct wins at batch 1, CSR at batch 8, dense at batch 64; nothing is timed for real
    timings = {1: {"dense": 1.0, "sparse": 0.8, "direct": 0.5}, 8: {"dense": 1.0, "sparse": 0.6, "direct": 0.7},
               64: {"dense": 1.0, "sparse": 3.0, "direct": 1.2}}
    timer = _scripted_timer([timings[b] for b in BATCH_BUCKETS], {"torch": 1.0, "torch_sparse": 0.5})
    report = calibrate(net, timer=timer, max_density=1.0, onnx=False)
    for conv, name in zip(net.convs, net.layer_names):
        assert conv.paths == {1: "direct", 8: "sparse"}  # batch 64: dense
        assert {p: report[name][1][p] for p in timings[1]} == timings[1]
        assert conv.sparse_weight is not None and conv.direct is not None  # both are in use
    assert set(report["network"]) == {1, 8}  # batch 64 runs dense everywhere: nothing to confirm
    assert net.path_summary() == "b1: XXXXXXX | b8: SSSSSSS | b64: DDDDDDD"
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(net(x), model(x), atol=TOL, rtol=0)


def test_sparse_layers_that_do_not_speed_up_the_whole_network_go_back_to_dense() -> None:
    """Each layer's CSR path won alone, but the network with them is not faster by the margin at
    batch 1 (it is at batch 8): batch 1 runs dense, and only what batch 8 uses is kept."""
    model = tiny_model(12)
    prune(model, "gate", 0.05)
    net = compact(model)
    layers = {"dense": 1.0, "sparse": 0.5, "direct": 2.0}
    network = [{"torch": 1.0, "torch_sparse": 0.95}, {"torch": 1.0, "torch_sparse": 0.5}]  # batch 1, batch 8
    report = calibrate(net, buckets=(1, 8), timer=_scripted_timer([layers], network), max_density=1.0, onnx=False)
    assert report["network"][1] == network[0]
    assert net.path_summary() == "b1: DDDDDDD | b8: SSSSSSS | b64: DDDDDDD"
    assert all(conv.paths == {8: "sparse"} and conv.direct is None for conv in net.convs)
    rejected = compact(model)
    calibrate(rejected, buckets=(1, 8), timer=_scripted_timer([layers], network[0]), max_density=1.0, onnx=False)
    assert all(conv.paths == {} and conv.sparse_weight is None for conv in rejected.convs)  # nothing kept


def test_calibrate_skips_dense_layers_and_frees_unused_sparse_copies() -> None:
    net = compact(tiny_model(11))  # keep 1.0: nothing is sparse enough to try
    report = calibrate(net, timer=_scripted_timer([{}], {}), onnx=False)
    assert all(not timings for timings in report.values())
    assert all(conv.paths == {} and conv.sparse_weight is None and conv.direct is None for conv in net.convs)


def test_onnx_runtime_backend_is_chosen_per_batch_size_from_timings_and_matches() -> None:
    pytest.importorskip("onnxruntime")
    model = _with_bn_statistics(tiny_model(13), seed=5)
    prune_channels(model, 0.5)
    net = compact(model)
    # layers are not timed (max_density=0); the network: ORT wins at 1, loses at 8; batch 64 is not tried
    network = [{"torch": 2.0, "onnxruntime": 1.0}, {"torch": 1.0, "onnxruntime": 1.5}]
    report = calibrate(net, timer=_scripted_timer([{}], network), max_density=0.0)
    assert report["network"] == {1: network[0], 8: network[1]}
    assert net.backends == {1: "onnxruntime"}
    assert net.path_summary().startswith("b1: ORT | b8: DDDDDDD")
    assert net.backend_summary() == {"batch_1": "onnxruntime", "batch_8": "torch", "batch_64": "torch"}
    for batch in (1, 2, 9):  # buckets 1 and 8: both backends equal the masked model
        x = torch.randn(batch, 3, 32, 32)
        assert torch.allclose(net(x), model(x), atol=TOL, rtol=0)


def test_unused_onnx_session_is_dropped() -> None:
    pytest.importorskip("onnxruntime")
    net = compact(tiny_model(14))
    calibrate(net, timer=_scripted_timer([{}], {"torch": 1.0, "onnxruntime": 1.0}), max_density=0.0)  # a tie
    assert net.backends == {} and net.onnx_session is None


def test_bfloat16_networks_run_dense_in_torch_only() -> None:
    """Mixing float32 sparse paths or ONNX Runtime into a bfloat16 network would make a batch's answer
    depend on its size; calibrate keeps bfloat16 networks on one precision."""
    model = tiny_model(15)
    prune(model, "gate", 0.05)
    net = compact(model).to(torch.bfloat16)
    everything_else_wins = _scripted_timer([{"dense": 1.0, "sparse": 0.1, "direct": 0.1}],
                                           {"torch": 1.0, "torch_sparse": 0.1, "onnxruntime": 0.1})
    calibrate(net, timer=everything_else_wins, max_density=1.0)
    assert all(conv.paths == {} for conv in net.convs) and net.backends == {} and net.onnx_session is None


def test_bucket_is_nearest_on_a_log_scale() -> None:
    assert [CompactNet.bucket(n) for n in (1, 2, 3, 4, 8, 20, 23, 64, 500)] == [1, 1, 8, 8, 8, 8, 64, 64, 64]


def test_edge_export_is_verified_and_runs_in_onnx_runtime(tmp_path) -> None:
    """prune-export writes one verified ONNX file per variant; it runs alone and matches PyTorch."""
    import json

    ort = pytest.importorskip("onnxruntime")
    import onnx

    from engine.export import main as prune_export
    from tests.conftest import build_models_dir

    models = build_models_dir(tmp_path / "models")
    assert prune_export(["--models-dir", str(models), "--out", str(tmp_path / "onnx")]) == 0
    manifest = json.loads((models / "manifest.json").read_text())
    for entry in manifest["variants"]:
        path = tmp_path / "onnx" / f"{entry['name']}.onnx"
        model = onnx.load(path)
        assert model.opset_import[0].version == 17
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["classes"]) == manifest["classes"] and "mean" in meta["normalization"]
        x = torch.randn(3, 3, 32, 32)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        masked = checkpoint.load_model(models / entry["file"], entry["sha256"], root=models)
        with torch.inference_mode():
            assert torch.allclose(torch.from_numpy(got), masked(x), atol=TOL)
    channel = tmp_path / "onnx" / "channel-keep0.50.onnx"
    assert channel.stat().st_size < (tmp_path / "onnx" / "dense.onnx").stat().st_size  # narrower: smaller file


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 32, 32), (4, 64, 32, 32), (2, 64, 33, 32), (8, 128, 16, 16)])
def test_max_pool_2x2_equals_max_pool2d_on_both_routes(dtype: torch.dtype, shape: tuple) -> None:
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")  # NaN wins its window in both
    x[0, 1, 2:4, 2:4] = float("-inf")
    expected = torch.nn.functional.max_pool2d(x, 2)
    got = max_pool_2x2(x)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_large_batches_pool_by_slices_and_the_export_keeps_maxpool(monkeypatch) -> None:
    """The slices route is the one large batches take (max_pool2d is not called), and an ONNX trace of
    the same batch still records the MaxPool operator, not the views."""
    onnx = pytest.importorskip("onnx")
    model = _with_bn_statistics(tiny_model(6))
    net = compact(model)
    x = torch.randn(POOL_SLICES_MIN_ELEMENTS // (net.convs[1].weight.shape[0] * 32 * 32) + 1, 3, 32, 32)
    expected = net(x)
    called = []
    real = torch.nn.functional.max_pool2d
    monkeypatch.setattr(compact_module.F, "max_pool2d", lambda *a, **k: called.append(1) or real(*a, **k))
    assert torch.allclose(net(x), expected, atol=0, rtol=0)
    assert len(called) < sum(conv.pool for conv in net.convs)  # at least the first pool went by slices
    monkeypatch.undo()
    graph = onnx.load_from_string(compact_module.onnx_bytes(compact_module.dense_graph(net), x))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("MaxPool") == sum(conv.pool for conv in net.convs)


def test_cost_allocation_fits_the_uniform_budget_and_spends_it_where_scores_are_high() -> None:
    """channel_allocation: the conv chain's MACs fit uniform keep's, widths stay multiples of 8 and above
    the floor, a layer whose channels all matter keeps them, one whose channels never matter is cut to
    its floor, and channel_masks keeps exactly the allocated channels (the compact net is that wide)."""
    from core.model import GatedNet
    from training.prune import channel_allocation, conv_macs

    model = _with_bn_statistics(GatedNet())
    chain = model.conv_chain()
    dense = {name: conv.out_channels for name, conv, _, _ in chain}
    generator = torch.Generator().manual_seed(0)
    scores = {name: torch.rand(c, generator=generator) for name, c in dense.items()}
    scores["block3.conv2"] += 1e6  # every channel of the cheap 4×4 layer matters
    scores["block2.conv2"].zero_()  # none of this one does
    for keep in (0.75, 0.5):
        counts = channel_allocation(model, keep, scores)
        uniform = conv_macs(model, {name: channel_counts(c, keep) for name, c in dense.items()})
        assert conv_macs(model, counts) <= uniform
        assert all(c % 8 == 0 and c >= max(8, dense[name] // 4) for name, c in counts.items())
        assert counts["block3.conv2"] == 256 and counts["block2.conv2"] == 64
        masks = channel_masks(model, keep, scores, counts)
        pruned = copy.deepcopy(model)
        pruned.set_masks(masks)
        net = compact(pruned)
        assert [conv.weight.shape[0] for conv in net.convs] == list(counts.values())
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(net(x), pruned(x), atol=TOL, rtol=0)

"""Hardware-chosen device/precision (injected capabilities) and the pieces of the training recipe."""

from __future__ import annotations

import copy
import importlib.util
import statistics
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from core.hardware import Capabilities, describe, select_device, select_precision
from core.model import (
    TTA_LEVELS,
    GatedNet,
    NetConfig,
    hard_concrete_gate,
    hard_concrete_open,
    tta_logits,
    tta_logits_by_level,
)
from tests.conftest import tiny_model
from training.prune import check_keep
from training.train import (
    END_LAYERS,
    FEATURE_BLOCKS,
    PHASE2_SCHEDULES,
    BlockOutputs,
    L0Budget,
    Phase2Checkpoint,
    PruneConfig,
    Teacher,
    TrainConfig,
    _kept_share,
    _lr_factor,
    _phase2_lr_factor,
    _sgd,
    accuracy,
    accuracy_by_level,
    average_states,
    enter_hard_concrete,
    feature_loss,
    leave_hard_concrete,
    mix_batch,
    predict_logits,
    predict_logits_by_level,
    prepare,
    prune_finetune,
    sampled_train_masks,
    train,
    translate_batch,
    whiten_stem,
)

AVX2_ONLY = Capabilities(cpu_model="AMD EPYC 7B13", cpu_flags=frozenset({"avx2", "fma"}))
AVX512_BF16 = Capabilities(cpu_model="AMD EPYC 9B45", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX = Capabilities(cpu_model="Intel Xeon 8481C", cpu_flags=frozenset({"avx512f", "amx_bf16", "amx_tile"}))
H100 = Capabilities(cpu_model="x", cuda_devices=("NVIDIA H100",), cuda_bf16=(True,))
T4_AND_H100 = Capabilities(cpu_model="x", cuda_devices=("Tesla T4", "NVIDIA H100"), cuda_bf16=(False, True))


@pytest.mark.parametrize(("caps", "expected"), [(AVX2_ONLY, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16")])
def test_cpu_auto_precision_is_bf16_only_with_native_units(caps: Capabilities, expected: str) -> None:
    device = select_device("auto", caps)
    assert device.type == "cpu"
    assert select_precision("auto", device, caps) == expected
    assert select_precision("fp32", device, caps) == "fp32"  # explicit choices are honoured
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        select_precision("fp16", device, caps)


def test_cuda_is_chosen_when_present_with_bf16_or_fp16_by_capability() -> None:
    assert select_device("auto", H100) == torch.device("cuda:0")
    assert select_precision("auto", torch.device("cuda:0"), H100) == "bf16"
    assert select_precision("auto", torch.device("cuda:0"), T4_AND_H100) == "fp16"
    assert select_precision("auto", torch.device("cuda:1"), T4_AND_H100) == "bf16"
    assert select_device("cuda:1", T4_AND_H100) == torch.device("cuda:1")
    assert select_device("cpu", H100) == torch.device("cpu")
    info = describe(torch.device("cuda:1"), "bf16", T4_AND_H100)
    assert info["gpu_model"] == "NVIDIA H100" and info["precision"] == "bf16" and info["torch_version"]


@pytest.mark.parametrize("bad", ["cuda", "cuda:3", "tpu", "cuda:x"])
def test_unavailable_or_malformed_devices_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        select_device(bad, AVX2_ONLY if bad == "cuda" else T4_AND_H100)


def test_translate_batch_crops_each_image_at_its_own_offset() -> None:
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = translate_batch(images, torch.tensor([[2, 2], [3, 1]]), pad=2)
    assert torch.equal(out[0], images[0])  # offset (pad, pad) = no shift
    assert torch.equal(out[1, 0, 1:, :5], images[1, 0, :5, 1:])  # dx = +1, dy = -1


def test_whitening_stem_decorrelates_patches() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    base = torch.randn(64, 3, 34, 34)
    images = (base[:, :, 1:33, 1:33] + base[:, :, :32, :32]) / 2  # neighbouring pixels correlate
    whiten_stem(model, images)
    weight = model.stem.weight
    pairs = weight.shape[0] // 2
    assert torch.allclose(weight[:pairs], -weight[pairs:2 * pairs])
    response = torch.nn.functional.conv2d(images, weight[:pairs]).transpose(0, 1).flatten(1)
    cov = torch.cov(response)
    assert torch.allclose(cov.diagonal(), torch.ones(pairs), atol=0.15)  # unit variance ...
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.15  # ... and decorrelated


def test_whitening_samples_the_whole_data_set_not_its_first_class(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stored class by class (ImageFolder order): the first images are one flat-ish class, the rest noise.
    monkeypatch.setattr("training.train.WHITEN_IMAGES", 40)
    torch.manual_seed(0)
    flat = 0.05 * torch.randn(40, 3, 32, 32) + torch.randn(40, 3, 1, 1)
    images = torch.cat([flat, torch.randn(160, 3, 32, 32)])
    model = GatedNet(NetConfig(widths=(4, 4, 8), stem_width=54))  # every eigen-direction of 3x3x3 patches
    prepare(model, TrainConfig(), images, seed=0)
    pairs = model.stem.weight.shape[0] // 2
    response = torch.nn.functional.conv2d(images, model.stem.weight[:pairs]).transpose(0, 1).flatten(1)
    # Whitened on a sample of the whole set, every filter's response has about unit variance on it; on
    # the first 40 images alone the flat class's low-variance directions are amplified (max 276 here).
    assert response.var(dim=1).max() < 3


def test_schedules() -> None:
    cfg = TrainConfig()
    assert _lr_factor(0, 100, cfg) == pytest.approx(cfg.lr_start)
    assert _lr_factor(23, 100, cfg) == pytest.approx(1.0)
    assert _lr_factor(100, 100, cfg) == pytest.approx(cfg.lr_end)
    assert _kept_share(0, 100, 0.1, 1.0) == pytest.approx(1.0)
    assert _kept_share(100, 100, 0.1, 1.0) == pytest.approx(0.1)
    assert 0.1 < _kept_share(50, 100, 0.1, 1.0) < 0.25  # cubic: most of the pruning happens early
    assert _kept_share(0, 100, 0.05, 1.0, start=0.1) == pytest.approx(0.1)  # chained: from the start keep
    assert _kept_share(100, 100, 0.05, 1.0, start=0.1) == pytest.approx(0.05)


def test_phase1_with_frozen_gates_leaves_scores_and_trains_weights() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    before = {n: layer.weight.detach().clone() for n, layer in model.gated_layers()}
    scores = {n: layer.score.detach().clone() for n, layer in model.gated_layers()}
    images, labels = torch.randn(48, 3, 32, 32), torch.randint(0, 3, (48,))
    history = train(model, images, labels, TrainConfig(epochs=1, batch_size=8), seed=0)
    assert len(history) == 1 and history[0]["loss"] > 0
    assert all(torch.equal(layer.score, scores[n]) for n, layer in model.gated_layers())
    assert not torch.equal(model.block2.conv2.weight, before["block2.conv2"])


@pytest.mark.parametrize("pcfg", [PruneConfig(steps=6, gradual=True, gate_lr=0.05),
                                  PruneConfig(steps=6, gradual=True, gate_lr=0.0),
                                  PruneConfig(steps=6, gradual=True, gate_lr=0.05, criterion="lamp"),
                                  PruneConfig(steps=10, gradual=True, gate_lr=0.05, lookahead=True),
                                  PruneConfig(steps=6, gradual=True, gate_lr=0.05, teacher_tta=1),
                                  PruneConfig(steps=6, gradual=True, gate_lr=0.05, gate_fn="hard_concrete"),
                                  PruneConfig(steps=6, gradual=False)])
def test_phase2_ends_at_exactly_k_weights_and_distills(pcfg: PruneConfig) -> None:
    torch.manual_seed(0)
    model, teacher = tiny_model(), tiny_model()
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    scores = {n: layer.score.detach().clone() for n, layer in model.gated_layers()}
    keep = check_keep(0.2)
    masks = prune_finetune(model, images, labels, keep, TrainConfig(batch_size=8), pcfg, seed=0, teacher=teacher)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(keep * total)
    for name, layer in model.gated_layers():
        assert not layer.effective_weight()[~masks[name]].any()  # pruned weights are exactly zero
    learned = any(not torch.equal(layer.score, scores[n]) for n, layer in model.gated_layers())
    assert learned == (pcfg.gradual and pcfg.gate_lr > 0)


def test_phase2_chained_prunes_only_among_the_survivors_of_the_first_stage() -> None:
    """bake_masks turns a pruned model into one that can be pruned further: the second stage's schedule
    starts at the first keep, ends at exactly the second keep's count, and never revives a weight."""
    from training.prune import bake_masks

    torch.manual_seed(0)
    model, teacher = tiny_model(), tiny_model()
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    cfg, pcfg = TrainConfig(batch_size=8), PruneConfig(steps=6, gate_lr=0.05)
    first = prune_finetune(model, images, labels, 0.4, cfg, pcfg, seed=0, teacher=teacher)
    bake_masks(model)
    for name, layer in model.gated_layers():
        assert layer.mask is None and not layer.weight[~first[name]].any()
    second = prune_finetune(model, images, labels, 0.2, cfg, pcfg, seed=0, teacher=teacher, start_keep=0.4)
    total = sum(m.numel() for m in second.values())
    assert sum(int(m.sum()) for m in second.values()) == round(0.2 * total)
    for name, layer in model.gated_layers():
        assert not (second[name] & ~first[name]).any()  # survivors of the second are survivors of the first
        assert not layer.effective_weight()[~second[name]].any()


def test_phase2_lookahead_averages_the_fine_tuned_weights() -> None:
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    finals = []
    for lookahead in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=10, gate_lr=0.05, lookahead=lookahead), seed=0)
        finals.append(model.block2.conv2.effective_weight().detach())
    # Same data, seed and masks schedule: only the averaging differs, and it changes the result.
    assert finals[0].shape == finals[1].shape and not torch.equal(finals[0], finals[1])


def test_phase2_learns_bn_weights_only_when_asked_and_without_decay() -> None:
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    for learned in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        before = model.block2.bn2.weight.detach().clone()
        prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=6, bn_weights=learned), seed=0)
        assert torch.equal(model.block2.bn2.weight.detach(), before) != learned  # frozen unless asked
    model = tiny_model()
    bn_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for decay_scale in (1.0, 0.0):
        groups = _sgd(model, TrainConfig(), 0.25, decay_scale).param_groups
        for group in groups:
            if {id(p) for p in group["params"]} <= bn_weights:
                assert group["weight_decay"] == 0.0  # a gain of 1 is not pulled towards 0
            else:
                assert (group["weight_decay"] > 0) == (decay_scale > 0)


def test_phase2_distills_from_the_teachers_tta_logits() -> None:
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    torch.manual_seed(1)
    teacher = tiny_model().eval()
    finals, views = [], []
    for level in (0, 1):
        torch.manual_seed(0)
        model = tiny_model()
        calls = []
        handle = teacher.register_forward_hook(lambda module, args, out, calls=calls: calls.append(args[0].shape[0]))
        prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=4, distill=1.0, teacher_tta=level), seed=0, teacher=teacher)
        handle.remove()
        finals.append(model.block2.conv2.effective_weight().detach())
        views.append(len(calls))
    # prune_finetune distils from a copy of the teacher: the hook travels with it. Level 1 runs the teacher
    # on each batch and its mirror, and the averaged targets change what the student learns.
    assert views == [4, 8]
    assert not torch.equal(finals[0], finals[1])


def test_feature_term_is_zero_for_the_teacher_itself_and_changes_the_fine_tune() -> None:
    """The block-output term: 0 when student and teacher agree, positive when they differ; a run with it
    ends elsewhere than one without, still at exactly K weights, with no hooks left on either network."""
    torch.manual_seed(1)
    teacher = tiny_model().eval()
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    shared = Teacher(teacher)
    own = BlockOutputs(teacher)
    teacher(images[:8])
    assert len(own.outputs) == len(FEATURE_BLOCKS)
    assert feature_loss(own.take(), shared.features(images[:8])).item() == 0.0
    own.remove()
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.block1.conv1.weight.mul_(0.5)
    hooks = BlockOutputs(other)
    other(images[:8])
    assert feature_loss(hooks.take(), shared.features(images[:8])).item() > 0
    hooks.remove()
    finals = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = tiny_model()
        masks = prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                               PruneConfig(steps=6, gate_lr=0.05, feature_distill=weight), seed=0, teacher=shared)
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)
        assert not any(getattr(model, name)._forward_hooks for name in FEATURE_BLOCKS)
        finals.append(model.block2.conv2.effective_weight().detach())
    assert not any(getattr(shared.model, name)._forward_hooks for name in FEATURE_BLOCKS)
    assert not torch.equal(finals[0], finals[1])
    with pytest.raises(ValueError, match="teacher"):
        prune_finetune(tiny_model(), images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=2, feature_distill=1.0), seed=0)
    with pytest.raises(ValueError, match="0 or more"):
        prune_finetune(tiny_model(), images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=2, feature_distill=-1.0), seed=0, teacher=shared)


def test_mix_batch_blends_each_image_with_one_other_at_one_share_drawn_from_its_generator() -> None:
    torch.manual_seed(0)
    batch, labels = torch.randn(16, 3, 8, 8), torch.arange(16)
    blend, (other, share) = mix_batch(batch, labels, 1.0, torch.Generator().manual_seed(3))
    assert 0.0 < share < 1.0 and sorted(other.tolist()) == list(range(16))  # a permutation of the labels
    assert torch.allclose(blend, (1 - share) * batch + share * batch[other])  # image i blended with image other[i]
    again = mix_batch(batch, labels, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], blend) and torch.equal(again[1][0], other) and again[1][1] == share
    state = torch.get_rng_state()
    shares = [mix_batch(batch, labels, 0.2, torch.Generator().manual_seed(s))[1][1] for s in range(200)]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator (hard-concrete noise) is untouched
    assert statistics.fmean(min(x, 1 - x) for x in shares) < 0.15  # Beta(0.2, 0.2) sits near 0 or 1


def test_mixup_distils_on_blends_repeats_exactly_and_refuses_a_negative_concentration() -> None:
    """Mixup changes the fine-tune (the student and the teacher see blends); a run repeats exactly; the
    teacher's cached logits for plain batches are not served for blends."""
    torch.manual_seed(2)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    teacher = Teacher(tiny_model())
    finals = []
    for mixup in (0.0, 1.0, 1.0):
        torch.manual_seed(0)
        model = tiny_model()
        masks = prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                               PruneConfig(steps=6, gate_lr=0.05, mixup=mixup), seed=0, teacher=teacher)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * sum(m.numel() for m in masks.values()))
        finals.append(model.block2.conv2.effective_weight().detach())
    assert not torch.equal(finals[0], finals[1]) and torch.equal(finals[1], finals[2])
    assert len(teacher._logits) == 12  # 6 steps without mixup, 6 with: separate entries
    with pytest.raises(ValueError, match="0 .off. or more"):
        prune_finetune(tiny_model(), images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=2, mixup=-1.0), seed=0)


def test_dense_ends_keep_stem_and_head_whole_while_pruning_and_after() -> None:
    """While the mask falls and in the final top-K, the end layers keep every weight and the total is
    still exactly K; the straight-through masks keep about the scheduled share."""
    torch.manual_seed(1)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    model = tiny_model()
    masks = prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                           PruneConfig(steps=6, gate_lr=0.05, dense_ends=True), seed=0, teacher=copy.deepcopy(model))
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)
    assert all(masks[name].all() for name in END_LAYERS)
    train_masks = sampled_train_masks(tiny_model(), 0.5, "effective", END_LAYERS)
    assert all(train_masks[name].all() for name in END_LAYERS)
    kept = sum(m.sum().item() for m in train_masks.values()) / sum(m.numel() for m in train_masks.values())
    assert abs(kept - 0.5) < 0.01
    with pytest.raises(ValueError, match="hard-concrete"):
        prune_finetune(tiny_model(), images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=2, gate_lr=0.05, gate_fn="hard_concrete", dense_ends=True), seed=0)


@pytest.mark.parametrize("gradual", [True, False])
def test_a_soup_averages_fine_tunes_of_one_mask_the_first_on_the_runs_own_batches(gradual: bool) -> None:
    """From the step the mask is final, each ingredient fine-tunes on batches of its own (the teacher is
    asked for their logits, not served the first's); the first ends bitwise where the run without a soup
    ends; the model is their average and keeps exactly the same K survivors."""
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    torch.manual_seed(1)
    teacher = Teacher(tiny_model().eval())
    calls: list[int] = []
    teacher.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def run(soup: int, ingredients: list | None = None) -> tuple[nn.Module, dict[str, Tensor]]:
        torch.manual_seed(0)
        model = tiny_model()
        masks = prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                               PruneConfig(steps=8, gate_lr=0.05, gradual=gradual, soup=soup), seed=0,
                               teacher=teacher, ingredients=ingredients)
        return model, masks

    plain, plain_masks = run(1)
    assert len(calls) == 8
    ingredients: list[dict[str, Tensor]] = []
    soup, masks = run(3, ingredients)
    tail = 4 if gradual else 8  # the steps after the mask is final: prune share 0.5 of 8, or all of one-shot's
    assert len(calls) == 8 + 2 * tail  # the first ingredient's logits came from the cache, the others' are new
    assert len(ingredients) == 3
    assert all(torch.equal(ingredients[0][k], v) for k, v in plain.state_dict().items())
    assert all(torch.equal(masks[n], plain_masks[n]) for n in masks)
    key = "block2.conv2.weight"
    assert not torch.equal(ingredients[1][key], ingredients[0][key])
    assert not torch.equal(ingredients[2][key], ingredients[1][key])
    averaged = average_states(ingredients)
    assert all(torch.allclose(soup.state_dict()[k].float(), averaged[k].float()) for k in averaged)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)
    for name, layer in soup.gated_layers():
        assert not layer.effective_weight()[~masks[name]].any()


def test_a_soup_refuses_a_size_below_one_and_unlike_states() -> None:
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match="1 or more"):
        prune_finetune(tiny_model(), images, labels, 0.3, TrainConfig(batch_size=8), PruneConfig(steps=2, soup=0),
                       seed=0)
    with pytest.raises(ValueError, match="different tensors"):
        average_states([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def test_a_shared_teacher_computes_each_steps_logits_once_and_changes_nothing() -> None:
    """A sweep's fine-tunes share one Teacher: the second run of a seed reuses every logit of the first
    (no teacher forward pass) and ends bitwise where a run with a teacher of its own ends; another seed
    draws other batches, so it is not served the first seed's logits."""
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    torch.manual_seed(1)
    dense = tiny_model().eval()
    shared = Teacher(dense)
    calls: list[int] = []
    shared.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def run(teacher: nn.Module | Teacher, keep: float, seed: int = 0) -> Tensor:
        torch.manual_seed(0)
        model = tiny_model()
        prune_finetune(model, images, labels, keep, TrainConfig(batch_size=8),
                       PruneConfig(steps=6, gate_lr=0.05), seed=seed, teacher=teacher)
        return model.block2.conv2.effective_weight().detach()

    run(shared, 0.3)
    assert len(calls) == 6  # one forward pass per step
    reused = run(shared, 0.1)
    assert len(calls) == 6  # the second variant's batches were the first's: all served from the cache
    assert torch.equal(reused, run(dense, 0.1))  # ... and they were exactly the logits it would compute
    run(shared, 0.1, seed=1)
    assert len(calls) == 12  # another seed's batches: computed afresh


def test_the_teachers_logits_persist_on_disk_for_a_restarted_sweep(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """With a path, a Teacher's logits outlive the process: a new Teacher over the same file serves a
    restarted sweep without one teacher forward pass, and the run ends bitwise as with fresh logits.
    Another teacher's weights or other data never hit those entries; an unreadable file is recomputed."""
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    torch.manual_seed(1)
    dense = tiny_model().eval()
    cache = tmp_path / "teacher-logits.pt"

    def run(teacher: nn.Module | Teacher, data: Tensor = images) -> tuple[Tensor, int]:
        calls: list[int] = []
        model_ = teacher.model if isinstance(teacher, Teacher) else teacher
        handle = model_.register_forward_hook(lambda module, args, out: calls.append(1))
        torch.manual_seed(0)
        model = tiny_model()
        prune_finetune(model, data, labels, 0.3, TrainConfig(batch_size=8), PruneConfig(steps=6), seed=0,
                       teacher=teacher)
        handle.remove()
        return model.block2.conv2.effective_weight().detach(), len(calls)

    first, computed = run(Teacher(dense, cache))
    assert computed == 6 and cache.exists()
    again, computed = run(Teacher(dense, cache))  # a new process, in effect
    assert computed == 0 and torch.equal(again, first)
    assert torch.equal(run(dense)[0], first)  # the stored logits are the ones it would compute
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other.head.weight.add_(0.01)
    assert run(Teacher(other, cache))[1] == 6  # another teacher: its own entries
    assert run(Teacher(dense, cache), images.flip(0))[1] == 6  # other data: its own entries
    assert len(torch.load(cache, weights_only=True)) == 18  # and all of them kept in one file
    cache.write_bytes(b"not a torch file")
    with caplog.at_level("WARNING"):
        damaged, computed = run(Teacher(dense, cache))
    assert computed == 6 and torch.equal(damaged, first) and "unreadable logit cache" in caplog.text
    assert len(torch.load(cache, weights_only=True)) == 6  # rewritten whole


def test_channel_ramp_narrows_gradually_to_the_final_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """channel_ramp: the kept channels fall on the cubic schedule (always the top ones by the scores, so
    each width is a superset of the final mask), then the final masks hold: pruned weights exactly zero."""
    from core.model import GatedNet as Net
    from training.prune import channel_masks

    torch.manual_seed(0)
    model, teacher = tiny_model(), tiny_model()
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    scores = {name: torch.rand(conv.out_channels) for name, conv, _, _ in model.conv_chain()}
    final = channel_masks(model, 0.5, scores)
    installed: list[int | None] = []
    real_set_masks = Net.set_masks

    def recording(self, masks):
        installed.append(None if masks is None else int(sum(m.sum() for m in masks.values())))
        real_set_masks(self, masks)

    monkeypatch.setattr(Net, "set_masks", recording)
    pcfg = PruneConfig(steps=40, gradual=False)
    masks = prune_finetune(model, images, labels, 0.5, TrainConfig(batch_size=8), pcfg, seed=0, teacher=teacher,
                           masks=final, channel_scores=scores, channel_ramp=0.5)
    # dense first, a width update every 10 steps of the 20-step ramp, then the final mask
    kept_final = int(sum(m.sum() for m in final.values()))
    assert installed[0] is None and installed[-1] == kept_final and len(installed) == 4
    assert installed[1] > installed[2] > kept_final  # cubic: the width falls, never below the target
    assert masks is final
    for name, layer in model.gated_layers():
        assert not layer.effective_weight()[~final[name]].any()


class _Cut(Exception):
    """Stands in for a session ending mid-run."""


def _phase2_run(monkeypatch: pytest.MonkeyPatch, mode: str, keep: float = 0.2,
                progress: Phase2Checkpoint | None = None, cut_at_call: int = 0) -> tuple[dict, dict]:
    """One 20-step phase-2 run of a tiny model in ``mode``; with ``cut_at_call`` the step that makes that
    call of the loss raises _Cut, as if the process were killed there."""
    import training.train as train_module
    from training.prune import channel_masks

    real = train_module._distill_loss
    calls = [0]

    def loss(*args: object, **kwargs: object) -> Tensor:
        calls[0] += 1
        if calls[0] == cut_at_call:
            raise _Cut
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_distill_loss", loss)
    images, labels = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.arange(32) % 3
    model, teacher = tiny_model(), tiny_model(1)
    pcfg = {"gradual": PruneConfig(steps=20, gate_lr=0.05),
            "lookahead": PruneConfig(steps=20, gate_lr=0.05, lookahead=True),
            "hard_concrete": PruneConfig(steps=20, gate_lr=0.5, gate_fn="hard_concrete"),
            "one_shot": PruneConfig(steps=20, gradual=False),
            "channel_ramp": PruneConfig(steps=20, gradual=False),
            "soup": PruneConfig(steps=20, gate_lr=0.05, soup=3),
            "soup_lookahead": PruneConfig(steps=20, gate_lr=0.05, soup=3, lookahead=True)}[mode]
    extra: dict = {}
    if mode == "channel_ramp":
        scores = {name: torch.linspace(0, 1, conv.out_channels) for name, conv, _, _ in model.conv_chain()}
        extra = {"masks": channel_masks(model, 0.5, scores), "channel_scores": scores, "channel_ramp": 0.5}
    masks = prune_finetune(model, images, labels, keep, TrainConfig(batch_size=8), pcfg, seed=0, teacher=teacher,
                           floor=0.002, progress=progress, **extra)
    return masks, model.state_dict()


@pytest.mark.parametrize("mode", ["gradual", "lookahead", "hard_concrete", "one_shot", "channel_ramp"])
@pytest.mark.parametrize(("cut_at_call", "resumed_step"), [(11, 8), (15, 12)])  # the mask is fixed at step 10
def test_phase2_cut_mid_run_resumes_at_its_last_save_and_ends_bitwise_as_an_uncut_run(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str, cut_at_call: int, resumed_step: int) -> None:
    reference_masks, reference_state = _phase2_run(monkeypatch, mode)
    saves = Phase2Checkpoint(tmp_path / "keep0.2.progress.pt", every=4)
    with pytest.raises(_Cut):
        _phase2_run(monkeypatch, mode, progress=saves, cut_at_call=cut_at_call)
    assert saves.path.exists() and saves.resumed_step == 0
    resumed = Phase2Checkpoint(saves.path, every=4)
    masks, state = _phase2_run(monkeypatch, mode, progress=resumed)
    assert resumed.resumed_step == resumed_step and resumed.earlier_seconds > 0
    assert all(torch.equal(masks[n], reference_masks[n]) for n in reference_masks)
    assert all(torch.equal(state[k], reference_state[k]) for k in reference_state)


@pytest.mark.parametrize("mode", ["soup", "soup_lookahead"])
# The mask is final at step 10; ingredient 0 makes loss calls 1-20 (steps 0-19), ingredients 1 and 2 make
# calls 21-30 and 31-40 (steps 10-19 each). Saves are every 4 steps, never at an ingredient's first step.
@pytest.mark.parametrize(("cut_at_call", "resumed_step", "resumed_ingredient", "share"), [
    (15, 12, 0, 12 / 40),  # before the first ingredient ends: the soup's start state is in the save
    (22, 16, 0, 16 / 40),  # on ingredient 1's second step: its first step made no save, so back to ingredient 0
    (27, 16, 1, 26 / 40),  # mid ingredient 1
    (35, 12, 2, 32 / 40),  # mid ingredient 2, ingredients 0 and 1 done and in the save
])
def test_a_soup_cut_mid_ingredient_resumes_in_it_and_ends_bitwise_as_an_uncut_soup(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str, cut_at_call: int, resumed_step: int,
        resumed_ingredient: int, share: float) -> None:
    reference_masks, reference_state = _phase2_run(monkeypatch, mode)
    saves = Phase2Checkpoint(tmp_path / "keep0.2.progress.pt", every=4)
    with pytest.raises(_Cut):
        _phase2_run(monkeypatch, mode, progress=saves, cut_at_call=cut_at_call)
    saved = torch.load(saves.path, weights_only=True)
    assert (saved["step"], saved["soup"]["ingredient"]) == (resumed_step, resumed_ingredient)
    assert saved["soup"]["share"] == pytest.approx(share)
    assert len(saved["soup"]["done"]) == resumed_ingredient
    resumed = Phase2Checkpoint(saves.path, every=4)
    masks, state = _phase2_run(monkeypatch, mode, progress=resumed)
    assert resumed.resumed_step == resumed_step
    assert all(torch.equal(masks[n], reference_masks[n]) for n in reference_masks)
    assert all(torch.equal(state[k], reference_state[k]) for k in reference_state)


def test_phase2_ignores_a_save_made_by_another_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A save from keep 0.2 is not resumed by a keep-0.3 run (which starts at step 0 and ends where an uncut
    keep-0.3 run ends), nor is a damaged file: both cost their progress, never the run."""
    saves = Phase2Checkpoint(tmp_path / "p.pt", every=4)
    with pytest.raises(_Cut):
        _phase2_run(monkeypatch, "gradual", keep=0.2, progress=saves, cut_at_call=11)
    reference_masks, reference_state = _phase2_run(monkeypatch, "gradual", keep=0.3)
    for damage in (None, b"not a checkpoint"):
        if damage is not None:
            saves.path.write_bytes(damage)
        other = Phase2Checkpoint(saves.path, every=4)
        masks, state = _phase2_run(monkeypatch, "gradual", keep=0.3, progress=other)
        assert other.resumed_step == 0
        assert all(torch.equal(masks[n], reference_masks[n]) for n in reference_masks)
        assert all(torch.equal(state[k], reference_state[k]) for k in reference_state)


def test_phase2_refuses_a_criterion_it_cannot_rank_by() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="phase 2 ranks by"):
        prune_finetune(model, torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)), 0.5, TrainConfig(batch_size=8),
                       PruneConfig(steps=1, criterion="random"), seed=0)
    with pytest.raises(ValueError, match="phase 2's gates are one of"):
        prune_finetune(model, torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)), 0.5, TrainConfig(batch_size=8),
                       PruneConfig(steps=1, gate_fn="relu"), seed=0)
    with pytest.raises(ValueError, match="gate learning rate above 0"):
        prune_finetune(model, torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)), 0.5, TrainConfig(batch_size=8),
                       PruneConfig(steps=1, gate_fn="hard_concrete", gate_lr=0), seed=0)
    with pytest.raises(ValueError, match="hard-concrete gates rank by"):
        prune_finetune(model, torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)), 0.5, TrainConfig(batch_size=8),
                       PruneConfig(steps=1, gate_fn="hard_concrete", hc_rank="magnitude"), seed=0)


def test_hard_concrete_gates_are_exactly_zero_or_one_as_often_as_their_open_probability_says() -> None:
    torch.manual_seed(0)
    locations = torch.tensor([-6.0, -2.0, 0.0, 2.0, 6.0])
    samples = hard_concrete_gate(locations.repeat(40_000, 1), sample=True)
    assert samples.min() >= 0 and samples.max() <= 1
    assert (samples[:, 2] == 0).any() and (samples[:, 2] == 1).any()  # both ends are reached
    assert torch.allclose((samples > 0).float().mean(0), hard_concrete_open(locations), atol=0.01)
    assert hard_concrete_gate(locations, sample=False).tolist()[0] == 0.0  # deterministic: closed ...
    assert hard_concrete_gate(locations, sample=False).tolist()[-1] == 1.0  # ... and open


def test_hard_concrete_gates_come_and_go_without_changing_the_deterministic_network() -> None:
    model = tiny_model()

    def weights() -> dict[str, Tensor]:
        return {name: layer.effective_weight().detach().clone() for name, layer in model.gated_layers()}

    before = weights()  # sigmoid gates of spread scores
    enter_hard_concrete(model, 3.0)
    assert all(layer.hard_concrete for _, layer in model.gated_layers())
    assert all(torch.allclose(w, before[n], atol=1e-6) for n, w in weights().items())  # open gates: the same
    with torch.no_grad():
        for _, layer in model.gated_layers():
            layer.score.normal_(0, 2)  # some gates partly open, some closed
    hard = weights()
    assert sum(int((w == 0).sum()) for w in hard.values()) > 0
    model.train()  # sampled gates differ from the deterministic ones
    assert any(not torch.equal(w, hard[n]) for n, w in weights().items())
    model.eval()
    leave_hard_concrete(model)
    assert all(not layer.hard_concrete and not layer.score.any() for _, layer in model.gated_layers())
    assert all(torch.allclose(w, hard[n], atol=1e-6) for n, w in weights().items())


def test_the_l0_budget_pushes_gates_shut_only_while_the_open_share_is_above_schedule() -> None:
    model = tiny_model()
    enter_hard_concrete(model, 3.0)
    budget = L0Budget(model, strength=100.0)
    budget.penalty(1.0).backward()
    assert 0.98 < budget.open_share < 1  # below the schedule: no penalty, no push
    assert all(not layer.score.grad.any() for _, layer in model.gated_layers())
    penalty = budget.penalty(0.5)
    assert penalty.item() == pytest.approx(50.0 * budget.total * (budget.open_share - 0.5) ** 2, rel=1e-4)
    penalty.backward()  # above it: every log α is pushed down
    assert all((layer.score.grad > 0).all() for _, layer in model.gated_layers())


@pytest.mark.parametrize("hc_rank", ["log_alpha", "effective"])
def test_phase2_hard_concrete_gates_choose_the_final_mask(monkeypatch: pytest.MonkeyPatch, hc_rank: str) -> None:
    """L0 gates while the mask falls: the expected open share follows the schedule down, the final top-K is
    the top-K of log α (or of |W · deterministic gate|), and what remains is an ordinary sigmoid-gated
    network; the run repeats exactly."""
    import training.train as train_module
    from training.prune import importance, topk_masks

    by_rank, open_shares = [], []
    leave = train_module.leave_hard_concrete
    penalty = train_module.L0Budget.penalty

    def record_then_leave(model: GatedNet) -> None:
        model.eval()  # deterministic gates
        criterion = "gate" if hc_rank == "log_alpha" else "gate_magnitude"
        by_rank.append(topk_masks(importance(model, criterion), 0.2, floor=0.002))
        model.train()
        leave(model)

    def record_penalty(self: L0Budget, target_share: float) -> Tensor:
        value = penalty(self, target_share)
        open_shares.append(self.open_share)
        return value

    monkeypatch.setattr(train_module, "leave_hard_concrete", record_then_leave)
    monkeypatch.setattr(train_module.L0Budget, "penalty", record_penalty)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    pcfg = PruneConfig(steps=40, gate_lr=0.5, gate_fn="hard_concrete", hc_rank=hc_rank)
    runs = []
    for _ in range(2):
        model, teacher = tiny_model(), tiny_model(1)
        masks = prune_finetune(model, images, labels, 0.2, TrainConfig(batch_size=8), pcfg, seed=0, teacher=teacher,
                               floor=0.002)
        runs.append((masks, model.state_dict()))
        assert all(torch.equal(masks[n], by_rank[-1][n]) for n in masks)
        for name, layer in model.gated_layers():
            assert not layer.hard_concrete and not layer.score.any()
            assert not layer.effective_weight()[~masks[name]].any()
    assert len(open_shares) == 2 * 20  # the gradual half of each run
    assert open_shares[19] < open_shares[0] - 0.1  # the budget closed gates
    (first, first_state), (second, second_state) = runs
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)


def test_tta_levels() -> None:
    model = tiny_model().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tta_logits(model, x, 0), model(x))
        assert torch.allclose(tta_logits(model, x, 1), (model(x) + model(x.flip(-1))) / 2)
        assert tta_logits(model, x, 2).shape == (3, 3)


@pytest.mark.parametrize("rows_per_call, calls", [(0, [3] * 6), (3, [3] * 6), (5, [3] * 6), (6, [6, 6, 6]),
                                                  (12, [12, 6]), (64, [18])])
def test_tta_views_stack_into_calls_of_at_most_rows_per_call(rows_per_call: int, calls: list[int]) -> None:
    """Stacking the views changes how many forward passes run, never what each image gets."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(x, (1,) * 4, mode="reflect")
    a, b = padded[..., :32, :32], padded[..., 2:, 2:]
    seen: list[int] = []
    with torch.no_grad():
        mirror = (model(x) + model(x.flip(-1))) / 2
        expected = 0.5 * mirror + 0.5 * (model(a) + model(a.flip(-1)) + model(b) + model(b.flip(-1))) / 4
        hook = model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        got = tta_logits_by_level(model, x, 2, rows_per_call)
        hook.remove()
    assert seen == calls
    assert torch.allclose(got[0], model(x), atol=1e-6)
    assert torch.allclose(got[1], mirror, atol=1e-6)
    assert torch.allclose(got[2], expected, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_tta_level_from_one_pass_is_exactly_each_levels_own(precision: str) -> None:
    """prune-train scores every variant at every TTA level from the 6 views of the highest one; each
    level must be bitwise what evaluating it alone gives, in the precision training evaluates in."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 3, (40,))
    views: list[int] = []
    model.register_forward_hook(lambda module, args, out: views.append(args[0].shape[0]))
    together = predict_logits_by_level(model, images, batch_size=16, precision=precision, up_to=2)
    assert sum(views) == 6 * 40  # the highest level's views, no more
    for level in TTA_LEVELS:
        assert torch.equal(together[level], predict_logits(model, images, 16, precision, tta=level))
    by_level = accuracy_by_level(model, images, labels, precision, up_to=2)
    assert by_level == [accuracy(model, images, labels, precision, tta=level) for level in TTA_LEVELS]


def test_phase2_lr_schedule_holds_the_peak_while_the_mask_changes() -> None:
    # linear: warm-up over 5 % of the steps, then straight down to zero
    assert [_phase2_lr_factor(s, 100) for s in (0, 4, 5, 50, 99)] == [0.0, 0.8, 1.0, 50 / 95, 1 / 95]
    # hold until 75: the peak through the pruning ramp, then linear to zero over the last 25 steps
    assert [_phase2_lr_factor(s, 100, 75) for s in (4, 5, 74, 75, 99)] == [0.8, 1.0, 1.0, 1.0, 1 / 25]
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    finals = []
    for schedule in PHASE2_SCHEDULES:
        torch.manual_seed(0)
        model = tiny_model()
        masks = prune_finetune(model, images, labels, 0.3, TrainConfig(batch_size=8),
                               PruneConfig(steps=10, gate_lr=0.05, lr_schedule=schedule), seed=0)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * sum(m.numel() for m in masks.values()))
        finals.append(model.block2.conv2.effective_weight().detach())
    assert not torch.equal(finals[0], finals[1])  # same data and seed: only the learning rates differ
    with pytest.raises(ValueError, match="lr schedule"):
        prune_finetune(tiny_model(), images, labels, 0.3, TrainConfig(batch_size=8),
                       PruneConfig(steps=1, lr_schedule="cosine"), seed=0)


def test_phase2_ablation_summarises_settings_over_batch_seeds_paired_against_the_first() -> None:
    path = Path(__file__).resolve().parent.parent / "scripts" / "phase2_ablation.py"
    spec = importlib.util.spec_from_file_location("phase2_ablation", path)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    results = {"share 0.5": {0: 89.80, 1: 89.00, 2: 89.30}, "share 0.75": {0: 90.20, 1: 89.54, 2: 89.50}}
    lines = ablation.seed_summary(results, dense_val=90.72).splitlines()
    assert len(lines) == 3
    first_mean, second_mean = (statistics.fmean(results[s].values()) for s in results)
    assert f"share 0.5: {first_mean:.2f} ± {statistics.stdev(results['share 0.5'].values()):.2f}" in lines[1]
    assert f"(drop {90.72 - first_mean:.2f})" in lines[1] and "paired" not in lines[1]
    assert f"share 0.75: {second_mean:.2f} ±" in lines[2]
    deltas = [0.40, 0.54, 0.20]  # seed by seed: the paired difference is their mean ± std
    assert f"paired {statistics.fmean(deltas):+.2f} ± {statistics.stdev(deltas):.2f} over 3 seeds" in lines[2]

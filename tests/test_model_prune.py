"""Gated layers, top-K exactness, criteria, fine-tune keeps zeros zero."""

from __future__ import annotations

import pytest
import torch

from core.model import GatedConv2d, GatedLinear, count_parameters
from tests.conftest import TINY, tiny_model
from training.prune import CRITERIA, check_keep, importance, lamp, prune, topk_masks
from training.train import TrainConfig, finetune, sampled_train_masks


def test_gated_conv_forward_is_weight_times_sigmoid_gate() -> None:
    layer = GatedConv2d(3, 4)
    with torch.no_grad():
        layer.score.normal_()
    x = torch.randn(2, 3, 8, 8)
    expected = torch.nn.functional.conv2d(x, layer.weight * torch.sigmoid(layer.score), padding=1)
    torch.testing.assert_close(layer(x), expected)


def test_gated_linear_backward_reaches_weight_and_score() -> None:
    layer = GatedLinear(5, 3)
    layer(torch.randn(4, 5)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.score.grad is not None and layer.score.grad.abs().sum() > 0
    # d/dS of W*sigmoid(S) is W*sigmoid'(S): check against autograd on the closed form.
    s = layer.score.detach().clone().requires_grad_(True)
    x = torch.randn(4, 5)
    torch.nn.functional.linear(x, layer.weight.detach() * torch.sigmoid(s), layer.bias.detach()).sum().backward()
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(layer.score.grad, s.grad)


def test_straight_through_mask_zeroes_forward_but_passes_gradient_to_pruned_scores() -> None:
    layer = GatedLinear(6, 2, bias=False)
    mask = torch.zeros_like(layer.weight)
    mask[:, :3] = 1
    layer.train_mask = mask
    x = torch.randn(3, 6)
    out = layer(x)
    torch.testing.assert_close(out, x[:, :3] @ (layer.weight * torch.sigmoid(layer.score))[:, :3].T)
    out.sum().backward()
    assert (layer.score.grad[:, 3:] != 0).all(), "pruned scores must still learn (straight-through)"


def test_fold_bakes_gate_and_mask_into_weight() -> None:
    model = tiny_model()
    prune(model, "gate", 0.3)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    model.fold()
    assert all(layer.score is None for _, layer in model.gated_layers())
    torch.testing.assert_close(model(x), before)


def test_parameter_counts_are_honest() -> None:
    model = tiny_model()
    counts = count_parameters(model)
    prunable = sum(layer.weight.numel() for _, layer in model.gated_layers())
    scores = sum(layer.score.numel() for _, layer in model.gated_layers())
    assert counts["prunable"] == prunable
    assert counts["total"] == sum(p.numel() for p in model.parameters()) - scores
    prune(model, "magnitude", 0.25)
    after = count_parameters(model)
    assert after["nonzero"] == counts["total"] - (prunable - round(0.25 * prunable))


@pytest.mark.parametrize("keep", [1.0, 0.9, 0.5, 0.3, 0.1, 0.05, 0.01])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_topk_keeps_exactly_round_keep_times_n(keep: float, scope: str) -> None:
    model = tiny_model()
    masks = topk_masks(importance(model, "gate"), keep, scope)
    n = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(keep * n)


def test_global_scope_uses_one_threshold_and_layer_scope_keeps_each_layers_share() -> None:
    scores = {"a": torch.arange(10.0), "b": torch.arange(100.0, 110.0)}
    global_masks = topk_masks(scores, 0.5, "global")
    assert global_masks["a"].sum() == 0 and global_masks["b"].all()
    layer_masks = topk_masks(scores, 0.5, "layer")
    assert layer_masks["a"].sum() == 5 and layer_masks["b"].sum() == 5
    assert layer_masks["a"][5:].all()  # each layer keeps its own largest


def test_floor_keeps_every_layer_alive() -> None:
    scores = {"small": torch.zeros(50), "big": torch.ones(1000)}
    assert topk_masks(scores, 0.1, "global")["small"].sum() == 0
    masks = topk_masks(scores, 0.1, "global", floor=0.02)
    assert masks["small"].sum() == 1 and sum(int(m.sum()) for m in masks.values()) == 105
    with pytest.raises(ValueError, match="floor"):
        topk_masks(scores, 0.001, "global", floor=0.5)


def test_layers_kept_dense_count_towards_k_and_the_rest_compete_for_what_is_left() -> None:
    scores = {"stem": torch.zeros(10), "body": torch.arange(100.0), "head": torch.zeros(10)}
    masks = topk_masks(scores, 0.25, "global", dense=("stem", "head"))
    assert masks["stem"].all() and masks["head"].all()
    assert int(masks["body"].sum()) == 10 and masks["body"][90:].all()  # 30 in all: 20 whole, the top 10
    assert topk_masks(scores, 0.25, "global")["stem"].sum() == 0
    with pytest.raises(ValueError, match="dense need 20"):
        topk_masks(scores, 0.1, "global", dense=("stem", "head"))
    with pytest.raises(ValueError, match="global scope"):
        topk_masks(scores, 0.5, "layer", dense=("stem",))
    with pytest.raises(ValueError, match="no layer named tail"):
        topk_masks(scores, 0.5, "global", dense=("tail",))


def test_ties_break_deterministically_by_position() -> None:
    scores = {"a": torch.ones(8), "b": torch.ones(8)}
    masks = topk_masks(scores, 0.25, "global")
    assert masks["a"][:4].all() and masks["a"].sum() == 4 and masks["b"].sum() == 0
    again = topk_masks({k: v.clone() for k, v in scores.items()}, 0.25, "global")
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_same_model_same_masks_bit_identical() -> None:
    for criterion in CRITERIA:
        first = topk_masks(importance(tiny_model(), criterion, seed=3), 0.2)
        second = topk_masks(importance(tiny_model(), criterion, seed=3), 0.2)
        assert all(torch.equal(first[k], second[k]) for k in first), criterion


def test_criteria_rank_what_they_claim() -> None:
    model = tiny_model()
    name, layer = model.gated_layers()[1]
    torch.testing.assert_close(importance(model, "gate")[name], layer.score.detach())
    torch.testing.assert_close(importance(model, "magnitude")[name], layer.weight.detach().abs())
    torch.testing.assert_close(importance(model, "gate_magnitude")[name],
                               (layer.weight * torch.sigmoid(layer.score)).detach().abs())
    random_a, random_b = importance(model, "random", seed=1), importance(model, "random", seed=2)
    assert not torch.equal(random_a[name], random_b[name])
    with pytest.raises(ValueError, match="unknown criterion"):
        importance(model, "bogus")


def test_lamp_scores_are_each_weights_share_of_the_mass_at_or_above_it() -> None:
    # squares 9, 1, 4 (ascending 1, 4, 9): mass at or above = 14, 13, 9
    torch.testing.assert_close(lamp(torch.tensor([-3.0, 1.0, 2.0])), torch.tensor([1.0, 1 / 14, 4 / 13]))
    assert torch.equal(lamp(torch.zeros(4)), torch.zeros(4))  # an all-zero layer: no division by zero


def test_lamp_ranks_within_a_layer_like_magnitude_and_rebalances_between_layers() -> None:
    model = tiny_model()
    magnitude, layer_normalised = importance(model, "gate_magnitude"), importance(model, "lamp")
    for name in magnitude:  # the same order inside each layer
        assert torch.equal(torch.sort(magnitude[name].flatten(), stable=True).indices,
                           torch.sort(layer_normalised[name].flatten(), stable=True).indices)
    # A layer scaled ×0.01 is all but emptied by a global |W| top-K; LAMP does not care about its scale.
    name, layer = model.gated_layers()[2]
    with torch.no_grad():
        layer.weight.mul_(0.01)
    kept = {c: int(topk_masks(importance(model, c), 0.3)[name].sum()) for c in ("gate_magnitude", "lamp")}
    assert kept["gate_magnitude"] == 0 and kept["lamp"] > 0.1 * layer.weight.numel()
    torch.testing.assert_close(importance(model, "lamp")[name], layer_normalised[name])


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_keep_is_a_clear_error(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_keep(bad)


def test_finetune_keeps_pruned_weights_exactly_zero() -> None:
    model = tiny_model()
    masks = prune(model, "gate", 0.2)
    images = torch.randn(16, 3, 32, 32)
    labels = torch.randint(0, TINY.num_classes, (16,))
    before = {n: layer.weight.detach().clone() for n, layer in model.gated_layers()}
    finetune(model, images, labels, steps=3, cfg=TrainConfig(batch_size=8), seed=0)
    for name, layer in model.gated_layers():
        effective = layer.effective_weight().detach()
        assert (effective[~masks[name]] == 0).all()
        assert not torch.equal(layer.weight.detach()[masks[name]], before[name][masks[name]])  # it did train


@pytest.mark.parametrize("rank", ["score", "effective", "lamp"])
def test_sampled_train_masks_track_the_requested_keep(rank: str) -> None:
    model = tiny_model()
    masks = sampled_train_masks(model, 0.3, rank)
    kept = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(kept - 0.3) < 0.02

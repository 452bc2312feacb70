"""Phase 2: deterministic top-K pruning, at two granularities.

weight   exactly ``round(keep × N)`` prunable weights survive (N = all prunable weights), ranked by an
         importance criterion across the network (or per layer).
channel  every conv layer keeps exactly ``max(1, round(keep × C))`` of its C output channels (or the
         widths ``channel_allocation`` spreads over the same MACs, an option measured to lose); a
         pruned channel's producing filter and every weight that reads it are masked, so the masked
         network equals a physically narrower one (engine/compact.py slices it).
Ties break by position (layer order, then flat index) through a stable sort, so the same scores
always give bit-identical masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from core.hardware import autocast
from core.model import GatedNet

CRITERIA = ("gate", "gate_magnitude", "lamp", "magnitude", "random")
SCOPES = ("global", "layer")


def check_keep(keep: float) -> float:
    keep = float(keep)
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    return keep


@torch.no_grad()
def importance(model: GatedNet, criterion: str, seed: int = 0) -> dict[str, Tensor]:
    """Per-layer importance scores (higher = keep).

    gate            the learned score S itself (ranks like sigmoid(S), without its float saturation)
    gate_magnitude  |W · sigmoid(S)|: the effective weight's magnitude
    lamp            the same, layer-normalised (LAMP, Lee et al. 2021): a global top-K on it sets
                    each layer's share from the layer's own magnitude distribution, never emptying one
    magnitude       |W|: what torch.nn.utils.prune.global_unstructured with L1 ranks by
    random          seeded uniform noise: the floor any criterion must beat
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    scores = {}
    for index, (name, layer) in enumerate(model.gated_layers()):
        if criterion == "gate":
            scores[name] = layer.score.detach().float().cpu().clone()
        elif criterion == "gate_magnitude":
            scores[name] = (layer.weight * layer.gate()).abs().float().cpu()
        elif criterion == "lamp":
            scores[name] = lamp((layer.weight * layer.gate()).abs()).cpu()
        elif criterion == "magnitude":
            scores[name] = layer.weight.detach().abs().float().cpu()
        else:
            generator = torch.Generator().manual_seed(seed * 1000 + index)
            scores[name] = torch.rand(layer.weight.shape, generator=generator)
    return scores


def lamp(magnitudes: Tensor) -> Tensor:
    """LAMP scores of one layer: w² / (sum of w'² over the layer's weights ranked at or above w).

    The layer's largest weight scores 1, and a weight's score is its share of what would be left of the
    layer if everything below it were pruned, so one global threshold prunes a layer less where its
    remaining mass is concentrated in few weights (Lee et al., "Layer-adaptive sparsity for the
    magnitude-based pruning", ICLR 2021). Equal magnitudes are ordered by position (stable sort).
    """
    squared = magnitudes.detach().flatten().double() ** 2
    order = torch.sort(squared, stable=True).indices  # ascending
    ranked = squared[order]
    mass_above = ranked.flip(0).cumsum(0).flip(0)  # sum over this weight and every larger one
    scores = torch.empty_like(squared)
    scores[order] = ranked / mass_above.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.float().view_as(magnitudes)


def flat_mask(masks: dict[str, Tensor]) -> Tensor:
    """Every layer's mask as one bool vector, in layer order (to compare two selections)."""
    return torch.cat([m.flatten().cpu() for m in masks.values()])


def _floor_counts(sizes: list[int], floor: float) -> list[int]:
    """Weights each layer keeps whatever the ranking says: ceil(floor × n), at least one."""
    return [min(n, max(1, math.ceil(floor * n))) for n in sizes]


def _stable_top(flat: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest entries; equal values go to the lower index first."""
    order = torch.sort(flat, descending=True, stable=True).indices
    return order[:count]


def topk_masks(scores: dict[str, Tensor], keep: float, scope: str = "global",
               floor: float = 0.0, dense: Iterable[str] = ()) -> dict[str, Tensor]:
    """Bool masks keeping exactly round(keep × N) weights.

    scope='global': one ranking across all layers; scope='layer': every layer keeps its share
    (largest-remainder rounding so the total is still exact). ``floor`` is a per-layer minimum
    fraction (at least one weight when > 0) so that no layer is ever emptied. ``dense`` names layers
    kept whole (global scope only): their weights count towards the K, the rest compete for what is left.
    """
    keep = check_keep(keep)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
    names = list(scores)
    dense = set(dense)
    if dense - set(names):
        raise ValueError(f"no layer named {', '.join(sorted(dense - set(names)))} to keep dense")
    if dense and scope != "global":
        raise ValueError("layers kept dense need the global scope: a per-layer share cannot keep a layer whole")
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    target = round(keep * total)
    minimum = _floor_counts(sizes, floor) if floor > 0 else [0] * len(sizes)
    minimum = [n if name in dense else m for name, n, m in zip(names, sizes, minimum)]
    if sum(minimum) > target:
        raise ValueError(f"keep {keep} leaves {target} weights but the per-layer floor and the layers kept "
                         f"dense need {sum(minimum)}; lower --floor or raise keep")

    if scope == "layer":
        exact = [keep * n for n in sizes]
        quota = [max(math.floor(e), m) for e, m in zip(exact, minimum)]
        # Hand the remaining weights to the layers with the largest fractional parts (then by order).
        by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
        short = target - sum(quota)
        for i in by_remainder:
            if short <= 0:
                break
            if quota[i] < sizes[i]:
                quota[i] += 1
                short -= 1
        masks = {}
        for name, q in zip(names, quota):
            flat = scores[name].flatten()
            mask = torch.zeros(flat.numel(), dtype=torch.bool)
            mask[_stable_top(flat, q)] = True
            masks[name] = mask.view_as(scores[name])
        return masks

    flat = torch.cat([scores[n].flatten().float() for n in names])
    chosen = torch.zeros(total, dtype=torch.bool)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    for i, m in enumerate(minimum):  # reserve each layer's floor (a dense layer: all of it) first
        if m:
            chosen[offsets[i] + _stable_top(flat[offsets[i]:offsets[i + 1]], m)] = True
    remaining = target - int(chosen.sum())
    if remaining > 0:
        candidates = (~chosen).nonzero().flatten()
        chosen[candidates[_stable_top(flat[candidates], remaining)]] = True
    return {name: chosen[offsets[i]:offsets[i + 1]].view_as(scores[name]) for i, name in enumerate(names)}


def prune(model: GatedNet, criterion: str, keep: float, scope: str = "global", floor: float = 0.0,
          seed: int = 0, dense: Iterable[str] = ()) -> dict[str, Tensor]:
    """Rank, select and install masks on ``model`` (``dense``: layers kept whole); returns the masks."""
    masks = topk_masks(importance(model, criterion, seed), keep, scope, floor, dense)
    model.set_masks(masks)
    return masks


@torch.no_grad()
def bake_masks(model: GatedNet) -> None:
    """Zero the pruned weights and remove the masks: a pruned model that can be pruned further, since a
    zero weight ranks last by every magnitude criterion and, with its gate's gradient zero, stays off."""
    for _, layer in model.gated_layers():
        if layer.mask is not None:
            layer.weight.mul_(layer.mask.to(layer.weight.dtype))
            layer.mask = None


# ---------------------------------------------------------------------------------------------
# Channel granularity (structured)
# ---------------------------------------------------------------------------------------------
def channel_counts(channels: int, keep: float) -> int:
    """Channels a layer of ``channels`` keeps: round(keep × C), never fewer than one."""
    return min(channels, max(1, round(check_keep(keep) * channels)))


@torch.no_grad()
def channel_importance(model: GatedNet) -> dict[str, Tensor]:
    """Per conv layer, one score per output channel, derived from the learned weight gates.

    score_j = |γ_j| × Σ |W·sigmoid(S)| over the next layer's weights that read channel j: how far the
    channel's normalised output (its spread after BatchNorm is |γ_j|) moves what comes next. The
    last conv's channels are read by the head.
    """
    chain = model.conv_chain()
    consumers = [layer for _, layer, _, _ in chain[1:]] + [model.head]
    scores = {}
    for (name, _, bn, _), consumer in zip(chain, consumers):
        read = consumer.effective_weight().detach().abs().float()
        mass = read.sum(dim=(0, 2, 3)) if read.dim() == 4 else read.sum(dim=0)
        scores[name] = (bn.weight.detach().abs().float() * mass).cpu()
    return scores


CHANNEL_RANKINGS = ("mass", "taylor")


def taylor_channel_importance(model: GatedNet, images: Tensor, labels: Tensor, batch_size: int = 250,
                              precision: str = "fp32") -> dict[str, Tensor]:
    """Per conv layer, one score per output channel: the first-order Taylor estimate of what removing
    the channel costs the loss (Molchanov et al., CVPR 2019), from labelled training images.

    For image n and channel j with BatchNorm output y (what its readers see, through GELU), removing j
    changes the loss by about -Σ_pixels y·∂L/∂y; the score sums that estimate's square over images.
    Unlike the weight mass it sees the data: a channel that is large but never matters scores low.
    """
    chain = model.conv_chain()
    scores = {name: torch.zeros(bn.num_features) for name, _, bn, _ in chain}
    captured: dict[str, Tensor] = {}

    def hook(name: str):  # noqa: ANN202 - forward hook factory
        def keep_output(_module, _inputs, output: Tensor) -> None:
            output.retain_grad()
            captured[name] = output
        return keep_output

    was_training = model.training
    model.eval()  # running statistics: the scores describe the network as it will be pruned
    handles = [bn.register_forward_hook(hook(name)) for name, _, bn, _ in chain]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].contiguous(memory_format=torch.channels_last)
            with autocast(x.device, precision):
                loss = F.cross_entropy(model(x).float(), labels[start:start + batch_size], reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
            for name, y in captured.items():
                per_image = (y.float() * y.grad.float()).sum(dim=(2, 3))  # [N, C]
                scores[name] += per_image.pow(2).sum(0).cpu()
            captured.clear()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return scores


def channel_ranking_scores(model: GatedNet, ranking: str, images: Tensor, labels: Tensor,
                           precision: str = "fp32") -> dict[str, Tensor]:
    """Per conv layer, one score per output channel by ``ranking`` (see CHANNEL_RANKINGS); the labelled
    images are only read by 'taylor'. They depend on the model alone, not on the keep ratio."""
    if ranking not in CHANNEL_RANKINGS:
        raise ValueError(f"unknown channel ranking {ranking!r}; choose from {', '.join(CHANNEL_RANKINGS)}")
    if ranking == "mass":
        return channel_importance(model)
    return taylor_channel_importance(model, images, labels, precision=precision)


CHANNEL_ALLOCATIONS = ("uniform", "cost")
UNIFORM_STAGE_SCALES = (1.0, 1.0, 1.0)
# Scaled (uneven) widths land on multiples of this: oneDNN's kernels block channels by 8 or 16. With as
# many MACs or more, the rounded shapes of scales 0.8 0.8 1.2 ran 2-5 % faster than the exact ones in one
# interleaved run (docs/training.md). The even cut stays exact, round(keep × C), so that "keep" means what it says.
CHANNEL_MULTIPLE = 8


def even_cut(stage_scales: Iterable[float]) -> bool:
    """True when the stage scales cut every conv alike (all 1), the cut whose widths are never rounded."""
    return tuple(stage_scales) == UNIFORM_STAGE_SCALES


def round_to_multiple(count: float, multiple: int, channels: int) -> int:
    """``count`` to the nearest multiple of ``multiple`` (ties up), at least one multiple, at most ``channels``."""
    if multiple < 1:
        raise ValueError(f"channel widths round to a multiple of 1 or more, not {multiple}")
    return min(channels, multiple * max(1, math.floor(count / multiple + 0.5)))


def channel_widths(model: GatedNet, keep: float,
                   stage_scales: tuple[float, float, float] = UNIFORM_STAGE_SCALES,
                   multiple: int = CHANNEL_MULTIPLE) -> dict[str, int]:
    """Output channels every conv keeps at channel keep ``keep``: ``channel_counts(C, keep × s)``, with s the
    scale of the conv's stage (the stem and block1, block2, block3) and keep × s capped at 1.

    Uniform (all scales 1) spreads the cut evenly. On a CPU a channel costs time in proportion to its
    feature map's area (32×32 in the stem and block1's first conv, 4×4 in block3's second), so scales
    below 1 for the early stages and above 1 for the last buy speed for less accuracy than an even cut
    (docs/training.md, "where a channel costs time"). Scaled widths are a shape chosen for speed, so they
    are rounded to the nearest multiple of ``multiple`` channels (1: exact); the even cut never is.
    """
    if len(stage_scales) != 3 or min(stage_scales) <= 0:
        raise ValueError(f"stage scales are three positive numbers (stem+block1, block2, block3), not {stage_scales}")
    stage = {"stem": 0, "block1": 0, "block2": 1, "block3": 2}
    even = even_cut(stage_scales)
    widths = {}
    for name, conv, _, _ in model.conv_chain():
        share = min(1.0, keep * stage_scales[stage[name.split(".")[0]]])
        exact = channel_counts(conv.out_channels, share)  # (checks keep)
        widths[name] = exact if even else round_to_multiple(share * conv.out_channels, multiple, conv.out_channels)
    return widths


def conv_macs(model: GatedNet, counts: dict[str, int], input_hw: tuple[int, int] = (32, 32)) -> int:
    """Multiply-adds per image of the conv chain with ``counts`` output channels per conv (what a
    channel variant computes once compacted; the head's few are left out)."""
    total, (h, w), in_ch = 0, input_hw, model.stem.in_channels
    for name, conv, _, pool in model.conv_chain():
        total += h * w * conv.kernel_size[0] * conv.kernel_size[1] * in_ch * counts[name]
        in_ch = counts[name]
        if pool:
            h, w = h // 2, w // 2
    return total


def channel_allocation(model: GatedNet, keep: float, scores: dict[str, Tensor], group: int = 8,
                       min_share: float = 0.25) -> dict[str, int]:
    """Channels per conv for a variant with the compute of uniform ``keep``, spent where the scores say.

    Starts from every channel and removes ``group`` channels at a time (multiples of 8 keep the fast
    kernels' blocking) from the layer whose next ``group`` lowest-scored channels cost the least score
    per multiply-add saved, until the conv chain's MACs fit those of ``keep`` applied to every layer.
    The scores must be comparable across layers (the Taylor ranking estimates loss, the weight mass
    does not). No layer goes below ``min_share`` of its channels (nor below one group).
    """
    chain = model.conv_chain()
    dense = {name: conv.out_channels for name, conv, _, _ in chain}
    budget = conv_macs(model, channel_widths(model, keep))
    ascending = {name: torch.sort(scores[name].float(), stable=True).values for name in dense}
    counts = dict(dense)
    while (current := conv_macs(model, counts)) > budget:
        best, best_ratio = None, math.inf
        for name, c in counts.items():
            if c - group < max(group, math.ceil(min_share * dense[name])):
                continue
            removed = dense[name] - c
            cost = ascending[name][removed:removed + group].sum().item()
            saved = current - conv_macs(model, {**counts, name: c - group})
            if cost / saved < best_ratio:
                best, best_ratio = name, cost / saved
        if best is None:
            break  # every layer at its floor: the nearest this budget allows
        counts[best] -= group
    return counts


def channel_masks(model: GatedNet, keep: float, scores: dict[str, Tensor] | None = None,
                  counts: dict[str, int] | None = None) -> dict[str, Tensor]:
    """Weight masks (layer name → bool, weight-shaped) that keep the top channels of every conv
    (ranked by ``scores``, per conv layer one score per output channel; default: ``channel_importance``):
    ``counts[layer]`` of them where given (``channel_allocation``, ``channel_widths`` with stage scales),
    else the even cut ``channel_widths(model, keep)``.

    A pruned channel j of layer i loses its filter (row j of layer i) and its readers (input j of
    layer i+1, or column j of the head), so its BatchNorm constant never reaches the output.
    """
    chain = model.conv_chain()
    counts = channel_widths(model, keep) if counts is None else counts
    kept = {}
    for name, layer_scores in (channel_importance(model) if scores is None else scores).items():
        alive = torch.zeros(layer_scores.numel(), dtype=torch.bool)
        alive[_stable_top(layer_scores, counts[name])] = True
        kept[name] = alive
    masks = {name: torch.ones(layer.weight.shape, dtype=torch.bool) for name, layer in model.gated_layers()}
    consumers = [name for name, _, _, _ in chain[1:]] + ["head"]
    for (name, _, _, _), consumer in zip(chain, consumers):
        masks[name][~kept[name]] = False
        masks[consumer][:, ~kept[name]] = False
    return masks


def prune_channels(model: GatedNet, keep: float) -> dict[str, Tensor]:
    """Rank channels, keep the top ones per layer and install the masks on ``model``."""
    masks = channel_masks(model, keep)
    model.set_masks(masks)
    return masks

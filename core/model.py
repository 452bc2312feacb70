"""The network: an airbench-style CNN whose every conv/linear weight carries a learned gate.

A gated layer holds a weight tensor W and a same-shaped score tensor S and computes with
``W * sigmoid(S)``. The score is the weight's learned importance: pruning keeps the top-K scores.
Once pruned for serving, ``fold()`` bakes ``W * sigmoid(S) * mask`` into a plain weight, so the same
classes describe the trained gated model (training/) and the inference model (app/).

Prunable = the weights of every GatedConv2d and GatedLinear. Biases and BatchNorm are never gated
and never pruned; they are counted in ``total`` parameters, not in ``prunable``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters; stored in the manifest so the service rebuilds the same net."""

    widths: tuple[int, int, int] = (64, 256, 256)
    stem_width: int = 32
    num_classes: int = 10
    # Multiplies the logits. airbench uses 1/9 with its learning-rate scale; the head's gate starts at
    # sigmoid(0) = 0.5, so 2/9 gives the same logits and the same gradients as airbench's head.
    logit_scale: float = 2 / 9

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetConfig:
        return cls(
            widths=tuple(int(w) for w in data["widths"]),  # type: ignore[arg-type]
            stem_width=int(data["stem_width"]),
            num_classes=int(data["num_classes"]),
            logit_scale=float(data["logit_scale"]),
        )


# Hard-concrete gates (Louizos, Welling & Kingma, "Learning sparse neural networks through L0
# regularization", ICLR 2018): a binary-concrete sample at temperature HC_BETA, stretched to
# (HC_LOW, HC_HIGH) and clipped to [0, 1], so a gate is exactly 0 or 1 with non-zero probability and the
# expected number of non-zero gates is differentiable. The paper's constants.
HC_BETA, HC_LOW, HC_HIGH = 2 / 3, -0.1, 1.1
# An open hard-concrete gate passes W·sigmoid(0), what the frozen gates of phase 1 passed: the weights keep
# their scale and their gradients, so phase 2's learning rates mean the same with either gate.
HC_OPEN = 0.5


def hard_concrete_gate(log_alpha: Tensor, sample: bool) -> Tensor:
    """The gate for location ``log_alpha``: a random sample (training), or its deterministic value."""
    if sample:
        u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
        stretched = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / HC_BETA)
    else:
        stretched = torch.sigmoid(log_alpha)
    return (stretched * (HC_HIGH - HC_LOW) + HC_LOW).clamp(0.0, 1.0)


def hard_concrete_open(log_alpha: Tensor) -> Tensor:
    """Probability that the gate is not exactly zero: summed over gates, the expected L0 norm."""
    return torch.sigmoid(log_alpha - HC_BETA * math.log(-HC_LOW / HC_HIGH))


class _Gated:
    """Shared gate logic for GatedConv2d and GatedLinear (mixed into an nn.Conv2d / nn.Linear).

    States:
      * gated (training): ``score`` is a Parameter; weight used = W * sigmoid(S) [* mask].
      * folded (inference): ``score`` is None; ``weight`` already is the effective weight.
    ``mask`` (bool buffer or None) fixes pruned weights at exactly zero. ``train_mask`` is the
    transient top-K mask used by straight-through training (see training/train.py). ``hard_concrete``
    (transient, off outside phase 2's option): S is a hard-concrete location log α and the gate is
    ``HC_OPEN · hard_concrete_gate(S)``, sampled in training mode, instead of sigmoid(S).
    """

    weight: nn.Parameter
    score: nn.Parameter | None
    mask: Tensor | None
    train_mask: Tensor | None
    hard_concrete: bool
    training: bool

    def _init_gate(self, score_init: float) -> None:
        self.score = nn.Parameter(torch.full_like(self.weight, score_init))
        self.register_buffer("mask", None, persistent=False)  # masks ship folded into weights
        self.train_mask = None
        self.hard_concrete = False

    def gate(self) -> Tensor:
        if self.score is None:
            raise RuntimeError("layer is folded: it has no gate any more")
        if self.hard_concrete:
            return HC_OPEN * hard_concrete_gate(self.score, sample=self.training)
        return torch.sigmoid(self.score)

    def effective_weight(self) -> Tensor:
        if self.score is None:
            return self.weight
        gate = self.gate()
        if self.train_mask is not None:
            # Straight-through top-K: forward with the hard mask, backward as if every gate were
            # on, so pruned weights still learn whether they should come back (edge-popup style).
            gate = gate + (gate * self.train_mask - gate).detach()
        weight = self.weight * gate
        if self.mask is not None:
            weight = weight * self.mask
        return weight

    @torch.no_grad()
    def fold(self) -> None:
        """Bake gate and mask into ``weight`` and drop the score: an ordinary layer afterwards."""
        if self.score is None:
            return
        folded = self.effective_weight().detach().clone()
        self.score = None
        self.weight = nn.Parameter(folded, requires_grad=False)


class GatedConv2d(_Gated, nn.Conv2d):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, padding: int = 1,
                 score_init: float = 0.0) -> None:
        nn.Conv2d.__init__(self, in_ch, out_ch, kernel_size, padding=padding, bias=False)
        self._init_gate(score_init)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class GatedLinear(_Gated, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 score_init: float = 0.0) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_gate(score_init)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


GATED_TYPES = (GatedConv2d, GatedLinear)


def _bn(channels: int) -> nn.BatchNorm2d:
    # airbench: a fast-moving BN average suits the short schedule.
    return nn.BatchNorm2d(channels, momentum=0.4)


class ConvBlock(nn.Module):
    """conv → max-pool(2) → BN → GELU → conv → BN → GELU (airbench's block: pool early, convs cheap)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = GatedConv2d(in_ch, out_ch)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = _bn(out_ch)
        self.conv2 = GatedConv2d(out_ch, out_ch)
        self.bn2 = _bn(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.bn1(self.pool(self.conv1(x))))
        return F.gelu(self.bn2(self.conv2(x)))


class GatedNet(nn.Module):
    """32×32 RGB (normalised) → class logits. 32 → 16 → 8 → 4 spatially, then global max-pool."""

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        w1, w2, w3 = self.config.widths
        self.stem = GatedConv2d(3, self.config.stem_width)
        self.stem_bn = _bn(self.config.stem_width)
        self.block1 = ConvBlock(self.config.stem_width, w1)
        self.block2 = ConvBlock(w1, w2)
        self.block3 = ConvBlock(w2, w3)
        self.head = GatedLinear(w3, self.config.num_classes, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.stem_bn(self.stem(x)))
        x = self.block3(self.block2(self.block1(x)))
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.config.logit_scale

    # -- pruning helpers ---------------------------------------------------------------------
    def gated_layers(self) -> list[tuple[str, GatedConv2d | GatedLinear]]:
        """Prunable layers in a fixed order (module registration order): the order ties break by."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, GATED_TYPES)]

    def conv_chain(self) -> list[tuple[str, GatedConv2d, nn.BatchNorm2d, bool]]:
        """The convolutions in data order: (name, conv, its BatchNorm, max-pool between them).

        Each conv's output channels are the next conv's input channels (the last conv's feed the
        head after the global max-pool). Structured pruning and the compact executor both walk this.
        """
        chain: list[tuple[str, GatedConv2d, nn.BatchNorm2d, bool]] = [("stem", self.stem, self.stem_bn, False)]
        for index, block in enumerate((self.block1, self.block2, self.block3), start=1):
            chain.append((f"block{index}.conv1", block.conv1, block.bn1, True))
            chain.append((f"block{index}.conv2", block.conv2, block.bn2, False))
        return chain

    def fold(self) -> None:
        for _, layer in self.gated_layers():
            layer.fold()

    def set_masks(self, masks: dict[str, Tensor] | None) -> None:
        """Install fixed pruning masks (layer name → bool tensor), or remove them with None."""
        for name, layer in self.gated_layers():
            layer.mask = None if masks is None else masks[name].to(layer.weight.device)

    def set_train_masks(self, masks: dict[str, Tensor] | None) -> None:
        for name, layer in self.gated_layers():
            layer.train_mask = None if masks is None else masks[name]


def count_parameters(model: GatedNet) -> dict[str, int]:
    """Honest counts for the inference network: scores are training-only and not counted.

    total = prunable weights + everything never pruned (biases, BatchNorm affine parameters).
    nonzero = surviving prunable weights + every non-prunable parameter.
    """
    prunable = nonzero_prunable = 0
    for _, layer in model.gated_layers():
        weight = layer.effective_weight().detach()
        prunable += weight.numel()
        nonzero_prunable += int(torch.count_nonzero(weight))
    gated = {id(p) for _, layer in model.gated_layers() for p in (layer.weight, layer.score)}
    other = sum(p.numel() for p in model.parameters() if id(p) not in gated)
    return {"total": prunable + other, "prunable": prunable, "nonzero": nonzero_prunable + other}



TTA_LEVELS = (0, 1, 2)  # 0: none; 1: + mirror (2 views); 2: + mirror of two 1-pixel translations (6 views)
TTA_VIEWS = (1, 2, 6)  # forward passes per image at each level


def tta_logits(forward: Callable[[Tensor], Tensor], x: Tensor, level: int, rows_per_call: int = 0) -> Tensor:
    """airbench's test-time augmentation: 0 = the image; 1 = mean with its mirror; 2 = half that, half
    the mirrored pair of two 1-pixel reflect translations (6 views in all). ``rows_per_call``: see
    ``tta_logits_by_level``."""
    return tta_logits_by_level(forward, x, level, rows_per_call)[level]


def tta_views(x: Tensor, level: int) -> list[Tensor]:
    """The views ``tta_logits`` averages at ``level``, in order: the image, its mirror, then each of
    the two 1-pixel reflect translations followed by its mirror."""
    views = [x]
    if level >= 1:
        views.append(x.flip(-1))
    if level >= 2:
        padded = F.pad(x, (1,) * 4, mode="reflect")
        h, w = x.shape[-2:]
        for shifted in (padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]):
            views += [shifted, shifted.flip(-1)]
    return views


def _view_logits(forward: Callable[[Tensor], Tensor], views: list[Tensor], rows_per_call: int) -> list[Tensor]:
    """``forward`` of every view; views are stacked into one call while the call stays within
    ``rows_per_call`` rows (0: one call per view). Small batches gain most: at one image, six calls
    of one row cost 1.9-3.4x one call of six on 2 CPU cores (docs/engine.md)."""
    n = views[0].shape[0]
    per_call = max(1, rows_per_call // max(1, n))
    logits: list[Tensor] = []
    for i in range(0, len(views), per_call):
        group = views[i:i + per_call]
        stacked = group[0] if len(group) == 1 else torch.cat(group).contiguous(memory_format=torch.channels_last)
        logits += forward(stacked).split(n)
    return logits


def tta_logits_by_level(forward: Callable[[Tensor], Tensor], x: Tensor, up_to: int,
                        rows_per_call: int = 0) -> list[Tensor]:
    """The logits of every TTA level from 0 to ``up_to``, each exactly as ``tta_logits`` computes it: a
    level's views include the lower levels', so all of them cost what the highest one costs.
    ``rows_per_call`` > 0 runs several views in one forward pass of at most that many rows (the same
    arithmetic per image, up to the kernels' batch-size-dependent rounding); 0, one pass per view."""
    views = _view_logits(forward, tta_views(x, up_to), rows_per_call)
    levels = [views[0]]
    if up_to >= 1:
        levels.append(0.5 * levels[0] + 0.5 * views[1])
    if up_to >= 2:
        translated = sum(0.5 * views[i] + 0.5 * views[i + 1] for i in (2, 4)) / 2
        levels.append(0.5 * levels[1] + 0.5 * translated)
    return levels

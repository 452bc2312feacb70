"""Training, in the order the data flows: augment → phase 1 (the dense gated network, airbench94's
recipe) → phase 2 (prune to a keep ratio while fine-tuning, distilled from the dense network) →
evaluate (optionally with test-time augmentation) → BN recalibration.

Phase 1 follows KellerJordan/cifar10-airbench (airbench94.py): a frozen patch-whitening stem, dirac
init of the other convs, BatchNorm weights frozen with their biases at 64× the learning rate, Nesterov
SGD at batch 1024 on a summed loss with label smoothing 0.2, a warm-up / linear-decay schedule,
alternating flips + 2-pixel reflect translation, and a lookahead EMA every 5 steps. Gate scores stay
fixed in phase 1 (``gate_method='frozen'``) so the dense network gets the whole recipe.

Phase 2 learns the gates: for one target keep ratio, the kept share shrinks on Zhu & Gupta's cubic
schedule; each step keeps the global top-K by the gated weight |W·sigmoid(S)| with a straight-through
mask (pruned weights freeze, but their scores still get the gradient they would get if they were on,
so a weight the loss wants back can return). The mask is then fixed at the exact top-K and the
survivors fine-tune to convergence, distilled from the dense network's logits on the same batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.hardware import autocast
from core.model import HC_OPEN, GatedNet, hard_concrete_gate, hard_concrete_open, tta_logits, tta_logits_by_level
from training.prune import channel_masks, lamp, prune

log = logging.getLogger(__name__)

GATE_METHODS = ("frozen", "st_topk", "penalty", "none")
PHASE2_CRITERIA = ("gate_magnitude", "lamp")
PHASE2_SCHEDULES = ("linear", "hold")
PHASE2_GATES = ("sigmoid", "hard_concrete")
HC_RANKS = ("log_alpha", "effective")
# Bumped whenever a code change alters what training produces for the same flags, so that a work dir
# made by older code is refused instead of mixed in (prune-train records it with the flags).
# 2: whitening samples its 5,000 images at random instead of taking the first ones.
RECIPE_VERSION = 2


@dataclass
class TrainConfig:
    # -- phase 1: airbench94's recipe (values from airbench94.py unless said) -------------------------
    epochs: float = 30.0  # airbench94 uses 9.9 on 50k images; 30 won the validation ablation (README)
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 examples before the momentum normalisation (airbench's convention)
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 examples, decoupled from the learning rate
    bias_scaler: float = 64.0  # BatchNorm biases learn this much faster (their weights are frozen at 1)
    warmup: float = 0.23  # share of steps ramping the learning rate from lr_start to 1 ...
    lr_start: float = 0.2  # ... (as a multiple of lr) ...
    lr_end: float = 0.07  # ... then linearly down to this multiple at the last step
    label_smoothing: float = 0.2
    translate: int = 2  # reflect-padded random translation in pixels
    whiten: bool = True  # stem = frozen whitening filters from the training set's 3×3 patch covariance
    lookahead: bool = True  # EMA of the weights pulled back into the net every 5 steps (decay ramps up)
    # -- gates during phase 1 ------------------------------------------------------------------------
    gate_method: str = "frozen"  # frozen | st_topk | penalty | none (see GATE_METHODS and README)
    gate_lr: float = 0.003  # Adam on scores (st_topk / penalty)
    gate_dense_prob: float = 0.5  # st_topk: share of steps trained dense
    gate_min_keep: float = 0.03  # st_topk: random keep ratios are drawn from [this, 1] ...
    gate_keep_dist: str = "log"  # ... log-uniformly ("log") or uniformly ("uniform")
    gate_rank: str = "effective"  # st_topk masks rank by the score S ("score") or by |W·sigmoid(S)| ("effective")
    gate_start_epoch: int = 1  # st_topk: dense epochs first
    gate_penalty: float = 1.0  # penalty: weight of mean(sigmoid(S)), ramped up linearly from 0
    # -- where and how it runs (resolved by core.hardware before training) ----------------------
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; master weights stay float32)

    def to_dict(self) -> dict:
        return asdict(self)


# The network's first and last gated layers, which PruneConfig.dense_ends keeps whole.
END_LAYERS = ("stem", "head")


@dataclass
class PruneConfig:
    """Phase 2: one target keep, from the trained dense network."""

    # Optimiser steps in all (gradual pruning, then fixed-mask fine-tune). 600 beat 200 on validation by
    # 0.20 points at keep 0.1 and 1.26 at keep 0.05 (docs/training.md).
    steps: int = 600
    # Share of the steps over which the kept share falls (cubic) to the target; the rest fine-tunes the
    # fixed top-K. 0.75 beat 0.5 by 0.40 points at keep 0.1 on one batch seed, but paired over three it
    # scored 0.25 ± 0.57 below (docs/training.md): no gain shown, so the setting models/ was built with stays.
    prune_share: float = 0.5
    lr: float = 0.25  # peak learning rate as a multiple of the phase-1 lr
    gate_lr: float = 0.01  # Adam on the scores while pruning (0 = magnitude-only gradual pruning)
    distill: float = 0.5  # weight of the distillation term (0 = labels only)
    temperature: float = 2.0  # distillation temperature
    gradual: bool = True  # False: one-shot top-K at step 0, then fine-tune with that mask
    # What the top-K ranks while pruning: |W·sigmoid(S)| across the network (gate_magnitude) or its
    # per-layer LAMP normalisation (lamp: layer shares follow each layer's magnitude distribution).
    criterion: str = "gate_magnitude"
    # Phase 1's lookahead EMA (every 5 steps, same decay ramp) during phase 2 too. Off: 88.96 vs 88.96 %
    # on validation at keep 0.05 (docs/training.md).
    lookahead: bool = False
    # Test-time augmentation of the teacher's logits when distilling (core.model.tta_logits level: 0 = the
    # batch as the student sees it, 1 = averaged with its mirror). Level 1 makes the better classifier yet
    # the worse teacher: 89.08 vs 89.32 % on validation at keep 0.05 (docs/training.md), so 0.
    teacher_tta: int = 0
    # Learn the BatchNorm weights in phase 2 (phase 1 keeps them frozen at 1, as airbench does): a dense
    # per-channel gain beside the sparse weights, without weight decay.
    bn_weights: bool = False
    # Phase 2's weight decay as a multiple of phase 1's (per step, scaled with the learning rate as phase 1's).
    decay_scale: float = 1.0
    # Learning rate after the 5 % warm-up: "linear" decays to zero over all the steps; "hold" stays at the
    # peak while the mask still changes (the pruning ramp, or a channel ramp) and decays to zero over the
    # fixed-mask fine-tune only, as learning-rate rewinding (Renda et al. 2020) retrains at a high rate.
    # "hold" lost 0.22 points at keep 0.1 on validation, one run, inside the 0.66 that the batch seed alone
    # moved the default (docs/training.md).
    lr_schedule: str = "linear"
    # The gates while the mask falls: "sigmoid" (W·sigmoid(S) under the straight-through top-K of
    # |W·sigmoid(S)|) or "hard_concrete" (L0 gates, Louizos et al. 2018: S becomes the location log α of a
    # stochastic gate, sampled every step; a penalty holds the expected share of open gates down to the
    # cubic schedule, and when the mask is fixed the top-K ranks by log α alone: the gate decides). At keep
    # 0.1 hard_concrete scored 78.92 % on validation against 89.80 % (one seed; docs/training.md): sigmoid.
    gate_fn: str = "sigmoid"
    # hard_concrete: the log α every gate starts at. 3 is open (deterministic gate 1, the dense network
    # unchanged) and sampled below 1 on about a fifth of the steps.
    hc_init: float = 3.0
    # hard_concrete: strength of the penalty on the expected open share above the schedule (L0Budget). At
    # 100 an excess of 0.001 pushes a gate about as hard as the loss does (1e-3–2e-2 per log α at batch 1024).
    hc_penalty: float = 100.0
    # hard_concrete: what the final top-K ranks: "log_alpha" (the gate alone) or "effective" (|W · the
    # deterministic gate|, magnitude and gate together, as gate_magnitude ranks with sigmoid gates; it empties
    # the large layers, whose deterministic gates read 0 at low density: 10 % on validation at keep 0.1).
    hc_rank: str = "log_alpha"
    # Weight of a feature term beside the logit distillation (FitNets, Romero et al. 2015): the squared error
    # between the student's and the dense teacher's block outputs (FEATURE_BLOCKS), each block's term divided by
    # the teacher's mean square there, averaged over the blocks, summed over the batch like the other terms.
    # Weight pruning keeps every shape, so block i of the student answers block i of the teacher. 0 = off;
    # > 0 runs the teacher's forward pass every step (its block outputs are too big to cache). Weight 1 scored
    # +0.05 ± 0.14 points against 0 at keep 0.05 on validation, three paired batch seeds (docs/training.md): 0.
    feature_distill: float = 0.0
    # Keep the first and the last layer whole (END_LAYERS: the frozen whitening stem, 864 weights, and the
    # head, 2,560), as pruning papers usually do; their weights count towards the K. Pruned with the rest,
    # they kept 75 % / 77 % at keep 0.05, so this moves 0.9 % of all survivors. It scored +0.03 ± 0.37
    # points on validation at keep 0.05, three paired batch seeds (docs/training.md): off.
    dense_ends: bool = False
    # Sparse model soup (Zimmer et al. 2024): once the mask is final, fine-tune it this many times from the
    # same state, each on its own batches and augmentation, and average the weights. One mask, so the
    # average has exactly the same survivors; its cost is (soup - 1) more fixed-mask fine-tunes. 1 = off.
    # 3 scored +0.17 ± 0.09 points over the plain run at keep 0.05 and +0.51 ± 0.25 at keep 0.1 (three
    # paired batch seeds each) on validation, positive on each (docs/training.md). prune-train soups by default
    # (DEFAULT_SOUP); here 1, so a fine-tune is one fine-tune unless asked and ablations compare levers on one.
    soup: int = 1
    # Mixup on the distillation batches (Zhang et al. 2018), the "function matching" of Beyer et al. 2022
    # ("a good teacher is patient and consistent"): every step blends its batch with a shuffled copy of
    # itself at a share drawn from Beta(mixup, mixup), the teacher labels the blend, and the hard-label term
    # mixes the two labels at that share. It shows the student inputs between the training images, where
    # the teacher's answers carry the most it does not already fit. On the late-wide channel keep 0.625,
    # validation, one seed: −0.20 points at 300 steps, +0.16 at 900 steps with the teacher alone, for 3.4×
    # the time (docs/training.md): 0 = off.
    mixup: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Augmentation, on whole batches (random numbers drawn on the CPU: the same run on any device)
# ---------------------------------------------------------------------------------------------
def translate_batch(images: Tensor, shifts: Tensor, pad: int) -> Tensor:
    """Crop every image from its reflect-padded copy at offset ``shifts[i] = (dx, dy)`` in [0, 2·pad]:
    one gather, returned channels-last (which the convolutions want anyway)."""
    if pad <= 0:
        return images.contiguous(memory_format=torch.channels_last)
    n, _, h, w = images.shape
    padded = F.pad(images, (pad,) * 4, mode="reflect").permute(0, 2, 3, 1)  # [n, h+2p, w+2p, c]
    shifts = shifts.to(images.device)
    rows = torch.arange(h, device=images.device)[None, :] + shifts[:, 1:2]
    cols = torch.arange(w, device=images.device)[None, :] + shifts[:, 0:1]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment(images: Tensor, translate: int, generator: torch.Generator, flip: Tensor | None = None) -> Tensor:
    """Horizontal flip (random, or the given per-image choice) + random translation."""
    n = images.shape[0]
    if flip is None:
        flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    shifts = torch.randint(0, 2 * translate + 1, (n, 2), generator=generator)
    return translate_batch(images, shifts, translate)


# ---------------------------------------------------------------------------------------------
# Initialisation (airbench): whitening stem, dirac convs
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def whiten_stem(model: GatedNet, images: Tensor, eps: float = 5e-4) -> None:
    """Set the stem's filters to ± the top eigenvectors of the 3×3 patch covariance, each scaled by
    1/sqrt(eigenvalue): the first layer decorrelates pixels, so later layers learn faster."""
    conv = model.stem
    k = conv.kernel_size[0]
    c = images.shape[1]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k)
    cov = (patches.T @ patches) / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    eigenvalues, eigenvectors = eigenvalues.flip(0).float(), eigenvectors.T.flip(0).float()
    pairs = min(conv.out_channels // 2, c * k * k)
    filters = (eigenvectors[:pairs] / torch.sqrt(eigenvalues[:pairs, None] + eps)).view(pairs, c, k, k)
    conv.weight[:pairs] = filters.to(conv.weight)
    conv.weight[pairs:2 * pairs] = -filters.to(conv.weight)


@torch.no_grad()
def dirac_init(model: GatedNet) -> None:
    """Every conv after the stem starts as a partial identity (its first C_in filters pass the input
    through), so the untrained network is close to the whitened image, as in airbench."""
    for name, layer in model.gated_layers():
        if name != "stem" and layer.weight.dim() == 4:
            nn.init.dirac_(layer.weight[:layer.weight.size(1)])


WHITEN_IMAGES = 5000  # airbench's sample for the patch covariance


def prepare(model: GatedNet, cfg: TrainConfig, images: Tensor, seed: int) -> None:
    """Initialise a fresh model for phase 1 (deterministic given the seed)."""
    if cfg.whiten:
        # A random sample: a data set stored class by class (ImageFolder order) would otherwise
        # whiten on one class's patches (airplanes: mostly sky), not on the data set's.
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:WHITEN_IMAGES]
        whiten_stem(model, images[pick.to(images.device)])
    dirac_init(model)


# ---------------------------------------------------------------------------------------------
# Straight-through top-K masks for training
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sampled_train_masks(model: GatedNet, keep: float, rank: str = "score",
                        dense: Iterable[str] = ()) -> dict[str, Tensor]:
    """Global top-K at ``keep`` by the score S (rank='score', the `gate` criterion), by the effective
    weight |W·sigmoid(S)| (rank='effective', the `gate_magnitude` criterion) or by its per-layer LAMP
    normalisation (rank='lamp'). The threshold comes from a strided sample: cheap, and within a fraction
    of a percent of the exact K. Layers named in ``dense`` stay whole and count towards the K."""
    dense = set(dense)
    layers = model.gated_layers()
    ranked = [(name, layer) for name, layer in layers if name not in dense]
    if rank == "effective":
        ranks = {name: (layer.weight * layer.gate()).abs() for name, layer in ranked}
    elif rank == "lamp":
        ranks = {name: lamp((layer.weight * layer.gate()).abs()) for name, layer in ranked}
    else:
        ranks = {name: layer.score.detach() for name, layer in ranked}
    whole = sum(layer.weight.numel() for name, layer in layers if name in dense)
    if whole:  # the share left to the ranked layers
        total = whole + sum(r.numel() for r in ranks.values())
        keep = max(0.0, (keep * total - whole) / (total - whole))
    flat = torch.cat([r.flatten() for r in ranks.values()])
    sample = flat[:: max(1, len(flat) // 200_000)].float()
    k = max(1, int(round((1 - keep) * len(sample))))
    threshold = sample.kthvalue(k).values
    return {name: (ranks[name] > threshold).to(layer.weight.dtype) if name in ranks
            else torch.ones_like(layer.weight) for name, layer in layers}


def _draw_keep(cfg: TrainConfig, generator: torch.Generator) -> float:
    if torch.rand(1, generator=generator).item() < cfg.gate_dense_prob:
        return 1.0
    u = torch.rand(1, generator=generator).item()
    if cfg.gate_keep_dist == "uniform":
        return cfg.gate_min_keep + (1 - cfg.gate_min_keep) * u
    return math.exp(math.log(cfg.gate_min_keep) * (1 - u))


# ---------------------------------------------------------------------------------------------
# Optimiser (airbench's scaling)
# ---------------------------------------------------------------------------------------------
def _sgd(model: GatedNet, cfg: TrainConfig, lr_multiple: float = 1.0, decay_scale: float = 1.0) -> torch.optim.SGD:
    """Nesterov SGD on a *summed* loss. airbench divides the per-1024 rates by 1024·(1 + 1/(1 − momentum))
    so that a step's size does not depend on the momentum; weight decay is set so the per-step decay
    is ``weight_decay · batch / kilostep`` whatever the group's learning rate. BN weights, where they
    learn at all (phase 2 with ``PruneConfig.bn_weights``), get the base rate and no decay."""
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr = cfg.lr / kilostep * lr_multiple
    decay = cfg.weight_decay * cfg.batch_size / kilostep * lr_multiple * decay_scale
    bn_bias_ids = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    bn_weight_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    bn_biases, bn_weights, others = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.endswith(".score"):
            continue
        (bn_biases if id(p) in bn_bias_ids else bn_weights if id(p) in bn_weight_ids else others).append(p)
    groups = [{"params": others, "lr": lr, "weight_decay": decay / lr, "base_lr": lr}]
    if bn_weights:
        groups.append({"params": bn_weights, "lr": lr, "weight_decay": 0.0, "base_lr": lr})
    if bn_biases:
        bias_lr = lr * cfg.bias_scaler
        groups.append({"params": bn_biases, "lr": bias_lr, "weight_decay": decay / bias_lr, "base_lr": bias_lr})
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """airbench's schedule: lr_start → 1 over the warm-up share of steps, then linearly to lr_end."""
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        frac = step / warm
        return cfg.lr_start * (1 - frac) + frac
    frac = (step - warm) / max(1, total - warm)
    return (1 - frac) + cfg.lr_end * frac


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def _learn_bn_weights(model: GatedNet, learn: bool) -> None:
    """airbench freezes the BN weights (at 1); phase 2 may learn them (``PruneConfig.bn_weights``)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.requires_grad_(learn)


class Lookahead:
    """airbench's lookahead: every 5 steps the EMA moves towards the net and the net is reset to it."""

    EVERY = 5  # optimiser steps between updates

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        if decay >= 1.0 and self.updates == 0:
            return  # never averaged (a run shorter than 5 steps): keep the trained weights
        self.updates += 1
        current = model.state_dict()
        for key, ema in self.state.items():
            ema.lerp_(current[key], 1 - decay)
            current[key].copy_(ema)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Call after optimiser step ``step`` (counted from 1): every EVERY steps, with a decay that ramps
        up over training (airbench's schedule)."""
        if step % self.EVERY == 0:
            self.update(model, decay=0.95 ** self.EVERY * (step / total_steps) ** 3)

    def finish(self, model: nn.Module) -> None:
        self.update(model, decay=1.0)  # end on the averaged weights


def _grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _step(loss: Tensor, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        for opt in optimizers:
            opt.step()
        return
    scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()


# ---------------------------------------------------------------------------------------------
# Phase 1: the dense gated network
# ---------------------------------------------------------------------------------------------
def _torch_save_atomic(state: dict, path: Path) -> None:
    """Write ``path`` whole or not at all: a run killed mid-write leaves the previous save intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def epoch_history(state: dict) -> list[dict]:
    """The per-epoch log stored in a phase-1 checkpoint (a tensor of rows, for ``weights_only`` loading)."""
    return [dict(zip(state["history_keys"], row)) for row in state["history"].tolist()]


def train(
    model: GatedNet,
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` (already on the images' device) on normalised ``images``; resumable.

    Returns one log entry per epoch (loss, seconds). A checkpoint ``epoch-NN.pt`` (tensors only,
    loaded with ``weights_only=True``) is written after each epoch and resumed from when present.
    """
    if cfg.gate_method not in GATE_METHODS:
        raise ValueError(f"unknown gate method {cfg.gate_method!r}; choose from {', '.join(GATE_METHODS)}")
    device = images.device
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    prepare(model, cfg, images, seed)
    _learn_bn_weights(model, False)
    if cfg.whiten:
        model.stem.weight.requires_grad_(False)
    scores = [layer.score for _, layer in model.gated_layers()]
    for s in scores:
        s.requires_grad_(cfg.gate_method != "frozen")
    optimizer = _sgd(model, cfg)
    score_optimizer = None
    if cfg.gate_method in ("st_topk", "penalty"):
        score_optimizer = torch.optim.Adam(scores, lr=cfg.gate_lr)
        for group in score_optimizer.param_groups:
            group["base_lr"] = cfg.gate_lr
    elif cfg.gate_method == "none":  # the reference: scores trained by the loss alone, same optimiser
        group = dict(optimizer.param_groups[0])
        optimizer.add_param_group({"params": scores, "lr": group["lr"], "weight_decay": 0.0,
                                   "base_lr": group["base_lr"]})
    optimizers = [o for o in (optimizer, score_optimizer) if o is not None]
    scaler = _grad_scaler(cfg.precision, device)
    steps_per_epoch = len(labels) // cfg.batch_size  # drop the ragged last batch: steady BN statistics
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    lookahead = Lookahead(model) if cfg.lookahead else None
    flip_base = torch.rand(len(labels), generator=generator) < 0.5  # airbench: flips alternate per epoch
    history: list[dict] = []

    start_epoch = 0
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        done = sorted(checkpoint_dir.glob("epoch-*.pt"))
        if done:
            state = torch.load(done[-1], map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if score_optimizer is not None:
                score_optimizer.load_state_dict(state["score_optimizer"])
            if lookahead is not None:
                lookahead.state = state["lookahead"]
                lookahead.updates = start_epoch * steps_per_epoch // Lookahead.EVERY
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            generator.set_state(state["generator"].cpu())  # map_location moved it to the device
            torch.set_rng_state(state["torch_rng"].cpu())
            history = epoch_history(state)
            start_epoch = int(state["epoch"])

    model.train()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, math.ceil(cfg.epochs)):
        began = time.perf_counter()
        order = torch.randperm(len(labels), generator=generator)
        loss_sum = torch.zeros((), device=device)
        steps_run = 0
        for i in range(steps_per_epoch):
            if step >= total_steps:
                break
            factor = _lr_factor(step, total_steps, cfg)
            for opt in optimizers:
                _set_lr(opt, factor)
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            flip = flip_base[idx] ^ bool(epoch % 2)
            batch = augment(images[idx.to(device)], cfg.translate, generator, flip)
            target = labels[idx.to(device)]

            masked = cfg.gate_method == "st_topk" and epoch >= cfg.gate_start_epoch
            keep = _draw_keep(cfg, generator) if masked else 1.0
            model.set_train_masks(sampled_train_masks(model, keep, cfg.gate_rank) if keep < 1.0 else None)
            with autocast(device, cfg.precision):
                loss = F.cross_entropy(model(batch), target, label_smoothing=cfg.label_smoothing,
                                       reduction="sum")
            if cfg.gate_method == "penalty":
                gates = torch.cat([layer.gate().flatten() for _, layer in model.gated_layers()])
                loss = loss + len(idx) * cfg.gate_penalty * (step / total_steps) * gates.mean()
            _step(loss, optimizers, scaler)
            step += 1
            steps_run += 1
            if lookahead is not None:
                lookahead.after_step(model, step, total_steps)
            loss_sum += loss.detach() / len(idx)
        if lookahead is not None and step >= total_steps:
            lookahead.finish(model)
        model.set_train_masks(None)

        entry = {"epoch": epoch + 1, "loss": loss_sum.item() / max(1, steps_run),
                 "seconds": time.perf_counter() - began}
        history.append(entry)
        if checkpoint_dir is not None:
            keys = list(entry)
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "score_optimizer": score_optimizer.state_dict() if score_optimizer is not None else {},
                "lookahead": lookahead.state if lookahead is not None else {},
                "scaler": scaler.state_dict() if scaler is not None else {},
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                "history": torch.tensor([[h[k] for k in keys] for h in history], dtype=torch.float64),
                "history_keys": keys,
            }
            _torch_save_atomic(state, checkpoint_dir / f"epoch-{epoch + 1:02d}.pt")
            for old in checkpoint_dir.glob("epoch-*.pt"):  # keep only the newest: they are large
                if old.name != f"epoch-{epoch + 1:02d}.pt":
                    old.unlink()
        if progress is not None:
            progress(epoch + 1, entry)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Phase 2: prune to a keep ratio while fine-tuning, distilled from the dense network
# ---------------------------------------------------------------------------------------------
def _distill_loss(logits: Tensor, teacher: Tensor | None, target: Tensor, cfg: TrainConfig,
                  pcfg: PruneConfig, mixed: tuple[Tensor, float] | None = None) -> Tensor:
    """Summed over the batch: (1 − a)·CE(labels, smoothed) + a·T²·KL(teacher_T ‖ student_T). ``mixed``
    (the blended-in images' labels and their share, see ``mix_batch``): the hard term mixes the two labels' terms."""
    hard = F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing, reduction="sum")
    if mixed is not None:
        other, share = mixed
        hard = (1 - share) * hard + share * F.cross_entropy(logits, other, label_smoothing=cfg.label_smoothing,
                                                            reduction="sum")
    if teacher is None or pcfg.distill <= 0:
        return hard
    t = pcfg.temperature
    soft = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                    log_target=True, reduction="sum") * t * t
    return (1 - pcfg.distill) * hard + pcfg.distill * soft


def mix_batch(batch: Tensor, labels: Tensor, concentration: float,
              generator: torch.Generator) -> tuple[Tensor, tuple[Tensor, float]]:
    """Mixup: ``batch`` blended with a shuffled copy of itself at one share drawn from Beta(c, c) (drawn
    with ``generator``, so a run repeats and resumes exactly); returns the blend and (the shuffled copy's
    labels, its share)."""
    # torch draws Beta only from its global generator: numpy's, seeded from ``generator``, leaves that alone
    share = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator))).beta(
        concentration, concentration))
    order = torch.randperm(len(batch), generator=generator).to(batch.device)
    return (1 - share) * batch + share * batch[order], (labels[order], share)


# The GatedNet modules whose outputs PruneConfig.feature_distill matches: the three conv blocks (16×16, 8×8
# and 4×4 maps after BN and GELU), the representation the head's global max-pool reads from last.
FEATURE_BLOCKS = ("block1", "block2", "block3")


class BlockOutputs:
    """Forward hooks that keep the outputs of ``FEATURE_BLOCKS`` from a network's latest forward pass; as a
    context manager, removed on leaving it, whatever happened inside."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, Tensor] = {}
        self._handles = [getattr(model, name).register_forward_hook(self._keeper(name)) for name in FEATURE_BLOCKS]

    def _keeper(self, name: str) -> Callable:
        def keep(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self.outputs[name] = output
        return keep

    def take(self) -> list[Tensor]:
        """The kept outputs in FEATURE_BLOCKS order; forgets them (they hold the batch's activations)."""
        return [self.outputs.pop(name) for name in FEATURE_BLOCKS]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> BlockOutputs:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def feature_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Summed over the batch: each block's per-image mean squared error over the teacher's mean square
    (so every block weighs the same whatever its scale), averaged over the blocks."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        t = t.float()
        terms.append((s.float() - t).pow(2).flatten(1).mean(1).sum() / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


class Teacher:
    """A frozen copy of the dense network that phase 2 distils from, its targets computed once.

    Every phase-2 run of a seed draws the same batches (its generator is seeded by the seed alone), so
    the fine-tunes of one seed's sweep distil from the same logits: one Teacher shared across them runs
    the teacher's forward pass once per step for the whole sweep instead of once per step per variant
    (1.61 → 1.26 s per bf16 step on a 2-core AMD EPYC; docs/training.md). The cache is exact: a step's
    logits are looked up only for the same teacher weights, data, seed, step, batch settings, precision,
    device and TTA level.

    ``path``: the cache also lives on disk (``save`` writes it; a run calls it with every progress save
    and at its end), so a restarted sweep does not pay the teacher's forward passes again (a fifth of a
    CPU fine-tune's steps). Entries are named by a digest of everything above, so one file serves any
    run with that teacher; an unreadable file is ignored and rewritten.
    """

    def __init__(self, model: nn.Module, path: Path | None = None) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.path = Path(path) if path is not None else None
        self._weights = _digest(*self.model.state_dict().values())
        self._data_ids: dict[tuple, str] = {}
        self._logits: dict[str, Tensor] = self._load()
        self._unsaved = 0

    def _load(self) -> dict[str, Tensor]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in saved.items()):
                raise ValueError("not a map of names to tensors")
        except Exception as exc:  # noqa: BLE001 - a damaged cache costs recomputation, never the run
            log.warning("teacher: ignoring unreadable logit cache %s (%s)", self.path, exc)
            return {}
        return saved

    def data_id(self, images: Tensor, labels: Tensor) -> str:
        """A digest of the training data, computed once per tensor pair (hashing 0.1 GB takes ~0.1 s)."""
        key = (images.data_ptr(), tuple(images.shape), labels.data_ptr(), tuple(labels.shape))
        if key not in self._data_ids:
            self._data_ids[key] = _digest(images, labels)
        return self._data_ids[key]

    @torch.no_grad()
    def features(self, batch: Tensor) -> list[Tensor]:
        """The teacher's ``FEATURE_BLOCKS`` outputs for ``batch`` (computed afresh: not cached)."""
        with BlockOutputs(self.model) as hooks:
            self.model(batch)
            return hooks.take()

    @torch.no_grad()
    def logits(self, batch: Tensor, key: tuple, tta: int) -> Tensor:
        """The teacher's logits for ``batch``; ``key`` names the batch uniquely (see prune_finetune)."""
        name = hashlib.sha256(repr((self._weights, *key, tta)).encode()).hexdigest()
        if name not in self._logits:
            self._logits[name] = tta_logits(self.model, batch, tta)
            self._unsaved += 1
        return self._logits[name].to(batch.device)

    def save(self) -> None:
        """Write the cache to ``path`` whole or not at all (nothing to do without a path or new entries)."""
        if self.path is None or not self._unsaved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _torch_save_atomic({k: v.cpu() for k, v in self._logits.items()}, self.path)
        self._unsaved = 0


def _digest(*tensors: Tensor) -> str:
    """sha256 over the tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Hard-concrete (L0) gates while phase 2 prunes (PruneConfig.gate_fn = "hard_concrete")
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def enter_hard_concrete(model: GatedNet, log_alpha: float) -> None:
    """Every gate becomes a hard-concrete gate at location ``log_alpha``; the sigmoid gate so far is folded
    into W (over HC_OPEN), so with open gates the deterministic network is the one before."""
    for _, layer in model.gated_layers():
        layer.weight.mul_(layer.gate() / HC_OPEN)
        layer.score.fill_(log_alpha)
        layer.hard_concrete = True


@torch.no_grad()
def leave_hard_concrete(model: GatedNet) -> None:
    """Back to sigmoid gates at S = 0 (gate HC_OPEN), each gate's deterministic hard-concrete value folded
    into W: the deterministic network is unchanged, and checkpoints, folding and fine-tuning work as ever."""
    for _, layer in model.gated_layers():
        layer.weight.mul_(hard_concrete_gate(layer.score, sample=False))
        layer.score.zero_()
        layer.hard_concrete = False


class L0Budget:
    """Holds the hard-concrete gates' expected open share down to the schedule: a one-sided quadratic
    penalty ``strength/2 · N · max(0, open share − scheduled share)²`` on N gates, so every gate's log α
    feels ``strength · excess ·`` its own probability density while the share is above schedule, and
    nothing once it is not. (A Lagrange multiplier raised by dual ascent was tried first: the gates,
    started alike and moved alike by Adam, close together, and the multiplier drained too slowly to stop
    them; the open share fell to 0.05 while the schedule stood at 0.37.)"""

    def __init__(self, model: GatedNet, strength: float) -> None:
        self.scores = [layer.score for _, layer in model.gated_layers()]
        self.total = sum(s.numel() for s in self.scores)
        self.strength = strength
        self.open_share = 1.0

    def penalty(self, target_share: float) -> Tensor:
        expected = sum(hard_concrete_open(s).sum() for s in self.scores)
        self.open_share = expected.item() / self.total
        excess = (expected / self.total - target_share).clamp_min(0.0)
        return 0.5 * self.strength * self.total * excess ** 2


CHANNEL_RAMP_EVERY = 10  # steps between width updates while channel variants narrow gradually


@dataclass
class Phase2Checkpoint:
    """Where a phase-2 run saves its progress every ``every`` steps, so a run cut mid-variant (a CPU
    fine-tune takes half an hour) resumes at its last save instead of at step 0, ending bitwise where an
    uncut run ends. A saved state made with other settings (keep, seed, configs, ranking inputs) is ignored.
    ``prune_finetune`` fills in ``resumed_step`` and ``earlier_seconds`` (compute spent before, up to that
    save); the caller deletes ``path`` once the variant's result is recorded."""

    path: Path
    every: int = 50
    resumed_step: int = 0
    earlier_seconds: float = 0.0


def _phase2_fingerprint(keep: float, cfg: TrainConfig, pcfg: PruneConfig, seed: int, **inputs: object) -> str:
    """What a phase-2 run's path depends on, as text: a saved state is resumed only by the run that made it.
    Tensors are told apart by shape and by the sums of an evenly strided sample (the data set is 0.5 GB)."""

    def describe(t: Tensor) -> tuple:
        flat = t.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 65536)].double()
        return tuple(t.shape), f"{sample.sum():.9g}", f"{sample.abs().sum():.9g}"  # rounded: summation order

    described = {k: (sorted((n, *describe(t)) for n, t in v.items()) if isinstance(v, dict) else v)
                 for k, v in inputs.items()}
    return repr((keep, seed, cfg.to_dict(), pcfg.to_dict(), sorted(described.items())))


def _save_phase2(ckpt: Phase2Checkpoint, step: int, model: GatedNet, masks: dict[str, Tensor] | None,
                 optimizers: dict[str, torch.optim.Optimizer | None], lookahead: Lookahead | None,
                 scaler: torch.amp.GradScaler | None, generator: torch.Generator, fingerprint: str,
                 seconds: float, soup: dict) -> None:
    state = {
        "fingerprint": fingerprint, "step": step, "seconds": seconds, "model": model.state_dict(),
        # The soup ingredient this step belongs to, the state every ingredient starts at, the finished
        # ingredients, and the share of the run's steps (all ingredients') done.
        "soup": soup,
        # Masks are not in the state dict: the installed ones (a fixed top-K, a channel ramp's width) and
        # the final ones once chosen.
        "installed": {n: layer.mask for n, layer in model.gated_layers() if layer.mask is not None},
        "masks": masks if masks is not None else {},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items() if o is not None},
        "lookahead": ({"state": lookahead.state, "updates": lookahead.updates} if lookahead is not None else {}),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        # hard-concrete noise on a GPU comes from its own generator
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else torch.empty(0, dtype=torch.uint8),
    }
    ckpt.path.parent.mkdir(parents=True, exist_ok=True)
    _torch_save_atomic(state, ckpt.path)


def _load_phase2(ckpt: Phase2Checkpoint, fingerprint: str, device: torch.device) -> dict | None:
    if not ckpt.path.exists():
        return None
    try:
        state = torch.load(ckpt.path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged save costs its progress, never the run
        log.warning("phase 2: ignoring unreadable progress file %s (%s)", ckpt.path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("phase 2: ignoring %s, saved by a run with other settings", ckpt.path)
        return None
    return state


def _kept_share(step: int, total: int, keep: float, share: float, start: float = 1.0) -> float:
    """Zhu & Gupta's cubic schedule: from ``start`` down to ``keep`` over the first ``share`` of the steps."""
    span = max(1, int(share * total))
    frac = min(1.0, step / span)
    return keep + (start - keep) * (1 - frac) ** 3


def _phase2_lr_factor(step: int, total: int, hold_until: int = 0) -> float:
    """Short warm-up (5 % of the steps), then the peak until step ``hold_until`` (0: not at all), then
    linear decay to zero at the last step: converge on the final mask."""
    warm = max(1, total // 20)
    if step < warm:
        return step / warm
    decay_from = max(warm, hold_until)
    return 1.0 if step < decay_from else (total - step) / max(1, total - decay_from)


def prune_finetune(
    model: GatedNet,
    images: Tensor,
    labels: Tensor,
    keep: float,
    cfg: TrainConfig,
    pcfg: PruneConfig,
    seed: int,
    teacher: nn.Module | Teacher | None = None,
    masks: dict[str, Tensor] | None = None,
    scope: str = "global",
    floor: float = 0.0,
    channel_scores: dict[str, Tensor] | None = None,
    channel_ramp: float = 0.0,
    start_keep: float = 1.0,
    progress: Phase2Checkpoint | None = None,
    ingredients: list[dict[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Prune ``model`` to ``keep`` and fine-tune it (phase 2); returns the final masks, installed.

    ``masks`` given (channel variants): those masks are installed from the start and only fine-tuned;
    with ``channel_ramp`` > 0 and the ``channel_scores`` that ranked them, the width instead falls from
    all channels to ``keep`` on the cubic schedule over that share of the steps (the top channels by
    those scores at every step, so the removed ones are always the final mask's), then ``masks`` hold.
    Else gradual (``pcfg.gradual``): the kept share falls on a cubic schedule with straight-through
    top-K masks by |W·sigmoid(S)|, scores learning at ``pcfg.gate_lr``; after ``prune_share`` of the
    steps the exact top-K is fixed. One-shot: the exact top-K from step 0. ``start_keep`` < 1: the
    model is already pruned to that share (its pruned weights zero, no masks installed; see
    ``bake_masks``) and the gradual schedule falls from there instead of from 1.

    ``pcfg.gate_fn`` "hard_concrete" (gradual, gates learning): instead of straight-through masks, every
    gate is a hard-concrete sample of its log α while the mask falls, the expected open share held down
    to the schedule by ``L0Budget``; the fixed top-K ranks by log α, then the gates go back to sigmoid ones.

    ``teacher``: the dense network to distil from; pass one ``Teacher`` to every run of a sweep to
    compute its logits once (a plain module gets a Teacher of its own). ``progress``: save the run's state
    every ``progress.every`` steps and resume from a save this same run made (see ``Phase2Checkpoint``).

    ``pcfg.soup`` > 1: from the step the mask is final (after the pruning ramp or the channel ramp; step 0
    otherwise) the fine-tune runs ``soup`` times from the same state, the first on the run's own batches
    (so it ends where ``soup`` 1 ends), the others each on batches from a generator of their own; the model
    ends as the average of their weights and BN statistics. ``ingredients``, a list, receives each fine-tune's
    final state dict, in order. Progress saves cover a soup: a cut run resumes in the ingredient it was in.
    """
    if pcfg.criterion not in PHASE2_CRITERIA:
        raise ValueError(f"phase 2 ranks by one of {', '.join(PHASE2_CRITERIA)}, not {pcfg.criterion!r}")
    if pcfg.lr_schedule not in PHASE2_SCHEDULES:
        raise ValueError(f"phase 2's lr schedule is one of {', '.join(PHASE2_SCHEDULES)}, not {pcfg.lr_schedule!r}")
    if pcfg.gate_fn not in PHASE2_GATES:
        raise ValueError(f"phase 2's gates are one of {', '.join(PHASE2_GATES)}, not {pcfg.gate_fn!r}")
    if pcfg.hc_rank not in HC_RANKS:
        raise ValueError(f"hard-concrete gates rank by one of {', '.join(HC_RANKS)}, not {pcfg.hc_rank!r}")
    if pcfg.gate_fn == "hard_concrete" and masks is None and pcfg.gradual and pcfg.gate_lr <= 0:
        raise ValueError("hard-concrete gates are learned: give them a gate learning rate above 0")
    if pcfg.feature_distill < 0:
        raise ValueError(f"the feature term's weight is 0 or more, not {pcfg.feature_distill}")
    if pcfg.feature_distill > 0 and teacher is None:
        raise ValueError("the feature term matches the teacher's block outputs: give phase 2 a teacher")
    if pcfg.dense_ends and pcfg.gate_fn == "hard_concrete":
        raise ValueError("dense_ends keeps the end layers whole; hard-concrete gates would still sample them off")
    if pcfg.soup < 1:
        raise ValueError(f"a soup averages 1 or more fine-tunes, not {pcfg.soup}")
    if pcfg.mixup < 0:
        raise ValueError(f"mixup's Beta concentration is 0 (off) or more, not {pcfg.mixup}")
    dense = END_LAYERS if pcfg.dense_ends else ()
    device = images.device
    began = time.perf_counter()
    fingerprint = None
    if progress is not None:  # of everything the run's path depends on, taken before anything changes
        start_state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        fingerprint = _phase2_fingerprint(keep, cfg, pcfg, seed, scope=scope, floor=floor, start_keep=start_keep,
                                          channel_ramp=channel_ramp, masks=masks or {},
                                          channel_scores=channel_scores or {}, model=start_state,
                                          data={"images": images, "labels": labels})

    def soup_batches(ingredient: int) -> torch.Generator:
        """Where an ingredient's batches and augmentation come from (ingredient 0: the plain run's)."""
        return torch.Generator().manual_seed(seed + 7919 + 1_000_003 * ingredient)

    generator = soup_batches(0)
    if teacher is not None and not isinstance(teacher, Teacher):
        teacher = Teacher(teacher)
    _learn_bn_weights(model, pcfg.bn_weights)
    scores = [layer.score for _, layer in model.gated_layers()]
    learn_gates = masks is None and pcfg.gradual and pcfg.gate_lr > 0
    for s in scores:
        s.requires_grad_(False)
    optimizer = _sgd(model, cfg, pcfg.lr, pcfg.decay_scale)
    score_optimizer = None
    if learn_gates:
        for s in scores:
            s.requires_grad_(True)
        score_optimizer = torch.optim.Adam(scores, lr=pcfg.gate_lr)
        for group in score_optimizer.param_groups:
            group["base_lr"] = pcfg.gate_lr
    scaler = _grad_scaler(cfg.precision, device)
    lookahead = Lookahead(model) if pcfg.lookahead else None

    fixed_from = int(pcfg.prune_share * pcfg.steps) if (masks is None and pcfg.gradual) else 0
    ramp_until = int(channel_ramp * pcfg.steps) if (masks is not None and channel_scores is not None) else 0
    budget = None
    if learn_gates and pcfg.gate_fn == "hard_concrete" and fixed_from > 0:
        torch.manual_seed(seed + 104729)  # the gates' noise: the same run repeats exactly
        enter_hard_concrete(model, pcfg.hc_init)
        budget = L0Budget(model, pcfg.hc_penalty)

    def fix_mask() -> dict[str, Tensor]:
        """The final top-K, installed: after hard-concrete gates by ``pcfg.hc_rank``, else by ``pcfg.criterion``."""
        model.set_train_masks(None)
        if budget is None:
            return prune(model, pcfg.criterion, keep, scope, floor, seed, dense)
        model.eval()  # the deterministic gates, not samples
        final = prune(model, "gate" if pcfg.hc_rank == "log_alpha" else "gate_magnitude", keep, scope, floor, seed,
                      dense)
        model.train()
        leave_hard_concrete(model)  # the installed masks stay valid: W and S change, their shapes do not
        return final

    if masks is not None:
        model.set_masks(masks if ramp_until == 0 else None)
    elif fixed_from == 0:
        masks = prune(model, pcfg.criterion, keep, scope, floor, seed, dense)
    start, first_ingredient = 0, 0
    soup_start: dict | None = None  # the state every soup ingredient fine-tunes from
    done: list[dict[str, Tensor]] = []  # the soup's finished ingredients
    saved = _load_phase2(progress, fingerprint, device) if progress is not None else None
    if saved is not None:
        start = int(saved["step"])
        model.load_state_dict(saved["model"])
        model.set_masks(saved["installed"] or None)
        if saved["masks"]:
            masks = saved["masks"]
        if budget is not None:  # hard-concrete gates until the mask was fixed (fix_mask leaves them)
            for _, layer in model.gated_layers():
                layer.hard_concrete = masks is None
        if score_optimizer is not None and masks is not None:  # the mask was fixed before the save
            for s in scores:
                s.requires_grad_(False)
            score_optimizer = None
        for name, opt in (("sgd", optimizer), ("scores", score_optimizer)):
            if opt is not None:
                opt.load_state_dict(saved["optimizers"][name])
        if lookahead is not None:
            lookahead.state, lookahead.updates = saved["lookahead"]["state"], saved["lookahead"]["updates"]
        if scaler is not None and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["generator"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        if saved["cuda_rng"].numel() and device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"].cpu())
        progress.resumed_step, progress.earlier_seconds = start, float(saved["seconds"])
        soup = saved.get("soup") or {"ingredient": 0, "start": {}, "done": []}  # (saves from before soups)
        first_ingredient, soup_start, done = int(soup["ingredient"]), soup["start"] or None, soup["done"]
        log.info("phase 2: resumed at step %d of %d from %s", start, pcfg.steps, progress.path)
    final_from = max(fixed_from, ramp_until)  # the first step on the final mask

    def take_step(step: int, batches: torch.Generator, ingredient: int) -> None:
        """One optimiser step on a batch drawn from ``batches`` (the masks as the caller installed them)."""
        factor = _phase2_lr_factor(step, pcfg.steps, final_from if pcfg.lr_schedule == "hold" else 0)
        optimizers = [o for o in (optimizer, score_optimizer) if o is not None]
        for opt in optimizers:
            _set_lr(opt, factor)
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=batches).to(device)
        batch = augment(images[idx], cfg.translate, batches)
        mixed = None
        if pcfg.mixup > 0:  # drawn apart from ``batches``: the run sees the same images as without mixup
            mixing = torch.Generator().manual_seed(seed * 1_000_003 + ingredient * 7919 + step + 1)
            batch, mixed = mix_batch(batch, labels[idx], pcfg.mixup, mixing)
        with autocast(device, cfg.precision):
            teacher_logits = None
            if teacher is not None and pcfg.distill > 0:
                # Everything that decides this step's batch, and the teacher's arithmetic on it.
                key = (teacher.data_id(images, labels), seed, step, cfg.batch_size, cfg.translate,
                       cfg.precision, device.type) + ((("soup", ingredient),) if ingredient else ()) + (
                    (("mixup", pcfg.mixup),) if pcfg.mixup > 0 else ())
                teacher_logits = teacher.logits(batch, key, pcfg.teacher_tta)
            # The student's blocks are hooked for this forward pass only: an error leaves no hook behind.
            with BlockOutputs(model) if pcfg.feature_distill > 0 else contextlib.nullcontext() as blocks:
                logits = model(batch)
            loss = _distill_loss(logits, teacher_logits, labels[idx], cfg, pcfg, mixed)
            if blocks is not None:
                loss = loss + pcfg.feature_distill * feature_loss(blocks.take(), teacher.features(batch))
        hard_concrete = budget is not None and step < fixed_from
        if hard_concrete:
            loss = loss + budget.penalty(share)
        _step(loss, optimizers, scaler)
        if hard_concrete and step % 25 == 0:
            log.info("step %d: expected open share %.4f (scheduled %.4f)", step, budget.open_share, share)
        if lookahead is not None:
            lookahead.after_step(model, step + 1, pcfg.steps)

    model.train()
    tail = max(0, pcfg.steps - final_from)  # steps on the final mask: every further soup ingredient's
    total_work = pcfg.steps + (pcfg.soup - 1) * tail

    def save_progress(step: int, ingredient: int, batches: torch.Generator) -> None:
        work = pcfg.steps + (ingredient - 1) * tail + step - final_from if ingredient else step
        _save_phase2(progress, step, model, masks, {"sgd": optimizer, "scores": score_optimizer}, lookahead,
                     scaler, batches, fingerprint, progress.earlier_seconds + time.perf_counter() - began,
                     {"ingredient": ingredient, "start": soup_start or {}, "done": done, "share": work / total_work})
        if teacher is not None:
            teacher.save()

    for ingredient in range(first_ingredient, pcfg.soup):
        if ingredient > 0 and soup_start is None:
            break  # the mask was never final before the last step: nothing to fine-tune again
        if ingredient == first_ingredient:
            first = start  # this run's own first step, or the resumed save's
        else:  # a further soup ingredient, from the state every ingredient starts at, on batches of its own
            model.load_state_dict(soup_start["model"])
            optimizer.load_state_dict(soup_start["sgd"])
            if lookahead is not None:
                vars(lookahead).update(copy.deepcopy(soup_start["lookahead"]))
            generator, first = soup_batches(ingredient), final_from
        for step in range(first, pcfg.steps):
            if progress is not None and step > first and step % progress.every == 0:
                save_progress(step, ingredient, generator)
            if ingredient == 0:  # the mask's schedule (the other ingredients start on the final mask)
                if step == fixed_from and masks is None:
                    masks = fix_mask()
                    if score_optimizer is not None:  # the mask is final: the scores have done their work
                        for s in scores:
                            s.requires_grad_(False)
                            s.grad = None
                        score_optimizer = None
                if step < ramp_until and step % CHANNEL_RAMP_EVERY == 0:
                    model.set_masks(channel_masks(model, _kept_share(step, ramp_until, keep, 1.0), channel_scores))
                elif ramp_until and step == ramp_until:
                    model.set_masks(masks)
                if step < fixed_from:
                    share = _kept_share(step, fixed_from, keep, 1.0, start_keep)
                    if budget is None:
                        rank = "lamp" if pcfg.criterion == "lamp" else "effective"
                        model.set_train_masks(sampled_train_masks(model, share, rank, dense) if share < 1.0 else None)
                if step == final_from and pcfg.soup > 1:
                    soup_start = copy.deepcopy({"model": model.state_dict(), "sgd": optimizer.state_dict(),
                                                "lookahead": vars(lookahead) if lookahead is not None else {}})
            take_step(step, generator, ingredient)
        if lookahead is not None:
            lookahead.finish(model)
        if soup_start is not None:
            done.append(copy.deepcopy(model.state_dict()))
    if done:  # a soup: the average of its ingredients
        if ingredients is not None:
            ingredients.extend(done)
        model.load_state_dict(average_states(done))
    if teacher is not None:
        teacher.save()
    model.set_train_masks(None)
    if ramp_until >= pcfg.steps:  # the ramp never reached its end
        model.set_masks(masks)
    if masks is None:  # zero steps asked for, or the mask fell over all of them
        masks = fix_mask()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return masks


def average_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of state dicts with the same keys and shapes (floating tensors, averaged in
    float32 and cast back); other tensors (BN's batch counters) are the first state's."""
    if not states:
        raise ValueError("nothing to average")
    keys = states[0].keys()
    if any(state.keys() != keys for state in states):
        raise ValueError("the states to average hold different tensors")
    return {k: (torch.stack([state[k].float() for state in states]).mean(0).to(states[0][k].dtype)
                if states[0][k].is_floating_point() else states[0][k].clone()) for k in keys}


def finetune(model: GatedNet, images: Tensor, labels: Tensor, steps: int, cfg: TrainConfig, seed: int,
             lr: float = 0.25, teacher: nn.Module | None = None, pcfg: PruneConfig | None = None) -> None:
    """Fine-tune with the masks already installed on ``model`` (scores fixed, pruned weights stay 0)."""
    masks = {name: layer.mask if layer.mask is not None else torch.ones_like(layer.weight, dtype=torch.bool)
             for name, layer in model.gated_layers()}
    pcfg = PruneConfig(steps=steps, lr=lr, gradual=False) if pcfg is None else pcfg
    prune_finetune(model, images, labels, 1.0, cfg, pcfg, seed, teacher=teacher, masks=masks)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 2500, precision: str = "fp32",
                   tta: int = 0) -> Tensor:
    return predict_logits_by_level(model, images, batch_size, precision, up_to=tta)[tta]


@torch.no_grad()
def predict_logits_by_level(model: nn.Module, images: Tensor, batch_size: int = 2500, precision: str = "fp32",
                            up_to: int = 0) -> list[Tensor]:
    """Logits at every TTA level from 0 to ``up_to``, for the views of the highest level alone."""
    model.eval()
    outputs: list[list[Tensor]] = [[] for _ in range(up_to + 1)]
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].contiguous(memory_format=torch.channels_last)
        with autocast(images.device, precision):
            for level, logits in enumerate(tta_logits_by_level(model, batch, up_to)):
                outputs[level].append(logits.float())
    return [torch.cat(level) for level in outputs]


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, precision: str = "fp32", tta: int = 0) -> float:
    """Top-1 accuracy in percent."""
    return accuracy_by_level(model, images, labels, precision, up_to=tta)[tta]


def accuracy_by_level(model: nn.Module, images: Tensor, labels: Tensor, precision: str = "fp32",
                      up_to: int = 0) -> list[float]:
    """Top-1 accuracy in percent at every TTA level from 0 to ``up_to`` (one pass over the views)."""
    if len(labels) == 0:
        return [float("nan")] * (up_to + 1)
    return [(logits.argmax(1) == labels).float().mean().item() * 100
            for logits in predict_logits_by_level(model, images, precision=precision, up_to=up_to)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Tensor, batch_size: int = 500, precision: str = "fp32") -> None:
    """Re-estimate BatchNorm running statistics for the current (pruned) weights.

    Pruning shifts every activation's distribution; statistics gathered for the dense network would
    mis-normalise it. A few forward passes over training images (no labels, no weight update) fix
    that. Applied identically to every criterion and keep ratio, dense included.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    for start in range(0, len(images), batch_size):
        with autocast(images.device, precision):
            model(images[start:start + batch_size].contiguous(memory_format=torch.channels_last))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()

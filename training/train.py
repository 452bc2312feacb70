"""Phase 1 (train the gated network) and the helpers phase 2/3 need (evaluate, BN recalibration,
masked fine-tune). Reads top to bottom in the order the data flows.

The gates learn importance through straight-through top-K (``gate_method='st_topk'``): on most
steps a keep ratio is drawn at random, the weights whose scores are outside the top-K are masked in
the forward pass, and the backward pass sends every score the gradient it would get if its weight
were on (edge-popup / movement-pruning style). Scores therefore rank weights by how much the loss
needs them, at every sparsity — which is exactly what top-K pruning asks of them afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model import GatedNet

GATE_METHODS = ("st_topk", "penalty", "none")


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 512
    lr: float = 0.4  # peak SGD learning rate of the triangular (one-cycle) schedule
    warmup: float = 0.2  # fraction of steps spent ramping the learning rate up
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv/linear weights only; BN, biases and scores are not decayed
    label_smoothing: float = 0.2  # airbench's value: better-calibrated logits, a few tenths of accuracy
    translate: int = 2  # random-crop padding in pixels (airbench uses 2 for short schedules)
    gate_method: str = "st_topk"
    gate_lr: float = 0.003  # Adam on scores: scores must move O(1) while weights move O(0.05)
    gate_dense_prob: float = 0.5  # st_topk: share of steps trained dense, so the full model stays strong
    gate_min_keep: float = 0.03  # st_topk: random keep ratios are drawn from [this, 1] ...
    gate_keep_dist: str = "log"  # ... log-uniformly ("log") or uniformly ("uniform")
    gate_rank: str = "effective"  # st_topk masks rank by the score S ("score") or by |W·sigmoid(S)| ("effective")
    gate_start_epoch: int = 1  # st_topk: dense epochs first, so scores separate before masks are drawn
    gate_penalty: float = 1.0  # penalty method: weight of mean(sigmoid(S)), ramped up linearly from 0
    bf16: bool = True  # bfloat16 autocast: ~3x faster on CPUs with AMX, fp32 master weights

    def to_dict(self) -> dict:
        return asdict(self)


def autocast(enabled: bool) -> torch.autocast:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------
# Augmentation, on whole float batches (no per-image Python work)
# ---------------------------------------------------------------------------------------------
def augment(images: Tensor, translate: int, generator: torch.Generator) -> Tensor:
    """Random horizontal flip + random crop from a reflect-padded image."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    if translate <= 0:
        return images
    padded = F.pad(images, (translate,) * 4, mode="reflect")
    size = images.shape[-1]
    shifts = torch.randint(0, 2 * translate + 1, (n, 2), generator=generator)
    out = torch.empty_like(images)
    for dx in range(2 * translate + 1):
        for dy in range(2 * translate + 1):
            idx = ((shifts[:, 0] == dx) & (shifts[:, 1] == dy)).nonzero().flatten()
            if len(idx):
                idx = idx.to(images.device)
                out[idx] = padded[idx, :, dy:dy + size, dx:dx + size]
    return out


# ---------------------------------------------------------------------------------------------
# Straight-through top-K masks for training
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sampled_train_masks(model: GatedNet, keep: float, rank: str = "score") -> dict[str, Tensor]:
    """Global top-K at ``keep`` by the score S (rank='score', the `gate` criterion) or by the effective
    weight |W·sigmoid(S)| (rank='effective', the `gate_magnitude` criterion). The threshold comes from
    a strided sample: cheap, and within a fraction of a percent of the exact K."""
    layers = model.gated_layers()
    if rank == "effective":
        ranks = {name: (layer.weight * layer.gate()).abs() for name, layer in layers}
    else:
        ranks = {name: layer.score.detach() for name, layer in layers}
    flat = torch.cat([r.flatten() for r in ranks.values()])
    sample = flat[:: max(1, len(flat) // 200_000)]
    k = max(1, int(round((1 - keep) * len(sample))))
    threshold = sample.kthvalue(k).values
    return {name: (ranks[name] > threshold).to(layer.weight.dtype) for name, layer in layers}


def _draw_keep(cfg: TrainConfig, generator: torch.Generator) -> float:
    if torch.rand(1, generator=generator).item() < cfg.gate_dense_prob:
        return 1.0
    u = torch.rand(1, generator=generator).item()
    if cfg.gate_keep_dist == "uniform":
        return cfg.gate_min_keep + (1 - cfg.gate_min_keep) * u
    return math.exp(math.log(cfg.gate_min_keep) * (1 - u))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _param_groups(model: GatedNet, cfg: TrainConfig) -> tuple[list, list]:
    decay, no_decay, scores = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".score"):
            scores.append(p)
        elif p.ndim > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    sgd = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return sgd, scores


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Triangular one-cycle: linear up over ``warmup`` of the steps, then linearly down to zero."""
    peak = max(1, int(warmup * total))
    return step / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))


def train(
    model: GatedNet,
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` on normalised float ``images``; resumable from per-epoch checkpoints.

    Returns one log entry per epoch (loss, seconds). A checkpoint ``epoch-NN.pt`` (tensors only,
    loaded with ``weights_only=True``) is written after each epoch and resumed from when present.
    """
    if cfg.gate_method not in GATE_METHODS:
        raise ValueError(f"unknown gate method {cfg.gate_method!r}; choose from {', '.join(GATE_METHODS)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sgd_groups, scores = _param_groups(model, cfg)
    optimizer = torch.optim.SGD(sgd_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    score_optimizer = torch.optim.Adam(scores, lr=cfg.gate_lr) if cfg.gate_method != "none" else None
    if cfg.gate_method == "none":
        # The reference method: gates trained by the classification loss alone, same optimiser.
        optimizer.add_param_group({"params": scores, "weight_decay": 0.0})
    steps_per_epoch = len(labels) // cfg.batch_size  # drop the ragged last batch: steady BN statistics
    total_steps = cfg.epochs * steps_per_epoch
    history: list[dict] = []

    start_epoch = 0
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        done = sorted(checkpoint_dir.glob("epoch-*.pt"))
        if done:
            state = torch.load(done[-1], map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if score_optimizer is not None:
                score_optimizer.load_state_dict(state["score_optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = [dict(zip(state["history_keys"], row)) for row in state["history"].tolist()]
            start_epoch = int(state["epoch"])

    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        began = time.perf_counter()
        order = torch.randperm(len(labels), generator=generator)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            factor = _lr_factor(step, total_steps, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            if score_optimizer is not None:
                for group in score_optimizer.param_groups:
                    group["lr"] = cfg.gate_lr * factor

            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            batch = augment(images[idx], cfg.translate, generator).contiguous(memory_format=torch.channels_last)
            target = labels[idx]

            masked = cfg.gate_method == "st_topk" and epoch >= cfg.gate_start_epoch
            keep = _draw_keep(cfg, generator) if masked else 1.0
            model.set_train_masks(sampled_train_masks(model, keep, cfg.gate_rank) if keep < 1.0 else None)
            with autocast(cfg.bf16):
                loss = F.cross_entropy(model(batch), target, label_smoothing=cfg.label_smoothing)
            if cfg.gate_method == "penalty":
                gates = torch.cat([layer.gate().flatten() for _, layer in model.gated_layers()])
                loss = loss + cfg.gate_penalty * (step / total_steps) * gates.mean()
            optimizer.zero_grad(set_to_none=True)
            if score_optimizer is not None:
                score_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if score_optimizer is not None:
                score_optimizer.step()
            loss_sum += loss.item()
        model.set_train_masks(None)

        entry = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "seconds": time.perf_counter() - began}
        history.append(entry)
        if checkpoint_dir is not None:
            keys = list(entry)
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "score_optimizer": score_optimizer.state_dict() if score_optimizer is not None else {},
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                "history": torch.tensor([[h[k] for k in keys] for h in history], dtype=torch.float64),
                "history_keys": keys,
            }
            tmp = checkpoint_dir / f"epoch-{epoch + 1:02d}.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(checkpoint_dir / f"epoch-{epoch + 1:02d}.pt")
            for old in checkpoint_dir.glob("epoch-*.pt"):  # keep only the newest: they are large
                if old.name != f"epoch-{epoch + 1:02d}.pt":
                    old.unlink()
        if progress is not None:
            progress(epoch + 1, entry)
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 1000, bf16: bool = False) -> Tensor:
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].contiguous(memory_format=torch.channels_last)
        with autocast(bf16):
            outputs.append(model(batch).float())
    return torch.cat(outputs)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, bf16: bool = False) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        return float("nan")
    return (predict_logits(model, images, bf16=bf16).argmax(1) == labels).float().mean().item() * 100


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Tensor, batch_size: int = 500, bf16: bool = False) -> None:
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
        with autocast(bf16):
            model(images[start:start + batch_size].contiguous(memory_format=torch.channels_last))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()


def finetune(model: GatedNet, images: Tensor, labels: Tensor, steps: int, cfg: TrainConfig, seed: int,
             lr: float = 0.02) -> None:
    """Short masked fine-tune: weights and BN train, scores and masks stay fixed, so every pruned
    weight stays exactly zero (the mask multiplies it out of the forward pass and the gradient)."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if not n.endswith(".score")]
    for _, layer in model.gated_layers():
        layer.score.requires_grad_(False)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to zero
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=generator)
        batch = augment(images[idx], cfg.translate, generator).contiguous(memory_format=torch.channels_last)
        with autocast(cfg.bf16):
            loss = F.cross_entropy(model(batch), labels[idx], label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _, layer in model.gated_layers():
        layer.score.requires_grad_(True)
    model.eval()

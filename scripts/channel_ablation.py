"""Channel variants: does a longer distilled fine-tune bring them within 1 point? (validation only)

Starts from the shipped release seed's dense network (models/dense.safetensors, seed 0), keeps the top-K
channels per layer exactly as prune-train does, fine-tunes with distillation from the dense logits for
each --steps value, re-estimates BN, and reports validation accuracy (the 5,000 images prune-train holds
out of train; no TTA) against dense. Test images are not touched.

    python scripts/channel_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --keep 0.625 --steps 300 900
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from core import checkpoint
from core.hardware import select_device, select_precision
from training.data import channel_stats, load_dataset, normalize, split_validation
from training.prune import channel_masks
from training.train import PruneConfig, TrainConfig, accuracy, prune_finetune, recalibrate_bn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--dense", default="models/dense.safetensors")
    p.add_argument("--keep", type=float, default=0.625)
    p.add_argument("--steps", type=int, nargs="+", default=[300, 900])
    p.add_argument("--lr", type=float, default=PruneConfig().lr)
    p.add_argument("--baseline", help="a shipped channel checkpoint of the same seed to report alongside "
                                      "(e.g. models/variants/channel-keep0.625-ft.safetensors: 300 steps)")
    args = p.parse_args()
    device = select_device("auto")
    precision = select_precision("auto", device)
    data = load_dataset(args.data)
    train_idx, val_idx = split_validation(data.train_labels, 5000, seed=0)
    mean, std = channel_stats(data.train_images[train_idx])
    train_x, train_y = normalize(data.train_images[train_idx], mean, std), data.train_labels[train_idx]
    val_x, val_y = normalize(data.train_images[val_idx], mean, std), data.train_labels[val_idx]
    calib = train_x[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[:2000]]
    cfg = TrainConfig(precision=precision)
    teacher = checkpoint.load_model(args.dense).to(device, memory_format=torch.channels_last)
    dense_val = accuracy(teacher, val_x, val_y, precision=precision)
    print(f"{device} {precision}; dense validation {dense_val:.2f} %", flush=True)
    if args.baseline:
        shipped = checkpoint.load_model(args.baseline, root="models").to(device, memory_format=torch.channels_last)
        val = accuracy(shipped, val_x, val_y, precision=precision)
        print(f"{args.baseline}: validation {val:.2f} % (drop {dense_val - val:.2f})", flush=True)
    for steps in args.steps:
        model = copy.deepcopy(teacher)
        masks = channel_masks(model, args.keep)
        began = time.perf_counter()
        prune_finetune(model, train_x, train_y, args.keep, cfg,
                       replace(PruneConfig(), steps=steps, lr=args.lr, gradual=False), 0, teacher=teacher, masks=masks)
        recalibrate_bn(model, calib, precision=precision)
        val = accuracy(model, val_x, val_y, precision=precision)
        print(f"channel keep {args.keep:g}, {steps} steps, lr {args.lr:g}: validation {val:.2f} % "
              f"(drop {dense_val - val:.2f}) in {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()

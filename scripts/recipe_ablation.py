"""Phase-1 recipe ablation on the validation split: one seed per setting, dense accuracy without TTA.

Prints a table and, last, the winning setting's prune-train flags (so a script can pass them on).
Usage: PYTHONPATH=. python3 scripts/recipe_ablation.py DATA [--device auto] [--seed 0] [--only NAME ...]
       [--epochs E]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from core.hardware import retain_freed_memory, select_device, select_precision
from core.model import GatedNet, NetConfig
from training.data import channel_stats, load_dataset, normalize, split_validation
from training.train import TrainConfig, accuracy, recalibrate_bn, train

SETTINGS = {  # name → (TrainConfig overrides, NetConfig overrides, prune-train flags)
    "default": ({}, {}, []),
    "fp32": ({"precision": "fp32"}, {}, ["--precision", "fp32"]),
    "epochs 30": ({"epochs": 30.0}, {}, ["--epochs", "30"]),
    "weight decay x2": ({"weight_decay": 0.0306}, {}, ["--weight-decay", "0.0306"]),
    "no whitening": ({"whiten": False}, {}, ["--no-whiten"]),
    # Capacity references, not candidates: the network a channel variant keeps (every width × keep),
    # trained from scratch. Its accuracy is what channel pruning at that keep can hope to recover.
    "width x0.625": ({}, {"widths": (40, 160, 160), "stem_width": 20}, []),
    "width x0.5": ({}, {"widths": (32, 128, 128), "stem_width": 16}, []),
}
CANDIDATES = [name for name in SETTINGS if not name.startswith("width")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=CANDIDATES, choices=list(SETTINGS))
    p.add_argument("--epochs", type=float, default=None, help="override every setting's epochs")
    args = p.parse_args()
    device = select_device(args.device)
    precision = select_precision("auto", device)
    retain_freed_memory(large_buffers=True)  # as prune-train: no page faults per step (core/hardware.py)
    data = load_dataset(args.data)
    train_idx, val_idx = split_validation(data.train_labels, 5000, seed=0)
    mean, std = channel_stats(data.train_images[train_idx])
    tx, ty = normalize(data.train_images[train_idx], mean, std).to(device), data.train_labels[train_idx].to(device)
    vx, vy = normalize(data.train_images[val_idx], mean, std).to(device), data.train_labels[val_idx].to(device)
    calib = tx[torch.randperm(len(ty), generator=torch.Generator().manual_seed(args.seed))[:2000].to(device)]
    results = {}
    for name in args.only:
        overrides, net_overrides, _ = SETTINGS[name]
        cfg = replace(TrainConfig(precision=precision), **overrides)
        if args.epochs is not None:
            cfg = replace(cfg, epochs=args.epochs)
        torch.manual_seed(args.seed)
        model = GatedNet(NetConfig(**net_overrides)).to(device, memory_format=torch.channels_last)
        began = time.perf_counter()
        train(model, tx, ty, cfg, args.seed)
        recalibrate_bn(model, calib, precision=cfg.precision)
        results[name] = accuracy(model, vx, vy, cfg.precision)
        print(f"{name:>18}: val acc {results[name]:.2f} %  ({time.perf_counter() - began:.1f} s)", flush=True)
    best = max((r for r in results if r in CANDIDATES), key=results.get, default=None)
    if best is None:
        return
    print(json.dumps({"val_acc": results, "best": best}))
    print("FLAGS " + " ".join(SETTINGS[best][2]))


if __name__ == "__main__":
    main()

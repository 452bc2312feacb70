"""What computing the teacher's logits costs a phase-2 step, and what sharing one Teacher saves.

Every phase-2 run of a seed draws the same batches, so prune-train shares one ``training.train.Teacher``
across a seed's fine-tunes: the first run computes each step's distillation targets, the later ones read
them. This script times phase-2 steps of the shipped dense network (keep 0.1, prune-train's defaults) with a
fresh Teacher (computing) and a shared one whose cache is already filled, alternating, in one process.

    PYTHONPATH=. python scripts/teacher_cache.py ../shared/data/cifar10-jpeg.tar.gz --steps 20
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from core import checkpoint
from core.hardware import retain_freed_memory, select_device, select_precision
from training.data import channel_stats, load_dataset, normalize, split_validation
from training.train import PruneConfig, Teacher, TrainConfig, prune_finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="the training data, as prune-train --data")
    p.add_argument("--dense", default="models/dense.safetensors", help="the dense network to prune and distil from")
    p.add_argument("--steps", type=int, default=20, help="phase-2 steps per timed run")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    retain_freed_memory(large_buffers=True)  # as prune-train
    data = load_dataset(args.data)
    train_idx, _ = split_validation(data.train_labels, 5000, seed=0)
    mean, std = channel_stats(data.train_images[train_idx])
    images, labels = normalize(data.train_images[train_idx], mean, std), data.train_labels[train_idx]
    device = select_device("auto")
    dense = checkpoint.load_model(args.dense).to(device, memory_format=torch.channels_last)
    images, labels = images.to(device), labels.to(device)
    cfg, pcfg = TrainConfig(precision=select_precision("auto", device)), PruneConfig(steps=args.steps)
    shared = Teacher(dense)
    prune_finetune(copy.deepcopy(dense), images, labels, 0.1, cfg, pcfg, 0, teacher=shared)  # fills its cache
    seconds: dict[str, list[float]] = {"computed": [], "shared": []}
    for _ in range(args.rounds):
        for mode in seconds:
            began = time.perf_counter()
            prune_finetune(copy.deepcopy(dense), images, labels, 0.1, cfg, pcfg, 0,
                           teacher=Teacher(dense) if mode == "computed" else shared)
            seconds[mode].append((time.perf_counter() - began) / args.steps)
            print(f"{mode}: {seconds[mode][-1]:.3f} s per step", flush=True)
    print(f"{device}, {cfg.precision}, {torch.get_num_threads()} threads: s per step "
          + ", ".join(f"{mode} {' / '.join(f'{s:.3f}' for s in values)}" for mode, values in seconds.items()))


if __name__ == "__main__":
    main()

"""airbench94, transcribed: what does the reference recipe reach on *this* data and split? (validation)

A plain nn.Sequential port of KellerJordan/cifar10-airbench `airbench94.py` (2×2 whitening stem with a
bias trained for 3 epochs, no BN on the stem, BN eps 1e-12, bias-free head, MaxPool(3) at the end), fed
the same normalised JPEG-decoded tensors and the same 45,000 / 5,000 train / validation split as
prune-train. It answers one question: is the gap between our dense network and airbench's published
94 % in the data (JPEG, 45k images) or in our implementation? ``--stem ours`` swaps in our 3×3 / 32-channel
stem with BN (everything else unchanged) to bisect.

    python scripts/airbench_reference.py --data ../shared/data/cifar10-jpeg.tar.gz --epochs 9.9
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from core.hardware import autocast, retain_freed_memory, select_device, select_precision
from core.model import tta_logits
from training.data import channel_stats, load_dataset, normalize, split_validation
from training.train import augment


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__(n, eps=eps, momentum=0.4)
        self.weight.requires_grad_(False)


class Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int, k: int = 3, padding: str | int = "same", bias: bool = False) -> None:
        super().__init__(cin, cout, k, padding=padding, bias=bias)
        if self.bias is not None:
            self.bias.data.zero_()
        nn.init.dirac_(self.weight.data[:cin])


class Group(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float) -> None:
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout, eps)
        self.conv2, self.norm2 = Conv(cout, cout), BatchNorm(cout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class Net(nn.Module):
    def __init__(self, stem: str, eps: float) -> None:
        super().__init__()
        if stem == "airbench":
            self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
            self.whiten.bias.data.zero_()
            self.stem_norm = nn.Identity()
            width = 24
        else:
            self.whiten = nn.Conv2d(3, 32, 3, padding=1, bias=False)
            self.stem_norm = BatchNorm(32, eps)
            width = 32
        self.groups = nn.Sequential(Group(width, 64, eps), Group(64, 256, eps), Group(256, 256, eps))
        self.head = nn.Linear(256, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.stem_norm(self.whiten(x))))
        return self.head(torch.amax(x, dim=(2, 3))) / 9


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    c, (h, w) = images.shape[1], conv.weight.shape[2:]
    patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
    values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    values, vectors = values.flip(0), vectors.T.flip(0)
    pairs = conv.out_channels // 2
    scaled = (vectors[:pairs] / torch.sqrt(values[:pairs, None] + eps)).view(pairs, c, h, w)
    conv.weight.data[:] = torch.cat((scaled, -scaled))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=float, default=9.9)
    p.add_argument("--stem", choices=("airbench", "ours"), default="airbench")
    p.add_argument("--bn-eps", type=float, default=1e-12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-train", action="store_true", help="train on all 50,000 (validation then unused)")
    args = p.parse_args()
    device = select_device("auto")
    precision = select_precision("auto", device)
    retain_freed_memory(large_buffers=True)  # as prune-train: no page faults per step (core/hardware.py)
    data = load_dataset(args.data)
    train_idx, val_idx = split_validation(data.train_labels, 0 if args.full_train else 5000, seed=0)
    mean, std = channel_stats(data.train_images[train_idx])
    x = normalize(data.train_images[train_idx], mean, std).to(device)
    y = data.train_labels[train_idx].to(device)
    evals = {"val": (normalize(data.train_images[val_idx], mean, std), data.train_labels[val_idx]),
             "test": (normalize(data.test_images, mean, std), data.test_labels)}

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = Net(args.stem, args.bn_eps).to(device, memory_format=torch.channels_last)
    model.whiten.weight.requires_grad_(False)
    # airbench whitens on 5,000 training images in random order; ours are sorted by class, so sample.
    init_whitening(model.whiten, x[torch.randperm(len(y), generator=generator)[:5000]])

    batch, momentum = 1024, 0.85
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = 11.5 / kilostep, 0.0153 * batch / kilostep
    norm_biases = [p for k, p in model.named_parameters() if ("norm" in k or "whiten.bias" in k) and p.requires_grad]
    others = [p for k, p in model.named_parameters() if not ("norm" in k or "whiten.bias" in k) and p.requires_grad]
    optimizer = torch.optim.SGD([dict(params=norm_biases, lr=lr * 64, weight_decay=wd / (lr * 64), base=lr * 64),
                                 dict(params=others, lr=lr, weight_decay=wd / lr, base=lr)],
                                momentum=momentum, nesterov=True)
    steps_per_epoch = len(y) // batch
    total = math.ceil(steps_per_epoch * args.epochs)
    warm = int(total * 0.23)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    flip_base = torch.rand(len(y), generator=generator) < 0.5
    step, began = 0, time.perf_counter()
    for epoch in range(math.ceil(args.epochs)):
        if model.whiten.bias is not None:
            model.whiten.bias.requires_grad_(epoch < 3)
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            factor = 0.2 + 0.8 * step / warm if step < warm else 1 - 0.93 * (step - warm) / (total - warm)
            for g in optimizer.param_groups:
                g["lr"] = g["base"] * factor
            idx = order[i * batch:(i + 1) * batch]
            inputs = augment(x[idx], 2, generator, flip_base[idx] ^ bool(epoch % 2))
            with autocast(device, precision):
                loss = F.cross_entropy(model(inputs), y[idx], label_smoothing=0.2, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 5 == 0 or step >= total:
                decay = 0.95 ** 5 * (step / total) ** 3 if step < total else 1.0
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.is_floating_point():
                            ema[k].lerp_(v, 1 - decay)
                            v.copy_(ema[k])
        print(f"epoch {epoch + 1} loss {loss.item() / batch:.4f} {time.perf_counter() - began:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        for split, (ex, ey) in evals.items():
            if len(ey) == 0:
                continue
            for tta in (0, 2):
                correct = 0
                for s in range(0, len(ey), 2000):
                    with autocast(device, precision):
                        logits = tta_logits(model, ex[s:s + 2000].to(device).contiguous(
                            memory_format=torch.channels_last), tta)
                    correct += int((logits.argmax(1).cpu() == ey[s:s + 2000]).sum())
                print(f"{split} tta{tta}: {100 * correct / len(ey):.2f} %", flush=True)
    print(f"stem={args.stem} eps={args.bn_eps} epochs={args.epochs} {device} {precision} "
          f"{time.perf_counter() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()

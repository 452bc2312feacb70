"""How much time, not MACs, a channel width profile costs on this CPU (no data set, no training).

Builds the compact network (engine/compact.py) of GatedNet with the given output channels per conv (stem,
block1.conv1, …, block3.conv2; random weights: only the shapes matter), times the service's forward pass
(TTA 2, 64 images; the median of 9 interleaved rounds, engine.compact.interleaved_medians) for dense,
uniform keep 0.5, the profiles given and --random more, and fits ms = a × million MACs + b × thousand
activations + c over all of them (activations: conv outputs per image, before pooling; the elementwise
work of BN, GELU and pooling scales with them).

    python scripts/width_latency.py 24,40,56,64,144,80,248      # channel_allocation's keep-0.5 widths
"""

from __future__ import annotations

import argparse
import random

import torch

from bench.speed import machine
from core.hardware import retain_freed_memory
from core.model import GatedNet, tta_logits
from engine.compact import compact, interleaved_medians
from training.prune import channel_masks, conv_macs


def activations(model: GatedNet, counts: dict[str, int]) -> int:
    total, side = 0, 32
    for name, _, _, pool in model.conv_chain():
        total += side * side * counts[name]
        side = side // 2 if pool else side
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="*", help="comma-separated output channels of the 7 convs")
    p.add_argument("--random", type=int, default=11, help="random profiles (multiples of 8) to fit over")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds; each profile's median counts")
    args = p.parse_args()
    retain_freed_memory()  # as the service runs: no page faults on every pass (docs/engine.md)
    model = GatedNet().eval()
    names = [name for name, _, _, _ in model.conv_chain()]
    dense = [conv.out_channels for _, conv, _, _ in model.conv_chain()]
    rng = random.Random(0)
    profiles = [dense, [c // 2 for c in dense]] + [[int(c) for c in p.split(",")] for p in args.profiles]
    profiles += [[max(8, 8 * round(c * rng.uniform(0.2, 1.0) / 8)) for c in dense] for _ in range(args.random)]
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    order = {name: torch.arange(c, 0, -1).float() for name, c in zip(names, dense)}
    runs = {}
    for index, widths in enumerate(profiles):
        pruned = GatedNet().eval()
        pruned.set_masks(channel_masks(pruned, 1.0, order, dict(zip(names, widths))))
        net = compact(pruned).to(dtype)
        runs[index] = lambda net=net: tta_logits(net, x, 2)
    with torch.inference_mode():  # the engine's own timer: rounds interleaved, so drift falls on all alike
        seconds = interleaved_medians(runs, rounds=args.rounds)
    counts = [dict(zip(names, widths)) for widths in profiles]
    rows = [(widths, conv_macs(model, c), activations(model, c), seconds[i] * 1e3)
            for i, (widths, c) in enumerate(zip(profiles, counts))]
    design = torch.tensor([[m / 1e6, a / 1e3, 1.0] for _, m, a, _ in rows], dtype=torch.float64)
    measured = torch.tensor([t for *_, t in rows], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(design, measured.unsqueeze(1)).solution.squeeze().tolist()
    print(f"{machine()}, {torch.get_num_threads()} threads, {args.precision}; "
          f"64 images, TTA 2 (6 forwards)")
    print(f"fit: ms = {a:.4f} × MMACs + {b:.4f} × K activations + {c:.2f}  "
          f"(one activation costs as much as {b / a * 1e3:.0f} MACs)")
    for widths, macs, acts, ms in rows:
        print(f"{str(widths):>36}  {macs / 1e6:6.1f} MMACs  {acts / 1e3:4.0f} K act.  {ms:6.1f} ms  "
              f"fit {a * macs / 1e6 + b * acts / 1e3 + c:6.1f}  {rows[0][3] / ms:.2f}× dense")


if __name__ == "__main__":
    main()

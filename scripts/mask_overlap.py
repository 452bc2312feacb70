"""Which weights survive? The shipped phase-2 variants' survivors against one-shot top-K of the dense net.

For each fine-tuned weight variant in the manifest (gradual pruning with learned gates), the share of
its surviving weights that one-shot top-K by each criterion, on the dense network it was pruned from,
also keeps (same count, same scope and floor as prune-train). Random top-K overlaps by about `keep`;
1.0 would mean the learned gates chose exactly what |W| chooses. Reads models/ only (no data, no training).

    python scripts/mask_overlap.py --models-dir models
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from core import checkpoint
from training.prune import flat_mask, importance, topk_masks


def survivors(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(layer.weight != 0).flatten() for _, layer in model.gated_layers()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--criteria", nargs="+", default=["magnitude", "random"])
    args = p.parse_args()
    root = Path(args.models_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    training = manifest["training"]
    scope, floor = training.get("scope", "global"), training.get("floor", 0.0)
    dense = checkpoint.load_model(root / "dense.safetensors")
    scores = {c: importance(dense, c, seed=training.get("release_seed", 0)) for c in args.criteria}
    print(f"scope {scope}, floor {floor}; overlap = |survivors ∩ one-shot top-K| / K")
    print("| variant | keep | K | " + " | ".join(f"∩ one-shot {c}" for c in args.criteria) + " |")
    print("|---|---|---|" + "---|" * len(args.criteria))
    for variant in manifest["variants"]:
        if variant["granularity"] != "weight" or not variant["finetuned"]:
            continue
        kept = survivors(checkpoint.load_model(root / variant["file"], variant["sha256"], root=root))
        overlaps = []
        for criterion in args.criteria:
            oneshot = flat_mask(topk_masks(scores[criterion], variant["keep"], scope, floor))
            # A survivor whose fine-tuned value happens to be exactly 0 would count as pruned: say so.
            overlaps.append(f"{(kept & oneshot).sum().item() / oneshot.sum().item():.3f}")
        count = int(oneshot.sum())
        note = "" if int(kept.sum()) == count else f" (survivors {int(kept.sum()):,})"
        print(f"| {variant['name']} | {variant['keep']:g} | {count:,}{note} | {' | '.join(overlaps)} |")


if __name__ == "__main__":
    main()

"""Phase 2 on validation: which fine-tune length, channel ranking or distillation weight pays? (validation only)

Starts from the shipped release seed's dense network (models/dense.safetensors, seed 0) and prunes it
exactly as prune-train does: channel granularity keeps the top channels of every conv (ranked by
--rankings); weight granularity prunes gradually by the learned gates (gate_magnitude, global, floor
0.2 %). Each setting fine-tunes with distillation from the dense logits, re-estimates BN and reports
validation accuracy (the 5,000 images prune-train holds out of train; no TTA) against dense. Test images
are not touched.

    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --keep 0.625 --steps 300 900
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --keep 0.5 --steps 0 60 \
        --rankings mass taylor
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --keep 0.5 --steps 300 \
        --rankings taylor --allocations uniform cost    # same MACs, channels spent where Taylor says
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --keep 0.5 --steps 300 \
        --rankings taylor --allocations --widths 16,32,32,128,128,192,192   # explicit widths, stem first
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --baseline models/variants/gate_magnitude-keep0.10-ft.safetensors
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 200 --gate-lrs 0.01 0      # learned vs frozen gates: accuracy and mask overlap
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.05 --steps 600 --criteria lamp       # layer-adaptive (LAMP) instead of global |W·sigmoid(S)|
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.05 --steps 600 --teacher-tta 0 1     # distil from the teacher's mirror-averaged logits
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.05 --steps 600 --chain-from 0.1      # prune to 0.1 first, then from that network to 0.05
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --temperatures 4 --smoothing 0.2 0   # distillation temperature, label smoothing
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --bn-weights 1 --decay-scales 0 2    # learned BN weights, phase-2 weight decay
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --lr-schedules hold    # peak lr while pruning, decay over the fixed-mask fine-tune
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --batch-seed 1         # the default again, other batches: run-to-run spread
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --prune-shares 0.5 0.75 --batch-seeds 0 1 2   # a lever, paired over 3 data orders
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.05 --steps 600 --feature-distill 1 --batch-seeds 0 1 2   # also match the blocks' outputs
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.05 --steps 600 --dense-ends 1 --batch-seeds 0 1 2   # stem and head kept whole
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --gate-fns hard_concrete --gate-lrs 0.05 --hc-ranks log_alpha effective  # L0 gates
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.05 --steps 600 --soups 3     # average 3 fine-tunes of the final mask (each also reported)
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --keep 0.625 --steps 300 \
        --rankings taylor --mixup 1 --distill 0.5 1   # distil on mixup blends (function matching)
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --keep 0.5 --steps 300 \
        --rankings taylor --allocations --widths 16,32,32,128,128,192,192 --soups 5   # also the soups of 2, 3, 4
    python scripts/phase2_ablation.py --data ../shared/data/cifar10-jpeg.tar.gz --granularity weight \
        --keep 0.1 --steps 600 --soups 3 --progress-dir runs/ablation   # the same command again resumes

With --progress-dir every run saves its progress there every 50 steps and its result when it ends: the same
command run again prints the recorded results, resumes a cut run at its last save and runs the rest (a save
or a result made with other settings is never used: each run's files are named by all of its settings).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import itertools
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from core import checkpoint
from core.hardware import retain_freed_memory, select_device, select_precision
from core.model import TTA_LEVELS
from training.data import channel_stats, load_dataset, normalize, split_validation
from training.pipeline import write_json_atomic
from training.prune import (
    CHANNEL_ALLOCATIONS,
    CHANNEL_RANKINGS,
    bake_masks,
    channel_allocation,
    channel_masks,
    channel_ranking_scores,
    channel_widths,
    conv_macs,
    flat_mask,
    importance,
    topk_masks,
)
from training.train import (
    HC_RANKS,
    PHASE2_CRITERIA,
    PHASE2_GATES,
    PHASE2_SCHEDULES,
    Phase2Checkpoint,
    PruneConfig,
    Teacher,
    TrainConfig,
    accuracy,
    average_states,
    prune_finetune,
    recalibrate_bn,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--dense", default="models/dense.safetensors")
    p.add_argument("--granularity", choices=("channel", "weight"), default="channel")
    p.add_argument("--keep", type=float, default=0.625)
    p.add_argument("--steps", type=int, nargs="+", default=[300, 900])
    p.add_argument("--lr", type=float, default=PruneConfig().lr)
    p.add_argument("--criteria", nargs="+", choices=PHASE2_CRITERIA, default=[PruneConfig().criterion],
                   help="weight granularity: what the gradual top-K ranks (|W·sigmoid(S)| globally, or LAMP)")
    p.add_argument("--gate-lrs", type=float, nargs="+", default=[PruneConfig().gate_lr],
                   help="weight granularity: Adam lr of the gates while pruning (0 = frozen gates, i.e. gradual "
                        "magnitude pruning); with several, also prints how far their final masks agree")
    p.add_argument("--prune-shares", type=float, nargs="+", default=[PruneConfig().prune_share],
                   help="weight variants: share of the steps over which the kept share falls to the target")
    p.add_argument("--lookahead", type=int, nargs="+", choices=(0, 1), default=[int(PruneConfig().lookahead)],
                   help="phase 1's lookahead EMA during phase 2 (0 off, 1 on; both: one run each)")
    p.add_argument("--teacher-tta", type=int, nargs="+", choices=TTA_LEVELS, default=[PruneConfig().teacher_tta],
                   help="TTA level of the teacher's logits (0 = the plain batch)")
    p.add_argument("--distill", type=float, nargs="+", default=[PruneConfig().distill],
                   help="weights of the distillation term to try (0 = labels only, 1 = teacher only)")
    p.add_argument("--feature-distill", type=float, nargs="+", default=[PruneConfig().feature_distill],
                   help="weights of the feature term to try (the block outputs matched to the teacher's; 0 = off)")
    p.add_argument("--dense-ends", type=int, nargs="+", choices=(0, 1), default=[int(PruneConfig().dense_ends)],
                   help="keep the stem and the head whole (weight granularity; 1) or prune them with the rest (0)")
    p.add_argument("--soups", type=int, nargs="+", default=[PruneConfig().soup],
                   help="sparse model soup: fine-tunes of the final mask averaged (1 = off); each ingredient's "
                        "own validation accuracy is reported too (the first is the soup-1 run's model), and so is "
                        "the soup of the first n for every n below the soup's size (the soup-size curve on the "
                        "same fine-tunes)")
    p.add_argument("--mixup", type=float, nargs="+", default=[PruneConfig().mixup],
                   help="mixup on the distillation batches: Beta concentrations to try (0 = off; 1 = a uniform share)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[PruneConfig().temperature],
                   help="distillation temperatures to try")
    p.add_argument("--smoothing", type=float, nargs="+", default=[TrainConfig().label_smoothing],
                   help="label smoothing of phase 2's hard-label term (phase 1 trains with the default)")
    p.add_argument("--bn-weights", type=int, nargs="+", choices=(0, 1), default=[int(PruneConfig().bn_weights)],
                   help="learn the BatchNorm weights in phase 2 (0 frozen at phase 1's, 1 learned)")
    p.add_argument("--decay-scales", type=float, nargs="+", default=[PruneConfig().decay_scale],
                   help="phase 2's weight decay as a multiple of phase 1's (0 = none)")
    p.add_argument("--lr-schedules", nargs="+", choices=PHASE2_SCHEDULES, default=[PruneConfig().lr_schedule],
                   help="after the warm-up: linear decay over all steps, or hold the peak while the mask "
                        "changes and decay over the fixed-mask fine-tune only")
    p.add_argument("--gate-fns", nargs="+", choices=PHASE2_GATES, default=[PruneConfig().gate_fn],
                   help="weight variants: the gates while the mask falls: sigmoid (straight-through top-K of "
                        "|W·sigmoid(S)|) or hard_concrete (L0 gates on a density budget; the top-K ranks by log α)")
    p.add_argument("--hc-init", type=float, default=PruneConfig().hc_init,
                   help="hard_concrete: the log α every gate starts at")
    p.add_argument("--hc-penalty", type=float, default=PruneConfig().hc_penalty,
                   help="hard_concrete: strength of the penalty on the expected open share above the schedule")
    p.add_argument("--hc-ranks", nargs="+", choices=HC_RANKS, default=[PruneConfig().hc_rank],
                   help="hard_concrete: the final top-K ranks by log α alone, or by |W · deterministic gate|")
    p.add_argument("--rankings", nargs="+", choices=CHANNEL_RANKINGS, default=["mass"],
                   help="channel ranking: weight mass that reads the channel, or first-order Taylor")
    p.add_argument("--allocations", nargs="*", choices=CHANNEL_ALLOCATIONS, default=["uniform"],
                   help="channel widths: keep × every layer (uniform), or the same MACs spread by Taylor score "
                        "per multiply-add (cost; channel_allocation); none, to run only --widths")
    p.add_argument("--widths", nargs="+", default=[], metavar="C1,…,C7",
                   help="channel variants: also run these explicit widths (output channels of the 7 convs, stem "
                        "first), e.g. narrow where the feature maps are large, which is where a CPU spends its time "
                        "(scripts/width_latency.py times a profile)")
    p.add_argument("--channel-ramps", type=float, nargs="+", default=[0.0],
                   help="channel variants: share of the steps over which the width falls (cubic) from all "
                        "channels to keep (0 = one-shot, then fine-tune)")
    p.add_argument("--chain-from", type=float,
                   help="weight variants: first prune and fine-tune to this keep (reported too), then prune that "
                        "network on to --keep with the same settings, the schedule falling from this keep")
    p.add_argument("--ranking-images", type=int, default=2000, help="labelled training images for taylor")
    p.add_argument("--batch-seeds", "--batch-seed", type=int, nargs="+", default=[0],
                   help="seeds of phase 2's batches and augmentation; every setting runs once per seed, and with "
                        "several the summary gives each setting's mean ± std and its paired difference from the "
                        "first setting (same seed, same batches): a lever is only established above the spread "
                        "the data order alone causes")
    p.add_argument("--baseline", help="a shipped checkpoint of the same seed to report alongside "
                                      "(e.g. models/variants/channel-keep0.625-ft.safetensors: 300 steps)")
    p.add_argument("--progress-dir", type=Path, help="resumable: every run's progress (every 50 steps) and "
                                                     "result go here; the same command again picks up")
    args = p.parse_args()
    logging.basicConfig(format="  %(message)s", level=logging.INFO)  # phase 2's hard-concrete trace
    device = select_device("auto")
    precision = select_precision("auto", device)
    retain_freed_memory(large_buffers=True)  # as prune-train: no page faults per step (core/hardware.py)
    data = load_dataset(args.data)
    train_idx, val_idx = split_validation(data.train_labels, 5000, seed=0)
    mean, std = channel_stats(data.train_images[train_idx])
    train_x, train_y = normalize(data.train_images[train_idx], mean, std), data.train_labels[train_idx]
    val_x, val_y = normalize(data.train_images[val_idx], mean, std), data.train_labels[val_idx]
    pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    calib = train_x[pick[:2000]]
    rank_x, rank_y = train_x[pick[:args.ranking_images]], train_y[pick[:args.ranking_images]]
    cfg = TrainConfig(precision=precision)
    teacher = checkpoint.load_model(args.dense).to(device, memory_format=torch.channels_last)
    dense_val = accuracy(teacher, val_x, val_y, precision=precision)
    print(f"{device} {precision}; dense validation {dense_val:.2f} %", flush=True)
    if args.baseline:
        shipped = checkpoint.load_model(args.baseline, root="models").to(device, memory_format=torch.channels_last)
        val = accuracy(shipped, val_x, val_y, precision=precision)
        print(f"{args.baseline}: validation {val:.2f} % (drop {dense_val - val:.2f})", flush=True)
    rankings = args.rankings if args.granularity == "channel" else args.criteria
    scores = {r: channel_ranking_scores(teacher, r, rank_x, rank_y, precision)  # depend on the teacher alone
              for r in {*rankings, *(["taylor"] if "cost" in args.allocations else [])}
              if args.granularity == "channel"}
    allocations = args.allocations + args.widths if args.granularity == "channel" else ["uniform"]
    dense = {name: conv.out_channels for name, conv, _, _ in teacher.conv_chain()}
    widths = {"uniform": channel_widths(teacher, args.keep)}
    for profile in args.widths:
        counts = [int(c) for c in profile.split(",")]
        if len(counts) != len(dense) or not all(0 < c <= d for c, d in zip(counts, dense.values())):
            p.error(f"--widths {profile}: give {len(dense)} counts, each between 1 and {list(dense.values())}")
        widths[profile] = dict(zip(dense, counts))
    if "cost" in allocations:
        widths["cost"] = channel_allocation(teacher, args.keep, scores["taylor"])
    for allocation in allocations if args.granularity == "channel" else []:
        print(f"{allocation} widths: channels {list(widths[allocation].values())}, "
              f"{conv_macs(teacher, widths[allocation]) / conv_macs(teacher, dense):.3f} of dense MACs", flush=True)
    gate_lrs = args.gate_lrs if args.granularity == "weight" else [0.0]
    final_masks = {}
    shares = args.prune_shares if args.granularity == "weight" else [PruneConfig().prune_share]
    ramps = args.channel_ramps if args.granularity == "channel" else [0.0]
    gate_fns = args.gate_fns if args.granularity == "weight" else [PruneConfig().gate_fn]
    dense_ends = args.dense_ends if args.granularity == "weight" else [int(PruneConfig().dense_ends)]

    def validation(model: torch.nn.Module) -> float:
        """Validation accuracy after re-estimating BN on the calibration images, as prune-train does."""
        recalibrate_bn(model, calib, precision=precision)
        return accuracy(model, val_x, val_y, precision=precision)

    def scored(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> float:
        """Validation accuracy of ``state`` in a copy of ``model`` (so with the same installed masks)."""
        alone = copy.deepcopy(model)
        alone.load_state_dict(state)
        return validation(alone)

    # Runs of one batch seed draw the same batches: their teacher logits are computed once (and kept on disk
    # with --progress-dir; entries are keyed by the teacher's weights, so one file serves any --dense).
    if args.progress_dir is not None:
        args.progress_dir.mkdir(parents=True, exist_ok=True)
    # The teacher's bytes, the data (through the teacher's validation accuracy), device and precision: a
    # recorded result is reused only where the same run would make it again.
    dense_id = (hashlib.sha256(Path(args.dense).read_bytes()).hexdigest(), f"{dense_val:.4f}", str(device), precision)
    distiller = Teacher(teacher, args.progress_dir / "teacher-logits.pt" if args.progress_dir else None)
    results: dict[str, dict[int, float]] = {}  # setting → batch seed → validation accuracy

    def report(outcome: dict, batch_seed: int, note: str) -> None:
        """Print a run's soup ingredients and result (measured now or recorded) and add it to ``results``."""
        for i, val in enumerate(outcome["ingredients"]):
            print(f"  soup ingredient {i}: validation {val:.2f} % (drop {dense_val - val:.2f})", flush=True)
        for n, val in outcome.get("smaller_soups", {}).items():
            print(f"  soup of the first {n}: validation {val:.2f} % (drop {dense_val - val:.2f})", flush=True)
        results.setdefault(outcome["setting"], {})[batch_seed] = outcome["validation"]
        print(f"{outcome['setting']}, batch seed {batch_seed}: validation {outcome['validation']:.2f} % (drop "
              f"{dense_val - outcome['validation']:.2f}) in {outcome['seconds']:.0f} s{note}", flush=True)

    gate_settings = [(fn, rank) for fn in gate_fns for rank in (args.hc_ranks if fn == "hard_concrete" else ["-"])]
    for (allocation, ranking, steps, distill, (gate_fn, hc_rank), gate_lr, share, ema, tta, ramp, temperature,
         smoothing, bn, decay, schedule, features, ends, soup, mixup, batch_seed) in itertools.product(
            allocations, rankings, args.steps, args.distill, gate_settings, gate_lrs, shares, args.lookahead,
            args.teacher_tta, ramps, args.temperatures, args.smoothing, args.bn_weights, args.decay_scales,
            args.lr_schedules, args.feature_distill, dense_ends, args.soups, args.mixup, args.batch_seeds):
        run = (allocation, ranking, steps, distill, gate_fn, hc_rank, gate_lr, share, ema, tta, ramp, temperature,
               smoothing, bn, decay, schedule, features, ends, soup, batch_seed)
        if mixup:  # (named only when on: records made before the flag keep their names)
            run += (("mixup", mixup),)
        record, progress = None, None
        if args.progress_dir is not None:  # files named by everything the run depends on
            name = _digest(repr((dense_id, args.granularity, args.keep, args.lr, args.chain_from, args.hc_init,
                                 args.hc_penalty, args.ranking_images, run)))
            record = args.progress_dir / f"run-{name}.json"
            progress = Phase2Checkpoint(args.progress_dir / f"run-{name}.progress.pt")
        if record is not None and record.exists():
            report(json.loads(record.read_text()), batch_seed, f" (recorded in {record})")
            continue
        model = copy.deepcopy(teacher)
        began = time.perf_counter()
        pcfg = replace(PruneConfig(), steps=steps, lr=args.lr, distill=distill, gate_lr=gate_lr, prune_share=share,
                       lookahead=bool(ema), teacher_tta=tta, temperature=temperature, bn_weights=bool(bn),
                       decay_scale=decay, lr_schedule=schedule, gate_fn=gate_fn, hc_init=args.hc_init,
                       hc_penalty=args.hc_penalty, hc_rank=PruneConfig().hc_rank if hc_rank == "-" else hc_rank,
                       feature_distill=features, dense_ends=bool(ends), soup=soup, mixup=mixup)
        ingredients: list[dict[str, torch.Tensor]] = []
        run_cfg = replace(cfg, label_smoothing=smoothing)
        if args.granularity == "channel":
            masks = channel_masks(model, args.keep, scores[ranking], widths[allocation])
            prune_finetune(model, train_x, train_y, args.keep, run_cfg, replace(pcfg, gradual=False), batch_seed,
                           teacher=distiller, masks=masks, channel_scores=scores[ranking], channel_ramp=ramp,
                           ingredients=ingredients, progress=progress)
        else:  # prune-train's defaults for weight variants: global scope, 0.2 % floor per layer
            prune_weights = functools.partial(prune_finetune, model, train_x, train_y, cfg=run_cfg,
                                              pcfg=replace(pcfg, criterion=ranking), seed=batch_seed,
                                              teacher=distiller, floor=0.002, ingredients=ingredients)
            start = 1.0
            if args.chain_from is not None:
                prune_weights(args.chain_from)
                val = validation(model)
                print(f"  first stage, keep {args.chain_from:g}: validation {val:.2f} % (drop {dense_val - val:.2f})"
                      f" in {time.perf_counter() - began:.0f} s", flush=True)
                bake_masks(model)
                start = args.chain_from
            masks = prune_weights(args.keep, start_keep=start, progress=progress)  # (a first stage runs again)
            final_masks[(ranking, steps, distill, gate_fn, hc_rank, gate_lr, share, ema, tta, temperature,
                         smoothing, bn, decay, schedule, features, ends, soup, mixup, batch_seed)] = flat_mask(masks)
            print("  kept per layer: " + ", ".join(f"{name} {mask.float().mean().item():.3f}"
                                                   for name, mask in masks.items()), flush=True)
        ingredient_vals = [scored(model, state) for state in ingredients]  # the soup's fine-tunes (none without)
        # The soup of the first n ingredients, n < soup: the soup-size curve on the same fine-tunes.
        smaller_soups = {str(n): scored(model, average_states(ingredients[:n])) for n in range(2, len(ingredients))}
        val = validation(model)
        gates = "" if args.granularity != "weight" else (
            f", {gate_fn} gates"
            + ("" if gate_fn == "sigmoid"
               else f" (log α from {args.hc_init:g}, penalty {args.hc_penalty:g}, ranked by {hc_rank})")
            + f", gate lr {gate_lr:g}, prune share {share:g}, lookahead {ema}, ends {'dense' if ends else 'pruned'}"
            + ("" if args.chain_from is None else f", chained from keep {args.chain_from:g}"))
        shape = f", {allocation} widths, ramp {ramp:g}" if args.granularity == "channel" else ""
        setting = (f"{args.granularity} keep {args.keep:g}{shape}, {ranking}, {steps} steps, lr {args.lr:g}, "
                   f"distill {distill:g} at temperature {temperature:g}, block features {features:g}, "
                   f"label smoothing {smoothing:g}, "
                   f"BN weights {'learned' if bn else 'frozen'}, weight decay ×{decay:g}, {schedule} lr"
                   f" (teacher TTA {tta}){gates}" + (f", soup of {soup}" if soup > 1 else "")
                   + (f", mixup Beta({mixup:g}, {mixup:g})" if mixup else ""))
        seconds = time.perf_counter() - began + (progress.earlier_seconds if progress is not None else 0.0)
        outcome = {"setting": setting, "validation": val, "ingredients": ingredient_vals,
                   "smaller_soups": smaller_soups, "seconds": round(seconds, 1)}
        report(outcome, batch_seed, f" (resumed at step {progress.resumed_step})" if progress and
               progress.resumed_step else "")
        if record is not None:
            write_json_atomic(record, outcome)
            progress.path.unlink(missing_ok=True)
    if len(args.batch_seeds) > 1:
        print(seed_summary(results, dense_val), flush=True)
    if final_masks:  # how much the survivors depend on the gates (and on the schedule) at all
        reference = flat_mask(topk_masks(importance(teacher, "magnitude"), args.keep, floor=0.002))
        runs = list(final_masks.items())
        for i, (setting, mask) in enumerate(runs):
            overlap = (mask & reference).sum().item() / reference.sum().item()
            print(f"survivors of (criterion, steps, distill, gates, hard-concrete rank, gate lr, share, lookahead, "
                  f"teacher TTA, temperature, label smoothing, BN weights, decay scale, lr schedule, feature "
                  f"weight, dense ends, soup, mixup, batch seed) = "
                  f"{setting}: "
                  f"share also in one-shot |W| top-K {overlap:.3f}", flush=True)
            for other, other_mask in runs[i + 1:]:
                print(f"  ... also in {other}'s: {(mask & other_mask).sum().item() / mask.sum().item():.3f}",
                      flush=True)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seed_summary(results: dict[str, dict[int, float]], dense_val: float) -> str:
    """Per setting: validation mean ± std over the batch seeds and the drop; from the second setting on,
    the paired difference from the first (same seeds, hence the same batches): mean ± std of the
    per-seed differences, which cancels the part of the spread the two settings share."""
    settings = list(results)
    first = results[settings[0]]
    lines = ["over batch seeds (validation %, mean ± sample std; paired: this setting minus the first, seed by seed):"]
    for setting in settings:
        values = results[setting]
        mean = statistics.fmean(values.values())
        spread = statistics.stdev(values.values()) if len(values) > 1 else 0.0
        line = (f"  {setting}: {mean:.2f} ± {spread:.2f} (drop {dense_val - mean:.2f}) over seeds "
                + ", ".join(f"{seed}: {v:.2f}" for seed, v in values.items()))
        if setting != settings[0]:
            deltas = [values[seed] - first[seed] for seed in values if seed in first]
            if deltas:
                line += (f"; paired {statistics.fmean(deltas):+.2f}"
                         f" ± {statistics.stdev(deltas) if len(deltas) > 1 else 0.0:.2f} over {len(deltas)} seeds")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()

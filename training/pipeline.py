"""`prune-train`: data → train gated model (per seed) → prune sweep → evaluate → export to models/.

Every seed's work is saved under ``--work-dir`` as it completes (per-epoch training checkpoints,
then the seed's sweep results), so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from core import checkpoint
from core.hardware import DEVICES_HELP, PRECISIONS, describe, retain_freed_memory, select_device, select_precision
from core.model import TTA_LEVELS, GatedNet, NetConfig, count_parameters
from training import report
from training.data import DataError, channel_stats, load_dataset, normalize, split_validation
from training.prune import (
    CHANNEL_MULTIPLE,
    CHANNEL_RANKINGS,
    CRITERIA,
    SCOPES,
    UNIFORM_STAGE_SCALES,
    channel_masks,
    channel_ranking_scores,
    channel_widths,
    check_keep,
    even_cut,
    prune,
)
from training.train import (
    GATE_METHODS,
    PHASE2_CRITERIA,
    RECIPE_VERSION,
    Phase2Checkpoint,
    PruneConfig,
    Teacher,
    TrainConfig,
    accuracy,
    accuracy_by_level,
    epoch_history,
    prune_finetune,
    recalibrate_bn,
    train,
)

SCHEMA_VERSION = 1
DEFAULT_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
# Channel keeps: the fraction of each conv's channels kept (parameters scale roughly with keep²). These
# give multiples of 8 channels in every layer (32/64/256 wide): ONNX Runtime blocks channels by 8/16,
# and 0.75 ran 1.3-1.5x faster in it than the unaligned 0.7 (measured here; PyTorch ran both alike).
DEFAULT_CHANNEL_KEEPS = (0.75, 0.625, 0.5, 0.25)
METHODS = ("gate_magnitude", "magnitude_gradual", "magnitude")  # phase-2 methods (see --methods)
SOUP_SCOPES = ("shipped", "all")  # which phase-2 fine-tunes --soup applies to (see --soup-scope)
# Fine-tunes averaged per shipped variant (sparse model soup, PruneConfig.soup). 3 beat one fine-tune on every
# paired validation run: +0.17 ± 0.09 points at weight keep 0.05, +0.51 ± 0.25 at keep 0.1 (three batch seeds
# each), +0.66 ± 0.31 at channel keep 0.625 (two; docs/training.md), for 2 more fixed-mask fine-tunes each.
DEFAULT_SOUP = 3
FIRST_INGREDIENT_SCORES = ("val_acc", "test_acc", "test_acc_no_tta")  # a soup's first fine-tune, recorded too
TEACHER_CACHE = "teacher-logits.pt"  # per seed dir: the dense teacher's logits per phase-2 step (train.Teacher)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults, prune_defaults = TrainConfig(), PruneConfig()
    p = argparse.ArgumentParser(prog="prune-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("data and outputs")
    io.add_argument("--data", help="cifar10-jpeg.tar.gz, an ImageFolder root (train/, test/) "
                                   "or a torchvision CIFAR10 root (required unless --status)")
    io.add_argument("--out", default="models", help="export directory (manifest, checkpoints, plot, tables)")
    io.add_argument("--work-dir", default="runs", help="resumable per-seed checkpoints and results; a work dir "
                                                       "made with other flags is refused")
    io.add_argument("--cache-dir", default=None, help="decoded data set cache (default ~/.cache/gated-prune)")
    io.add_argument("--val-size", type=int, default=5000, help="validation images held out of train (every "
                                                               "choice is made on them; test only reports)")
    io.add_argument("--train-limit", type=int, default=0, help="use only this many training images (smoke runs)")
    io.add_argument("--status", action="store_true", help="print what the work dir holds for this command and "
                                                          "the time left at the rates measured so far; train nothing")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--device", default="auto", help=DEVICES_HELP)
    hw.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="autocast precision; auto = bf16 on bf16-capable GPUs and on CPUs with native bf16 "
                         "(AMX / AVX512-BF16), fp16 on older GPUs, else fp32")
    hw.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    net = p.add_argument_group("network")
    net.add_argument("--widths", type=int, nargs=3, default=list(NetConfig.widths), help="channels of the 3 blocks")
    net.add_argument("--stem-width", type=int, default=NetConfig.stem_width, help="channels of the stem conv")
    tr = p.add_argument_group("phase 1: dense training (airbench94's recipe)")
    tr.add_argument("--seeds", type=int, default=3, help="number of training seeds (0, 1, ...)")
    tr.add_argument("--release-seed", type=int, default=0, help="seed whose checkpoints are exported")
    tr.add_argument("--epochs", type=float, default=defaults.epochs, help="training epochs (fractions allowed)")
    tr.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    tr.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate per 1024 images (airbench "
                                                                   "scale: divided by 1024·(1 + 1/(1 − momentum)))")
    tr.add_argument("--momentum", type=float, default=defaults.momentum, help="Nesterov momentum")
    tr.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="per 1024 images, "
                                                                                       "decoupled from the lr")
    tr.add_argument("--bias-scaler", type=float, default=defaults.bias_scaler, help="lr multiple of BN biases")
    tr.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="cross-entropy "
                                                                                             "label smoothing")
    tr.add_argument("--translate", type=int, default=defaults.translate, help="random translation in pixels")
    tr.add_argument("--no-whiten", dest="whiten", action="store_false", help="random stem instead of the "
                                                                              "frozen whitening filters")
    tr.add_argument("--no-lookahead", dest="lookahead", action="store_false", help="no lookahead EMA")
    tr.add_argument("--gate-method", choices=GATE_METHODS, default=defaults.gate_method,
                    help="scores in phase 1: frozen (phase 2 learns them), st_topk (straight-through top-K "
                         "at random keeps), penalty (L1 on sigmoid(S)), none (loss only)")
    tr.add_argument("--gate-lr", type=float, default=defaults.gate_lr, help="Adam lr of the scores (phase 1)")
    tr.add_argument("--gate-min-keep", type=float, default=defaults.gate_min_keep, help="st_topk: smallest keep")
    tr.add_argument("--gate-dense-prob", type=float, default=defaults.gate_dense_prob,
                    help="st_topk: share of dense steps")
    tr.add_argument("--gate-keep-dist", choices=("log", "uniform"), default=defaults.gate_keep_dist,
                    help="st_topk: distribution of the drawn keeps")
    tr.add_argument("--gate-rank", choices=("score", "effective"), default=defaults.gate_rank,
                    help="st_topk: rank by S or by |W·sigmoid(S)|")
    tr.add_argument("--gate-start-epoch", type=int, default=defaults.gate_start_epoch,
                    help="st_topk: dense epochs first")
    tr.add_argument("--gate-penalty", type=float, default=defaults.gate_penalty, help="penalty: its weight")
    pr = p.add_argument_group("phase 2: pruning")
    pr.add_argument("--keeps", type=float, nargs="+", default=list(DEFAULT_KEEPS), help="weight keep ratios")
    pr.add_argument("--criteria", nargs="+", choices=CRITERIA, default=["gate_magnitude", "random"],
                    help="one-shot criteria evaluated without fine-tuning (the baselines; 'magnitude' ranks "
                         "exactly like gate_magnitude while phase 1 keeps the scores fixed)")
    pr.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS),
                    help="phase-2 methods: gate_magnitude = gradual top-K with learned gates (shipped); "
                         "magnitude_gradual = the same with gates frozen; magnitude = one-shot + the same fine-tune")
    pr.add_argument("--prune-max-keep", type=float, default=0.3, help="phase 2 for keeps <= this (above it the "
                                                                      "one-shot variants lose nothing measurable)")
    pr.add_argument("--prune-steps", type=int, default=prune_defaults.steps, help="phase-2 steps per variant "
                                                                                  "(0: no phase 2)")
    pr.add_argument("--prune-share", type=float, default=prune_defaults.prune_share,
                    help="share of the steps over which the kept share falls to the target")
    pr.add_argument("--prune-lr", type=float, default=prune_defaults.lr, help="phase-2 peak lr, multiple of --lr")
    pr.add_argument("--prune-gate-lr", type=float, default=prune_defaults.gate_lr, help="Adam lr of the scores")
    pr.add_argument("--prune-criterion", choices=PHASE2_CRITERIA, default=prune_defaults.criterion,
                    help="what phase 2's top-K ranks: |W·sigmoid(S)| across the net, or its per-layer LAMP "
                         "normalisation (each layer's share follows its own magnitude distribution)")
    pr.add_argument("--distill", type=float, default=prune_defaults.distill,
                    help="weight of distillation from the dense network (0: labels only)")
    pr.add_argument("--temperature", type=float, default=prune_defaults.temperature, help="distillation "
                                                                                          "temperature")
    pr.add_argument("--dense-ends", action=argparse.BooleanOptionalAction, default=prune_defaults.dense_ends,
                    help="phase 2 keeps the stem and the head whole (their weights count towards the K)")
    pr.add_argument("--soup", type=int, default=DEFAULT_SOUP,
                    help="sparse model soup: fine-tune a variant's final mask this many times on batches of "
                         "their own and average the weights (1: off); which fine-tunes: --soup-scope")
    pr.add_argument("--soup-scope", choices=SOUP_SCOPES, default="shipped",
                    help="with --soup above 1: shipped = only the fine-tunes export can ship (the "
                         "--ship-criterion method's and the channel keeps), all = also the other --methods, "
                         "which are there to compare criteria; either way a soup's first ingredient is scored "
                         "too, so the criteria table compares equal fine-tune budgets")
    pr.add_argument("--ship-criterion", choices=CRITERIA, default="gate_magnitude",
                    help="criterion of the exported weight variants")
    pr.add_argument("--scope", choices=SCOPES, default="global", help="rank weights across the net or per layer")
    pr.add_argument("--floor", type=float, default=0.002, help="per-layer minimum fraction of weights kept")
    pr.add_argument("--calib-images", type=int, default=2000, help="training images for BN recalibration")
    pr.add_argument("--ship-finetune-min-gain", type=float, default=0.1,
                    help="ship the phase-2 variant only if it beats the one-shot one by this many validation "
                         "points (the one-shot one costs N/8 bytes as a mask over dense.safetensors)")
    pr.add_argument("--channel-keeps", type=float, nargs="*", default=list(DEFAULT_CHANNEL_KEEPS),
                    help="channel-granularity variants: fraction of every conv's channels kept (none: skip)")
    pr.add_argument("--channel-steps", type=int, default=300,
                    help="distilled fine-tune steps per channel variant (removing whole channels needs more)")
    pr.add_argument("--channel-lr", type=float, default=prune_defaults.lr, help="its peak lr, multiple of --lr")
    pr.add_argument("--channel-ranking", choices=CHANNEL_RANKINGS, default="taylor",
                    help="which channels a layer keeps: the largest first-order Taylor estimate of the loss "
                         "change on --calib-images labelled training images (taylor; +0.22 to +0.54 validation "
                         "points over mass after the 300-step fine-tune, docs/training.md), or the most weight "
                         "mass reading them (mass)")
    pr.add_argument("--channel-stage-scales", type=float, nargs=3, default=list(UNIFORM_STAGE_SCALES),
                    metavar=("EARLY", "BLOCK2", "BLOCK3"),
                    help="channel variants: the stem and block1, block2 and block3 keep keep × their scale of "
                         "their channels (at most all): below 1 early and above 1 late spends the channels where "
                         "a CPU's time is not (docs/training.md); 1 1 1 cuts every conv alike")
    pr.add_argument("--channel-multiple", type=int, default=CHANNEL_MULTIPLE, metavar="N",
                    help="scaled channel widths (--channel-stage-scales other than 1 1 1) are rounded to the "
                         "nearest multiple of N channels, where CPU kernels run fastest (1: exact); the even cut "
                         "keeps exactly round(keep × C)")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--tta", type=int, choices=TTA_LEVELS, default=2,
                    help="test-time augmentation the service applies (0 none, 1 mirror, 2 mirror + translate: "
                         "6 views); test accuracy is reported with it and without")
    args = p.parse_args(argv)
    if args.data is None and not args.status:
        p.error("the following arguments are required: --data")
    for keep in [*args.keeps, *args.channel_keeps]:
        try:
            check_keep(keep)
        except ValueError as exc:
            p.error(str(exc))
    if min(args.channel_stage_scales) <= 0:
        p.error(f"--channel-stage-scales are positive, not {args.channel_stage_scales}")
    if args.channel_multiple < 1:
        p.error(f"--channel-multiple is 1 or more, not {args.channel_multiple}")
    if args.soup < 1:
        p.error(f"--soup averages 1 or more fine-tunes, not {args.soup}")
    if 1.0 not in args.keeps:
        args.keeps = [1.0, *args.keeps]
    args.keeps = sorted(set(args.keeps), reverse=True)
    args.channel_keeps = sorted({k for k in args.channel_keeps if k < 1.0}, reverse=True)
    return args


# Flags that do not change results: a work dir may be resumed with other values of these.
_RESULT_NEUTRAL = {"out", "work_dir", "cache_dir", "device", "threads", "seeds", "release_seed", "data", "status"}


# Flags added after work dirs were first recorded, with the value every run before them had: a record
# without one is that value, so a work dir made before the flag resumes under its default. (--soup-scope
# came after --soup, which until then souped every fine-tune; scaled widths were exact before
# --channel-multiple.)
_ADDED_FLAGS = {"soup": 1, "soup_scope": "all", "channel_stage_scales": list(UNIFORM_STAGE_SCALES),
                "channel_multiple": 1}
# Flags that only matter given another's value, each with when it does not: which fine-tunes a soup covers
# does not matter without one, nor what scaled channel widths round to where the scales are even.
_MOOT_WHEN = {"soup_scope": lambda flags: flags.get("soup", 1) == 1,
              "channel_multiple": lambda flags: even_cut(flags.get("channel_stage_scales", UNIFORM_STAGE_SCALES))}


def _without_moot(flags: dict) -> dict:
    """The flags that can change a result (those of _MOOT_WHEN only where they matter)."""
    return {k: v for k, v in flags.items() if not (k in _MOOT_WHEN and _MOOT_WHEN[k](flags))}


def _result_flags(args: argparse.Namespace) -> dict:
    return _without_moot({k: v for k, v in sorted(vars(args).items()) if k not in _RESULT_NEUTRAL})


def _recorded_flags(record: Path) -> dict:
    return _without_moot({**_ADDED_FLAGS, **json.loads(record.read_text())})


def _guard_work_dir(args: argparse.Namespace, dataset_sha: str, precision: str) -> None:
    """Refuse to mix results made with other flags (or another data set) into this run's.

    The precision is recorded as resolved: `--precision auto` means bf16 on one CPU and fp32 on another,
    so a run resumed on other hardware would otherwise continue a seed in another precision.
    """
    work = Path(args.work_dir)
    wanted = _result_flags(args)
    wanted["precision"] = precision
    wanted["dataset_sha256"] = dataset_sha
    wanted["recipe_version"] = RECIPE_VERSION
    record = work / "run-config.json"
    if record.exists():
        found = _recorded_flags(record)
        # A flag moot on one side only differs because the flag that makes it moot does, which is named.
        diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k)
                      and ((k in found and k in wanted) or k not in _MOOT_WHEN))
        if diff:
            hint = ""
            if diff == ["precision"]:
                hint = (f" (it was trained in {found.get('precision')}: pass --precision {found.get('precision')} "
                        "to continue it here)")
            elif set(diff) <= {"soup", "soup_scope"}:  # e.g. a work dir from before soups were the default
                scope = f" --soup-scope {found['soup_scope']}" if "soup_scope" in found else ""
                hint = f" (it was made with --soup {found['soup']}{scope}: pass that to continue it)"
            elif diff == ["channel_multiple"]:
                hint = f" (it was made with --channel-multiple {found['channel_multiple']}: pass that to continue it)"
            raise SystemExit(f"prune-train: error: {work} holds results made with other settings "
                             f"({', '.join(diff)}){hint}; use another --work-dir or delete it")
    else:
        work.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(wanted, indent=1))


def _train_config(args: argparse.Namespace, precision: str) -> TrainConfig:
    """Every TrainConfig field that has a flag of the same name (``--gate-lr`` → gate_lr)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    given["precision"] = precision
    return TrainConfig(**given)


def _prune_config(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(steps=args.prune_steps, prune_share=args.prune_share, lr=args.prune_lr,
                       gate_lr=args.prune_gate_lr, distill=args.distill, temperature=args.temperature,
                       criterion=args.prune_criterion, dense_ends=args.dense_ends, soup=args.soup)


def write_json_atomic(path: Path, data: dict) -> None:
    """A job killed mid-write leaves no half file that a resumed run would read as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _variant_name(criterion: str, keep: float) -> str:
    label = f"{keep:.2f}" if round(keep, 2) == keep else f"{keep:.3f}"  # 0.30, 0.625
    return "dense" if keep == 1.0 else f"{criterion}-keep{label}"


def _calibration_sample(splits: dict, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A seeded random sample: the training split is stored class by class, and BN statistics of
    # one class would mis-normalise the other nine.
    pick = torch.randperm(len(splits["train_y"]), generator=torch.Generator().manual_seed(seed))[:count]
    return splits["train_x"][pick.to(splits["train_x"].device)], splits["train_y"][pick.to(splits["train_y"].device)]


def _evaluate(model: GatedNet, splits: dict, cfg: TrainConfig, tta: int) -> dict:
    """Validation without TTA (what choices use); test with the served TTA, and at every TTA level
    (``test_acc_tta{level}``: what each level's views buy, per variant, for a serving choice)."""
    row = {"val_acc": accuracy(model, splits["val_x"], splits["val_y"], cfg.precision)}
    test = accuracy_by_level(model, splits["test_x"], splits["test_y"], cfg.precision, up_to=max(TTA_LEVELS))
    for level in TTA_LEVELS:
        row[f"test_acc_tta{level}"] = test[level]
    row["test_acc_no_tta"], row["test_acc"] = row["test_acc_tta0"], row[f"test_acc_tta{tta}"]
    return {**row, **count_parameters(model)}


def _shipped_label(args: argparse.Namespace, finetuned: bool) -> str:
    """What a shipped weight variant is named after: its one-shot criterion, or for a fine-tuned one the
    ranking phase 2 pruned by where that is not gate_magnitude (a LAMP-ranked network is named lamp-…)."""
    return args.prune_criterion if finetuned and args.prune_criterion != "gate_magnitude" else args.ship_criterion


def _variant_file(criterion: str, keep: float, finetuned: bool) -> str:
    return f"{_variant_name(criterion, keep)}{'-ft' if finetuned else ''}.safetensors"


def _method_config(method: str, pcfg: PruneConfig, args: argparse.Namespace) -> PruneConfig:
    if args.soup_scope == "shipped" and method != args.ship_criterion:  # a variant that is never shipped
        pcfg = replace(pcfg, soup=1)
    if method == "gate_magnitude":
        return pcfg
    if method == "magnitude_gradual":
        return replace(pcfg, gate_lr=0.0)
    return replace(pcfg, gradual=False)  # "magnitude": one-shot


def _first_ingredient(model: GatedNet, ingredients: list[dict], calib: torch.Tensor, splits: dict,
                      cfg: TrainConfig, tta: int) -> dict:
    """A soup's first ingredient scored as the variant itself is (BN re-estimated, validation and test):
    the fine-tune a run without a soup would have shipped, so criteria compare at equal budgets. No soup
    (no ingredients): nothing to add."""
    if not ingredients:
        return {}
    first = copy.deepcopy(model)  # the same installed masks
    first.load_state_dict(ingredients[0])
    recalibrate_bn(first, calib, precision=cfg.precision)
    scores = _evaluate(first, splits, cfg, tta)
    return {"soup": len(ingredients), **{f"first_{key}": scores[key] for key in FIRST_INGREDIENT_SCORES}}


def _sweep_jobs(args: argparse.Namespace, seed_dir: Path) -> list[tuple[str, float, str | None, Path]]:
    """A seed's weight variants in the order they run: (criterion, keep, phase-2 method or None, record)."""
    jobs = [(c, k, None) for c in args.criteria for k in args.keeps if not (k == 1.0 and c != args.criteria[0])]
    if args.prune_steps > 0:
        jobs += [(m, k, m) for m in args.methods for k in args.keeps if k < 1.0 and k <= args.prune_max_keep]
    return [(c, k, m, seed_dir / "sweep" / f"{c}-keep{k:.3f}-{'ft' if m else 'oneshot'}.json") for c, k, m in jobs]


def _channel_record(seed_dir: Path, keep: float) -> Path:
    return seed_dir / "channel" / f"keep{keep:.3f}.json"


def _progress_file(record: Path) -> Path:
    """Where the fine-tune behind a variant's ``record`` saves its progress until the record is written."""
    return record.with_suffix(".progress.pt")


def run_seed(args: argparse.Namespace, seed: int, splits: dict, cfg: TrainConfig, pcfg: PruneConfig,
             net_cfg: NetConfig, device: torch.device, hardware: dict) -> dict:
    """Train one seed and sweep criteria × keeps; cached in work_dir/seed-N/results.json."""
    seed_dir = Path(args.work_dir) / f"seed-{seed}"
    results_file = seed_dir / "results.json"
    if results_file.exists():
        print(f"seed {seed}: results found in {results_file}, skipping", flush=True)
        return json.loads(results_file.read_text())

    torch.manual_seed(seed)
    model = GatedNet(net_cfg).to(device, memory_format=torch.channels_last)
    bar = tqdm(total=math.ceil(cfg.epochs), desc=f"seed {seed} train", unit="epoch", file=sys.stdout)

    def progress(epoch: int, entry: dict) -> None:
        bar.update(epoch - bar.n)  # resumed runs jump straight to their epoch
        bar.set_postfix(loss=f"{entry['loss']:.3f}")

    history = train(model, splits["train_x"], splits["train_y"], cfg, seed, seed_dir / "train", progress=progress)
    bar.close()
    _, dense_sha = checkpoint.save_dense(model, seed_dir / "dense.safetensors")
    # Variants that are not fine-tuned are stored as masks over this checkpoint (see checkpoint.py).
    base = ("../dense.safetensors", dense_sha, checkpoint.folded_weights(model))
    dense_state = copy.deepcopy(model.state_dict())
    # Shared by the seed's fine-tunes and kept on disk: its logits are computed once per step, ever.
    teacher = Teacher(model, seed_dir / TEACHER_CACHE)
    calib, _ = _calibration_sample(splits, seed, args.calib_images)
    release = seed == args.release_seed

    rows: list[dict] = []
    jobs = _sweep_jobs(args, seed_dir)  # one file per finished variant: a cut run resumes at the next one
    for criterion, keep, method, done in tqdm(jobs, desc=f"seed {seed} sweep", unit="variant", file=sys.stdout):
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        model.load_state_dict(dense_state)
        model.set_masks(None)
        began = time.perf_counter()
        progress = Phase2Checkpoint(_progress_file(done))  # a cut fine-tune resumes mid-way
        ingredients: list[dict] = []  # a soup's fine-tunes (none without one)
        if method is not None:
            prune_finetune(model, splits["train_x"], splits["train_y"], keep, cfg,
                           _method_config(method, pcfg, args), seed, teacher=teacher, scope=args.scope,
                           floor=args.floor, progress=progress, ingredients=ingredients)
        elif keep < 1.0:
            prune(model, criterion, keep, args.scope, args.floor, seed)
        recalibrate_bn(model, calib, precision=cfg.precision)
        finetuned = method is not None
        row = {"criterion": criterion if keep < 1.0 else "dense", "keep": keep, "finetuned": finetuned,
               **_evaluate(model, splits, cfg, args.tta),
               **_first_ingredient(model, ingredients, calib, splits, cfg, args.tta),
               "seconds": round(time.perf_counter() - began + progress.earlier_seconds, 2)}
        if release and (criterion == args.ship_criterion or keep == 1.0):
            # The release seed's candidates for shipping, written as they come; export picks.
            checkpoint.save_pruned(model, seed_dir / "variants" / _variant_file(_shipped_label(args, finetuned),
                                                                                keep, finetuned),
                                   None if finetuned else base)
        write_json_atomic(done, row)  # after its checkpoint: a recorded variant always has one
        progress.path.unlink(missing_ok=True)
        rows.append(row)
    model.set_masks(None)
    result = {"seed": seed, "history": history, "rows": rows, "hardware": hardware,
              "sweep_seconds": sum(r["seconds"] for r in rows)}  # summed per variant: right across resumes
    write_json_atomic(results_file, result)
    return result


def run_channel_seed(args: argparse.Namespace, seed: int, splits: dict, cfg: TrainConfig, pcfg: PruneConfig,
                     device: torch.device) -> list[dict]:
    """Channel-granularity variants of one trained seed: top-K channels per layer, distilled fine-tune,
    BN recalibration. Each keep is cached in work_dir/seed-N/channel/ as it completes."""
    seed_dir = Path(args.work_dir) / f"seed-{seed}"
    out_dir = seed_dir / "channel"
    calib, calib_labels = _calibration_sample(splits, seed, args.calib_images)
    dense, teacher, scores = None, None, None  # loaded (and its channels ranked) once, when a keep is not cached
    rows = []
    for keep in tqdm(args.channel_keeps, desc=f"seed {seed} channels", unit="variant", file=sys.stdout):
        done = _channel_record(seed_dir, keep)
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        if dense is None:
            dense = checkpoint.load_model(seed_dir / "dense.safetensors").to(device, memory_format=torch.channels_last)
            teacher = Teacher(dense, seed_dir / TEACHER_CACHE)  # the sweep's cache, if the weights match
            scores = channel_ranking_scores(dense, args.channel_ranking, calib, calib_labels, cfg.precision)
        model = copy.deepcopy(dense)
        began = time.perf_counter()
        widths = channel_widths(model, keep, args.channel_stage_scales, args.channel_multiple)
        masks = channel_masks(model, keep, scores, widths)
        progress = Phase2Checkpoint(_progress_file(done))
        ingredients: list[dict] = []
        prune_finetune(model, splits["train_x"], splits["train_y"], keep, cfg,
                       replace(pcfg, steps=args.channel_steps, lr=args.channel_lr, gradual=False), seed,
                       teacher=teacher, masks=masks, progress=progress, ingredients=ingredients)
        recalibrate_bn(model, calib, precision=cfg.precision)
        row = {"criterion": "channel", "keep": keep, "finetuned": True, "widths": list(widths.values()),
               **_evaluate(model, splits, cfg, args.tta),
               **_first_ingredient(model, ingredients, calib, splits, cfg, args.tta),
               "seconds": round(time.perf_counter() - began + progress.earlier_seconds, 2)}
        if seed == args.release_seed:
            checkpoint.save_pruned(model, out_dir / _variant_file("channel", keep, True))
        write_json_atomic(done, row)
        progress.path.unlink(missing_ok=True)
        rows.append(row)
    return rows


def _saved_progress(progress_file: Path, steps: int) -> tuple[str, float] | None:
    """Where a cut fine-tune's save stands, in words, and the share of its work done (a soup's further
    ingredients included), or None if there is no readable save."""
    try:
        saved = torch.load(progress_file, map_location="cpu", weights_only=True)
        step, soup = int(saved["step"]), saved.get("soup") or {}
    except Exception:  # noqa: BLE001 - unreadable or damaged: the fine-tune starts again, so report no save
        return None
    where = f"saved at step {step} of {steps}"
    if soup.get("ingredient"):
        where += f" of soup ingredient {soup['ingredient'] + 1}"
    return where, float(soup.get("share", step / max(1, steps)))


def status(args: argparse.Namespace) -> str:
    """What the work dir holds for this command and what is left, with the time left estimated from the
    rates this run measured so far (per epoch, per fine-tune, per one-shot evaluation, per channel keep)."""
    work = Path(args.work_dir)
    record = work / "run-config.json"
    lines = [f"prune-train status: {work}" + (" (empty: nothing run yet)" if not record.exists() else "")]
    if record.exists():
        found = _recorded_flags(record)
        lines[0] += f" (precision {found.get('precision')}, recipe {found.get('recipe_version')})"
        wanted = _result_flags(args)
        try:  # recorded as resolved (see _guard_work_dir)
            wanted["precision"] = select_precision(args.precision, select_device(args.device))
        except ValueError:
            pass
        other = sorted(k for k, v in wanted.items() if found.get(k) != v)
        if other:
            lines.append(f"made with other settings than this command's ({', '.join(other)}): "
                         "training with it would be refused")
    epochs = math.ceil(args.epochs)
    spent: dict[str, list[float]] = {"epoch": [], "ft": [], "oneshot": [], "channel": []}
    left: dict[str, float] = {"epoch": 0.0, "ft": 0.0, "oneshot": 0.0, "channel": 0.0}
    for seed in range(args.seeds):
        seed_dir = work / f"seed-{seed}"
        history: list[dict] = []
        if (seed_dir / "results.json").exists():
            history = json.loads((seed_dir / "results.json").read_text())["history"]
        elif newest := sorted((seed_dir / "train").glob("epoch-*.pt")):
            state = torch.load(newest[-1], map_location="cpu", weights_only=True)
            history = epoch_history(state)
        trained = epochs if (seed_dir / "dense.safetensors").exists() else len(history)
        spent["epoch"] += [h["seconds"] for h in history]
        left["epoch"] += epochs - trained
        # (kind, record, fine-tune steps, label prefix) for every weight variant, then every channel keep
        items = [("ft" if method else "oneshot", done, args.prune_steps if method else 0, "")
                 for *_, method, done in _sweep_jobs(args, seed_dir)]
        items += [("channel", _channel_record(seed_dir, keep), args.channel_steps, "channel ")
                  for keep in args.channel_keeps]
        finished, cut = {"sweep": 0, "channel": 0}, []
        for kind, done, steps, prefix in items:
            if done.exists():
                finished["channel" if kind == "channel" else "sweep"] += 1
                spent[kind].append(json.loads(done.read_text())["seconds"])
                continue
            saved = _saved_progress(_progress_file(done), steps)
            left[kind] += 1 - (saved[1] if saved else 0.0)
            if saved is not None:
                cut.append(f"{prefix}{done.stem} {saved[0]}")
        lines.append(f"seed {seed}: phase 1 {trained}/{epochs} epochs, sweep {finished['sweep']}/"
                     f"{len(items) - len(args.channel_keeps)} variants, "
                     f"channel {finished['channel']}/{len(args.channel_keeps)} keeps"
                     + "".join(f"; {c}" for c in cut))
    rates = {kind: statistics.fmean(times) for kind, times in spent.items() if times}
    untimed = [kind for kind, count in left.items() if count > 0 and kind not in rates]
    hours_left = sum(count * rates.get(kind, 0.0) for kind, count in left.items()) / 3600
    summary = f"time spent: {sum(map(sum, spent.values())) / 3600:.1f} h; left: "
    if not any(left.values()):
        summary += "nothing"
    else:
        summary += f"{hours_left:.1f} h at the rates measured here"
        if untimed:
            summary += f", plus what is not timed yet ({', '.join(untimed)})"
    lines.append(summary)
    per = {"epoch": "phase-1 epoch", "ft": "fine-tuned variant", "oneshot": "one-shot variant",
           "channel": "channel keep"}
    lines.append("rates: " + (", ".join(f"{seconds:.0f} s per {per[kind]}" for kind, seconds in rates.items())
                              or "none yet"))
    return "\n".join(lines)


def _sparsity(row: dict) -> float:
    """Share of prunable weights that are zero (1 − keep for weight variants; measured for channels)."""
    nonzero_prunable = row["nonzero"] - (row["total"] - row["prunable"])
    return round(1 - nonzero_prunable / row["prunable"], 4)


def _spread(values: list[float]) -> float:
    """Sample std over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (criterion, keep, finetuned); drop is vs the dense mean."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        for row in result["rows"]:
            groups.setdefault((row["criterion"], row["keep"], row["finetuned"]), []).append(row)
    dense = [r["test_acc"] for r in groups[("dense", 1.0, False)]]
    dense_mean = statistics.fmean(dense)
    table = []
    for (criterion, keep, finetuned), rows in groups.items():
        test = [r["test_acc"] for r in rows]
        val = [r["val_acc"] for r in rows]
        plain = [r.get("test_acc_no_tta", r["test_acc"]) for r in rows]
        table.append({
            "criterion": criterion, "granularity": "channel" if criterion == "channel" else "weight",
            "keep": keep, "sparsity": _sparsity(rows[0]), "finetuned": finetuned,
            "test_acc_per_seed": test, "test_acc_mean": statistics.fmean(test),
            "test_acc_std": _spread(test),
            "val_acc_mean": statistics.fmean(val) if all(v == v for v in val) else None,
            "drop": dense_mean - statistics.fmean(test),
            "test_acc_no_tta_mean": statistics.fmean(plain),
            "test_acc_no_tta_std": _spread(plain),
            "total": rows[0]["total"], "prunable": rows[0]["prunable"], "nonzero": rows[0]["nonzero"],
            **({"widths": rows[0]["widths"]} if "widths" in rows[0] else {}),  # channel rows (older runs: none)
        })
        for level in TTA_LEVELS:  # every TTA level, where all of the group's rows have it (older runs: dense only)
            key = f"test_acc_tta{level}"
            if all(key in r for r in rows):
                table[-1][f"{key}_mean"] = statistics.fmean(r[key] for r in rows)
        if all("soup" in r for r in rows):  # a soup: its first ingredient alone, the equal-budget figure
            first = [r["first_test_acc"] for r in rows]
            table[-1].update({
                "soup": rows[0]["soup"], "first_test_acc_mean": statistics.fmean(first),
                "first_test_acc_std": _spread(first),
                "first_val_acc_mean": statistics.fmean(r["first_val_acc"] for r in rows),
                "first_test_acc_no_tta_mean": statistics.fmean(r["first_test_acc_no_tta"] for r in rows)})
    table.sort(key=lambda r: (r["criterion"] != "dense", r["criterion"], -r["keep"], r["finetuned"]))
    return table


def _tta_levels(row: dict) -> dict[str, float]:
    """A table row's mean test accuracy at each TTA level, where its run measured it."""
    return {key: row[key] for key in (f"test_acc_tta{level}_mean" for level in TTA_LEVELS) if key in row}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _ship_finetuned(stats: dict[bool, dict], min_gain: float) -> bool:
    """Ship the fine-tuned variant only if it beats the plain one on VALIDATION by min_gain points:
    a smaller gain is within seed noise, and the plain variant is stored as a mask over the dense
    checkpoint (≈N/8 bytes) while a fine-tuned one must store every surviving value."""
    if True not in stats:
        return False
    val_ft, val_plain = stats[True]["val_acc_mean"], stats[False]["val_acc_mean"]
    if val_ft is None or val_plain is None:  # no validation split: fall back to always fine-tuned
        return True
    return val_ft - val_plain >= min_gain


def export(args: argparse.Namespace, table: list[dict], dataset_info: dict, mean: list[float],
           std: list[float], cfg: TrainConfig, pcfg: PruneConfig, net_cfg: NetConfig, results: list[dict],
           hardware: dict) -> dict:
    out = Path(args.out)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    release_dir = Path(args.work_dir) / f"seed-{args.release_seed}"
    dense_data = (release_dir / "dense.safetensors").read_bytes()
    (out / "dense.safetensors").write_bytes(dense_data)
    variants = []
    shipped = (args.ship_criterion, "dense")
    for keep in args.keeps:
        stats = {r["finetuned"]: r for r in table if r["keep"] == keep and r["criterion"] in shipped
                 and r["granularity"] == "weight"}
        finetuned = _ship_finetuned(stats, args.ship_finetune_min_gain)
        best = stats[finetuned]
        label = _shipped_label(args, finetuned)
        source = release_dir / "variants" / _variant_file(label, keep, finetuned)
        data = source.read_bytes()
        (out / "variants" / source.name).write_bytes(data)
        variants.append({
            "name": _variant_name(label, keep), "criterion": best["criterion"] if keep == 1.0 else label,
            "keep": keep, "sparsity": round(1 - keep, 4), "granularity": "weight",
            "file": f"variants/{source.name}", "bytes": len(data), "sha256": checkpoint.sha256_bytes(data),
            "params": {"total": best["total"], "prunable": best["prunable"], "nonzero": best["nonzero"]},
            "finetuned": finetuned, "test_acc_per_seed": best["test_acc_per_seed"],
            "test_acc_mean": best["test_acc_mean"], "test_acc_std": best["test_acc_std"], "drop": best["drop"],
            "val_acc_mean": best["val_acc_mean"], "test_acc_no_tta_mean": best["test_acc_no_tta_mean"],
            **_tta_levels(best),
            # Masked variants need this file too (it is verified by its sha256 when they load).
            "base": "dense.safetensors" if checkpoint.base_reference(data, source) else None,
        })
    for keep in args.channel_keeps:
        best = next(r for r in table if r["criterion"] == "channel" and r["keep"] == keep)
        source = release_dir / "channel" / _variant_file("channel", keep, True)
        data = source.read_bytes()
        (out / "variants" / source.name).write_bytes(data)
        variants.append({
            "name": _variant_name("channel", keep), "criterion": "channel", "keep": keep,
            "sparsity": best["sparsity"], "granularity": "channel", "file": f"variants/{source.name}",
            "bytes": len(data), "sha256": checkpoint.sha256_bytes(data),
            "params": {"total": best["total"], "prunable": best["prunable"], "nonzero": best["nonzero"]},
            "finetuned": True, "test_acc_per_seed": best["test_acc_per_seed"],
            "test_acc_mean": best["test_acc_mean"], "test_acc_std": best["test_acc_std"], "drop": best["drop"],
            "val_acc_mean": best["val_acc_mean"], "test_acc_no_tta_mean": best["test_acc_no_tta_mean"],
            **_tta_levels(best), **({"widths": best["widths"]} if "widths" in best else {}), "base": None,
        })
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "classes": dataset_info["classes"],
        "normalization": {"mean": mean, "std": std},
        "input_size": [3, 32, 32],
        "architecture": net_cfg.to_dict(),
        "training": {**cfg.to_dict(), "seeds": list(range(args.seeds)), "release_seed": args.release_seed,
                     "val_size": args.val_size, "train_limit": args.train_limit, "scope": args.scope,
                     "floor": args.floor, "calib_images": args.calib_images, "ship_criterion": args.ship_criterion,
                     "ship_finetune_min_gain": args.ship_finetune_min_gain,
                     "methods": args.methods, "prune_max_keep": args.prune_max_keep, "phase2": pcfg.to_dict(),
                     "soup_scope": args.soup_scope,
                     "channel_keeps": args.channel_keeps, "channel_steps": args.channel_steps,
                     "channel_lr": args.channel_lr, "channel_ranking": args.channel_ranking,
                     "channel_stage_scales": args.channel_stage_scales, "channel_multiple": args.channel_multiple,
                     "recipe_version": RECIPE_VERSION},
        "hardware": {"export": hardware, "per_seed": [r.get("hardware") for r in results]},
        "tta": args.tta,
        "timing": {  # measured when each seed ran (sweep time was not recorded by older runs: null)
            "train_seconds_per_seed": [round(sum(h["seconds"] for h in r["history"]), 1) for r in results],
            "sweep_seconds_per_seed": [round(r["sweep_seconds"], 1) if "sweep_seconds" in r else None
                                       for r in results],
        },
        "eval_precision": cfg.precision,
        "dataset": dataset_info,
        "torch_version": torch.__version__,
        "git_commit": _git_commit(),
        "dense": {"file": "dense.safetensors", "bytes": len(dense_data),
                  "sha256": checkpoint.sha256_bytes(dense_data),
                  "note": "gated training checkpoint (weights + scores) of the release seed"},
        "variants": variants,
        "sweep": table,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    report.write_tables(table, out)
    report.plot_tradeoff(table, out / "tradeoff.png")
    report.write_summary(manifest, out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)  # e.g. "phase 2: resumed at step 450 of 600"
    if args.status:
        print(status(args))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    # A training step's activations come back from the heap instead of fresh mmaps: 1.5x faster steps
    # on a CPU (core/hardware.py); a no-op where the operator set MALLOC_* or the C library is not glibc.
    memory_retained = retain_freed_memory(large_buffers=True)
    try:
        data = load_dataset(args.data, args.cache_dir)
    except DataError as exc:
        print(f"prune-train: error: {exc}", file=sys.stderr)
        return 2
    train_idx, val_idx = split_validation(data.train_labels, args.val_size, seed=0)
    if args.train_limit:  # a seeded random subset (the indices are sorted by class)
        train_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(0))]
        train_idx = train_idx[:args.train_limit].sort().values
    mean, std = channel_stats(data.train_images[train_idx])
    splits = {
        "train_x": normalize(data.train_images[train_idx], mean, std), "train_y": data.train_labels[train_idx],
        "val_x": normalize(data.train_images[val_idx], mean, std), "val_y": data.train_labels[val_idx],
        "test_x": normalize(data.test_images, mean, std), "test_y": data.test_labels,
    }
    net_cfg = NetConfig(widths=tuple(args.widths), stem_width=args.stem_width, num_classes=len(data.classes))
    try:
        device = select_device(args.device)
        precision = select_precision(args.precision, device)
    except ValueError as exc:
        print(f"prune-train: error: {exc}", file=sys.stderr)
        return 2
    hardware = describe(device, precision) | {"memory_retained": memory_retained}
    print(f"prune-train: {hardware['device']} ({hardware.get('gpu_model', hardware['cpu_model'])}), "
          f"precision {precision}, torch {hardware['torch_version']}", flush=True)
    resuming = (Path(args.work_dir) / "run-config.json").exists()
    _guard_work_dir(args, data.describe()["sha256"], precision)
    if resuming:  # where this run picks up, in the log of every restart
        print(status(args), flush=True)
    splits = {k: v.to(device) for k, v in splits.items()}
    cfg = _train_config(args, precision)
    pcfg = _prune_config(args)
    if len(splits["train_y"]) < cfg.batch_size:
        cfg.batch_size = max(1, len(splits["train_y"]))  # tiny data sets (smoke tests)
    began = time.perf_counter()
    results = [run_seed(args, seed, splits, cfg, pcfg, net_cfg, device, hardware) for seed in range(args.seeds)]
    for seed in range(args.seeds):  # structured variants reuse each seed's trained model
        channel_rows = run_channel_seed(args, seed, splits, cfg, pcfg, device)
        results[seed] = {**results[seed], "rows": results[seed]["rows"] + channel_rows}
    print(f"prune-train: seeds, sweeps and channel variants took {time.perf_counter() - began:.1f} s in this "
          "invocation", flush=True)
    table = aggregate(results)
    manifest = export(args, table, data.describe(), mean, std, cfg, pcfg, net_cfg, results, hardware)
    dense = manifest["variants"][0]
    print(f"exported {len(manifest['variants'])} variants to {args.out}: dense test accuracy "
          f"{dense['test_acc_mean']:.2f} ± {dense['test_acc_std']:.2f} % over {args.seeds} seed(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

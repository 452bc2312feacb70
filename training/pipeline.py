"""`prune-train`: data → train gated model (per seed) → prune sweep → evaluate → export to models/.

Every seed's work is saved under ``--work-dir`` as it completes (per-epoch training checkpoints,
then the seed's sweep results), so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
from tqdm import tqdm

from training import checkpoint, report
from training.data import DataError, channel_stats, load_dataset, normalize, split_validation
from training.model import GatedNet, NetConfig, count_parameters
from training.prune import CRITERIA, SCOPES, check_keep, prune, prune_channels
from training.train import GATE_METHODS, TrainConfig, accuracy, finetune, recalibrate_bn, train

SCHEMA_VERSION = 1
DEFAULT_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
# Channel keeps: the fraction of each conv's channels kept (parameters scale roughly with keep²). These
# give multiples of 8 channels in every layer (32/64/256 wide): ONNX Runtime blocks channels by 8/16,
# and 0.75 ran 1.3-1.5x faster in it than the unaligned 0.7 (measured here; PyTorch ran both alike).
DEFAULT_CHANNEL_KEEPS = (0.75, 0.5, 0.25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="prune-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz, an ImageFolder root (train/, test/) "
                                                 "or a torchvision CIFAR10 root")
    p.add_argument("--out", default="models", help="export directory (manifest, checkpoints, plot, tables)")
    p.add_argument("--work-dir", default="runs", help="resumable per-seed checkpoints and results")
    p.add_argument("--cache-dir", default=None, help="decoded data set cache (default ~/.cache/gated-prune)")
    p.add_argument("--seeds", type=int, default=3, help="number of training seeds (0, 1, ...)")
    p.add_argument("--release-seed", type=int, default=0, help="seed whose checkpoints are exported")
    p.add_argument("--widths", type=int, nargs=3, default=list(NetConfig.widths))
    p.add_argument("--stem-width", type=int, default=NetConfig.stem_width)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    p.add_argument("--gate-method", choices=GATE_METHODS, default=defaults.gate_method)
    p.add_argument("--gate-lr", type=float, default=defaults.gate_lr)
    p.add_argument("--gate-min-keep", type=float, default=defaults.gate_min_keep)
    p.add_argument("--gate-dense-prob", type=float, default=defaults.gate_dense_prob)
    p.add_argument("--gate-keep-dist", choices=("log", "uniform"), default=defaults.gate_keep_dist)
    p.add_argument("--gate-rank", choices=("score", "effective"), default=defaults.gate_rank)
    p.add_argument("--gate-start-epoch", type=int, default=defaults.gate_start_epoch)
    p.add_argument("--gate-penalty", type=float, default=defaults.gate_penalty)
    p.add_argument("--no-bf16", action="store_true", help="train and evaluate in float32")
    p.add_argument("--val-size", type=int, default=5000, help="validation images held out of train")
    p.add_argument("--train-limit", type=int, default=0, help="use only this many training images (smoke runs)")
    p.add_argument("--keeps", type=float, nargs="+", default=list(DEFAULT_KEEPS))
    p.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    p.add_argument("--ship-criterion", choices=CRITERIA, default="gate_magnitude",
                   help="criterion of the exported variants")
    p.add_argument("--scope", choices=SCOPES, default="global")
    p.add_argument("--floor", type=float, default=0.002, help="per-layer minimum fraction of weights kept")
    p.add_argument("--calib-images", type=int, default=2000, help="training images for BN recalibration")
    p.add_argument("--finetune-steps", type=int, default=40, help="masked fine-tune steps per variant (0: off)")
    p.add_argument("--finetune-criteria", nargs="*", choices=CRITERIA, default=["gate_magnitude", "magnitude"])
    p.add_argument("--finetune-max-keep", type=float, default=0.5, help="fine-tune variants with keep <= this")
    p.add_argument("--ship-finetune-min-gain", type=float, default=0.2,
                   help="ship a fine-tuned variant only if it gains this many validation points")
    p.add_argument("--channel-keeps", type=float, nargs="*", default=list(DEFAULT_CHANNEL_KEEPS),
                   help="channel-granularity variants: fraction of every conv's channels kept (none: skip)")
    p.add_argument("--channel-finetune-steps", type=int, default=400,
                   help="masked fine-tune steps per channel variant (removing whole channels needs more)")
    p.add_argument("--channel-finetune-lr", type=float, default=0.06, help="peak learning rate of that fine-tune")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    for keep in [*args.keeps, *args.channel_keeps]:
        try:
            check_keep(keep)
        except ValueError as exc:
            p.error(str(exc))
    if 1.0 not in args.keeps:
        args.keeps = [1.0, *args.keeps]
    args.keeps = sorted(set(args.keeps), reverse=True)
    args.channel_keeps = sorted({k for k in args.channel_keeps if k < 1.0}, reverse=True)
    return args


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """Every TrainConfig field that has a flag of the same name (``--gate-lr`` → gate_lr)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**given, bf16=not args.no_bf16)


def _variant_name(criterion: str, keep: float) -> str:
    return "dense" if keep == 1.0 else f"{criterion}-keep{keep:.2f}"


def _calibration_images(splits: dict, seed: int, count: int) -> torch.Tensor:
    # A seeded random sample: the training split is stored class by class, and BN statistics of
    # one class would mis-normalise the other nine.
    pick = torch.randperm(len(splits["train_y"]), generator=torch.Generator().manual_seed(seed))
    return splits["train_x"][pick[:count]]


def _evaluate(model: GatedNet, splits: dict, cfg: TrainConfig) -> dict:
    return {"val_acc": accuracy(model, splits["val_x"], splits["val_y"], bf16=cfg.bf16),
            "test_acc": accuracy(model, splits["test_x"], splits["test_y"], bf16=cfg.bf16),
            **count_parameters(model)}


def _variant_file(criterion: str, keep: float, finetuned: bool) -> str:
    return f"{_variant_name(criterion, keep)}{'-ft' if finetuned else ''}.safetensors"


def run_seed(args: argparse.Namespace, seed: int, splits: dict, cfg: TrainConfig, net_cfg: NetConfig) -> dict:
    """Train one seed and sweep every criterion × keep; cached in work_dir/seed-N/results.json."""
    seed_dir = Path(args.work_dir) / f"seed-{seed}"
    results_file = seed_dir / "results.json"
    if results_file.exists():
        print(f"seed {seed}: results found in {results_file}, skipping", flush=True)
        return json.loads(results_file.read_text())

    torch.manual_seed(seed)
    model = GatedNet(net_cfg)
    bar = tqdm(total=cfg.epochs, desc=f"seed {seed} train", unit="epoch", file=sys.stdout)

    def progress(epoch: int, entry: dict) -> None:
        bar.update(epoch - bar.n)  # resumed runs jump straight to their epoch
        bar.set_postfix(loss=f"{entry['loss']:.3f}")

    history = train(model, splits["train_x"], splits["train_y"], cfg, seed, seed_dir / "train", progress=progress)
    bar.close()
    _, dense_sha = checkpoint.save_dense(model, seed_dir / "dense.safetensors")
    # Variants that are not fine-tuned are stored as masks over this checkpoint (see checkpoint.py).
    base = ("../dense.safetensors", dense_sha, checkpoint.folded_weights(model))
    dense_state = copy.deepcopy(model.state_dict())
    calib = _calibration_images(splits, seed, args.calib_images)
    release = seed == args.release_seed

    rows: list[dict] = []
    sweep_began = time.perf_counter()
    jobs = [(c, k) for c in args.criteria for k in args.keeps if not (k == 1.0 and c != args.criteria[0])]
    for criterion, keep in tqdm(jobs, desc=f"seed {seed} sweep", unit="variant", file=sys.stdout):
        model.load_state_dict(dense_state)
        if keep < 1.0:
            prune(model, criterion, keep, args.scope, args.floor, seed)
        else:
            model.set_masks(None)
        stages = [False]
        if keep < 1.0 and args.finetune_steps > 0 and criterion in args.finetune_criteria \
                and keep <= args.finetune_max_keep:
            stages.append(True)
        for finetuned in stages:
            if finetuned:
                finetune(model, splits["train_x"], splits["train_y"], args.finetune_steps, cfg, seed)
            recalibrate_bn(model, calib, bf16=cfg.bf16)
            rows.append({"criterion": criterion if keep < 1.0 else "dense", "keep": keep, "finetuned": finetuned,
                         **_evaluate(model, splits, cfg)})
            if release and (criterion == args.ship_criterion or keep == 1.0):
                # The release seed's candidates for shipping, written as they come; export picks.
                checkpoint.save_pruned(model, seed_dir / "variants" / _variant_file(args.ship_criterion, keep,
                                                                                    finetuned), base)
    result = {"seed": seed, "history": history, "rows": rows, "sweep_seconds": time.perf_counter() - sweep_began}
    seed_dir.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(result, indent=1))
    return result


def run_channel_seed(args: argparse.Namespace, seed: int, splits: dict, cfg: TrainConfig) -> list[dict]:
    """Channel-granularity variants of one trained seed: top-K channels per layer, masked fine-tune,
    BN recalibration. Each keep is cached in work_dir/seed-N/channel/ as it completes."""
    seed_dir = Path(args.work_dir) / f"seed-{seed}"
    out_dir = seed_dir / "channel"
    calib = _calibration_images(splits, seed, args.calib_images)
    rows = []
    for keep in tqdm(args.channel_keeps, desc=f"seed {seed} channels", unit="variant", file=sys.stdout):
        done = out_dir / f"keep{keep:.2f}.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        model = checkpoint.load_model(seed_dir / "dense.safetensors")  # the trained gated model
        prune_channels(model, keep)
        began = time.perf_counter()
        finetune(model, splits["train_x"], splits["train_y"], args.channel_finetune_steps, cfg, seed,
                 lr=args.channel_finetune_lr)
        recalibrate_bn(model, calib, bf16=cfg.bf16)
        row = {"criterion": "channel", "keep": keep, "finetuned": True, **_evaluate(model, splits, cfg),
               "finetune_seconds": round(time.perf_counter() - began, 1)}
        if seed == args.release_seed:
            checkpoint.save_pruned(model, out_dir / _variant_file("channel", keep, True))
        out_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(row))
        rows.append(row)
    return rows


def _sparsity(row: dict) -> float:
    """Share of prunable weights that are zero (1 − keep for weight variants; measured for channels)."""
    nonzero_prunable = row["nonzero"] - (row["total"] - row["prunable"])
    return round(1 - nonzero_prunable / row["prunable"], 4)


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
        table.append({
            "criterion": criterion, "granularity": "channel" if criterion == "channel" else "weight",
            "keep": keep, "sparsity": _sparsity(rows[0]), "finetuned": finetuned,
            "test_acc_per_seed": test, "test_acc_mean": statistics.fmean(test),
            "test_acc_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "val_acc_mean": statistics.fmean(val) if all(v == v for v in val) else None,
            "drop": dense_mean - statistics.fmean(test),
            "total": rows[0]["total"], "prunable": rows[0]["prunable"], "nonzero": rows[0]["nonzero"],
        })
    table.sort(key=lambda r: (r["criterion"] != "dense", r["criterion"], -r["keep"], r["finetuned"]))
    return table


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
           std: list[float], cfg: TrainConfig, net_cfg: NetConfig, results: list[dict]) -> dict:
    out = Path(args.out)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    release_dir = Path(args.work_dir) / f"seed-{args.release_seed}"
    dense_data = (release_dir / "dense.safetensors").read_bytes()
    (out / "dense.safetensors").write_bytes(dense_data)
    variants = []
    shipped = (args.ship_criterion, "dense")
    for keep in args.keeps:
        stats = {r["finetuned"]: r for r in table if r["keep"] == keep and r["criterion"] in shipped}
        finetuned = _ship_finetuned(stats, args.ship_finetune_min_gain)
        best = stats[finetuned]
        source = release_dir / "variants" / _variant_file(args.ship_criterion, keep, finetuned)
        data = source.read_bytes()
        (out / "variants" / source.name).write_bytes(data)
        variants.append({
            "name": _variant_name(args.ship_criterion, keep), "criterion": best["criterion"],
            "keep": keep, "sparsity": round(1 - keep, 4), "granularity": "weight",
            "file": f"variants/{source.name}", "bytes": len(data), "sha256": checkpoint.sha256_bytes(data),
            "params": {"total": best["total"], "prunable": best["prunable"], "nonzero": best["nonzero"]},
            "finetuned": finetuned, "test_acc_per_seed": best["test_acc_per_seed"],
            "test_acc_mean": best["test_acc_mean"], "test_acc_std": best["test_acc_std"], "drop": best["drop"],
            "val_acc_mean": best["val_acc_mean"],
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
            "val_acc_mean": best["val_acc_mean"], "base": None,
        })
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "classes": dataset_info["classes"],
        "normalization": {"mean": mean, "std": std},
        "input_size": [3, 32, 32],
        "architecture": net_cfg.to_dict(),
        "training": {**cfg.to_dict(), "seeds": list(range(args.seeds)), "release_seed": args.release_seed,
                     "val_size": args.val_size, "train_limit": args.train_limit, "scope": args.scope,
                     "floor": args.floor, "calib_images": args.calib_images, "finetune_steps": args.finetune_steps,
                     "finetune_criteria": args.finetune_criteria, "finetune_max_keep": args.finetune_max_keep,
                     "ship_criterion": args.ship_criterion, "ship_finetune_min_gain": args.ship_finetune_min_gain,
                     "channel_keeps": args.channel_keeps, "channel_finetune_steps": args.channel_finetune_steps,
                     "channel_finetune_lr": args.channel_finetune_lr},
        "timing": {  # measured when each seed ran (sweep time was not recorded by older runs: null)
            "train_seconds_per_seed": [round(sum(h["seconds"] for h in r["history"]), 1) for r in results],
            "sweep_seconds_per_seed": [round(r["sweep_seconds"], 1) if "sweep_seconds" in r else None
                                       for r in results],
        },
        "eval_precision": "bf16" if cfg.bf16 else "fp32",
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
    if args.threads:
        torch.set_num_threads(args.threads)
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
    cfg = _train_config(args)
    if len(splits["train_y"]) < cfg.batch_size:
        cfg.batch_size = max(1, len(splits["train_y"]))  # tiny data sets (smoke tests)
    results = [run_seed(args, seed, splits, cfg, net_cfg) for seed in range(args.seeds)]
    for seed in range(args.seeds):  # structured variants reuse each seed's trained model
        channel_rows = run_channel_seed(args, seed, splits, cfg)
        results[seed] = {**results[seed], "rows": results[seed]["rows"] + channel_rows}
    table = aggregate(results)
    manifest = export(args, table, data.describe(), mean, std, cfg, net_cfg, results)
    dense = manifest["variants"][0]
    print(f"exported {len(manifest['variants'])} variants to {args.out}: dense test accuracy "
          f"{dense['test_acc_mean']:.2f} ± {dense['test_acc_std']:.2f} % over {args.seeds} seed(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Trade-off tables (results.csv, results.md) and plot (tradeoff.png) from the aggregated sweep."""

from __future__ import annotations

import csv
from pathlib import Path

from core.manifest import VariantEntry
from core.model import TTA_LEVELS, TTA_VIEWS
from core.plot import plot_tradeoff  # noqa: F401 - the export draws models/tradeoff.png with it

COLUMNS = ("criterion", "keep", "sparsity", "finetuned", "test_acc_mean", "test_acc_std", "drop",
           "val_acc_mean", "total", "prunable", "nonzero", "test_acc_per_seed",
           *(f"test_acc_tta{level}_mean" for level in TTA_LEVELS))  # empty where a run did not record the level


def write_tables(table: list[dict], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({**row, "test_acc_per_seed": " ".join(f"{a:.2f}" for a in row["test_acc_per_seed"])})
    lines = ["| criterion | keep | sparsity | fine-tuned | test acc % (mean ± std) | drop vs dense | nonzero params |",
             "|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['criterion']} | {row['keep']:.2f} | {row['sparsity'] * 100:.0f}% | "
                     f"{'yes' if row['finetuned'] else 'no'} | "
                     f"{row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} | "
                     f"{row['drop']:+.2f} | {row['nonzero']:,} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _cell(row: dict | None, prefix: str = "") -> str:
    """Test accuracy mean ± std (``prefix`` "first_": a soup's first fine-tune)."""
    return f"{row[prefix + 'test_acc_mean']:.2f} ± {row[prefix + 'test_acc_std']:.2f}" if row else "–"


def _val_cell(row: dict | None) -> str:
    return f"{row['val_acc_mean']:.2f}" if row and row.get("val_acc_mean") is not None else "–"


def _one_fine_tune_cell(row: dict | None) -> str:
    """A soup's first ingredient alone (one fine-tune, the budget every unsouped column had), else the row."""
    return _cell(row, "first_" if row and "soup" in row else "")


def _one_fine_tune_val_cell(row: dict | None) -> str:
    return f"{row['first_val_acc_mean']:.2f}" if row and "soup" in row else _val_cell(row)


def _sweep_sections(table: list[dict], heading: str) -> list[str]:
    """The criteria side by side (test, and validation for the phase-2 methods), the channel variants, dense."""
    if not table:
        return []
    by = {(r["criterion"], r["keep"], r["finetuned"]): r for r in table}
    lines: list[str] = []
    criteria = [c for c in ("gate", "gate_magnitude", "lamp", "magnitude", "random") if (c, 0.5, False) in by
                or any(k[0] == c and not k[2] for k in by)]
    tuned = [c for c in ("gate_magnitude", "magnitude_gradual", "magnitude") if any(k[0] == c and k[2] for k in by)]
    names = {"gate_magnitude": "gated gradual (learned gates)", "magnitude_gradual": "gradual, gates frozen",
             "magnitude": "one-shot + fine-tune"}
    # Methods whose fine-tunes were souped (--soup): their own columns, the equal-budget ones show one fine-tune.
    souped = {c: by[k]["soup"] for c in tuned for k in by if k[0] == c and k[2] and "soup" in by[k]}
    soup_names = [f"{names[c]}, soup of {n}" for c, n in souped.items()]
    budget = "budget for each" + (" (a soup's first fine-tune alone; the soup averages that many such fine-tunes "
                                  "of the same mask)" if souped else "")
    lines += ["", f"{heading} Criteria on the same trained models (test acc %, mean ± std over seeds)", "",
              f"One-shot columns: pruned at once, no fine-tune. Phase-2 columns: the same distilled fine-tune "
              f"{budget}.", "",
              "| keep | " + " | ".join(f"{c} (one-shot)" for c in criteria) + " | "
              + " | ".join([names[c] for c in tuned] + soup_names) + " |",
              "|---" * (1 + len(criteria) + len(tuned) + len(souped)) + "|"]
    for keep in sorted({r["keep"] for r in table if r["keep"] < 1.0 and r["criterion"] in criteria}, reverse=True):
        cells = ([_cell(by.get((c, keep, False))) for c in criteria]
                 + [_one_fine_tune_cell(by.get((c, keep, True))) for c in tuned]
                 + [_cell(by.get((c, keep, True))) for c in souped])
        lines.append(f"| {keep:g} | " + " | ".join(cells) + " |")
    tuned_keeps = sorted({k[1] for k in by if k[0] in tuned and k[2]}, reverse=True)
    if tuned_keeps:  # what the choices were made on
        lines += ["", "The phase-2 columns on **validation** (mean over seeds, no TTA, `val_acc_mean`):", "",
                  "| keep | " + " | ".join([names[c] for c in tuned] + soup_names) + " |",
                  "|---" * (1 + len(tuned) + len(souped)) + "|"]
        lines += [f"| {keep:g} | " + " | ".join([_one_fine_tune_val_cell(by.get((c, keep, True))) for c in tuned]
                                                + [_val_cell(by.get((c, keep, True))) for c in souped]) + " |"
                  for keep in tuned_keeps]
    channel = sorted((r for r in table if r["criterion"] == "channel"), key=lambda r: -r["keep"])
    if channel:
        soup = next((r["soup"] for r in channel if "soup" in r), None)  # souped: one fine-tune beside the soup
        first = soup is not None
        shaped = all("widths" in r for r in channel)  # older runs recorded no widths: keep × every conv
        share = ("every conv keeps keep × its stage's scale of its channels, widths stem first" if shaped
                 else "every conv keeps this share of its channels")
        lines += ["", f"{heading} Channel granularity ({share}; masked "
                      "fine-tune" + (f", soup of {soup}" if first else "") + ")", "",
                  "| channels kept |" + (" widths |" if shaped else "")
                  + " weight sparsity | nonzero params | test acc % | drop |"
                  + (" one fine-tune (the soup's first) |" if first else ""),
                  "|---|---|---|---|---|" + ("---|" if shaped else "") + ("---|" if first else "")]
        lines += [f"| {r['keep']:g} |" + (f" {'/'.join(map(str, r['widths']))} |" if shaped else "")
                  + f" {r['sparsity'] * 100:.1f}% | {r['nonzero']:,} | {_cell(r)} | {r['drop']:+.2f} |"
                  + (f" {_one_fine_tune_cell(r)} |" if first else "") for r in channel]
    dense = by.get(("dense", 1.0, False))
    if dense:
        lines += ["", f"Dense: {_cell(dense)} % over {len(dense['test_acc_per_seed'])} seeds "
                      f"({', '.join(f'{a:.2f}' for a in dense['test_acc_per_seed'])}).", ""]
    return lines


def write_summary(manifest: dict, out: Path) -> str:
    """summary.md: the shipped variants, the criteria side by side, and the goals, all from the manifest."""
    text = summary_markdown(manifest)
    (out / "summary.md").write_text(text)
    return text


def summary_markdown(manifest: dict, heading: str = "###") -> str:
    """The shipped variants, the criteria side by side (test, and validation for the phase-2 methods),
    the channel variants and the goals, all from the manifest: models/summary.md, and docs/training.md's
    results through `prune-bench readme`."""
    lines = [f"{heading} Shipped variants (release seed's checkpoints; test accuracy = mean ± std over seeds)", "",
             "| variant | granularity | keep | sparsity | nonzero / total params | checkpoint bytes | fine-tuned "
             f"| test acc % (TTA {manifest.get('tta', 0)}, served) | drop "
             f"| test acc % at {' / '.join(map(str, TTA_VIEWS))} views |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in manifest["variants"]:
        # what a request choosing fewer views gets (?tta=), read as the service reads it
        recorded = VariantEntry.model_validate(v).test_acc_by_tta() | {manifest.get("tta", 0): v["test_acc_mean"]}
        levels = " / ".join(f"{recorded[level]:.2f}" if level in recorded else "–" for level in TTA_LEVELS)
        lines.append(f"| {v['name']} | {v.get('granularity', 'weight')} | {v['keep']:g} | {v['sparsity'] * 100:.0f}% | "
                     f"{v['params']['nonzero']:,} / {v['params']['total']:,} | {v['bytes']:,}"
                     f"{' (mask over dense.safetensors)' if v.get('base') else ''} | "
                     f"{'yes' if v['finetuned'] else 'no'} | {v['test_acc_mean']:.2f} ± {v['test_acc_std']:.2f} | "
                     f"{v['drop']:+.2f} | {levels} |")
    lines += _sweep_sections(manifest.get("sweep") or [], heading)  # none in a models/ assembled by hand
    # Goals are judged on the variants the service ships, unrounded (not on the best of all criteria).
    shipped = {v["keep"]: v for v in manifest["variants"] if v.get("granularity", "weight") == "weight"}
    for keep, goal in ((0.3, 0.2), (0.1, 0.4), (0.05, 1.0)):
        variant = shipped.get(keep)
        if variant:
            verdict = "met" if variant["drop"] <= goal else f"missed by {variant['drop'] - goal:.3f}"
            lines.append(f"- keep {keep:g}: shipped {variant['name']} drops {variant['drop']:.3f} points; "
                         f"goal ≤ {goal} → {verdict}")
    return "\n".join(lines) + "\n"

"""The trade-off plot, drawn by training's export (models/tradeoff.png) and by the service
(GET /variants/plot, with the latency measured where it runs). matplotlib is imported when a plot is
drawn, so the rest of core does not need it."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO


def plot_tradeoff(table: list[dict], path: Path | BinaryIO, latency_ms: list[dict] | None = None,
                  choices: list[dict] | None = None) -> None:
    """Accuracy vs sparsity, one line per criterion (solid: pruned only, dashed: + fine-tune).

    Left: the whole range (baselines collapse); right: zoom on the top few points, where the useful
    variants differ. ``latency_ms`` (rows of granularity, sparsity, ms), when given, adds every variant's
    measured latency on the right panel, one line per granularity. ``choices`` (rows of granularity, tta,
    views, accuracy, images_per_s, pareto: every variant at every test-time augmentation level with
    figures), when given, adds a third panel: accuracy vs measured throughput, the Pareto front joined.
    """
    # The object API, not pyplot: no global figure state, so the service may render in any thread.
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    dense = next(r for r in table if r["criterion"] == "dense")
    fig = Figure(figsize=(18 if choices else 12, 5), dpi=110)
    full, zoom, *speed = fig.subplots(1, 3 if choices else 2)
    criteria = sorted({r["criterion"] for r in table} - {"dense"})
    colors = dict(zip(criteria, rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(criteria, "osD^v<>"))
    for ax in (full, zoom):
        for criterion in criteria:
            for finetuned in (False, True):
                rows = sorted((r for r in table if r["criterion"] == criterion and r["finetuned"] == finetuned),
                              key=lambda r: r["sparsity"])
                if not rows:
                    continue
                ax.errorbar([r["sparsity"] * 100 for r in rows], [r["test_acc_mean"] for r in rows],
                            yerr=[r["test_acc_std"] for r in rows], color=colors[criterion],
                            linestyle="--" if finetuned else "-", marker=markers[criterion], markersize=4,
                            markerfacecolor="none" if finetuned else colors[criterion], capsize=2,
                            label=f"{criterion}{' + fine-tune' if finetuned else ''}"
                                  + (f" (soup of {rows[0]['soup']})" if "soup" in rows[0] else ""))
        ax.axhline(dense["test_acc_mean"], color="black", linewidth=0.8, linestyle=":",
                   label=f"dense {dense['test_acc_mean']:.2f}%")
        ax.set_xlabel("sparsity (% of prunable weights removed)")
        ax.grid(alpha=0.3)
    full.set_ylabel("CIFAR-10 test accuracy (%), mean ± std over seeds")
    full.set_title("all criteria")
    full.legend(loc="lower left", fontsize=7)
    zoom.set_ylim(dense["test_acc_mean"] - 6, dense["test_acc_mean"] + 1)
    zoom.set_title("zoom: within 6 points of dense")
    if latency_ms:
        twin = zoom.twinx()
        for granularity, marker in (("weight", "s"), ("channel", "^")):
            rows = sorted((r for r in latency_ms if r["granularity"] == granularity), key=lambda r: r["sparsity"])
            if rows:
                twin.plot([r["sparsity"] * 100 for r in rows], [r["ms"] for r in rows], color="grey", marker=marker,
                          markersize=4, linewidth=1, linestyle="-" if granularity == "weight" else "--",
                          label=f"latency, {granularity} variants, 1 image (ms, measured here)")
        twin.set_ylabel("latency of one image, test-time augmentation included (ms)")
        twin.set_ylim(bottom=0)
        twin.legend(loc="lower right", fontsize=7)
    if choices:
        _plot_choices(speed[0], choices, dense["test_acc_mean"])
    fig.suptitle("Gated CNN on CIFAR-10: accuracy vs sparsity (global top-K weights; channel: top-K channels per conv)")
    fig.tight_layout()
    fig.savefig(path)


def _plot_choices(ax, choices: list[dict], dense_acc: float) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Every (variant, TTA level) with figures: accuracy vs measured batch-64 throughput; the Pareto
    front (what keep=auto chooses among) joined by a line."""
    colors = {1: "tab:red", 2: "tab:orange", 6: "tab:blue"}
    for granularity, marker in (("weight", "s"), ("channel", "^")):
        for views, color in colors.items():
            rows = [c for c in choices if c["granularity"] == granularity and c["views"] == views]
            if rows:
                ax.scatter([c["images_per_s"] for c in rows], [c["accuracy"] for c in rows], color=color,
                           marker=marker, s=18, label=f"{granularity}, {views} view{'s' if views > 1 else ''}")
    front = sorted((c for c in choices if c["pareto"]), key=lambda c: c["images_per_s"])
    ax.plot([c["images_per_s"] for c in front], [c["accuracy"] for c in front], color="black", linewidth=0.8,
            label="Pareto front (keep=auto)")
    ax.axhline(dense_acc, color="black", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("images/s at batch 64, measured here (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(dense_acc - 6, dense_acc + 1)
    ax.set_title("speed: every variant at every test-time augmentation level")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=7)

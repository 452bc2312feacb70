"""The trade-off plot, drawn by training's export (models/tradeoff.png) and by the service
(GET /variants/plot, with the latency measured where it runs). matplotlib is imported when a plot is
drawn, so the rest of core does not need it."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO


def plot_tradeoff(table: list[dict], path: Path | BinaryIO, latency_ms: list[dict] | None = None) -> None:
    """Accuracy vs sparsity, one line per criterion (solid: pruned only, dashed: + fine-tune).

    Left: the whole range (baselines collapse); right: zoom on the top few points, where the useful
    variants differ. ``latency_ms`` (rows of granularity, sparsity, ms), when given, adds every variant's
    measured latency on the right panel, one line per granularity.
    """
    # The object API, not pyplot: no global figure state, so the service may render in any thread.
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    dense = next(r for r in table if r["criterion"] == "dense")
    fig = Figure(figsize=(12, 5), dpi=110)
    full, zoom = fig.subplots(1, 2)
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
                            label=f"{criterion}{' + fine-tune' if finetuned else ''}")
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
    fig.suptitle("Gated CNN on CIFAR-10: accuracy vs sparsity (global top-K weights; channel: top-K channels per conv)")
    fig.tight_layout()
    fig.savefig(path)

"""PNG figures for the people who would rather look than read (DVC renders the CSVs too)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to files only
import matplotlib.pyplot as plt  # noqa: E402

from clso.io import write_bytes_atomic  # noqa: E402


def evolution_png(history: list[dict], path: str | Path, title: str, uniform_loss: float | None = None) -> None:
    """Best and mean (± std) loss of the truly evaluated genomes, per generation, against the loss
    of guessing uniformly over the vocabulary."""
    gens = [r["generation"] for r in history]
    best = [r["best_loss"] for r in history]
    mean = [r["mean_loss"] for r in history]
    std = [r["std_loss"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.fill_between(gens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    alpha=0.2, label="mean ± std (truly evaluated)")
    ax.plot(gens, mean, lw=1)
    ax.plot(gens, best, lw=2, label="best so far")
    if uniform_loss is not None:
        ax.axhline(uniform_loss, color="grey", ls="--", lw=1, label="uniform guess, ln V")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same run, same bytes
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def frontier_png(baseline_curve: list[dict], runs: list[dict], curves: dict[str, list[dict]], x_key: str,
                 x_label: str, path: str | Path, title: str) -> None:
    """Val loss of the baseline against cost, with every variant's search curve (its best fitness
    loss, on the train batch) and its final val loss as a marker of the same colour."""
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    ax.plot([r[x_key] for r in baseline_curve], [r["val_loss"] for r in baseline_curve], color="black", marker=".",
            label="AdamW baseline: val loss")
    styles = {"pure": "--", "hybrid": "-"}
    for i, run in enumerate(runs):
        colour, curve = f"C{i % 10}", curves[run["variant"]]
        ax.plot([r[x_key] for r in curve], [r["best_loss"] for r in curve], color=colour, lw=1,
                ls=styles.get(run["mode"], "-"), label=f"{run['variant']} ({run['label']})")
        ax.scatter([run[x_key]], [run["val_loss"]], color=colour, zorder=3, edgecolor="black")
    bounds = [r["frozen_head_bound_val_loss"] for r in runs if "frozen_head_bound_val_loss" in r]
    if bounds:
        ax.axhline(max(bounds), color="grey", ls=":", lw=1, label="pure mode: no body gets below (frozen head)")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title + "\nlines: best fitness (train batch); dots: final val loss", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())

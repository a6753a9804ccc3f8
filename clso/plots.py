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


def comparison_png(baseline_curve: list[dict], clso_curve: list[dict], clso_point: dict, x_key: str,
                   x_label: str, path: str | Path, title: str) -> None:
    """Val loss of the baseline against cost, with CLSO's search curve and its final val loss."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r[x_key] for r in baseline_curve], [r["val_loss"] for r in baseline_curve], marker=".",
            label="AdamW baseline: val loss")
    ax.plot([r[x_key] for r in clso_curve], [r["best_loss"] for r in clso_curve], ls="--",
            label="CLSO: best fitness loss (train batch)")
    ax.scatter([clso_point[x_key]], [clso_point["val_loss"]], color="C3", zorder=3, label="CLSO: final val loss")
    if "frozen_head_bound_val_loss" in clso_point:
        ax.axhline(clso_point["frozen_head_bound_val_loss"], color="C3", ls=":", lw=1,
                   label="CLSO pure: no body gets below (frozen head)")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())

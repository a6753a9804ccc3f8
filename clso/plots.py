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

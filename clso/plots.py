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


LINE_STYLES = ("-", "--", ":", "-.")  # a stage's seeds, in the order they come


def frontier_png(rows: list[dict], x_key: str, x_label: str, path: str | Path, title: str,
                 bound_loss: float | None = None) -> None:
    """One mode's frontier (clso.compare.frontier rows): each contestant's curve against cost and its
    final val loss as a dot of the same colour; the baseline black, each other stage one colour, its
    seeds told apart by line style."""
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    names = list(dict.fromkeys(r["contestant"] for r in rows))
    stages = list(dict.fromkeys(name.split("@")[0] for name in names if name != "baseline"))
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    colours = {"baseline": "black", **{stage: palette[i % len(palette)] for i, stage in enumerate(stages)}}
    seen: dict[str, int] = {}
    for name in names:
        mine = [r for r in rows if r["contestant"] == name]
        curve, final = [r for r in mine if r["point"] != "final val"], [r for r in mine if r["point"] == "final val"]
        stage = name.split("@")[0]
        seen[stage] = seen.get(stage, -1) + 1
        style = LINE_STYLES[seen[stage] % len(LINE_STYLES)]
        colour = colours[stage]
        ax.plot([r[x_key] for r in curve], [r["loss"] for r in curve], color=colour, lw=1.2, ls=style, marker=".",
                markersize=3, label=f"{name}: {curve[0]['point']}")
        ax.scatter([r[x_key] for r in final], [r["loss"] for r in final], color=colour, zorder=3, edgecolor="black")
    if bound_loss is not None:
        ax.axhline(bound_loss, color="grey", ls=":", lw=1, label="no body gets below (frozen head)")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title + "\ndots: final val loss", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def neurons_png(fields, path: str | Path, title: str) -> None:
    """Each field's neuron positions projected on their first two principal components, coloured by
    the step each neuron was born at (the journal's picture of its crystal)."""
    import torch

    fig, axes = plt.subplots(1, len(fields), figsize=(6.5 * len(fields), 5), dpi=120, squeeze=False)
    for layer, (ax, field) in enumerate(zip(axes[0], fields)):
        n = field.alive
        if n < 2:  # no plane to project on
            ax.set_title(f"field of block {layer}: {n} neurons", fontsize=9)
            continue
        positions = field.positions[:n].detach().double().cpu()
        born = field.birth_step[:n].cpu().numpy()
        centred = positions - positions.mean(0)
        _, s, vt = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ vt[:2].t()).numpy()
        explained = (s[:2] ** 2 / (s ** 2).sum()).numpy()
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=born, cmap="viridis", s=10)
        fig.colorbar(dots, ax=ax, label="birth step")
        ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({explained[1]:.0%})")
        ax.set_title(f"field of block {layer}: {n} neurons", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())

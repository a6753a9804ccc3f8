"""Which of CLSO's runs the verdict names, and compile builds: its best mode by mean val loss over
seeds, at the first seed."""

import statistics


def best_mode(runs: list[dict]) -> str:
    """CLSO's mode with the lowest mean val loss over seeds (`runs`: CLSO's, each with mode and val_loss)."""
    modes = dict.fromkeys(r["mode"] for r in runs)
    return min(modes, key=lambda m: statistics.fmean(r["val_loss"] for r in runs if r["mode"] == m))


def headline_row(rows: list[dict], first_seed: int) -> dict:
    """The headline run: CLSO's best mode at the first seed — not the luckiest seed, which would be
    picked and judged on the same val split."""
    clso = [r for r in rows if r["kind"] == "clso"]
    mode = best_mode(clso)
    return next(r for r in clso if r["mode"] == mode and r["seed"] == first_seed)

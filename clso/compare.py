"""The matched comparison of CLSO against the dense AdamW baseline, and the verdict on the
hypothesis of document 003. Pure functions of the stages' metrics and curves."""

from __future__ import annotations

import math

HYPOTHESIS = "CLSO within 5% of the baseline's perplexity at <= 50% of its energy"
PPL_TOLERANCE = 0.05
ENERGY_SHARE = 0.5


def value_at(xs: list[float], ys: list[float], x: float) -> tuple[float, str]:
    """y at x on a piecewise-linear curve of increasing xs; past its end, the last y."""
    if x <= xs[0]:
        return ys[0], "at the start of the baseline's run"
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return (y0 if x1 == x0 else y0 + (x - x0) * (y1 - y0) / (x1 - x0)), "interpolated"
    return ys[-1], "beyond the baseline's run (its last point)"


def first_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x where the curve comes down to `target` (linear between points), or None."""
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return xs[0]
            x0, y0, x1 = xs[i - 1], ys[i - 1], xs[i]
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y)
    return None


def verdict(clso_ppl: float, clso_energy: float, baseline_ppl: float, baseline_energy: float) -> dict:
    ppl_ratio = clso_ppl / baseline_ppl
    energy_ratio = clso_energy / baseline_energy
    close = ppl_ratio <= 1 + PPL_TOLERANCE
    cheap = energy_ratio <= ENERGY_SHARE
    holds = close and cheap
    statement = (f"{'HOLDS' if holds else 'DOES NOT HOLD'}: CLSO's val perplexity is {ppl_ratio:.3f}× the "
                 f"baseline's ({'within' if close else 'outside'} 5%) at {energy_ratio:.3f}× its energy "
                 f"({'at most' if cheap else 'more than'} 50%)")
    return {"hypothesis": HYPOTHESIS, "holds": holds, "ppl_within_5pct": close, "energy_at_most_half": cheap,
            "ppl_ratio": round(ppl_ratio, 4), "energy_ratio": round(energy_ratio, 4), "statement": statement}


def matched(clso: dict, baseline: dict, curve: list[dict]) -> dict:
    """The baseline's val perplexity at CLSO's energy and FLOPs, and what it needed to reach CLSO's."""
    energy = [r["energy_wh"] for r in curve]
    flops = [r["flops"] for r in curve]
    loss = [r["val_loss"] for r in curve]
    at_energy, energy_status = value_at(energy, loss, clso["energy_wh"])
    at_flops, flops_status = value_at(flops, loss, clso["flops"])
    reach_energy = first_reach(energy, loss, clso["val_loss"])
    reach_flops = first_reach(flops, loss, clso["val_loss"])
    reach_step = first_reach([r["step"] for r in curve], loss, clso["val_loss"])
    return {
        "baseline_val_ppl_at_clso_energy": math.exp(at_energy), "at_clso_energy": energy_status,
        "baseline_val_ppl_at_clso_flops": math.exp(at_flops), "at_clso_flops": flops_status,
        "baseline_reached_clso_val_ppl": reach_energy is not None,
        "baseline_energy_wh_to_reach_clso": reach_energy, "baseline_flops_to_reach_clso": reach_flops,
        "baseline_step_to_reach_clso": None if reach_step is None else round(reach_step, 1),
    }


def comparison(clso: dict, baseline: dict, curve: list[dict]) -> dict:
    """metrics/compare.json: clso.*, baseline.*, ratio.*, matched.*, verdict.*"""
    return {
        "clso": clso, "baseline": baseline,
        "ratio": {key: round(clso[key] / baseline[key], 4) for key in ("energy_wh", "flops", "val_ppl", "test_ppl")},
        "matched": matched(clso, baseline, curve),
        "verdict": verdict(clso["val_ppl"], clso["energy_wh"], baseline["val_ppl"], baseline["energy_wh"]),
    }

"""The matched comparison of CLSO against the dense AdamW baseline, and the verdict on the
hypothesis of document 003: arithmetic on the contestants' records, numbers only (clso.report
writes the words)."""

from __future__ import annotations

import math
import statistics

from clso import ClsoError
from clso.record import Record

PPL_TOLERANCE = 0.05
ENERGY_SHARE = 0.5
ADDITIVE = ("energy_wh", "flops", "wall_s", "true_evaluations")  # what the parts of a charge add up
CLSO_STAGE = "evolve"
# (name, a stage, the stage it is paired with by mode and seed): CLSO's controls, then the arena's. The
# arena's `es` is read where it had spent CLSO's charged FLOPs (AT_CLSO_FLOPS); every other side at its end,
# on its budget (random search and ngopt: CLSO's true evaluations; the GA without surrogate: its search
# FLOPs; the fixed body and head_only: its generations; es and mezo: one FLOP budget, the same rule).
CONTRASTS = (("ga_vs_random", "random", CLSO_STAGE), ("surrogate_vs_none", "no_surrogate", CLSO_STAGE),
             ("search_vs_fixed_body", "fixed_body", CLSO_STAGE), ("ga_vs_ngopt", "ngopt", CLSO_STAGE),
             ("ga_vs_es", "es", CLSO_STAGE), ("es_vs_mezo", "mezo", "es"), ("body_backward", "head_only", "fixed_body"))
AT_CLSO_FLOPS = ("es",)
ONE_RUN = ("baseline", "field", "field_no_neurons")  # trained once by `dvc repro`; stage `spread` measures their noise
REMEASURE = "python -m stages.spread && dvc commit -f spread"  # stage spread is frozen: `dvc repro` never runs it


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


def energy_criterion(energy_ratio: float, flops_ratio: float, method: str) -> str:
    """`met` or `not_met` on energy; on an `estimate` (CPU seconds × watts, which moves with the machine's
    load), decided only where the energy and FLOPs ratios agree about the share, else `undetermined`."""
    cheap = energy_ratio <= ENERGY_SHARE
    if "estimate" in method.split("|") and cheap != (flops_ratio <= ENERGY_SHARE):
        return "undetermined"
    return "met" if cheap else "not_met"


def verdict(clso: dict, baseline: dict, bound_ppl: float | None = None) -> dict:
    """The hypothesis on val perplexity and charged energy, from two rows (val_ppl, energy_wh, flops,
    method). `holds` is None when the perplexity criterion is met and the energy criterion undetermined.
    `bound_ppl`, the lowest val perplexity any body reaches with CLSO's frozen head (pure mode), decides
    it alone when it is too high."""
    ppl_ratio = clso["val_ppl"] / baseline["val_ppl"]
    energy_ratio, flops_ratio = clso["energy_wh"] / baseline["energy_wh"], clso["flops"] / baseline["flops"]
    close = ppl_ratio <= 1 + PPL_TOLERANCE
    energy = energy_criterion(energy_ratio, flops_ratio, methods(clso["method"], baseline["method"]))
    holds = False if not close or energy == "not_met" else (None if energy == "undetermined" else True)
    return {"holds": holds, "ppl_within_tolerance": close, "energy_criterion": energy,
            "ppl_ratio": round(ppl_ratio, 4), "energy_ratio": round(energy_ratio, 4), "flops_ratio": round(flops_ratio, 4),
            "decided_by_frozen_head_bound": bound_ppl is not None and bound_ppl / baseline["val_ppl"] > 1 + PPL_TOLERANCE,
            "bound_ppl": bound_ppl, "bound_ppl_ratio": None if bound_ppl is None else round(bound_ppl / baseline["val_ppl"], 4)}


def matched(clso: dict, curve: list[dict]) -> dict:
    """The baseline's val perplexity at CLSO's energy and FLOPs, and what it needed to reach CLSO's
    val loss; `curve` is the baseline's (points of val loss, energy_wh, flops, step)."""
    energy = [r["energy_wh"] for r in curve]
    flops = [r["flops"] for r in curve]
    loss = [r["loss"] for r in curve]
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


def methods(*names: str) -> str:
    """One method label for summed figures: every part's method, once each."""
    return "|".join(sorted({part for m in names for part in m.split("|")}))


def device_parts(cost: dict) -> dict:
    """A cost's CPU and GPU parts, each with its method (a stage gives them apart when a GPU did the
    work); CPU-only work is all CPU."""
    if cost.get("gpu_method"):
        return {k: cost[k] for k in ("cpu_wh", "cpu_method", "gpu_wh", "gpu_method")}
    return {"cpu_wh": cost["energy_wh"], "cpu_method": cost["method"], "gpu_wh": 0.0, "gpu_method": None}


def summed_device_parts(costs) -> dict:
    parts = [device_parts(c) for c in costs]
    gpu_methods = [p["gpu_method"] for p in parts if p["gpu_method"]]
    return {"cpu_wh": sum(p["cpu_wh"] for p in parts), "cpu_method": methods(*(p["cpu_method"] for p in parts)),
            "gpu_wh": sum(p["gpu_wh"] for p in parts), "gpu_method": methods(*gpu_methods) if gpu_methods else None}


def charged(record: Record, shared: dict[str, dict]) -> dict:
    """Everything a contestant is charged: the shared costs its record names (spent before its own
    work: the library, the surrogate's pretraining, …), then its own. `shared` maps each name to a cost."""
    unknown = [name for name in record.charged_with if name not in shared]
    if unknown:
        raise ClsoError(f"{record.name}: its record is charged {unknown[0]!r}, which no stage records (valid: "
                        f"{', '.join(shared)}); re-create it with `dvc repro -f {record.name}`")
    parts = {name: shared[name] for name in record.charged_with} | record.costs
    before = [shared[name] for name in record.charged_with]

    def total(key, costs):
        return sum(c.get(key, 0) for c in costs)

    out = {key: total(key, parts.values()) for key in ADDITIVE}
    if not any("true_evaluations" in c for c in parts.values()):
        del out["true_evaluations"]
    return {**out, "method": methods(*(c["method"] for c in parts.values())),
            "energy_by_device": summed_device_parts(parts.values()),
            # what was spent before its own work began: its curve starts there
            "before": {key: total(key, before) for key in ("energy_wh", "flops", "wall_s")},
            "energy_wh_by_part": {name: c["energy_wh"] for name, c in parts.items()}}


def charged_curve(record: Record, charges: dict) -> list[dict]:
    """The record's curve with what was charged before its own work added to every cost column."""
    before = charges["before"]
    return [{**point, **{key: point[key] + before[key] for key in ("energy_wh", "flops", "wall_s")}}
            for point in record.curve["points"]]


def row(record: Record, charges: dict) -> dict:
    """A contestant as the tables and contrasts see it: its losses and everything it was charged."""
    return {"name": record.name, "stage": record.name.split("@")[0], "kind": record.kind, "label": record.label,
            "mode": record.mode, "seed": record.seed, "val_loss": record.val_loss, "val_ppl": record.val_ppl,
            "test_loss": record.test_loss, "test_ppl": record.test_ppl,
            **{k: v for k, v in charges.items() if k != "before"},
            "adam_phases": record.details.get("adam_phases"),
            "at_clso_flops": record.details.get("at_clso_flops"),
            "frozen_head_bound_val_ppl": record.details.get("frozen_head_bound", {}).get("val_ppl")}


def against_baseline(r: dict, baseline: dict) -> dict:
    """A contestant's ratios to the baseline; the hypothesis only for CLSO's search and its controls."""
    out = {key: round(r[key] / baseline[key], 4) for key in ("val_ppl", "test_ppl", "energy_wh", "flops")}
    if r["kind"] in ("clso", "control"):
        out["holds"] = verdict(r, baseline, r["frozen_head_bound_val_ppl"])["holds"]
    return out


def summed(costs) -> dict:
    """Costs added up: energy (with every method), and wall time when every cost has one."""
    costs = list(costs)
    out = {"energy_wh": sum(c["energy_wh"] for c in costs), "method": methods(*(c["method"] for c in costs)),
           "count": len(costs)}
    return out | ({"wall_s": sum(c["wall_s"] for c in costs)} if all("wall_s" in c for c in costs) else {})


def uncharged(records: list[Record], stage_costs: dict[str, dict]) -> dict[str, dict]:
    """What was metered but charged to no one: every record's own, summed by what it was (final scores,
    checkpoints, the curves' val loss), and the stages' own (`stage_costs`: compile, compare, …)."""
    by_what: dict[str, list[dict]] = {}
    for r in records:
        for what, cost in r.uncharged.items():
            by_what.setdefault(what, []).append(cost)
    return {what: summed(costs) for what, costs in by_what.items()} | stage_costs


# the columns of `dvc exp show` (metrics/compare.json), kept to a few dozen: the rest is in metrics/detail/
SUMMARY = ("val_ppl", "energy_wh")  # a contestant's (its energy's method: energy_method, once for all)
CONTRAST_SUMMARY = ("mean_diff", "conclusion")  # a contrast's


def groups(rows) -> dict[str, list[dict]]:
    """Contestants by group: stage@mode for a search (its seeds together), else each by its name."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["name"] if r["mode"] is None else f"{r['stage']}@{r['mode']}", []).append(r)
    return out


def summary(result: dict) -> dict:
    """metrics/compare.json: the verdict, each contrast's mean difference and conclusion, each contestant's
    val perplexity and charged energy (a search's, the mean over its seeds) and their energies' method."""
    v = result["headline"]["verdict"]
    return {"verdict": {"contestant": result["headline"]["clso"], "holds": v["holds"], "ppl_ratio": v["ppl_ratio"],
                        "energy_ratio": v["energy_ratio"], "flops_ratio": v["flops_ratio"],
                        "energy_criterion": v["energy_criterion"]},
            "contrasts": {name: {mode: {k: c[k] for k in CONTRAST_SUMMARY} for mode, c in modes.items()}
                          for name, modes in result["contrasts"].items()},
            "field": {name: {k: result["field"][name][k] for k in CONTRAST_SUMMARY}
                      for name in ("neurons_add", "against_baseline")},
            "energy_method": methods(*(r["method"] for r in result["contestants"].values())),
            "contestants": {name: {k: statistics.fmean(r[k] for r in runs) for k in SUMMARY}
                            for name, runs in groups(result["contestants"].values()).items()}}


def spread(xs: list[float]) -> float | None:
    """Sample standard deviation; None for a single run (no spread to speak of)."""
    return statistics.stdev(xs) if len(xs) > 1 else None


def seed_summary(runs: list[dict], keys=("val_loss", "val_ppl", "test_ppl", "energy_wh", "flops")) -> dict:
    """Mean and spread over seeds of one stage and mode."""
    out = {"seeds": len(runs)}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_spread"] = spread(values)
    return out


def over_seeds(rows: list[dict]) -> dict:
    """Mean and spread of each stage@mode of the grid, when it ran more than one seed."""
    return {name: seed_summary(runs) for name, runs in groups(r for r in rows if r["mode"] is not None).items()}


def headline(clso: dict, baseline: dict, baseline_curve: list[dict]) -> dict:
    """CLSO's best run against the baseline: the ratios, the matched figures and the verdict."""
    return {"clso": clso["name"], "ratio": {key: round(clso[key] / baseline[key], 4)
                                           for key in ("energy_wh", "flops", "val_ppl", "test_ppl")},
            "matched": matched(clso, baseline_curve),
            "verdict": verdict(clso, baseline, clso["frozen_head_bound_val_ppl"])}


def contrasts(rows: list[dict]) -> dict:
    """Each pair of CONTRASTS, seed by seed in each mode: the control's val loss less the other's
    (positive: the other is ahead), its mean with a 95 % interval over seeds, the control's charged
    energy and FLOPs as a share of the other's, and both runs' Adam phases. Its conclusion names the
    side ahead: `clso_better` or `control_better` against CLSO's GA, else `STAGE_better`."""
    by = {(r["stage"], r["mode"], r["seed"]): r for r in rows if r["mode"] is not None}
    out = {}
    for name, control, reference in CONTRASTS:
        for (stage, mode, seed), r in sorted(by.items()):
            other = by.get((reference, mode, seed))
            if stage != control or other is None:
                continue
            at = r.get("at_clso_flops") if reference == CLSO_STAGE and control in AT_CLSO_FLOPS else None
            if reference == CLSO_STAGE and control in AT_CLSO_FLOPS and not at:
                raise ClsoError(f"{r['name']}: its record has no score at CLSO's FLOPs (its budget ended short of "
                                f"them?); re-create it with `dvc repro -f {r['name']}`")
            loss, flops = (at["val_loss"], at["flops"]) if at else (r["val_loss"], r["flops"])
            out.setdefault(name, {}).setdefault(mode, []).append(
                {"loss_difference": loss - other["val_loss"],
                 "energy_share": None if at else r["energy_wh"] / other["energy_wh"],
                 "flops_share": flops / other["flops"], "adam_phases": r["adam_phases"],
                 "clso_adam_phases": other["adam_phases"]})
    names = {name: ("clso_better", "control_better") if reference == CLSO_STAGE else
             (f"{reference}_better", f"{control}_better") for name, control, reference in CONTRASTS}
    return {name: {mode: _paired(pairs, *names[name]) for mode, pairs in modes.items()} for name, modes in out.items()}


def _paired(pairs: list[dict], ahead: str = "clso_better", behind: str = "control_better") -> dict:
    means = {k: None if any(p[k] is None for p in pairs) else statistics.fmean(p[k] for p in pairs)
             for k in ("energy_share", "flops_share", "adam_phases", "clso_adam_phases")}
    diffs = [p["loss_difference"] for p in pairs]
    out = paired_interval(diffs)
    out["conclusion"] = {"clso_better": ahead, "control_better": behind}.get(out["conclusion"], out["conclusion"])
    return {**out, **means, "spread": spread(diffs), "clso_better_in": sum(d > 0 for d in diffs)}


# Student's t, 97.5th percentile, by degrees of freedom (1 to 30): a two-sided 95 % interval
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959964


def t_975(df: int) -> float:
    """Student's t at 97.5 %: the table to 30 degrees of freedom, then the Cornish-Fisher expansion
    (within 1e-4 of the exact value there)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_interval(diffs: list[float]) -> dict:
    """Differences paired by seed (control − CLSO val loss, nats; positive: CLSO better): their mean, the
    95 % paired-t interval of the mean, and what it allows: `clso_better` or `control_better` when the
    interval excludes zero, `within_noise` when it does not, `one_seed` when there is no spread to weigh."""
    n, mean = len(diffs), statistics.fmean(diffs)
    if n == 1:
        return {"mean_diff": mean, "interval": None, "seeds": 1, "conclusion": "one_seed"}
    half = t_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    low, high = mean - half, mean + half
    conclusion = "clso_better" if low > 0 else "control_better" if high < 0 else "within_noise"
    return {"mean_diff": mean, "interval": [low, high], "seeds": n, "conclusion": conclusion}


SAME_RUN = 1e-6  # nats: stage spread's run at base.seed repeats this run's record when this close


def one_run_noise(measured: dict, rows: dict) -> dict:
    """The noise floor of the contestants trained once (ONE_RUN), from stage `spread` (`measured`:
    metrics/detail/spread.json, their val losses at each of its seeds): each one's mean and spread over
    those seeds, and whether the spread's run at base.seed repeats this run's record, that is, whether
    the spread was measured on this code, params and machine."""
    losses = measured.get("val_loss", {})
    missing = [name for name in ONE_RUN if not losses.get(name)]
    if missing:
        raise ClsoError(f"metrics/detail/spread.json has no val losses of {missing[0]!r}; re-measure them with "
                        f"`{REMEASURE}`")
    out = {}
    for name in ONE_RUN:
        values, again = list(losses[name].values()), losses[name].get(str(measured["base_seed"]))
        out[name] = {"seeds": len(values), "val_loss": statistics.fmean(values), "val_loss_spread": spread(values),
                     "this_run": rows[name]["val_loss"],
                     "repeats_this_run": again is not None and abs(again - rows[name]["val_loss"]) <= SAME_RUN}
    return out


def field_contrasts(measured: dict, rows: dict, noise: dict) -> dict:
    """The neuron-field LM against the same model without neurons (what the neurons add) and against the
    baseline, each paired by seed over stage `spread`'s runs: the other's val loss less the field's
    (nats; positive: the field ahead), with this run's field FLOPs and energy as a share of the other's.
    Its conclusion is `other_run` when the spread does not repeat this run (`noise`: one_run_noise's)."""
    losses, field = measured["val_loss"], rows["field"]

    def against(other: str) -> dict:
        seeds = [s for s in losses["field"] if s in losses[other]]
        out = {**paired_interval([losses[other][s] - losses["field"][s] for s in seeds]),
               "flops_share": field["flops"] / rows[other]["flops"],
               "energy_share": field["energy_wh"] / rows[other]["energy_wh"]}
        if not (noise["field"]["repeats_this_run"] and noise[other]["repeats_this_run"]):
            out["conclusion"] = "other_run"
        return out

    return {"neurons_add": against("field_no_neurons"), "against_baseline": against("baseline")}


# The crystal journal's figures for its neuron-field LM (document 004): losses per GPT-2 token on
# Tiny Shakespeare, taken as training losses (it logs them by epoch, and its final 0.12 is one), 2.39
# with causal attention at 208 neurons (epoch 60) and 2.55 for the flat field (no attention) after 600
# epochs. An epoch passes 64-token windows at stride 32 over the text (its Part 7), so each token about
# twice: `passes_per_epoch`. `gpt2_tokens_per_char`: nanoGPT's
# data/shakespeare/prepare.py counts 338,025 GPT-2 tokens in its 1,115,394 characters, which puts
# them in nats per character, the one unit a loss over another tokenizer shares with them.
JOURNAL_FIELD = {"causal_train_loss": 2.39, "causal_neurons": 208, "causal_epochs": 60,
                 "flat_plateau_train_loss": 2.55, "flat_plateau_neurons": 788, "flat_epochs": 600,
                 "gpt2_tokens_per_char": 338_025 / 1_115_394, "text_gpt2_tokens": 338_025, "passes_per_epoch": 2}


def field_vs_journal(field: Record) -> dict:
    """The neuron-field LM against the journal's figures: our final train loss (the mean of the last
    steps) and val loss per character beside the journal's training losses per character, with the
    tokens each run trained on. The record's details give our tokenizer's tokens per character."""
    j, d = JOURNAL_FIELD, field.details
    tokens_per_char = d["tokens_per_char"]
    per_char = {"our_final_train": d["final_train_loss"] * tokens_per_char["train"],
                "our_final_val": field.val_loss * tokens_per_char["val"],
                "journal_causal_train": j["causal_train_loss"] * j["gpt2_tokens_per_char"],
                "journal_flat_train": j["flat_plateau_train_loss"] * j["gpt2_tokens_per_char"]}
    return {**j, "our_final_train_loss": d["final_train_loss"], "our_train_tokens": d["tokens"],
            "journal_causal_train_tokens": j["causal_epochs"] * j["passes_per_epoch"] * j["text_gpt2_tokens"],
            "nats_per_char": per_char,
            # the journal's training loss is met when ours, per character, is at or below it
            "causal_train_loss_met": per_char["our_final_train"] <= per_char["journal_causal_train"],
            "flat_train_loss_met": per_char["our_final_train"] <= per_char["journal_flat_train"]}


def forward_only(rows: list[dict], baseline_curve: list[dict], seeds: tuple[int, ...]) -> dict | None:
    """The best forward-only contestant (the pure-mode stage of lowest mean val loss over its seeds, at its
    first seed) against the baseline's curve at its energy and FLOPs, with the range of those ratios over
    its seeds. `bound_applies`: the frozen-head bound limits the genome searches, whose head is frozen,
    not es or mezo, which train it."""
    pure = groups(r for r in rows if r["mode"] == "pure")
    if not pure:
        return None
    runs = pure[min(pure, key=lambda name: statistics.fmean(r["val_loss"] for r in pure[name]))]
    r = min(runs, key=lambda run: seeds.index(run["seed"]))
    m = matched(r, baseline_curve)
    each = [(run["val_ppl"], matched(run, baseline_curve)) for run in runs]
    at_energy = [ppl / x["baseline_val_ppl_at_clso_energy"] for ppl, x in each]
    at_flops = [ppl / x["baseline_val_ppl_at_clso_flops"] for ppl, x in each]
    return {"contestant": r["name"], "seeds": len(runs), "val_ppl": r["val_ppl"], "test_ppl": r["test_ppl"],
            "seed_ratios_at_energy": [min(at_energy), max(at_energy)], "seed_ratios_at_flops": [min(at_flops), max(at_flops)],
            "energy_wh": r["energy_wh"], "method": r["method"],
            "flops": r["flops"], "baseline_val_ppl_at_energy": m["baseline_val_ppl_at_clso_energy"],
            "at_energy": m["at_clso_energy"], "ppl_ratio_at_energy": r["val_ppl"] / m["baseline_val_ppl_at_clso_energy"],
            "baseline_val_ppl_at_flops": m["baseline_val_ppl_at_clso_flops"], "at_flops": m["at_clso_flops"],
            "ppl_ratio_at_flops": r["val_ppl"] / m["baseline_val_ppl_at_clso_flops"],
            "bound_applies": r["frozen_head_bound_val_ppl"] is not None}


def frontier(rows: list[dict], records: dict[str, Record], curves: dict[str, list[dict]], mode: str) -> list[dict]:
    """The rows of one mode's frontier: every contestant of the mode and every one without a mode (the
    baseline, the field LM), each its charged curve and its final val point."""
    out = []
    for r in rows:
        if r["mode"] not in (None, mode):
            continue
        common = {"contestant": r["name"], "label": r["label"], "energy_method": r["method"]}
        loss = records[r["name"]].curve["loss"]
        out += [{**common, "point": loss, "loss": p["loss"], "energy_wh": p["energy_wh"], "flops": p["flops"]}
                for p in curves[r["name"]]]
        out.append({**common, "point": "final val", "loss": r["val_loss"], "energy_wh": r["energy_wh"],
                    "flops": r["flops"]})
    return out

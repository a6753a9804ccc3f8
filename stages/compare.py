"""Stage `compare`: every contestant's record on one frontier, CLSO against the dense AdamW baseline,
and the verdict on document 003's hypothesis."""

import math
from pathlib import Path

from clso.compare import (
    against_baseline,
    charged,
    charged_curve,
    contrasts,
    field_vs_journal,
    frontier,
    headline,
    headline_row,
    methods,
    over_seeds,
    row,
)
from clso.energy import EnergyMeter
from clso.io import read_json, write_csv_atomic, write_json_atomic, write_text_atomic
from clso.params import MODES, load_params
from clso.plots import frontier_png
from clso.record import Record
from clso.report import report
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import PREPARED, REPORT, Contestant, contestants, detail, metrics
from stages.paths import frontier as frontier_path

FRONTIER_FIELDS = ("contestant", "label", "point", "loss", "energy_wh", "energy_method", "flops")
SUMMARY = ("val_ppl", "test_ppl", "energy_wh", "method", "flops")  # a contestant's columns in `dvc exp show`
FIELD_DETAILS = ("neurons", "frozen_share", "freeze", "attention", "torch_compile")  # what the report says of it


def shared_costs() -> dict[str, dict]:
    """The costs a record may name in `charged_with`, each recorded once by the stage that spent it."""
    surrogate = read_json(detail("surrogate"))
    return {"library": read_json(detail("library"))["generation"], "surrogate_evaluation": surrogate["evaluation"],
            "surrogate_training": surrogate["training"],
            "baseline_training": Record.load(Contestant("baseline").record).costs["training"]}


def uncharged(records: list[Record], compile_cost: dict, own: dict) -> list[tuple[str, dict]]:
    """What was metered but charged to no one: measuring, checkpoints, compiling, this stage."""
    def summed(costs):
        costs = list(costs)
        return {"energy_wh": sum(c["energy_wh"] for c in costs), "method": methods(*(c["method"] for c in costs)),
                "wall_s": sum(c.get("wall_s", 0.0) for c in costs)}

    details = [r.details for r in records]
    return [("final val and test scores of every contestant (and the frozen-head bound)",
             summed(d["final_evaluation"] for d in details)),
            ("searches: writing checkpoints", summed(d["checkpoint"] for d in details if "checkpoint" in d)),
            ("baseline and field LM: the val loss of their curves",
             summed({"energy_wh": d["eval_energy_wh"], "method": r.costs["training"]["method"]}
                    for r, d in zip(records, details) if "eval_energy_wh" in d)),
            ("compile: every file, its checks and benchmarks", compile_cost), ("compare", own)]


@stage("compare", sections=("base", "grid"))
def compare(params: Path = PARAMS_OPTION) -> None:
    """Read every contestant's record (the baseline, the neuron-field LM, CLSO's search and its controls
    in each mode and seed of the grid) and charge each its shared costs; write metrics/compare.json (the
    verdict, each contrast, each contestant's perplexities and charged energy and FLOPs),
    metrics/detail/compare.json (the rest), metrics/report.md and the frontier of each mode
    (plots/frontier/MODE.csv and its PNGs). The headline is CLSO's best mode (lowest mean val loss over
    seeds) at the first seed."""
    p = load_params(params)
    with EnergyMeter(**p.base.meter_options("cpu")) as meter:
        records = {c.name: Record.load(c.record) for c in contestants(p.grid)}
        shared = shared_costs()
        charges = {name: charged(r, shared) for name, r in records.items()}
        rows = {name: row(r, charges[name]) for name, r in records.items()}
        curves = {name: charged_curve(r, charges[name]) for name, r in records.items()}
        best = headline_row(list(rows.values()), p.grid.seeds[0])
        meta = read_json(PREPARED / "meta.json")
        tokens_per_char = {s: meta["tokens"][s] / meta["chars"][s] for s in ("train", "val")}
        inputs = {stage: read_json(detail(stage)) for stage in ("library", "surrogate", "compile", "transfer")}
    bounds = [r["frozen_head_bound_val_ppl"] for r in rows.values() if r["frozen_head_bound_val_ppl"]]
    result = {"headline": headline(best, rows["baseline"], records["baseline"].curve["points"]),
              "contestants": rows,
              "against_baseline": {n: against_baseline(r, rows["baseline"]) for n, r in rows.items() if n != "baseline"},
              "contrasts": contrasts(list(rows.values())),
              "field": {"journal": field_vs_journal(records["field"], tokens_per_char),
                        **{k: records["field"].details[k] for k in FIELD_DETAILS},
                        "baseline_torch_compile": records["baseline"].details["setup"]["torch_compile"]},
              # every pure search shares the head (initialised on base.seed), so one bound
              "frozen_head_bound_val_ppl": max(bounds) if bounds else None,
              "cost": meter.reading.as_metrics()}  # of this stage: charged to neither side
    if len(p.grid.seeds) > 1:
        result["over_seeds"] = over_seeds(list(rows.values()))
    result["uncharged"] = uncharged(list(records.values()), inputs["compile"]["cost"], result["cost"])
    write_json_atomic(metrics("compare"), summary(result))
    write_json_atomic(detail("compare"), result)
    write_text_atomic(REPORT, report(result, inputs))
    write_frontiers(rows, records, curves, result["frozen_head_bound_val_ppl"])
    v = result["headline"]["verdict"]
    print(f"compare: {best['name']}: the hypothesis {'holds' if v['holds'] else 'does not hold'} (val perplexity "
          f"{v['ppl_ratio']:.3f}× the baseline's at {v['energy_ratio']:.3f}× its energy); see {REPORT}")


def summary(result: dict) -> dict:
    """metrics/compare.json: the verdict, each contrast's mean loss difference and each contestant's columns."""
    v = result["headline"]["verdict"]
    return {"verdict": {"contestant": result["headline"]["clso"], "holds": v["holds"], "ppl_ratio": v["ppl_ratio"],
                        "energy_ratio": v["energy_ratio"]},
            "contrasts": {name: {mode: c["loss_difference"] for mode, c in modes.items()}
                          for name, modes in result["contrasts"].items()},
            "contestants": {name: {k: r[k] for k in SUMMARY} for name, r in result["contestants"].items()}}


def write_frontiers(rows: dict, records: dict, curves: dict, bound_ppl: float | None) -> None:
    """Each mode's frontier: its CSV (dvc.yaml's plots) and a PNG against energy and one against FLOPs."""
    method = methods(*(r["method"] for r in rows.values()))
    for mode in MODES:  # every mode, in the grid or not: dvc.yaml declares a plot of each
        points = frontier(list(rows.values()), records, curves, mode)
        write_csv_atomic(frontier_path(mode), FRONTIER_FIELDS, points)
        bound = math.log(bound_ppl) if bound_ppl and mode == "pure" else None
        title = f"{mode} mode: CLSO and its controls against AdamW and the neuron-field LM, each fully charged"
        frontier_png(points, "energy_wh", f"energy (Wh, {method})", frontier_path(mode, "-energy.png"), title, bound)
        frontier_png(points, "flops", "FLOPs", frontier_path(mode, "-flops.png"), title, bound)


if __name__ == "__main__":
    run_alone("compare")

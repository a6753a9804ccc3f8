"""Stage `compare`: every contestant's record on one frontier, CLSO against the dense AdamW baseline,
and the verdict on document 003's hypothesis."""

import math
from pathlib import Path

from clso import ClsoError
from clso.compare import (REMEASURE, against_baseline, charged, charged_curve, contrasts, field_contrasts,
                          field_vs_journal, forward_only, frontier, headline, methods, one_run_noise, over_seeds, row, summary,
                          uncharged)
from clso.energy import EnergyMeter
from clso.headline import headline_row
from clso.io import read_json, write_csv_atomic, write_json_atomic, write_text_atomic
from clso.machine import machine
from clso.params import MODES, load_params
from clso.plots import frontier_png
from clso.record import Record
from clso.report import HOLDS, report
from stages.common import PARAMS_OPTION, run_alone, shared_costs, stage
from stages.paths import REPORT, Contestant, contestants, detail, metrics
from stages.paths import frontier as frontier_path

FRONTIER_FIELDS = ("contestant", "label", "point", "loss", "energy_wh", "energy_method", "flops")
FIELD_DETAILS = ("neurons", "frozen_share", "freeze", "attention", "torch_compile")  # what the report says of it


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
        details = {stage: read_json(detail(stage)) for stage in ("library", "surrogate", "compile", "transfer")}
        details["spread"] = read_json(detail("spread"), fix=f"measure it with `{REMEASURE}`")
        details["sweep"] = read_json(detail("sweep"), fix="measure it with `python -m stages.sweep && dvc commit -f sweep`")
        shared = shared_costs(details)
        charges = {name: charged(r, shared) for name, r in records.items()}
        rows = {name: row(r, charges[name]) for name, r in records.items()}
        curves = {name: charged_curve(r, charges[name]) for name, r in records.items()}
        best = headline_row(list(rows.values()), p.grid.seeds[0])
    bounds = [r["frozen_head_bound_val_ppl"] for r in rows.values() if r["frozen_head_bound_val_ppl"]]
    field, noise = records["field"], one_run_noise(details["spread"], rows)
    result = {"headline": headline(best, rows["baseline"], records["baseline"].curve["points"]),
              "machine": machine(), "contestants": rows,
              "against_baseline": {n: against_baseline(r, rows["baseline"]) for n, r in rows.items() if n != "baseline"},
              "contrasts": contrasts(list(rows.values())),
              "field": {"journal": field_vs_journal(field), **{k: field.details[k] for k in FIELD_DETAILS},
                        **field_contrasts(details["spread"], rows, noise),
                        "baseline_torch_compile": records["baseline"].details["setup"]["torch_compile"]},
              # every pure search shares the head (initialised on base.seed), so one bound
              "frozen_head_bound_val_ppl": max(bounds) if bounds else None,
              "forward_only": forward_only(list(rows.values()), records["baseline"].curve["points"], p.grid.seeds)}
    if len(p.grid.seeds) > 1:
        result["over_seeds"] = over_seeds(list(rows.values()))
    result["one_run_noise"] = noise
    result["uncharged"] = uncharged(list(records.values()), {
        "library_sanity_check": details["library"]["sanity_check_cost"],
        "surrogate_inputs_comparison": details["surrogate"]["inputs_comparison_cost"],
        "compile": details["compile"]["cost"], "spread": details["spread"]["cost"], "sweep": details["sweep"]["cost"],
        "compare": meter.reading.as_metrics()})
    write_json_atomic(metrics("compare"), summary(result))
    write_json_atomic(detail("compare"), result)
    write_text_atomic(REPORT, report(result, details))
    write_frontiers(rows, records, curves, result["frozen_head_bound_val_ppl"])
    v = result["headline"]["verdict"]
    print(f"compare: {best['name']}: the hypothesis {HOLDS[v['holds']]} (val perplexity "
          f"{v['ppl_ratio']:.3f}× the baseline's at {v['energy_ratio']:.3f}× its energy); see {REPORT}")


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

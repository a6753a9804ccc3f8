"""Stage `compare`: CLSO against the dense AdamW baseline on matched energy and FLOPs, the verdict
on document 003's hypothesis, and the only look at the test split."""

import math
from pathlib import Path

import torch

from clso.compare import (
    best_clso_run,
    charged_curve,
    clso_charges,
    comparison,
    contrast_statement,
    contrasts,
    device_parts,
    field_contestant,
    field_statement,
    hypothesis,
    journal_statement,
    methods,
    seed_summary,
    statement,
    verdict,
)
from clso.context import setup
from clso.data.tokens import TokenData, split_loss
from clso.energy import EnergyMeter
from clso.io import write_csv_atomic, write_json_atomic, write_text_atomic
from clso.model.library import Library
from clso.params import load_params
from clso.plots import frontier_png
from clso.transfer import statement as transfer_statement
from stages.common import PARAMS_OPTION, read_curve, read_json, run_alone, stage
from stages.final_models import baseline_model, field_model, searched_model
from stages.variants import grid_variants

METRICS = Path("metrics/compare.json")
REPORT = Path("metrics/report.md")
# every variant's search curve, fully charged, on the baseline's: the frontier dvc.yaml's plots draw
FRONTIER = Path("plots/compare_frontier.csv")
FRONTIER_FIELDS = ("series", "variant", "loss", "energy_wh", "energy_method", "flops")
README = Path("README.md")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
EVAL_BATCH = 16
# a variant's row in compare.json: what the frontier table shows
ROW_KEYS = ("val_ppl", "test_ppl", "energy_wh", "method", "flops", "true_evaluations")


@stage("compare", sections=("base", "model", "grid"))
def compare(params: Path = PARAMS_OPTION) -> None:
    """Read the metrics and curves of library, surrogate, baseline and every variant of the grid
    (CLSO's search and its controls); score every final model on the test split; write
    metrics/compare.json, metrics/report.md, the frontier plots/compare_frontier.csv and its PNGs, and
    the README's block of latest numbers. The headline verdict is for CLSO's best mode (lowest mean
    val loss over seeds) at the first seed. The journal's neuron-field LM (stage `field`) is the third
    contestant: on the same plots, its test split scored here too."""
    p = load_params(params)
    device = setup(p.base)
    variants = grid_variants(p.grid)
    with EnergyMeter(device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts) as meter:
        library, surrogate = read_json("metrics/library.json"), read_json("metrics/surrogate.json")
        base_metrics, base_curve = read_json("metrics/baseline.json"), read_curve("plots/baseline.csv")
        searches = {v: read_json(v.metrics) for v in variants}
        curves = {v: read_curve(v.curve) for v in variants}
        data = TokenData.open("data/prepared")
        test = data.tokens("test")
        crystals = Library.load("models/library")
        with torch.no_grad():
            dense = baseline_model(p, data.vocab_size, device)
            base_test = split_loss(lambda x: dense(input_ids=x).logits, test, p.model.block_size, EVAL_BATCH, device)
            tests = {v: split_loss(searched_model(p, v, device, crystals), test, p.model.block_size, EVAL_BATCH, device)
                     for v in variants}
            field_test = split_loss(field_model(device), test, p.model.block_size, EVAL_BATCH, device)
        field_metrics, field_curve = read_json("metrics/field.json"), read_curve("plots/field.csv")
    baseline = {
        "val_loss": base_metrics["final_val_loss"], "val_ppl": base_metrics["final_val_ppl"],
        "test_loss": base_test, "test_ppl": math.exp(base_test), "energy_wh": base_metrics["energy_wh"],
        "method": base_metrics["method"], "flops": base_metrics["flops"], "wall_s": base_metrics["wall_s"],
        "steps": base_metrics["steps"], "eval_energy_wh": base_metrics["eval_energy_wh"],
        "energy_by_device": device_parts(base_metrics), "torch_compile": base_metrics["setup"]["torch_compile"],
    }
    runs, charged = [], {}
    for v in variants:
        m = searches[v]
        charges = clso_charges(library, surrogate if v.strategy == "ga" else None, m, base_metrics)
        bound = m.get("frozen_head_bound")
        runs.append({
            "variant": v.name, "stage": v.stage, "mode": v.mode, "seed": v.seed, "label": v.label,
            "val_loss": m["val_loss"], "val_ppl": m["val_ppl"], "test_loss": tests[v], "test_ppl": math.exp(tests[v]),
            **{k: charges[k] for k in ("energy_wh", "method", "flops", "wall_s")},
            "energy_wh_by_part": charges["energy_wh_by_part"], "energy_by_device": charges["energy_by_device"],
            # the surrogate's pretraining genomes were truly evaluated too
            "true_evaluations": m["true_evaluations"] + (surrogate["genomes"] if v.strategy == "ga" else 0),
            "surrogate_predictions": m["surrogate_predictions"], "adam_phases": m["adam_phases"],
            **({"frozen_head_bound_val_loss": bound["val_loss"], "frozen_head_bound_val_ppl": bound["val_ppl"]}
               if bound else {}),
        })
        charged[v.name] = charged_curve(curves[v], charges)
    best = best_clso_run(runs, p.grid.seeds[0])
    result = comparison({k: v for k, v in best.items() if k not in ("stage", "label", "adam_phases")}, baseline,
                        base_curve)
    result["variants"] = {}
    for r in runs:
        v = verdict(r["val_ppl"], r["energy_wh"], baseline["val_ppl"], baseline["energy_wh"],
                    r.get("frozen_head_bound_val_ppl"))
        result["variants"][r["variant"]] = {**{k: r[k] for k in ROW_KEYS}, "holds": v["holds"],
                                            "ppl_ratio": v["ppl_ratio"], "energy_ratio": v["energy_ratio"]}
    if len(p.grid.seeds) > 1:
        result["over_seeds"] = {f"{stage}@{mode}": seed_summary([r for r in runs if (r["stage"], r["mode"]) == (stage, mode)])
                                for stage, mode in dict.fromkeys((r["stage"], r["mode"]) for r in runs)}
    result["contrasts"] = contrasts(runs)
    tokens_per_char = {split: data.meta["tokens"][split] / data.meta["chars"][split] for split in ("train", "val")}
    result["field"] = field_contestant(field_metrics, field_curve, field_test, baseline, tokens_per_char)
    bounds = {r["frozen_head_bound_val_ppl"] for r in runs if "frozen_head_bound_val_ppl" in r}
    if bounds:  # every pure variant shares the head (initialised on base.seed), so one bound
        result["frozen_head_bound_val_ppl"] = max(bounds)
    result["cost"] = meter.reading.as_metrics()  # of this stage: charged to neither side
    write_json_atomic(METRICS, result)
    frontier = [{"series": "AdamW baseline (val)", "variant": "baseline", "loss": r["val_loss"],
                 "energy_wh": r["energy_wh"], "energy_method": baseline["method"], "flops": r["flops"]} for r in base_curve]
    for r in runs:
        frontier += [{"series": f"{r['variant']} (best fitness, train batch)", "variant": r["variant"],
                      "loss": row["best_loss"], "energy_wh": row["energy_wh"], "energy_method": row["energy_method"],
                      "flops": row["flops"]} for row in charged[r["variant"]]]
        frontier.append({"series": f"{r['variant']} (final val)", "variant": r["variant"], "loss": r["val_loss"],
                         "energy_wh": r["energy_wh"], "energy_method": r["method"], "flops": r["flops"]})
    field_points = [r for r in field_curve if r["val_loss"] == r["val_loss"]]  # rows with a val loss (not NaN)
    frontier += [{"series": "neuron field LM (val)", "variant": "field", "loss": r["val_loss"], "energy_wh": r["energy_wh"],
                  "energy_method": r["energy_method"], "flops": r["flops"]} for r in field_points]
    write_csv_atomic(FRONTIER, FRONTIER_FIELDS, frontier)
    title = f"CLSO and its controls vs AdamW and the neuron-field LM (best CLSO: {best['variant']})"
    energy_label = f"energy (Wh, {methods(*(r['method'] for r in runs), baseline['method'], field_metrics['method'])})"
    frontier_png(base_curve, runs, charged, "energy_wh", energy_label, "plots/compare_energy.png", title, field_points)
    frontier_png(base_curve, runs, charged, "flops", "FLOPs", "plots/compare_flops.png", title, field_points)
    # figures other stages' metrics already hold are quoted in the report, not copied into compare.json
    others = {"library_sanity": library["sanity_check"], "compile": read_json("metrics/compile.json"),
              "compiled_files": read_json("build/report.json"), "baseline": base_metrics,
              "searches": {v.name: searches[v] for v in variants},
              "best_curve": next(curves[v] for v in variants if v.name == best["variant"]),
              "transfer": read_json("metrics/transfer.json")}
    write_text_atomic(REPORT, report(result, others))
    _update_readme(summary(result, others))
    print(f"compare: {best['variant']} (CLSO's best mode, first seed): {statement(result['verdict'])}")
    for name, modes in result["contrasts"].items():
        for mode, c in modes.items():
            print(f"compare: {contrast_statement(name, mode, c)}")
    print(f"compare: {field_statement(result['field'])}")


def _fmt(x, digits=4):
    if x is None:
        return "never"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def summary(result: dict, others: dict) -> str:
    """The README block: compare.json's figures and those it quotes from library and compile."""
    c, b, m, v = result["clso"], result["baseline"], result["matched"], result["verdict"]
    rows = [("val perplexity", c["val_ppl"], b["val_ppl"]), ("test perplexity", c["test_ppl"], b["test_ppl"]),
            ("energy (Wh)", c["energy_wh"], b["energy_wh"]), ("FLOPs", c["flops"], b["flops"]),
            ("wall (s)", c["wall_s"], b["wall_s"])]
    lines = [f"| | CLSO's best mode, `{c['variant']}` | AdamW baseline |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(x)} | {_fmt(y)} |" for name, x, y in rows]
    parts = ", ".join(f"{name.replace('_', ' ')} {_fmt(wh)}" for name, wh in c["energy_wh_by_part"].items())
    lines += ["", f"Energy method: CLSO `{c['method']}`, baseline `{b['method']}`; CLSO is charged every part it "
              f"spent (Wh: {parts}). At CLSO's energy the baseline's "
              f"val perplexity was {_fmt(m['baseline_val_ppl_at_clso_energy'])} ({m['at_clso_energy']}); the baseline "
              f"reached CLSO's val perplexity after {_fmt(m['baseline_energy_wh_to_reach_clso'])} Wh "
              f"(step {_fmt(m['baseline_step_to_reach_clso'])}).", "", _device_line(c, b), "",
              f"**Hypothesis** ({hypothesis()}; decided on the val split, test reported) for CLSO's best mode "
              f"(lowest mean val loss over seeds), at the first seed: `{c['variant']}`: **{statement(v)}**.", "",
              "Every variant of the grid (CLSO's search and its controls, each charged everything it spent; "
              "plots/compare_energy.png):", "", *frontier_table(result)]
    if "over_seeds" in result:
        lines += ["", *seed_table(result["over_seeds"])]
    statements = [contrast_statement(name, mode, x) for name, modes in result["contrasts"].items()
                  for mode, x in modes.items()] + [field_statement(result["field"])]
    if statements:
        lines += ["", *(f"- {text}" for text in statements)]
    if "frozen_head_bound_val_ppl" in result:
        bound = result["frozen_head_bound_val_ppl"]
        lines += ["", f"Frozen-head bound (pure mode, metrics/search/*/pure-*.json): with the LM head and final "
                  f"LayerNorm at their initialisation, no body of any kind — even one that knew each target — gets "
                  f"the val perplexity below {_fmt(bound)} ({bound / b['val_ppl']:.3f}× the baseline's), whichever "
                  "search picks the body."]
    if "library_sanity" in others:
        s = others["library_sanity"]
        lines += ["", f"Library sanity check (protocol step 1, metrics/library.json: against the trained baseline's matrices): the best "
                  f"library matrix, with its best gain, leaves on average {s['mean_best_rel_error_with_gain']:.0%} "
                  f"relative Frobenius error (worst {s['worst_best_rel_error_with_gain']:.0%}); the protocol calls a "
                  f"library above {s['protocol_max_error']:.0%} too weak: **{'passes' if s['passes_protocol'] else 'fails'}**."]
    if "compile" in others:
        lines += ["", _compile_line(others["compile"])]
    if "transfer" in others:
        lines += ["", *transfer_table(others["transfer"])]
    return "\n".join(lines)


TRANSFER_SIDES = {"clso": "CLSO, charged both options", "clso_head": "CLSO head", "clso_partial": "CLSO partial",
                  "baseline": "baseline, fine-tuned", "baseline_head": "baseline, probe",
                  "no_pretraining": "no pretraining, probe", "no_pretraining_finetuned": "no pretraining, fine-tuned"}


def transfer_table(t: dict) -> list[str]:
    """metrics/transfer.json as a table (a row per task and side) and a statement per task."""
    lines = [f"Transfer (metrics/transfer.json): CLSO's `{t['clso_variant']}` frozen with a linear probe (`head`), or "
             "with a search over the genes nearest the head first (`partial`), the option with the better val metric "
             "charged for both; the baseline fine-tuned end to end, and its body frozen under the same probe; a "
             "randomly initialised GPT-2 both ways (no pretraining). The test split reached no training step; energy "
             "is the fine-tuning's, and for CLSO's options also scoring val, which chooses between them.", "",
             "| task | side | train | val | test (MNLI: matched, mismatched) | energy (Wh) | FLOPs |", "|---|---|---|---|---|---|---|"]
    for spec, r in t["tasks"].items():
        tests = [split for split in r["majority_class"]]
        for side, name in TRANSFER_SIDES.items():
            s = r[side]
            test = ", ".join(f"{s[split]:.4f}" for split in tests)
            label = f"{name} ({s['option']})" if side == "clso" else name
            lines.append(f"| `{spec}` ({r['metric']}) | {label} | {s['train']:.4f} | {s['val']:.4f} | {test} | "
                         f"{_fmt(s['energy_wh'])} | {s['flops']:.3g} |")
        majority = ", ".join(f"{r['majority_class'][split]:.4f}" for split in tests)
        lines.append(f"| `{spec}` ({r['metric']}) | majority class of train | | | {majority} | | |")
    return lines + ["", *(f"- `{spec}`: {transfer_statement(r)}" for spec, r in t["tasks"].items())]


def _device_line(clso: dict, baseline: dict) -> str:
    """Where each side's energy went: a GPU run still spends CPU energy, metered apart."""
    def parts(side: dict) -> str:
        d = side["energy_by_device"]
        if d["gpu_method"] is None:
            return f"all on the CPU, {_fmt(d['cpu_wh'])} Wh (`{d['cpu_method']}`)"
        return (f"GPU {_fmt(d['gpu_wh'])} Wh (`{d['gpu_method']}`), CPU {_fmt(d['cpu_wh'])} Wh "
                f"(`{d['cpu_method']}`)")

    return f"Energy by device: CLSO {parts(clso)}; baseline {parts(baseline)}."


def _compile_line(c: dict) -> str:
    clso, base = c["models"]["clso"], c["models"]["baseline"]
    m8, b8, exact = clso["modes"]["mixed8"], base["modes"]["mixed8"], clso["exactness"]
    missed = [k for k, v in c["met"].items() if not v]
    return (f"Compiled to `.crystal` (metrics/compile.json): CLSO (`{c['variant']}`) `mixed8` {m8['bytes'] / 1e6:.2f} MB "
            f"({m8['bytes_vs_f32']:.0%} of its own `f32` file, target ≤ {c['targets']['clso_mixed8_bytes_vs_f32_max']:.0%}; "
            f"{m8['bytes_vs_dense_f32']:.0%} of the dense `f32` file of the same architecture; its f32 embeddings "
            f"are {exact['embedding_share_of_bytes']:.0%} of it, and {exact['exact_layers']} of its "
            f"{exact['crystalline_layers']} crystalline layers are stored exactly, with "
            f"{exact['float_matrix_values_outside_embeddings']:,} float library values quantized), baseline `mixed8` "
            f"{b8['bytes'] / 1e6:.2f} MB ({b8['bytes_vs_f32']:.0%}); `mixed8` against the float model: mean KL "
            f"divergence of the next-token distributions {m8['mean_kl']:.2g} (CLSO) and {b8['mean_kl']:.2g} nats "
            f"(baseline; target ≤ {c['targets']['mixed8_mean_kl_max']:g}), top-1 agreement "
            f"{m8['top1_agreement']:.2%} and {b8['top1_agreement']:.2%}, perplexity change "
            f"{m8['ppl_change']:+.3%} and {b8['ppl_change']:+.3%}; the C runtime generates "
            f"{clso['runtime_bench']['ratio']:.1f}× (CLSO) and {base['runtime_bench']['ratio']:.1f}× (baseline) the "
            f"tokens/s of PyTorch eager. Targets missed: {', '.join(missed) or 'none'}. The crystal journal's quantization "
            f"claims, on the neuron-field LM's files: {journal_statement(c['models']['field']['journal'])}.")


def frontier_table(result: dict) -> list[str]:
    b = result["baseline"]
    lines = ["| variant | val ppl | test ppl | energy (Wh) | method | FLOPs | true evaluations | hypothesis |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| `{name}` | {_fmt(r['val_ppl'])} | {_fmt(r['test_ppl'])} | {_fmt(r['energy_wh'])} | {r['method']} | "
              f"{_fmt(r['flops'])} | {r['true_evaluations']} | {'holds' if r['holds'] else 'does not hold'} "
              f"({r['ppl_ratio']:.3g}× ppl, {r['energy_ratio']:.3g}× energy) |" for name, r in result["variants"].items()]
    lines.append(f"| AdamW baseline | {_fmt(b['val_ppl'])} | {_fmt(b['test_ppl'])} | {_fmt(b['energy_wh'])} | "
                 f"{b['method']} | {_fmt(b['flops'])} | — | — |")
    f = result["field"]
    lines.append(f"| neuron-field LM (document 004, by gradient) | {_fmt(f['val_ppl'])} | {_fmt(f['test_ppl'])} | "
                 f"{_fmt(f['energy_wh'])} | {f['method']} | {_fmt(f['flops'])} | — | not its claim "
                 f"({f['ppl_ratio']:.3g}× ppl, {f['energy_ratio']:.3g}× energy) |")
    return lines


def seed_table(over_seeds: dict) -> list[str]:
    def pm(s, key):
        return f"{_fmt(s[key])} ± {_fmt(s[key + '_spread'])}"

    lines = ["Mean ± spread (sample standard deviation) over seeds:", "",
             "| strategy@mode | seeds | val loss | val ppl | test ppl | energy (Wh) | FLOPs |", "|---|---|---|---|---|---|---|"]
    lines += [f"| `{name}` | {s['seeds']} | {pm(s, 'val_loss')} | {pm(s, 'val_ppl')} | {pm(s, 'test_ppl')} | "
              f"{pm(s, 'energy_wh')} | {pm(s, 'flops')} |" for name, s in over_seeds.items()]
    return lines


def report(result: dict, others: dict) -> str:
    searches, best = others["searches"], result["clso"]["variant"]
    lines = ["# CLSO against the dense AdamW baseline", "",
             "Generated by `dvc repro compare` from this run's metrics; do not edit.", "", summary(result, others), "",
             f"## Matched comparison (`{best}`)", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["matched"].items()]
    lines += ["", "## Every search", "", "| variant | generations | stopped | true evaluations | predictions | "
              "budget | search energy (Wh) | search FLOPs |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| `{name}` | {m['generations']} | {m['stopped']} | {m['true_evaluations']} | {m['surrogate_predictions']} | "
              f"{', '.join(f'{k} {_fmt(v)}' for k, v in m.get('budget', {}).items()) or '—'} | {_fmt(m['energy_wh'])} | "
              f"{_fmt(m['flops'])} |" for name, m in searches.items()]
    lines += ["", "A control's budget is matched to CLSO's search of its mode and seed: random search gets its true "
              "evaluations, generation by generation (the surrogate's pretraining genomes included); the GA without "
              "surrogate its FLOPs with the surrogate's, checked between generations (so it may end one generation "
              "over); the fixed body its generations, so the same Adam phases. True evaluations above are the "
              "search's own; the frontier table adds the surrogate's pretraining to CLSO's.", "",
              f"## `{best}`, per generation (fitness loss on the train-split fitness batch)", "",
              "| gen | best loss | mean loss | std loss | true evals | predictions | energy (Wh) | wall (s) |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {int(r['generation'])} | {r['best_loss']:.4f} | {r['mean_loss']:.4f} | {r['std_loss']:.4f} | "
              f"{int(r['true_evaluations'])} | {int(r['surrogate_predictions'])} | {r['energy_wh']:.4f} | "
              f"{r['wall_s']:.1f} |" for r in others["best_curve"]]
    lines += ["", f"Search stopped: {searches[best]['stopped']}; surrogate predictions replaced "
              f"{searches[best]['evaluations_saved_share']:.0%} of its evaluations. Energy and FLOPs above are the "
              "search's alone; plots/compare_frontier.csv adds what was spent before it.", "",
              "## Costs charged to neither side", "", "| what | energy (Wh) | method | wall (s) |", "|---|---|---|---|",
              _cost_row(f"searches: writing checkpoints ({len(searches)} variants)",
                        _sum_costs(m["checkpoint"] for m in searches.values())),
              _cost_row("searches: final val scoring and the frozen-head bound",
                        _sum_costs(m["final_evaluation"] for m in searches.values())),
              _cost_row("baseline: periodic validation (its curve)", {"energy_wh": result["baseline"]["eval_energy_wh"],
                                                                    "method": result["baseline"]["method"]}),
              _cost_row("baseline: final val scoring", others["baseline"]["final_evaluation"]),
              _cost_row("compile: every file, its checks and benchmarks", others["compile"]["cost"]),
              _cost_row("compare: loading every model and scoring the test split", result["cost"]), ""]
    if "compiled_files" in others:
        files = others["compiled_files"]["models"]
        lines += [f"## Compiled files (build/report.json, from `dvc repro compile`; CLSO is `{others['compile']['variant']}`)", "",
                  "| model | mode | bytes | vs its f32 | vs dense f32 | exact layers | mean KL (nats) | top-1 agreement | "
                  "val ppl | ppl change | max logit diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in files.items():
            lines += [f"| {name} | {mode} | {f['bytes']} | {f['bytes_vs_f32']:.1%} | "
                      f"{format(f['bytes_vs_dense_f32'], '.1%') if 'bytes_vs_dense_f32' in f else '—'} | "
                      f"{_exact_layers(f['exactness'])} | {f['mean_kl']:.2g} | "
                      f"{f['top1_agreement']:.2%} | {f['val_ppl']:.4g} | {f['ppl_change']:+.3%} | "
                      f"{f['max_abs_logit_diff']:.3g} |" for mode, f in m["modes"].items()]
        lines += ["", "| model | C runtime tokens/s | PyTorch eager tokens/s | ratio |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['runtime_bench']['runtime_tokens_per_s']:.0f} | "
                  f"{m['runtime_bench']['torch_tokens_per_s']:.0f} | {m['runtime_bench']['ratio']:.2f} |"
                  for name, m in files.items() if "runtime_bench" in m]
        lines.append("")
    return "\n".join(lines)


def _sum_costs(costs) -> dict:
    costs = list(costs)
    return {"energy_wh": sum(c["energy_wh"] for c in costs), "method": methods(*(c["method"] for c in costs)),
            "wall_s": sum(c["wall_s"] for c in costs)}


def _exact_layers(e: dict) -> str:
    return f"{e['exact_layers']}/{e['crystalline_layers']}" if e["crystalline_layers"] else "dense"


def _cost_row(what: str, cost: dict) -> str:
    wall = _fmt(cost["wall_s"]) if "wall_s" in cost else "—"
    return f"| {what} | {_fmt(cost['energy_wh'])} | {cost['method']} | {wall} |"


def _update_readme(block: str) -> None:
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return  # a README without the markers is the user's own: leave it alone
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(README, f"{head}{BEGIN}\n{block}\n{END}{tail}")


if __name__ == "__main__":
    run_alone("compare")

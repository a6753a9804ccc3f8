"""Stage `compare`: CLSO against the dense AdamW baseline on matched energy and FLOPs, the verdict
on document 003's hypothesis, and the only look at the test split."""

import csv
import math
from pathlib import Path

import torch

from clso import ClsoError
from clso.compare import comparison
from clso.data import TokenData
from clso.evaluate import split_loss
from clso.io import write_json_atomic, write_text_atomic
from clso.params import load_params
from clso.plots import comparison_png
from clso.runtime import setup
from stages.common import PARAMS_OPTION, final_models, read_json, run_alone, stage

METRICS = Path("metrics/compare.json")
REPORT = Path("metrics/report.md")
README = Path("README.md")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
EVAL_BATCH = 16


def _csv(path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return [{k: (v if k == "energy_method" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise ClsoError(f"{path}: not found; run `dvc repro` so the earlier stages write it") from None


def _methods(*methods) -> str:
    return "|".join(sorted({part for m in methods for part in m.split("|")}))


@stage("compare", sections=("base", "model"))
def compare(params: Path = PARAMS_OPTION) -> None:
    """Read the metrics and curves of library, surrogate, evolve and baseline; score both final
    models on the test split; write metrics/compare.json, metrics/report.md, the comparison plots
    and the README's block of latest numbers."""
    p = load_params(params)
    device = setup(p.base)
    library, surrogate, evolve = read_json("metrics/library.json"), read_json("metrics/surrogate.json"), read_json("metrics/evolve.json")
    base_metrics, base_curve, clso_curve = read_json("metrics/baseline.json"), _csv("plots/baseline.csv"), _csv("plots/evolve.csv")
    data = TokenData.open("data/prepared")
    clso_model, baseline_model = final_models(p, data.vocab_size, device)
    test = data.tokens("test")
    with torch.no_grad():
        clso_test = split_loss(clso_model, test, p.model.block_size, EVAL_BATCH, device)
        base_test = split_loss(lambda x: baseline_model(input_ids=x).logits, test, p.model.block_size, EVAL_BATCH, device)
    # an svd-warm-started library stands on the trained baseline: its training is CLSO's cost too
    svd_charge = base_metrics["energy_wh"] if sum(b["families"]["svd"] for b in library["buckets"].values()) else 0.0
    svd_flops = base_metrics["flops"] if svd_charge else 0
    before_search = (library["energy_wh"] + surrogate["evaluation"]["energy_wh"] + surrogate["training"]["energy_wh"]
                     + svd_charge)
    clso = {
        "mode": evolve["mode"], "val_loss": evolve["val_loss"], "val_ppl": evolve["val_ppl"],
        "test_loss": clso_test, "test_ppl": math.exp(clso_test),
        "energy_wh": before_search + evolve["energy_wh"],
        "method": _methods(library["method"], surrogate["evaluation"]["method"], surrogate["training"]["method"],
                           evolve["method"]),
        "flops": surrogate["evaluation"]["flops"] + surrogate["training"]["flops"] + evolve["flops"] + svd_flops,
        "wall_s": library["wall_s"] + surrogate["evaluation"]["wall_s"] + surrogate["training"]["wall_s"]
        + evolve["wall_s"],
        "energy_wh_library_and_surrogate": before_search,
        "energy_wh_charged_for_svd_reference": svd_charge,
        "true_evaluations": evolve["true_evaluations"] + surrogate["genomes"],
        "surrogate_predictions": evolve["surrogate_predictions"],
    }
    baseline = {
        "val_loss": base_metrics["final_val_loss"], "val_ppl": base_metrics["final_val_ppl"],
        "test_loss": base_test, "test_ppl": math.exp(base_test), "energy_wh": base_metrics["energy_wh"],
        "method": base_metrics["method"], "flops": base_metrics["flops"], "wall_s": base_metrics["wall_s"],
        "steps": base_metrics["steps"],
    }
    result = comparison(clso, baseline, base_curve)
    result["library_sanity"] = library["sanity_check"]
    result["compile"] = compile_summary(read_json("metrics/compile.json"))
    write_json_atomic(METRICS, result)
    clso_costs = [{**r, "energy_wh": r["energy_wh"] + before_search,
                   "flops": r["flops"] + surrogate["evaluation"]["flops"] + surrogate["training"]["flops"] + svd_flops}
                  for r in clso_curve]
    title = f"CLSO ({clso['mode']}) vs AdamW, val loss"
    comparison_png(base_curve, clso_costs, clso, "energy_wh", f"energy (Wh, {_methods(clso['method'], baseline['method'])})",
                   "plots/compare_energy.png", title)
    comparison_png(base_curve, clso_costs, clso, "flops", "FLOPs", "plots/compare_flops.png", title)
    write_text_atomic(REPORT, report(result, clso_curve, evolve))
    _update_readme(summary(result))
    print(f"compare: {result['verdict']['statement']}")


def compile_summary(metrics: dict) -> dict:
    """The figures of metrics/compile.json that the comparison reports."""
    keys = ("bytes", "bytes_vs_f32", "bytes_vs_dense_f32", "top1_agreement", "val_ppl", "ppl_change", "max_abs_logit_diff")
    return {"models": {name: {"modes": {mode: {k: f[k] for k in keys} for mode, f in m["modes"].items()},
                              "runtime_tokens_per_s": m["runtime_bench"]["runtime_tokens_per_s"],
                              "torch_tokens_per_s": m["runtime_bench"]["torch_tokens_per_s"],
                              "runtime_vs_torch": m["runtime_bench"]["ratio"]}
                       for name, m in metrics["models"].items()},
            "targets": metrics["targets"], "measured": metrics["measured"], "met": metrics["met"]}


def _fmt(x, digits=4):
    if x is None:
        return "never"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def summary(result: dict) -> str:
    c, b, m, v = result["clso"], result["baseline"], result["matched"], result["verdict"]
    rows = [("val perplexity", c["val_ppl"], b["val_ppl"]), ("test perplexity", c["test_ppl"], b["test_ppl"]),
            ("energy (Wh)", c["energy_wh"], b["energy_wh"]), ("FLOPs", c["flops"], b["flops"]),
            ("wall (s)", c["wall_s"], b["wall_s"])]
    lines = [f"| | CLSO ({c['mode']}) | AdamW baseline |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(x)} | {_fmt(y)} |" for name, x, y in rows]
    lines += ["", f"Energy method: CLSO `{c['method']}`, baseline `{b['method']}`. At CLSO's energy the baseline's "
              f"val perplexity was {_fmt(m['baseline_val_ppl_at_clso_energy'])} ({m['at_clso_energy']}); the baseline "
              f"reached CLSO's val perplexity after {_fmt(m['baseline_energy_wh_to_reach_clso'])} Wh "
              f"(step {_fmt(m['baseline_step_to_reach_clso'])}).", "",
              f"**Hypothesis** ({v['hypothesis']}): **{v['statement']}**."]
    if "library_sanity" in result:
        s = result["library_sanity"]
        lines += ["", f"Library sanity check (protocol step 1, metrics/library.json: against the trained baseline's matrices): the best "
                  f"library matrix, with its best gain, leaves on average {s['mean_best_rel_error_with_gain']:.0%} "
                  f"relative Frobenius error (worst {s['worst_best_rel_error_with_gain']:.0%}); the protocol calls a "
                  f"library above 20% too weak: **{'passes' if s['passes_protocol_20pct'] else 'fails'}**."]
    if "compile" in result:
        lines += ["", _compile_line(result["compile"])]
    return "\n".join(lines)


def _compile_line(c: dict) -> str:
    clso, base = c["models"]["clso"], c["models"]["baseline"]
    m8, b8 = clso["modes"]["mixed8"], base["modes"]["mixed8"]
    missed = [k for k, v in c["met"].items() if not v]
    return (f"Compiled to `.crystal` (metrics/compile.json): CLSO `mixed8` {m8['bytes'] / 1e6:.2f} MB "
            f"({m8['bytes_vs_f32']:.0%} of its own `f32` file, target ≤ 35%; {m8['bytes_vs_dense_f32']:.0%} of the "
            f"dense `f32` file of the same architecture), baseline `mixed8` {b8['bytes'] / 1e6:.2f} MB "
            f"({b8['bytes_vs_f32']:.0%}); `mixed8` top-1 agreement with the float model {m8['top1_agreement']:.2%} "
            f"(CLSO) and {b8['top1_agreement']:.2%} (baseline), perplexity change {m8['ppl_change']:+.3%} and "
            f"{b8['ppl_change']:+.3%}; the C runtime generates {clso['runtime_vs_torch']:.1f}× (CLSO) and "
            f"{base['runtime_vs_torch']:.1f}× (baseline) the tokens/s of PyTorch eager. Targets missed: "
            f"{', '.join(missed) or 'none'}.")


def report(result: dict, clso_curve: list[dict], evolve: dict) -> str:
    lines = ["# CLSO against the dense AdamW baseline", "",
             "Generated by `dvc repro compare` from this run's metrics; do not edit.", "", summary(result), "",
             "## Matched comparison", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["matched"].items()]
    lines += ["", "## CLSO search, per generation (fitness loss on the train-split fitness batch)", "",
              "| gen | best loss | mean loss | std loss | true evals | predictions | energy (Wh) | wall (s) |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {int(r['generation'])} | {r['best_loss']:.4f} | {r['mean_loss']:.4f} | {r['std_loss']:.4f} | "
              f"{int(r['true_evaluations'])} | {int(r['surrogate_predictions'])} | {r['energy_wh']:.4f} | "
              f"{r['wall_s']:.1f} |" for r in clso_curve]
    lines += ["", f"Search stopped: {evolve['stopped']}; surrogate predictions replaced "
              f"{evolve['evaluations_saved_share']:.0%} of its evaluations.", ""]
    if "compile" in result:
        lines += ["## Compiled files (build/, from `dvc repro compile`)", "",
                  "| model | mode | bytes | vs its f32 | vs dense f32 | top-1 agreement | val ppl | ppl change | max logit diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, m in result["compile"]["models"].items():
            lines += [f"| {name} | {mode} | {f['bytes']} | {f['bytes_vs_f32']:.1%} | {f['bytes_vs_dense_f32']:.1%} | "
                      f"{f['top1_agreement']:.2%} | "
                      f"{f['val_ppl']:.4g} | {f['ppl_change']:+.3%} | {f['max_abs_logit_diff']:.3g} |"
                      for mode, f in m["modes"].items()]
        lines += ["", "| model | C runtime tokens/s | PyTorch eager tokens/s | ratio |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['runtime_tokens_per_s']:.0f} | {m['torch_tokens_per_s']:.0f} | "
                  f"{m['runtime_vs_torch']:.2f} |" for name, m in result["compile"]["models"].items()]
        lines.append("")
    return "\n".join(lines)


def _update_readme(block: str) -> None:
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return  # a README without the markers is the user's own: leave it alone
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(README, f"{head}{BEGIN}\n{block}\n{END}{tail}")


if __name__ == "__main__":
    run_alone("compare")

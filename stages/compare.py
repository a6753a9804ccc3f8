"""Stage `compare`: CLSO against the dense AdamW baseline on matched energy and FLOPs, the verdict
on document 003's hypothesis, and the only look at the test split."""

import math
from pathlib import Path

import pandas as pd
import torch

from clso import ClsoError
from clso.compare import charged_curve, clso_charges, comparison, hypothesis, methods, statement
from clso.context import setup
from clso.data import TokenData
from clso.energy import EnergyMeter
from clso.evaluate import split_loss
from clso.io import write_csv_atomic, write_json_atomic, write_text_atomic
from clso.params import load_params
from clso.plots import comparison_png
from stages.common import PARAMS_OPTION, read_json, run_alone, stage
from stages.final_models import final_models

METRICS = Path("metrics/compare.json")
REPORT = Path("metrics/report.md")
CHARGED_CURVE = Path("plots/compare_clso.csv")
# the search's own loss (the best on its train-split fitness batch), not val: said in the name
CHARGED_FIELDS = ("generation", "best_fitness_loss", "energy_wh", "energy_method", "flops", "wall_s")
README = Path("README.md")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
EVAL_BATCH = 16


def _curve(path) -> list[dict]:
    try:
        return pd.read_csv(path).astype(object).to_dict("records")  # Python numbers, as JSON wants
    except FileNotFoundError:
        raise ClsoError(f"{path}: not found; run `dvc repro` so the earlier stages write it") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise ClsoError(f"{path}: not a readable curve ({type(e).__name__}); re-create it with `dvc repro -f`") from None


@stage("compare", sections=("base", "model"))
def compare(params: Path = PARAMS_OPTION) -> None:
    """Read the metrics and curves of library, surrogate, evolve and baseline; score both final
    models on the test split; write metrics/compare.json, metrics/report.md, CLSO's fully charged
    curve plots/compare_clso.csv, the comparison plots and the README's block of latest numbers."""
    p = load_params(params)
    device = setup(p.base)
    with EnergyMeter(device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts) as meter:
        library, surrogate, evolve = read_json("metrics/library.json"), read_json("metrics/surrogate.json"), read_json("metrics/evolve.json")
        base_metrics, base_curve, search_curve = read_json("metrics/baseline.json"), _curve("plots/baseline.csv"), _curve("plots/evolve.csv")
        data = TokenData.open("data/prepared")
        clso_model, baseline_model = final_models(p, data.vocab_size, device)
        test = data.tokens("test")
        with torch.no_grad():
            clso_test = split_loss(clso_model, test, p.model.block_size, EVAL_BATCH, device)
            base_test = split_loss(lambda x: baseline_model(input_ids=x).logits, test, p.model.block_size, EVAL_BATCH, device)
    charges = clso_charges(library, surrogate, evolve, base_metrics)
    bound = evolve.get("frozen_head_bound")
    clso = {
        "mode": evolve["mode"], "val_loss": evolve["val_loss"], "val_ppl": evolve["val_ppl"],
        "test_loss": clso_test, "test_ppl": math.exp(clso_test),
        **{k: charges[k] for k in ("energy_wh", "method", "flops", "wall_s")},
        "energy_wh_by_part": charges["energy_wh_by_part"],
        "true_evaluations": evolve["true_evaluations"] + surrogate["genomes"],
        "surrogate_predictions": evolve["surrogate_predictions"],
        **({"frozen_head_bound_val_loss": bound["val_loss"], "frozen_head_bound_val_ppl": bound["val_ppl"]}
           if bound else {}),
    }
    baseline = {
        "val_loss": base_metrics["final_val_loss"], "val_ppl": base_metrics["final_val_ppl"],
        "test_loss": base_test, "test_ppl": math.exp(base_test), "energy_wh": base_metrics["energy_wh"],
        "method": base_metrics["method"], "flops": base_metrics["flops"], "wall_s": base_metrics["wall_s"],
        "steps": base_metrics["steps"], "eval_energy_wh": base_metrics["eval_energy_wh"],
    }
    result = comparison(clso, baseline, base_curve)
    result["cost"] = meter.reading.as_metrics()  # of this stage: charged to neither side
    write_json_atomic(METRICS, result)
    # figures other stages' metrics already hold are quoted in the report, not copied into compare.json
    others = {"library_sanity": library["sanity_check"], "compile": read_json("metrics/compile.json"),
              "compiled_files": read_json("build/report.json"), "evolve": evolve, "baseline": base_metrics}
    clso_curve = charged_curve(search_curve, charges)
    write_csv_atomic(CHARGED_CURVE, CHARGED_FIELDS, [{**r, "best_fitness_loss": r["best_loss"]} for r in clso_curve])
    title = f"CLSO ({clso['mode']}) vs AdamW, val loss"
    comparison_png(base_curve, clso_curve, clso, "energy_wh", f"energy (Wh, {methods(clso['method'], baseline['method'])})",
                   "plots/compare_energy.png", title)
    comparison_png(base_curve, clso_curve, clso, "flops", "FLOPs", "plots/compare_flops.png", title)
    write_text_atomic(REPORT, report(result, others, search_curve))
    _update_readme(summary(result, others))
    print(f"compare: {statement(result['verdict'])}")


def _fmt(x, digits=4):
    if x is None:
        return "never"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def summary(result: dict, others: dict) -> str:
    """The README block: compare.json's figures and those it quotes from library, compile and evolve."""
    c, b, m, v = result["clso"], result["baseline"], result["matched"], result["verdict"]
    rows = [("val perplexity", c["val_ppl"], b["val_ppl"]), ("test perplexity", c["test_ppl"], b["test_ppl"]),
            ("energy (Wh)", c["energy_wh"], b["energy_wh"]), ("FLOPs", c["flops"], b["flops"]),
            ("wall (s)", c["wall_s"], b["wall_s"])]
    lines = [f"| | CLSO ({c['mode']}) | AdamW baseline |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(x)} | {_fmt(y)} |" for name, x, y in rows]
    parts = ", ".join(f"{name.replace('_', ' ')} {_fmt(wh)}" for name, wh in c["energy_wh_by_part"].items())
    lines += ["", f"Energy method: CLSO `{c['method']}`, baseline `{b['method']}`; CLSO is charged every part it "
              f"spent (Wh: {parts}). At CLSO's energy the baseline's "
              f"val perplexity was {_fmt(m['baseline_val_ppl_at_clso_energy'])} ({m['at_clso_energy']}); the baseline "
              f"reached CLSO's val perplexity after {_fmt(m['baseline_energy_wh_to_reach_clso'])} Wh "
              f"(step {_fmt(m['baseline_step_to_reach_clso'])}).", "",
              f"**Hypothesis** ({hypothesis()}; decided on the val split, test reported): **{statement(v)}**."]
    if "frozen_head_bound_val_ppl" in c:
        lines += ["", f"Frozen-head bound (pure mode, metrics/evolve.json): with the LM head and final LayerNorm at "
                  f"their initialisation, no body of any kind — even one that knew each target — gets the val "
                  f"perplexity below {_fmt(c['frozen_head_bound_val_ppl'])} ({v['bound_ppl_ratio']:.3f}× the "
                  f"baseline's)."]
    if "library_sanity" in others:
        s = others["library_sanity"]
        lines += ["", f"Library sanity check (protocol step 1, metrics/library.json: against the trained baseline's matrices): the best "
                  f"library matrix, with its best gain, leaves on average {s['mean_best_rel_error_with_gain']:.0%} "
                  f"relative Frobenius error (worst {s['worst_best_rel_error_with_gain']:.0%}); the protocol calls a "
                  f"library above {s['protocol_max_error']:.0%} too weak: **{'passes' if s['passes_protocol'] else 'fails'}**."]
    if "compile" in others:
        lines += ["", _compile_line(others["compile"])]
    return "\n".join(lines)


def _compile_line(c: dict) -> str:
    clso, base = c["models"]["clso"], c["models"]["baseline"]
    m8, b8, exact = clso["modes"]["mixed8"], base["modes"]["mixed8"], clso["exactness"]
    missed = [k for k, v in c["met"].items() if not v]
    return (f"Compiled to `.crystal` (metrics/compile.json): CLSO `mixed8` {m8['bytes'] / 1e6:.2f} MB "
            f"({m8['bytes_vs_f32']:.0%} of its own `f32` file, target ≤ {c['targets']['clso_mixed8_bytes_vs_f32_max']:.0%}; "
            f"{m8['bytes_vs_dense_f32']:.0%} of the dense `f32` file of the same architecture; its f32 embeddings "
            f"are {exact['embedding_share_of_bytes']:.0%} of it, and {exact['exact_layers']} of its "
            f"{exact['crystalline_layers']} crystalline layers are stored exactly, with "
            f"{exact['float_matrix_values_outside_embeddings']:,} float library values quantized), baseline `mixed8` "
            f"{b8['bytes'] / 1e6:.2f} MB ({b8['bytes_vs_f32']:.0%}); `mixed8` top-1 agreement with the float model "
            f"{m8['top1_agreement']:.2%} (CLSO) and {b8['top1_agreement']:.2%} (baseline), perplexity change "
            f"{m8['ppl_change']:+.3%} and {b8['ppl_change']:+.3%}; the C runtime generates "
            f"{clso['runtime_bench']['ratio']:.1f}× (CLSO) and {base['runtime_bench']['ratio']:.1f}× (baseline) the "
            f"tokens/s of PyTorch eager. Targets missed: {', '.join(missed) or 'none'}.")


def report(result: dict, others: dict, search_curve: list[dict]) -> str:
    evolve = others["evolve"]
    lines = ["# CLSO against the dense AdamW baseline", "",
             "Generated by `dvc repro compare` from this run's metrics; do not edit.", "", summary(result, others), "",
             "## Matched comparison", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["matched"].items()]
    lines += ["", "## CLSO search, per generation (fitness loss on the train-split fitness batch)", "",
              "| gen | best loss | mean loss | std loss | true evals | predictions | energy (Wh) | wall (s) |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {int(r['generation'])} | {r['best_loss']:.4f} | {r['mean_loss']:.4f} | {r['std_loss']:.4f} | "
              f"{int(r['true_evaluations'])} | {int(r['surrogate_predictions'])} | {r['energy_wh']:.4f} | "
              f"{r['wall_s']:.1f} |" for r in search_curve]
    lines += ["", f"Search stopped: {evolve['stopped']}; surrogate predictions replaced "
              f"{evolve['evaluations_saved_share']:.0%} of its evaluations. Energy and FLOPs above are the search's "
              f"alone; plots/compare_clso.csv adds what was spent before it.", "",
              "## Costs charged to neither side", "", "| what | energy (Wh) | method | wall (s) |", "|---|---|---|---|",
              _cost_row("evolve: writing checkpoints", evolve["checkpoint"]),
              _cost_row("evolve: final val scoring and the frozen-head bound", evolve["final_evaluation"]),
              _cost_row("baseline: periodic validation (its curve)", {"energy_wh": result["baseline"]["eval_energy_wh"],
                                                                    "method": result["baseline"]["method"]}),
              _cost_row("baseline: final val scoring", others["baseline"]["final_evaluation"]),
              _cost_row("compile: every file, its checks and benchmarks", others["compile"]["cost"]),
              _cost_row("compare: loading both models and scoring the test split", result["cost"]), ""]
    if "compiled_files" in others:
        files = others["compiled_files"]["models"]
        lines += ["## Compiled files (build/report.json, from `dvc repro compile`)", "",
                  "| model | mode | bytes | vs its f32 | vs dense f32 | exact layers | top-1 agreement | val ppl | "
                  "ppl change | max logit diff |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in files.items():
            lines += [f"| {name} | {mode} | {f['bytes']} | {f['bytes_vs_f32']:.1%} | {f['bytes_vs_dense_f32']:.1%} | "
                      f"{_exact_layers(f['exactness'])} | "
                      f"{f['top1_agreement']:.2%} | {f['val_ppl']:.4g} | {f['ppl_change']:+.3%} | "
                      f"{f['max_abs_logit_diff']:.3g} |" for mode, f in m["modes"].items()]
        lines += ["", "| model | C runtime tokens/s | PyTorch eager tokens/s | ratio |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['runtime_bench']['runtime_tokens_per_s']:.0f} | "
                  f"{m['runtime_bench']['torch_tokens_per_s']:.0f} | {m['runtime_bench']['ratio']:.2f} |"
                  for name, m in files.items()]
        lines.append("")
    return "\n".join(lines)


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

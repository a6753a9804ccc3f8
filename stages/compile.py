"""Stage `compile`: the evolved CLSO model, the dense baseline and the neuron-field LM as .crystal
files in every mode, the C runtime built beside them, and what quantization and the runtime cost or gain."""

from pathlib import Path

import numpy as np
import torch

from clso.context import setup
from clso.data.tokenizer import load_tokenizer
from clso.data.tokens import TokenData
from clso.energy import EnergyMeter
from clso.export.compile import (
    RUNTIME_LOGIT_TOLERANCE,
    bench_runtime,
    build_runtime,
    check_runtime_logits,
    journal_claims,
    quantization_reports,
    run_runtime,
    runtime_logits,
)
from clso.export.format import MODES
from clso.export.reader import read_crystal
from clso.export.reference import CrystalModel
from clso.export.writer import build_crystal_with_report, crystalline_spec, dense_spec, export_tokenizer, field_spec
from clso.field.model import FieldLM
from clso.headline import best_mode
from clso.io import atomic_dir, write_json_atomic
from clso.model.baseline import load_baseline
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library
from clso.params import load_params
from clso.progress import progress_bar
from clso.record import Record
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import BUILD, COMPILE_REPORT, LIBRARY, PREPARED, Contestant, detail, metrics, searched

CHECK_TOKENS = 64  # val tokens on which the C runtime's logits are compared with the Python reader's
# mixed8 must keep the float model's next-token distributions: a mean KL(float ‖ file) of a thousandth of a
# nat per token costs about 0.1 % perplexity; top-1 agreement is reported beside it, but is no target (a
# near-uniform model's argmax flips at any rounding)
TARGETS = {"mixed8_mean_kl_max": 0.001, "mixed8_ppl_change_max": 0.01, "clso_mixed8_bytes_vs_f32_max": 0.35,
           "runtime_vs_torch_tokens_per_s_min": 3.0}
# what metrics/detail/compile.json keeps of each model's mixed8 file and runtime benchmark (the rest is in build/)
SUMMARY = ("bytes", "bytes_vs_f32", "bytes_vs_dense_f32", "top1_agreement", "mean_kl", "val_ppl", "ppl_change",
           "max_abs_logit_diff")
BENCH_SUMMARY = ("ratio", "runtime_tokens_per_s", "torch_tokens_per_s")


def headline(grid) -> Contestant:
    """CLSO's search that compare's verdict names: the best mode over seeds, at the first seed."""
    runs = [{"mode": c.mode, "val_loss": Record.load(c.record).val_loss}
            for c in (Contestant("evolve", mode, seed) for mode in grid.evolve for seed in grid.seeds)]
    return searched("evolve", best_mode(runs), grid)


@stage("compile", sections=("base", "model", "grid", "compile"))
def compile_(params: Path = PARAMS_OPTION) -> None:
    """Compile CLSO's headline model (its best mode by mean val loss over grid.seeds, at the first seed,
    as compare's verdict names it), the baseline and the
    neuron-field LM (models/field) to build/*.crystal in every mode (f32, int16, int8, mixed16, mixed8)
    and build the C runtime build/crystal with compile.cc; score every file against its float PyTorch
    model on the val split, check the runtime's logits against the Python reader's (the stage fails
    beyond a tolerance), benchmark GPT-2 generation against PyTorch eager, test the crystal journal's
    quantization claims on the neuron-field LM; write build/report.json (every file's figures, the
    benchmarks, the samples), metrics/compile.json (each GPT-2 model's mixed8 KL and size) and
    metrics/detail/compile.json (the mixed8 figures, the targets, the journal's claims)."""
    p = load_params(params)
    c = p.compile
    setup(p.base, cpu_only=True)  # the files are scored and run on the CPU, whatever base.device says
    clso_run = headline(p.grid)
    with EnergyMeter(**p.base.meter_options("cpu")) as meter:
        data = TokenData.open(PREPARED)
        tokenizer = export_tokenizer(load_tokenizer(PREPARED / "tokenizer.json"))
        specs = _specs(p, data, clso_run)
        keep = np.unique(np.asarray(data.tokens("train"))) if c.prune_vocab else None
        val = np.asarray(data.tokens("val"))
        val = val[:c.eval_tokens + 1] if c.eval_tokens else val
        models = {}
        with atomic_dir(BUILD) as out, progress_bar() as bar:
            task = bar.add_task("compile", total=len(specs) * len(MODES) + len(specs), info="building the runtime")
            runtime = build_runtime(out / "crystal", c.cc, c.cflags)
            for name, (spec, float_logits) in specs.items():
                models[name] = _compile_model(name, spec, float_logits, out, runtime, tokenizer, keep, val, p,
                                              bar, task)
            dense_f32 = models["baseline"]["modes"]["f32"]["bytes"]  # CLSO's architecture, every matrix dense f32
            for name in ("clso", "baseline"):  # not the field's: another architecture
                for f in models[name]["modes"].values():
                    f["bytes_vs_dense_f32"] = f["bytes"] / dense_f32
            vocab_rows = int(len(keep)) if keep is not None else data.vocab_size
            write_json_atomic(out / COMPILE_REPORT.name, {"clso": clso_run.name, "prune_vocab": c.prune_vocab,
                                             "vocab_rows": vocab_rows, "runtime_logit_tolerance": RUNTIME_LOGIT_TOLERANCE,
                                             "models": models})
    result = {"clso": clso_run.name, "eval_tokens": len(val) - 1, **_figures(models),
              "cost": meter.reading.as_metrics()}  # charged to no one
    write_json_atomic(metrics("compile"), {name: {"mixed8_mean_kl": m["modes"]["mixed8"]["mean_kl"],
                                                  "mixed8_bytes": m["modes"]["mixed8"]["bytes"]}
                                           for name, m in result["models"].items() if name != "field"})
    write_json_atomic(detail("compile"), result)
    for name, m in result["models"].items():
        m8 = m["modes"]["mixed8"]
        print(f"compile: {name} mixed8 {m8['bytes']:,} bytes, mean KL {m8['mean_kl']:.2g} nats, perplexity "
              f"{m8['ppl_change']:+.3%}" + (f", runtime {m['runtime_bench']['ratio']:.1f}× PyTorch" if "runtime_bench" in m else ""))
    print(f"compile: targets missed: {', '.join(k for k, ok in result['met'].items() if not ok) or 'none'}; "
          f"{result['cost']['energy_wh']:.4f} Wh ({result['cost']['method']}); see {detail('compile')}")


def _specs(p, data: TokenData, clso_run: Contestant) -> dict:
    """Each model to compile: what the writer needs of it, and its float logits to score the files against."""
    library = Library.load(LIBRARY)
    clso_model = CrystallineGPT2.load(clso_run.model_dir, library, seed=p.base.seed, device="cpu")
    dense_config = ModelConfig.from_params(p.model, data.vocab_size, layer_gains=False)
    baseline = load_baseline(Contestant("baseline").model_dir, dense_config, seed=p.base.seed, device="cpu")
    field = FieldLM.load(Contestant("field").model_dir, "cpu")
    stored = Library.stored(LIBRARY)  # packed as generated; a loaded Library holds floats
    return {"clso": (crystalline_spec(clso_model, stored, clso_model.library.manifest), clso_model),
            "baseline": (dense_spec(baseline, dense_config), lambda x: baseline(input_ids=x).logits),
            "field": (field_spec(field), field)}


def _figures(models: dict) -> dict:
    """What metrics/detail/compile.json keeps: each model's mixed8 file and benchmark, the targets, how
    the files measure up to them, and the crystal journal's quantization claims on the field LM's files."""
    clso_m8, base_m8 = models["clso"]["modes"]["mixed8"], models["baseline"]["modes"]["mixed8"]
    measured = {
        "mixed8_mean_kl": max(clso_m8["mean_kl"], base_m8["mean_kl"]),
        "mixed8_top1_agreement": min(clso_m8["top1_agreement"], base_m8["top1_agreement"]),  # context, not a target
        "mixed8_ppl_change": max(abs(clso_m8["ppl_change"]), abs(base_m8["ppl_change"])),
        "clso_mixed8_bytes_vs_f32": clso_m8["bytes_vs_f32"],
        "clso_mixed8_bytes_vs_dense_f32": clso_m8["bytes_vs_dense_f32"],  # context, not a target
        "runtime_vs_torch_tokens_per_s": min(m["runtime_bench"]["ratio"] for m in models.values() if "runtime_bench" in m),
    }
    met = {
        "mixed8_mean_kl": measured["mixed8_mean_kl"] <= TARGETS["mixed8_mean_kl_max"],
        "mixed8_ppl_change": measured["mixed8_ppl_change"] <= TARGETS["mixed8_ppl_change_max"],
        "clso_mixed8_bytes_vs_f32": measured["clso_mixed8_bytes_vs_f32"] <= TARGETS["clso_mixed8_bytes_vs_f32_max"],
        "runtime_vs_torch_tokens_per_s": measured["runtime_vs_torch_tokens_per_s"]
        >= TARGETS["runtime_vs_torch_tokens_per_s_min"],
    }
    summary = {name: {"modes": {"mixed8": {k: m["modes"]["mixed8"][k] for k in SUMMARY if k in m["modes"]["mixed8"]}},
                      **({"runtime_bench": {k: m["runtime_bench"][k] for k in BENCH_SUMMARY}} if "runtime_bench" in m
                         else {})}
               for name, m in models.items()}
    summary["field"]["journal"] = journal_claims(models["field"]["modes"], TARGETS["mixed8_mean_kl_max"],
                                                 TARGETS["mixed8_ppl_change_max"])
    summary["clso"]["exactness"] = clso_m8["exactness"]
    return {"models": summary, "targets": TARGETS, "measured": measured, "met": met}


def _compile_model(name, spec, float_logits, out: Path, runtime: Path, tokenizer, keep, val, p, bar,
                   task) -> dict:
    """One model in every mode: written, read back, its runtime logits checked against the Python
    reader's, scored against the float model; then the runtime benchmark and a sample of mixed8."""
    c = p.compile
    ids = val[:min(CHECK_TOKENS, p.model.block_size)]
    ids = ids[np.isin(ids, keep)] if keep is not None else ids
    files, crystals = {}, {}
    for mode in MODES:
        bar.update(task, info=f"{name} {mode}: write, read back, check the runtime")
        blob, report = build_crystal_with_report(spec, mode, tokenizer, keep)
        path = out / f"{name}-{mode}.crystal"
        path.write_bytes(blob)
        crystals[mode] = crystal = read_crystal(blob)
        with torch.no_grad():
            python_logits = CrystalModel(crystal)(torch.from_numpy(ids[None].astype(np.int64)))[0].numpy()
        diff = check_runtime_logits(f"build/{path.name}", runtime_logits(runtime, path, ids), python_logits)
        files[mode] = {"file": f"build/{path.name}", "bytes": len(blob), "runtime_vs_python_max_abs_logit_diff": diff,
                       **report}
    bar.update(task, info=f"{name}: every mode against the float model on val")
    for mode, report in quantization_reports(float_logits, crystals, val, p.model.block_size).items():
        files[mode].update(report, bytes_vs_f32=files[mode]["bytes"] / files["f32"]["bytes"])
        bar.advance(task)
    mixed8 = out / f"{name}-mixed8.crystal"
    result = {"modes": files}
    if spec.fields is None:  # the benchmark's PyTorch side is transformers' GPT-2 with its KV cache
        bar.update(task, info=f"{name}: runtime benchmark")
        result["runtime_bench"] = bench_runtime(runtime, mixed8, new_tokens=c.bench_tokens, repeats=c.bench_repeats,
                                                seed=p.base.seed)
        result["runtime_bench"]["file"] = f"build/{mixed8.name}"
    sample = run_runtime(runtime, "generate", mixed8, "-p", c.sample_prompt, "-n", c.sample_tokens,
                         "-s", p.base.seed).stdout.decode(errors="replace")
    bar.advance(task)
    return {**result, "sample_mixed8": sample.rstrip("\n")}


if __name__ == "__main__":
    run_alone("compile")

"""Stage `compile`: the evolved CLSO model and the dense baseline as .crystal files in every mode,
the C runtime built beside them, and what quantization and the runtime cost or gain."""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from clso.compile import bench_runtime, build_runtime, quantization_reports, run_runtime, runtime_logits
from clso.crystal import MODES, CrystalModel, build_crystal, crystalline_spec, dense_spec, export_tokenizer, read_crystal
from clso.data import TokenData
from clso.io import atomic_dir, write_json_atomic
from clso.model import ModelConfig
from clso.params import load_params
from clso.progress import progress_bar
from clso.runtime import setup
from clso.tokenizer import load_tokenizer
from stages.common import PARAMS_OPTION, final_models, run_alone, stage

BUILD = Path("build")
METRICS = Path("metrics/compile.json")
CHECK_TOKENS = 64  # val tokens on which the C runtime's logits are compared with the Python reader's
TARGETS = {"mixed8_top1_agreement_min": 0.99, "mixed8_ppl_change_max": 0.01, "clso_mixed8_bytes_vs_f32_max": 0.35,
           "runtime_vs_torch_tokens_per_s_min": 3.0}


@stage("compile", sections=("base", "model", "compile"))
def compile_(params: Path = PARAMS_OPTION) -> None:
    """Compile the evolved CLSO model and the baseline to build/*.crystal in every mode (f32, int16,
    int8, mixed16, mixed8) and build the C runtime build/crystal with compile.cc; score every file
    against its float PyTorch model on the val split, check the runtime's logits against the Python
    reader's, benchmark generation against PyTorch eager; write metrics/compile.json."""
    p = load_params(params)
    c = p.compile
    setup(p.base)
    data = TokenData.open("data/prepared")
    tokenizer = export_tokenizer(load_tokenizer("data/prepared/tokenizer.json"))
    clso_model, baseline_model = final_models(p, data.vocab_size, "cpu")
    stored = load_file("models/library/library.safetensors")  # packed as generated; Library holds floats
    specs = {"clso": (crystalline_spec(clso_model, stored, clso_model.library.manifest), clso_model),
             "baseline": (dense_spec(baseline_model, ModelConfig.from_params(p.model, data.vocab_size, layer_gains=False)),
                          lambda x: baseline_model(input_ids=x).logits)}
    keep = np.unique(np.asarray(data.tokens("train"))) if c.prune_vocab else None
    val = np.asarray(data.tokens("val"))
    val = val[:c.eval_tokens + 1] if c.eval_tokens else val
    block = p.model.block_size
    models = {}
    with atomic_dir(BUILD) as out, progress_bar() as bar:
        task = bar.add_task("compile", total=len(specs) * len(MODES) + len(specs), info="building the runtime")
        runtime = build_runtime(out / "crystal", c.cc, c.cflags)
        for name, (spec, float_logits) in specs.items():
            files, crystals = {}, {}
            for mode in MODES:
                bar.update(task, info=f"{name} {mode}: write, read back, check the runtime")
                blob = build_crystal(spec, mode, tokenizer, keep)
                path = out / f"{name}-{mode}.crystal"
                path.write_bytes(blob)
                crystals[mode] = crystal = read_crystal(blob)
                ids = val[:min(CHECK_TOKENS, block)]
                ids = ids[np.isin(ids, keep)] if keep is not None else ids
                with torch.no_grad():
                    python_logits = CrystalModel(crystal)(torch.from_numpy(ids[None].astype(np.int64)))[0].numpy()
                c_logits = runtime_logits(runtime, path, ids)
                finite = np.isfinite(python_logits)
                files[mode] = {"file": f"build/{path.name}", "bytes": len(blob),
                               "runtime_vs_python_max_abs_logit_diff": float(np.abs(c_logits[finite] - python_logits[finite]).max())}
            bar.update(task, info=f"{name}: every mode against the float model on val")
            for mode, report in quantization_reports(float_logits, crystals, val, block).items():
                files[mode].update(report)
                bar.advance(task)
            for mode in MODES:
                files[mode]["bytes_vs_f32"] = files[mode]["bytes"] / files["f32"]["bytes"]
            bar.update(task, info=f"{name}: runtime benchmark")
            bench = bench_runtime(runtime, out / f"{name}-mixed8.crystal", new_tokens=c.bench_tokens,
                                  repeats=c.bench_repeats, seed=p.base.seed)
            bench["file"] = f"build/{name}-mixed8.crystal"
            sample = run_runtime(runtime, "generate", out / f"{name}-mixed8.crystal", "-p", c.sample_prompt,
                                 "-n", c.sample_tokens, "-s", p.base.seed).stdout.decode(errors="replace")
            models[name] = {"modes": files, "runtime_bench": bench, "sample_mixed8": sample.rstrip("\n")}
            bar.advance(task)
    dense_f32 = models["baseline"]["modes"]["f32"]["bytes"]  # the same architecture, every matrix dense float32
    for m in models.values():
        for f in m["modes"].values():
            f["bytes_vs_dense_f32"] = f["bytes"] / dense_f32
    clso_m8, base_m8 = models["clso"]["modes"]["mixed8"], models["baseline"]["modes"]["mixed8"]
    checks = {
        "mixed8_top1_agreement": min(clso_m8["top1_agreement"], base_m8["top1_agreement"]),
        "mixed8_ppl_change": max(abs(clso_m8["ppl_change"]), abs(base_m8["ppl_change"])),
        "clso_mixed8_bytes_vs_f32": clso_m8["bytes_vs_f32"],
        "clso_mixed8_bytes_vs_dense_f32": clso_m8["bytes_vs_dense_f32"],  # context, not a target
        "runtime_vs_torch_tokens_per_s": min(m["runtime_bench"]["ratio"] for m in models.values()),
    }
    met = {
        "mixed8_top1_agreement": checks["mixed8_top1_agreement"] >= TARGETS["mixed8_top1_agreement_min"],
        "mixed8_ppl_change": checks["mixed8_ppl_change"] <= TARGETS["mixed8_ppl_change_max"],
        "clso_mixed8_bytes_vs_f32": checks["clso_mixed8_bytes_vs_f32"] <= TARGETS["clso_mixed8_bytes_vs_f32_max"],
        "runtime_vs_torch_tokens_per_s": checks["runtime_vs_torch_tokens_per_s"] >= TARGETS["runtime_vs_torch_tokens_per_s_min"],
    }
    write_json_atomic(METRICS, {"prune_vocab": c.prune_vocab, "vocab_rows": int(len(keep)) if keep is not None else data.vocab_size,
                                "models": models, "targets": TARGETS, "measured": checks, "met": met})
    for name, m in models.items():
        m8 = m["modes"]["mixed8"]
        print(f"compile: {name} mixed8 {m8['bytes'] / 1e6:.2f} MB ({m8['bytes_vs_f32']:.0%} of f32), top-1 "
              f"agreement {m8['top1_agreement']:.2%}, ppl {m8['float_val_ppl']:.1f} → {m8['val_ppl']:.1f}; runtime "
              f"{m['runtime_bench']['runtime_tokens_per_s']:.0f} tokens/s = {m['runtime_bench']['ratio']:.1f}× PyTorch")
    print(f"compile: targets met: {', '.join(k for k, v in met.items() if v) or 'none'}; "
          f"missed: {', '.join(k for k, v in met.items() if not v) or 'none'}")


if __name__ == "__main__":
    run_alone("compile")

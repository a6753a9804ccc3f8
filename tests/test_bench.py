import json
import subprocess
import sys

import pytest

from clso.bench import bench_eval, bench_train


def test_bench_eval_reports_both_populations_agreement_and_precisions():
    result = bench_eval(n_embd=16, n_layer=1, n_head=2, population=8, batch_size=2, block_size=8,
                        library_size=12, vocab_size=64, warmup_generations=2, repeats=1)
    for part in ("distinct_random", "ga_generation"):
        r = result[part]
        assert r["genomes"] == 8 and r["ratio"] > 0 and r["max_rel_loss_diff"] <= 1e-5 and r["spearman"] > 0.99
        assert r["flops_per_genome_factored"] < r["flops_per_genome_dense"]
    b = result["ga_generation"]
    assert b["already_evaluated"] + b["evaluated_by_fast_path"] == b["distinct_children"] <= 8
    c = result["precision_bf16_vs_fp32"]
    assert c["genomes"] == 8 and c["bf16"]["genomes_per_s"] > 0 and c["fp32"]["tflops"] > 0
    assert 0 < c["max_abs_loss_diff"] and c["spearman"] > 0.9


def test_bench_train_times_each_setting_against_the_reference():
    result = bench_train(n_embd=16, n_layer=1, n_head=2, block_size=8, batch_size=4, vocab_size=32,
                         micro_batch_size=2, steps=2, warmup_steps=1, repeats=2)
    settings = result["settings"]
    assert list(settings) == ["fp32-eager", "fp32-sdpa-gelu_new", "fp32-sdpa", "bf16-sdpa"]
    assert result["reference"] == "fp32-eager" and settings["fp32-sdpa-gelu_new"]["activation"] == "gelu_new"
    # the pipeline's fused GELU without a cache, against transformers' default GPT-2, side by side
    assert settings["fp32-sdpa"]["speedup_vs_gelu_new"] > 0 and settings["fp32-sdpa-gelu_new"]["speedup_vs_gelu_new"] == 1.0
    assert settings["fp32-eager"]["speedup_vs_reference"] == 1.0 and settings["fp32-eager"]["energy_vs_reference"] == 1.0
    for s in settings.values():
        assert s["ms_per_step"] > 0 and len(s["ms_per_step_runs"]) == 2 and s["energy_method"] in ("estimate", "rapl")
        assert s["tokens_per_s"] == pytest.approx(4 * 8 / s["ms_per_step"] * 1e3, rel=1e-3)
        assert s["mfu"] is None and s["joules_per_step"] > 0
    with pytest.raises(ValueError, match="unknown setting"):
        bench_train(settings=("fp16",))


def test_bench_cli_prints_json(stage_env):
    run = subprocess.run([sys.executable, "-m", "cli", "bench", "eval", "--n-embd", "16", "--n-layer", "1",
                          "--n-head", "2", "--population", "4", "--batch-size", "1", "--block-size", "8",
                          "--library-size", "8", "--vocab-size", "32", "--warmup-generations", "1",
                          "--repeats", "1"], env=stage_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["benchmark"] == "eval" and out["config"]["n_embd"] == 16 and out["config"]["population"] == 4
    assert out["config"]["library_size"] == 8 and out["precision"] == "fp32"  # auto on a CPU


def test_bench_train_cli_takes_a_preset_and_rejects_unknown_settings(stage_env):
    run = subprocess.run([sys.executable, "-m", "cli", "bench", "train", "--preset", "protocol",
                          "--settings", "fp32-eager,fp16"], env=stage_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "'fp16' is unknown" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "cli", "bench", "train", "--preset", "gpt3"],
                         env=stage_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "--preset gpt3: unknown; valid: default, protocol" in run.stderr


def test_bench_eval_rejects_in_process_settings_for_workers(stage_env):
    for args, message in ((["--workers", "-1"], "--workers -1: must be 0"),
                          (["--workers", "2", "--threads", "2"], "with --workers each actor uses one thread")):
        run = subprocess.run([sys.executable, "-m", "cli", "bench", "eval", *args], env=stage_env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr


def test_presets_keep_the_fitness_batch_apart_from_the_baselines():
    from cli.bench import _shapes

    assert (_shapes("default")["eval_batch_size"], _shapes("default")["train_batch_size"]) == (8, 16)
    protocol = _shapes("protocol", n_layer=2)
    assert (protocol["n_embd"], protocol["n_layer"], protocol["block_size"], protocol["population"]) == (768, 2, 512, 256)


def test_bench_es_times_both_ways_on_the_same_members_and_they_agree():
    from clso.bench import bench_es

    r = bench_es(n_embd=16, n_layer=1, n_head=2, block_size=8, vocab_size=40, batch_size=2, pairs=3, rank=2,
                 repeats=2)
    assert r["members"] == 6 and len(r["formed_s"]) == len(r["low_rank_s"]) == 2
    assert r["formed_members_per_s"] > 0 and r["low_rank_members_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["low_rank_members_per_s"] / r["formed_members_per_s"], rel=0.01)
    assert r["max_abs_loss_diff"] < 1e-4 and r["spearman"] > 0.99  # the same members, both ways

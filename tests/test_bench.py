import json
import subprocess
import sys

from clso.bench import bench_eval


def test_bench_eval_reports_both_populations_and_agreement():
    result = bench_eval(n_embd=16, n_layer=1, n_head=2, population=8, batch_size=2, block_size=8,
                        library_size=12, vocab_size=64, warmup_generations=2, repeats=1)
    for part in ("distinct_random", "ga_generation"):
        r = result[part]
        assert r["genomes"] == 8 and r["ratio"] > 0 and r["max_rel_loss_diff"] <= 1e-5
        assert r["flops_per_genome_factored"] < r["flops_per_genome_dense"]
    b = result["ga_generation"]
    assert b["already_evaluated"] + b["evaluated_by_fast_path"] == b["distinct_children"] <= 8


def test_bench_cli_prints_json(stage_env):
    run = subprocess.run([sys.executable, "-m", "stages.cli", "bench", "eval", "--n-embd", "16", "--n-layer", "1",
                          "--n-head", "2", "--population", "4", "--batch-size", "1", "--block-size", "8",
                          "--library-size", "8", "--vocab-size", "32", "--warmup-generations", "1",
                          "--repeats", "1"], env=stage_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["benchmark"] == "eval"

"""scripts/gpu-check.sh on a CPU: it stops with one line, and its summary reads the benchmarks' real
output and pytest's JUnit file."""

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from clso.bench import bench_eval, bench_train
from tests.conftest import REPO

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_cuda" name="test_a" time="1.0"/>
<testcase classname="tests.test_cuda" name="test_b" time="0.0"><skipped type="pytest.skip" message="needs ray">
tests/test_cuda.py:1: needs ray</skipped></testcase>
<testcase classname="tests.test_cuda" name="test_c" time="2.0">
<failure message="assert 0.98 &gt;= 0.99&#10;more">trace</failure></testcase>
</testsuite></testsuites>"""


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benches():
    """The two benchmarks' JSON at toy shapes, as `clso bench` prints it."""
    evaluation = bench_eval(n_embd=16, n_layer=1, n_head=2, population=8, batch_size=2, block_size=8, library_size=12,
                            vocab_size=64, warmup_generations=1, repeats=1)
    training = bench_train(n_embd=16, n_layer=1, n_head=2, block_size=8, batch_size=4, vocab_size=32, steps=2,
                           warmup_steps=1, repeats=1, settings=("fp32-eager", "fp32-sdpa"))
    return {"eval": {"preset": "default", **evaluation}, "train": {"preset": "default", **training}}


def write_parts(folder, benches, junit=JUNIT):
    folder.mkdir()
    for name, result in benches.items():
        (folder / f"bench-{name}.json").write_text(json.dumps(result))
    (folder / "tests.xml").write_text(junit)
    (folder / "seconds.txt").write_text("bench_eval 12\ntests 30\n")
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_the_script_without_a_gpu_stops_with_one_line(tmp_path):
    run = subprocess.run(["bash", str(REPO / "scripts/gpu-check.sh"), str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1].startswith("gpu-check: no CUDA GPU visible to torch")
    assert "Traceback" not in run.stderr and list(tmp_path.iterdir()) == []


def test_the_summary_counts_the_tests_and_picks_the_benchmarks_figures(gpu_check, benches, tmp_path):
    out = gpu_check.summary(write_parts(tmp_path / "parts", benches))
    assert {k: out["tests"][k] for k in ("passed", "failed", "errors", "skipped")} == \
        {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert out["tests"]["skipped_why"] == {"test_b": "needs ray"}
    assert out["tests"]["failures"] == {"test_c": "assert 0.98 >= 0.99"}
    a = benches["eval"]["distinct_random"]
    assert out["eval"]["genomes_per_s"] == a["fast_genomes_per_s"] and out["eval"]["tflops"] == a["fast_tflops"]
    assert out["eval"]["bf16_vs_fp32_spearman"] == benches["eval"]["precision_bf16_vs_fp32"]["spearman"]
    eager = out["train"]["settings"]["fp32-eager"]
    assert eager["ms_per_step"] > 0 and eager["joules_per_step"] > 0 and eager["mfu"] is None  # no peak for a CPU
    assert out["wall_s"] == {"bench_eval": 12, "tests": 30} and out["absent"] == []
    # not the protocol preset: no acceptance figure is met or missed
    assert all(f["met"] is None for f in out["acceptance"].values()) and not out["passed"]


def test_the_check_passes_only_with_the_tests_passing_and_every_figure_met(gpu_check, benches, tmp_path):
    protocol = copy.deepcopy(benches)
    for result in protocol.values():
        result["preset"] = "protocol"
    protocol["eval"]["distinct_random"]["fast_genomes_per_s"] = 200.0
    protocol["eval"]["precision_bf16_vs_fp32"]["spearman"] = 0.995
    pipeline = {**protocol["train"]["settings"]["fp32-sdpa"], "speedup_vs_reference": 6.0}
    protocol["train"]["settings"][gpu_check.PIPELINE_SETTING] = pipeline
    passing = JUNIT.split("<testcase classname=\"tests.test_cuda\" name=\"test_c\"")[0] + "</testsuite></testsuites>"
    out = gpu_check.summary(write_parts(tmp_path / "passing", protocol, passing))
    assert all(f["met"] for f in out["acceptance"].values()) and out["passed"]
    assert not gpu_check.summary(write_parts(tmp_path / "failing", protocol))["passed"]  # test_c failed
    protocol["train"]["settings"][gpu_check.PIPELINE_SETTING]["speedup_vs_reference"] = 4.0
    slow = gpu_check.summary(write_parts(tmp_path / "slow", protocol, passing))
    assert slow["acceptance"]["train_speedup_vs_fp32_eager"]["met"] is False and not slow["passed"]
    (tmp_path / "slow" / "bench-eval.json").write_text("{truncated")
    cut = gpu_check.summary(tmp_path / "slow")
    assert cut["absent"] == ["bench eval"] and cut["eval"] is None and not cut["passed"]


def test_preflight_names_what_is_missing_and_how_to_carry_it(gpu_check, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.OPTIONAL, "no_such_module_here", ("no-such-package", "the test of nothing"))
    gpu_check.preflight()
    err = capsys.readouterr().err
    assert "gpu-check: no_such_module_here is missing: the test of nothing" in err
    version = f"--python-version {sys.version_info.major}.{sys.version_info.minor}"
    assert f"pip download --dest wheels --only-binary=:all: {version}" in err and " no-such-package\n" in err
    assert "pip install --no-index --find-links wheels --target .pydeps no-such-package" in err


def test_the_benchmarks_and_the_cuda_tests_import_no_package_a_gpu_machine_may_lack(gpu_check, stage_env):
    """What the check runs imports the optional packages only where it uses them, so that a machine
    without them still benchmarks and skips only the tests that need them."""
    optional = sorted({*gpu_check.OPTIONAL, "datasets"} - {"pynvml"})  # torch.cuda imports pynvml where present
    code = f"import sys, cli, tests.test_cuda; print(' '.join(m for m in {optional!r} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=stage_env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""

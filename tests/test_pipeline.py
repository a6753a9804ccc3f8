"""The whole DVC pipeline, end to end, on tiny params in a scratch copy of the repository."""

import csv
import io
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import BIN, REPO, copy_checkout


def sh(args, cwd, env, timeout=900):
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(args)} failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout + run.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Tracked and untracked-but-not-ignored files of this checkout, committed in a new git repo,
    with the tiny params. The tests below run in order on it, as a user would."""
    dest = copy_checkout(tmp_path_factory.mktemp("pipeline") / "repo")
    shutil.copy(REPO / "tests/params_tiny.yaml", dest / "params.yaml")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    sh(["git", "init", "-q"], dest, env)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "tiny"], dest, env)
    return dest


def test_dvc_repro_runs_every_stage_then_nothing(repo, stage_env):
    env = stage_env
    out = sh(["dvc", "repro"], repo, env)
    stages = sh(["dvc", "stage", "list", "--name-only"], repo, env).split()
    assert "prepare" in stages
    for stage in stages:
        assert f"Running stage '{stage}'" in out
    assert (repo / "data/prepared/train.bin").stat().st_size > 0
    metrics = json.loads((repo / "metrics/prepare.json").read_text())
    assert metrics["vocab_size"] == 512 and metrics["documents"] == {"train": 30, "val": 4, "test": 4}

    again = sh(["dvc", "repro"], repo, env)
    assert "Running stage" not in again and "up to date" in again


def test_compile_leaves_every_file_a_working_runtime_and_its_figures_in_compare(repo, stage_env):
    files = sorted(p.name for p in (repo / "build").glob("*.crystal"))
    assert files == sorted(f"{m}-{mode}.crystal" for m in ("clso", "baseline")
                           for mode in ("f32", "int16", "int8", "mixed16", "mixed8"))
    metrics = json.loads((repo / "metrics/compile.json").read_text())
    details = json.loads((repo / "build/report.json").read_text())
    for model in ("clso", "baseline"):
        for mode, f in details["models"][model]["modes"].items():
            assert f["bytes"] == (repo / f["file"]).stat().st_size
            assert f["runtime_vs_python_max_abs_logit_diff"] <= details["runtime_logit_tolerance"], (model, mode)
        assert metrics["models"][model]["modes"]["mixed8"]["bytes"] == details["models"][model]["modes"]["mixed8"]["bytes"]
        assert metrics["models"][model]["runtime_bench"]["runtime_tokens_per_s"] > 0
    assert set(metrics["met"]) < set(metrics["measured"])  # plus bytes against the dense f32 file, for context
    exact = metrics["models"]["clso"]["exactness"]
    readme = (repo / "README.md").read_text()
    assert "Compiled to `.crystal`" in readme
    assert f"{exact['exact_layers']} of its {exact['crystalline_layers']} crystalline layers" in readme
    # the README's generation command
    run = subprocess.run(["build/crystal", "generate", "build/baseline-mixed8.crystal", "-p", "ROMEO:", "-n", "20",
                          "-s", "1"], cwd=repo, env=stage_env, capture_output=True, timeout=60)
    # raw bytes: a byte-level BPE may sample half of a UTF-8 character
    assert run.returncode == 0 and run.stdout.startswith(b"ROMEO:") and len(run.stdout) > len("ROMEO:") + 5


def test_exp_run_with_a_new_vocab_reruns_prepare_and_its_dependants_only(repo, stage_env):
    out = sh(["dvc", "exp", "run", "-S", "prepare.vocab_size=300"], repo, stage_env)
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran[0] == "Running stage 'prepare':"
    assert json.loads((repo / "metrics/prepare.json").read_text())["vocab_size"] == 300
    rows = list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], repo, stage_env))))
    assert {r["prepare.vocab_size"] for r in rows} >= {"300", "512"}  # the experiment and its baseline


def test_exp_run_on_the_search_shows_in_exp_show_and_metrics_diff(repo, stage_env):
    out = sh(["dvc", "exp", "run", "-S", "evolve.population=6"], repo, stage_env)
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'evolve':", "Running stage 'compile':", "Running stage 'compare':"]
    rows = list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], repo, stage_env))))
    assert "6" in {r["evolve.population"] for r in rows}
    diff = json.loads(sh(["dvc", "metrics", "diff", "--json"], repo, stage_env))
    assert "metrics/evolve.json" in diff and "metrics/compare.json" in diff
    assert_verdict_follows_the_metrics(repo)


def assert_verdict_follows_the_metrics(repo):
    """The verdict is recomputed here from the stages' own metrics files, not taken from compare."""
    from clso.compare import ENERGY_SHARE, PPL_TOLERANCE

    m = {name: json.loads((repo / f"metrics/{name}.json").read_text())
         for name in ("library", "surrogate", "evolve", "baseline", "compare")}
    charged = (m["library"]["energy_wh"] + m["surrogate"]["evaluation"]["energy_wh"]
               + m["surrogate"]["training"]["energy_wh"] + m["evolve"]["energy_wh"])
    ppl_ratio = m["evolve"]["val_ppl"] / m["baseline"]["final_val_ppl"]
    energy_ratio = charged / m["baseline"]["energy_wh"]
    holds = ppl_ratio <= 1 + PPL_TOLERANCE and energy_ratio <= ENERGY_SHARE
    v = m["compare"]["verdict"]
    assert v["holds"] == holds
    assert v["ppl_ratio"] == pytest.approx(ppl_ratio, abs=1e-4) and v["energy_ratio"] == pytest.approx(energy_ratio, abs=1e-4)
    report = (repo / "metrics/report.md").read_text()
    assert f"**{'HOLDS' if holds else 'DOES NOT HOLD'}: CLSO's val perplexity is {ppl_ratio:.3f}×" in report


def test_dvc_plots_draw_clso_fully_charged(repo, stage_env):
    """The curves `dvc plots show` draws for CLSO end at the cost the verdict charges, not at the search's."""
    import yaml

    compare = json.loads((repo / "metrics/compare.json").read_text())
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    for plot in declared:
        (name, spec), = plot.items()
        clso_files = [f for f in spec["y"] if f != "plots/baseline.csv"]
        assert clso_files, name
        for f in clso_files:
            last = list(csv.DictReader(io.StringIO((repo / f).read_text())))[-1]
            assert float(last[spec["x"]]) == pytest.approx(compare["clso"][spec["x"]], rel=1e-6), (name, f)
    assert compare["clso"]["energy_wh"] > json.loads((repo / "metrics/evolve.json").read_text())["energy_wh"]

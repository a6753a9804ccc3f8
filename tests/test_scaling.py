"""The size sweep (clso scaling): its plan, its rows, its fitted trend, and the whole loop through DVC's
queue on two tiny sizes."""

import csv
import json
import math
import subprocess
import time

import pytest
import yaml

from cli.sizes import PlanError, Size, applied, differs, fit_trend, model_size, parse_plan, section, size_row, \
    trend_statement
from tests.conftest import REPO
from tests.test_pipeline import committed_copy, sh

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def plan(**changes):
    return {"rule": "budgets fixed", "sizes": [{"n_layer": 2, "n_embd": 128, "n_head": 4}], **changes}


def test_the_committed_plan_is_valid_and_names_each_experiment_by_its_size():
    p = parse_plan(yaml.safe_load((REPO / "scaling.yaml").read_text(encoding="utf-8")), PARAMS)
    assert [s.name for s in p.sizes][0] == "size-2x128" and len(p.sizes) >= 4
    assert (p.sizes[-1].n_layer, p.sizes[-1].n_embd) == (4, 256)  # the largest default size
    assert "model.n_embd=256" in p.sizes[-1].assignments() and "grid.seeds=[1337]" in p.sizes[-1].assignments()
    # every size is a valid params.yaml once its overrides are set
    from clso.params import parse_params

    for s in p.sizes:
        assert parse_params(applied(PARAMS, s.overrides)).model.n_embd == s.n_embd


@pytest.mark.parametrize("raw, says", [
    ({"sizes": []}, "expected the keys"),  # no rule
    (plan(sizes=[]), "sizes: empty"),
    (plan(colour="red"), "expected the keys"),
    (plan(sizes=[{"n_layer": 2, "n_embd": 128}]), "sizes[0]: expected n_layer"),
    (plan(sizes=[{"n_layer": 2, "n_embd": 0, "n_head": 4}]), "positive integers"),
    (plan(sizes=[{"n_layer": 2, "n_embd": 128, "n_head": 4}] * 2), "size-2x128 twice"),
    (plan(set={"grid.seeds": "many"}), "sizes[0] (size-2x128): grid.seeds"),
    (plan(set={"evolve.populaton": 8}), "populaton"),
    (plan(set={"seeds": [1]}), "section.key"),
])
def test_a_bad_plan_fails_before_anything_is_queued_with_the_entry_named(raw, says):
    with pytest.raises(PlanError, match=None) as e:
        parse_plan(raw, PARAMS)
    assert says in str(e.value)


def test_a_size_own_set_wins_over_the_plan_set_and_the_model_keys_win_over_both():
    p = parse_plan(plan(set={"evolve.generations": 5, "model.n_embd": 64},
                        sizes=[{"n_layer": 2, "n_embd": 128, "n_head": 4, "set": {"evolve.generations": 7}}]), PARAMS)
    assert p.sizes[0].overrides["evolve.generations"] == 7 and p.sizes[0].overrides["model.n_embd"] == 128


def test_differs_names_the_first_key_an_experiment_did_not_run_with():
    expected = applied(PARAMS, {"grid.seeds": [1337], "model.n_layer": 2})
    assert differs(applied(PARAMS, {"grid.seeds": [1337], "model.n_layer": 2}), expected) is None
    assert differs(applied(PARAMS, {"grid.seeds": [1337, 1], "model.n_layer": 2}), expected) == "grid.seeds=[1337, 1]"
    # params.yaml changed since the experiment ran: any key, not only the plan's
    assert differs(applied(PARAMS, {"grid.seeds": [1337], "model.n_layer": 2, "evolve.generations": 3}),
                   expected) == "evolve.generations=3"


def test_a_value_dvc_would_write_unreadably_fails_the_plan_before_anything_is_queued(tmp_path):
    from cli.scaling import _plan

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    plan_file = tmp_path / "scaling.yaml"
    # DVC writes 1e-05 without a dot, which YAML 1.1 (params.yaml's reader) takes for a string
    plan_file.write_text(yaml.safe_dump(plan(set={"evolve.hybrid_lr": 1e-05})), encoding="utf-8")
    with pytest.raises(PlanError, match=r"size-2x128: as `dvc exp run -S` writes it, evolve.hybrid_lr"):
        _plan(plan_file, params)
    plan_file.write_text(yaml.safe_dump(plan(set={"evolve.hybrid_lr": 0.0005})), encoding="utf-8")
    assert _plan(plan_file, params).sizes[0].overrides["evolve.hybrid_lr"] == 0.0005


def test_model_size_counts_the_dense_gpt2_and_four_genes_per_block():
    from clso.params import parse_params

    params = parse_params(applied(PARAMS, {"model.n_layer": 3, "model.n_embd": 160}))
    n, blocks, genes = model_size(params, vocab_size=4096)
    d, L, V, B = 160, 3, 4096, 128
    # tied embeddings: wte + wpe, per block 2 layer norms, attention (3d + d outputs) and the MLP (4d, d)
    assert blocks == L * (12 * d * d + 13 * d) and n == V * d + B * d + blocks + 2 * d
    assert genes == 4 * L


def test_size_row_takes_the_headline_bound_contrasts_and_every_search_from_the_compare_outputs():
    detail = json.loads((REPO / "metrics/detail/compare.json").read_text(encoding="utf-8"))
    compare = json.loads((REPO / "metrics/compare.json").read_text(encoding="utf-8"))
    row = size_row(Size(2, 128, 4, {}), (1000, 600, 8), "abc1234", compare, detail)
    base = detail["contestants"]["baseline"]["val_ppl"]
    assert row["ppl_ratio"] == detail["headline"]["ratio"]["val_ppl"] == compare["verdict"]["ppl_ratio"]
    assert row["test_ppl_ratio"] == detail["headline"]["ratio"]["test_ppl"]
    assert row["bound_ppl_ratio"] == pytest.approx(detail["frozen_head_bound_val_ppl"] / base)
    assert row["energy_method"] == compare["energy_method"]
    # three seeds: compare's own mean over them
    assert row["evolve@hybrid_ppl_ratio"] == pytest.approx(detail["over_seeds"]["evolve@hybrid"]["val_ppl"] / base)
    assert row["evolve@hybrid_seeds"] == 3 and row["es@pure_seeds"] == detail["over_seeds"]["es@pure"]["seeds"]
    c = detail["contrasts"]["ga_vs_random"]["hybrid"]
    assert row["ga_vs_random@hybrid"] == c["mean_diff"] and row["ga_vs_random@hybrid_conclusion"] == c["conclusion"]
    assert [row["ga_vs_random@hybrid_low"], row["ga_vs_random@hybrid_high"]] == c["interval"]
    text = section([row], {"size-4x256": "not run"}, 2, None, "budgets fixed")
    assert f"| size-2x128 | 1,000 (600) | 8 | abc1234, {row['machine']} |" in text and row["machine"]
    assert "- size-4x256: not run" in text
    assert "ga_vs_random@hybrid" in text


def test_size_row_at_one_seed_takes_the_one_run_and_no_interval():
    detail = {"contestants": {"baseline": {"val_ppl": 100.0}, "evolve@hybrid-7": {"val_ppl": 250.0},
                              "es@hybrid-7": {"val_ppl": 200.0}},
              "headline": {"clso": "evolve@hybrid-7", "ratio": {"val_ppl": 2.5, "test_ppl": 2.4, "energy_wh": 0.5,
                                                                "flops": 0.4},
                           "verdict": {"energy_criterion": "met", "holds": False}},
              "frozen_head_bound_val_ppl": None,
              "contrasts": {"ga_vs_es": {"hybrid": {"mean_diff": -0.2, "conclusion": "one_seed"}}}}
    detail["machine"] = {"cpu": "x86_64", "cores": 2, "cpu_capability": None, "gpu": "NVIDIA H100"}
    row = size_row(Size(1, 32, 2, {}), (10, 5, 4), "abc1234", {"energy_method": "estimate"}, detail)
    assert row["machine"] == "NVIDIA H100, 2 cores"
    assert row["es@hybrid_ppl_ratio"] == 2.0 and row["es@hybrid_seeds"] == 1 and row["bound_ppl_ratio"] is None
    assert row["ga_vs_es@hybrid_low"] is None and row["ga_vs_es@hybrid_conclusion"] == "one_seed"


def rows(points, mode="hybrid"):
    return [{"params": n, "ppl_ratio": r, "clso": f"evolve@{mode}-1337"} for n, r in points]


def test_the_trend_recovers_a_known_line_and_labels_its_crossing_an_extrapolation():
    a, b = 5.0, -0.25  # ratio = a + b ln n: reaches 1.05 at exp((1.05 - a) / b)
    fit = fit_trend(rows([(n, a + b * math.log(n)) for n in (1e6, 2e6, 4e6)]))
    assert fit["slope_per_ln_params"] == pytest.approx(b) and fit["r2"] == pytest.approx(1)
    assert fit["crossing_params"] == pytest.approx(math.exp((1.05 - a) / b))
    assert fit["slope_per_doubling"] == pytest.approx(b * math.log(2))
    assert fit["slope_per_doubling_interval"] == pytest.approx([b * math.log(2)] * 2)  # no residual, no width
    assert "Extrapolated, the line would reach 1.05" in trend_statement(fit)


def test_the_slope_interval_widens_with_scatter_and_a_far_crossing_is_not_given_as_a_number():
    noisy = fit_trend(rows([(1e6, 2.3), (2e6, 2.0), (4e6, 2.4), (8e6, 2.1)]))
    low, high = noisy["slope_per_doubling_interval"]
    assert noisy["slope_per_doubling"] < 0 and low < 0 < high  # it falls, but its interval contains zero
    assert noisy["crossing_params"] is None and noisy["crossing_beyond"] is None
    assert "may not move with size at all" in trend_statement(noisy) and "gives no size" in trend_statement(noisy)
    far = fit_trend(rows([(n, 2.4 - 0.001 * math.log(n)) for n in (1e6, 2e6, 4e6)]))  # 1.05 lies hundreds of decades on
    assert far["crossing_params"] is None and far["crossing_beyond"] == pytest.approx(4e10)
    assert "only beyond 4e+10 parameters" in trend_statement(far)
    two = fit_trend(rows([(1e6, 2.3), (2e6, 2.2)]))  # a slope, but no interval: no crossing, however near
    assert two["crossing_params"] is None and two["crossing_beyond"] is None
    assert "Two sizes give no interval on the slope, so no crossing is given." in trend_statement(two)
    assert "reach" not in trend_statement(two)


def test_a_crossing_inside_the_measured_sizes_is_not_called_an_extrapolation():
    fit = fit_trend(rows([(1e6, 1.31), (2e6, 1.20), (4e6, 1.11), (8e6, 1.06)]))  # the line dips under 1.05 at 8e6
    assert fit["slope_per_doubling_interval"][1] < 0 and 4e6 < fit["crossing_params"] < 8e6
    text = trend_statement(fit)
    assert "inside the measured range" in text and "Extrapolated" not in text


def test_the_statement_says_when_a_measured_size_is_within_the_bar_and_when_modes_mix():
    fit = fit_trend(rows([(1e6, 1.2)]) + rows([(4e6, 1.01)], mode="pure"))
    text = trend_statement(fit)
    assert "1 of the measured sizes are within 1.05 already" in text and "hybrid, pure" in text


def test_a_ratio_that_does_not_fall_never_crosses_and_one_size_gives_no_trend():
    rising = fit_trend(rows([(1e6, 2.0), (4e6, 2.5)]))
    assert rising["crossing_params"] is None and rising["r2"] is None  # two points: a line, no goodness of fit
    assert "does not fall with size" in trend_statement(rising)
    assert fit_trend(rows([(1e6, 2.0)])) is None


@pytest.mark.parametrize("args, says", [
    (["queue", "--size", "size-9x999"], "clso scaling queue: error: --size size-9x999: not in scaling.yaml"),
    (["table", "--plan", "nowhere.yaml"], "clso scaling table: error: nowhere.yaml: file not found"),
])
def test_the_commands_refuse_bad_input_in_one_line(args, says, stage_env):
    run = subprocess.run(["python", "-m", "cli", "scaling", *args], cwd=REPO, env=stage_env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.startswith(says) and run.stderr.count("\n") == 1, run.stderr


def test_table_outside_a_dvc_project_says_so_in_one_line(tmp_path, stage_env):
    for name in ("params.yaml", "scaling.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text(encoding="utf-8"), encoding="utf-8")
    run = subprocess.run(["python", "-m", "cli", "scaling", "table"], cwd=tmp_path,
                         env={**stage_env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.startswith("clso scaling table: error: dvc: "), run.stderr
    assert run.stderr.count("\n") == 1


TINY_PLAN = """
rule: The tiny params at two widths, CLSO's search alone.
set: {grid.random: [], grid.no_surrogate: [], grid.fixed_body: [], grid.ngopt: [], grid.head_only: [], grid.es: [],
      grid.mezo: [], transfer.tasks: [debates_2016]}
sizes:
  - {n_layer: 1, n_embd: 32, n_head: 2}
  - {n_layer: 1, n_embd: 48, n_head: 2}
"""


def wait_for_the_queue(repo, env, timeout=1200) -> None:
    """Poll `dvc queue status` until no task is queued or running; every task must have succeeded."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        tasks = [line.split() for line in sh(["dvc", "queue", "status"], repo, env).splitlines()]
        states = [t[-1] for t in tasks if len(t) >= 4 and t[1].startswith("size-")]
        if not {"Queued", "Running"} & set(states):
            assert states and set(states) == {"Success"}, states
            return
        time.sleep(3)
    raise AssertionError("the queue did not finish")


def task_spans(repo) -> list[tuple[str, str]]:
    """(received, succeeded) timestamps of each experiment task, from the queue workers' own logs (a
    loaded machine can show a running task as queued in `dvc queue status`)."""
    spans = []
    for log in sorted((repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.out")):
        stamps = {}
        for line in log.read_text(encoding="utf-8").splitlines():
            if "run_exp[" in line and line.startswith("["):  # [2026-12-07 22:50:56,458: INFO/…] Task … received
                stamps.setdefault("succeeded" if " succeeded " in line else line.split()[-1], line[1:24])
        if stamps:
            spans.append((stamps["received"], stamps["succeeded"]))
    return spans


def test_queue_then_dvc_queue_start_then_table_on_two_tiny_sizes(tmp_path, stage_env):
    repo = committed_copy(tmp_path / "repo", (REPO / "tests/params_tiny.yaml").read_text(encoding="utf-8"))
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(TINY_PLAN, encoding="utf-8")
    clso = ["python", "-m", "cli", "scaling"]
    out = sh([*clso, "queue", "--plan", str(plan_file)], repo, stage_env)
    assert "queued size-1x32" in out and "queued size-1x48" in out

    early = subprocess.run([*clso, "table", "--plan", str(plan_file)], cwd=repo, env=stage_env, capture_output=True,
                           text=True)
    assert early.returncode == 1 and early.stderr.count("\n") == 1 and "size-1x48: queued" in early.stderr

    sh(["dvc", "queue", "start", "-j", "2"], repo, stage_env)
    wait_for_the_queue(repo, stage_env)
    (a_in, a_out), (b_in, b_out) = task_spans(repo)  # two workers, a task each, side by side
    assert a_in < b_out and b_in < a_out
    out = sh([*clso, "table", "--plan", str(plan_file)], repo, stage_env)
    assert "2 sizes → plots/scaling.csv" in out

    with open(repo / "plots/scaling.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["size"] for r in rows] == ["size-1x32", "size-1x48"]
    assert int(rows[0]["params"]) < int(rows[1]["params"]) and {r["genes"] for r in rows} == {"4"}
    assert rows[0]["baseline_val_ppl"] != rows[1]["baseline_val_ppl"]  # each row from its own experiment
    assert not (repo / "checkpoints").exists() and not (repo / "models").exists()  # nothing ran in the workspace
    summary = json.loads((repo / "metrics/scaling.json").read_text(encoding="utf-8"))
    assert summary["fit"]["sizes"] == 2 and summary["rule"].startswith("The tiny params")
    assert (repo / "plots/scaling.png").stat().st_size > 10_000
    assert "| size-1x48 | 54,480 (28,272) | 4 |" in (repo / "metrics/scaling.md").read_text(encoding="utf-8")

    # a clone has the table, not the experiments: a size with none here keeps its row while the params hold
    sh(["dvc", "exp", "remove", "size-1x32"], repo, stage_env)
    out = sh([*clso, "table", "--plan", str(plan_file)], repo, stage_env)
    assert "size-1x32: kept from metrics/scaling.json" in out and "2 sizes →" in out
    # code changed since the runs: both rows stay, each flagged
    init = repo / "clso/__init__.py"
    init.write_text(init.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    sh(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qam", "code"], repo, stage_env)
    out = sh([*clso, "table", "--plan", str(plan_file)], repo, stage_env)
    assert out.count("whose clso/, stages/ or dvc.yaml stages differ from HEAD's") == 2 and "2 sizes →" in out
    params = (repo / "params.yaml").read_text(encoding="utf-8")
    (repo / "params.yaml").write_text(params.replace("generations: 6", "generations: 5"), encoding="utf-8")
    stale = subprocess.run([*clso, "table", "--plan", str(plan_file)], cwd=repo, env=stage_env, capture_output=True,
                           text=True)
    assert stale.returncode == 1 and "size-1x32: not run" in stale.stderr, stale.stderr
    assert "size-1x48: ran with evolve.generations=6" in stale.stderr

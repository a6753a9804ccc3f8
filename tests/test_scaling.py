"""The size sweep (clso scaling): its plan, its rows, its fitted trend, and the whole loop through DVC's
queue on two tiny sizes."""

import csv
import json
import math
import subprocess
import time

import pytest
import yaml

from clso.scaling import PlanError, Size, applied, differs, fit_trend, model_size, parse_plan, section, size_row
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
    size = Size(2, 128, 4, {"grid.seeds": [1337], "model.n_layer": 2})
    assert differs(applied(PARAMS, size.overrides), size) is None
    assert differs(applied(PARAMS, {"grid.seeds": [1337, 1]}), size) == "grid.seeds=[1337, 1]"


def test_model_size_counts_the_dense_gpt2_and_four_genes_per_block():
    from clso.params import parse_params

    params = parse_params(applied(PARAMS, {"model.n_layer": 3, "model.n_embd": 160}))
    n, genes = model_size(params, vocab_size=4096)
    d, L, V, B = 160, 3, 4096, 128
    # tied embeddings: wte + wpe, per block 2 layer norms, attention (3d + d outputs) and the MLP (4d, d)
    assert n == V * d + B * d + L * (12 * d * d + 13 * d) + 2 * d
    assert genes == 4 * L


def test_size_row_takes_the_headline_bound_contrasts_and_every_search_from_the_compare_outputs():
    detail = json.loads((REPO / "metrics/detail/compare.json").read_text(encoding="utf-8"))
    compare = json.loads((REPO / "metrics/compare.json").read_text(encoding="utf-8"))
    row = size_row(Size(2, 128, 4, {}), 1000, 8, compare, detail)
    base = detail["contestants"]["baseline"]["val_ppl"]
    assert row["ppl_ratio"] == detail["headline"]["ratio"]["val_ppl"] == compare["verdict"]["ppl_ratio"]
    assert row["bound_ppl_ratio"] == pytest.approx(detail["frozen_head_bound_val_ppl"] / base)
    assert row["energy_method"] == compare["energy_method"]
    assert row["es@pure_ppl_ratio"] == pytest.approx(detail["over_seeds"]["es@pure"]["val_ppl"] / base)
    c = detail["contrasts"]["ga_vs_random"]["hybrid"]
    assert row["ga_vs_random@hybrid"] == c["mean_diff"] and row["ga_vs_random@hybrid_conclusion"] == c["conclusion"]
    assert [row["ga_vs_random@hybrid_low"], row["ga_vs_random@hybrid_high"]] == c["interval"]
    text = section([row], {"size-4x256": "not run"}, None, "budgets fixed")
    assert "| size-2x128 | 1,000 | 8 |" in text and "- size-4x256: not run" in text and "ga_vs_random@hybrid" in text


def rows(points):
    return [{"params": n, "ppl_ratio": r} for n, r in points]


def test_the_trend_recovers_a_known_line_and_labels_its_crossing_an_extrapolation():
    a, b = 5.0, -0.25  # ratio = a + b ln n: reaches 1.05 at exp((1.05 - a) / b)
    fit = fit_trend(rows([(n, a + b * math.log(n)) for n in (1e6, 2e6, 4e6)]))
    assert fit["slope_per_ln_params"] == pytest.approx(b) and fit["r2"] == pytest.approx(1)
    assert fit["crossing_params"] == pytest.approx(math.exp((1.05 - a) / b)) and fit["crossing"] == "extrapolated"
    assert fit["slope_per_doubling"] == pytest.approx(b * math.log(2))


def test_a_ratio_that_does_not_fall_never_crosses_and_one_size_gives_no_trend():
    assert fit_trend(rows([(1e6, 2.0), (4e6, 2.5)]))["crossing"] == "never"
    assert fit_trend(rows([(1e6, 2.0), (4e6, 2.5)]))["r2"] is None  # two points: a line, no goodness of fit
    assert fit_trend(rows([(1e6, 2.0)])) is None


TINY_PLAN = """
rule: The tiny params at two widths, CLSO's search alone.
set: {grid.random: [], grid.no_surrogate: [], grid.fixed_body: [], grid.ngopt: [], grid.head_only: [], grid.es: [],
      grid.mezo: [], transfer.tasks: [debates_2016]}
sizes:
  - {n_layer: 1, n_embd: 32, n_head: 2}
  - {n_layer: 1, n_embd: 48, n_head: 2}
"""


def wait_for_the_queue(repo, env, timeout=1200) -> int:
    """Poll `dvc queue status` until no task is queued or running; the most tasks seen running at once."""
    most, start = 0, time.monotonic()
    while time.monotonic() - start < timeout:
        tasks = [line.split() for line in sh(["dvc", "queue", "status"], repo, env).splitlines()]
        states = [t[-1] for t in tasks if len(t) >= 4 and t[1].startswith("size-")]
        most = max(most, states.count("Running"))
        if not {"Queued", "Running"} & set(states):
            assert states and set(states) == {"Success"}, states
            return most
        time.sleep(3)
    raise AssertionError("the queue did not finish")


def test_queue_then_dvc_queue_start_then_table_on_two_tiny_sizes(tmp_path, stage_env):
    repo = committed_copy(tmp_path / "repo", (REPO / "tests/params_tiny.yaml").read_text(encoding="utf-8"))
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(TINY_PLAN, encoding="utf-8")
    clso = ["python", "-m", "cli", "scaling"]
    out = sh([*clso, "queue", "--plan", str(plan_file)], repo, stage_env)
    assert "queued size-1x32" in out and "queued size-1x48" in out

    early = subprocess.sh([*clso, "table", "--plan", str(plan_file)], cwd=repo, env=stage_env, capture_output=True,
                           text=True)
    assert early.returncode == 1 and early.stderr.count("\n") == 1 and "size-1x48: queued" in early.stderr

    sh(["dvc", "queue", "start", "-j", "2"], repo, stage_env)
    assert wait_for_the_queue(repo, stage_env) == 2  # side by side, each in its own copy of the repository
    out = sh([*clso, "table", "--plan", str(plan_file)], repo, stage_env)
    assert "2 sizes → plots/scaling.csv" in out

    with open(repo / "plots/scaling.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["size"] for r in rows] == ["size-1x32", "size-1x48"]
    assert int(rows[0]["params"]) < int(rows[1]["params"]) and {r["genes"] for r in rows} == {"4"}
    assert rows[0]["baseline_val_ppl"] != rows[1]["baseline_val_ppl"]  # each size trained its own baseline
    assert not (repo / "checkpoints").exists() and not (repo / "models").exists()  # nothing ran in the workspace
    summary = json.loads((repo / "metrics/scaling.json").read_text(encoding="utf-8"))
    assert summary["fit"]["sizes"] == 2 and summary["rule"].startswith("The tiny params")
    assert (repo / "plots/scaling.png").stat().st_size > 10_000
    assert "| size-1x48 | 54,480 | 4 |" in (repo / "metrics/scaling.md").read_text(encoding="utf-8")

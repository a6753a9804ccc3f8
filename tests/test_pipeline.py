"""The whole DVC pipeline, end to end, on tiny params in a scratch copy of the repository."""

import csv
import io
import json
import math
import os
import subprocess

import pytest

from tests.conftest import BIN, REPO, copy_checkout


def sh(args, cwd, env, timeout=900):
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(args)} failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout + run.stderr


def committed_copy(dest, params: str):
    """Tracked and untracked-but-not-ignored files of this checkout, with `params` (YAML text) as
    params.yaml, committed in a new git repo at `dest`."""
    copy_checkout(dest)
    (dest / "params.yaml").write_text(params, encoding="utf-8")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    sh(["git", "init", "-q"], dest, env)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "tiny"], dest, env)
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The tiny params in a committed copy of this checkout. The tests below run in order on it, as a
    user would."""
    return committed_copy(tmp_path_factory.mktemp("pipeline") / "repo",
                          (REPO / "tests/params_tiny.yaml").read_text(encoding="utf-8"))


def test_dvc_repro_runs_every_stage_then_nothing(repo, stage_env):
    env = stage_env
    out = sh(["dvc", "repro"], repo, env)
    stages = sh(["dvc", "stage", "list", "--name-only"], repo, env).split()
    assert "prepare" in stages
    for stage in stages:
        assert (f"Running stage '{stage}'" in out) != (stage in FROZEN), stage
    assert (repo / "data/prepared/train.bin").stat().st_size > 0
    metrics = json.loads((repo / "metrics/detail/prepare.json").read_text())
    assert metrics["vocab_size"] == 512 and metrics["documents"] == {"train": 30, "val": 4, "test": 4}

    again = sh(["dvc", "repro"], repo, env)
    assert "Running stage" not in again and "up to date" in again
    assert "DeprecationWarning" not in out and "FutureWarning" not in out  # transformers' past_key_values, say


def test_compile_leaves_every_file_a_working_runtime_and_its_figures_in_compare(repo, stage_env):
    from clso.report import fmt

    files = sorted(p.name for p in (repo / "build").glob("*.crystal"))
    assert files == sorted(f"{m}-{mode}.crystal" for m in ("clso", "baseline", "field")
                           for mode in ("f32", "int16", "int8", "mixed16", "mixed8"))
    metrics = json.loads((repo / "metrics/detail/compile.json").read_text())
    details = json.loads((repo / "build/report.json").read_text())
    for model in ("clso", "baseline"):
        for mode, f in details["models"][model]["modes"].items():
            assert f["bytes"] == (repo / f["file"]).stat().st_size
            assert f["runtime_vs_python_max_abs_logit_diff"] <= details["runtime_logit_tolerance"], (model, mode)
        assert metrics["models"][model]["modes"]["mixed8"]["bytes"] == details["models"][model]["modes"]["mixed8"]["bytes"]
        assert metrics["models"][model]["runtime_bench"]["runtime_tokens_per_s"] > 0
    assert set(metrics["met"]) < set(metrics["measured"])  # plus bytes against the dense f32 file, for context
    report = (repo / "metrics/report.md").read_text()
    assert "## Compiled to `.crystal`" in report
    mixed8 = metrics["models"]["clso"]["modes"]["mixed8"]
    assert f"| clso | {fmt(mixed8['val_ppl'])} | {mixed8['bytes']:,} |" in report  # the headline model and its ppl
    # the README's generation command
    run = subprocess.run(["build/crystal", "generate", "build/baseline-mixed8.crystal", "-p", "ROMEO:", "-n", "20",
                          "-s", "1"], cwd=repo, env=stage_env, capture_output=True, timeout=60)
    # raw bytes: a byte-level BPE may sample half of a UTF-8 character
    assert run.returncode == 0 and run.stdout.startswith(b"ROMEO:") and len(run.stdout) > len("ROMEO:") + 5


FROZEN = ("sweep", "spread")  # measured once: `dvc repro` never runs them


def test_the_frozen_spread_stage_measures_the_one_run_contestants_again(repo, stage_env):
    # the committed spread was measured at the default size: this tiny run does not repeat it
    compare = json.loads((repo / "metrics/detail/compare.json").read_text())
    assert not any(n["repeats_this_run"] for n in compare["one_run_noise"].values())
    assert "measured on other code" in (repo / "metrics/report.md").read_text()
    sh(["python", "-m", "stages.spread"], repo, stage_env)
    sh(["dvc", "commit", "-f", "spread"], repo, stage_env)
    assert ran_stages(sh(["dvc", "repro"], repo, stage_env)) == ["compare"]
    compare = json.loads((repo / "metrics/detail/compare.json").read_text())
    noise = compare["one_run_noise"]
    assert set(noise) == {"baseline", "field", "field_no_neurons"}
    assert all(n["repeats_this_run"] and n["seeds"] == 1 for n in noise.values())  # bit for bit, one seed here
    assert compare["field"]["neurons_add"]["conclusion"] == "one_seed"
    assert "measured on other code" not in (repo / "metrics/report.md").read_text()


def test_exp_run_with_a_new_vocab_reruns_prepare_and_its_dependants_only(repo, stage_env):
    out = sh(["dvc", "exp", "run", "-S", "prepare.vocab_size=300"], repo, stage_env)
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran[0] == "Running stage 'prepare':"
    assert json.loads((repo / "metrics/detail/prepare.json").read_text())["vocab_size"] == 300
    rows = list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], repo, stage_env))))
    assert {r["prepare.vocab_size"] for r in rows} >= {"300", "512"}  # the experiment and its baseline


VARIANTS = [f"{stage}@hybrid-1337" for stage in ("evolve", "random", "no_surrogate", "fixed_body", "ngopt", "head_only",
                                                 "es", "mezo")]  # the tiny grid


def ran_stages(out: str) -> list[str]:
    return [line.removeprefix("Running stage '").removesuffix("':") for line in out.splitlines()
            if line.startswith("Running stage")]


def test_exp_run_on_the_search_shows_in_exp_show_and_metrics_diff(repo, stage_env):
    out = sh(["dvc", "exp", "run", "-S", "evolve.population=6"], repo, stage_env)
    ran = ran_stages(out)
    assert ran[0] == "evolve@hybrid-1337" and sorted(ran) == sorted([*VARIANTS, "compile", "transfer", "compare"]), ran
    rows = list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], repo, stage_env))))
    assert "6" in {r["evolve.population"] for r in rows}
    diff = json.loads(sh(["dvc", "metrics", "diff", "--json"], repo, stage_env))
    assert {f"contestants.{v.split('-')[0]}.val_ppl" for v in VARIANTS} <= set(diff["metrics/compare.json"])
    assert_verdict_follows_the_records(repo)


def test_exp_run_with_another_seed_runs_only_the_new_variants_and_compare(repo, stage_env):
    out = sh(["dvc", "exp", "run", "-S", "grid.seeds=[1337,7]", "-S", "grid.arena_seeds=[1337,7]"], repo, stage_env)
    new = [v.replace("-1337", "-7") for v in VARIANTS]
    # compile takes the best mode over every seed; transfer keeps the first seed's CLSO of its mode
    assert sorted(ran_stages(out)) == sorted([*new, "compile", "compare"]), ran_stages(out)
    compare = json.loads((repo / "metrics/detail/compare.json").read_text())
    assert set(compare["contestants"]) == {"baseline", "field", "field_no_neurons", *VARIANTS, *new}
    spread = compare["over_seeds"]["evolve@hybrid"]
    losses = [json.loads((repo / f"metrics/detail/contestants/evolve@hybrid-{s}.json").read_text())["val_loss"]
              for s in (1337, 7)]
    assert spread["seeds"] == 2 and spread["val_loss"] == pytest.approx(sum(losses) / 2)
    assert spread["val_loss_spread"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5)
    contrast = compare["contrasts"]["ga_vs_random"]["hybrid"]
    assert contrast["seeds"] == 2 and len(contrast["interval"]) == 2 and contrast["conclusion"] != "one_seed"
    assert "Mean ± spread" in (repo / "metrics/report.md").read_text()
    assert_verdict_follows_the_records(repo)


def assert_verdict_follows_the_records(repo):
    """The verdict and every contestant's charges are recomputed here from the stages' own records and
    detail files, not taken from compare: each control is charged like CLSO, and spent CLSO's budget."""
    from clso.compare import PPL_TOLERANCE, energy_criterion
    from clso.report import HOLDS, hypothesis

    detail = {name: json.loads((repo / f"metrics/detail/{name}.json").read_text())
              for name in ("library", "surrogate", "contestants/baseline", "compare")}
    compare, surrogate, summary = detail["compare"], detail["surrogate"], json.loads((repo / "metrics/compare.json").read_text())
    searches = {name: json.loads((repo / f"metrics/detail/contestants/{name}.json").read_text())
                for name in compare["contestants"] if "@" in name}
    baseline = detail["contestants/baseline"]
    for name, search in searches.items():
        is_clso, (own,) = name.startswith("evolve@"), search["costs"].values()  # a search's, or a trainer's
        library = "library" in search["charged_with"]  # the arena's dense trainers draw no library
        charged = library * detail["library"]["generation"]["energy_wh"] + own["energy_wh"] + is_clso * (
            surrogate["evaluation"]["energy_wh"] + surrogate["training"]["energy_wh"])
        flops = own["flops"] + is_clso * (surrogate["evaluation"]["flops"] + surrogate["training"]["flops"])
        row = compare["contestants"][name]
        assert row["energy_wh"] == pytest.approx(charged, rel=1e-9) and row["flops"] == flops, name
        assert row.get("true_evaluations") == (own["true_evaluations"] + is_clso * surrogate["genomes"]
                                               if "true_evaluations" in own else None), name
        runs = [r for n, r in compare["contestants"].items() if n.split("-")[0] == name.split("-")[0]]
        assert summary["contestants"][name.split("-")[0]]["val_ppl"] == pytest.approx(sum(r["val_ppl"] for r in runs) / len(runs))
        ratio = compare["against_baseline"][name]["val_ppl"]
        assert ratio == pytest.approx(search["val_ppl"] / baseline["val_ppl"], abs=1e-4)
        clso_run = compare["contestants"][f"evolve@{name.split('@')[1]}"]
        if name.startswith(("random@", "ngopt@")):  # as many true evaluations as CLSO, pretraining included
            assert row["true_evaluations"] == clso_run["true_evaluations"], name
        clso_search = searches[f"evolve@{name.split('@')[1]}"]
        if name.startswith("no_surrogate@"):  # CLSO's search FLOPs spent, Adam's aside (the last generation may cross them)
            mine = search["costs"]["search"]["flops"] - search["details"]["adam_flops"]
            theirs = clso_search["costs"]["search"]["flops"] - clso_search["details"]["adam_flops"]
            budget = theirs + surrogate["evaluation"]["flops"] + surrogate["training"]["flops"]
            # a converged tiny population costs nothing: the generation cap may come first
            assert search["details"]["stopped"] == ("FLOP budget spent" if mine >= budget else "generation limit"), name
        if "@hybrid-" in name:  # every hybrid control gets CLSO's Adam phases, exactly
            assert search["details"]["adam_phases"] == clso_search["details"]["adam_phases"] > 0, name
        if name.startswith(("es@", "mezo@")):  # its budget reaches CLSO's charged FLOPs, where ga_vs_es reads es
            clso_flops = compare["contestants"][f"evolve@{name.split('@')[1]}"]["flops"]
            assert search["details"]["budget_flops"] >= clso_flops and own["flops"] >= clso_flops, name
            at = search["details"]["at_clso_flops"]
            assert (at["flops"] >= clso_flops) if name.startswith("es@") else at is None, name
        if name.startswith(("fixed_body@", "head_only@")):  # the same generations, so the same Adam phases
            mine = search["details"]
            assert mine["generations"] == clso_search["details"]["generations"]
            assert mine["adam_phases"] == mine["generations"] // 2  # the tiny params' hybrid_every
    # the headline: CLSO's mode of lowest mean val loss over seeds, at the first seed (1337)
    modes = {n.split("@")[1].split("-")[0] for n in searches if n.startswith("evolve@")}
    mean = {mode: [searches[n]["val_loss"] for n in searches if n.startswith(f"evolve@{mode}-")] for mode in modes}
    best = f"evolve@{min(modes, key=lambda mode: sum(mean[mode]) / len(mean[mode]))}-1337"
    row = compare["contestants"][best]
    b = compare["contestants"]["baseline"]
    ppl_ratio, energy_ratio, flops_ratio = row["val_ppl"] / baseline["val_ppl"], row["energy_wh"] / b["energy_wh"], \
        row["flops"] / b["flops"]
    energy = energy_criterion(energy_ratio, flops_ratio, f"{row['method']}|{b['method']}")
    holds = False if ppl_ratio > 1 + PPL_TOLERANCE or energy == "not_met" else None if energy == "undetermined" else True
    v = summary["verdict"]
    assert v["contestant"] == best and v["holds"] == holds and v["energy_criterion"] == energy
    assert v["ppl_ratio"] == pytest.approx(ppl_ratio, abs=1e-4) and v["energy_ratio"] == pytest.approx(energy_ratio, abs=1e-4)
    report = (repo / "metrics/report.md").read_text()
    assert report.split("## Verdict", 1)[1].lstrip().startswith(
        f"**The hypothesis ({hypothesis()}) {HOLDS[holds]}** for CLSO's best mode, `{best}`")
    for name in compare["contestants"]:
        assert f"| `{name}` |" in report
    if compare["forward_only"]:  # the arena's answer starts from the best pure-mode run (test_splits runs pure mode)
        best_pure = compare["forward_only"]["contestant"]
        assert f"best forward-only contestant, `{best_pure}`" in report and "**Answer.**" in report


def test_dvc_plots_draw_every_contestant_fully_charged(repo, stage_env):
    """The frontier `dvc plots show` draws: each contestant's curve ends at the cost compare charges it,
    not at its own stage's, and its final val point is its val loss there; a mode the grid does not run
    still has its plot, with the baseline and the field LM alone."""
    import yaml

    compare = json.loads((repo / "metrics/detail/compare.json").read_text())
    declared = [plot for plot in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
                if isinstance(plot, dict) and "template" in next(iter(plot.values()))]  # the frontier's, not the sweep's
    assert len(declared) == 4
    for plot in declared:
        (name, spec), = plot.items()
        (csv_path,) = spec["y"]
        assert (repo / spec["template"]).is_file()
        frontier = list(csv.DictReader(io.StringIO((repo / csv_path).read_text())))
        x = spec["x"]
        mode = csv_path.split("/")[-1].removesuffix(".csv")
        shown = {r["contestant"] for r in frontier}
        assert shown == {n for n, r in compare["contestants"].items() if r["mode"] in (None, mode)}, (name, shown)
        for contestant in shown:
            row = compare["contestants"][contestant]
            curve = [r for r in frontier if r["contestant"] == contestant and r["point"] != "final val"]
            final, = [r for r in frontier if r["contestant"] == contestant and r["point"] == "final val"]
            assert float(curve[-1][x]) == pytest.approx(row[x], rel=1e-6) == float(final[x]), (name, contestant)
            assert float(final["loss"]) == pytest.approx(math.log(row["val_ppl"]), rel=1e-9)
    # one colour per contestant, its curve and its final val point alike: both layers colour by contestant
    template = json.loads((repo / "plots/frontier.dvc-template.json").read_text())
    assert template["encoding"]["color"]["field"] == "contestant" and len(template["layer"]) == 2
    assert {layer["transform"][0]["filter"] for layer in template["layer"]} == {"datum.point != 'final val'",
                                                                                "datum.point == 'final val'"}
    show = json.loads(sh(["dvc", "plots", "show", "--json"], repo, stage_env))
    assert not show.get("errors")
    assert {"pure_loss_vs_energy", "pure_loss_vs_flops", "hybrid_loss_vs_energy", "hybrid_loss_vs_flops"} <= set(show["data"])


_WRITES: list[list[str]] = []  # the paths the running test records writes to (an audit hook cannot be removed)
_HOOKED = []


def _record_writes(event: str, args) -> None:
    if not _WRITES:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)):
            _WRITES[-1].append(os.fsdecode(args[0]))
    elif event == "os.rename":
        _WRITES[-1].append(os.fsdecode(args[1]))


def test_compare_writes_only_what_it_declares(repo, monkeypatch):
    """Run in a scratch copy, `compare` writes its declared outputs and no other file, README.md
    included: every write and rename is recorded, bytes the same or not."""
    import re
    import sys

    import yaml

    import stages.compare  # noqa: F401  (registers the command)
    from stages.common import app

    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["compare"]
    declared = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage.get("metrics", [])]
    if not _HOOKED:
        sys.addaudithook(_record_writes)
        _HOOKED.append(True)
    monkeypatch.chdir(repo)
    _WRITES.append([])
    try:
        assert app(args=["compare", "--params", "params.yaml"], standalone_mode=False) in (None, 0)
    finally:
        written = _WRITES.pop()
    inside = set()
    for path in written:
        full = (repo / path).resolve()
        if repo.resolve() not in full.parents:
            continue  # a cache outside the repository (matplotlib's fonts, say)
        rel = full.relative_to(repo.resolve())
        temp = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", rel.name)  # clso.io's temp file beside its target
        inside.add((rel.parent / temp.group(1) if temp else rel).as_posix())
    assert inside and "README.md" not in inside
    assert all(any(f == d or f.startswith(d + "/") for d in declared) for f in inside), sorted(inside)

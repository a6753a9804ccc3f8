import math
from pathlib import Path

import pytest

from clso.compare import (
    charged_curve,
    clso_charges,
    comparison,
    contrast_statement,
    contrasts,
    device_parts,
    first_reach,
    seed_summary,
    statement,
    value_at,
    verdict,
)

CURVE = [{"step": s, "energy_wh": e, "flops": f, "val_loss": v}
         for s, e, f, v in [(0, 0.0, 0, 8.0), (100, 1.0, 100, 6.0), (200, 2.0, 200, 5.0), (300, 3.0, 300, 4.5)]]


def test_value_at_interpolates_and_flags_the_ends():
    xs, ys = [0.0, 1.0, 2.0], [8.0, 6.0, 5.0]
    assert value_at(xs, ys, 0.5) == (7.0, "interpolated")
    assert value_at(xs, ys, 2.0) == (5.0, "interpolated")
    assert value_at(xs, ys, 9.0) == (5.0, "beyond the baseline's run (its last point)")
    assert value_at(xs, ys, -1.0)[1] == "at the start of the baseline's run"


def test_first_reach_interpolates_or_says_never():
    xs, ys = [0.0, 1.0, 2.0], [8.0, 6.0, 5.0]
    assert first_reach(xs, ys, 7.0) == pytest.approx(0.5)
    assert first_reach(xs, ys, 5.5) == pytest.approx(1.5)
    assert first_reach(xs, ys, 9.0) == 0.0
    assert first_reach(xs, ys, 4.0) is None


def test_verdict_both_outcomes():
    win = verdict(clso_ppl=104.0, clso_energy=0.4, baseline_ppl=100.0, baseline_energy=1.0)
    assert win["holds"] and win["ppl_within_tolerance"] and win["energy_within_share"]
    assert statement(win).startswith("HOLDS")
    too_dear = verdict(clso_ppl=100.0, clso_energy=0.6, baseline_ppl=100.0, baseline_energy=1.0)
    assert not too_dear["holds"] and too_dear["ppl_within_tolerance"] and not too_dear["energy_within_share"]
    too_poor = verdict(clso_ppl=106.0, clso_energy=0.1, baseline_ppl=100.0, baseline_energy=1.0)
    assert not too_poor["holds"] and statement(too_poor).startswith("DOES NOT HOLD")


def point(val_loss, energy, flops):
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "test_ppl": math.exp(val_loss),
            "energy_wh": energy, "flops": flops}


def test_a_cheap_poor_clso_loses_plainly():
    result = comparison(point(7.0, 0.5, 50), point(4.5, 3.0, 300), CURVE)
    m = result["matched"]
    assert m["baseline_val_ppl_at_clso_energy"] == pytest.approx(math.exp(7.0))  # 8 → 6 halfway
    assert m["baseline_energy_wh_to_reach_clso"] == pytest.approx(0.5)
    assert m["baseline_step_to_reach_clso"] == 50
    assert not result["verdict"]["holds"] and result["ratio"]["energy_wh"] == pytest.approx(0.5 / 3.0, abs=1e-4)


def test_a_cheap_good_clso_wins_plainly():
    result = comparison(point(4.5, 1.0, 100), point(4.5, 3.0, 300), CURVE)
    assert result["verdict"]["holds"]
    assert result["matched"]["baseline_val_ppl_at_clso_energy"] == pytest.approx(math.exp(6.0))


def test_a_clso_better_than_the_whole_baseline_run_is_never_reached():
    m = comparison(point(4.0, 5.0, 500), point(4.5, 3.0, 300), CURVE)["matched"]
    assert not m["baseline_reached_clso_val_ppl"] and m["baseline_energy_wh_to_reach_clso"] is None
    assert m["at_clso_energy"].startswith("beyond")


def test_readme_numbers_are_the_committed_metrics():
    import json

    from stages.compare import BEGIN, END, summary
    root = Path(__file__).resolve().parent.parent
    block = (root / "README.md").read_text().split(BEGIN, 1)[1].split(END, 1)[0].strip()
    metrics = {name: json.loads((root / f"metrics/{name}.json").read_text())
               for name in ("compare", "library", "compile", "transfer")}
    others = {"library_sanity": metrics["library"]["sanity_check"], "compile": metrics["compile"],
              "transfer": metrics["transfer"]}
    assert block == summary(metrics["compare"], others)


def test_the_statement_follows_the_constants(monkeypatch):
    import clso.compare as c

    monkeypatch.setattr(c, "PPL_TOLERANCE", 0.10)
    monkeypatch.setattr(c, "ENERGY_SHARE", 0.25)
    v = c.verdict(clso_ppl=108.0, clso_energy=0.3, baseline_ppl=100.0, baseline_energy=1.0)
    assert v["ppl_within_tolerance"] and not v["energy_within_share"]
    assert "(within 10%)" in c.statement(v) and "(more than 25%)" in c.statement(v)
    assert c.hypothesis() == "CLSO within 10% of the baseline's perplexity at <= 25% of its energy"


def test_a_frozen_head_bound_above_the_tolerance_decides_alone():
    decided = verdict(clso_ppl=3886.0, clso_energy=0.3, baseline_ppl=164.6, baseline_energy=0.6, bound_ppl=330.0)
    assert decided["decided_by_frozen_head_bound"] and decided["bound_ppl_ratio"] == pytest.approx(2.0049, abs=1e-4)
    assert "pure mode cannot pass: the frozen head bounds the val perplexity at 330" in statement(decided)
    open_question = verdict(clso_ppl=3886.0, clso_energy=0.3, baseline_ppl=164.6, baseline_energy=0.6, bound_ppl=160.0)
    assert not open_question["decided_by_frozen_head_bound"] and "cannot pass" not in statement(open_question)
    assert verdict(3886.0, 0.3, 164.6, 0.6)["bound_ppl_ratio"] is None


def stage_metrics(svd: int):
    cost = lambda wh, flops, wall, method: {"energy_wh": wh, "flops": flops, "wall_s": wall, "method": method}  # noqa: E731
    library = {"energy_wh": 0.01, "wall_s": 2.0, "method": "estimate",
               "families": {"block_diag": 3, "svd": svd}}
    surrogate = {"evaluation": cost(0.1, 1000, 10.0, "estimate"), "training": cost(0.02, 50, 3.0, "estimate")}
    evolve = {**cost(0.3, 5000, 40.0, "rapl"), "checkpoint": cost(0.05, 0, 5.0, "rapl")}
    baseline = {**cost(0.7, 90000, 120.0, "nvml+rapl"), "eval_energy_wh": 0.4}
    return library, surrogate, evolve, baseline


def test_clso_is_charged_library_surrogate_and_search_but_not_checkpoints():
    charges = clso_charges(*stage_metrics(svd=0))
    assert charges["energy_wh"] == pytest.approx(0.01 + 0.1 + 0.02 + 0.3)
    assert charges["flops"] == 1000 + 50 + 5000 and charges["wall_s"] == pytest.approx(55.0)
    assert charges["method"] == "estimate|rapl"
    assert charges["before_search"] == pytest.approx({"energy_wh": 0.13, "flops": 1050, "wall_s": 15.0})
    assert set(charges["energy_wh_by_part"]) == {"library", "surrogate_evaluation", "surrogate_training", "search"}


def test_an_svd_library_also_pays_for_the_baseline_it_was_cut_from():
    charges = clso_charges(*stage_metrics(svd=5))
    assert charges["energy_wh"] == pytest.approx(0.01 + 0.1 + 0.02 + 0.3 + 0.7)
    assert charges["flops"] == 1000 + 50 + 5000 + 90000
    assert charges["method"] == "estimate|nvml+rapl|rapl"
    assert charges["before_search"]["energy_wh"] == pytest.approx(0.83)
    assert charges["energy_wh_by_part"]["svd_reference_baseline"] == 0.7


def test_the_charged_curve_starts_where_the_search_started():
    charges = clso_charges(*stage_metrics(svd=0))
    search = [{"generation": 0, "best_loss": 8.3, "energy_wh": 0.0, "flops": 0, "wall_s": 0.0, "energy_method": "rapl"},
              {"generation": 1, "best_loss": 8.2, "energy_wh": 0.3, "flops": 5000, "wall_s": 40.0, "energy_method": "rapl"}]
    curve = charged_curve(search, charges)
    assert [r["energy_wh"] for r in curve] == pytest.approx([0.13, 0.43])
    assert [r["flops"] for r in curve] == [1050, 6050] and curve[-1]["best_loss"] == 8.2
    assert curve[-1]["energy_wh"] == pytest.approx(charges["energy_wh"])  # the curve ends at the verdict's cost


def test_a_control_is_charged_its_library_and_search_but_no_surrogate():
    library, _, search, baseline = stage_metrics(svd=0)
    charges = clso_charges(library, None, search, baseline)
    assert charges["energy_wh"] == pytest.approx(0.01 + 0.3) and charges["flops"] == 5000
    assert set(charges["energy_wh_by_part"]) == {"library", "search"}
    assert charges["before_search"] == pytest.approx({"energy_wh": 0.01, "flops": 0, "wall_s": 2.0})
    # with an svd library a control pays for the trained baseline too: it searches the same library
    library["families"]["svd"] = 2
    assert clso_charges(library, None, search, baseline)["energy_wh"] == pytest.approx(0.01 + 0.3 + 0.7)


def run(stage, mode, seed, val_loss, energy=1.0, flops=100, adam_phases=0):
    return {"stage": stage, "mode": mode, "seed": seed, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "test_ppl": 1.0, "energy_wh": energy, "flops": flops, "true_evaluations": 10, "adam_phases": adam_phases}


def test_contrasts_pair_each_control_with_clso_of_its_mode_and_seed():
    runs = [run("evolve", "pure", 1, 8.0), run("evolve", "pure", 2, 7.0), run("evolve", "hybrid", 1, 6.0, adam_phases=12),
            run("random", "pure", 1, 8.5, energy=0.5), run("random", "pure", 2, 7.1, energy=1.5),
            run("fixed_body", "hybrid", 1, 5.5, flops=50, adam_phases=12), run("random", "pure", 3, 1.0)]  # seed 3: no CLSO to pair
    c = contrasts(runs)
    assert set(c) == {"ga_vs_random", "search_vs_fixed_body"} and set(c["ga_vs_random"]) == {"pure"}
    r = c["ga_vs_random"]["pure"]
    assert r["seeds"] == 2 and r["loss_difference"] == pytest.approx(0.3) and r["clso_better_in"] == 2
    assert r["loss_difference_spread"] == pytest.approx(math.sqrt(0.08))  # differences 0.5 and 0.1
    assert r["energy_share"] == pytest.approx(1.0)
    f = c["search_vs_fixed_body"]["hybrid"]
    assert f["loss_difference"] == pytest.approx(-0.5) and f["loss_difference_spread"] is None
    assert f["flops_share"] == 0.5 and f["clso_better_in"] == 0
    assert "the fixed random body is better" in contrast_statement("search_vs_fixed_body", "hybrid", f)
    assert contrast_statement("search_vs_fixed_body", "hybrid", f).endswith("after 12 Adam phases to CLSO's 12.")
    assert "(one seed)" in contrast_statement("search_vs_fixed_body", "hybrid", f)
    text = contrast_statement("ga_vs_random", "pure", r)
    assert text.startswith("Does the GA beat sampling at equal true evaluations? In pure mode, random search")
    assert "CLSO's GA is better" in text and "+0.3000" in text and "± 0.2828" in text and "2 of them" in text


def test_the_headline_is_the_best_mode_on_average_at_the_first_seed_not_the_luckiest_run():
    from clso.compare import best_clso_run

    runs = [run("evolve", "pure", 1, 6.0), run("evolve", "pure", 2, 9.0), run("evolve", "hybrid", 1, 6.5),
            run("evolve", "hybrid", 2, 6.4), run("random", "hybrid", 1, 1.0)]
    best = best_clso_run(runs, first_seed=1)
    assert (best["mode"], best["seed"]) == ("hybrid", 1)  # pure's seed 1 is the luckiest run; hybrid the better mode
    assert best_clso_run(runs[:1], first_seed=1) is runs[0]


def test_seed_summary_is_mean_and_sample_spread():
    s = seed_summary([run("evolve", "pure", 1, 8.0, energy=1.0), run("evolve", "pure", 2, 6.0, energy=3.0)])
    assert s["seeds"] == 2 and s["val_loss"] == 7.0 and s["val_loss_spread"] == pytest.approx(math.sqrt(2))
    assert s["energy_wh"] == 2.0 and seed_summary([run("evolve", "pure", 1, 8.0)])["val_loss_spread"] is None


def test_gpu_and_cpu_energy_are_charged_apart():
    library, surrogate, search, baseline = stage_metrics(svd=5)
    gpu = lambda cpu, wh: {"cpu_wh": cpu, "cpu_method": "rapl", "gpu_wh": wh, "gpu_method": "nvml"}  # noqa: E731
    surrogate["evaluation"].update(gpu(0.04, 0.06), method="nvml+rapl")
    search.update(gpu(0.1, 0.2), method="nvml+rapl")
    baseline.update(gpu(0.2, 0.5))
    charges = clso_charges(library, surrogate, search, baseline)
    parts = charges["energy_by_device"]
    # CPU-only parts (library, surrogate training) count whole on the CPU
    assert parts["gpu_wh"] == pytest.approx(0.06 + 0.2 + 0.5)
    assert parts["cpu_wh"] == pytest.approx(0.01 + 0.04 + 0.02 + 0.1 + 0.2)
    assert parts["cpu_wh"] + parts["gpu_wh"] == pytest.approx(charges["energy_wh"])
    assert parts["gpu_method"] == "nvml" and parts["cpu_method"] == "estimate|rapl"
    cpu_only = clso_charges(*stage_metrics(svd=0))["energy_by_device"]
    assert cpu_only["gpu_wh"] == 0 and cpu_only["gpu_method"] is None and cpu_only["cpu_method"] == "estimate|rapl"
    assert device_parts(baseline) == gpu(0.2, 0.5)


def test_the_field_contestant_sets_its_final_losses_per_character_beside_the_journals():
    from clso.compare import JOURNAL_FIELD, field_contestant, field_statement

    curve = [{"step": s, "neurons": 200 + s, "train_loss": (float("nan") if s == 0 else 4.0 + s / 100),
              "val_loss": None} for s in range(30)]
    metrics = {"final_val_loss": 5.0, "final_val_ppl": math.exp(5.0), "energy_wh": 2.0, "method": "estimate",
               "flops": 10.0, "wall_s": 1.0, "neurons": 229, "frozen_share": 0.5, "freeze": "soft", "parameters": 7,
               "tokens": 1000, "attention": True,
               "torch_compile": "none"}
    f = field_contestant(metrics, curve, 5.5, {"val_ppl": math.exp(4.9), "energy_wh": 4.0, "flops": 20.0,
                                               "torch_compile": "none"},
                         {"train": 0.25, "val": 0.5})
    j, c = f["journal"], f["journal"]["nats_per_char"]
    assert j["our_final_train_loss"] == pytest.approx(4.195)  # steps 10..29: 4.10 … 4.29
    assert c["our_final_train"] == pytest.approx(4.195 * 0.25) and c["our_final_val"] == pytest.approx(2.5)
    assert c["journal_causal_train"] == pytest.approx(2.39 * 338_025 / 1_115_394)
    assert j["causal_train_loss_met"] is (4.195 * 0.25 <= 2.39 * JOURNAL_FIELD["gpt2_tokens_per_char"])
    assert j["journal_causal_train_tokens"] == 60 * 2 * 338_025 and j["our_train_tokens"] == 1000
    assert f["ppl_ratio"] == pytest.approx(math.exp(0.1), abs=1e-4) and f["energy_ratio"] == 0.5
    assert f["test_ppl"] == pytest.approx(math.exp(5.5))
    met = field_contestant(metrics, curve, 5.5, {"val_ppl": 1.0, "energy_wh": 1.0, "flops": 1.0, "torch_compile": "none"},
                           {"train": 0.1, "val": 0.1})
    assert met["journal"]["causal_train_loss_met"] and met["journal"]["flat_train_loss_met"]
    assert "Ours is with attention, so the like-for-like figure is the journal's first" in field_statement(f)
    flat = field_contestant({**metrics, "attention": False}, curve, 5.5,
                            {"val_ppl": 1.0, "energy_wh": 1.0, "flops": 1.0, "torch_compile": "default"},
                            {"train": 0.1, "val": 0.1})
    assert "(stage `field`: field of 229 neurons" in field_statement(flat)
    assert "Ours is flat, so the like-for-like figure is the journal's second" in field_statement(flat)
    assert "FLOPs (the baseline torch.compiled (default), the field not)" in field_statement(flat)
    assert "torch.compiled" not in field_statement(f)


def test_the_journals_quantization_claims_follow_the_thresholds():
    from clso.compare import BROKEN_PPL_CHANGE, BROKEN_TOP1_AGREEMENT, journal_claims

    modes = {"mixed8": {"mean_kl": 5e-4, "ppl_change": 0.004},
             "int8": {"ppl_change": BROKEN_PPL_CHANGE + 0.01, "top1_agreement": 0.99},
             "int16": {"ppl_change": BROKEN_PPL_CHANGE - 0.01, "top1_agreement": BROKEN_TOP1_AGREEMENT}}
    j = journal_claims(modes, 1e-3, 0.01)
    assert j["mixed8_full_quality"] and j["int8_breaks"] and not j["int16_breaks"]
    modes["int16"]["top1_agreement"] = BROKEN_TOP1_AGREEMENT - 0.01  # the top token moved: broken
    assert journal_claims(modes, 1e-3, 0.01)["int16_breaks"]
    modes["mixed8"]["ppl_change"] = -0.02
    assert not journal_claims(modes, 1e-3, 0.01)["mixed8_full_quality"]

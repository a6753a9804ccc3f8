import math
import re

import pytest

from clso import ClsoError
from clso.compare import (
    against_baseline,
    charged,
    charged_curve,
    contrasts,
    device_parts,
    energy_criterion,
    first_reach,
    forward_only,
    headline,
    paired_interval,
    row,
    seed_summary,
    t_975,
    value_at,
    verdict,
)
from clso.headline import headline_row
from clso.record import Record
from clso.report import answer, contrast_statement, hypothesis, verdict_statement

CURVE = [{"step": s, "energy_wh": e, "flops": f, "loss": v, "wall_s": 0.0}
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


def side(ppl, energy, flops=None, method="rapl"):
    """A verdict's side; FLOPs in proportion to energy unless given."""
    return {"val_ppl": ppl, "energy_wh": energy, "flops": energy * 100 if flops is None else flops, "method": method}


BASE = side(100.0, 1.0)


def test_verdict_both_outcomes():
    win = verdict(side(104.0, 0.4), BASE)
    assert win["holds"] and win["ppl_within_tolerance"] and win["energy_criterion"] == "met"
    assert verdict_statement("evolve@pure-1", win, "rapl").startswith(f"**The hypothesis ({hypothesis()}) holds**")
    too_dear = verdict(side(100.0, 0.6), BASE)
    assert too_dear["holds"] is False and too_dear["ppl_within_tolerance"] and too_dear["energy_criterion"] == "not_met"
    too_poor = verdict(side(106.0, 0.1), BASE)
    assert too_poor["holds"] is False
    assert verdict_statement("evolve@pure-1", too_poor, "rapl").startswith(f"**The hypothesis ({hypothesis()}) does not hold**")


def test_an_estimated_energy_decides_only_where_the_flops_agree():
    assert energy_criterion(0.44, 0.40, "estimate") == "met" and energy_criterion(0.6, 0.7, "estimate") == "not_met"
    assert energy_criterion(0.534, 0.403, "estimate") == "undetermined"  # the default run's two ratios
    assert energy_criterion(0.44, 0.9, "rapl|estimate") == "undetermined"  # either side estimated
    assert energy_criterion(0.44, 0.9, "rapl") == "met" and energy_criterion(0.534, 0.403, "nvml|rapl") == "not_met"
    open_ = verdict(side(104.0, 0.44, flops=90, method="estimate"), BASE)
    assert open_["holds"] is None and open_["energy_criterion"] == "undetermined" and open_["flops_ratio"] == 0.9
    text = verdict_statement("evolve@hybrid-1", open_, "estimate")
    assert text.startswith(f"**The hypothesis ({hypothesis()}) is undetermined**") and "either side of 50%" in text
    assert sentences(text) == 2
    # a perplexity too high decides alone, whatever the energy
    assert verdict(side(300.0, 0.44, flops=90, method="estimate"), BASE)["holds"] is False


def point(name, val_loss, energy, flops, kind="clso", mode="pure", seed=1, bound=None):
    return {"name": name, "kind": kind, "mode": mode, "seed": seed, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "test_ppl": math.exp(val_loss), "energy_wh": energy, "flops": flops, "method": "rapl",
            "frozen_head_bound_val_ppl": bound}


BASELINE = point("baseline", 4.5, 3.0, 300, kind="baseline", mode=None)


def test_a_cheap_poor_clso_loses_plainly():
    result = headline(point("evolve@pure-1", 7.0, 0.5, 50), BASELINE, CURVE)
    m = result["matched"]
    assert m["baseline_val_ppl_at_clso_energy"] == pytest.approx(math.exp(7.0))  # 8 → 6 halfway
    assert m["baseline_energy_wh_to_reach_clso"] == pytest.approx(0.5)
    assert m["baseline_step_to_reach_clso"] == 50
    assert not result["verdict"]["holds"] and result["ratio"]["energy_wh"] == pytest.approx(0.5 / 3.0, abs=1e-4)


def test_a_cheap_good_clso_wins_plainly():
    result = headline(point("evolve@pure-1", 4.5, 1.0, 100), BASELINE, CURVE)
    assert result["verdict"]["holds"] and result["clso"] == "evolve@pure-1"
    assert result["matched"]["baseline_val_ppl_at_clso_energy"] == pytest.approx(math.exp(6.0))


def test_a_clso_better_than_the_whole_baseline_run_is_never_reached():
    m = headline(point("evolve@pure-1", 4.0, 5.0, 500), BASELINE, CURVE)["matched"]
    assert not m["baseline_reached_clso_val_ppl"] and m["baseline_energy_wh_to_reach_clso"] is None
    assert m["at_clso_energy"].startswith("beyond")


def test_the_statement_follows_the_constants(monkeypatch):
    import clso.compare as c
    import clso.report as r

    monkeypatch.setattr(c, "PPL_TOLERANCE", 0.10)
    monkeypatch.setattr(c, "ENERGY_SHARE", 0.25)
    monkeypatch.setattr(r, "PPL_TOLERANCE", 0.10)
    monkeypatch.setattr(r, "ENERGY_SHARE", 0.25)
    v = c.verdict(side(108.0, 0.3), BASE)
    assert v["ppl_within_tolerance"] and v["energy_criterion"] == "not_met" and v["holds"] is False
    assert hypothesis() == "CLSO within 10% of the baseline's perplexity at ≤ 25% of its energy"
    assert "(CLSO within 10% of the baseline's perplexity at ≤ 25% of its energy)" in verdict_statement("x", v, "m")


def test_a_frozen_head_bound_above_the_tolerance_decides_alone():
    baseline = side(164.6, 0.6)
    decided = verdict(side(3886.0, 0.3), baseline, bound_ppl=330.0)
    assert decided["decided_by_frozen_head_bound"] and decided["bound_ppl_ratio"] == pytest.approx(2.0049, abs=1e-4)
    text = verdict_statement("evolve@pure-1", decided, "estimate")
    assert "; pure mode cannot pass, as its frozen head allows no val perplexity below 330 (2.005× the baseline's)" in text
    assert len(re.findall(r"[.!?](?:\s|$)", text)) == 2
    open_question = verdict(side(3886.0, 0.3), baseline, bound_ppl=160.0)
    assert not open_question["decided_by_frozen_head_bound"]
    assert "cannot pass" not in verdict_statement("evolve@pure-1", open_question, "estimate")
    assert verdict(side(3886.0, 0.3), baseline)["bound_ppl_ratio"] is None


def cost(wh, flops, wall, method, **more):
    return {"energy_wh": wh, "flops": flops, "wall_s": wall, "method": method, **more}


SHARED = {"library": cost(0.01, 0, 2.0, "estimate"), "surrogate_evaluation": cost(0.1, 1000, 10.0, "estimate",
                                                                                     true_evaluations=60),
          "surrogate_training": cost(0.02, 50, 3.0, "estimate"), "baseline_training": cost(0.7, 90000, 120.0, "nvml+rapl")}
SEARCH = [{"loss": 8.3, "energy_wh": 0.0, "flops": 0, "wall_s": 0.0, "step": 0},
          {"loss": 8.2, "energy_wh": 0.3, "flops": 5000, "wall_s": 40.0, "step": 1}]


def search_record(charged_with=("library", "surrogate_evaluation", "surrogate_training"), kind="clso", name="evolve@pure-1"):
    return Record(name, kind, "CLSO", 8.0, 8.1, {"search": cost(0.3, 5000, 40.0, "rapl", true_evaluations=20)},
                  {"loss": "best fitness (train batch)", "points": SEARCH}, tuple(charged_with), "pure", 1,
                  {"adam_phases": 0}, {"checkpoints": cost(0.05, 0, 5.0, "rapl")})


def test_clso_is_charged_the_shared_costs_its_record_names_and_its_own_but_not_checkpoints():
    charges = charged(search_record(), SHARED)
    assert charges["energy_wh"] == pytest.approx(0.01 + 0.1 + 0.02 + 0.3)
    assert charges["flops"] == 1000 + 50 + 5000 and charges["wall_s"] == pytest.approx(55.0)
    assert charges["true_evaluations"] == 60 + 20  # the surrogate's pretraining genomes were true evaluations too
    assert charges["method"] == "estimate|rapl"
    assert charges["before"] == pytest.approx({"energy_wh": 0.13, "flops": 1050, "wall_s": 15.0})
    assert list(charges["energy_wh_by_part"]) == ["library", "surrogate_evaluation", "surrogate_training", "search"]


def test_an_svd_library_also_pays_for_the_baseline_it_was_cut_from():
    charges = charged(search_record(("library", "surrogate_evaluation", "surrogate_training", "baseline_training")),
                      SHARED)
    assert charges["energy_wh"] == pytest.approx(0.01 + 0.1 + 0.02 + 0.3 + 0.7)
    assert charges["flops"] == 1000 + 50 + 5000 + 90000
    record = search_record(("library", "surrogate_evaluation", "surrogate_training", "baseline_training"))
    assert record.flops_with(SHARED) == charges["flops"]  # what the arena's stages read CLSO at
    assert charges["method"] == "estimate|nvml+rapl|rapl"
    assert charges["before"]["energy_wh"] == pytest.approx(0.83)
    assert charges["energy_wh_by_part"]["baseline_training"] == 0.7


def test_the_charged_curve_starts_where_the_contestants_own_work_started():
    record = search_record()
    charges = charged(record, SHARED)
    curve = charged_curve(record, charges)
    assert [r["energy_wh"] for r in curve] == pytest.approx([0.13, 0.43])
    assert [r["flops"] for r in curve] == [1050, 6050] and curve[-1]["loss"] == 8.2
    assert curve[-1]["energy_wh"] == pytest.approx(charges["energy_wh"])  # the curve ends at the verdict's cost


def test_a_control_is_charged_its_library_and_search_but_no_surrogate():
    charges = charged(search_record(("library",), kind="control", name="random@pure-1"), SHARED)
    assert charges["energy_wh"] == pytest.approx(0.01 + 0.3) and charges["flops"] == 5000
    assert set(charges["energy_wh_by_part"]) == {"library", "search"} and charges["true_evaluations"] == 20
    assert charges["before"] == pytest.approx({"energy_wh": 0.01, "flops": 0, "wall_s": 2.0})


def test_a_record_naming_a_shared_cost_no_stage_records_is_one_clear_error():
    with pytest.raises(ClsoError, match=r"evolve@pure-1: its record is charged 'tokenizer', which no stage records"):
        charged(search_record(("library", "tokenizer")), SHARED)


def test_what_no_one_is_charged_is_summed_by_what_it_was():
    from clso.compare import uncharged

    a, b = search_record(), search_record(name="random@pure-1", kind="control")
    out = uncharged([a, b], {"compare": cost(0.001, 0, 1.0, "estimate")})
    assert out["checkpoints"]["energy_wh"] == pytest.approx(0.1) and out["checkpoints"]["count"] == 2
    assert out["checkpoints"]["method"] == "rapl" and out["compare"]["energy_wh"] == 0.001


def test_a_contestant_trained_by_gradient_is_charged_its_training_alone():
    field = Record("field", "contestant", "field", 5.0, 5.1, {"training": cost(0.5, 800, 9.0, "estimate")},
                   {"loss": "val", "points": CURVE})
    charges = charged(field, SHARED)
    assert charges["energy_wh"] == 0.5 and "true_evaluations" not in charges and charges["before"]["flops"] == 0
    r = row(field, charges)
    vs = against_baseline(r, {**BASELINE, "val_ppl": math.exp(4.0), "test_ppl": 1.0, "energy_wh": 1.0, "flops": 100})
    assert "holds" not in vs and vs["energy_wh"] == 0.5  # the hypothesis is CLSO's, not every contestant's


def run(stage, mode, seed, val_loss, energy=1.0, flops=100, adam_phases=0):
    return {"name": f"{stage}@{mode}-{seed}", "stage": stage, "kind": "clso" if stage == "evolve" else "control",
            "mode": mode, "seed": seed, "val_loss": val_loss, "val_ppl": math.exp(val_loss), "test_ppl": 1.0,
            "energy_wh": energy, "flops": flops, "true_evaluations": 10, "adam_phases": adam_phases}


def test_contrasts_pair_each_control_with_clso_of_its_mode_and_seed():
    runs = [run("evolve", "pure", 1, 8.0), run("evolve", "pure", 2, 7.0), run("evolve", "hybrid", 1, 6.0, adam_phases=12),
            run("random", "pure", 1, 8.5, energy=0.5), run("random", "pure", 2, 7.1, energy=1.5),
            run("fixed_body", "hybrid", 1, 5.5, flops=50, adam_phases=12), run("random", "pure", 3, 1.0)]  # no CLSO seed 3
    c = contrasts(runs)
    assert set(c) == {"ga_vs_random", "search_vs_fixed_body"} and set(c["ga_vs_random"]) == {"pure"}
    r = c["ga_vs_random"]["pure"]
    assert r["seeds"] == 2 and r["mean_diff"] == pytest.approx(0.3) and r["clso_better_in"] == 2
    assert r["spread"] == pytest.approx(math.sqrt(0.08))  # differences 0.5 and 0.1
    half = 12.7062 * math.sqrt(0.08) / math.sqrt(2)  # t at 1 degree of freedom
    assert r["interval"] == pytest.approx([0.3 - half, 0.3 + half]) and r["conclusion"] == "within_noise"
    assert r["energy_share"] == pytest.approx(1.0)
    f = c["search_vs_fixed_body"]["hybrid"]
    assert f["mean_diff"] == pytest.approx(-0.5) and f["spread"] is None and f["interval"] is None
    assert f["conclusion"] == "one_seed" and f["flops_share"] == 0.5 and f["clso_better_in"] == 0
    one = contrast_statement("search_vs_fixed_body", "hybrid", f)
    assert one.startswith("In hybrid mode, the fixed random body ends 0.5000 nats below CLSO's GA")
    assert "no claim is made" in one and "better" not in one
    two = contrast_statement("ga_vs_random", "pure", r)
    assert "0.3000 nats above" in two and "over 2 seeds" in two and "includes zero: within noise" in two
    assert "better" not in two


def test_the_arena_contrasts_read_es_at_clso_flops_and_name_the_side_ahead():
    runs = []
    for seed, (ga, es_end, es_at, mezo, fixed, head) in enumerate([(6.0, 5.0, 6.50, 5.9, 5.80, 6.40),
                                                                  (6.1, 5.1, 6.61, 6.0, 5.85, 6.52),
                                                                  (5.9, 4.9, 6.42, 5.8, 5.75, 6.33)], 1):
        runs += [run("evolve", "hybrid", seed, ga, adam_phases=12), run("es", "hybrid", seed, es_end, flops=400,
                                                                        adam_phases=12),
                 run("mezo", "hybrid", seed, mezo, flops=400, adam_phases=12),
                 run("fixed_body", "hybrid", seed, fixed, flops=50, adam_phases=12),
                 run("head_only", "hybrid", seed, head, flops=40, adam_phases=12)]
        runs[-4]["at_clso_flops"] = {"val_loss": es_at, "flops": 101, "step": 9}
    c = contrasts(runs)
    es = c["ga_vs_es"]["hybrid"]  # es where it had spent CLSO's FLOPs, not at its end
    assert es["mean_diff"] == pytest.approx(0.51) and es["conclusion"] == "clso_better"
    assert es["flops_share"] == pytest.approx(101 / 100) and es["energy_share"] is None
    mezo = c["es_vs_mezo"]["hybrid"]  # both at their ends: mezo less es
    assert mezo["mean_diff"] == pytest.approx(0.9) and mezo["conclusion"] == "es_better"
    body = c["body_backward"]["hybrid"]
    assert body["mean_diff"] == pytest.approx((0.6 + 0.67 + 0.58) / 3) and body["conclusion"] == "fixed_body_better"
    assert "ga_vs_random" not in c
    assert contrast_statement("ga_vs_es", "hybrid", es).endswith("excludes zero: CLSO's GA is better.")
    assert contrast_statement("es_vs_mezo", "hybrid", mezo).startswith("In hybrid mode, MeZO ends 0.9000 nats above "
                                                                       "low-rank ES")
    assert contrast_statement("es_vs_mezo", "hybrid", mezo).endswith("excludes zero: low-rank ES is better.")
    assert contrast_statement("body_backward", "hybrid", body).endswith("the fixed body's Adam is better.")
    runs[-4]["at_clso_flops"] = None  # es never scored at CLSO's FLOPs: no silent fallback to its end
    with pytest.raises(ClsoError, match="no score at CLSO's FLOPs"):
        contrasts(runs)


def pure_run(stage, seed, val_loss, energy, bound=None):
    return {**run(stage, "pure", seed, val_loss, energy=energy, flops=int(energy * 100)), "method": "estimate",
            "frozen_head_bound_val_ppl": bound}


def test_the_best_forward_only_contestant_is_the_pure_stage_best_on_average_at_its_first_seed():
    runs = [pure_run("evolve", 1, 7.0, 0.5, bound=900.0), pure_run("evolve", 2, 7.2, 0.5, bound=900.0),
            pure_run("es", 2, 6.2, 1.0), pure_run("es", 1, 6.0, 1.0),  # es: best on average; seed 1 comes first
            run("evolve", "hybrid", 1, 5.0)]  # hybrid mode is not forward-only
    f = forward_only(runs, CURVE, seeds=(1, 2))
    assert f["contestant"] == "es@pure-1" and f["seeds"] == 2 and not f["bound_applies"]
    # the baseline's curve at energy 1.0 is at loss 6.0: the same perplexity
    assert f["ppl_ratio_at_energy"] == pytest.approx(1.0) and f["at_energy"] == "interpolated"
    assert f["seed_ratios_at_energy"] == pytest.approx([1.0, math.exp(0.2)])  # seed 2 ends 0.2 nats higher
    assert forward_only(runs[:2], CURVE, seeds=(1, 2))["bound_applies"]  # a genome search: its head is frozen
    assert forward_only(runs[-1:], CURVE, seeds=(1,)) is None


def test_the_answer_follows_the_numbers():
    one_seed = {"mean_diff": -0.2, "conclusion": "one_seed"}
    result = {"forward_only": {"contestant": "es@pure-1", "seeds": 1, "seed_ratios_at_energy": [8.0, 8.0],
                               "seed_ratios_at_flops": [7.0, 7.0]},
              "contrasts": {"ga_vs_es": {"pure": {**one_seed, "mean_diff": -0.4}, "hybrid": {**one_seed, "mean_diff": 0.1}},
                            "body_backward": {"hybrid": {"mean_diff": 0.6, "conclusion": "fixed_body_better"}}}}
    text = answer(result)
    assert text.startswith("The best forward-only contestant falls short of AdamW") and "(one seed) ends at 8× AdamW's" in text
    assert "ES ends 0.400 nats below it in pure mode and ends 0.100 nats above it in hybrid mode (one seed: no claim)" in text
    assert "+0.600 nats of val loss to a fixed random body (beyond noise)" in text and sentences(text) == 1
    result["forward_only"]["seed_ratios_at_energy"] = [1.04, 1.04]
    result["contrasts"]["ga_vs_es"] = {"pure": {"mean_diff": -0.4, "conclusion": "control_better"}}
    text = answer(result)
    assert text.startswith("The best forward-only contestant comes within the tolerance") and "is ahead of it in pure mode" in text
    result["forward_only"] |= {"contestant": "mezo@pure-1337", "seeds": 3, "seed_ratios_at_energy": [8.9, 11.5],
                               "seed_ratios_at_flops": [7.8, 9.7]}
    text = answer(result)
    assert text.startswith("The best forward-only contestant falls short of AdamW at these budgets: `mezo@pure` (the best "
                           "stage by its mean over 3 seeds) ends at 8.9-11.5× AdamW's val perplexity at the same energy "
                           "over its seeds (7.8-9.7× at the same FLOPs)")
    result["forward_only"]["seed_ratios_at_energy"] = [1.0, 1.2]  # one seed within the tolerance, another not
    assert answer(result).startswith("The best forward-only contestant falls short of AdamW at some seeds, not at others")


def test_t_quantiles_match_the_table_and_approach_the_normal():
    assert t_975(1) == 12.7062 and t_975(2) == 4.3027 and t_975(30) == 2.0423
    assert t_975(31) == pytest.approx(2.0395, abs=1e-4) and t_975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t_975(10 ** 6) == pytest.approx(1.959964, abs=1e-5)


def test_a_contrast_is_called_better_only_when_its_interval_excludes_zero():
    clear = paired_interval([0.10, 0.12, 0.11])  # mean 0.11, spread 0.01: t(2)·0.01/√3 = 0.0248
    assert clear["conclusion"] == "clso_better" and clear["interval"] == pytest.approx([0.11 - 0.024842, 0.11 + 0.024842],
                                                                                       abs=1e-6)
    assert paired_interval([-0.10, -0.12, -0.11])["conclusion"] == "control_better"
    straddles = paired_interval([0.05, -0.02, 0.04])
    assert straddles["interval"][0] < 0 < straddles["interval"][1] and straddles["conclusion"] == "within_noise"
    assert paired_interval([0.3])["conclusion"] == "one_seed"
    # the words follow the conclusion: "better" only where the interval excludes zero
    shares = {"flops_share": 1.0, "energy_share": 1.0, "adam_phases": 0, "clso_adam_phases": 0}
    for diffs, better in (([0.10, 0.12, 0.11], "CLSO's GA is better"), ([-0.10, -0.12, -0.11], "random search is better"),
                          ([0.05, -0.02, 0.04], None), ([0.3], None)):
        text = contrast_statement("ga_vs_random", "hybrid", {**paired_interval(diffs), **shares})
        assert (better in text) if better else ("better" not in text), text


def sentences(text: str) -> int:
    return len(re.findall(r"[.!?](?:\s|$)", re.sub(r"\d\.\d|e\.g\.|\.crystal", "", text)))


def test_every_statement_is_at_most_two_sentences():
    from clso.report import partial_statement, transfer_statement

    c = contrasts([run("evolve", "pure", 1, 8.0), run("random", "pure", 1, 8.5),
                   run("evolve", "pure", 2, 8.0), run("random", "pure", 2, 7.5)])["ga_vs_random"]["pure"]
    one = contrasts([run("evolve", "pure", 1, 8.0), run("random", "pure", 1, 8.5)])["ga_vs_random"]["pure"]
    scores = {"test": 0.5, "test_mismatched": 0.4, "option": "head"}
    task = {"clso": scores, "baseline": scores, "clso_within_tolerance": {"test": False, "test_mismatched": True},
            "energy_ratio": 2.0, "lift": {"pretraining_finetuned": 0.1, "clso_probe": 0.0},
            "clso_partial": {"search_accepted": False, "best_fitness": 0.7, "pretrained_fitness": 0.6, "prior_fitness": 0.69}}
    texts = [contrast_statement("ga_vs_random", "pure", c), contrast_statement("ga_vs_random", "pure", one),
             transfer_statement({**task, "no_pretraining_within_tolerance": True}, 0.05),
             transfer_statement({**task, "no_pretraining_within_tolerance": False}, 0.05), partial_statement(task)]
    for v in (verdict(side(104.0, 0.4), BASE), verdict(side(3886.0, 0.3), side(164.6, 0.6), bound_ppl=330.0),
              verdict(side(104.0, 0.44, flops=90, method="estimate"), BASE)):
        texts.append(verdict_statement("evolve@pure-1", v, "rapl"))
    for text in texts:
        assert 1 <= sentences(text) <= 2, text


def test_the_headline_is_the_best_mode_on_average_at_the_first_seed_not_the_luckiest_run():
    runs = [run("evolve", "pure", 1, 6.0), run("evolve", "pure", 2, 9.0), run("evolve", "hybrid", 1, 6.5),
            run("evolve", "hybrid", 2, 6.4), run("random", "hybrid", 1, 1.0)]
    best = headline_row(runs, first_seed=1)
    assert (best["mode"], best["seed"]) == ("hybrid", 1)  # pure's seed 1 is the luckiest run; hybrid the better mode
    assert headline_row(runs[:1], first_seed=1) is runs[0]


def test_seed_summary_is_mean_and_sample_spread():
    s = seed_summary([run("evolve", "pure", 1, 8.0, energy=1.0), run("evolve", "pure", 2, 6.0, energy=3.0)])
    assert s["seeds"] == 2 and s["val_loss"] == 7.0 and s["val_loss_spread"] == pytest.approx(math.sqrt(2))
    assert s["energy_wh"] == 2.0 and seed_summary([run("evolve", "pure", 1, 8.0)])["val_loss_spread"] is None


def test_gpu_and_cpu_energy_are_charged_apart():
    gpu = lambda cpu, wh: {"cpu_wh": cpu, "cpu_method": "rapl", "gpu_wh": wh, "gpu_method": "nvml"}  # noqa: E731
    shared = {**SHARED, "surrogate_evaluation": {**SHARED["surrogate_evaluation"], **gpu(0.04, 0.06),
                                                 "method": "nvml+rapl"},
              "baseline_training": {**SHARED["baseline_training"], **gpu(0.2, 0.5)}}
    record = search_record(("library", "surrogate_evaluation", "surrogate_training", "baseline_training"))
    record.costs["search"].update(gpu(0.1, 0.2), method="nvml+rapl")
    charges = charged(record, shared)
    parts = charges["energy_by_device"]
    # CPU-only parts (library, surrogate training) count whole on the CPU
    assert parts["gpu_wh"] == pytest.approx(0.06 + 0.2 + 0.5)
    assert parts["cpu_wh"] == pytest.approx(0.01 + 0.04 + 0.02 + 0.1 + 0.2)
    assert parts["cpu_wh"] + parts["gpu_wh"] == pytest.approx(charges["energy_wh"])
    assert parts["gpu_method"] == "nvml" and parts["cpu_method"] == "estimate|rapl"
    cpu_only = charged(search_record(), SHARED)["energy_by_device"]
    assert cpu_only["gpu_wh"] == 0 and cpu_only["gpu_method"] is None and cpu_only["cpu_method"] == "estimate|rapl"
    assert device_parts(shared["baseline_training"]) == gpu(0.2, 0.5)


def test_the_field_lm_sets_its_final_losses_per_character_beside_the_journals():
    from clso.compare import JOURNAL_FIELD, field_vs_journal

    field = Record("field", "contestant", "field", 5.0, 5.5, {"training": cost(2.0, 10, 1.0, "estimate")},
                   {"loss": "val", "points": []},
                   details={"final_train_loss": 4.195, "tokens": 1000, "tokens_per_char": {"train": 0.25, "val": 0.5}})
    j = field_vs_journal(field)
    c = j["nats_per_char"]
    assert c["our_final_train"] == pytest.approx(4.195 * 0.25) and c["our_final_val"] == pytest.approx(2.5)
    assert c["journal_causal_train"] == pytest.approx(2.39 * 338_025 / 1_115_394)
    assert j["causal_train_loss_met"] is (4.195 * 0.25 <= 2.39 * JOURNAL_FIELD["gpt2_tokens_per_char"])
    assert j["journal_causal_train_tokens"] == 60 * 2 * 338_025 and j["our_train_tokens"] == 1000
    from dataclasses import replace

    met = field_vs_journal(replace(field, details={**field.details, "tokens_per_char": {"train": 0.1, "val": 0.1}}))
    assert met["causal_train_loss_met"] and met["flat_train_loss_met"]


def test_the_final_train_loss_is_the_mean_of_the_last_steps():
    from clso.field.train import TRAIN_LOSS_WINDOW, final_train_loss

    curve = [{"train_loss": None if s == 0 else 4.0 + s / 100} for s in range(30)]
    assert TRAIN_LOSS_WINDOW == 20 and final_train_loss(curve) == pytest.approx(4.195)  # steps 10..29


def test_the_journals_quantization_claims_follow_the_thresholds():
    from clso.export.compile import BROKEN_PPL_CHANGE, BROKEN_TOP1_AGREEMENT, journal_claims

    modes = {"mixed8": {"mean_kl": 5e-4, "ppl_change": 0.004},
             "int8": {"ppl_change": BROKEN_PPL_CHANGE + 0.01, "top1_agreement": 0.99},
             "int16": {"ppl_change": BROKEN_PPL_CHANGE - 0.01, "top1_agreement": BROKEN_TOP1_AGREEMENT}}
    j = journal_claims(modes, 1e-3, 0.01)
    assert j["mixed8_full_quality"] and j["int8_breaks"] and not j["int16_breaks"]
    modes["int16"]["top1_agreement"] = BROKEN_TOP1_AGREEMENT - 0.01  # the top token moved: broken
    assert journal_claims(modes, 1e-3, 0.01)["int16_breaks"]
    modes["mixed8"]["ppl_change"] = -0.02
    assert not journal_claims(modes, 1e-3, 0.01)["mixed8_full_quality"]


def spread_file(field, empty, baseline, base_seed=1):
    """metrics/detail/spread.json of stage spread: each one-run contestant's val loss by seed."""
    return {"base_seed": base_seed, "val_loss": {name: {str(seed): v for seed, v in enumerate(losses, 1)}
                                                 for name, losses in (("field", field), ("field_no_neurons", empty),
                                                                      ("baseline", baseline))}}


ONE_RUN_ROWS = {"field": point("field", 5.10, 1.0, 130, kind="contestant", mode=None),
                "field_no_neurons": point("field_no_neurons", 5.13, 0.8, 100, kind="contestant", mode=None),
                "baseline": point("baseline", 5.11, 0.5, 100, kind="baseline", mode=None)}


def test_the_field_is_paired_by_seed_over_the_spread_and_says_better_only_beyond_its_noise():
    from clso.compare import field_contrasts, one_run_noise
    from clso.report import field_statement

    measured = spread_file([5.10, 5.12, 5.11], [5.13, 5.151, 5.139], [5.11, 5.10, 5.13])
    c = field_contrasts(measured, ONE_RUN_ROWS, one_run_noise(measured, ONE_RUN_ROWS))
    neurons, baseline = c["neurons_add"], c["against_baseline"]
    assert neurons["mean_diff"] == pytest.approx(0.03) and neurons["seeds"] == 3
    assert neurons["interval"][0] > 0 and neurons["conclusion"] == "clso_better" and neurons["flops_share"] == 1.3
    assert baseline["conclusion"] == "within_noise" and baseline["interval"][0] < 0 < baseline["interval"][1]
    text = field_statement("neurons_add", neurons)
    assert text.startswith("The field LM's val loss is 0.0300 nats below the same model's without neurons, on "
                           "average over the 3 seeds of stage `spread`; this run's field LM cost 1.300× its FLOPs.")
    assert text.endswith(": the neurons help.") and sentences(text) == 2
    text = field_statement("against_baseline", baseline)
    assert "within noise" in text and "better" not in text and sentences(text) == 2
    measured["val_loss"]["baseline"]["1"] = 5.2  # the spread's run at base.seed is not this run's
    c = field_contrasts(measured, ONE_RUN_ROWS, one_run_noise(measured, ONE_RUN_ROWS))
    assert c["neurons_add"]["conclusion"] == "clso_better" and c["against_baseline"]["conclusion"] == "other_run"
    text = field_statement("against_baseline", c["against_baseline"])
    assert "no claim is made" in text and "better" not in text


def test_a_field_contrast_on_one_seed_makes_no_claim():
    from clso.compare import field_contrasts, one_run_noise
    from clso.report import field_statement

    measured = spread_file([5.10], [5.13], [5.11])
    c = field_contrasts(measured, ONE_RUN_ROWS, one_run_noise(measured, ONE_RUN_ROWS))["neurons_add"]
    assert c["conclusion"] == "one_seed" and c["interval"] is None
    text = field_statement("neurons_add", c)
    assert "No claim is made" in text and "better" not in text and sentences(text) == 2


def test_the_noise_floor_says_whether_the_spread_repeats_this_run():
    from clso import ClsoError
    from clso.compare import one_run_noise
    from clso.report import noise_section

    measured = spread_file([5.10, 5.12, 5.11], [5.13, 5.15, 5.14], [5.11, 5.10, 5.13])
    noise = one_run_noise(measured, ONE_RUN_ROWS)
    assert noise["field"]["repeats_this_run"] and noise["field_no_neurons"]["repeats_this_run"]
    assert noise["baseline"]["repeats_this_run"] and noise["baseline"]["seeds"] == 3
    assert noise["field"]["val_loss"] == pytest.approx(5.11) and noise["field"]["val_loss_spread"] == pytest.approx(0.01)
    assert "measured on other code" not in "\n".join(noise_section(noise))
    measured["val_loss"]["baseline"]["1"] = 5.1101  # another machine's kernels: the run at base.seed moved
    noise = one_run_noise(measured, ONE_RUN_ROWS)
    assert not noise["baseline"]["repeats_this_run"] and noise["field"]["repeats_this_run"]
    assert "measured on other code" in "\n".join(noise_section(noise))
    del measured["val_loss"]["field_no_neurons"]
    with pytest.raises(ClsoError, match="no val losses of 'field_no_neurons'.*python -m stages.spread"):
        one_run_noise(measured, ONE_RUN_ROWS)


def test_the_frontier_plot_draws_every_stage_at_every_seed(tmp_path):
    from clso.plots import frontier_png

    names = ["baseline"] + [f"{stage}@hybrid-{seed}" for stage in ("evolve", "random", "no_surrogate", "fixed_body",
                                                                       "ngopt", "head_only", "es", "mezo")
                            for seed in (1337, 1, 2)]  # 25 contestants: more than the palette's 18 colours
    rows = [{"contestant": n, "point": point, "loss": 6.0 - 0.1 * k, "flops": 1e9 * (k + 1)}
            for n in names for k, point in enumerate(("curve", "curve", "final val"))]
    frontier_png(rows, "flops", "FLOPs", tmp_path / "f.png", "hybrid")
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")

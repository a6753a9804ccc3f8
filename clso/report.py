"""Every sentence and table the pipeline writes: metrics/report.md and the stages' closing lines.

The computing modules (clso.compare, clso.transfer, clso.export.compile) return numbers; this module
turns them into words. Each statement is at most two sentences; a table carries parallel facts.
"""

from __future__ import annotations

from clso.compare import CONTRASTS, ENERGY_SHARE, PPL_TOLERANCE, REMEASURE

# each contrast of clso.compare.CONTRASTS: (its control, the side it is paired with, the question it answers)
QUESTIONS = {"ga_vs_random": ("random search", "CLSO's GA", "Does the GA beat sampling at equal true evaluations?"),
             "surrogate_vs_none": ("the GA without surrogate", "CLSO's GA",
                                   "Does the surrogate pay for itself at equal FLOPs?"),
             "search_vs_fixed_body": ("the fixed random body", "CLSO's GA", "What does the search add beyond Adam?"),
             "ga_vs_ngopt": ("nevergrad's NGOpt", "CLSO's GA",
                             "Does the hand-written GA beat a standard discrete optimizer at equal true evaluations?"),
             "ga_vs_es": ("low-rank ES (at CLSO's FLOPs)", "CLSO's GA",
                          "Discrete or continuous gradient-free search, at equal FLOPs?"),
             "es_vs_mezo": ("MeZO", "low-rank ES", "Population ES or two-point SPSA, at equal FLOPs?"),
             "body_backward": ("head-only Adam", "the fixed body's Adam",
                               "What does hybrid's backward pass through the body buy?")}
TRANSFER_SIDES = {"clso": "CLSO, charged both options", "clso_head": "CLSO head", "clso_partial": "CLSO partial",
                  "baseline": "baseline, fine-tuned", "baseline_head": "baseline, probe",
                  "no_pretraining": "no pretraining, probe", "no_pretraining_finetuned": "no pretraining, fine-tuned"}


def fmt(x) -> str:
    """A number as the report shows it: 4 significant digits, or — for none."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) and abs(x) >= 100_000:
        return f"{x:.3g}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(x) if not isinstance(x, str) else x for x in r) + " |" for r in rows)]


def hypothesis() -> str:
    """Document 003's hypothesis, as clso.compare's constants state it."""
    return f"CLSO within {PPL_TOLERANCE:.0%} of the baseline's perplexity at ≤ {ENERGY_SHARE:.0%} of its energy"


HOLDS = {True: "holds", False: "does not hold", None: "is undetermined"}


def verdict_statement(name: str, v: dict, methods: str) -> str:
    """The verdict on the headline run, in two sentences."""
    text = (f"**The hypothesis ({hypothesis()}) {HOLDS[v['holds']]}** for CLSO's best mode, `{name}`. Its val "
            f"perplexity is {v['ppl_ratio']:.3f}× the baseline's, at {v['energy_ratio']:.3f}× its energy (`{methods}`) "
            f"and {v['flops_ratio']:.3f}× its FLOPs")
    if v["energy_criterion"] == "undetermined":
        text += (f"; the energy criterion is undetermined, as energy is an estimate that moves with the machine's load "
                 f"and the two ratios fall on either side of {ENERGY_SHARE:.0%}")
    if v["decided_by_frozen_head_bound"]:
        text += (f"; pure mode cannot pass, as its frozen head allows no val perplexity below {v['bound_ppl']:.4g} "
                 f"({v['bound_ppl_ratio']:.3f}× the baseline's) whatever the library or the search")
    return text + "."


def readme_table(result: dict) -> list[str]:
    """The README's headline table, from metrics/detail/compare.json (tests/test_readable.py keeps the
    README to it)."""
    h = result["headline"]
    v, ratio = h["verdict"], h["ratio"]
    c, b = result["contestants"][h["clso"]], result["contestants"]["baseline"]
    method = c["method"] if c["method"] == b["method"] else f"{c['method']} / {b['method']}"
    return table(["", f"CLSO's best mode, `{h['clso']}`", "AdamW baseline", "CLSO ÷ baseline"],
                 [["val perplexity", c["val_ppl"], b["val_ppl"], v["ppl_ratio"]],
                  ["test perplexity", c["test_ppl"], b["test_ppl"], ratio["test_ppl"]],
                  [f"energy (Wh, `{method}`)", c["energy_wh"], b["energy_wh"], v["energy_ratio"]],
                  ["FLOPs", c["flops"], b["flops"], v["flops_ratio"]]])


def _energy_parts(d: dict) -> str:
    """Where a side's energy went: a GPU run still spends CPU energy, metered apart."""
    cpu = f"CPU {fmt(d['cpu_wh'])} Wh ({d['cpu_method']})"
    return cpu if d["gpu_method"] is None else f"GPU {fmt(d['gpu_wh'])} Wh ({d['gpu_method']}), {cpu}"


def headline_section(result: dict) -> list[str]:
    rows, h = result["contestants"], result["headline"]
    c, b, m = rows[h["clso"]], rows["baseline"], h["matched"]
    lines = ["## Headline", "", "CLSO's best mode (lowest mean val loss over seeds, at the first seed) against the "
             "baseline. Val decides; test is reported.", ""]
    lines += table(["", f"CLSO, `{c['name']}`", "AdamW baseline", "ratio"],
                   [["val perplexity", c["val_ppl"], b["val_ppl"], h["ratio"]["val_ppl"]],
                    ["test perplexity", c["test_ppl"], b["test_ppl"], h["ratio"]["test_ppl"]],
                    ["energy (Wh), charged", c["energy_wh"], b["energy_wh"], h["ratio"]["energy_wh"]],
                    ["energy by device", _energy_parts(c["energy_by_device"]), _energy_parts(b["energy_by_device"]),
                     None],
                    ["FLOPs", c["flops"], b["flops"], h["ratio"]["flops"]],
                    ["wall (s)", c["wall_s"], b["wall_s"], None]])
    spread = result.get("over_seeds", {}).get(f"evolve@{c['mode']}")
    if spread:
        lines += ["", f"Over its {spread['seeds']} seeds this mode's val perplexity is {fmt(spread['val_ppl'])} ± "
                  f"{fmt(spread['val_ppl_spread'])} (mean ± sample standard deviation); the table is its first seed."]
    noise = result["one_run_noise"]["baseline"]
    if noise["val_loss_spread"] is not None:
        lines += ["", f"The baseline's val loss spreads ± {noise['val_loss_spread']:.4f} nats over {noise['seeds']} "
                  f"seeds (stage `spread`{'' if noise['repeats_this_run'] else ', measured on another run'}); "
                  f"CLSO's is {c['val_loss'] - b['val_loss']:+.4f} nats from it."]
    reach = (f"{fmt(m['baseline_energy_wh_to_reach_clso'])} Wh (step {fmt(m['baseline_step_to_reach_clso'])})"
             if m["baseline_reached_clso_val_ppl"] else "never, in its whole run")
    lines += ["", *table(["the baseline's run, matched to CLSO's", "value"],
                         [["val perplexity at CLSO's energy", f"{fmt(m['baseline_val_ppl_at_clso_energy'])} "
                           f"({m['at_clso_energy']})"],
                          ["val perplexity at CLSO's FLOPs", f"{fmt(m['baseline_val_ppl_at_clso_flops'])} "
                           f"({m['at_clso_flops']})"],
                          ["energy to reach CLSO's val perplexity", reach]])]
    return lines


def contestants_section(result: dict) -> list[str]:
    lines = ["## Every contestant", "", "Each is charged everything it spent, shared costs included "
             "(metrics/detail/compare.json has them by part). The frontier plots are plots/frontier/*.png.", ""]
    rows = []
    for name, r in result["contestants"].items():
        vs = result["against_baseline"].get(name, {})
        hypothesis_text = HOLDS[vs["holds"]] if "holds" in vs else "—"
        rows.append([f"`{name}`", r["label"], r["val_ppl"], r["test_ppl"], r["energy_wh"], r["method"], r["flops"],
                     r.get("true_evaluations"), vs.get("val_ppl"), vs.get("energy_wh"), hypothesis_text])
    lines += table(["contestant", "what", "val ppl", "test ppl", "energy (Wh)", "method", "FLOPs", "true evaluations",
                    "ppl ÷ baseline", "energy ÷ baseline", "hypothesis"], rows)
    if "over_seeds" in result:
        lines += ["", "Mean ± spread (sample standard deviation) over seeds:", ""]
        lines += table(["stage@mode", "seeds", "val loss", "val ppl", "test ppl", "energy (Wh)", "FLOPs"],
                       [[f"`{name}`", s["seeds"], *(f"{fmt(s[k])} ± {fmt(s[k + '_spread'])}" for k in
                                                    ("val_loss", "val_ppl", "test_ppl", "energy_wh", "flops"))]
                        for name, s in result["over_seeds"].items()])
    return lines + ["", *noise_section(result["one_run_noise"])]


def noise_section(noise: dict) -> list[str]:
    """The noise floor of the contestants trained once, measured once by stage `spread`."""
    lines = ["The baseline and the field LMs are trained once, at base.seed. Their noise over seeds was measured "
             "once by stage `spread` (frozen: `dvc repro` does not run it):", ""]
    lines += table(["contestant", "seeds", "val loss, mean ± spread", "this run's val loss", "repeated by `spread`"],
                   [[f"`{name}`", n["seeds"], f"{fmt(n['val_loss'])} ± {fmt(n['val_loss_spread'])}", n["this_run"],
                     n["repeats_this_run"]] for name, n in noise.items()])
    if not all(n["repeats_this_run"] for n in noise.values()):
        lines += ["", "Where `spread`'s run at base.seed does not repeat this run's, it was measured on other code, "
                  f"params or machine: its spread is a guide, not this run's noise. Re-measure: `{REMEASURE}`."]
    return lines


def what_it_allows(name: str, conclusion: str) -> str:
    """A contrast's conclusion in words: which side is better, or none."""
    label, other, _ = QUESTIONS[name]
    if conclusion == "within_noise":
        return "includes zero: within noise"
    _, control, reference = next(c for c in CONTRASTS if c[0] == name)
    ahead = other if conclusion in ("clso_better", f"{reference}_better") else label
    return f"excludes zero: {ahead} is better"


def contrast_statement(name: str, mode: str, c: dict) -> str:
    """One contrast in at most two sentences: the mean difference, and what its interval allows."""
    label, other, _ = QUESTIONS[name]
    d = c["mean_diff"]
    side = "above" if d > 0 else "below" if d < 0 else "level with"
    if c["conclusion"] == "one_seed":
        return f"In {mode} mode, {label} ends {abs(d):.4f} nats {side} {other} on val loss, on one seed: no claim is made."
    low, high = c["interval"]
    return (f"In {mode} mode, {label} ends {abs(d):.4f} nats {side} {other} on val loss, the mean over {c['seeds']} "
            f"seeds. Its 95 % interval, [{low:+.4f}, {high:+.4f}], {what_it_allows(name, c['conclusion'])}.")


def contrasts_section(result: dict) -> list[str]:
    lines = ["## What each part of CLSO buys", "", "Each control is paired with CLSO's GA of its mode and seed, on its "
             "budget: random search and NGOpt get its true evaluations, the GA without surrogate its search FLOPs (with "
             "the surrogate's, without the Adam steps), the fixed body and head-only Adam its generations. ES is read "
             "where it had spent CLSO's charged FLOPs; MeZO and ES, on one budget, at their ends. In hybrid mode each "
             "side gets CLSO's Adam phases, their count and steps: the controls and NGOpt at its generations, ES and "
             "MeZO at the same shares of their budget, head-only Adam reaching the head alone. The interval is a paired "
             "t over seeds (95 %); a difference is called better only when it excludes zero.", ""]
    rows = [[question, mode, c["seeds"], f"{c['mean_diff']:+.4f}",
             "—" if c["interval"] is None else f"[{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}]",
             c["conclusion"].replace("_", " "), c["flops_share"], c["energy_share"],
             f"{fmt(c['adam_phases'])} / {fmt(c['clso_adam_phases'])}"]
            for name, (_, _, question) in QUESTIONS.items() for mode, c in result["contrasts"].get(name, {}).items()]
    lines += table(["question", "mode", "seeds", "control − other val loss (nats), mean", "95 % interval",
                    "conclusion", "FLOPs share", "energy share", "Adam phases (control / other)"], rows)
    lines += ["", *(f"- {contrast_statement(name, mode, c)}" for name in QUESTIONS
                    for mode, c in result["contrasts"].get(name, {}).items())]
    return lines


def _es_against_ga(mode: str, c: dict) -> str:
    """Continuous against discrete search in one mode, as the answer sentence puts it."""
    d = c["mean_diff"]
    if c["conclusion"] == "one_seed":
        return f"ends {abs(d):.3f} nats {'below' if d < 0 else 'above'} it in {mode} mode"
    word = {"control_better": "ahead of it", "clso_better": "behind it", "within_noise": "within noise of it"}
    return f"is {word[c['conclusion']]} in {mode} mode"


BODY_BACKWARD = {"fixed_body_better": "beyond noise", "head_only_better": "the head-only side is ahead",
                 "within_noise": "within noise", "one_seed": "one seed: no claim"}


def answer(result: dict) -> str:
    """The arena's answer to its question, in one sentence: does the best forward-only contestant fall short
    of AdamW at these budgets, is discrete search over the library a handicap beyond that, and what does
    hybrid's backward pass through the body buy."""
    f, c = result["forward_only"], result["contrasts"]
    low, high = f["seed_ratios_at_energy"]
    verdict = ("falls short of AdamW at these budgets" if low > 1 + PPL_TOLERANCE else
               "comes within the tolerance of AdamW here" if high <= 1 + PPL_TOLERANCE else
               "falls short of AdamW at some seeds, not at others")
    if f["seeds"] > 1:
        flops_low, flops_high = f["seed_ratios_at_flops"]
        ratios = (f"the best stage by its mean over {f['seeds']} seeds) ends at {low:.3g}-{high:.3g}× AdamW's val "
                  f"perplexity at the same energy over its seeds ({flops_low:.3g}-{flops_high:.3g}× at the same FLOPs)")
    else:
        ratios = f"one seed) ends at {low:.3g}× AdamW's val perplexity at the same energy"
    text = f"The best forward-only contestant {verdict}: `{f['contestant'].split('-')[0]}` ({ratios}"
    if "ga_vs_es" in c:
        one_seed = any(x["conclusion"] == "one_seed" for x in c["ga_vs_es"].values())
        text += ("; against CLSO's discrete GA at its FLOPs, continuous low-rank ES "
                 + " and ".join(_es_against_ga(mode, x) for mode, x in c["ga_vs_es"].items())
                 + (" (one seed: no claim)" if one_seed else ""))
    body = c.get("body_backward", {}).get("hybrid")
    if body:
        text += (f"; the backward pass through the body is worth {body['mean_diff']:+.3f} nats of val loss to a fixed "
                 f"random body ({BODY_BACKWARD[body['conclusion']]})")
    return text + "."


def arena_section(result: dict) -> list[str]:
    """The best forward-only contestant against AdamW at equal energy and FLOPs, the frozen-head bound, and
    the arena's answer."""
    f, bound = result["forward_only"], result["frozen_head_bound_val_ppl"]
    lines = ["## The arena: gradient-free training on the same frontier", "",
             "NGOpt searches CLSO's genome; low-rank ES and MeZO train a dense GPT-2 from the baseline's initialisation "
             "with forward passes only (pure) or on the blocks' matrices beside CLSO's Adam phases (hybrid); head-only "
             "Adam trains the fixed body's head without a backward pass through the body. Each is on the frontier "
             "plots and in the contrasts above. The best forward-only contestant is the pure-mode stage of lowest mean "
             "val loss, at its first seed: chosen on val, so its test perplexity is given beside it.", ""]
    rows = [["val perplexity (test)", f"{fmt(f['val_ppl'])} ({fmt(f['test_ppl'])})"],
            [f"AdamW's at the same energy ({fmt(f['energy_wh'])} Wh, {f['method']})",
             f"{fmt(f['baseline_val_ppl_at_energy'])} ({f['at_energy']}): {f['ppl_ratio_at_energy']:.3g}×"],
            [f"AdamW's at the same FLOPs ({fmt(f['flops'])})",
             f"{fmt(f['baseline_val_ppl_at_flops'])} ({f['at_flops']}): {f['ppl_ratio_at_flops']:.3g}×"]]
    if f["seeds"] > 1:
        rows.append([f"its ratios over its {f['seeds']} seeds, at the same energy; at the same FLOPs",
                     "{:.3g}-{:.3g}×; {:.3g}-{:.3g}×".format(*f["seed_ratios_at_energy"], *f["seed_ratios_at_flops"])])
    if bound:
        rows.append(["the frozen-head bound (pure mode)", f"{fmt(bound)} (" + (
            "it applies: the head is frozen" if f["bound_applies"] else
            "it does not apply: es and mezo train the head") + ")"])
    lines += table([f"best forward-only contestant, `{f['contestant']}`", "value"], rows)
    return lines + ["", f"**Answer.** {answer(result)}"]


FIELD_SIDES = {"neurons_add": ("the same model's without neurons", "the neurons help", "the neurons hurt"),
               "against_baseline": ("the AdamW baseline's", "the field LM is better", "the baseline is better")}


def field_statement(name: str, c: dict) -> str:
    """The field LM against one other side (FIELD_SIDES), paired by the seeds of stage `spread`, in two
    sentences, its wording by the contrast's conclusion."""
    other, ahead, behind = FIELD_SIDES[name]
    d = c["mean_diff"]
    where = "on one run each" if c["seeds"] == 1 else f"on average over the {c['seeds']} seeds of stage `spread`"
    first = (f"The field LM's val loss is {abs(d):.4f} nats {'below' if d > 0 else 'above'} {other}, {where}; this "
             f"run's field LM cost {c['flops_share']:.3f}× its FLOPs")
    if c["conclusion"] == "other_run":
        return first + (". The spread was measured on other code, params or machine than this run: no claim is "
                        "made.")
    if c["conclusion"] == "one_seed":
        return first + ". No claim is made on one run."
    low, high = c["interval"]
    verdict = {"clso_better": ahead, "control_better": behind, "within_noise": "within noise"}[c["conclusion"]]
    return first + f". The 95 % interval is [{low:+.4f}, {high:+.4f}]: {verdict}."


def field_section(result: dict) -> list[str]:
    f, b, details = result["contestants"]["field"], result["contestants"]["baseline"], result["field"]
    j = details["journal"]
    c = j["nats_per_char"]
    lines = ["## The neuron-field LM (document 004)", "", f"Trained by gradient: {details['neurons']} neurons, "
             f"{details['frozen_share']:.0%} {'at the soft-freeze floor' if details['freeze'] == 'soft' else 'frozen'}, "
             f"{'with' if details['attention'] else 'without'} attention. It is a contestant, not the hypothesis.", ""]
    ratio, empty = result["against_baseline"]["field"], result["contestants"]["field_no_neurons"]
    lines += table(["", "neuron-field LM", "without neurons", "AdamW baseline", "field ÷ baseline"],
                   [[k, f[key], empty[key], b[key], ratio[key]] for k, key in
                    (("val perplexity", "val_ppl"), ("test perplexity", "test_ppl"), ("energy (Wh)", "energy_wh"),
                     ("FLOPs", "flops"))])
    lines += ["", *(f"- {field_statement(name, details[name])}" for name in FIELD_SIDES)]
    lines += ["", *table(["loss in nats per character", "ours", "the journal's", "met"],
                         [["train, the journal with attention (2.39 per token)", c["our_final_train"],
                           c["journal_causal_train"], j["causal_train_loss_met"]],
                          ["train, the journal's flat field (2.55 per token)", c["our_final_train"],
                           c["journal_flat_train"], j["flat_train_loss_met"]],
                          ["val", c["our_final_val"], None, None]])]
    lines += ["", f"Ours trained on {j['our_train_tokens'] / 1e6:.2f} M tokens, the journal's attention run on about "
              f"{j['journal_causal_train_tokens'] / 1e6:.0f} M token passes of another text. A figure not met here is "
              "not shown false, only not reproduced at this budget."]
    if details["torch_compile"] != details["baseline_torch_compile"]:
        lines.append(f"The baseline ran `torch.compile` ({details['baseline_torch_compile']}) and the field did not: "
                     "its energy ratio carries that gap.")
    return lines


def transfer_statement(r: dict, tolerance: float) -> str:
    """One task's verdict in two sentences: did CLSO transfer within the tolerance of the fine-tuned
    baseline, at what energy; and does the task test pretraining at all."""
    c, b, verdicts = r["clso"], r["baseline"], r["clso_within_tolerance"]
    mismatched = (f" (mismatched: {c['test_mismatched']:.4f} against {b['test_mismatched']:.4f}, "
                  f"{'within' if verdicts['test_mismatched'] else 'not within'})" if "test_mismatched" in verdicts else "")
    first = (f"CLSO ({c['option']}, the better on val) scores {c['test']:.4f} on test against the fine-tuned "
             f"baseline's {b['test']:.4f}{mismatched}: {'within' if verdicts['test'] else 'not within'} the "
             f"tolerance ({tolerance:.0%}), at {r['energy_ratio']:.3g}× its fine-tuning energy.")
    if r["no_pretraining_within_tolerance"]:
        return first + (f" A GPT-2 with no pretraining, fine-tuned, comes within it{' too' if verdicts['test'] else ''}, "
                        "so this task does not test pretraining.")
    return first + (f" Pretraining lifts the fine-tuned baseline by {r['lift']['pretraining_finetuned']:+.4f} over no "
                    f"pretraining; CLSO's body lifts a probe by {r['lift']['clso_probe']:+.4f}.")


def partial_statement(r: dict) -> str | None:
    """When `partial`'s search kept the pretrained genes, why (one sentence); None when it changed some."""
    p = r["clso_partial"]
    if p.get("search_accepted", True):
        return None
    return (f"`partial` kept the pretrained genes: its search's best fitness ({p['best_fitness']:.4f} nats) beat "
            f"neither the pretrained genes' ({p['pretrained_fitness']:.4f}) nor the label prior's ({p['prior_fitness']:.4f}).")


def transfer_section(t: dict) -> list[str]:
    lines = ["## Transfer to classification", "", f"CLSO's `{t['clso']}` frozen under a linear probe (`head`), "
             "or with a search over the genes nearest the head first (`partial`); the better on val is charged both. "
             "The test split reached no training step.", ""]
    rows = []
    for spec, r in t["tasks"].items():
        tests = list(r["majority_class"])
        for side, name in TRANSFER_SIDES.items():
            s = r[side]
            rows.append([f"`{spec}`", f"{name} ({s['option']})" if side == "clso" else name, s["train"], s["val"],
                         ", ".join(f"{s[split]:.4f}" for split in tests), s["energy_wh"], s["flops"]])
        rows.append([f"`{spec}`", "majority class of train", None, None,
                     ", ".join(f"{r['majority_class'][split]:.4f}" for split in tests), None, None])
    lines += table(["task", "side", "train", "val", "test", "energy (Wh)", "FLOPs"], rows)
    lines.append("")
    for spec, r in t["tasks"].items():
        lines.append(f"- `{spec}` ({r['metric']}, {r['splits']['test']['examples']} test examples): {transfer_statement(r, t['tolerance'])}")
        if partial_statement(r):
            lines.append(f"- `{spec}`: {partial_statement(r)}")
    return lines


def journal_claims_rows(j: dict) -> list[list]:
    return [["'mixed8 = full quality'", f"perplexity {j['mixed8_ppl_change']:+.2%}, mean KL {j['mixed8_mean_kl']:.2g}",
             j["mixed8_full_quality"]],
            ["'per-tensor int8 breaks it'", f"perplexity {j['int8_ppl_change']:+.2%}, top-1 agreement "
             f"{j['int8_top1_agreement']:.2%}", j["int8_breaks"]],
            ["'per-tensor int16 breaks it'", f"perplexity {j['int16_ppl_change']:+.2%}, top-1 agreement "
             f"{j['int16_top1_agreement']:.2%}", j["int16_breaks"]]]


def compile_section(c: dict) -> list[str]:
    lines = ["## Compiled to `.crystal`", "", f"CLSO's file is `{c['clso']}`'s, the headline run. Each file is scored against its "
             f"float model on the val split's first {c['eval_tokens']:,} next tokens (`compile.eval_tokens`), so its val "
             "perplexity is on those; the C runtime's speed is against PyTorch eager.", ""]
    rows = [[name, m8["val_ppl"], f"{m8['bytes']:,}", f"{m8['bytes_vs_f32']:.1%}",
             f"{m8['bytes_vs_dense_f32']:.1%}" if "bytes_vs_dense_f32" in m8 else None, m8["mean_kl"],
             f"{m8['top1_agreement']:.2%}", f"{m8['ppl_change']:+.3%}", m.get("runtime_bench", {}).get("ratio")]
            for name, m in c["models"].items() for m8 in [m["modes"]["mixed8"]]]
    lines += table(["model", "mixed8 val ppl", "mixed8 bytes", "÷ its f32", "÷ dense f32", "mean KL (nats)", "top-1 agreement",
                    "perplexity change", "runtime ÷ PyTorch tokens/s"], rows)
    lines += ["", *table(["target", "measured", "met"], [[k, c["measured"][k], ok] for k, ok in c["met"].items()])]
    j = c["models"]["field"]["journal"]
    lines += ["", "The crystal journal's quantization claims, on the neuron-field LM's files (broken: more than "
              f"{j['broken_ppl_change']:+.0%} perplexity or under {j['broken_top1_agreement']:.0%} top-1 agreement):", "",
              *table(["claim", "measured", "holds"], journal_claims_rows(j))]
    return lines


HOLDOUT_PARTS = {"all": "whole families held out", "random": "their random genomes", "mutants": "their mutants"}


def _spearman_row(label: str, m: dict | None) -> list:
    return [label, None if m is None else m["spearman"], None if m is None else m["spearman"] >= 0.7]


def diagnostics_section(result: dict, library: dict, surrogate: dict) -> list[str]:
    s = library["sanity_check"]
    rows = [["library sanity (protocol step 1): mean best relative error, with gain",
             f"{s['mean_best_rel_error_with_gain']:.0%} (worst {s['worst_best_rel_error_with_gain']:.0%}; "
             f"the protocol allows {s['protocol_max_error']:.0%})", s["passes_protocol"]],
            *(_spearman_row(f"surrogate: held-out Spearman, {what} (the protocol's bar: 0.7)",
                            surrogate["holdout_metrics_by_part"][part]) for part, what in HOLDOUT_PARTS.items())]
    if result.get("frozen_head_bound_val_ppl"):
        rows.append(["pure mode: the lowest val perplexity any body reaches under the frozen head",
                     fmt(result["frozen_head_bound_val_ppl"]), None])
    return ["## Diagnostics", "", *table(["check", "value", "passes"], rows)]


UNCHARGED = {"final_scores": "every contestant's final val and test scores (and the frozen-head bound)",
             "curve_val_loss": "the val loss of the baseline's and the field LM's curves",
             "checkpoints": "writing checkpoints (the searches, the field LM)",
             "library_sanity_check": "the library's sanity check against the baseline",
             "surrogate_inputs_comparison": "the surrogate's other input kinds, trained to compare them",
             "compile": "compile: every file, its checks and benchmarks",
             "spread": "spread: the one-run contestants at every seed, measured once (not by this `dvc repro`)",
             "sweep": "sweep: es's and mezo's step sizes on the train split, measured once (not by this `dvc repro`); "
                      "the baseline's learning rate was not swept either",
             "compare": "compare: this report"}


def costs_section(costs: dict[str, dict]) -> list[str]:
    return ["## Metered, charged to no one", "", "Neither the contestants' training nor their search: measuring, "
            "saving, compiling, comparing.", "",
            *table(["what", "energy (Wh)", "method", "wall (s)"],
                   [[UNCHARGED.get(what, what), c["energy_wh"], c["method"], c.get("wall_s")] for what, c in costs.items()])]


def machine_line(m: dict) -> str:
    """Where the run was measured: results repeat bit for bit on the same CPU and torch build only."""
    return (f"Measured on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, CPU kernels {m['cpu_capability']}"
            f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}). Losses and FLOPs repeat bit for bit on the same CPU "
            "and torch build; another CPU's kernels round differently, and a search then takes another path.")


def report(result: dict, inputs: dict) -> str:
    """metrics/report.md: the verdict first, then a table per question. `inputs`: the other stages' details."""
    h = result["headline"]
    lines = ["# CLSO against the dense AdamW baseline", "",
             "Generated by `dvc repro compare` from this run's records; do not edit. The figures behind it are in "
             "metrics/detail/.", "", machine_line(result["machine"]), "", "## Verdict", "",
             verdict_statement(h["clso"], h["verdict"], result["contestants"][h["clso"]]["method"]), "",
             *headline_section(result), "", *contestants_section(result), "", *contrasts_section(result), "",
             *(arena_section(result) + [""] if result.get("forward_only") else []), *field_section(result), "", *transfer_section(inputs["transfer"]), "", *compile_section(inputs["compile"]),
             "", *diagnostics_section(result, inputs["library"], inputs["surrogate"]), "",
             *costs_section(result["uncharged"]), ""]
    return "\n".join(lines)

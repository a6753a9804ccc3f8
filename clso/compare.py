"""The matched comparison of CLSO against the dense AdamW baseline, and the verdict on the
hypothesis of document 003. Pure functions of the stages' metrics and curves."""

from __future__ import annotations

import math
import statistics

PPL_TOLERANCE = 0.05
ENERGY_SHARE = 0.5


def hypothesis() -> str:
    """Document 003's hypothesis, as the constants above state it."""
    return f"CLSO within {PPL_TOLERANCE:.0%} of the baseline's perplexity at <= {ENERGY_SHARE:.0%} of its energy"


def value_at(xs: list[float], ys: list[float], x: float) -> tuple[float, str]:
    """y at x on a piecewise-linear curve of increasing xs; past its end, the last y."""
    if x <= xs[0]:
        return ys[0], "at the start of the baseline's run"
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return (y0 if x1 == x0 else y0 + (x - x0) * (y1 - y0) / (x1 - x0)), "interpolated"
    return ys[-1], "beyond the baseline's run (its last point)"


def first_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x where the curve comes down to `target` (linear between points), or None."""
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return xs[0]
            x0, y0, x1 = xs[i - 1], ys[i - 1], xs[i]
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y)
    return None


def verdict(clso_ppl: float, clso_energy: float, baseline_ppl: float, baseline_energy: float,
            bound_ppl: float | None = None) -> dict:
    """The hypothesis on val perplexity and charged energy. `bound_ppl`, the lowest val perplexity
    any body reaches with CLSO's frozen head (pure mode), decides it alone when it is too high."""
    ppl_ratio = clso_ppl / baseline_ppl
    energy_ratio = clso_energy / baseline_energy
    close = ppl_ratio <= 1 + PPL_TOLERANCE
    cheap = energy_ratio <= ENERGY_SHARE
    return {"holds": close and cheap, "ppl_within_tolerance": close, "energy_within_share": cheap,
            "ppl_ratio": round(ppl_ratio, 4), "energy_ratio": round(energy_ratio, 4),
            "decided_by_frozen_head_bound": bound_ppl is not None and bound_ppl / baseline_ppl > 1 + PPL_TOLERANCE,
            "bound_ppl": bound_ppl, "bound_ppl_ratio": None if bound_ppl is None else round(bound_ppl / baseline_ppl, 4)}


def statement(v: dict) -> str:
    """The verdict in words (kept out of compare.json: a sentence is no metric to compare)."""
    text = (f"{'HOLDS' if v['holds'] else 'DOES NOT HOLD'}: CLSO's val perplexity is {v['ppl_ratio']:.3f}× the "
            f"baseline's ({'within' if v['ppl_within_tolerance'] else 'outside'} {PPL_TOLERANCE:.0%}) at "
            f"{v['energy_ratio']:.3f}× its energy ({'at most' if v['energy_within_share'] else 'more than'} "
            f"{ENERGY_SHARE:.0%})")
    if v["decided_by_frozen_head_bound"]:
        text += (f"; pure mode cannot pass: the frozen head bounds the val perplexity at {v['bound_ppl']:.4g} "
                 f"({v['bound_ppl_ratio']:.3f}× the baseline's) whatever the library or the search")
    return text


def matched(clso: dict, baseline: dict, curve: list[dict]) -> dict:
    """The baseline's val perplexity at CLSO's energy and FLOPs, and what it needed to reach CLSO's."""
    energy = [r["energy_wh"] for r in curve]
    flops = [r["flops"] for r in curve]
    loss = [r["val_loss"] for r in curve]
    at_energy, energy_status = value_at(energy, loss, clso["energy_wh"])
    at_flops, flops_status = value_at(flops, loss, clso["flops"])
    reach_energy = first_reach(energy, loss, clso["val_loss"])
    reach_flops = first_reach(flops, loss, clso["val_loss"])
    reach_step = first_reach([r["step"] for r in curve], loss, clso["val_loss"])
    return {
        "baseline_val_ppl_at_clso_energy": math.exp(at_energy), "at_clso_energy": energy_status,
        "baseline_val_ppl_at_clso_flops": math.exp(at_flops), "at_clso_flops": flops_status,
        "baseline_reached_clso_val_ppl": reach_energy is not None,
        "baseline_energy_wh_to_reach_clso": reach_energy, "baseline_flops_to_reach_clso": reach_flops,
        "baseline_step_to_reach_clso": None if reach_step is None else round(reach_step, 1),
    }


def comparison(clso: dict, baseline: dict, curve: list[dict]) -> dict:
    """The headline part of metrics/compare.json — clso.*, baseline.*, ratio.*, matched.*, verdict.*
    — for one CLSO run (the compare stage adds variants.*, contrasts.* and over_seeds.*)."""
    return {
        "clso": clso, "baseline": baseline,
        "ratio": {key: round(clso[key] / baseline[key], 4) for key in ("energy_wh", "flops", "val_ppl", "test_ppl")},
        "matched": matched(clso, baseline, curve),
        "verdict": verdict(clso["val_ppl"], clso["energy_wh"], baseline["val_ppl"], baseline["energy_wh"],
                           clso.get("frozen_head_bound_val_ppl")),
    }


def methods(*names: str) -> str:
    """One method label for summed figures: every part's method, once each."""
    return "|".join(sorted({part for m in names for part in m.split("|")}))


def device_parts(m: dict) -> dict:
    """A metered figure's CPU and GPU parts, each with its method (a stage's metrics give them apart
    when a GPU did the work); CPU-only work is all CPU."""
    if m.get("gpu_method"):
        return {k: m[k] for k in ("cpu_wh", "cpu_method", "gpu_wh", "gpu_method")}
    return {"cpu_wh": m["energy_wh"], "cpu_method": m["method"], "gpu_wh": 0.0, "gpu_method": None}


def summed_device_parts(figures) -> dict:
    parts = [device_parts(m) for m in figures]
    gpu_methods = [p["gpu_method"] for p in parts if p["gpu_method"]]
    return {"cpu_wh": sum(p["cpu_wh"] for p in parts), "cpu_method": methods(*(p["cpu_method"] for p in parts)),
            "gpu_wh": sum(p["gpu_wh"] for p in parts), "gpu_method": methods(*gpu_methods) if gpu_methods else None}


def clso_charges(library: dict, surrogate: dict | None, search: dict, baseline: dict) -> dict:
    """Everything a search spent, from the stages' metrics: library generation, the surrogate's true
    evaluations and training (CLSO's GA; `surrogate` None for a control, which has none), the search
    — and, when the library holds svd matrices taken from the trained baseline, that baseline's
    training too. Checkpoint writing is no one's training cost."""
    parts = {"library": {**library, "flops": 0}}
    if surrogate is not None:
        parts |= {f"surrogate_{k}": surrogate[k] for k in ("evaluation", "training")}
    parts["search"] = search
    if library["families"]["svd"] > 0:
        parts["svd_reference_baseline"] = baseline
    before = [p for name, p in parts.items() if name != "search"]

    def total(key, figures):
        return sum(p[key] for p in figures)

    return {"energy_wh": total("energy_wh", parts.values()), "flops": total("flops", parts.values()),
            "wall_s": total("wall_s", parts.values()), "method": methods(*(p["method"] for p in parts.values())),
            "energy_by_device": summed_device_parts(parts.values()),
            # what was spent before the search's first generation: its curve starts there
            "before_search": {key: total(key, before) for key in ("energy_wh", "flops", "wall_s")},
            "energy_wh_by_part": {name: p["energy_wh"] for name, p in parts.items()}}


def charged_curve(search_curve: list[dict], charges: dict) -> list[dict]:
    """The search's per-generation curve with what came before it added to every cost column."""
    before = charges["before_search"]
    return [{**row, **{key: row[key] + before[key] for key in ("energy_wh", "flops", "wall_s")},
             "energy_method": charges["method"]} for row in search_curve]


def spread(xs: list[float]) -> float | None:
    """Sample standard deviation; None for a single run (no spread to speak of)."""
    return statistics.stdev(xs) if len(xs) > 1 else None


def seed_summary(runs: list[dict], keys=("val_loss", "val_ppl", "test_ppl", "energy_wh", "flops")) -> dict:
    """Mean and spread over seeds of one strategy and mode."""
    out = {"seeds": len(runs)}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_spread"] = spread(values)
    return out


# (name, the control's stage, how statements call it, the question it answers); each is paired
# with CLSO's search (stage `evolve`) of the same mode and seed
CONTRASTS = (("ga_vs_random", "random", "random search", "does the GA beat sampling at equal true evaluations?"),
             ("surrogate_vs_none", "no_surrogate", "the GA without surrogate",
              "does the surrogate pay for itself at equal FLOPs?"),
             ("search_vs_fixed_body", "fixed_body", "the fixed random body", "what does the search add beyond Adam?"))


def best_clso_run(runs: list[dict], first_seed: int) -> dict:
    """The headline run: CLSO's mode with the lowest mean val loss over seeds, at the first seed —
    not the luckiest seed, which would be picked and judged on the same val split."""
    clso = [r for r in runs if r["stage"] == "evolve"]
    modes = dict.fromkeys(r["mode"] for r in clso)
    best_mode = min(modes, key=lambda m: seed_summary([r for r in clso if r["mode"] == m], ("val_loss",))["val_loss"])
    return next(r for r in clso if r["mode"] == best_mode and r["seed"] == first_seed)


def contrasts(runs: list[dict]) -> dict:
    """Each control against CLSO's GA of the same mode, seed by seed: the control's val loss less
    the GA's (positive: the GA is better), its mean and spread over seeds, and the control's
    charged energy and FLOPs as a share of the GA's, and both runs' Adam phases (hybrid mode: a
    control stopped by its FLOP budget may have had fewer). `runs` carry stage, mode, seed and figures."""
    by = {(r["stage"], r["mode"], r["seed"]): r for r in runs}
    out = {}
    for name, control, _, _ in CONTRASTS:
        for (stage, mode, seed), r in sorted(by.items()):
            ga = by.get(("evolve", mode, seed))
            if stage != control or ga is None:
                continue
            out.setdefault(name, {}).setdefault(mode, []).append(
                {"loss_difference": r["val_loss"] - ga["val_loss"], "energy_share": r["energy_wh"] / ga["energy_wh"],
                 "flops_share": r["flops"] / ga["flops"], "adam_phases": r["adam_phases"],
                 "clso_adam_phases": ga["adam_phases"]})
    return {name: {mode: {"seeds": len(pairs),
                          **{k: sum(p[k] for p in pairs) / len(pairs) for k in ("loss_difference", "energy_share",
                                                                                "flops_share", "adam_phases",
                                                                                "clso_adam_phases")},
                          "loss_difference_spread": spread([p["loss_difference"] for p in pairs]),
                          "clso_better_in": sum(p["loss_difference"] > 0 for p in pairs)}
                   for mode, pairs in modes.items()}
            for name, modes in out.items()}


def contrast_statement(name: str, mode: str, c: dict) -> str:
    """One contrast in words."""
    _, _, label, question = next(x for x in CONTRASTS if x[0] == name)
    d = c["loss_difference"]
    spread_text = (f" ± {c['loss_difference_spread']:.4f} (spread over {c['seeds']} seeds; CLSO better in "
                   f"{c['clso_better_in']} of them)" if c["loss_difference_spread"] is not None else " (one seed)")
    who = "CLSO's GA is better" if d > 0 else "CLSO's GA is not better" if d == 0 else f"{label} is better"
    return (f"{question[0].upper()}{question[1:]} In {mode} mode, {label}'s val loss is {d:+.4f} nats from CLSO's"
            f"{spread_text}: {who}, at {c['energy_share']:.2f}× CLSO's charged energy and "
            f"{c['flops_share']:.2f}× its FLOPs"
            + (f", after {c['adam_phases']:g} Adam phases to CLSO's {c['clso_adam_phases']:g}." if mode == "hybrid" else "."))


# The crystal journal's figures for its neuron-field LM (document 004): losses per GPT-2 token on
# Tiny Shakespeare, taken as training losses (it logs them by epoch, and its final 0.12 is one), 2.39
# with causal attention at 208 neurons (epoch 60) and 2.55 for the flat field (no attention) after 600
# epochs. An epoch passes 64-token windows at stride 32 over the text (its Part 7), so each token about
# twice: `passes_per_epoch`. `gpt2_tokens_per_char`: nanoGPT's
# data/shakespeare/prepare.py counts 338,025 GPT-2 tokens in its 1,115,394 characters, which puts
# them in nats per character, the one unit a loss over another tokenizer shares with them.
JOURNAL_FIELD = {"causal_train_loss": 2.39, "causal_neurons": 208, "causal_epochs": 60,
                 "flat_plateau_train_loss": 2.55, "flat_plateau_neurons": 788, "flat_epochs": 600,
                 "gpt2_tokens_per_char": 338_025 / 1_115_394, "text_gpt2_tokens": 338_025, "passes_per_epoch": 2}
TRAIN_LOSS_WINDOW = 20  # steps whose train losses are averaged for the final train loss (one batch is noisy)


def field_contestant(metrics: dict, curve: list[dict], test_loss: float, baseline: dict,
                     tokens_per_char: dict[str, float]) -> dict:
    """The neuron-field LM (stage `field`) against the baseline, and against the journal's figures:
    our final train loss (the mean of the last TRAIN_LOSS_WINDOW steps) and val loss per character
    beside the journal's training losses per character, with the tokens each run trained on.
    `curve` is plots/field.csv (a row per step); `tokens_per_char` our tokenizer's, per split."""
    j = JOURNAL_FIELD
    last = [r["train_loss"] for r in curve[-TRAIN_LOSS_WINDOW:] if _number(r["train_loss"])]
    train_loss = sum(last) / len(last)
    per_char = {"our_final_train": train_loss * tokens_per_char["train"],
                "our_final_val": metrics["final_val_loss"] * tokens_per_char["val"],
                "journal_causal_train": j["causal_train_loss"] * j["gpt2_tokens_per_char"],
                "journal_flat_train": j["flat_plateau_train_loss"] * j["gpt2_tokens_per_char"]}
    return {
        "val_loss": metrics["final_val_loss"], "val_ppl": metrics["final_val_ppl"], "test_loss": test_loss,
        "test_ppl": math.exp(test_loss), "energy_wh": metrics["energy_wh"], "method": metrics["method"],
        "flops": metrics["flops"], "wall_s": metrics["wall_s"], "neurons": metrics["neurons"],
        "frozen_share": metrics["frozen_share"], "freeze": metrics["freeze"], "parameters": metrics["parameters"],
        "attention": metrics["attention"], "torch_compile": metrics["torch_compile"],
        "baseline_torch_compile": baseline["torch_compile"],
        "energy_by_device": device_parts(metrics),
        "ppl_ratio": round(metrics["final_val_ppl"] / baseline["val_ppl"], 4),
        "energy_ratio": round(metrics["energy_wh"] / baseline["energy_wh"], 4),
        "flops_ratio": round(metrics["flops"] / baseline["flops"], 4),
        "journal": {**j, "our_final_train_loss": train_loss, "our_train_tokens": metrics["tokens"],
                    "journal_causal_train_tokens": j["causal_epochs"] * j["passes_per_epoch"] * j["text_gpt2_tokens"],
                    "nats_per_char": per_char,
                    # the journal's training loss is met when ours, per character, is at or below it
                    "causal_train_loss_met": per_char["our_final_train"] <= per_char["journal_causal_train"],
                    "flat_train_loss_met": per_char["our_final_train"] <= per_char["journal_flat_train"]},
    }


def _number(x) -> bool:
    """A curve cell that holds a number (pandas reads an empty one as NaN)."""
    return x is not None and x == x


def field_statement(f: dict) -> str:
    """The third contestant in words: against the baseline, then against the journal's figures."""
    j, c = f["journal"], f["journal"]["nats_per_char"]
    ours, other = ("with attention", "its flat field") if f["attention"] else ("flat", "its field with attention")
    compiled = (f" (the baseline torch.compiled ({f['baseline_torch_compile']}), the field not)"
                if f["baseline_torch_compile"] != f["torch_compile"] else "")
    return (f"The journal's neuron-field LM (stage `field`: {'attention → ' if f['attention'] else ''}field of "
            f"{f['neurons']} neurons → MLP, "
            f"{f['frozen_share']:.0%} {'at the soft-freeze floor' if f['freeze'] == 'soft' else 'frozen'}) reaches val "
            f"perplexity {f['val_ppl']:.4g}, {f['ppl_ratio']:.3f}× the AdamW baseline's, at {f['energy_ratio']:.3f}× its "
            f"energy and {f['flops_ratio']:.3f}× its FLOPs{compiled}. Against the journal's losses (taken as training losses) in nats per "
            f"character (its nats per GPT-2 token × {j['gpt2_tokens_per_char']:.3f} GPT-2 tokens per character of Tiny "
            f"Shakespeare): ours is {c['our_final_train']:.3f} on train (final; {c['our_final_val']:.3f} held out on "
            f"val) after {j['our_train_tokens'] / 1e6:.2f} M training tokens, the journal's "
            f"{c['journal_causal_train']:.3f} ({j['causal_train_loss']} per token, with attention, "
            f"{j['causal_neurons']} neurons, {j['causal_epochs']} epochs ≈ {j['journal_causal_train_tokens'] / 1e6:.0f} M "
            f"tokens): {_word(j['causal_train_loss_met'], 'met', 'not met')}; and {c['journal_flat_train']:.3f} for its flat field "
            f"({j['flat_plateau_train_loss']}, {j['flat_plateau_neurons']} neurons, no attention, {j['flat_epochs']} "
            f"epochs): {_word(j['flat_train_loss_met'], 'met', 'not met')}. Ours is {ours}, so the like-for-like figure "
            f"is the journal's {'first' if f['attention'] else 'second'}; `field.attention: "
            f"{str(not f['attention']).lower()}` trains {other}. Different texts (whole plays here, Tiny Shakespeare "
            f"there) and budgets: a figure not met here is not shown false, only not reproduced at this budget.")


# The crystal journal's quantization claims (document 004), tested on the neuron-field LM. A per-tensor
# int mode "breaks it" when the file's top token differs from the float model's at more than a tenth
# of the positions (the journal's symptom: the top token turned into a newline) or it costs more than
# a tenth in perplexity; "mixed8 = full quality" is judged by the compile stage's mixed8 targets.
BROKEN_PPL_CHANGE = 0.10
BROKEN_TOP1_AGREEMENT = 0.90

def journal_claims(modes: dict, max_kl: float, max_ppl_change: float) -> dict:
    """Document 004's claims on its files, measured on the neuron-field LM's (quantization_reports of
    each mode): mixed8 keeps full quality (mean KL and perplexity change within the bounds);
    per-tensor int8 and int16 (embeddings quantized too) break it."""
    m8 = modes["mixed8"]
    return {"mixed8_full_quality": m8["mean_kl"] <= max_kl and abs(m8["ppl_change"]) <= max_ppl_change,
            "mixed8_ppl_change": m8["ppl_change"], "mixed8_mean_kl": m8["mean_kl"],
            **{f"{mode}_breaks": modes[mode]["ppl_change"] > BROKEN_PPL_CHANGE
               or modes[mode]["top1_agreement"] < BROKEN_TOP1_AGREEMENT for mode in ("int8", "int16")},
            **{f"{mode}_{k}": modes[mode][k] for mode in ("int8", "int16") for k in ("ppl_change", "top1_agreement")},
            "broken_ppl_change": BROKEN_PPL_CHANGE, "broken_top1_agreement": BROKEN_TOP1_AGREEMENT, "max_kl": max_kl, "max_ppl_change": max_ppl_change}


def _word(ok: bool, yes: str, no: str) -> str:
    return yes if ok else no


def journal_statement(j: dict) -> str:
    def verdict(holds: bool) -> str:
        return _word(holds, "holds", "does not hold")

    return (f"'mixed8 = full quality' {verdict(j['mixed8_full_quality'])} (perplexity {j['mixed8_ppl_change']:+.2%}, "
            f"mean KL {j['mixed8_mean_kl']:.2g} nats; full quality: within ±{j['max_ppl_change']:.0%} and "
            f"≤ {j['max_kl']:g}); 'per-tensor int8 breaks it' {verdict(j['int8_breaks'])} "
            f"({j['int8_ppl_change']:+.2%} perplexity, top-1 agreement {j['int8_top1_agreement']:.2%}), 'per-tensor int16 "
            f"breaks it' {verdict(j['int16_breaks'])} ({j['int16_ppl_change']:+.2%}, {j['int16_top1_agreement']:.2%}; "
            f"broken: more than {j['broken_ppl_change']:+.0%} perplexity or under {j['broken_top1_agreement']:.0%} "
            "top-1 agreement)")

"""The size sweep: a plan of model sizes (scaling.yaml), the `dvc exp run -S` overrides of each, and
the table, fitted trend, report section and figure built from the finished experiments' compare
outputs. Running DVC is cli/scaling.py's; this module turns dicts into dicts, text and a PNG. It sits in
cli/, the top layer, because it reads every layer of clso/ (the model's sizes, compare's bars, the
report's tables)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
from dataclasses import dataclass

from clso import ClsoError
from clso.compare import ENERGY_SHARE, PPL_TOLERANCE, t_975
from clso.params import Params, parse_params
from clso.report import fmt, table

SIZE_KEYS = ("n_layer", "n_embd", "n_head")
PREFIX = "size-"  # every experiment of the sweep is named size-{n_layer}x{n_embd}
TARGET_RATIO = 1 + PPL_TOLERANCE  # the hypothesis' perplexity bar: where the fitted trend would cross it
FAR = 10_000  # a crossing beyond this many times the largest size is given as "beyond", not as a number


class PlanError(ClsoError):
    exit_code = 2


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_embd: int
    n_head: int
    overrides: dict  # "section.key" → value: the plan's `set`, then this size's own `set`

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.n_layer}x{self.n_embd}"

    def assignments(self) -> list[str]:
        """The `-S key=value` arguments of `dvc exp run` (values as JSON, which DVC reads as YAML)."""
        return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in self.overrides.items()]


def _overrides(where: str, raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.count(".") == 1 for k in raw):
        raise PlanError(f"{where}: expected a mapping of section.key: value, like grid.seeds: [1337]")
    return dict(raw)


@dataclass(frozen=True)
class Plan:
    rule: str  # how budgets scale with size, in words, for the report
    sizes: list[Size]


def parse_plan(raw, params: dict) -> Plan:
    """A scaling.yaml document, each size checked against `params` (params.yaml as loaded YAML) with
    its overrides applied, so a typo fails before anything is queued."""
    if not isinstance(params, dict):
        raise PlanError("params.yaml: expected a mapping of sections")
    if not isinstance(raw, dict) or set(raw) - {"rule", "set", "sizes"} or not isinstance(raw.get("sizes"), list) \
            or not isinstance(raw.get("rule"), str) or not raw["rule"].strip():
        raise PlanError("expected the keys `rule` (the budget rule, in words), `sizes` (a list of {n_layer, n_embd, "
                        "n_head}) and, optionally, `set`")
    common = _overrides("set", raw.get("set"))
    sizes, names = [], set()
    for i, entry in enumerate(raw["sizes"]):
        where = f"sizes[{i}]"
        if not isinstance(entry, dict) or set(entry) - {*SIZE_KEYS, "set"} or not set(SIZE_KEYS) <= set(entry):
            raise PlanError(f"{where}: expected n_layer, n_embd, n_head and, optionally, set")
        if not all(isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] > 0 for k in SIZE_KEYS):
            raise PlanError(f"{where}: n_layer, n_embd and n_head must be positive integers")
        model = {f"model.{k}": entry[k] for k in SIZE_KEYS}
        size = Size(**{k: entry[k] for k in SIZE_KEYS}, overrides={**common, **_overrides(f"{where}.set", entry.get("set")),
                                                                  **model})
        if size.name in names:
            raise PlanError(f"{where}: {size.name} twice; each size is one experiment")
        names.add(size.name)
        try:
            parse_params(applied(params, size.overrides))
        except ClsoError as e:
            raise PlanError(f"{where} ({size.name}): {e}") from None
        sizes.append(size)
    if not sizes:
        raise PlanError("sizes: empty; list at least one size")
    return Plan(rule=raw["rule"].strip(), sizes=sizes)


def applied(params: dict, overrides: dict) -> dict:
    """params.yaml's sections with the overrides set, as `dvc exp run -S` sets them."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        section, name = key.split(".")
        if not isinstance(out.get(section), dict):
            raise PlanError(f"{key}: no section {section} in params.yaml")
        out[section][name] = value
    return out


def differs(ran: dict, expected: dict) -> str | None:
    """The first key where an experiment's params.yaml (`ran`) is not what the plan gives today
    (`expected`: params.yaml with the size's overrides), as `section.key=value`, or None."""
    for section in dict.fromkeys([*expected, *ran]):
        mine, theirs = expected.get(section) or {}, ran.get(section) or {}
        for key in dict.fromkeys([*mine, *theirs]):
            if mine.get(key) != theirs.get(key):
                return f"{section}.{key}={json.dumps(theirs.get(key), ensure_ascii=False)}"
    return None


def model_size(params: Params, vocab_size: int) -> tuple[int, int, int]:
    """(parameters of the dense GPT-2, those of its blocks alone, genes of CLSO's genome) at these params
    and vocabulary. The genome covers the blocks; the embeddings are the baseline's in every contestant."""
    import torch
    from transformers import GPT2LMHeadModel

    from clso.model.crystalline import ModelConfig, genome_length

    config = ModelConfig.from_params(params.model, vocab_size)
    with torch.device("meta"):  # shapes only: no memory, no time
        dense = GPT2LMHeadModel(config.gpt2())
    return (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in dense.transformer.h.parameters()),
            genome_length(config))


def size_row(size: Size, counts: tuple[int, int, int], commit: str, compare: dict, detail: dict) -> dict:
    """One row of plots/scaling.csv from an experiment's metrics/compare.json and its detail; `counts`
    as model_size gives them, `commit` the one the experiment ran on."""
    base = detail["contestants"]["baseline"]["val_ppl"]
    ratio, verdict = detail["headline"]["ratio"], detail["headline"]["verdict"]
    bound = detail["frozen_head_bound_val_ppl"]  # pure mode's floor; None when the grid runs no pure search
    row = {"size": size.name, "n_layer": size.n_layer, "n_embd": size.n_embd, "n_head": size.n_head,
           "params": counts[0], "block_params": counts[1], "genes": counts[2], "commit": commit,
           "machine": machine_line(detail["machine"]),
           "clso": detail["headline"]["clso"], "baseline_val_ppl": base,
           "ppl_ratio": ratio["val_ppl"], "test_ppl_ratio": ratio["test_ppl"], "energy_ratio": ratio["energy_wh"],
           "flops_ratio": ratio["flops"], "energy_method": compare["energy_method"],
           "energy_criterion": verdict["energy_criterion"], "holds": verdict["holds"],
           "bound_ppl_ratio": None if bound is None else bound / base}
    runs = {}  # every search and arena contestant (stage@mode): its val perplexity at each seed
    for name, c in detail["contestants"].items():
        if "@" in name:
            runs.setdefault(name.rsplit("-", 1)[0], []).append(c["val_ppl"])
    for stage, ppls in runs.items():
        row |= {f"{stage}_ppl_ratio": statistics.fmean(ppls) / base, f"{stage}_seeds": len(ppls)}
    for name, modes in detail["contrasts"].items():
        for mode, c in modes.items():
            low, high = c.get("interval") or (None, None)
            row |= {f"{name}@{mode}": c["mean_diff"], f"{name}@{mode}_low": low, f"{name}@{mode}_high": high,
                    f"{name}@{mode}_conclusion": c["conclusion"]}
    return row


def machine_line(m: dict) -> str:
    """Where an experiment ran, in a few words (compare's record of the machine)."""
    return f"{m['gpu'] or m['cpu']}, {m['cores']} cores" + (f", {m['cpu_capability']}" if m["cpu_capability"] else "")


def digest(params: dict) -> str:
    """A short fingerprint of a params.yaml's values: a kept row must have run on the same."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def columns(rows: list[dict]) -> list[str]:
    """Every column of the rows, in the order they first appear."""
    return list(dict.fromkeys(k for r in rows for k in r))


def fit_trend(rows: list[dict]) -> dict | None:
    """Least squares of CLSO's perplexity ratio on ln(parameters), and where that line would reach
    the hypothesis' bar (1 + PPL_TOLERANCE). None under two distinct sizes."""
    xs = [math.log(r["params"]) for r in rows]
    ys = [r["ppl_ratio"] for r in rows]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    total = sum((y - my) ** 2 for y in ys)
    lo, hi = min(r["params"] for r in rows), max(r["params"] for r in rows)
    n = len(rows)
    # the slope's 95 % interval (Student's t, n − 2 degrees of freedom): none from two sizes
    half = t_975(n - 2) * math.sqrt(residual / (n - 2) / sxx) * math.log(2) if n > 2 else None
    # a crossing only from a slope whose whole interval falls: two points give a slope and no more
    falls = half is not None and slope * math.log(2) + half < 0
    ln_crossing = (TARGET_RATIO - intercept) / slope if falls else None
    far = ln_crossing is not None and ln_crossing > math.log(hi * FAR)
    crossing = None if ln_crossing is None or far else math.exp(ln_crossing)
    return {"sizes": n, "intercept": intercept, "slope_per_ln_params": slope, "slope_per_doubling": slope * math.log(2),
            "slope_per_doubling_interval": None if half is None else [slope * math.log(2) - half,
                                                                      slope * math.log(2) + half],
            "r2": 1 - residual / total if n > 2 and total else None, "target": TARGET_RATIO,
            "crossing_params": crossing, "crossing_beyond": FAR * hi if far else None,
            "measured_params": [lo, hi],
            "measured_below_target": sum(r["ppl_ratio"] <= TARGET_RATIO for r in rows),
            "modes": sorted({r["clso"].split("@")[1].split("-")[0] for r in rows})}


def fitted(fit: dict, n_params: float) -> float:
    return fit["intercept"] + fit["slope_per_ln_params"] * math.log(n_params)


def trend_statement(fit: dict | None) -> str:
    if fit is None:
        return "No trend: it needs at least two sizes."
    lo, hi = fit["measured_params"]
    interval = fit["slope_per_doubling_interval"]
    r2 = "" if fit["r2"] is None else f", R² {fit['r2']:.2f}"
    parts = [f"A line through CLSO's perplexity ratio against ln(parameters), fitted on {fit['sizes']} sizes "
             f"({lo:,} to {hi:,} parameters), moves the ratio by {fit['slope_per_doubling']:+.3g} per doubling of "
             "the parameters" + ("" if interval is None else
                                 f" (95 % interval [{interval[0]:+.3g}, {interval[1]:+.3g}]{r2})") + "."]
    if interval is None:
        parts.append("Two sizes give no interval on the slope, so no crossing is given.")
    elif interval[0] <= 0 <= interval[1]:
        parts.append("The interval contains zero: the ratio may not move with size at all.")
    elif interval[1] >= 0:
        parts.append("The interval lies above zero: the ratio rises with size.")
    if len(fit["modes"]) > 1:
        parts.append(f"CLSO's best mode is not the same at every size ({', '.join(fit['modes'])}): the line joins both.")
    if fit["measured_below_target"]:
        parts.append(f"{fit['measured_below_target']} of the measured sizes are within {TARGET_RATIO:g} already.")
    elif fit["slope_per_ln_params"] >= 0:
        parts.append(f"The fitted ratio does not fall with size, so the line gives no size where it reaches "
                     f"{TARGET_RATIO:g}.")
    elif fit["crossing_beyond"] is not None:
        parts.append(f"The line would reach {TARGET_RATIO:g} only beyond {fit['crossing_beyond']:.3g} parameters "
                     f"({FAR:,}× the largest measured size): an extrapolation nothing here supports.")
    elif fit["crossing_params"] is not None and fit["crossing_params"] <= hi:
        parts.append(f"The line reaches {TARGET_RATIO:g} at {fit['crossing_params']:.3g} parameters, inside the "
                     "measured range, though no measured size is within it: the line says so, not a measurement.")
    elif fit["crossing_params"] is not None:
        parts.append(f"Extrapolated, the line would reach {TARGET_RATIO:g} at {fit['crossing_params']:.3g} parameters "
                     f"({fit['crossing_params'] / hi:.3g}× the largest measured size). That holds only if the line "
                     "does, which nothing measured here shows.")
    elif interval is not None and interval[1] >= 0:
        parts.append(f"The slope may not fall at all, so the line gives no size where it reaches {TARGET_RATIO:g}.")
    return " ".join(parts)


def _contrast_cell(row: dict, key: str) -> str:
    if key not in row:
        return "—"
    low, high, conclusion = row[f"{key}_low"], row[f"{key}_high"], row[f"{key}_conclusion"]
    interval = "" if low is None else f" [{low:+.3f}, {high:+.3f}]"
    return f"{row[key]:+.3f}{interval} {conclusion.replace('_', ' ')}"


def section(rows: list[dict], notes: dict[str, str], planned: int, fit: dict | None, rule: str) -> str:
    """metrics/scaling.md: the sweep's table (with a note on each size kept or left out), contrasts,
    arena ratios and trend."""
    lines = ["# How the verdict moves with size", "",
             f"`clso scaling table` on the experiments of scaling.yaml: {len(rows)} of its {planned} sizes. {rule}", "",
             f"Ratios are to the AdamW baseline of the same size. The hypothesis: perplexity ratio ≤ {TARGET_RATIO:g} "
             f"at energy ratio ≤ {ENERGY_SHARE:g}. CLSO's best mode is chosen on val, so its val ratio leans "
             "optimistic; the test ratio is not chosen on. The pure-mode bound is the frozen-head bound's "
             "perplexity: no pure-mode body beats it with the head it keeps.", ""]
    lines += table(["size", "parameters (blocks)", "genes", "commit, machine", "CLSO (best mode)", "val ppl ratio",
                    "test ppl ratio", "energy ratio (method)", "FLOPs ratio", "pure-mode bound ratio", "holds"],
                   [[r["size"], f"{r['params']:,} ({r['block_params']:,})", r["genes"], f"{r['commit']}, {r['machine']}",
                     r["clso"],
                     r["ppl_ratio"], r["test_ppl_ratio"], f"{fmt(r['energy_ratio'])} ({r['energy_method']})",
                     r["flops_ratio"], r["bound_ppl_ratio"], r["holds"]] for r in rows])
    lines += ["", *(f"- {name}: {why}" for name, why in notes.items())] if notes else []
    contrasts = sorted({k for r in rows for k in r if f"{k}_conclusion" in r})
    if contrasts:
        lines += ["", "## Contrasts (nats of val loss; 95 % interval once seeds give one)", ""]
        lines += table(["size", *contrasts], [[r["size"], *(_contrast_cell(r, c) for c in contrasts)] for r in rows])
    stages = [k.removesuffix("_ppl_ratio") for k in columns(rows) if k.endswith("_ppl_ratio") and "@" in k]
    if stages:
        lines += ["", "## Every search's perplexity ratio to AdamW (mean over its seeds)", ""]
        lines += table(["size", *stages], [[r["size"], *(r.get(f"{s}_ppl_ratio") for s in stages)] for r in rows])
    lines += ["", "## Trend", "", trend_statement(fit), ""]
    return "\n".join(lines)


def scaling_png(rows: list[dict], fit: dict | None, path) -> None:
    """The size sweep (cli.sizes rows): left, every search's perplexity ratio to AdamW against
    parameters, CLSO's fitted line dashed and the hypothesis' bar; right, CLSO's energy and FLOPs ratios."""
    import io

    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    from clso.io import write_bytes_atomic
    from clso.plots import plt

    n = [r["params"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6.5), dpi=120)
    keys = [k for k in columns(rows) if k.endswith("_ppl_ratio") and "@" in k]
    stages = list(dict.fromkeys(k.split("@")[0] for k in keys))
    for key in keys:  # a colour per stage; pure mode solid with dots, hybrid dashed with triangles
        stage, mode = key.removesuffix("_ppl_ratio").split("@")
        points = [(r["params"], r[key]) for r in rows if r.get(key) is not None]
        left.plot(*zip(*points), lw=1, ls="-" if mode == "pure" else "--", marker="o" if mode == "pure" else "^",
                  color=plt.get_cmap("tab10").colors[stages.index(stage) % 10], label=f"{stage}@{mode}")
    left.plot(n, [r["ppl_ratio"] for r in rows], color="black", marker="s", lw=2, label="CLSO, best mode (headline)")
    bound = [(r["params"], r["bound_ppl_ratio"]) for r in rows if r["bound_ppl_ratio"] is not None]
    if bound:
        left.plot(*zip(*bound), color="grey", ls=":", marker="v", label="pure mode's frozen-head bound")
    if fit is not None:
        end = max(n) if fit["crossing_params"] is None else min(max(max(n), fit["crossing_params"]), 100 * max(n))
        xs = [min(n) * (end / min(n)) ** (i / 50) for i in range(51)]
        beyond = " (past the last size: extrapolation)" if end > max(n) else ""
        left.plot(xs, [fitted(fit, x) for x in xs], color="black", ls="--", lw=1, label=f"CLSO's fitted line{beyond}")
    left.axhline(TARGET_RATIO, color="red", lw=1, label=f"hypothesis: ratio ≤ {TARGET_RATIO:g}")
    ticks = [f"{r['n_layer']}×{r['n_embd']}\n{r['params'] / 1e6:.2f} M" for r in rows]
    for axes in (left, right):  # a few sizes in one decade: each size is a tick, no minor labels
        axes.set_xscale("log")
        axes.set_xticks(n, ticks)
        axes.xaxis.set_minor_formatter(NullFormatter())
    left.set_yscale("log")
    left.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    low, high = left.get_ylim()  # minor labels only where they do not crowd: within about a decade
    left.yaxis.set_minor_formatter(FormatStrFormatter("%g") if high / low < 30 else NullFormatter())
    left.set_xlabel("parameters (dense GPT-2)")
    left.set_ylabel("val perplexity / AdamW's")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)  # below: inside, it hid points
    methods = ", ".join(sorted({r["energy_method"] for r in rows}))
    right.plot(n, [r["energy_ratio"] for r in rows], marker="o", label=f"energy ({methods})")
    right.plot(n, [r["flops_ratio"] for r in rows], marker="s", label="FLOPs")
    right.axhline(ENERGY_SHARE, color="red", lw=1, label=f"hypothesis: ≤ {ENERGY_SHARE:g}")
    right.set_ylim(bottom=0)
    right.set_xlabel("parameters (dense GPT-2)")
    right.set_ylabel("CLSO's cost / AdamW's")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle("How the verdict moves with size (clso scaling table)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())

"""Stage `transfer`: CLSO's searched model and the AdamW baseline fine-tuned on classification
tasks (the protocol's GLUE step), with like-for-like references (the baseline's body frozen under
the same probe; no pretraining, both ways); the task metric on a test split that no training step
saw, and what each side spent."""

import functools
from pathlib import Path

import numpy as np
import torch

from clso.context import derive_seed, setup
from clso.data.tasks import load_task, split_task, task_metric
from clso.data.tokens import TokenData
from clso.energy import EnergyMeter
from clso.io import write_csv_atomic, write_json_atomic
from clso.model.baseline import dense_gpt2, load_baseline
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import BUCKETS, Library
from clso.params import load_params
from clso.progress import progress_bar
from clso.transfer import (
    TOLERANCE,
    CachedBody,
    Classifier,
    Side,
    body_flops,
    chosen_genes,
    classify,
    encode,
    features,
    finetune,
    fit_probe,
    partial_search,
    prior_fitness,
    probe_fitness,
    task_result,
)
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import LIBRARY, PREPARED, TRANSFER_CURVES, Contestant, detail, metrics, searched

PLOT_FIELDS = ("task", "side", "step", "loss")
EVAL_BATCH = 64
PROBES = ("clso_head", "baseline_head", "no_pretraining", "clso_partial")  # the sides that fit a probe
CHOICE = ("val",)  # the split that chooses between CLSO's options: scoring it is charged to them


@stage("transfer", sections=("base", "model", "grid", "transfer"))
def transfer(params: Path = PARAMS_OPTION) -> None:
    """Fine-tune on each of transfer.tasks: CLSO's searched model (transfer.clso_mode at the first of
    grid.seeds) frozen with a linear probe on its features (`head`), and with a search over the genes
    nearest the head before its probe (`partial`); the baseline fine-tuned end to end, and frozen with
    the same probe; a randomly initialised GPT-2 both ways. Writes metrics/transfer.json (CLSO's and the
    fine-tuned baseline's test metric per task), metrics/detail/transfer.json (every side on every split,
    what each spent, the verdict) and plots/transfer.csv: per task and side the loss by step, which is a fine-tuning step's batch
    cross-entropy, a probe's objective (cross-entropy + L2) at each L-BFGS evaluation, or (side
    clso_partial_search) the best fitness after each generation."""
    p = load_params(params)
    t = p.transfer
    tasks = {spec: load_task(spec) for spec in t.tasks}  # every task's problem before any work
    device = setup(p.base)
    data = TokenData.open(PREPARED)
    tokenizer = data.tokenizer()
    pad = int(data.meta["eot_id"])
    clso_run = searched("evolve", t.clso_mode, p.grid)
    meter = p.base.meter_options(device)
    results, curve = {}, []
    with progress_bar() as bar:
        for spec, task in tasks.items():
            splits = split_task(task, t.val_fraction, t.test_fraction, p.base.seed)
            encoded = encode(tokenizer, task.texts, min(t.max_tokens, p.model.block_size), pad)
            # a unit per fine-tuning step and search generation, and one per probe (L-BFGS stops when it converges)
            progress = bar.add_task(spec, total=len(PROBES) + t.partial_generations + 2 * t.finetune_steps, info="")

            def log(side, step, value, spec=spec, progress=progress):
                curve.append({"task": spec, "side": side, "step": step, "loss": value})
                if side not in PROBES:
                    bar.advance(progress)

            run = dict(task=task, splits=splits, encoded=encoded, labels=torch.tensor(task.labels), p=p, meter=meter,
                       device=device)
            bodies = {"clso_head": lambda: _clso_body(p, clso_run, device),
                      "baseline_head": lambda: _dense_body(_baseline(p, data.vocab_size, device)),
                      "no_pretraining": lambda: _dense_body(_random_gpt2(p, data.vocab_size, device))}
            sides = {}
            for side, body in bodies.items():
                sides[side] = _probe_side(*body(), **run, log=functools.partial(log, side),
                                          charged=CHOICE if side == "clso_head" else ())
                bar.advance(progress)
            sides["clso_partial"] = _partial_side(clso_run, **run, log=log)
            bar.advance(progress)
            for side, gpt2 in (("baseline", lambda: _baseline(p, data.vocab_size, device)),
                               ("no_pretraining_finetuned", lambda: _random_gpt2(p, data.vocab_size, device))):
                sides[side] = _finetuned_side(gpt2(), **run, log=functools.partial(log, side))
            results[spec] = task_result(task, splits, sides)
    write_json_atomic(metrics("transfer"), {spec: {f"{side}_{split}": r[side][split] for side in ("clso", "baseline")
                                                   for split in r["majority_class"]} for spec, r in results.items()})
    write_json_atomic(detail("transfer"), {"clso": clso_run.name, "pooling": t.pooling, "tolerance": TOLERANCE,
                                           "tasks": results})
    write_csv_atomic(TRANSFER_CURVES, PLOT_FIELDS, curve)
    for spec, r in results.items():
        c, b = r["clso"], r["baseline"]
        print(f"transfer {spec}: test {r['metric']} CLSO {c['test']:.4f} ({c['option']}), baseline fine-tuned "
              f"{b['test']:.4f}; within {TOLERANCE:.0%}: {'yes' if r['clso_within_tolerance']['test'] else 'no'}; "
              f"energy {r['energy_ratio']:.3g}× the baseline's")


def _baseline(p, vocab_size: int, device):
    return load_baseline(Contestant("baseline").model_dir, ModelConfig.from_params(p.model, vocab_size, layer_gains=False),
                         seed=p.base.seed, device=device)


def _clso_body(p, clso_run: Contestant, device):
    """CLSO's searched model, its hidden states and the FLOPs of its body (of the genome it has now)."""
    model = CrystallineGPT2.load(clso_run.model_dir, Library.load(LIBRARY), seed=p.base.seed, device=device)
    return (model, lambda ids: model.gpt2.transformer(input_ids=ids, use_cache=False).last_hidden_state,
            lambda T, B: body_flops(model.config.gpt2(), T, B, model.linear_flops(model.genome)))


def _dense_body(gpt2):
    return (gpt2, lambda ids: gpt2.transformer(input_ids=ids, use_cache=False).last_hidden_state,
            lambda T, B: body_flops(gpt2.config, T, B))


def _random_gpt2(p, vocab_size: int, device):
    config = ModelConfig.from_params(p.model, vocab_size, layer_gains=False)
    return dense_gpt2(config, derive_seed(p.base.seed, "transfer-no-pretraining"), device).eval()


def _fit_probe(task, splits, encoded, labels, hidden_fn, flops_fn, p, device, log, charged: tuple[str, ...]):
    """A probe on a frozen body's train features, its metric on train (from the features it was fitted
    on) and on the `charged` splits: run under the caller's meter. Returns the probe, those scores,
    the FLOPs of fitting and of scoring the charged splits, and how the fit ended."""
    t = p.transfer
    train_x, feature_flops = features(hidden_fn, encoded, splits["train"], t.pooling, EVAL_BATCH, device, flops_fn)
    probe, probe_flops, fit = fit_probe(train_x, labels[splits["train"]].to(device), len(task.label_names),
                                        iterations=t.head_iterations, l2=t.head_l2,
                                        seed=derive_seed(p.base.seed, "transfer-head"), on_step=log)
    scores, scoring_flops = _probe_scores(task, {k: splits[k] for k in charged}, encoded, labels, hidden_fn, flops_fn,
                                          probe, p, device)
    with torch.no_grad():
        scores["train"] = task_metric(task.metric, probe(train_x).argmax(-1).cpu().numpy(),
                                      labels[splits["train"]].numpy())
    return probe, scores, feature_flops + probe_flops + scoring_flops, fit


def _probe_scores(task, splits, encoded, labels, hidden_fn, flops_fn, probe, p, device) -> tuple[dict, int]:
    """The metric of a probe on a frozen body on each of `splits`, and the FLOPs of scoring them."""
    scores, flops = {}, 0
    with torch.no_grad():
        for split, idx in splits.items():
            x, cost = features(hidden_fn, encoded, idx, p.transfer.pooling, EVAL_BATCH, device, flops_fn)
            scores[split] = task_metric(task.metric, probe(x).argmax(-1).cpu().numpy(), labels[idx].numpy())
            flops += cost
    return scores, flops


def _uncharged_scores(task, splits, encoded, labels, hidden_fn, flops_fn, probe, p, device, charged) -> dict:
    """The held-out splits `_fit_probe` did not score, charged to no one."""
    rest = {k: v for k, v in splits.items() if k not in (*charged, "train")}
    return _probe_scores(task, rest, encoded, labels, hidden_fn, flops_fn, probe, p, device)[0]


def _probe_side(model, hidden_fn, flops_fn, *, task, splits, encoded, labels, p, meter, device, log,
                charged: tuple[str, ...] = ()) -> Side:
    """A probe on a frozen body; scoring the `charged` splits is charged to it (CLSO's options: val
    chooses between them), any other scoring to no one."""
    with EnergyMeter(**meter) as trained:
        probe, scores, flops, fit = _fit_probe(task, splits, encoded, labels, hidden_fn, flops_fn, p, device, log,
                                               charged)
    scores |= _uncharged_scores(task, splits, encoded, labels, hidden_fn, flops_fn, probe, p, device, charged)
    return Side(scores, trained.reading, flops, fit.as_metrics())


def _partial_side(clso_run: Contestant, *, task, splits, encoded, labels, p, meter, device, log) -> Side:
    """A search over the chosen genes, its fitness a probe's two-fold loss on a batch of train
    examples; then a probe on the whole train split, as in `head`, and val scored for the choice.
    The blocks below the first chosen gene never change: CachedBody runs them once on the batch.
    The final probe's train features recompute those blocks, which `head` computed too."""
    t = p.transfer
    model, hidden_fn, flops_fn = _clso_body(p, clso_run, device)
    pretrained = np.array(model.genome)
    chosen = chosen_genes(len(pretrained), t.partial_share)
    rng = np.random.default_rng(derive_seed(p.base.seed, "transfer-partial"))
    batch = rng.choice(splits["train"], size=min(t.partial_examples, len(splits["train"])), replace=False)
    batch_labels, n_classes = labels[batch].to(device), len(task.label_names)

    with EnergyMeter(**meter) as trained:
        body = CachedBody(model, encoded, batch, int(chosen[0]) // len(BUCKETS), EVAL_BATCH, device)

        def fitness(genome):
            x, flops = body.features(genome, t.pooling)
            loss, probe_flops = probe_fitness(x, batch_labels, n_classes, iterations=t.partial_head_iterations,
                                              l2=t.partial_l2, seed=derive_seed(p.base.seed, "transfer-partial-head"))
            return loss, flops + probe_flops

        best, best_fitness, pretrained_fitness, search_flops = partial_search(
            pretrained, chosen, model.library.size, fitness, population=t.partial_population,
            generations=t.partial_generations, seed=derive_seed(p.base.seed, "transfer-partial-ga"),
            on_generation=lambda g, f: log("clso_partial_search", g, f))
        # the best of many genomes on one batch beats its batch by luck too: keep the search's genes only
        # when they beat both the pretrained genes and the label prior, which a body carrying nothing gets
        prior = prior_fitness(batch_labels.cpu(), n_classes)
        accepted = best_fitness < min(pretrained_fitness, prior)
        best = best if accepted else pretrained
        model.set_genome(best)
        probe, scores, flops, fit = _fit_probe(task, splits, encoded, labels, hidden_fn, flops_fn, p, device,
                                               functools.partial(log, "clso_partial"), CHOICE)
    scores |= _uncharged_scores(task, splits, encoded, labels, hidden_fn, flops_fn, probe, p, device, CHOICE)
    return Side(scores, trained.reading, body.flops + search_flops + flops,
                {**fit.as_metrics(), "chosen_genes": chosen.tolist(),
                 "changed_genes": np.flatnonzero(best != pretrained).tolist(), "genome": best.tolist(),
                 "best_fitness": best_fitness, "pretrained_fitness": pretrained_fitness, "prior_fitness": prior,
                 "search_accepted": bool(accepted),
                 "search": "GA" if len(chosen) > 1 else "random search (one chosen gene: every child's is redrawn)"})


def _finetuned_side(gpt2, *, task, splits, encoded, labels, p, meter, device, log) -> Side:
    t = p.transfer
    model = Classifier(gpt2, len(task.label_names), t.pooling, derive_seed(p.base.seed, "transfer-head")).to(device)
    with EnergyMeter(**meter) as trained:
        flops = finetune(model, encoded, labels, splits["train"], steps=t.finetune_steps, lr=t.finetune_lr,
                         weight_decay=t.weight_decay, batch_size=t.batch_size,
                         seed=derive_seed(p.base.seed, "transfer-finetune"), device=device, on_step=log)
    scores = {split: task_metric(task.metric, classify(model, encoded, idx, EVAL_BATCH, device), labels[idx].numpy())
              for split, idx in splits.items()}
    return Side(scores, trained.reading, flops)


if __name__ == "__main__":
    run_alone("transfer")

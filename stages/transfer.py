"""Stage `transfer`: CLSO's searched model and the AdamW baseline fine-tuned on classification
tasks (the protocol's GLUE step), with a no-pretraining reference; the task metric on a test split
that no training step saw, and what each side spent."""

import functools
import math
from pathlib import Path

import numpy as np
import torch

from clso.baseline import dense_gpt2
from clso.context import derive_seed, setup
from clso.data import TokenData
from clso.energy import EnergyMeter
from clso.io import write_csv_atomic, write_json_atomic
from clso.model import ModelConfig
from clso.params import load_params
from clso.progress import progress_bar
from clso.tasks import load_task, split_record, split_task, task_metric
from clso.transfer import (TOLERANCE, Classifier, body_flops, chosen_genes, classify, encode, features, finetune,
                           fitted_head_loss, partial_search, statement, train_head, within_tolerance)
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.final_models import baseline_model, searched_model
from stages.variants import Variant

METRICS = Path("metrics/transfer.json")
PLOT = Path("plots/transfer.csv")
PLOT_FIELDS = ("task", "side", "step", "train_loss")
EVAL_BATCH = 64


@stage("transfer", sections=("base", "model", "grid", "transfer"))
def transfer(params: Path = PARAMS_OPTION) -> None:
    """Fine-tune on each of transfer.tasks: CLSO's searched model (transfer.clso_mode at the first of
    grid.seeds) frozen with a head trained on its features (`head`), and with a GA over the genes
    nearest the head before its head is trained (`partial`); the baseline fine-tuned end to end; and
    the head on a randomly initialised GPT-2. Writes metrics/transfer.json and plots/transfer.csv
    (each side's training loss per step, and partial's best fitness per generation)."""
    p = load_params(params)
    t = p.transfer
    device = setup(p.base)
    data = TokenData.open("data/prepared")
    tokenizer = data.tokenizer()
    pad = int(data.meta["eot_id"])
    variant = Variant("evolve", t.clso_mode, p.grid.seeds[0])
    meter = dict(device=device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts)
    tasks = {spec: load_task(spec) for spec in t.tasks}  # every task's problem before any work
    results, curve = {}, []
    with progress_bar() as bar:
        for spec, task in tasks.items():
            splits = split_task(task, t.val_fraction, t.test_fraction, p.base.seed)
            encoded = encode(tokenizer, task.texts, min(t.max_tokens, p.model.block_size), pad)
            labels = torch.tensor(task.labels)
            progress = bar.add_task(spec, total=3 * t.head_steps + t.partial_generations + t.finetune_steps, info="")

            def log(side, step, value, spec=spec, progress=progress):
                curve.append({"task": spec, "side": side, "step": step, "train_loss": value})
                bar.advance(progress)

            run = dict(task=task, splits=splits, encoded=encoded, labels=labels, p=p, meter=meter, device=device)
            sides = {"clso_head": _head_side(*_clso_body(p, variant, device), **run,
                                             log=functools.partial(log, "clso_head")),
                     "clso_partial": _partial_side(variant, **run, log=log),
                     "no_pretraining": _head_side(*_random_body(p, data.vocab_size, device), **run,
                                                  log=functools.partial(log, "no_pretraining")),
                     "baseline": _finetuned_side(**run, vocab_size=data.vocab_size,
                                                 log=functools.partial(log, "baseline"))}
            results[spec] = _task_result(task, splits, sides)
    write_json_atomic(METRICS, {"clso_variant": variant.name, "pooling": t.pooling, "tolerance": TOLERANCE,
                                "tasks": results})
    write_csv_atomic(PLOT, PLOT_FIELDS, curve)
    for spec, r in results.items():
        print(f"transfer {spec}: {statement(r)}")


def _clso_body(p, variant: Variant, device):
    """CLSO's searched model, its hidden states and the FLOPs of its body (of the genome it has now)."""
    model = searched_model(p, variant, device)
    return (model, lambda ids: model.gpt2.transformer(input_ids=ids).last_hidden_state,
            lambda T, B: body_flops(model.config.gpt2(), T, B, model.linear_flops(model.genome)))


def _random_body(p, vocab_size: int, device):
    config = ModelConfig.from_params(p.model, vocab_size, layer_gains=False)
    model = dense_gpt2(config, derive_seed(p.base.seed, "transfer-no-pretraining"), device).eval()
    return (model, lambda ids: model.transformer(input_ids=ids).last_hidden_state,
            lambda T, B: body_flops(config.gpt2(), T, B))


def _train_and_score_head(task, splits, encoded, labels, hidden_fn, flops_fn, p, device, log) -> tuple[dict, int]:
    """Train features and the head's training (the caller meters them); val and test scores."""
    t = p.transfer
    train_x, feature_flops = features(hidden_fn, encoded, splits["train"], t.pooling, EVAL_BATCH, device, flops_fn)
    head, head_flops = train_head(train_x, labels[splits["train"]].to(device), len(task.label_names),
                                  steps=t.head_steps, lr=t.head_lr, weight_decay=t.weight_decay,
                                  batch_size=t.batch_size, seed=derive_seed(p.base.seed, "transfer-head"), on_step=log)
    return head, feature_flops + head_flops


def _scores(task, splits, encoded, labels, hidden_fn, flops_fn, head, p, device) -> dict:
    """Val and test metric of a head on a frozen body: scoring, charged to no one."""
    scores = {}
    with torch.no_grad():
        for split in (s for s in splits if s != "train"):
            x, _ = features(hidden_fn, encoded, splits[split], p.transfer.pooling, EVAL_BATCH, device, flops_fn)
            scores[split] = task_metric(task.metric, head(x).argmax(-1).cpu().numpy(), labels[splits[split]].numpy())
    return scores


def _head_side(model, hidden_fn, flops_fn, *, task, splits, encoded, labels, p, meter, device, log) -> dict:
    with EnergyMeter(**meter) as trained:
        head, flops = _train_and_score_head(task, splits, encoded, labels, hidden_fn, flops_fn, p, device, log)
    return {**_scores(task, splits, encoded, labels, hidden_fn, flops_fn, head, p, device),
            **trained.reading.as_metrics(), "flops": flops}


def _partial_side(variant, *, task, splits, encoded, labels, p, meter, device, log) -> dict:
    """A GA over the chosen genes, its fitness a head's loss on train examples; then the head."""
    t = p.transfer
    model, hidden_fn, flops_fn = _clso_body(p, variant, device)
    pretrained = np.array(model.genome)
    chosen = chosen_genes(len(pretrained), t.partial_share)
    rng = np.random.default_rng(derive_seed(p.base.seed, "transfer-partial"))
    batch = rng.choice(splits["train"], size=min(t.partial_examples, len(splits["train"])), replace=False)
    fit, score = batch[:len(batch) // 2], batch[len(batch) // 2:]

    def fitness(genome):
        model.set_genome(genome)
        (fit_x, a), (score_x, b) = (features(hidden_fn, encoded, idx, t.pooling, EVAL_BATCH, device, flops_fn)
                                    for idx in (fit, score))
        loss, c = fitted_head_loss(fit_x, labels[fit].to(device), score_x, labels[score].to(device),
                                   len(task.label_names), steps=t.partial_head_steps, lr=t.head_lr,
                                   seed=derive_seed(p.base.seed, "transfer-partial-head"))
        return loss, a + b + c

    with EnergyMeter(**meter) as trained:
        best, best_fitness, search_flops = partial_search(
            pretrained, chosen, model.library.size, fitness, population=t.partial_population,
            generations=t.partial_generations, seed=derive_seed(p.base.seed, "transfer-partial-ga"),
            on_generation=lambda g, f: log("clso_partial_search", g, f))
        model.set_genome(best)
        head, flops = _train_and_score_head(task, splits, encoded, labels, hidden_fn, flops_fn, p, device,
                                            functools.partial(log, "clso_partial"))
    return {**_scores(task, splits, encoded, labels, hidden_fn, flops_fn, head, p, device),
            **trained.reading.as_metrics(), "flops": search_flops + flops,
            "chosen_genes": chosen.tolist(), "changed_genes": np.flatnonzero(best != pretrained).tolist(),
            "genome": best.tolist(), "best_fitness": best_fitness}


def _finetuned_side(*, task, splits, encoded, labels, p, meter, device, vocab_size, log) -> dict:
    t = p.transfer
    model = Classifier(baseline_model(p, vocab_size, device), len(task.label_names), t.pooling,
                       derive_seed(p.base.seed, "transfer-head")).to(device)
    with EnergyMeter(**meter) as trained:
        flops = finetune(model, encoded, labels, splits["train"], steps=t.finetune_steps, lr=t.finetune_lr,
                         weight_decay=t.weight_decay, batch_size=t.batch_size,
                         seed=derive_seed(p.base.seed, "transfer-finetune"), device=device, on_step=log)
    scores = {split: task_metric(task.metric, classify(model, encoded, idx, EVAL_BATCH, device),
                                 labels[idx].numpy())
              for split, idx in splits.items() if split != "train"}
    return {**scores, **trained.reading.as_metrics(), "flops": flops}


def _task_result(task, splits, sides: dict) -> dict:
    """Every side, the majority-class rate, and the verdict for CLSO's option with the better val metric
    (chosen on val, judged on test)."""
    labels = np.asarray(task.labels)
    test_labels = labels[splits["test"]]
    guess = np.bincount(labels[splits["train"]]).argmax()  # the train split's majority: test picks nothing
    majority = task_metric(task.metric, np.full(len(test_labels), guess), test_labels)
    option = max(("clso_head", "clso_partial"), key=lambda side: sides[side]["val"])
    clso, base = sides[option], sides["baseline"]
    return {"metric": task.metric, "splits": split_record(task, splits), "majority_class_test": majority, **sides,
            "clso_option": option, "clso_within_tolerance": within_tolerance(clso["test"], base["test"]),
            "energy_ratio": clso["energy_wh"] / base["energy_wh"] if base["energy_wh"] else math.inf}

if __name__ == "__main__":
    run_alone("transfer")

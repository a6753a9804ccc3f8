"""Stage `transfer`: CLSO's searched model and the AdamW baseline fine-tuned on classification
tasks (the protocol's GLUE step), with like-for-like references (the baseline's body frozen under
the same probe; no pretraining, both ways); the task metric on a test split that no training step
saw, and what each side spent."""

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clso.baseline import dense_gpt2
from clso.context import derive_seed, setup
from clso.data import TokenData
from clso.energy import EnergyMeter, EnergyReading
from clso.io import write_csv_atomic, write_json_atomic
from clso.library import BUCKETS
from clso.model import ModelConfig
from clso.params import load_params
from clso.progress import progress_bar
from clso.tasks import load_task, split_record, split_task, task_metric
from clso.transfer import (TOLERANCE, Classifier, block_inputs, body_flops, chosen_genes, classify, encode, features,
                           finetune, fit_probe, fitted_probe_loss, partial_search, pool, replay_blocks, statement,
                           within_tolerance)
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.final_models import baseline_model, searched_model
from stages.variants import Variant

METRICS = Path("metrics/transfer.json")
PLOT = Path("plots/transfer.csv")
PLOT_FIELDS = ("task", "side", "step", "train_loss")
EVAL_BATCH = 64
PROBES = ("clso_head", "baseline_head", "no_pretraining", "clso_partial")  # the sides that fit a probe


@stage("transfer", sections=("base", "model", "grid", "transfer"))
def transfer(params: Path = PARAMS_OPTION) -> None:
    """Fine-tune on each of transfer.tasks: CLSO's searched model (transfer.clso_mode at the first of
    grid.seeds) frozen with a linear probe on its features (`head`), and with a search over the genes
    nearest the head before its probe (`partial`); the baseline fine-tuned end to end, and frozen with
    the same probe; a randomly initialised GPT-2 both ways. Writes metrics/transfer.json and
    plots/transfer.csv (each side's training loss per step, and partial's best fitness per generation)."""
    p = load_params(params)
    t = p.transfer
    tasks = {spec: load_task(spec) for spec in t.tasks}  # every task's problem before any work
    device = setup(p.base)
    data = TokenData.open("data/prepared")
    tokenizer = data.tokenizer()
    pad = int(data.meta["eot_id"])
    variant = Variant("evolve", t.clso_mode, p.grid.seeds[0])
    meter = dict(device=device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts)
    results, curve = {}, []
    with progress_bar() as bar:
        for spec, task in tasks.items():
            splits = split_task(task, t.val_fraction, t.test_fraction, p.base.seed)
            encoded = encode(tokenizer, task.texts, min(t.max_tokens, p.model.block_size), pad)
            # a unit per fine-tuning step and search generation, and one per probe (L-BFGS stops when it converges)
            progress = bar.add_task(spec, total=len(PROBES) + t.partial_generations + 2 * t.finetune_steps, info="")

            def log(side, step, value, spec=spec, progress=progress):
                curve.append({"task": spec, "side": side, "step": step, "train_loss": value})
                if side not in PROBES:
                    bar.advance(progress)

            run = dict(task=task, splits=splits, encoded=encoded, labels=torch.tensor(task.labels), p=p, meter=meter,
                       device=device)
            bodies = {"clso_head": lambda: _clso_body(p, variant, device),
                      "baseline_head": lambda: _dense_body(baseline_model(p, data.vocab_size, device)),
                      "no_pretraining": lambda: _dense_body(_random_gpt2(p, data.vocab_size, device))}
            sides = {}
            for side, body in bodies.items():
                sides[side] = _probe_side(*body(), **run, log=functools.partial(log, side))
                bar.advance(progress)
            sides["clso_partial"] = _partial_side(variant, **run, log=log)
            bar.advance(progress)
            for side, gpt2 in (("baseline", lambda: baseline_model(p, data.vocab_size, device)),
                               ("no_pretraining_finetuned", lambda: _random_gpt2(p, data.vocab_size, device))):
                sides[side] = _finetuned_side(gpt2(), **run, log=functools.partial(log, side))
            results[spec] = _task_result(task, splits, sides)
    write_json_atomic(METRICS, {"clso_variant": variant.name, "pooling": t.pooling, "tolerance": TOLERANCE,
                                "tasks": results})
    write_csv_atomic(PLOT, PLOT_FIELDS, curve)
    for spec, r in results.items():
        print(f"transfer {spec}: {statement(r)}")


@dataclass(frozen=True)
class Side:
    """One way of fitting a task: its metric on every split, what its training spent, and the rest."""

    scores: dict[str, float]
    reading: EnergyReading
    flops: int
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return {**self.scores, **self.reading.as_metrics(), "flops": self.flops, **self.extra}


def _clso_body(p, variant: Variant, device):
    """CLSO's searched model, its hidden states and the FLOPs of its body (of the genome it has now)."""
    model = searched_model(p, variant, device)
    return (model, lambda ids: model.gpt2.transformer(input_ids=ids, use_cache=False).last_hidden_state,
            lambda T, B: body_flops(model.config.gpt2(), T, B, model.linear_flops(model.genome)))


def _dense_body(gpt2):
    return (gpt2, lambda ids: gpt2.transformer(input_ids=ids, use_cache=False).last_hidden_state,
            lambda T, B: body_flops(gpt2.config, T, B))


def _random_gpt2(p, vocab_size: int, device):
    config = ModelConfig.from_params(p.model, vocab_size, layer_gains=False)
    return dense_gpt2(config, derive_seed(p.base.seed, "transfer-no-pretraining"), device).eval()


def _fit_probe(task, splits, encoded, labels, hidden_fn, flops_fn, p, device, log):
    """The train features and the probe fitted on them (the caller meters both), and their FLOPs."""
    t = p.transfer
    train_x, feature_flops = features(hidden_fn, encoded, splits["train"], t.pooling, EVAL_BATCH, device, flops_fn)
    probe, probe_flops = fit_probe(train_x, labels[splits["train"]].to(device), len(task.label_names),
                                   iterations=t.head_iterations, l2=t.head_l2,
                                   seed=derive_seed(p.base.seed, "transfer-head"), on_step=log)
    return probe, feature_flops + probe_flops


def _probe_scores(task, splits, encoded, labels, hidden_fn, flops_fn, probe, p, device) -> dict:
    """The metric of a probe on a frozen body on every split, train included: scoring, charged to no one."""
    with torch.no_grad():
        return {split: task_metric(task.metric, probe(features(hidden_fn, encoded, idx, p.transfer.pooling,
                                                                EVAL_BATCH, device, flops_fn)[0]).argmax(-1).cpu().numpy(),
                                   labels[idx].numpy())
                for split, idx in splits.items()}


def _probe_side(model, hidden_fn, flops_fn, *, task, splits, encoded, labels, p, meter, device, log) -> Side:
    with EnergyMeter(**meter) as trained:
        probe, flops = _fit_probe(task, splits, encoded, labels, hidden_fn, flops_fn, p, device, log)
    return Side(_probe_scores(task, splits, encoded, labels, hidden_fn, flops_fn, probe, p, device), trained.reading,
                flops)


def _partial_side(variant, *, task, splits, encoded, labels, p, meter, device, log) -> Side:
    """A search over the chosen genes, its fitness a probe's loss on train examples; then the probe.
    The blocks below the first chosen gene never change, so their outputs on the fitness examples
    are computed once and each genome runs only the blocks above."""
    t = p.transfer
    model, hidden_fn, flops_fn = _clso_body(p, variant, device)
    gpt, config = model.gpt2.transformer, model.config.gpt2()
    pretrained = np.array(model.genome)
    chosen = chosen_genes(len(pretrained), t.partial_share)
    first = int(chosen[0]) // len(BUCKETS)  # the first block a chosen gene sits in
    rng = np.random.default_rng(derive_seed(p.base.seed, "transfer-partial"))
    batch = rng.choice(splits["train"], size=min(t.partial_examples, len(splits["train"])), replace=False)
    halves = batch[:len(batch) // 2], batch[len(batch) // 2:]

    with EnergyMeter(**meter) as trained:
        cached, prefix_flops = [], 0
        for idx in halves:
            cached.append([(block_inputs(gpt, ids.to(device), first), lengths)
                           for ids, lengths in encoded.batches(idx, EVAL_BATCH)])
            prefix_flops += sum(body_flops(config, ids.shape[1], len(ids), model.linear_flops(pretrained),
                                           range(first)) for ids, _ in encoded.batches(idx, EVAL_BATCH))

        @torch.no_grad()
        def fitness(genome):
            model.set_genome(genome)
            layers, flops = range(first, config.n_layer), 0
            fit_x, score_x = (torch.cat([pool(replay_blocks(gpt, inputs, first), lengths, t.pooling).float()
                                         for inputs, lengths in part]) for part in cached)
            for idx in halves:
                flops += sum(body_flops(config, ids.shape[1], len(ids), model.linear_flops(genome), layers)
                             for ids, _ in encoded.batches(idx, EVAL_BATCH))
            with torch.enable_grad():
                loss, probe_flops = fitted_probe_loss(
                    fit_x, labels[halves[0]].to(device), score_x, labels[halves[1]].to(device), len(task.label_names),
                    iterations=t.partial_head_iterations, l2=t.head_l2,
                    seed=derive_seed(p.base.seed, "transfer-partial-head"))
            return loss, flops + probe_flops

        best, best_fitness, search_flops = partial_search(
            pretrained, chosen, model.library.size, fitness, population=t.partial_population,
            generations=t.partial_generations, seed=derive_seed(p.base.seed, "transfer-partial-ga"),
            on_generation=lambda g, f: log("clso_partial_search", g, f))
        model.set_genome(best)
        probe, flops = _fit_probe(task, splits, encoded, labels, hidden_fn, flops_fn, p, device,
                                  functools.partial(log, "clso_partial"))
    return Side(_probe_scores(task, splits, encoded, labels, hidden_fn, flops_fn, probe, p, device), trained.reading,
                prefix_flops + search_flops + flops,
                {"chosen_genes": chosen.tolist(), "changed_genes": np.flatnonzero(best != pretrained).tolist(),
                 "genome": best.tolist(), "best_fitness": best_fitness,
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


def _task_result(task, splits, sides: dict[str, Side]) -> dict:
    """Every side; the majority-class rate; and the verdict for CLSO: its option with the better val
    metric (chosen on val, judged on test), charged both options' energy, since choosing took both."""
    labels = np.asarray(task.labels)
    test_labels = labels[splits["test"]]
    guess = np.bincount(labels[splits["train"]]).argmax()  # the train split's majority: test picks nothing
    majority = task_metric(task.metric, np.full(len(test_labels), guess), test_labels)
    option = max(("clso_head", "clso_partial"), key=lambda side: sides[side].scores["val"])
    head, partial = sides["clso_head"], sides["clso_partial"]
    clso = Side(sides[option].scores, head.reading.plus(partial.reading), head.flops + partial.flops,
                {"option": option.removeprefix("clso_")})
    base = sides["baseline"]
    return {"metric": task.metric, "splits": split_record(task, splits), "majority_class_test": majority,
            **{name: side.metrics() for name, side in {**sides, "clso": clso}.items()},
            "clso_within_tolerance": within_tolerance(clso.scores["test"], base.scores["test"]),
            "probe_within_tolerance": within_tolerance(head.scores["test"], sides["baseline_head"].scores["test"]),
            "energy_ratio": clso.reading.energy_wh / base.reading.energy_wh if base.reading.energy_wh else math.inf}


if __name__ == "__main__":
    run_alone("transfer")

"""Stage `transfer`: CLSO's searched model and the AdamW baseline fine-tuned on classification
tasks (the protocol's GLUE step), with a no-pretraining reference; the task metric on a test split
that no training step saw, and what each side spent."""

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
from clso.transfer import TOLERANCE, Classifier, body_flops, classify, encode, features, finetune, statement, train_head
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
    grid.seeds) with its genome and continuous parts frozen and a head trained on its features; the
    baseline fine-tuned end to end; and the head on a randomly initialised GPT-2. Writes
    metrics/transfer.json and plots/transfer.csv (training loss per step of each side)."""
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
            bar_task = bar.add_task(spec, total=2 * t.head_steps + t.finetune_steps, info="")
            sides = {}
            for side in ("clso", "no_pretraining"):
                def log(step, loss, side=side):
                    curve.append({"task": spec, "side": side, "step": step, "train_loss": loss})
                    bar.advance(bar_task)

                hidden_fn, flops_fn = _frozen_body(side, p, variant, data.vocab_size, device)
                sides[side] = _head_side(task, splits, encoded, labels, hidden_fn, flops_fn, t, p, meter, device, log)
            baseline_log = lambda step, loss: (curve.append({"task": spec, "side": "baseline", "step": step,  # noqa: E731
                                                             "train_loss": loss}), bar.advance(bar_task))
            sides["baseline"] = _finetuned_side(task, splits, encoded, labels, p, data.vocab_size, meter, device,
                                                baseline_log)
            results[spec] = _task_result(task, splits, sides)
    write_json_atomic(METRICS, {"clso_variant": variant.name, "pooling": t.pooling, "tolerance": TOLERANCE,
                                "tasks": results})
    write_csv_atomic(PLOT, PLOT_FIELDS, curve)
    for spec, r in results.items():
        print(f"transfer {spec}: {statement(r)}")


def _frozen_body(side: str, p, variant: Variant, vocab_size: int, device):
    """The body a head is trained on: CLSO's searched model, or a randomly initialised dense GPT-2."""
    if side == "clso":
        model = searched_model(p, variant, device)
        linear = model.linear_flops(model.genome)
        return (lambda ids: model.gpt2.transformer(input_ids=ids).last_hidden_state,
                lambda T, B: body_flops(model.config.gpt2(), T, B, linear))
    config = ModelConfig.from_params(p.model, vocab_size, layer_gains=False)
    model = dense_gpt2(config, derive_seed(p.base.seed, "transfer-no-pretraining"), device).eval()
    return (lambda ids: model.transformer(input_ids=ids).last_hidden_state,
            lambda T, B: body_flops(config.gpt2(), T, B))


def _head_side(task, splits, encoded, labels, hidden_fn, flops_fn, t, p, meter, device, log) -> dict:
    """Features of the train examples and the head's training, metered; val and test scored apart."""
    with EnergyMeter(**meter) as trained:
        train_x, feature_flops = features(hidden_fn, encoded, splits["train"], t.pooling, EVAL_BATCH, device, flops_fn)
        head, head_flops = train_head(train_x, labels[splits["train"]].to(device), len(task.label_names),
                                      steps=t.head_steps, lr=t.head_lr, weight_decay=t.weight_decay,
                                      batch_size=t.batch_size, seed=derive_seed(p.base.seed, "transfer-head"),
                                      on_step=log)
    scores = {}
    with torch.no_grad():
        for split in (s for s in splits if s != "train"):
            x, _ = features(hidden_fn, encoded, splits[split], t.pooling, EVAL_BATCH, device, flops_fn)
            scores[split] = task_metric(task.metric, head(x).argmax(-1).cpu().numpy(), labels[splits[split]].numpy())
    return {**scores, **trained.reading.as_metrics(), "flops": feature_flops + head_flops}


def _finetuned_side(task, splits, encoded, labels, p, vocab_size, meter, device, log) -> dict:
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
    test_labels = np.asarray(task.labels)[splits["test"]]
    majority = task_metric(task.metric, np.full(len(test_labels), np.bincount(test_labels).argmax()), test_labels)
    clso, base = sides["clso"], sides["baseline"]
    return {"metric": task.metric, "splits": split_record(task, splits), "majority_class_test": majority, **sides,
            "clso_within_tolerance": clso["test"] >= (1 - TOLERANCE) * base["test"],
            "energy_ratio": clso["energy_wh"] / base["energy_wh"] if base["energy_wh"] else math.inf}



if __name__ == "__main__":
    run_alone("transfer")

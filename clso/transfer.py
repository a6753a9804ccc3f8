"""Transfer (the protocol's GLUE step): a pretrained GPT-2 with a classification head on its
pooled final hidden state (after ln_f), trained on a task's train split, scored on its test split.

    CLSO, `head`        genome and continuous parts frozen; only the head trains, with AdamW, on
                        the features the frozen body gives (computed once: no backward through it)
    baseline            the dense AdamW-pretrained model fine-tuned end to end with AdamW
    no pretraining      the same head-only training on a randomly initialised dense GPT-2: what a
                        frozen body gives without any pretraining

Texts are the pipeline's tokens, cut to `max_tokens` and padded on the right: attention is causal,
so real tokens never see the padding, and pooling (the last real token, or the mean of the real
tokens) never reads it. Only train-split examples reach any training step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clso import ga
from clso.baseline import adamw_optimizer
from clso.flops import dense_linear_flops, forward_flops

POOLINGS = ("last", "mean")
TOLERANCE = 0.05  # CLSO transfers when its test metric is within 5 % of the baseline's


@dataclass(frozen=True)
class Encoded:
    ids: torch.Tensor  # (N, T) int64, right-padded
    lengths: torch.Tensor  # (N,) real tokens of each, at least 1

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx`, cut to their longest real length (no column of padding alone)."""
        lengths = self.lengths[idx]
        return self.ids[idx, :int(lengths.max())], lengths


def encode(tokenizer, texts, max_tokens: int, pad_id: int) -> Encoded:
    rows = [enc.ids[:max_tokens] or [pad_id] for enc in tokenizer.encode_batch(list(texts))]
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return Encoded(ids, torch.tensor([len(r) for r in rows]))


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, d) hidden states → (B, d): the last real token's, or the mean over the real tokens."""
    lengths = lengths.to(hidden.device)
    if pooling == "last":
        return hidden[torch.arange(len(hidden), device=hidden.device), lengths - 1]
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


def body_flops(gpt2_config, seq_len: int, n_seqs: int, linear_flops=None) -> int:
    """Forward FLOPs of the body alone (no LM head: a classifier never computes the vocabulary)."""
    head = dense_linear_flops(gpt2_config.n_embd, gpt2_config.vocab_size) * seq_len * n_seqs
    return forward_flops(gpt2_config, seq_len, n_seqs, linear_flops) - head


@torch.no_grad()
def features(hidden_fn, encoded: Encoded, idx: np.ndarray, pooling: str, batch_size: int, device,
             flops_fn) -> tuple[torch.Tensor, int]:
    """Pooled features of examples `idx` from a frozen body, and the FLOPs they cost.
    `hidden_fn(ids)` gives (B, T, d) final hidden states; `flops_fn(T, B)` the body's forward FLOPs."""
    out, flops = [], 0
    for start in range(0, len(idx), batch_size):
        ids, lengths = encoded.batch(idx[start:start + batch_size])
        out.append(pool(hidden_fn(ids.to(device)), lengths, pooling).float())
        flops += flops_fn(ids.shape[1], len(ids))
    return torch.cat(out), flops


def seeded_head(d: int, n_classes: int, seed: int) -> nn.Linear:
    """A linear head initialised from `seed` alone, without moving torch's global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(d, n_classes)


def train_head(train_x: torch.Tensor, train_y: torch.Tensor, n_classes: int, *, steps: int, lr: float,
               weight_decay: float, batch_size: int, seed: int, on_step=None) -> tuple[nn.Linear, int]:
    """A linear head on fixed features by AdamW on random train batches; returns it and its FLOPs
    (per example per step: the forward 2·d·C and the weight gradient 2·d·C; no input gradient)."""
    generator = torch.Generator().manual_seed(seed)
    head = seeded_head(train_x.shape[1], n_classes, seed).to(train_x.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (min(batch_size, len(train_x)),), generator=generator)
        loss = F.cross_entropy(head(train_x[idx.to(train_x.device)]), train_y[idx.to(train_y.device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, float(loss.detach()))
    return head.eval(), steps * min(batch_size, len(train_x)) * 4 * train_x.shape[1] * n_classes


class Classifier(nn.Module):
    """A dense GPT-2's body with a linear head on its pooled final hidden state."""

    def __init__(self, gpt2, n_classes: int, pooling: str, seed: int):
        super().__init__()
        self.body = gpt2.transformer
        self.head = seeded_head(gpt2.config.n_embd, n_classes, seed)
        self.pooling = pooling

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(pool(self.body(input_ids=ids).last_hidden_state, lengths, self.pooling))


def finetune(model: Classifier, encoded: Encoded, labels: torch.Tensor, train_idx: np.ndarray, *, steps: int,
             lr: float, weight_decay: float, batch_size: int, seed: int, device, on_step=None) -> int:
    """End to end with AdamW on random batches of the train examples; returns the FLOPs (forward and
    backward of body and head, everything trainable: 3 × forward)."""
    rng = np.random.default_rng(seed)
    # the baseline's own optimizer: its recipe, fused on CUDA as in pretraining
    opt = adamw_optimizer(model, lr, weight_decay, "fused" if torch.device(device).type == "cuda" else "default")
    config, flops = model.body.config, 0
    d, classes = config.n_embd, model.head.out_features
    model.train()
    for step in range(steps):
        idx = rng.choice(train_idx, size=min(batch_size, len(train_idx)), replace=False)
        ids, lengths = encoded.batch(idx)
        loss = F.cross_entropy(model(ids.to(device), lengths), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        flops += 3 * (body_flops(config, ids.shape[1], len(ids)) + dense_linear_flops(d, classes) * len(ids))
        if on_step:
            on_step(step, float(loss.detach()))
    model.eval()
    return flops


@torch.no_grad()
def classify(model: Classifier, encoded: Encoded, idx: np.ndarray, batch_size: int, device) -> np.ndarray:
    out = []
    for start in range(0, len(idx), batch_size):
        ids, lengths = encoded.batch(idx[start:start + batch_size])
        out.append(model(ids.to(device), lengths).argmax(-1).cpu())
    return torch.cat(out).numpy()


def within_tolerance(clso: float, baseline: float) -> bool:
    """CLSO's metric at most TOLERANCE of the baseline's magnitude below it (a Matthews correlation
    can be 0 or negative, where a ratio would mean nothing)."""
    return clso >= baseline - TOLERANCE * abs(baseline)


def statement(r: dict) -> str:
    """Did CLSO (its option with the better val metric) transfer within the tolerance of the
    baseline's test metric, and at what energy."""
    c, b, n = r[r["clso_option"]], r["baseline"], r["no_pretraining"]
    option = r["clso_option"].removeprefix("clso_")
    return (f"test {r['metric']} CLSO ({option}, the better on val) {c['test']:.4f}, baseline {b['test']:.4f}, "
            f"no pretraining {n['test']:.4f}, majority class {r['majority_class_test']:.4f}: CLSO "
            f"{'transfers' if r['clso_within_tolerance'] else 'does not transfer'} within {TOLERANCE:.0%} of the "
            f"baseline, at {r['energy_ratio']:.3g}× its fine-tuning energy ({c['energy_wh']:.4g} Wh {c['method']} "
            f"against {b['energy_wh']:.4g} Wh {b['method']})")


# --- `partial`: a GA over the genes nearest the head, plus the head ----------------------------

def chosen_genes(genome_length: int, share: float) -> np.ndarray:
    """The genes `partial` may change: the last round(share × length) of the genome (at least one),
    the layers nearest the head; every other gene stays as pretraining found it."""
    k = min(genome_length, max(1, round(share * genome_length)))
    return np.arange(genome_length - k, genome_length)


def fitted_head_loss(fit_x: torch.Tensor, fit_y: torch.Tensor, score_x: torch.Tensor, score_y: torch.Tensor,
                     n_classes: int, *, steps: int, lr: float, seed: int) -> tuple[float, int]:
    """The fitness of a body: a linear head fitted (full-batch Adam) on one half of a train batch's
    features, its loss on the other half; and the FLOPs of fitting and scoring it."""
    head = seeded_head(fit_x.shape[1], n_classes, seed).to(fit_x.device)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(head(fit_x), fit_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        score = float(F.cross_entropy(head(score_x), score_y))
    d = fit_x.shape[1]
    return score, steps * len(fit_x) * 4 * d * n_classes + len(score_x) * 2 * d * n_classes


def partial_search(genome: np.ndarray, chosen: np.ndarray, library_size: int, evaluate, *, population: int,
                   generations: int, seed: int, on_generation=None) -> tuple[np.ndarray, float, int]:
    """A GA (clso.ga) over the `chosen` genes of `genome`, the others fixed; `evaluate(full genome)`
    gives (fitness, FLOPs). The pretrained genes are one of the first population, so the search can
    only find a genome at least as fit on its batch. Returns the best full genome, its fitness and
    the FLOPs of every evaluation (each distinct genome evaluated once)."""
    config = ga.GAConfig(population=population, genome_length=len(chosen), library_size=library_size,
                         elite=min(2, population - 1), mutation_rate=max(0.08, 1 / len(chosen)),
                         crossover="single_point" if len(chosen) > 1 else "uniform")  # one gene has no cut point
    cache: dict[tuple[int, ...], float] = {}
    flops = 0

    def full(part: np.ndarray) -> np.ndarray:
        out = genome.copy()
        out[chosen] = part
        return out

    def scored(parts: np.ndarray) -> np.ndarray:
        nonlocal flops
        for part in map(tuple, parts.tolist()):
            if part not in cache:
                cache[part], cost = evaluate(full(np.array(part)))
                flops += cost
        return np.array([cache[tuple(p)] for p in parts.tolist()])

    state = ga.init(config, seed)
    first = state.population.copy()
    first[0] = genome[chosen]
    state = ga.tell(config, replace(state, population=first), first, scored(first))
    for generation in range(generations):
        children, state = ga.ask(config, state)
        state = ga.tell(config, state, children, scored(children))
        if on_generation:
            on_generation(generation, state.best_fitness)
    return full(state.best_genome), state.best_fitness, flops

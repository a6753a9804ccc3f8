"""Transfer (the protocol's GLUE step): a pretrained GPT-2 with a classification head on its
pooled final hidden state (after ln_f), trained on a task's train split, scored on its test split.

    CLSO, `head`        genome and continuous parts frozen; only a linear probe trains, on the
                        features the frozen body gives (computed once: no backward through it)
    CLSO, `partial`     a search over the genes nearest the head first (the rest frozen), its fitness
                        a probe's loss on held-back train examples; then the probe as in `head`
    baseline            the dense AdamW-pretrained model fine-tuned end to end with AdamW
    baseline, head      the same dense body frozen with the same probe: the like-for-like reference
                        for CLSO's frozen body (probe against probe, not probe against fine-tuning)
    no pretraining      a randomly initialised dense GPT-2, as a probe and fine-tuned end to end:
                        what each recipe reaches without pretraining

A probe is a linear layer on features standardised with the train split's mean and spread, fitted
on the whole train split by L-BFGS: a convex problem solved to its optimum in float32 (tested: the
gradient vanishes), so a weak score is the features' fault, not the optimiser's.

Texts are the pipeline's tokens, cut to `max_tokens` and padded on the right: attention is causal,
so real tokens never see the padding, and pooling (the last real token, or the mean of the real
tokens) never reads it. A sentence pair (MNLI) is read as first <|endoftext|> second, the first cut
before the second. Only train-split examples reach any training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clso.data.tasks import split_record, task_metric
from clso.energy import EnergyReading
from clso.model.baseline import adamw_optimizer
from clso.model.flops import LINEAR_NAMES, attention_flops_per_token, dense_linear_flops, linear_shapes
from clso.search import ga

TOLERANCE = 0.05  # CLSO transfers when its test metric is within 5 % of the baseline's


@dataclass(frozen=True)
class Encoded:
    ids: torch.Tensor  # (N, T) int64, right-padded
    lengths: torch.Tensor  # (N,) real tokens of each, at least 1

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx`, cut to their longest real length (no column of padding alone)."""
        lengths = self.lengths[idx]
        return self.ids[idx, :int(lengths.max())], lengths

    def batches(self, idx: np.ndarray, batch_size: int):
        """`batch` over `idx` in order, `batch_size` rows at a time."""
        for start in range(0, len(idx), batch_size):
            yield self.batch(idx[start:start + batch_size])


def joined_pair(first: list[int], second: list[int], separator: int, max_tokens: int) -> list[int]:
    """first <sep> second in at most max_tokens: the first is cut before the second (an MNLI
    hypothesis is short and decides the label; its premise can be long)."""
    second = second[:max_tokens - 1]
    return first[:max(0, max_tokens - 1 - len(second))] + [separator] + second


def encode(tokenizer, texts, max_tokens: int, pad_id: int) -> Encoded:
    """Token rows of `texts`; a pair is joined by `pad_id`, the end-of-text token."""
    singles = [t for t in texts if isinstance(t, str)]
    pairs = [t for t in texts if not isinstance(t, str)]
    encoded = iter(tokenizer.encode_batch(singles))
    firsts, seconds = (iter(tokenizer.encode_batch([t[k] for t in pairs])) for k in (0, 1))
    rows = [next(encoded).ids[:max_tokens] if isinstance(t, str)
            else joined_pair(next(firsts).ids, next(seconds).ids, pad_id, max_tokens) for t in texts]
    rows = [r or [pad_id] for r in rows]
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


def body_flops(gpt2_config, seq_len: int, n_seqs: int, linear_flops=None, layers: range | None = None) -> int:
    """Forward FLOPs of the body's blocks `layers` (all of them by default), without the LM head:
    a classifier never computes the vocabulary."""
    layers = range(gpt2_config.n_layer) if layers is None else layers
    shapes, overrides = linear_shapes(gpt2_config), linear_flops or {}
    per_token = sum(overrides.get((layer, name), dense_linear_flops(*shapes[name]))
                    for layer in layers for name in LINEAR_NAMES)
    return (per_token + len(layers) * attention_flops_per_token(gpt2_config.n_embd, seq_len)) * seq_len * n_seqs


@torch.no_grad()
def features(hidden_fn, encoded: Encoded, idx: np.ndarray, pooling: str, batch_size: int, device,
             flops_fn) -> tuple[torch.Tensor, int]:
    """Pooled features of examples `idx` from a frozen body, and the FLOPs they cost.
    `hidden_fn(ids)` gives (B, T, d) final hidden states; `flops_fn(T, B)` the body's forward FLOPs."""
    out, flops = [], 0
    for ids, lengths in encoded.batches(idx, batch_size):
        out.append(pool(hidden_fn(ids.to(device)), lengths, pooling).float())
        flops += flops_fn(ids.shape[1], len(ids))
    return torch.cat(out), flops


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(transformer, ids: torch.Tensor, first: int) -> tuple[tuple, dict]:
    """What the model gives block `first` on `ids` (its hidden states, the attention mask it built,
    and the rest): blocks 0..first-1 are run and the rest are not."""
    captured = {}

    def capture(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Stop

    handle = transformer.h[first].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        transformer(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def replay_blocks(transformer, inputs: tuple[tuple, dict], first: int) -> torch.Tensor:
    """The final hidden states from block `first`'s inputs (from `block_inputs`): the same as the
    whole model's, for the blocks' weights as they are now."""
    (hidden, *rest), kwargs = inputs
    for block in transformer.h[first:]:
        out = block(hidden, *rest, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out  # a tuple before transformers 5
    return transformer.ln_f(hidden)


def seeded_linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    """A linear layer initialised from `seed` alone, without moving torch's global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(d_in, d_out)


class LinearProbe(nn.Module):
    """A linear head on features standardised with the training features' mean and spread."""

    def __init__(self, train_x: torch.Tensor, n_classes: int, seed: int):
        super().__init__()
        self.register_buffer("mean", train_x.mean(0))
        self.register_buffer("scale", train_x.std(0, correction=0).clamp_min(1e-6))
        self.linear = seeded_linear(train_x.shape[1], n_classes, seed)
        self.to(train_x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.scale)


@dataclass(frozen=True)
class ProbeFit:
    """How a probe's fit ended: L-BFGS iterations and objective evaluations (the last one checks the
    gradient where it stopped), whether it stopped on its tolerances before a cap on iterations or
    evaluations, and the largest gradient entry at the end."""

    iterations: int
    evaluations: int
    converged: bool
    max_gradient: float

    def as_metrics(self) -> dict:
        return {"probe_iterations": self.iterations, "probe_evaluations": self.evaluations,
                "probe_converged": self.converged, "probe_max_gradient": self.max_gradient}


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, n_classes: int, *, iterations: int, l2: float, seed: int,
              on_step=None) -> tuple[LinearProbe, int, ProbeFit]:
    """A probe minimising mean cross-entropy + l2/2·‖W‖² on the whole train set, by L-BFGS (strong
    Wolfe line search) to convergence or `iterations`: the objective is convex, so this is its
    optimum, which first-order runs approach slowly on ill-conditioned features. L-BFGS stops when
    the objective stops moving (float32), which `converged` reports, with the gradient left. Returns the probe,
    its FLOPs (standardising once; per example per evaluation the forward 2·d·C and the weight
    gradient 2·d·C) and how the fit ended."""
    probe = LinearProbe(train_x, n_classes, seed)
    standardised = (train_x - probe.mean) / probe.scale
    opt = torch.optim.LBFGS(probe.linear.parameters(), max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe")
    evaluations = 0

    def objective():
        nonlocal evaluations
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(probe.linear(standardised), train_y) + 0.5 * l2 * probe.linear.weight.square().sum()
        loss.backward()
        if on_step:
            on_step(evaluations, float(loss.detach()))
        evaluations += 1
        return loss

    opt.step(objective)
    state = opt.state[probe.linear.weight]
    done, capped = int(state.get("n_iter", 0)), int(state.get("func_evals", 0)) >= opt.param_groups[0]["max_eval"]
    objective()  # the gradient where it stopped (work done, so counted)
    fit = ProbeFit(done, evaluations, done < iterations and not capped,
                   max(float(p.grad.abs().max()) for p in probe.linear.parameters()))
    n, d = train_x.shape
    return probe.eval(), 2 * n * d + evaluations * n * 4 * d * n_classes, fit


class Classifier(nn.Module):
    """A dense GPT-2's body with a linear head on its pooled final hidden state."""

    def __init__(self, gpt2, n_classes: int, pooling: str, seed: int):
        super().__init__()
        self.body = gpt2.transformer
        self.head = seeded_linear(gpt2.config.n_embd, n_classes, seed)
        self.pooling = pooling

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(pool(self.body(input_ids=ids, use_cache=False).last_hidden_state, lengths, self.pooling))


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
    return torch.cat([model(ids.to(device), lengths).argmax(-1).cpu()
                      for ids, lengths in encoded.batches(idx, batch_size)]).numpy()


def within_tolerance(clso: float, baseline: float) -> bool:
    """CLSO's metric at most TOLERANCE of the baseline's magnitude below it (a Matthews correlation
    can be 0 or negative, where a ratio would mean nothing)."""
    return clso >= baseline - TOLERANCE * abs(baseline)


# --- one task's sides and CLSO's verdict -------------------------------------------------------

@dataclass(frozen=True)
class Side:
    """One way of fitting a task: its metric on every split, what its training spent, and the rest."""

    scores: dict[str, float]
    reading: EnergyReading
    flops: int
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return {**self.scores, **self.reading.as_metrics(), "flops": self.flops, **self.extra}


def task_result(task, splits, sides: dict[str, Side]) -> dict:
    """Every side; the majority class on each test split; what pretraining lifts; and the verdict for
    CLSO: its option with the better val metric (chosen on val, judged on test), charged both
    options, since choosing needed both."""
    labels = np.asarray(task.labels)
    tests = [split for split in splits if split.startswith("test")]
    guess = np.bincount(labels[splits["train"]]).argmax()  # the train split's majority: test picks nothing
    majority = {split: task_metric(task.metric, np.full(len(splits[split]), guess), labels[splits[split]])
                for split in tests}
    # a tie on val goes to `head`, the cheaper option
    option = max(("clso_head", "clso_partial"), key=lambda side: sides[side].scores["val"])
    head, partial = sides["clso_head"], sides["clso_partial"]
    clso = Side(sides[option].scores, head.reading.plus(partial.reading), head.flops + partial.flops,
                {"option": option.removeprefix("clso_")})
    test = {name: side.scores["test"] for name, side in {**sides, "clso": clso}.items()}
    base = sides["baseline"]
    return {"metric": task.metric, "splits": split_record(task, splits), "majority_class": majority,
            **{name: side.metrics() for name, side in {**sides, "clso": clso}.items()},
            "clso_within_tolerance": {split: within_tolerance(clso.scores[split], base.scores[split]) for split in tests},
            # a verdict that a model with no pretraining also passes does not test pretraining
            "no_pretraining_within_tolerance": within_tolerance(test["no_pretraining_finetuned"], test["baseline"]),
            "lift": {"pretraining_finetuned": test["baseline"] - test["no_pretraining_finetuned"],
                     "pretraining_probe": test["baseline_head"] - test["no_pretraining"],
                     "clso_probe": test["clso_head"] - test["no_pretraining"]},
            "energy_ratio": clso.reading.energy_wh / base.reading.energy_wh if base.reading.energy_wh else math.inf}


# --- `partial`: a GA over the genes nearest the head, plus the head ----------------------------

def chosen_genes(genome_length: int, share: float) -> np.ndarray:
    """The genes `partial` may change: the last round(share × length) of the genome (at least one),
    the layers nearest the head; every other gene stays as pretraining found it."""
    k = min(genome_length, max(1, round(share * genome_length)))
    return np.arange(genome_length - k, genome_length)


def probe_fitness(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, iterations: int, l2: float,
                  seed: int) -> tuple[float, int]:
    """The fitness of a body on a batch of train examples' features: two-fold, a probe fitted on each
    half and scored (mean cross-entropy) on the other, averaged; and the FLOPs of fitting and scoring."""
    half = len(x) // 2
    folds = ((slice(None, half), slice(half, None)), (slice(half, None), slice(None, half)))
    total, flops = 0.0, 0
    for fit, score in folds:
        probe, fit_flops, _ = fit_probe(x[fit], y[fit], n_classes, iterations=iterations, l2=l2, seed=seed)
        with torch.no_grad():
            total += float(F.cross_entropy(probe(x[score]), y[score]))
        flops += fit_flops + len(x[score]) * dense_linear_flops(x.shape[1], n_classes)
    return total / 2, flops


def prior_fitness(y: torch.Tensor, n_classes: int) -> float:
    """The same two folds scored by the fitting half's label frequencies alone (a probe that reads
    nothing): the fitness of features that carry no information."""
    half = len(y) // 2
    total = 0.0
    for fit, score in ((y[:half], y[half:]), (y[half:], y[:half])):
        prior = (torch.bincount(fit, minlength=n_classes).double() + 0.5) / (len(fit) + 0.5 * n_classes)
        total += float(-prior.log()[score].mean())
    return total / 2


class CachedBody:
    """Features of fixed examples for genomes that differ only at or after block `first`: the
    frozen blocks below it run once here, and each genome runs only the blocks from `first` on."""

    def __init__(self, model, encoded: Encoded, idx: np.ndarray, first: int, batch_size: int, device):
        self.model, self.first = model, first
        gpt, config = model.gpt2.transformer, model.config.gpt2()
        self.sizes = [(ids.shape[1], len(ids)) for ids, _ in encoded.batches(idx, batch_size)]
        with torch.no_grad():
            self.inputs = [(block_inputs(gpt, ids.to(device), first), lengths)
                           for ids, lengths in encoded.batches(idx, batch_size)]
        self.flops = sum(body_flops(config, T, B, model.linear_flops(model.genome), range(first)) for T, B in self.sizes)

    @torch.no_grad()
    def features(self, genome, pooling: str) -> tuple[torch.Tensor, int]:
        """Pooled features under `genome` (set on the model), and the FLOPs of the blocks it ran."""
        self.model.set_genome(genome)
        gpt, config = self.model.gpt2.transformer, self.model.config.gpt2()
        x = torch.cat([pool(replay_blocks(gpt, inputs, self.first), lengths, pooling).float()
                       for inputs, lengths in self.inputs])
        layers, linear_flops = range(self.first, config.n_layer), self.model.linear_flops(genome)
        return x, sum(body_flops(config, T, B, linear_flops, layers) for T, B in self.sizes)


def partial_search(genome: np.ndarray, chosen: np.ndarray, library_size: int, evaluate, *, population: int,
                   generations: int, seed: int, on_generation=None) -> tuple[np.ndarray, float, float, int]:
    """A GA (clso.search.ga) over the `chosen` genes of `genome`, the others fixed; `evaluate(full genome)`
    gives (fitness, FLOPs). The pretrained genes are one of the first population, so the search can
    only find a genome at least as fit on its batch. With one chosen gene it is random search: no
    cut point to cross over, and every child's gene is redrawn. Returns the best full genome, its
    fitness, the pretrained genes' fitness and the FLOPs of every evaluation (each distinct genome
    evaluated once)."""
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
    return full(state.best_genome), state.best_fitness, cache[tuple(genome[chosen].tolist())], flops

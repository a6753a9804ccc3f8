"""Training a dense GPT-2 without a backward pass through what it perturbs: low-rank evolution
strategies (`es`) and zeroth-order SGD (`mezo`), on clso.search.es's population forward.

pure    every parameter is perturbed; forward passes only.
hybrid  the blocks' weight matrices are perturbed (the parts CLSO's genome picks); the rest trains in
        Adam phases, CLSO's count and steps, each at the share of the FLOP budget CLSO's search had
        reached when it ran it. Their backward pass reaches the embeddings through the body, as CLSO's
        does; the body's matrices pass gradients down but never train.

Each step draws one train batch for the whole population (antithetic pairs must share it), scores every
member, and steps the optimizer: Adam on ES's estimate, plain SGD on MeZO's. The run ends when it has
spent its FLOP budget or at its step cap. Its val loss is measured every `eval_interval` steps, metered
apart and charged to no one (as the baseline's curve).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clso.context import derive_seed, generator
from clso.data.tokens import FINAL_BATCH, random_batch, split_loss
from clso.energy import EnergyMeter, EnergyReading
from clso.field.checkpoint import FieldCheckpoint
from clso.model.flops import backward_flops, forward_flops
from clso.search.es import Noise, body_matrices, estimate, member_losses, parameters, population_flops, shaped, \
    spsa_estimate

METHODS = ("es", "mezo")


@dataclass(frozen=True)
class Settings:
    """One method's settings (params.yaml's `es` or `mezo` section)."""

    method: str
    pairs: int  # ES: antithetic pairs per step (population 2·pairs); MeZO: directions per step
    sigma: float  # ES's σ; MeZO's ε
    lr: float  # Adam's on ES's estimate; SGD's on MeZO's
    rank: int  # ES's perturbation rank; MeZO perturbs at full rank
    batch_size: int  # sequences per step, shared by every member
    max_steps: int  # the cap, when the FLOP budget is not spent first
    eval_interval: int  # steps between curve points
    eval_batches: int  # batches of batch_size per curve point


@dataclass(frozen=True)
class AdamPhases:
    """Hybrid mode's shared part, CLSO's: `at`, the shares of the budget at which each phase runs."""

    at: tuple[float, ...]
    steps: int
    lr: float
    batch_size: int


@dataclass
class Result:
    steps: int = 0
    flops: int = 0
    adam_flops: int = 0
    adam_phases: int = 0
    stopped: str = ""
    curve: list[dict] = field(default_factory=list)
    train_energy: dict = field(default_factory=dict)
    eval_energy_wh: float = 0.0
    # the whole val split's loss once the run has spent `score_at` FLOPs (a contrast at another's FLOPs)
    scored_at: dict | None = None


def perturbed(params: dict[str, torch.Tensor], method: str, mode: str) -> tuple[list[str], list[str]]:
    """The tensors a step perturbs: (low rank, full rank). ES: matrices low rank, vectors full rank;
    MeZO: all full rank. Pure: every parameter; hybrid: the blocks' matrices."""
    names = list(params) if mode == "pure" else body_matrices(params)
    if method == "mezo":
        return [], names
    return [n for n in names if params[n].dim() == 2], [n for n in names if params[n].dim() != 2]


def adam_phase(model, frozen: list[str], phases: AdamPhases, train: np.ndarray, rng: np.random.Generator,
               device) -> int:
    """`phases.steps` Adam steps on every parameter but `frozen`, which pass gradients down but get none
    of their own (as CLSO's library matrices); returns their FLOPs."""
    config = model.config
    params = parameters(model)
    trainable = [p for n, p in params.items() if n not in frozen]
    opt = torch.optim.Adam(trainable, lr=phases.lr)
    for n in frozen:
        params[n].requires_grad_(False)
    model.train()
    try:
        for _ in range(phases.steps):
            x, y = random_batch(train, phases.batch_size, config.n_positions, rng, device)
            loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        model.eval()
        for n in frozen:
            params[n].requires_grad_(True)
    t, b = config.n_positions, phases.batch_size
    return phases.steps * (forward_flops(config, t, b) + backward_flops(config, t, b, train_linears=False))


def _val_loss(params, config, val: np.ndarray, s: Settings, seed: int, device) -> float:
    rng = np.random.default_rng(seed)  # the same val batches at every curve point
    losses = [float(member_losses(params, None, *random_batch(val, s.batch_size, config.n_positions, rng, device),
                                  config.n_layer, config.n_head)[0]) for _ in range(s.eval_batches)]
    return float(np.mean(losses))


def train(model, s: Settings, data, *, mode: str, seed: int, budget_flops: int, device, meter_options: dict,
          phases: AdamPhases | None = None, on_eval=None, checkpoint: FieldCheckpoint | None = None,
          score_at: int | None = None, curve_split: str = "val") -> Result:
    """Train `model` (a dense GPT2LMHeadModel, in place) by `s.method` until `budget_flops` are spent or
    `s.max_steps` steps; in hybrid mode with CLSO's Adam `phases`. With a `checkpoint`, the run is saved
    at every curve point (with the val loss, charged to no one) and resumes there. With `score_at`, the
    whole val split is scored once the run has spent that many FLOPs (charged to no one). The curve is
    scored on `curve_split` (the step-size sweep takes the train split: val never chooses). Returns the
    costs and the curve."""
    if s.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    run = _Run(model, s, data, mode, seed, device, phases, curve_split)
    if checkpoint:
        run.resume(checkpoint)
    result = run.result
    with EnergyMeter(**meter_options) as meter:
        while True:
            result.stopped = ("FLOP budget spent" if result.flops >= budget_flops else
                              "step cap" if result.steps >= s.max_steps else "")
            owed = len(phases.at) - result.adam_phases if phases is not None and result.stopped else 0
            for _ in range(owed):  # a phase CLSO had is never left out
                run.adam()
                run.score_once(meter, score_at)
            if result.steps % s.eval_interval == 0 or result.stopped:
                run.evaluate(meter, checkpoint if not result.stopped else None)
                if on_eval:
                    on_eval(result.curve[-1])
            if result.stopped:
                break
            run.step()
            run.score_once(meter, score_at)
            while phases is not None and result.adam_phases < len(phases.at) \
                    and result.flops >= phases.at[result.adam_phases] * budget_flops:
                run.adam()
                run.score_once(meter, score_at)
        whole = run.trained(meter)
    result.curve[-1].update(energy_wh=whole.energy_wh, energy_method=whole.method, wall_s=whole.wall_s)
    result.train_energy = {**whole.as_metrics(), "flops": result.flops}
    result.eval_energy_wh = (run.evals.plus(run.earlier_evals) if run.evals else run.earlier_evals).energy_wh
    return result


ZERO = EnergyReading(0.0, "estimate", 0.0, 0.0, 0.0, "estimate")


class _Run:
    """One run of `train`: the model, its optimizer and generators, and what a checkpoint carries."""

    def __init__(self, model, s: Settings, data, mode: str, seed: int, device, phases: AdamPhases | None,
                 curve_split: str = "val"):
        self.model, self.s, self.seed, self.device, self.phases = model, s, seed, device, phases
        self.config = model.config
        self.params = dict(parameters(model))
        self.low, self.full = perturbed({n: p.detach() for n, p in self.params.items()}, s.method, mode)
        optimizer = torch.optim.Adam if s.method == "es" else torch.optim.SGD
        self.opt = optimizer([self.params[n] for n in (*self.low, *self.full)], lr=s.lr)
        self.noise_gen = generator(seed, s.method, "noise")
        self.rng = np.random.default_rng(derive_seed(seed, s.method, "batches"))
        self.data, self.curve_split = data, curve_split  # each split opened where it is read
        self.result = Result()
        self.evals = None  # this segment's validation and checkpoints, metered apart
        self.earlier_train, self.earlier_evals = ZERO, ZERO  # a resumed run's earlier segments
        model.eval()

    def trained(self, meter) -> EnergyReading:
        """Training's energy so far: every segment's, validation and checkpoints aside."""
        now = meter.read()
        return (now.minus(self.evals) if self.evals else now).plus(self.earlier_train)

    def evaluate(self, meter, checkpoint) -> None:
        """A curve point (the val loss on fixed val batches), then the checkpoint: metered apart."""
        trained, before = self.trained(meter), meter.read()
        loss = _val_loss({n: p.detach() for n, p in self.params.items()}, self.config,
                         self.data.tokens(self.curve_split), self.s,
                         self.seed + 1, self.device)
        r = self.result
        r.curve.append({"step": r.steps, "val_loss": loss, "energy_wh": trained.energy_wh,
                        "energy_method": trained.method, "flops": r.flops, "wall_s": trained.wall_s})
        if checkpoint is not None:
            self.save(checkpoint, trained)
        spent = meter.read().minus(before)
        self.evals = spent if self.evals is None else self.evals.plus(spent)

    def score_once(self, meter, score_at: int | None) -> None:
        """The whole val split's loss, as the final scores take it, the first time the run's FLOPs (a step's
        or an Adam phase's) reach `score_at`: metered apart."""
        if score_at is None or self.result.scored_at is not None or self.result.flops < score_at:
            return
        before = meter.read()
        loss = split_loss(lambda x: self.model(input_ids=x).logits, self.data.tokens("val"), self.config.n_positions,
                          FINAL_BATCH, self.device)
        self.result.scored_at = {"flops": self.result.flops, "step": self.result.steps, "val_loss": loss}
        spent = meter.read().minus(before)
        self.evals = spent if self.evals is None else self.evals.plus(spent)

    def step(self) -> None:
        _step(self.params, self.low, self.full, self.s, self.opt, self.noise_gen, self.rng, self.data.tokens("train"),
              self.device, self.result, self.config)

    def adam(self) -> None:
        _adam(self.model, self.params, self.phases, self.data.tokens("train"), self.rng, self.device, self.result)

    def save(self, checkpoint: FieldCheckpoint, trained: EnergyReading) -> None:
        opt = self.opt.state_dict()
        tensors = {f"model.{n}": p.detach() for n, p in self.params.items()}
        tensors |= {f"opt.{i}.{k}": v for i, state in opt["state"].items() for k, v in state.items()}
        tensors["noise_gen"] = self.noise_gen.get_state()
        r = self.result
        evals = self.evals.plus(self.earlier_evals) if self.evals else self.earlier_evals
        checkpoint.save({"step": r.steps, "flops": r.flops, "adam_flops": r.adam_flops, "adam_phases": r.adam_phases,
                         "curve": r.curve, "scored_at": r.scored_at, "rng": self.rng.bit_generator.state,
                         "param_groups": opt["param_groups"],
                         "trained": asdict(trained), "evals": asdict(evals)}, tensors)

    def resume(self, checkpoint: FieldCheckpoint) -> None:
        saved = checkpoint.load()
        if saved is None:
            return
        state, tensors = saved
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"model.{n}"])
        groups = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                groups.setdefault(int(i), {})[k] = value
        self.opt.load_state_dict({"state": groups, "param_groups": state["param_groups"]})
        self.noise_gen.set_state(tensors["noise_gen"])
        self.rng.bit_generator.state = state["rng"]
        # its last curve point is taken again, on the same weights, as the loop resumes
        self.result = Result(steps=state["step"], flops=state["flops"], adam_flops=state["adam_flops"],
                             adam_phases=state["adam_phases"], curve=state["curve"][:-1], scored_at=state["scored_at"])
        self.earlier_train, self.earlier_evals = EnergyReading(**state["trained"]), EnergyReading(**state["evals"])


def _adam(model, params, phases: AdamPhases, train_split, rng, device, result: Result) -> None:
    flops = adam_phase(model, body_matrices(params), phases, train_split, rng, device)
    result.flops, result.adam_flops, result.adam_phases = (result.flops + flops, result.adam_flops + flops,
                                                           result.adam_phases + 1)


def _step(params, low, full, s: Settings, opt, noise_gen, rng, train_split, device, result: Result, config) -> None:
    """One step: a shared batch, every member scored, the estimate into the optimizer."""
    theta = {n: p.detach() for n, p in params.items()}
    x, y = random_batch(train_split, s.batch_size, config.n_positions, rng, device)
    noise = Noise.draw(theta, low, full, s.pairs, s.sigma, s.rank, noise_gen)
    losses = member_losses(theta, noise, x, y, config.n_layer, config.n_head)
    g = estimate(noise, shaped(losses)) if s.method == "es" else spsa_estimate(noise, losses)
    opt.zero_grad(set_to_none=True)
    for name, value in g.items():
        params[name].grad = value
    opt.step()
    result.steps += 1
    result.flops += population_flops(config, config.n_positions, s.batch_size, noise.members, noise)

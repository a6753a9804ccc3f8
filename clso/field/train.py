"""Training the neuron-field LM by gradient, with the journal's growth and freezing (document 004).

Growth: the field starts with `initial_neurons` and gains `grow_by` every `grow_every` steps up to
`max_neurons`. A neuron is born at the query of a random position of the last step's batch with a
zero value, so a birth leaves the model's function unchanged; its temperature is the tide's at birth
(the journal's "rising tide": from tide_start to tide_end over training, so late neurons attend more
widely), or tide_start throughout without it. Capacity is allocated once; neurons not yet born take
no part in the forward pass.

Freezing (ages in steps, where the journal counts epochs): `hard` freezes a neuron for good once it
is `hard_age` steps old, or once its parameters moved less than `hard_stability` (relative) over the
last `stability_window` steps; `soft` scales its learning rate by max(floor, 0.5^(age / half_life)),
the journal's best variant. The neurons have their own Adam with a step count per neuron (a neuron
born at step 500 starts with fresh moments and the bias correction of a first step, not of step
500), and the multiplier scales its update. Everything else (embeddings, attention, MLP, norms) trains with AdamW as the
baseline does, on the same learning-rate schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clso import ClsoError
from clso.context import precision_context, resolve_precision
from clso.data.tokens import TokenData, random_batch, split_loss
from clso.energy import EnergyMeter, EnergyReading
from clso.field.checkpoint import FieldCheckpoint
from clso.field.model import FieldConfig, FieldLM, NeuronField, forward_flops
from clso.model.baseline import learning_rate
from clso.model.flops import throughput

CURVE_FIELDS = ("step", "tokens", "train_loss", "val_loss", "neurons", "frozen_share", "mean_lr_multiplier",
                "energy_wh", "energy_method", "flops", "wall_s")
EVAL_BATCH = 16
TRAIN_LOSS_WINDOW = 20  # steps whose train losses make the final train loss (one batch is noisy)


@dataclass(frozen=True)
class FieldSchedule:
    """When neurons are born, what temperature they are born with, and how they freeze."""

    steps: int
    grow_every: int = 1
    grow_by: int = 1
    rising_tide: bool = True
    tide_start: float = 0.05
    tide_end: float = 0.8
    freeze: str = "soft"
    hard_age: int = 0
    hard_stability: float = 0.0
    stability_window: int = 50
    half_life: float = 50.0
    floor: float = 0.01

    @classmethod
    def from_params(cls, params) -> FieldSchedule:
        """From the params.yaml `field` section (FieldParams)."""
        return cls(params.steps, params.grow_every, params.grow_by, params.rising_tide, params.tide_start,
                   params.tide_end, params.freeze, params.hard_age, params.hard_stability, params.stability_window,
                   params.half_life, params.floor)

    def births(self, step: int, alive: int, capacity: int) -> int:
        """Neurons born before step `step` (> 0) trains, given `alive` of `capacity`."""
        if step == 0 or self.grow_every == 0 or step % self.grow_every:
            return 0
        return min(self.grow_by, capacity - alive)

    def tide(self, step: int) -> float:
        if not self.rising_tide:
            return self.tide_start
        return self.tide_start + (self.tide_end - self.tide_start) * min(1.0, step / max(1, self.steps))

    def lr_multiplier(self, age: torch.Tensor) -> torch.Tensor:
        """Of each neuron's update, by age in steps: 1 without soft freezing (hard freezing masks)."""
        if self.freeze != "soft":
            return torch.ones_like(age, dtype=torch.float32)
        return torch.clamp(0.5 ** (age.float() / self.half_life), min=self.floor)




class NeuronAdam:
    """Adam (betas 0.9, 0.95, no weight decay) for the neurons of one field, with a step count per
    neuron and a per-neuron multiplier on the update: lr · multiplier · m̂ / (√v̂ + eps). A neuron
    with multiplier 0 or marked frozen is left bit for bit as it was."""

    def __init__(self, field: NeuronField, betas=(0.9, 0.95), eps: float = 1e-8):
        self.field, self.betas, self.eps = field, betas, eps
        self.params = (field.positions, field.values, field.temperatures)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(len(field.birth_step), dtype=torch.long, device=field.birth_step.device)

    def reset(self, neurons: torch.Tensor) -> None:
        """New neurons start with fresh moments and step counts."""
        for m, v in zip(self.m, self.v):
            m[neurons] = 0
            v[neurons] = 0
        self.steps[neurons] = 0

    @torch.no_grad()
    def step(self, lr: float, multiplier: torch.Tensor) -> None:
        """One update of the neurons born so far (the first `alive` rows; the rest of the capacity is
        never touched), `multiplier` by neuron."""
        n = self.field.alive
        learning = ~self.field.frozen[:n] & (multiplier[:n] > 0)
        steps = self.steps[:n]
        steps += learning.long()
        b1, b2 = self.betas
        t = steps.clamp_min(1).float()
        correction1, correction2 = 1 - b1 ** t, 1 - b2 ** t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            p, m, v, g = p[:n], m[:n], v[:n], p.grad[:n]
            shape = (-1,) + (1,) * (p.dim() - 1)
            rows = learning.view(shape)
            m.copy_(torch.where(rows, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(rows, b2 * v + (1 - b2) * g * g, v))
            update = (m / correction1.view(shape)) / ((v / correction2.view(shape)).sqrt() + self.eps)
            p.copy_(torch.where(rows, p - lr * multiplier[:n].view(shape) * update, p))


def ages(field: NeuronField, step: int) -> torch.Tensor:
    """Steps since each neuron's birth (0 for those not yet born)."""
    return torch.where(field.birth_step >= 0, step - field.birth_step, torch.zeros_like(field.birth_step))


@torch.no_grad()
def give_birth(field: NeuronField, optimizer: NeuronAdam | None, count: int, queries: torch.Tensor, step: int,
               temperature: float, rng: np.random.Generator) -> None:
    """`count` neurons at the queries of random positions, with zero values (the function is unchanged)."""
    first = field.alive
    if count < 1:
        return
    rows = queries.reshape(-1, queries.shape[-1])
    picks = torch.from_numpy(rng.integers(0, len(rows), size=count)).to(rows.device)
    new = torch.arange(first, first + count, device=rows.device)
    field.positions[new] = rows[picks].to(field.positions.dtype)
    field.values[new] = 0
    field.temperatures[new] = temperature
    field.birth_step[new] = step
    field.alive += count
    if optimizer is not None:
        optimizer.reset(new)


@torch.no_grad()
def hard_freeze(field: NeuronField, schedule: FieldSchedule, step: int, snapshot: torch.Tensor | None) -> torch.Tensor | None:
    """Freeze neurons by age, and every `stability_window` steps by how little they moved since the
    last snapshot. Returns the new snapshot (all neurons' parameters side by side)."""
    age, alive = ages(field, step), field.birth_step >= 0
    if schedule.hard_age:
        field.frozen |= alive & (age >= schedule.hard_age)
    if not schedule.hard_stability or step % schedule.stability_window:
        return snapshot
    now = torch.cat([field.positions, field.values, field.temperatures[:, None]], 1)
    if snapshot is not None:
        moved = (now - snapshot).norm(dim=1) / snapshot.norm(dim=1).clamp_min(1e-8)
        field.frozen |= alive & (age >= schedule.stability_window) & (moved < schedule.hard_stability)
    return now.clone()


def freeze_counts(field: NeuronField, schedule: FieldSchedule, step: int) -> torch.Tensor:
    """[neurons frozen, sum of their learning-rate multipliers] over the neurons born, left on the
    device (reading them each step would wait for a GPU). `frozen`: hard freezing's frozen ones; soft
    freezing's down at the floor."""
    n = field.alive
    multiplier = schedule.lr_multiplier(ages(field, step)[:n])
    if schedule.freeze == "soft":
        return torch.stack([(multiplier <= schedule.floor).sum().float(), multiplier.sum()])
    frozen = field.frozen[:n]
    return torch.stack([frozen.sum().float(), (~frozen).sum().float()])


def new_field_lm(config: FieldConfig, seed: int, device) -> FieldLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FieldLM(config).to(device)


@dataclass
class FieldResult:
    model: FieldLM
    precision: str
    curve: list[dict] = field(default_factory=list)
    train_energy: dict = field(default_factory=dict)
    resumed_at: int = 0  # the step a checkpoint was resumed at; 0: trained from the start


def _tensors(model: FieldLM, adamw: torch.optim.Optimizer, neuron_adams: list[NeuronAdam], queries, snapshots
             ) -> dict[str, torch.Tensor]:
    """Everything of a run a checkpoint holds as tensors."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, state in adamw.state_dict()["state"].items():
        out |= {f"adamw.{i}.{k}": v for k, v in state.items()}
    for layer, opt in enumerate(neuron_adams):
        out[f"neurons.{layer}.steps"] = opt.steps
        for k, (m, v) in enumerate(zip(opt.m, opt.v)):
            out[f"neurons.{layer}.m{k}"], out[f"neurons.{layer}.v{k}"] = m, v
    for layer, (q, snapshot) in enumerate(zip(queries, snapshots)):
        if q is not None:
            out[f"queries.{layer}"] = q
        if snapshot is not None:
            out[f"snapshot.{layer}"] = snapshot
    return out


@torch.no_grad()
def _restore(tensors: dict[str, torch.Tensor], model: FieldLM, adamw: torch.optim.Optimizer,
             neuron_adams: list[NeuronAdam], queries: list, snapshots: list, device) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("adamw."):
            _, i, name = key.split(".")
            state.setdefault(int(i), {})[name] = v
    adamw.load_state_dict({"state": state, "param_groups": adamw.state_dict()["param_groups"]})
    for layer, opt in enumerate(neuron_adams):
        opt.steps.copy_(tensors[f"neurons.{layer}.steps"])
        for k, (m, v) in enumerate(zip(opt.m, opt.v)):
            m.copy_(tensors[f"neurons.{layer}.m{k}"])
            v.copy_(tensors[f"neurons.{layer}.v{k}"])
    for layer in range(len(queries)):
        queries[layer] = tensors[f"queries.{layer}"].to(device) if f"queries.{layer}" in tensors else None
        snapshots[layer] = tensors[f"snapshot.{layer}"].to(device) if f"snapshot.{layer}" in tensors else None


def train_field(data: TokenData, params, *, block_size: int, seed: int, device, meter_options: dict,
                on_step=None, checkpoint: FieldCheckpoint | None = None) -> FieldResult:
    """`params.steps` steps (the `field` section) of AdamW (the dense parts) and NeuronAdam (the fields)
    on random train batches of `block_size` tokens, neurons born and frozen as FieldSchedule says. The
    curve has a row per step (after that many steps): neurons, frozen share, mean learning-rate
    multiplier, FLOPs; and at every `eval_interval` the val loss and the energy of training alone (the
    periodic validation is metered apart and subtracted, as for the baseline). Births, freezing and
    their bookkeeping are charged.

    With a `checkpoint`, the run is saved before every `eval_interval`-th step and resumes from the
    last save, to the same results bit for bit on CPU; its energy is that of the segments up to their
    last saves (the steps a kill loses after a save are done again and charged once; writing
    checkpoints is metered apart and charged to no one, as in evolve). Throughput is this segment's."""
    run = _FieldTraining(data, FieldConfig.from_params(params, data.vocab_size, block_size), params, seed, device)
    if checkpoint:
        run.resume(checkpoint)
    run.model.train()
    with EnergyMeter(**meter_options) as meter:
        run.start_metering(meter)
        for step in range(run.start, params.steps + 1):
            if checkpoint and step > run.start and step % params.eval_interval == 0 and step < params.steps:
                run.save(checkpoint, step)
            row = run.row(step)
            run.result.curve.append(row)
            if on_step:
                on_step(row)
            if step == params.steps:
                break
            run.train_step(step)
    return run.finish(meter.reading)


class _FieldTraining:
    """One run of train_field: the model, its optimizers and everything a checkpoint carries."""

    def __init__(self, data: TokenData, config: FieldConfig, params, seed: int, device):
        self.config, self.params, self.device = config, params, device
        self.schedule = FieldSchedule.from_params(params)
        self.precision = resolve_precision(params.precision, device)
        self.model = model = new_field_lm(config, seed, device)
        dense = [(n, p) for n, p in model.named_parameters() if ".field." not in n]
        self.adamw = torch.optim.AdamW(
            [{"params": [p for n, p in dense if p.dim() >= 2], "weight_decay": params.weight_decay},
             {"params": [p for n, p in dense if p.dim() < 2], "weight_decay": 0.0}], lr=params.lr, betas=(0.9, 0.95))
        self.neuron_adams = [NeuronAdam(f) for f in model.fields]
        self.queries: list[torch.Tensor | None] = [None] * config.n_layer
        for layer, f in enumerate(model.fields):
            f.register_forward_pre_hook(self._keep_queries(layer))
        self.train, self.val = data.tokens("train"), data.tokens("val")
        self.rng, self.birth_rng = np.random.default_rng(seed), np.random.default_rng(seed + 2)
        self.snapshots: list[torch.Tensor | None] = [None] * config.n_layer
        self.result = FieldResult(model, self.precision)
        # this segment's losses and freeze counts stay on the device until the end (reading them each step
        # would wait for a GPU); the earlier segments' come as numbers from the checkpoint
        self.start, self.flops, self.losses, self.counts = 0, 0, [], []
        self.earlier, self.earlier_losses, self.earlier_counts = None, [], []

    def _keep_queries(self, layer: int):
        def hook(module, args):  # the last training batch's queries: where the next neurons are born (never val's)
            if module.training:
                self.queries[layer] = args[0].detach()
        return hook

    def resume(self, checkpoint: FieldCheckpoint) -> None:
        saved = checkpoint.load()
        if not saved:
            return
        state, tensors = saved
        try:
            _restore(tensors, self.model, self.adamw, self.neuron_adams, self.queries, self.snapshots, self.device)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ClsoError(f"{checkpoint.folder}: checkpoint does not fit this model ({type(e).__name__}); delete "
                            "the folder to train afresh") from None
        self.rng.bit_generator.state, self.birth_rng.bit_generator.state = state["rng"], state["birth_rng"]
        self.start, self.flops = state["step"], state["flops"]
        self.earlier_losses, self.earlier_counts = state["losses"], state["counts"]
        self.result.curve, self.result.resumed_at = state["curve"], self.start
        self.earlier = {k: EnergyReading(**v) for k, v in state["energy"].items()}  # training, evaluations, saving

    def start_metering(self, meter: EnergyMeter) -> None:
        self.meter, self.start_flops = meter, self.flops
        nothing = meter.read()
        nothing = nothing.minus(nothing)
        self.earlier = self.earlier or {"training": nothing, "evaluations": nothing, "saving": nothing}
        self.evals, self.saving = nothing, nothing  # this segment's, metered apart from its training

    def trained(self, now: EnergyReading) -> EnergyReading:
        """Training alone so far: the earlier segments' and this one's."""
        return self.earlier["training"].plus(now.minus(self.evals).minus(self.saving))

    def _losses(self) -> list[float]:
        return self.earlier_losses + (torch.stack(self.losses).tolist() if self.losses else [])

    def save(self, checkpoint: FieldCheckpoint, step: int) -> None:
        before = self.meter.read()
        checkpoint.save({"step": step, "flops": self.flops, "curve": self.result.curve, "losses": self._losses(),
                         "counts": self.earlier_counts + torch.stack(self.counts).tolist(),
                         "rng": self.rng.bit_generator.state, "birth_rng": self.birth_rng.bit_generator.state,
                         "energy": {"training": asdict(self.trained(before)),
                                    "evaluations": asdict(self.earlier["evaluations"].plus(self.evals)),
                                    "saving": asdict(self.earlier["saving"].plus(self.saving))}},
                        _tensors(self.model, self.adamw, self.neuron_adams, self.queries, self.snapshots))
        self.saving = self.saving.plus(self.meter.read().minus(before))

    def row(self, step: int) -> dict:
        """The curve's row after `step` steps; every eval_interval (and at the end) with the val loss."""
        self.counts.append(sum(freeze_counts(f, self.schedule, step) for f in self.model.fields))
        T, B = self.config.block_size, self.params.batch_size
        row = {"step": step, "tokens": step * B * T, "train_loss": None, "val_loss": None,
               "neurons": sum(f.alive for f in self.model.fields), "frozen_share": None, "mean_lr_multiplier": None,
               "energy_wh": None, "energy_method": None, "flops": self.flops, "wall_s": None}
        if step % self.params.eval_interval == 0 or step == self.params.steps:
            before = self.meter.read()
            self.model.eval()
            with torch.no_grad():
                row["val_loss"] = split_loss(self.model, self.val, T, EVAL_BATCH, self.device)
            self.model.train()
            so_far = self.trained(before)
            self.evals = self.evals.plus(self.meter.read().minus(before))
            row.update(energy_wh=so_far.energy_wh, energy_method=so_far.method, wall_s=so_far.wall_s)
        return row

    def train_step(self, step: int) -> None:
        """Births, freezing, then one step of both optimizers; its FLOPs counted with every neuron alive."""
        config, params, model, device = self.config, self.params, self.model, self.device
        T, B = config.block_size, params.batch_size
        x, y = random_batch(self.train, B, T, self.rng, device)
        if step == 0:  # the initial neurons are born at the first batch's queries
            with torch.no_grad(), precision_context(self.precision, device):
                model(x)
            self.flops += forward_flops(config, [0] * config.n_layer, T, B)
        for f, opt, q in zip(model.fields, self.neuron_adams, self.queries):
            count = config.initial_neurons if step == 0 else self.schedule.births(step, f.alive, config.max_neurons)
            give_birth(f, opt, count, q, step, self.schedule.tide(step), self.birth_rng)
        if self.schedule.freeze == "hard":
            self.snapshots = [hard_freeze(f, self.schedule, step, s) for f, s in zip(model.fields, self.snapshots)]
        lr = learning_rate(step, params)
        model.zero_grad(set_to_none=True)
        with precision_context(self.precision, device):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        if params.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        for group in self.adamw.param_groups:
            group["lr"] = lr
        self.adamw.step()
        for f, opt in zip(model.fields, self.neuron_adams):
            opt.step(lr, self.schedule.lr_multiplier(ages(f, step)[:f.alive]))
        self.losses.append(loss.detach())
        # forward and backward (2x: input and weight gradients), every neuron alive this step included
        self.flops += 3 * forward_flops(config, [f.alive for f in model.fields], T, B)

    def finish(self, reading: EnergyReading) -> FieldResult:
        """The curve's train losses and freeze shares filled in, and what training spent."""
        config, params, result = self.config, self.params, self.result
        T, B = config.block_size, params.batch_size
        total = self.trained(reading)
        # the last point is the model training ends with: its cost is the whole training's
        result.curve[-1].update(energy_wh=total.energy_wh, energy_method=total.method, wall_s=total.wall_s)
        for row, loss in zip(result.curve[1:], self._losses()):
            row["train_loss"] = loss
        for row, (frozen, multipliers) in zip(result.curve, self.earlier_counts + torch.stack(self.counts).tolist()):
            row["frozen_share"] = frozen / row["neurons"] if row["neurons"] else 0.0
            row["mean_lr_multiplier"] = multipliers / row["neurons"] if row["neurons"] else 0.0
        eval_seqs = (len(self.val) - 1) // T
        eval_flops = sum(forward_flops(config, [r["neurons"] // config.n_layer] * config.n_layer, T, eval_seqs)
                         for r in result.curve if r["val_loss"] is not None)
        result.train_energy = {
            **total.as_metrics(), "flops": self.flops, "eval_energy_wh": self.earlier["evaluations"].plus(self.evals).energy_wh,
            "eval_flops": eval_flops, "checkpoint_energy_wh": self.earlier["saving"].plus(self.saving).energy_wh,
            **throughput(self.flops - self.start_flops, (params.steps - self.start) * B * T,
                         total.wall_s - self.earlier["training"].wall_s, self.device)}
        self.model.eval()
        return result


def final_train_loss(curve: list[dict]) -> float:
    """The mean train loss of the last TRAIN_LOSS_WINDOW steps of train_field's curve."""
    last = [r["train_loss"] for r in curve[-TRAIN_LOSS_WINDOW:] if r["train_loss"] is not None]
    return sum(last) / len(last)


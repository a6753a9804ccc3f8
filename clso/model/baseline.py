"""The dense baseline: the same GPT-2, every matrix dense and trained with AdamW — as fast as
standard practice trains it on the device at hand (bf16 autocast, SDPA attention, fused AdamW and
torch.compile on a CUDA GPU), since a slow baseline would flatter every energy ratio CLSO gets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2LMHeadModel

from clso import ClsoError
from clso.context import precision_context, resolve_precision
from clso.data.tokens import TokenData, random_batch, split_loss
from clso.energy import EnergyMeter
from clso.io import read_tensors
from clso.model.crystalline import ModelConfig
from clso.model.flops import forward_flops, throughput, train_step_flops

CURVE_FIELDS = ("step", "tokens", "train_loss", "val_loss", "energy_wh", "energy_method", "flops", "wall_s")


def learning_rate(step: int, params) -> float:
    """Linear warm-up to params.lr, then cosine decay to params.min_lr at params.steps (the `baseline`
    or `field` section of params.yaml)."""
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
    return params.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (params.lr - params.min_lr)


def dense_gpt2(config: ModelConfig, seed: int, device, attention: str = "sdpa", **gpt2) -> GPT2LMHeadModel:
    """The dense GPT-2 of `config`, seeded; `gpt2` overrides its GPT2Config (`clso bench train` compares
    transformers' default activation, say)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config.gpt2(attention, **gpt2)).to(device)


@dataclass(frozen=True)
class TrainingSetup:
    """How the training step runs, every `auto` of the params resolved for one device."""

    precision: str  # fp32 | tf32 | bf16
    attention: str  # sdpa | eager
    adamw: str  # fused | foreach | for-loop | default (torch's own choice)
    torch_compile: str  # none | a torch.compile mode
    micro_batch_size: int  # sequences per forward/backward pass

    @classmethod
    def resolve(cls, params, device) -> TrainingSetup:
        """From BaselineParams (precision, attention, adamw, torch_compile, micro_batch_size)."""
        cuda = torch.device(device).type == "cuda"
        adamw = params.adamw if params.adamw != "auto" else "fused" if cuda else "default"
        compile_mode = params.torch_compile if params.torch_compile != "auto" else "default" if cuda else "none"
        return cls(resolve_precision(params.precision, device), params.attention, adamw, compile_mode,
                   params.micro_batch_size or params.batch_size)


def adamw_optimizer(model: nn.Module, lr: float, weight_decay: float, implementation: str) -> torch.optim.AdamW:
    """AdamW with GPT-2's recipe: decay on matrices only, betas (0.9, 0.95)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
               "default": {}}[implementation]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), **options)


class NextTokenLoss(nn.Module):
    """The training objective as one module, so torch.compile fuses the LM head with the loss."""

    def __init__(self, model: GPT2LMHeadModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())


class TrainStep:
    """One AdamW step of a setup: gradients accumulated over micro-batches, clipped, applied."""

    def __init__(self, model: GPT2LMHeadModel, setup: TrainingSetup, *, lr: float, weight_decay: float,
                 grad_clip: float, device):
        self.model, self.setup, self.grad_clip, self.device = model, setup, grad_clip, device
        self.optimizer = adamw_optimizer(model, lr, weight_decay, setup.adamw)
        loss = NextTokenLoss(model)
        self.loss = loss if setup.torch_compile == "none" else torch.compile(loss, mode=setup.torch_compile)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """The step's mean loss, left on the device (reading it would wait for the GPU)."""
        # tf32 is a matmul mode: it must hold through backward too; bf16 autocast wraps the forward only
        whole_step = precision_context("tf32" if self.setup.precision == "tf32" else "fp32", self.device)
        forward_precision = "bf16" if self.setup.precision == "bf16" else "fp32"
        with whole_step:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            micro = self.setup.micro_batch_size
            parts = len(x) // micro
            total = None
            for i in range(0, len(x), micro):
                with precision_context(forward_precision, self.device):
                    loss = self.loss(x[i:i + micro], y[i:i + micro])
                (loss / parts if parts > 1 else loss).backward()
                # a copy: with CUDA graphs (compile's reduce-overhead, max-autotune) it is overwritten next step
                total = loss.detach().clone() if total is None else total + loss.detach()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        return total / parts if parts > 1 else total


def state_for_saving(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """The state dict without the tied LM head (safetensors stores no shared tensors)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# --- the trained baseline's folder (models/baseline) -------------------------------------------

def save_baseline(model: GPT2LMHeadModel, folder: str | Path) -> None:
    """model.safetensors: every weight but the tied head, into an existing folder."""
    save_file(state_for_saving(model), str(Path(folder) / "model.safetensors"), metadata={"clso": "baseline/1"})


def baseline_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights `save_baseline` wrote, by their transformers names (the tied head left out)."""
    return read_tensors(Path(folder) / "model.safetensors", "run `dvc repro baseline` first")


def load_baseline(folder: str | Path, config: ModelConfig, *, seed: int, device="cpu") -> GPT2LMHeadModel:
    """The baseline `save_baseline` wrote, for a ModelConfig of the same shape, in eval mode."""
    path = Path(folder) / "model.safetensors"
    model = dense_gpt2(config, seed, device)
    try:
        missing, unexpected = model.load_state_dict(baseline_tensors(folder), strict=False)
    except RuntimeError:  # a tensor of another shape
        missing, unexpected = ["(shapes differ)"], []
    # the tied head is the embedding, saved once: every other parameter must come from the file
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ClsoError(f"{path}: does not fit params.yaml's model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); re-create it with `dvc repro -f baseline`")
    model.tie_weights()
    return model.eval()


@dataclass
class BaselineResult:
    model: GPT2LMHeadModel
    setup: TrainingSetup
    curve: list[dict] = field(default_factory=list)
    train_energy: dict = field(default_factory=dict)
    # early stopping, as a practitioner keeps the best checkpoint: the curve point of lowest val loss,
    # what training had cost by then (train_energy's form) and what it cost after (charged to no one)
    best_step: int = 0
    to_best: dict = field(default_factory=dict)
    after_best: dict = field(default_factory=dict)


@torch.no_grad()
def _val_loss(model, tokens, batch_size, block_size, batches, rng, device) -> float:
    """On `batches` fixed random batches, or on the whole split when batches is 0."""
    model.eval()
    if batches == 0:
        loss = split_loss(lambda x: model(input_ids=x).logits, tokens, block_size, batch_size, device)
    else:
        loss = float(np.mean([float(F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()))
                              for x, y in (random_batch(tokens, batch_size, block_size, rng, device)
                                           for _ in range(batches))]))
    model.train()
    return loss


def train_baseline(data: TokenData, config: ModelConfig, params, *, seed: int, device, meter_options: dict,
                   on_eval=None) -> BaselineResult:
    """AdamW with warm-up and cosine decay (`params`: the `baseline` section), in the setup its settings
    resolve to on `device`. Curve rows carry the energy of training alone: the periodic validation
    (fp32, uncompiled) is metered apart and subtracted. Compilation happens in the first steps and is
    charged to training. The model returned is the one of the curve's lowest val loss (its last point
    while val still falls), with what training had cost by then."""
    setup = TrainingSetup.resolve(params, device)
    model = dense_gpt2(config, seed, device, setup.attention)
    step_fn = TrainStep(model, setup, lr=params.lr, weight_decay=params.weight_decay, grad_clip=params.grad_clip,
                        device=device)
    train, val = data.tokens("train"), data.tokens("val")
    rng = np.random.default_rng(seed)
    val_rng_seed = seed + 1  # the same val batches at every curve point
    step_flops = train_step_flops(config.gpt2(), config.block_size, params.batch_size)
    eval_seqs = params.batch_size * params.eval_batches or (len(val) - 1) // config.block_size
    eval_flops = forward_flops(config.gpt2(), config.block_size, eval_seqs)
    result = BaselineResult(model, setup=setup)
    evals = None  # the periodic validation so far, metered apart from training
    train_losses: list[torch.Tensor] = []
    best = (math.inf, None, None)  # val loss, state, training's reading at that point
    model.train()
    with EnergyMeter(**meter_options) as meter:
        for step in range(params.steps + 1):
            if step % params.eval_interval == 0 or step == params.steps:
                before = meter.read()
                val_loss = _val_loss(model, val, params.batch_size, config.block_size, params.eval_batches,
                                     np.random.default_rng(val_rng_seed), device)
                trained = before.minus(evals) if evals else before
                evals = meter.read().minus(before) if evals is None else evals.plus(meter.read().minus(before))
                row = {"step": step, "tokens": step * params.batch_size * config.block_size,
                       "train_loss": float(np.mean([float(t) for t in train_losses])) if train_losses else val_loss,
                       "val_loss": val_loss, "energy_wh": trained.energy_wh, "energy_method": trained.method,
                       "flops": step * step_flops, "wall_s": trained.wall_s}
                result.curve.append(row)
                if val_loss < best[0]:
                    best = (val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()}, trained)
                    result.best_step = step
                train_losses = []
                if on_eval:
                    on_eval(row)
            if step == params.steps:
                break
            x, y = random_batch(train, params.batch_size, config.block_size, rng, device)
            if step == 0:  # compilation, when there is any, happens in the first step: shown apart (and charged)
                started = meter.read()
            train_losses.append(step_fn(x, y, learning_rate(step, params)))
            if step == 0:
                first_step = meter.read().minus(started).as_metrics()
    validation = {"eval_energy_wh": evals.energy_wh, "eval_flops": eval_flops * len(result.curve),
                  "first_step": {k: first_step[k] for k in ("energy_wh", "wall_s")}}
    return _finish(result, meter.reading.minus(evals), best, params, step_flops,
                   params.steps * params.batch_size * config.block_size, device, validation)


def _finish(result: BaselineResult, whole, best: tuple, params, step_flops: int, tokens: int, device,
            validation: dict) -> BaselineResult:
    """Once training is done: the whole run's cost (`whole`, validation aside; `validation`'s own
    figures beside it), the cost to the best val point and after it, and the best point's weights
    back in the model."""
    trained = whole.as_metrics()
    # the last point is the model training ends with: its cost is the whole training's
    result.curve[-1].update(energy_wh=whole.energy_wh, energy_method=whole.method, wall_s=whole.wall_s)
    result.to_best = {**best[2].as_metrics(), "flops": result.best_step * step_flops}
    result.after_best = {**whole.minus(best[2]).as_metrics(), "flops": (params.steps - result.best_step) * step_flops}
    if result.best_step < params.steps:
        result.model.load_state_dict(best[1])
    result.train_energy = {**trained, "flops": params.steps * step_flops, **validation,
                           **throughput(params.steps * step_flops, tokens, trained["wall_s"], device)}
    result.model.eval()
    return result

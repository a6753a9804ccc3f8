"""The dense baseline: the same GPT-2, every matrix dense and trained with AdamW."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from clso.data import TokenData, random_batch
from clso.energy import EnergyMeter
from clso.evaluate import split_loss
from clso.flops import forward_flops, train_step_flops
from clso.model import ModelConfig

CURVE_FIELDS = ("step", "tokens", "train_loss", "val_loss", "energy_wh", "energy_method", "flops", "wall_s")


def learning_rate(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def dense_gpt2(config: ModelConfig, seed: int, device) -> GPT2LMHeadModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config.gpt2()).to(device)


def state_for_saving(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """The state dict without the tied LM head (safetensors stores no shared tensors)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@dataclass
class BaselineResult:
    model: GPT2LMHeadModel
    curve: list[dict] = field(default_factory=list)
    train_energy: dict = field(default_factory=dict)


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


def train_baseline(data: TokenData, config: ModelConfig, cfg, *, seed: int, device, meter_options: dict,
                   on_eval=None) -> BaselineResult:
    """AdamW with warm-up and cosine decay. Curve rows carry the energy of training alone: the
    periodic validation is metered apart and subtracted."""
    model = dense_gpt2(config, seed, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    train, val = data.tokens("train"), data.tokens("val")
    rng = np.random.default_rng(seed)
    val_rng_seed = seed + 1  # the same val batches at every curve point
    step_flops = train_step_flops(config.gpt2(), config.block_size, cfg.batch_size)
    eval_seqs = cfg.batch_size * cfg.eval_batches or (len(val) - 1) // config.block_size
    eval_flops = forward_flops(config.gpt2(), config.block_size, eval_seqs)
    result = BaselineResult(model)
    eval_wh = eval_wall = 0.0
    train_losses: list[float] = []
    model.train()
    with EnergyMeter(**meter_options) as meter:
        for step in range(cfg.steps + 1):
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                before = meter.read()
                val_loss = _val_loss(model, val, cfg.batch_size, config.block_size, cfg.eval_batches,
                                     np.random.default_rng(val_rng_seed), device)
                after = meter.read()
                row = {"step": step, "tokens": step * cfg.batch_size * config.block_size,
                       "train_loss": float(np.mean(train_losses)) if train_losses else val_loss,
                       "val_loss": val_loss, "energy_wh": before.energy_wh - eval_wh,
                       "energy_method": before.method, "flops": step * step_flops, "wall_s": before.wall_s - eval_wall}
                eval_wh += after.energy_wh - before.energy_wh
                eval_wall += after.wall_s - before.wall_s
                result.curve.append(row)
                train_losses = []
                if on_eval:
                    on_eval(row)
            if step == cfg.steps:
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            x, y = random_batch(train, cfg.batch_size, config.block_size, rng, device)
            loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            train_losses.append(float(loss.detach()))
    total = meter.reading
    result.train_energy = {"energy_wh": total.energy_wh - eval_wh, "method": total.method,
                           "wall_s": total.wall_s - eval_wall, "flops": cfg.steps * step_flops,
                           "eval_energy_wh": eval_wh, "eval_flops": eval_flops * len(result.curve)}
    model.eval()
    return result

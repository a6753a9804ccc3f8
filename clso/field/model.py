"""The geometric neuron-field LM of the crystal journal (document 004), trained by gradient.

    tokens → wte + wpe → [ causal self-attention → neuron field → MLP ] × n_layer → LayerNorm → tied head

(`attention=False` leaves the attention out: the journal's first, "flat" field, in which each
position queried the field alone.)

Each sub-layer reads a LayerNorm of the residual stream and adds its output back, as in GPT-2. The
field holds N neurons, each a position pᵢ and a value vᵢ in embedding space and a temperature τᵢ;
a query x (one position's normalised residual) weighs every neuron by its distance,

    wᵢ = exp(−dᵢ / (√d · (|τᵢ| + 0.1))),   dᵢ = √(max(0, ‖x‖² − 2 x·pᵢ + ‖pᵢ‖²) + 1e-6),
    field(x) = Σᵢ wᵢ vᵢ     (unnormalised, as the journal has it),

an adaptation of the journal's exp(−‖x − pᵢ‖ / (|τ| + 0.1)): distances are in units of √d, so that
its temperatures (0.05 … 0.8) mean the same at any width (LayerNorm outputs lie about √(2d) apart);
each neuron has its own temperature (its birth scale, the journal's rising tide; its flat field had
one); the field reads a LayerNorm and adds to the residual stream like the other sub-layers; and a
floor inside the root keeps the gradient finite where a query sits on a neuron. The C runtime computes the
same formula (clso/export/runtime/FORMAT.md, version 2).

Neurons are born and frozen during training: clso/field/train.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from clso import ClsoError
from clso.io import read_json, read_tensors, write_json_atomic
from clso.model.flops import attention_flops_per_token

DIST_FLOOR = 1e-6  # added to the squared distance under the root (see the module docstring)
TEMPERATURE_FLOOR = 0.1  # the journal's |τ| + 0.1


@dataclass(frozen=True)
class FieldConfig:
    vocab_size: int
    n_layer: int = 1
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 128
    initial_neurons: int = 64
    max_neurons: int = 1024
    attention: bool = True  # False: the journal's flat field, each position querying the field alone

    @classmethod
    def from_params(cls, params, vocab_size: int, block_size: int) -> FieldConfig:
        """From the params.yaml `field` section (FieldParams); the context is the baseline's (model.block_size)."""
        return cls(vocab_size, params.n_layer, params.n_embd, params.n_head, block_size, params.initial_neurons,
                   params.max_neurons, params.attention)

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd


class NeuronField(nn.Module):
    def __init__(self, n_embd: int, capacity: int):
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(capacity, n_embd))
        self.values = nn.Parameter(torch.zeros(capacity, n_embd))
        self.temperatures = nn.Parameter(torch.zeros(capacity))
        self.register_buffer("birth_step", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("frozen", torch.zeros(capacity, dtype=torch.bool))
        self.alive = 0  # neurons born so far, the first `alive` rows (a host count: reading it needs no sync)

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        super()._load_from_state_dict(state, prefix, *args, **kwargs)
        self.alive = int((self.birth_step >= 0).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.alive
        # always float32: in bf16, ‖x‖² − 2x·p + ‖p‖² would cancel away every distance
        with torch.autocast(x.device.type, enabled=False):
            return field_op(x.float(), self.positions[:n], self.values[:n], self.temperatures[:n])


def field_op(x: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """The neuron field on queries x (…, d): Σᵢ wᵢ vᵢ (module docstring)."""
    d = x.shape[-1]
    square = (x * x).sum(-1, keepdim=True) - 2 * x @ positions.t() + (positions * positions).sum(-1)
    distance = torch.sqrt(square.clamp_min(0) + DIST_FLOOR)
    weights = torch.exp(-distance / (math.sqrt(d) * (temperatures.abs() + TEMPERATURE_FLOOR)))
    return weights @ values


class CausalSelfAttention(nn.Module):
    def __init__(self, config: FieldConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in self.c_attn(x).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config: FieldConfig):
        super().__init__()
        d = config.n_embd
        self.attn = CausalSelfAttention(config) if config.attention else None
        self.ln_1 = nn.LayerNorm(d) if config.attention else None
        self.ln_field, self.field = nn.LayerNorm(d), NeuronField(d, config.max_neurons)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc, self.mlp_proj = nn.Linear(d, config.n_inner), nn.Linear(config.n_inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x))
        x = x + self.field(self.ln_field(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class FieldLM(nn.Module):
    def __init__(self, config: FieldConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        for name, p in self.named_parameters():  # GPT-2's initialisation; the fields are set at birth
            if p.dim() == 2 and ".field." not in name:
                nn.init.normal_(p, std=0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    @property
    def fields(self) -> list[NeuronField]:
        return [b.field for b in self.blocks]

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self._embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()

    def parameter_count(self) -> int:
        """Every dense parameter, and of each field its born neurons only (position, value, temperature)."""
        dense = sum(t.numel() for n, t in self.named_parameters() if ".field." not in n)
        return dense + sum((2 * self.config.n_embd + 1) * f.alive for f in self.fields)

    # --- the trained field's folder (models/field) ------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """model.safetensors (every weight, the neurons' capacity included) and config.json, into an
        existing folder."""
        folder = Path(folder)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"),
                  metadata={"clso": "field/1"})
        write_json_atomic(folder / "config.json", asdict(self.config))

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> FieldLM:
        """The model `save` wrote, in eval mode: its config.json, then its weights."""
        folder = Path(folder)
        config = read_json(folder / "config.json")
        try:
            with torch.random.fork_rng(devices=[]):  # its initialisation is overwritten: leave the global generator be
                model = cls(FieldConfig(**config)).to(device)
            model.load_state_dict(read_tensors(folder / "model.safetensors"))
        except (TypeError, RuntimeError) as e:
            raise ClsoError(f"{folder}: config.json and model.safetensors do not fit ({type(e).__name__}: "
                            f"{str(e)[:120]}); re-create it with `dvc repro -f field`") from None
        return model.eval()


def field_flops_per_token(n_embd: int, neurons: int) -> int:
    """Forward FLOPs per token of one field: the query–position products and the weighted sum of
    values, 2·N·d each (the norms, roots and exponentials, O(N), are left out as clso.model.flops leaves
    out softmax)."""
    return 4 * neurons * n_embd


def forward_flops(config: FieldConfig, neurons: list[int], seq_len: int, n_seqs: int = 1) -> int:
    """One forward pass with `neurons[l]` alive in block l: GPT-2's matmuls (clso.model.flops' convention)
    plus the fields'."""
    d, inner = config.n_embd, config.n_inner
    attention = 2 * d * 3 * d + 2 * d * d + attention_flops_per_token(d, seq_len) if config.attention else 0
    per_token = config.n_layer * (attention + 2 * d * inner + 2 * inner * d) + 2 * d * config.vocab_size
    per_token += sum(field_flops_per_token(d, n) for n in neurons)
    return per_token * seq_len * n_seqs

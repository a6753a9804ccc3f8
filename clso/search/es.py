"""Gradient-free training of a dense GPT-2: evolution strategies with low-rank perturbations (EGGROLL,
arXiv 2511.16652) and zeroth-order SGD (SPSA, as MeZO uses it), on one population forward.

A population of P members perturbs the parameters θ. Member p's parameters are θ + Δ_p; the members
come in antithetic pairs k (p = 2k adds the pair's noise, p = 2k + 1 subtracts it). A weight matrix
W (n_in × n_out, as GPT-2's Conv1D stores it) gets a low-rank Δ = (σ/√r)·A·Bᵀ, A (n_in × r) and
B (n_out × r) Gaussian, applied as x·W + (σ/√r)·(x·A)·Bᵀ: the perturbed matrix is never formed. A
vector (bias, LayerNorm) gets full-rank Gaussian noise σ·ε. The noise of a pair is ε_k, so that
Δ_p = ±σ·ε_k.

The gradient estimate of the smoothed loss is ĝ = (1/(Pσ))·Σ_p w_p·ε_p (Salimans et al. 2017), with
w_p the members' shaped fitness (the losses z-scored over the population): with antithetic pairs,
(1/(Pσ))·Σ_k (w_2k − w_2k+1)·ε_k, so a constant fitness gives exactly zero.

The population forward is GPT-2's (transformers' GPT2LMHeadModel, tied head, no dropout), written
out so that every member's parameters apply at once; tests/test_es.py checks it against
transformers' logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clso.model.flops import forward_flops

BODY = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's weight matrices
WTE, WPE = "transformer.wte.weight", "transformer.wpe.weight"


def parameters(model) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel's parameters by name, without the tied head (it is the token embedding)."""
    return {name: p for name, p in model.named_parameters() if not name.startswith("lm_head.")}


def body_matrices(params: dict[str, torch.Tensor]) -> list[str]:
    """The blocks' weight matrices: what CLSO's genome picks, and what hybrid-mode ES perturbs."""
    return [n for n in params if n.endswith(".weight") and any(f".{b}." in f".{n}" for b in BODY)]


@dataclass
class Noise:
    """One generation's noise, by antithetic pair: for a matrix (A, B), shapes (K, n_in, r) and
    (K, n_out, r); for any other tensor ε, shape (K, *its shape). `sigma` scales every Δ."""

    sigma: float
    rank: int
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]]
    full: dict[str, torch.Tensor]

    @property
    def pairs(self) -> int:
        return next(iter(self.low_rank.values()))[0].shape[0] if self.low_rank else next(iter(self.full.values())).shape[0]

    @property
    def members(self) -> int:
        return 2 * self.pairs

    @staticmethod
    def draw(params: dict[str, torch.Tensor], low_rank: list[str], full: list[str], pairs: int, sigma: float,
             rank: int, generator: torch.Generator) -> Noise:
        """Gaussian noise for `pairs` antithetic pairs: low rank on the matrices named in `low_rank`,
        full rank on the tensors named in `full`, drawn in that order from `generator` (on the CPU,
        so a seed gives the same noise on any device)."""

        def gauss(*shape):
            return torch.randn(*shape, generator=generator).to(params[next(iter(params))].device)

        lr = {n: (gauss(pairs, params[n].shape[0], rank), gauss(pairs, params[n].shape[1], rank)) for n in low_rank}
        return Noise(sigma, rank, lr, {n: gauss(pairs, *params[n].shape) for n in full})

    def dense(self, name: str) -> torch.Tensor:
        """ε of every pair for `name`, formed (K, *shape): for tests and small models only."""
        if name in self.low_rank:
            a, b = self.low_rank[name]
            return a @ b.transpose(1, 2) / math.sqrt(self.rank)
        return self.full[name]


def signs(members: torch.Tensor) -> torch.Tensor:
    """+1 for the first member of a pair (even index), −1 for the second."""
    return 1.0 - 2.0 * (members % 2).to(torch.float32)


class Population:
    """θ and the members `members` (indices into the population) of one generation's noise: the forward
    of every member at once, its population dimension first."""

    def __init__(self, params: dict[str, torch.Tensor], noise: Noise | None, members: torch.Tensor):
        self.params, self.noise, self.members = params, noise, members
        device = next(iter(params.values())).device
        self.pair = (members // 2).to(device)
        self.scale = (signs(members) * (noise.sigma if noise else 0.0)).to(device)  # ±σ per member

    def __len__(self) -> int:
        return len(self.members)

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        """A per-pair tensor as per-member, times ±σ."""
        return t[self.pair] * self.scale.view(-1, *([1] * (t.dim() - 1)))

    def _factor(self, a: torch.Tensor) -> torch.Tensor:
        """A low-rank pair's A as each member's, times ±σ/√r: the scale rides on the thin factor."""
        return self._scaled(a) / math.sqrt(self.noise.rank)

    def tensor(self, name: str) -> torch.Tensor:
        """Parameter `name` for each member, (P, *shape): for vectors, and any tensor with full-rank noise."""
        base = self.params[name].unsqueeze(0)
        if self.noise is None or name not in self.noise.full:
            return base
        return base + self._scaled(self.noise.full[name])

    def matmul(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x·(W + Δ_p) for each member p; x (P or 1, N, n_in) → (P, N, n_out)."""
        w, noise = self.params[name], self.noise
        if noise is not None and name in noise.full:  # MeZO's: each member's matrix formed, one product,
            return x @ (w + self._scaled(noise.full[name]))  # as θ + εz written in place would give
        out = (x @ w).expand(len(self), -1, -1)
        if noise is not None and name in noise.low_rank:
            a, b = noise.low_rank[name]
            out = torch.baddbmm(out, x.expand(len(self), -1, -1) @ self._factor(a), b[self.pair].transpose(1, 2))
        return out

    def linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return self.matmul(x, f"{prefix}.weight") + self.tensor(f"{prefix}.bias").unsqueeze(1)

    def layer_norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=1e-5)
        return y * self.tensor(f"{prefix}.weight").unsqueeze(1) + self.tensor(f"{prefix}.bias").unsqueeze(1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token and position embeddings of idx (B, T), each member's: (P, B·T, d)."""
        wte, wpe = WTE, WPE
        flat = idx.reshape(-1)
        pos = torch.arange(idx.shape[1], device=idx.device).repeat(idx.shape[0])
        out = self.params[wte][flat] + self.params[wpe][pos]
        out = out.unsqueeze(0).expand(len(self), *out.shape)
        for name, rows in ((wte, flat), (wpe, pos)):
            if self.noise is None:
                continue
            if name in self.noise.low_rank:
                a, b = self.noise.low_rank[name]
                out = torch.baddbmm(out, self._factor(a)[:, rows], b[self.pair].transpose(1, 2))
            elif name in self.noise.full:
                out = out + self._scaled(self.noise.full[name])[:, rows]
        return out

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The tied head: h·(wte + Δ_p)ᵀ, (P, N, vocab)."""
        name = WTE
        if self.noise is not None and name in self.noise.full:
            return h @ (self.params[name] + self._scaled(self.noise.full[name])).transpose(1, 2)
        out = h @ self.params[name].T
        if self.noise is not None and name in self.noise.low_rank:
            a, b = self.noise.low_rank[name]
            out = torch.baddbmm(out, h @ b[self.pair], self._factor(a).transpose(1, 2))
        return out

    def logits(self, idx: torch.Tensor, n_layer: int, n_head: int) -> torch.Tensor:
        """Every member's next-token logits for idx (B, T): (P, B, T, vocab)."""
        batch, t = idx.shape
        h = self.embed(idx)  # (P, B·T, d)
        p, d = len(self), h.shape[-1]
        for i in range(n_layer):
            block = f"transformer.h.{i}"
            qkv = self.linear(self.layer_norm(h, f"{block}.ln_1"), f"{block}.attn.c_attn")
            q, k, v = (z.reshape(p * batch, t, n_head, d // n_head).transpose(1, 2) for z in qkv.split(d, dim=-1))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            att = att.transpose(1, 2).reshape(p, batch * t, d)
            h = h + self.linear(att, f"{block}.attn.c_proj")
            m = F.gelu(self.linear(self.layer_norm(h, f"{block}.ln_2"), f"{block}.mlp.c_fc"), approximate="tanh")
            h = h + self.linear(m, f"{block}.mlp.c_proj")
        return self.head(self.layer_norm(h, "transformer.ln_f")).reshape(p, batch, t, -1)


@torch.no_grad()
def member_losses(params: dict[str, torch.Tensor], noise: Noise | None, idx: torch.Tensor, targets: torch.Tensor,
                  n_layer: int, n_head: int, chunk: int = 8) -> torch.Tensor:
    """Each member's mean next-token loss on one batch (idx, targets: (B, T)), `chunk` members per
    forward; with no noise, θ's loss alone. θ is read, never written."""
    total = noise.members if noise is not None else 1
    out = []
    for first in range(0, total, chunk):
        pop = Population(params, noise, torch.arange(first, min(first + chunk, total)))
        logits = pop.logits(idx, n_layer, n_head)
        y = targets.reshape(-1).repeat(len(pop))
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y, reduction="none")
        out.append(losses.view(len(pop), -1).mean(1))
    return torch.cat(out)


def shaped(losses: torch.Tensor) -> torch.Tensor:
    """The members' fitness z-scored over the population (zero where every loss is equal)."""
    std = losses.std()
    return torch.zeros_like(losses) if std == 0 else (losses - losses.mean()) / std


def estimate(noise: Noise, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """ĝ = (1/(Pσ))·Σ_k (w_2k − w_2k+1)·ε_k for every perturbed tensor, from the members' weights
    (shaped fitness, population order). A low-rank ε_k = A_k·B_kᵀ/√r: the sum is one einsum over
    the pairs, its rank at most K·r."""
    diff = (weights[0::2] - weights[1::2]).to(torch.float32)
    scale = 1.0 / (noise.members * noise.sigma)
    out = {}
    for name, (a, b) in noise.low_rank.items():
        out[name] = torch.einsum("k,kir,kor->io", diff.to(a.device), a, b) * (scale / math.sqrt(noise.rank))
    for name, e in noise.full.items():
        out[name] = torch.einsum("k,k...->...", diff.to(e.device), e) * scale
    return out


def spsa_estimate(noise: Noise, losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """MeZO's projected gradient, averaged over its n directions z_k (full rank, the pairs of `noise`):
    mean_k ((L(θ+εz_k) − L(θ−εz_k)) / 2ε)·z_k, ε = noise.sigma. `losses` in population order."""
    projected = (losses[0::2] - losses[1::2]).to(torch.float32) / (2 * noise.sigma)
    return {name: torch.einsum("k,k...->...", projected.to(e.device), e) / noise.pairs for name, e in noise.full.items()}


def population_flops(config, seq_len: int, n_seqs: int, members: int, noise: Noise | None) -> int:
    """FLOPs of `members` members' forward on `n_seqs` sequences, as Population computes them: each
    member's GPT-2 forward (clso.model.flops, `config` a GPT2Config), plus per token the thin products
    of each low-rank Δ: x·A then ·Bᵀ, 2·r·(n_in + n_out); an embedding's A rows are gathered, so
    2·r·d; the tied head's h·B then ·Aᵀ, 2·r·(d + vocab). A full-rank Δ is added to its matrix
    before the one product: no FLOPs beyond the dense forward (elementwise work is not counted)."""
    extra = 0
    for name, (a, b) in (noise.low_rank.items() if noise is not None else ()):
        n_in, n_out = a.shape[1], b.shape[1]
        if name == WPE:
            extra += 2 * noise.rank * n_out
        elif name == WTE:  # the embedding (vocab × d), then the tied head
            extra += 2 * noise.rank * n_out + 2 * noise.rank * (n_out + n_in)
        else:
            extra += 2 * noise.rank * (n_in + n_out)
    return members * (forward_flops(config, seq_len, n_seqs) + extra * seq_len * n_seqs)

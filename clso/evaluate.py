"""Fitness of genomes: the mean next-token loss of each on the same fixed evaluation batch.

`population_losses` is a pure function of (genomes, the batch, the library, the continuous
parameters): workers that share those can each take a shard of a population. It is fast because

  * the population runs as one batched pass: LayerNorms, attention and the LM head see every
    distinct network at once;
  * each library matrix is applied in factored form (low-rank as two thin matmuls, blocks as
    small matmuls), once per distinct gene, for all networks that use it;
  * networks that share a prefix of genes share its computation: gene k's output depends only on
    genes 0..k, so the population is walked as a trie, one level per gene;
  * `FitnessEvaluator` never evaluates a genome twice on the same batch.

`plain_losses` is the reference: one genome at a time, dense weights materialised into a
stock GPT2LMHeadModel. The two agree to float32 rounding (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clso.library import BUCKETS
from clso.model import CrystallineGPT2, load_dense_weights

LOGITS_PER_CHUNK = 2**25  # floats of logits held at once (128 MiB)


@dataclass(frozen=True)
class EvalBatch:
    """Fixed evaluation windows: `starts` are the batch ids, x/y the tokens they name."""

    starts: tuple[int, ...]
    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, starts, block_size: int, device="cpu") -> EvalBatch:
        starts = tuple(int(s) for s in starts)
        if not starts or min(starts) < 0 or max(starts) + block_size + 1 > len(tokens):
            raise ValueError(f"batch windows outside a split of {len(tokens)} tokens")
        window = np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in starts])
        xy = torch.from_numpy(window).to(device)
        return cls(starts, xy[:, :-1], xy[:, 1:])

    @classmethod
    def sample(cls, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, device="cpu") -> EvalBatch:
        starts = np.random.default_rng(seed).integers(0, len(tokens) - block_size - 1, size=batch_size)
        return cls.from_tokens(tokens, starts, block_size, device)


def _apply_genes(layer, inputs: torch.Tensor, parent: torch.Tensor, gene: torch.Tensor) -> torch.Tensor:
    """Row n of the result is library[gene[n]] applied to inputs[parent[n]], with gain and bias."""
    library, bucket = layer.library, layer.bucket
    d_out = library.shapes[bucket][1]
    if len(gene) == 1:
        return library.apply(bucket, int(gene[0]), inputs[parent], layer.gain, layer.bias)
    out = inputs.new_empty(len(gene), *inputs.shape[1:-1], d_out)
    for g in torch.unique(gene).tolist():
        rows = (gene == g).nonzero().flatten()
        out[rows] = library.apply(bucket, g, inputs[parent[rows]], layer.gain, layer.bias)
    return out


def _attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    n, b, t, three_d = qkv.shape
    d = three_d // 3
    q, k, v = (z.reshape(n * b, t, n_head, d // n_head).transpose(1, 2) for z in qkv.split(d, dim=-1))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return a.transpose(1, 2).reshape(n, b, t, d)


def _trie_losses(model: CrystallineGPT2, genomes: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gpt = model.gpt2.transformer
    size = model.library.size
    positions = torch.arange(x.shape[1], device=x.device)
    resid = (gpt.wte(x) + gpt.wpe(positions)).unsqueeze(0)  # one root node: (nodes, B, T, d)
    hidden = None  # attention output (slot 0→1) or MLP activation (slot 2→3), per node
    node = torch.zeros(len(genomes), dtype=torch.long, device=x.device)
    for k, layer in enumerate(model.layers):
        block, slot = gpt.h[k // len(BUCKETS)], k % len(BUCKETS)
        keys, node = torch.unique(node * size + genomes[:, k], return_inverse=True)
        parent, gene = keys // size, keys % size
        if slot == 0:
            hidden = _attention(_apply_genes(layer, block.ln_1(resid), parent, gene), model.config.n_head)
            resid = resid[parent]
        elif slot == 1:
            resid = resid[parent] + _apply_genes(layer, hidden, parent, gene)
        elif slot == 2:
            # the tanh GELU of GPT-2 ("gelu_new"), fused: one pass instead of HF's five
            hidden = F.gelu(_apply_genes(layer, block.ln_2(resid), parent, gene), approximate="tanh")
            resid = resid[parent]
        else:
            resid = resid[parent] + _apply_genes(layer, hidden, parent, gene)
    final = gpt.ln_f(resid)
    n, b, t, _ = final.shape
    per_chunk = max(1, LOGITS_PER_CHUNK // (b * t * model.config.vocab_size))
    node_losses = torch.cat([
        F.cross_entropy(model.gpt2.lm_head(final[i:i + per_chunk]).flatten(0, 2),
                        y.expand(len(final[i:i + per_chunk]), -1, -1).flatten(), reduction="none"
                        ).view(-1, b * t).mean(1)
        for i in range(0, n, per_chunk)
    ])
    return node_losses[node]


@torch.no_grad()
def population_losses(model: CrystallineGPT2, genomes, batch: EvalBatch, max_networks: int = 64) -> np.ndarray:
    """Mean loss of each genome on `batch`; a non-finite loss is returned as +inf (unfit).

    Genomes are sorted so that those sharing prefixes land in the same chunk of `max_networks`.
    """
    genomes = torch.as_tensor(np.asarray(genomes), dtype=torch.long).reshape(-1, len(model.layers))
    order = sorted(range(len(genomes)), key=lambda i: genomes[i].tolist())
    out = torch.empty(len(genomes), dtype=torch.float64)
    for start in range(0, len(order), max_networks):
        idx = torch.tensor(order[start:start + max_networks])
        losses = _trie_losses(model, genomes[idx].to(batch.x.device), batch.x, batch.y)
        out[idx] = losses.double().cpu()
    out[~torch.isfinite(out)] = math.inf
    return out.numpy()


@torch.no_grad()
def plain_losses(model: CrystallineGPT2, genomes, batch: EvalBatch) -> np.ndarray:
    """The seed's way: per genome, dense weights into a stock GPT2LMHeadModel, one forward."""
    genomes = np.asarray(genomes).reshape(-1, len(model.layers))
    dense = model.dense_gpt2(genomes[0])
    out = np.empty(len(genomes))
    for i, genome in enumerate(genomes):
        load_dense_weights(dense, model, genome)
        logits = dense(input_ids=batch.x).logits
        out[i] = float(F.cross_entropy(logits.flatten(0, 1), batch.y.flatten()))
    out[~np.isfinite(out)] = math.inf
    return out


class FitnessEvaluator:
    """Losses on one fixed batch, each distinct genome computed once.

    Call `invalidate()` whenever the continuous parameters change (hybrid mode): cached losses
    belong to the parameters they were computed with.
    """

    def __init__(self, model: CrystallineGPT2, batch: EvalBatch, max_networks: int = 64):
        self.model, self.batch, self.max_networks = model, batch, max_networks
        self.cache: dict[tuple[int, ...], float] = {}
        self.computed = 0  # genomes really evaluated (cache misses)

    def __call__(self, genomes) -> np.ndarray:
        keys = [tuple(int(g) for g in genome) for genome in np.asarray(genomes).reshape(-1, len(self.model.layers))]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            losses = population_losses(self.model, missing, self.batch, self.max_networks)
            self.cache.update(zip(missing, losses.tolist()))
            self.computed += len(missing)
        return np.array([self.cache[k] for k in keys])

    def invalidate(self) -> None:
        self.cache.clear()

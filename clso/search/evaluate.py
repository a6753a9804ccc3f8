"""Fitness of genomes: the mean next-token loss of each on the same fixed evaluation batch.

`population_losses` is a pure function of (genomes, the batch, the library, the continuous
parameters): workers that share those can each take a shard of a population. It is fast because

  * networks that share a prefix of genes share its computation: gene k's output depends only on
    genes 0..k, so the distinct genomes are walked in sorted order as a trie and each shared
    prefix is computed once;
  * on a GPU, up to 64 networks go side by side through one batched pass (LayerNorms, attention,
    each distinct gene once for all networks that use it, the LM head); the trie's bookkeeping
    stays on the host and its row indices go to the GPU from pinned memory without blocking, so
    the host queues a whole chunk ahead of the GPU (one sync per chunk, for its losses); on a CPU
    the networks go one at a time, depth first, so each network's activations stay in cache;
  * in `precision` bf16 (the default on a GPU), matmuls and attention run in bfloat16 under
    autocast while the residual stream, norms and log-sum-exp stay float32: selection must not
    change, so the bench reports the rank correlation of bf16 and fp32 losses (tested ≥ 0.99);
  * each library matrix is applied in factored form (low-rank as two thin matmuls, blocks as
    small matmuls), with its gain and bias fused into the last matmul;
  * the LM head's log-sum-exp runs in place in one reused logits buffer;
  * `FitnessEvaluator` never evaluates a genome twice on the same batch.

`plain_losses` is the reference: one genome at a time, dense weights materialised into a
stock GPT2LMHeadModel. The two agree to float32 rounding (tested).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from clso.context import precision_context, to_device
from clso.data.tokens import EvalBatch
from clso.model.crystalline import CrystallineGPT2, load_dense_weights
from clso.model.flops import attention_flops_per_token, dense_linear_flops
from clso.model.library import BUCKETS

LOGITS_PER_CHUNK = 2**25  # most logits held at once (128 MiB of float32)


def _apply_genes(layer, inputs: torch.Tensor, parent: np.ndarray, gene: np.ndarray) -> torch.Tensor:
    """Row n of the result is library[gene[n]] applied to inputs[parent[n]], with gain and bias.
    The grouping by gene is done on the host."""
    library, bucket = layer.library, layer.bucket
    if len(gene) == 1:
        p = int(parent[0])
        return library.apply(bucket, int(gene[0]), inputs[p:p + 1], layer.gain, layer.bias)
    out = None
    for g in np.unique(gene).tolist():
        rows = np.flatnonzero(gene == g)
        part = library.apply(bucket, g, inputs[_index(parent[rows], inputs.device)], layer.gain, layer.bias)
        if out is None:  # the dtype apply gives (bfloat16 under autocast)
            out = part.new_empty(len(gene), *part.shape[1:])
        out[_index(rows, inputs.device)] = part
    return out


def _index(rows: np.ndarray, device):
    """Host row numbers as an index: a slice when they are consecutive (a view, not a gather)."""
    if rows[-1] - rows[0] == len(rows) - 1 and (len(rows) < 3 or bool((np.diff(rows) == 1).all())):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return to_device(torch.from_numpy(rows), device)


def _attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    n, b, t, three_d = qkv.shape
    d = three_d // 3
    q, k, v = (z.reshape(n * b, t, n_head, d // n_head).transpose(1, 2) for z in qkv.split(d, dim=-1))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return a.transpose(1, 2).reshape(n, b, t, d)


def _trie_losses(model: CrystallineGPT2, genomes: np.ndarray, y: torch.Tensor, path: list):
    """Losses of sorted, distinct `genomes` that all start with the genes of `path`.

    `path[j]` is the state (residual, hidden) after the first j genes of the previous chunk's
    last genome, `path[0]` the embeddings. Returns the losses, the path of this chunk's last
    genome, so that the next chunk can start where their prefixes part, and the matmul FLOPs
    this call computed (each trie node once, in the convention of clso.model.flops). The trie's
    bookkeeping (which node is whose parent, with which gene) stays on the host.
    """
    gpt = model.gpt2.transformer
    size = model.library.size
    tokens = y.numel()
    start = len(path) - 1
    resid, hidden = path[-1]  # one node: (1, B, T, d) and its pending activation, if any
    node = np.zeros(len(genomes), dtype=np.int64)
    path = list(path)
    flops = 0
    for k in range(start, len(model.layers)):
        layer = model.layers[k]
        block, slot = gpt.h[k // len(BUCKETS)], k % len(BUCKETS)
        keys, node = np.unique(node * size + genomes[:, k], return_inverse=True)
        node = node.reshape(-1)
        parent, gene = keys // size, keys % size
        flops += tokens * sum(model.library.flops_per_token(layer.bucket, g) for g in gene.tolist())
        if slot == 0:
            flops += len(keys) * attention_flops_per_token(model.config.n_embd, y.shape[-1]) * tokens
            hidden = _attention(_apply_genes(layer, block.ln_1(resid), parent, gene), model.config.n_head)
            resid = _gather(resid, parent)
        elif slot == 1:
            resid = _gather(resid, parent) + _apply_genes(layer, hidden, parent, gene)
            hidden = None
        elif slot == 2:
            # the tanh GELU of GPT-2 ("gelu_new"), fused: one pass instead of HF's five
            hidden = F.gelu(_apply_genes(layer, block.ln_2(resid), parent, gene), approximate="tanh")
            resid = _gather(resid, parent)
        else:
            resid = _gather(resid, parent) + _apply_genes(layer, hidden, parent, gene)
            hidden = None
        last = int(node[-1])
        path.append((_row(resid, last), None if hidden is None else _row(hidden, last)))
    node_losses = _head_losses(model, gpt.ln_f(resid), y)
    flops += len(node_losses) * tokens * dense_linear_flops(model.config.n_embd, model.config.vocab_size)
    return node_losses[_index(node, node_losses.device)], path, flops


def trie_flops(model: CrystallineGPT2, genomes, batch: EvalBatch, max_networks: int | None = None) -> int:
    """The matmul FLOPs population_losses_and_flops computes on distinct `genomes` in one process
    (chunks of `max_networks`, each starting where its prefix leaves the chunk before), counted on
    the host without computing: what a search is charged however many workers shared the work."""
    genomes = np.unique(np.asarray(genomes, dtype=np.int64).reshape(-1, len(model.layers)), axis=0)
    max_networks = max_networks or default_max_networks(batch.x.device)
    tokens, seq_len, d = batch.y.numel(), batch.y.shape[-1], model.config.n_embd
    flops, previous = 0, None
    for first in range(0, len(genomes), max_networks):
        chunk = genomes[first:first + max_networks]
        shared = 0 if previous is None else _common_prefix(previous, chunk[-1])
        for k in range(shared, len(model.layers)):
            genes = np.unique(chunk[:, :k + 1], axis=0)[:, k]
            flops += tokens * sum(model.library.flops_per_token(model.layers[k].bucket, int(g)) for g in genes)
            if k % len(BUCKETS) == 0:
                flops += len(genes) * attention_flops_per_token(d, seq_len) * tokens
        flops += len(chunk) * tokens * dense_linear_flops(d, model.config.vocab_size)
        previous = chunk[-1]
    return flops


def _head_losses(model: CrystallineGPT2, final: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each network's LM-head logits against y.

    log-sum-exp is taken in place in one reused logits buffer: a fresh (tokens × vocab) tensor
    per network would cost more in page faults than the softmax itself.
    """
    n, b, t, d = final.shape
    weight = model.gpt2.lm_head.weight  # (V, d)
    rows = max(b * t, LOGITS_PER_CHUNK // weight.shape[0] // (b * t) * (b * t))
    flat, target = final.reshape(n * b * t, d), y.reshape(1, -1).expand(n, -1).reshape(-1, 1)
    losses = torch.empty(n * b * t, dtype=torch.float32, device=final.device)
    low_precision = torch.is_autocast_enabled(final.device.type)
    buffer = None if low_precision else torch.empty(min(rows, len(flat)), weight.shape[0], dtype=final.dtype,
                                                    device=final.device)
    for i in range(0, len(flat), rows):
        if low_precision:  # the matmul in bfloat16, the log-sum-exp in float32
            logits = (flat[i:i + rows] @ weight.t()).float()
        else:
            logits = buffer[:len(flat[i:i + rows])]
            torch.mm(flat[i:i + rows], weight.t(), out=logits)
        picked = logits.gather(1, target[i:i + rows]).squeeze(1)
        top = logits.amax(1, keepdim=True)
        logits.sub_(top).exp_()
        losses[i:i + rows] = logits.sum(1).log_() + top.squeeze(1) - picked
    return losses.view(n, b * t).mean(1)


def _gather(states: torch.Tensor, parent: np.ndarray) -> torch.Tensor:
    if len(parent) == len(states) and bool((parent == np.arange(len(states))).all()):
        return states  # every node has one child: nothing to copy
    return states[_index(parent, states.device)]


def _row(states: torch.Tensor, i: int) -> torch.Tensor:
    # a copy only when the level holds other nodes, so the path does not pin the whole level
    return states if len(states) == 1 else states[i:i + 1].clone()


def _common_prefix(a, b) -> int:
    n = 0
    while n < len(a) and a[n] == b[n]:
        n += 1
    return n


def default_max_networks(device) -> int:
    """Networks walked side by side: one on CPU, where per-network tensors stay in cache and a
    depth-first walk already shares every prefix; many on a GPU, which wants big batches."""
    return 64 if torch.device(device).type == "cuda" else 1


def population_losses(model: CrystallineGPT2, genomes, batch: EvalBatch, max_networks: int | None = None,
                      precision: str = "fp32") -> np.ndarray:
    """Mean loss of each genome on `batch`; a non-finite loss is returned as +inf (unfit)."""
    return population_losses_and_flops(model, genomes, batch, max_networks, precision)[0]


@torch.no_grad()
def population_losses_and_flops(model: CrystallineGPT2, genomes, batch: EvalBatch, max_networks: int | None = None,
                                precision: str = "fp32") -> tuple[np.ndarray, int]:
    """The losses of `population_losses` and the matmul FLOPs computed to get them.

    Distinct genomes are walked in sorted order, `max_networks` at a time; each chunk starts
    from the state where its prefix leaves the previous chunk's last genome. `precision` bf16
    runs the matmuls and attention in bfloat16 (autocast) and the residual stream, norms and the
    loss's log-sum-exp in float32.
    """
    genomes = np.asarray(genomes, dtype=np.int64).reshape(-1, len(model.layers))
    distinct, back = np.unique(genomes, axis=0, return_inverse=True)  # sorted lexicographically
    device = batch.x.device
    max_networks = max_networks or default_max_networks(device)
    gpt = model.gpt2.transformer
    root = (gpt.wte(batch.x) + gpt.wpe(torch.arange(batch.x.shape[1], device=device))).unsqueeze(0)
    path, previous = [(root, None)], None
    out = torch.empty(len(distinct), dtype=torch.float64)
    flops = 0
    with precision_context(precision, device):
        for start in range(0, len(distinct), max_networks):
            chunk = distinct[start:start + max_networks]
            shared = 0 if previous is None else _common_prefix(previous, chunk[-1])
            losses, path, chunk_flops = _trie_losses(model, chunk, batch.y, path[:shared + 1])
            out[start:start + len(chunk)] = losses.double().cpu()
            flops += chunk_flops
            previous = chunk[-1]
    out[~torch.isfinite(out)] = math.inf
    return out.numpy()[back.reshape(-1)], flops


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

    def __init__(self, model: CrystallineGPT2, batch: EvalBatch, max_networks: int | None = None,
                 precision: str = "fp32", pool=None):
        self.model, self.batch, self.max_networks, self.precision = model, batch, max_networks, precision
        self.pool = pool  # a clso.search.workers.RayPool, or None: in this process
        self.pool_weights_stale = True  # the pool's actors have not got the current continuous weights
        self.worker_extra_flops = 0  # what the actors computed beyond one process: each shard boundary's prefix
        self.cache: dict[tuple[int, ...], float] = {}
        self.computed = 0  # genomes really evaluated (cache misses)
        self.flops = 0  # matmul FLOPs of those evaluations, shared prefixes counted once
        self.last_computed: list[tuple[int, ...]] = []  # the cache misses of the last call
        self.last_flops = self.last_extra_flops = 0

    def __call__(self, genomes) -> np.ndarray:
        keys = [tuple(int(g) for g in genome) for genome in np.asarray(genomes).reshape(-1, len(self.model.layers))]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        self.last_computed, self.last_flops, self.last_extra_flops = missing, 0, 0
        if missing:
            if self.pool is None:
                losses, self.last_flops = population_losses_and_flops(self.model, missing, self.batch,
                                                                      self.max_networks, self.precision)
            else:
                if self.pool_weights_stale:
                    self.pool.set_weights(self.model.continuous_state())
                    self.pool_weights_stale = False
                ordered = np.array(sorted(missing), dtype=np.int64)  # contiguous shards share their prefixes
                losses, computed = self.pool.losses_and_flops(ordered)
                # charged as one process would compute them, whatever the number of workers; what the
                # shard boundaries cost on top is reported apart
                self.last_flops = trie_flops(self.model, ordered, self.batch, self.max_networks)
                self.last_extra_flops = computed - self.last_flops
                self.worker_extra_flops += self.last_extra_flops
                ordered = list(map(tuple, ordered.tolist()))
                by_genome = dict(zip(ordered, losses.tolist()))
                losses = np.array([by_genome[k] for k in missing])  # the cache's order is the search's: the
                # surrogate trains on it in that order
            self.cache.update(zip(missing, losses.tolist()))
            self.computed += len(missing)
            self.flops += self.last_flops
        return np.array([self.cache[k] for k in keys])

    def invalidate(self) -> None:
        self.cache.clear()
        self.pool_weights_stale = True

    def take_worker_readings(self) -> list:
        """The pool's energy readings not yet taken, up to now (none in process)."""
        return self.pool.take_readings() if self.pool is not None else []

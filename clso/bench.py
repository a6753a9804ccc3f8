"""Benchmarks: the fast paths against the plain ones, measured side by side in one run.

`bench_eval`: population evaluation, the seed's plain loop against `population_losses`, and the
fast path in bf16 against fp32 (speed and rank agreement). `bench_train`: one AdamW step of the
dense baseline in each precision / attention / optimizer / compile setting. Both take a preset of
shapes: `default` (params.yaml's CPU-sized model) or `protocol` (GPT-2 small, as the origin's).
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from clso.data.tokens import EvalBatch, random_batch
from clso.energy import EnergyMeter
from clso.model.baseline import TrainingSetup, TrainStep, dense_gpt2
from clso.model.crystalline import CrystallineGPT2, ModelConfig, genome_length
from clso.model.flops import forward_flops, peak_flops, train_step_flops
from clso.model.library import Library
from clso.search import ga
from clso.search.evaluate import FitnessEvaluator, plain_losses, population_losses, population_losses_and_flops
from clso.search.surrogate import spearman

DEFAULT_SHARES = {"block_diag": 0.25, "ternary_lowrank": 0.45, "structured_sparse": 0.25, "dense_quantized": 0.05}
# shapes of each preset: the model, the baseline's batch (train), the fitness batch, population and
# library (eval); vocab 4096 is the offline corpus' BPE (GPT-2's own tokenizer has 50257)
PRESETS = {
    "default": {"n_embd": 128, "n_layer": 2, "n_head": 4, "block_size": 128, "vocab_size": 4096,
                "train_batch_size": 16, "eval_batch_size": 8, "population": 64, "library_size": 256},
    "protocol": {"n_embd": 768, "n_layer": 12, "n_head": 12, "block_size": 512, "vocab_size": 4096,
                 "train_batch_size": 16, "eval_batch_size": 16, "population": 256, "library_size": 512},
}
# the baseline step's settings, from the plain reference to standard practice (fp32-sdpa is what the
# pipeline's baseline ran before it took the fast path)
# the pipeline's GPT-2 uses the fused tanh GELU and builds no key/value cache in training; `gelu_new`
# is transformers' default GPT-2 (seven element-wise ops, a cache built each step), to measure that choice
FUSED, GELU_NEW = {"activation": "gelu_pytorch_tanh", "use_cache": False}, {"activation": "gelu_new", "use_cache": True}
TRAIN_SETTINGS = {
    "fp32-eager": {"precision": "fp32", "attention": "eager", "adamw": "default", "torch_compile": "none", **FUSED},
    "fp32-sdpa": {"precision": "fp32", "attention": "sdpa", "adamw": "default", "torch_compile": "none", **FUSED},
    "fp32-sdpa-gelu_new": {"precision": "fp32", "attention": "sdpa", "adamw": "default", "torch_compile": "none",
                           **GELU_NEW},
    "tf32-sdpa": {"precision": "tf32", "attention": "sdpa", "adamw": "default", "torch_compile": "none", **FUSED},
    "bf16-sdpa": {"precision": "bf16", "attention": "sdpa", "adamw": "default", "torch_compile": "none", **FUSED},
    "bf16-sdpa-fused": {"precision": "bf16", "attention": "sdpa", "adamw": "fused", "torch_compile": "none", **FUSED},
    "bf16-sdpa-fused-compile": {"precision": "bf16", "attention": "sdpa", "adamw": "fused", "torch_compile": "default",
                                **FUSED},
}
DEFAULT_TRAIN_SETTINGS = {"cuda": ("fp32-eager", "fp32-sdpa-gelu_new", "fp32-sdpa", "tf32-sdpa", "bf16-sdpa-fused",
                                   "bf16-sdpa-fused-compile"),
                          "cpu": ("fp32-eager", "fp32-sdpa-gelu_new", "fp32-sdpa", "bf16-sdpa")}


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _synchronized(fn, device):
    def run():
        out = fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def _side_by_side(genomes: np.ndarray, plain, fast, repeats: int, device="cpu") -> dict:
    """Interleaved repeats of both paths on the same genomes; medians, so one noisy run cannot decide."""
    plain_s, fast_s = [], []
    for _ in range(repeats):
        t, plain_out = _timed(_synchronized(lambda: plain(genomes), device))
        plain_s.append(t)
        t, fast_out = _timed(_synchronized(fast, device))
        fast_s.append(t)
    diff = np.abs(fast_out - plain_out)
    plain_t, fast_t = statistics.median(plain_s), statistics.median(fast_s)
    return {
        "genomes": len(genomes),
        "plain_genomes_per_s": round(len(genomes) / plain_t, 3),
        "fast_genomes_per_s": round(len(genomes) / fast_t, 3),
        "ratio": round(plain_t / fast_t, 3),
        "plain_s": [round(t, 4) for t in plain_s], "fast_s": [round(t, 4) for t in fast_s],
        "max_abs_loss_diff": float(diff.max()),
        "max_rel_loss_diff": float((diff / np.abs(plain_out)).max()),
        "spearman": round(spearman(fast_out, plain_out), 6),
    }


def bench_model_and_batch(device, *, n_embd, n_layer, n_head, batch_size, block_size, library_size, vocab_size,
                          seed) -> tuple[CrystallineGPT2, EvalBatch]:
    """The benchmarks' model, on a generated library, and a fitness batch of uniform random tokens
    (speed does not depend on their content): the same on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        library, _ = Library.generate(seed, n_embd, size=library_size, shares=DEFAULT_SHARES, stats_device=device)
        config = ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                             block_size=block_size)
        model = CrystallineGPT2(config, library, seed=seed).to(device).eval()
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=batch_size * block_size * 16, dtype=np.int64)
    return model, EvalBatch.sample(tokens, batch_size, block_size, seed, device)


def _distinct_genomes(population: int, n_genes: int, library_size: int, rng: np.random.Generator) -> np.ndarray:
    distinct = np.unique(rng.integers(0, library_size, size=(population, n_genes)), axis=0)
    while len(distinct) < population:
        extra = rng.integers(0, library_size, size=(population - len(distinct), n_genes))
        distinct = np.unique(np.concatenate([distinct, extra]), axis=0)
    return rng.permutation(distinct)


def bench_eval_workers(workers: int, *, n_embd=128, n_layer=2, n_head=4, population=64, batch_size=8,
                       block_size=128, library_size=256, vocab_size=4096, repeats=3, seed=0, precision="fp32",
                       address: str | None = None, device="cpu") -> dict:
    """Population evaluation on Ray actors (evolve.workers): genomes/s of P distinct random genomes
    on `workers` actors against the first actor alone, interleaved, after one warm-up call each;
    the speed-up, the scaling efficiency (speed-up / workers), the FLOPs of each side (a shard
    boundary costs its shared prefix) and whether the losses are bit for bit the same."""
    from clso.search.workers import RayPool

    shapes = dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, batch_size=batch_size, block_size=block_size,
                  library_size=library_size, vocab_size=vocab_size, seed=seed)
    model, batch = bench_model_and_batch(device, **shapes)  # the actors run on this kind of device
    genomes = np.unique(_distinct_genomes(population, genome_length(model.config), library_size,
                                          np.random.default_rng(seed)), axis=0)
    pool = RayPool(workers, model, batch, precision, {"device": device}, address)
    try:
        sides = {"one_worker": 1, "workers": workers}
        out = {side: pool.losses_and_flops(genomes, actors=n) for side, n in sides.items()}  # warm: models built
        times = {side: [] for side in sides}
        for _ in range(repeats):
            for side, n in sides.items():
                start = time.perf_counter()
                pool.losses_and_flops(genomes, actors=n)
                times[side].append(time.perf_counter() - start)
        devices = pool.ray.cluster_resources()
    finally:
        pool.close()
    per_s = {side: len(genomes) / statistics.median(t) for side, t in times.items()}
    speedup = per_s["workers"] / per_s["one_worker"]
    return {
        "benchmark": "eval_workers", "workers": workers, "device": str(torch.device(device).type), "precision": precision,
        "cluster": {"cpus": devices.get("CPU", 0), "gpus": devices.get("GPU", 0)},
        "config": {**shapes, "population": len(genomes), "repeats": repeats},
        "one_worker_genomes_per_s": round(per_s["one_worker"], 3), "workers_genomes_per_s": round(per_s["workers"], 3),
        "speedup": round(speedup, 4), "scaling_efficiency": round(speedup / workers, 4),
        "one_worker_flops": out["one_worker"][1], "workers_flops": out["workers"][1],
        "losses_identical": bool(np.array_equal(out["one_worker"][0], out["workers"][0])),
    }


def bench_eval(*, n_embd=128, n_layer=2, n_head=4, population=64, batch_size=8, block_size=128,
               library_size=256, vocab_size=4096, warmup_generations=10, repeats=3, seed=0,
               device="cpu", precision="fp32") -> dict:
    """Population evaluation: plain loop (the seed's way, fp32) against `population_losses` in
    `precision`, and the fast path in bf16 against fp32.

    (a) `distinct_random`: P distinct random genomes, no cache: any gain is work really saved.
    (b) `ga_generation`: the children that elitism, tournament selection, crossover and
        mutation make from a population the GA has already evaluated for
        `warmup_generations` generations; the fast path keeps the fitness cache a real run has.
    (c) `precision`: the fast path on (a)'s genomes in bf16 and in fp32: genomes/s, TFLOP/s and
        the Spearman rank correlation of their losses (selection must not change: ≥ 0.99).
    Tokens are uniform random ids: speed does not depend on their content. Agreement does — it
    depends on how far apart the losses are — so (a) and (b) report the Spearman correlation of the
    fast path in `precision` against the plain fp32 one: with bf16 (auto on CUDA) that is bf16
    against fp32 on (b)'s children too, the near neighbours a GA that has run a while makes.
    """
    model, batch = bench_model_and_batch(device, n_embd=n_embd, n_layer=n_layer, n_head=n_head, batch_size=batch_size,
                                         block_size=block_size, library_size=library_size, vocab_size=vocab_size,
                                         seed=seed)
    config = model.config
    rng = np.random.default_rng(seed)
    n_genes = genome_length(config)
    dense_flops = forward_flops(config.gpt2(), block_size, batch_size)

    def plain(genomes):
        return plain_losses(model, genomes, batch)

    def flops_of(genomes):
        return {"flops_per_genome_dense": dense_flops,
                "flops_per_genome_factored": int(np.mean([model.genome_flops(g, block_size, batch_size)
                                                          for g in genomes]))}

    # (a) distinct random genomes
    distinct = _distinct_genomes(population, n_genes, library_size, rng)
    part_a = _side_by_side(distinct, plain, lambda: population_losses(model, distinct, batch, precision=precision),
                           repeats, device)
    part_a.update(flops_of(distinct))
    computed = population_losses_and_flops(model, distinct, batch, precision=precision)[1]
    part_a["fast_tflops"] = round(computed * part_a["fast_genomes_per_s"] / len(distinct) / 1e12, 6)

    # (b) one real GA generation
    part_b = _ga_generation(model, batch, plain, population, warmup_generations, seed, repeats, device, precision)
    part_b.update(flops_of(np.array(part_b.pop("children"))))

    # (c) bf16 against fp32, both on the fast path
    part_c = _precisions(model, distinct, batch, repeats, device)
    return {
        "benchmark": "eval", "device": str(device), "device_name": peak_flops(device)[1],
        "threads": torch.get_num_threads(), "precision": precision,
        "config": {"n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "population": population,
                   "batch_size": batch_size, "block_size": block_size, "library_size": library_size,
                   "vocab_size": vocab_size, "genome_length": n_genes, "repeats": repeats, "seed": seed},
        "distinct_random": part_a,
        "ga_generation": part_b,
        "precision_bf16_vs_fp32": part_c,
    }


def _ga_generation(model, batch: EvalBatch, plain, population: int, warmup_generations: int, seed: int, repeats: int,
                   device, precision: str) -> dict:
    """The children of one GA generation after `warmup_generations`, scored by the plain loop and by the
    evaluator with the fitness cache a real run has by then (its children too, for their FLOPs)."""
    n_genes, library_size = len(model.layers), model.library.size
    ga_config = ga.GAConfig(population=population, genome_length=n_genes, library_size=library_size)
    evaluator = FitnessEvaluator(model, batch, precision=precision)
    state = ga.init(ga_config, seed)
    state = ga.tell(ga_config, state, state.population, evaluator(state.population))
    for _ in range(warmup_generations):
        children, state = ga.ask(ga_config, state)
        state = ga.tell(ga_config, state, children, evaluator(children))
    children, state = ga.ask(ga_config, state)
    warm_cache = dict(evaluator.cache)

    def fast_generation():
        evaluator.cache = dict(warm_cache)
        return evaluator(children)

    keys = {tuple(c) for c in children.tolist()}
    part = _side_by_side(children, plain, fast_generation, repeats, device)
    return {**part, "generation": state.generation + 1, "distinct_children": len(keys),
            "already_evaluated": sum(k in warm_cache for k in keys),
            "evaluated_by_fast_path": sum(k not in warm_cache for k in keys), "children": children.tolist()}


def _precisions(model, genomes: np.ndarray, batch: EvalBatch, repeats: int, device) -> dict:
    seconds = {"fp32": [], "bf16": []}
    losses, flops = {}, 0
    for _ in range(repeats):
        for precision in seconds:
            t, (losses[precision], flops) = _timed(_synchronized(
                lambda: population_losses_and_flops(model, genomes, batch, precision=precision), device))
            seconds[precision].append(t)
    out = {}
    for precision, times in seconds.items():
        t = statistics.median(times)
        out[precision] = {"genomes_per_s": round(len(genomes) / t, 3), "tflops": round(flops / t / 1e12, 6),
                          "seconds": [round(x, 4) for x in times]}
    diff = np.abs(losses["bf16"] - losses["fp32"])
    return {**out, "genomes": len(genomes),
            "ratio": round(statistics.median(seconds["fp32"]) / statistics.median(seconds["bf16"]), 3),
            "spearman": round(spearman(losses["bf16"], losses["fp32"]), 6),
            "max_abs_loss_diff": float(diff.max()), "fp32_loss_spread": float(np.std(losses["fp32"]))}


def _train_results(runs: dict, step_flops: int, tokens: int, peak: float | None, reference: str) -> dict:
    """Each setting's medians, and its speed and energy against the reference, against fp32-sdpa (what
    the pipeline's baseline ran before it took the fast path) and against transformers' default GPT-2
    (gelu_new with a cache: what the pipeline's GPT-2s ran before they took the fused GELU)."""
    out = {}
    for setting, run in runs.items():
        t, j = statistics.median(run["seconds"]), statistics.median(run["joules"])
        out[setting] = {**TRAIN_SETTINGS[setting], "precision": run["setup"].precision, "adamw": run["setup"].adamw,
                        "ms_per_step": round(t * 1e3, 3), "tokens_per_s": round(tokens / t, 1),
                        "tflops": round(step_flops / t / 1e12, 6),
                        "mfu": None if peak is None else round(step_flops / t / peak, 4),
                        "joules_per_step": round(j, 4), "gpu_joules_per_step": round(statistics.median(run["gpu_joules"]), 4),
                        "energy_method": run["method"], "last_loss": round(run["loss"], 4),
                        "ms_per_step_runs": [round(x * 1e3, 3) for x in run["seconds"]]}
    for name, suffix in ((reference, "reference"), ("fp32-sdpa", "fp32_sdpa"), ("fp32-sdpa-gelu_new", "gelu_new")):
        if name not in out or (suffix != "reference" and name == reference):
            continue
        base = out[name]
        for r in out.values():
            r[f"speedup_vs_{suffix}"] = round(base["ms_per_step"] / r["ms_per_step"], 3)
            r[f"energy_vs_{suffix}"] = round(r["joules_per_step"] / base["joules_per_step"], 4) \
                if base["joules_per_step"] else None
    return out


def bench_train(*, n_embd=128, n_layer=2, n_head=4, block_size=128, batch_size=16, vocab_size=4096,
                micro_batch_size=0, settings: tuple[str, ...] | None = None, steps=50, warmup_steps=3, repeats=3,
                seed=0, device="cpu", cpu_watts_per_core=10.0, gpu_watts=300.0) -> dict:
    """One AdamW step of the dense baseline in each setting (TRAIN_SETTINGS): ms/step, tokens/s,
    achieved TFLOP/s, MFU where the device's peak is known, and energy per step (NVML on an NVIDIA
    GPU, with the method recorded), each against the first setting. `warmup_steps` (compilation
    included) are not timed; then `repeats` rounds of `steps` steps go through the settings in
    turn, and medians are reported, so drift in clocks or temperature touches every setting alike."""
    device = torch.device(device)
    settings = settings or DEFAULT_TRAIN_SETTINGS["cuda" if device.type == "cuda" else "cpu"]
    unknown = [s for s in settings if s not in TRAIN_SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}; valid: {', '.join(TRAIN_SETTINGS)}")
    config = ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size)
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=batch_size * block_size * 16)
    rng = np.random.default_rng(seed)
    step_flops = train_step_flops(config.gpt2(), block_size, batch_size)
    peak, name = peak_flops(device)
    runs = {}
    for setting in settings:
        options = SimpleNamespace(**TRAIN_SETTINGS[setting], micro_batch_size=micro_batch_size, batch_size=batch_size)
        setup = TrainingSetup.resolve(options, device)
        model = dense_gpt2(config, seed, device, setup.attention, activation=TRAIN_SETTINGS[setting]["activation"],
                           use_cache=TRAIN_SETTINGS[setting]["use_cache"]).train()
        step = TrainStep(model, setup, lr=1e-4, weight_decay=0.1, grad_clip=1.0, device=device)
        for _ in range(warmup_steps):
            step(*random_batch(tokens, batch_size, block_size, rng, device), 1e-4)
        runs[setting] = {"step": step, "setup": setup, "seconds": [], "joules": [], "gpu_joules": [], "method": None}
    for _ in range(repeats):
        for setting, run in runs.items():
            with EnergyMeter(device, cpu_watts_per_core=cpu_watts_per_core, gpu_watts=gpu_watts) as meter:
                for _ in range(steps):  # batches drawn and sent as the pipeline's baseline does
                    loss = run["step"](*random_batch(tokens, batch_size, block_size, rng, device), 1e-4)
            reading = meter.reading
            run["seconds"].append(reading.wall_s / steps)
            run["joules"].append(reading.energy_wh * 3600 / steps)
            run["gpu_joules"].append(reading.gpu_wh * 3600 / steps)
            run["method"], run["loss"] = reading.method, float(loss)
    out = _train_results(runs, step_flops, batch_size * block_size, peak, settings[0])
    return {"benchmark": "train", "device": str(device), "device_name": name,
            "peak_bf16_tflops": None if peak is None else round(peak / 1e12, 1), "threads": torch.get_num_threads(),
            "reference": settings[0],
            "config": {"n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "block_size": block_size,
                       "batch_size": batch_size, "micro_batch_size": micro_batch_size or batch_size,
                       "vocab_size": vocab_size, "steps": steps, "warmup_steps": warmup_steps, "repeats": repeats,
                       "seed": seed, "flops_per_step": step_flops},
            "settings": out}


def bench_es(*, n_embd=128, n_layer=2, n_head=4, block_size=128, vocab_size=4096, batch_size=8, pairs=16, rank=1,
             sigma=0.02, repeats=3, seed=0, device="cpu") -> dict:
    """The arena's ES member evaluation (clso.search.es): members/s of the low-rank population forward,
    which never forms a perturbed matrix, against forming each member's θ + Δ (A·Bᵀ formed, written into a
    transformers GPT-2) and running it, on one batch; interleaved repeats, medians, their ratio and the
    largest loss difference between the two."""
    import torch.nn.functional as F

    from clso.context import generator
    from clso.search.es import Noise, member_losses, parameters

    config = ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size,
                         layer_gains=False)
    params = {n: p.detach() for n, p in parameters(dense_gpt2(config, seed, device).eval()).items()}
    matrices = [n for n, p in params.items() if p.dim() == 2]
    noise = Noise.draw(params, matrices, [n for n in params if n not in matrices], pairs, sigma, rank,
                       generator(seed, "bench-es"))
    x, y = random_batch(np.arange(vocab_size).repeat(4) % vocab_size, batch_size, block_size,
                        np.random.default_rng(seed), device)
    member = dense_gpt2(config, seed, device).eval()
    weights = parameters(member)

    @torch.no_grad()
    def formed(_):
        losses = []
        for p in range(noise.members):
            sign, k = 1.0 - 2.0 * (p % 2), p // 2
            for name, value in weights.items():
                if name in noise.low_rank:
                    a, b = noise.low_rank[name]
                    delta = a[k] @ b[k].T / rank ** 0.5
                else:
                    delta = noise.full[name][k]
                value.copy_(params[name] + sign * sigma * delta)
            losses.append(float(F.cross_entropy(member(input_ids=x).logits.flatten(0, 1), y.flatten())))
        return np.array(losses)

    result = _side_by_side(np.zeros((noise.members, 1)), formed,
                           lambda: member_losses(params, noise, x, y, n_layer, n_head).cpu().numpy(), repeats, device)
    return {"members": noise.members, "rank": rank, "formed_members_per_s": result["plain_genomes_per_s"],
            "low_rank_members_per_s": result["fast_genomes_per_s"], "ratio": result["ratio"],
            "formed_s": result["plain_s"], "low_rank_s": result["fast_s"],
            "max_abs_loss_diff": result["max_abs_loss_diff"], "spearman": result["spearman"]}

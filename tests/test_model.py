import pytest
import torch
from transformers import GPT2LMHeadModel

from clso.model.crystalline import (
    CrystallineGPT2,
    CrystallineLinear,
    ModelConfig,
    gene_buckets,
    gene_layer_names,
    genome_length,
)
from clso.model.flops import forward_flops
from clso.model.library import Library

SHARES = {"block_diag": 0.25, "ternary_lowrank": 0.45, "structured_sparse": 0.25, "dense_quantized": 0.05}
CONFIG = ModelConfig(vocab_size=50, n_layer=2, n_embd=16, n_head=2, block_size=8)


@pytest.fixture(scope="module")
def library():
    return Library.generate(3, 16, size=20, shares=SHARES)[0]


def test_genome_layout(library):
    assert genome_length(CONFIG) == 8
    assert gene_buckets(CONFIG)[:4] == ["c_attn", "attn_proj", "c_fc", "mlp_proj"]
    assert gene_layer_names(CONFIG)[5] == "transformer.h.1.attn.c_proj"
    model = CrystallineGPT2(CONFIG, library, seed=0)
    model.set_genome([1, 2, 3, 4, 5, 6, 7, 8])
    layer = model.gpt2.get_submodule("transformer.h.1.mlp.c_fc")
    assert isinstance(layer, CrystallineLinear) and layer.bucket == "c_fc" and layer.gene == 7
    assert model.genome == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="genes"):
        model.set_genome([0] * 7)
    with pytest.raises(ValueError, match="outside"):
        model.set_genome([20] * 8)


def test_logits_equal_a_stock_gpt2_with_materialised_weights(library):
    model = CrystallineGPT2(CONFIG, library, seed=0)
    genome = [3, 19, 0, 7, 11, 4, 16, 2]
    model.set_genome(genome)
    dense = model.dense_gpt2(genome)
    assert type(dense) is GPT2LMHeadModel
    idx = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), dense(input_ids=idx).logits, rtol=1e-5, atol=1e-5)


def test_seeded_continuous_parts_are_reproducible(library):
    a, b = CrystallineGPT2(CONFIG, library, seed=5), CrystallineGPT2(CONFIG, library, seed=5)
    c = CrystallineGPT2(CONFIG, library, seed=6)
    sa, sb, sc = a.continuous_state(), b.continuous_state(), c.continuous_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.wte.weight"], sc["transformer.wte.weight"])


def test_pure_mode_trains_nothing_and_no_gradient_reaches_the_library(library):
    model = CrystallineGPT2(CONFIG, library, mode="pure", seed=0)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_mode("hybrid")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "gpt2.transformer.wte.weight" in trainable and "gpt2.transformer.h.0.mlp.c_fc.gain" in trainable
    idx = torch.randint(0, 50, (2, 8))
    model(idx).logsumexp(-1).mean().backward()
    assert model.gpt2.transformer.wte.weight.grad is not None
    for matrices in library.matrices.values():
        for m in matrices:
            for t in [*m.tensors.values(), *(b for _, _, b in m.blocks)]:
                assert not t.requires_grad and t.grad is None


def test_continuous_state_round_trips(library):
    a, b = CrystallineGPT2(CONFIG, library, seed=1), CrystallineGPT2(CONFIG, library, seed=2)
    b.load_continuous_state(a.continuous_state())
    assert all(torch.equal(v, b.continuous_state()[k]) for k, v in a.continuous_state().items())
    assert "transformer.h.0.attn.c_attn.gain" in a.continuous_state()


def test_factored_flops_are_what_torch_counts_on_the_real_forward(library):
    from tests.conftest import counted_flops

    model = CrystallineGPT2(CONFIG, library, seed=0)
    kinds = {b: [e["kind"] for e in library.manifest["buckets"][b]["matrices"]] for b in gene_buckets(CONFIG)}
    genome = [kinds[b].index(kind) for b, kind in zip(gene_buckets(CONFIG), ["lowrank", "blocks", "dense"] * 3)]
    model.set_genome(genome)
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert model.genome_flops(genome, 8, 2) == counted_flops(lambda: model(idx))
        dense = model.dense_gpt2(genome, attn_implementation="sdpa")
        assert forward_flops(CONFIG.gpt2(), 8, 2) == counted_flops(lambda: dense(input_ids=idx))


def test_moving_the_model_moves_its_library(library):
    model = CrystallineGPT2(CONFIG, library, seed=0).to(torch.float32).to("cpu")
    assert model.library.device == torch.device("cpu")
    assert all(layer.library is model.library for layer in model.layers)


def test_every_gpt2_of_the_pipeline_uses_the_fused_gelu_and_builds_no_cache():
    """gelu_pytorch_tanh is gelu_new in one kernel (issue 25: the baseline's step as fast as nanoGPT's);
    training and scoring build no key/value cache. The baseline, CLSO's model and transfer all take
    ModelConfig.gpt2."""
    from clso.model.baseline import dense_gpt2

    config = ModelConfig(vocab_size=50, n_layer=1, n_embd=16, n_head=2, block_size=8)
    for gpt2 in (config.gpt2(), dense_gpt2(config, 0, "cpu").config):
        assert gpt2.activation_function == "gelu_pytorch_tanh" and gpt2.use_cache is False
    x = torch.linspace(-4, 4, 101)
    from transformers.activations import ACT2FN

    torch.testing.assert_close(ACT2FN["gelu_pytorch_tanh"](x), ACT2FN["gelu_new"](x), rtol=1e-6, atol=1e-6)

import numpy as np
import pytest

from clso.search.surrogate import Surrogate, SurrogateConfig, kendall_tau, spearman, top_recall

BUCKETS = (0, 1, 2, 3, 0, 1, 2, 3)


def planted(n, seed, M=32):
    """An additive problem: each gene adds its own cost, as the surrogate's structure assumes."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(99).gamma(2.0, 0.05, size=(8, M))
    genomes = rng.integers(0, M, size=(n, 8))
    return genomes, 2.0 + table[np.arange(8), genomes].sum(1)


@pytest.mark.parametrize("ranking", ["ranknet", "margin"])
def test_surrogate_ranks_a_planted_additive_problem(ranking):
    train_g, train_l = planted(600, 0)
    test_g, test_l = planted(300, 1)
    s = Surrogate(SurrogateConfig(BUCKETS, 32, ranking=ranking, ensemble=2), seed=0)
    s.fit(train_g, train_l, seed=0, steps=400)
    mean, spread = s.predict(test_g)
    assert spearman(mean, test_l) > 0.7
    assert spread.shape == (300,) and (spread >= 0).all()


def test_training_is_deterministic_and_state_round_trips():
    g, losses = planted(200, 0)
    a, b = Surrogate(SurrogateConfig(BUCKETS, 32), seed=3), Surrogate(SurrogateConfig(BUCKETS, 32), seed=3)
    a.fit(g, losses, seed=1, steps=50)
    b.fit(g, losses, seed=1, steps=50)
    np.testing.assert_array_equal(a.predict(g)[0], b.predict(g)[0])
    c = Surrogate(SurrogateConfig(BUCKETS, 32), seed=9)
    c.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(c.predict(g)[0], a.predict(g)[0])


def test_unfit_genomes_are_learned_as_worst():
    g, losses = planted(300, 0)
    losses[:30] = np.inf
    s = Surrogate(SurrogateConfig(BUCKETS, 32), seed=0)
    s.fit(g, losses, seed=0, steps=300)
    mean, _ = s.predict(g)
    assert mean[:30].mean() > mean[30:].mean()


def test_rank_statistics_on_hand_made_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(2 * 3))  # tau-b with a tie
    assert top_recall(np.arange(20), np.arange(20)) == 1.0
    assert top_recall(-np.arange(20), np.arange(20)) == 0.0


def test_flops_are_what_torch_counts():
    from tests.conftest import counted_flops

    g, losses = planted(50, 0)
    s = Surrogate(SurrogateConfig(BUCKETS, 32, ensemble=2, batch_size=16), seed=0)
    assert counted_flops(lambda: s.fit(g, losses, steps=3)) == s.training_flops(len(g), steps=3)
    assert counted_flops(lambda: s.fit(g[:10], losses[:10], steps=2)) == s.training_flops(10, steps=2)
    assert counted_flops(lambda: s.predict(g)) == s.inference_flops(len(g))


def structured(n, seed, M=64, kinds=4):
    """Each library matrix is one of a few kinds, and the loss adds a cost per kind: structure
    features say everything, while an index embedding must learn 8 × M pairs from n genomes."""
    import torch

    kind = np.random.default_rng(3).integers(0, kinds, size=(4, M))
    cost = np.random.default_rng(4).gamma(2.0, 0.05, size=(8, kinds))
    features = torch.nn.functional.one_hot(torch.from_numpy(kind), kinds).float()  # (buckets, M, kinds)
    genomes = np.random.default_rng(seed).integers(0, M, size=(n, 8))
    losses = 2.0 + cost[np.arange(8), kind[np.array(BUCKETS), genomes]].sum(1)
    return genomes, losses, features


def test_structure_features_rank_what_an_index_embedding_cannot_learn_from_few_genomes():
    train_g, train_l, features = structured(80, 0)
    test_g, test_l, _ = structured(300, 1)
    rho = {}
    for inputs in ("index", "structure", "both"):
        cfg = SurrogateConfig(BUCKETS, 64, inputs=inputs, n_features=0 if inputs == "index" else 4)
        s = Surrogate(cfg, seed=0, features=None if inputs == "index" else features)
        s.fit(train_g, train_l, seed=0, steps=400)
        rho[inputs] = spearman(s.predict(test_g)[0], test_l)
    assert rho["structure"] > 0.9 and rho["structure"] > rho["index"] + 0.2, rho


def test_structure_features_travel_with_the_state_and_their_flops_are_counted():
    from safetensors.torch import load, save

    from tests.conftest import counted_flops

    g, losses, features = structured(50, 0)
    cfg = SurrogateConfig(BUCKETS, 64, inputs="structure", n_features=4, ensemble=2, batch_size=16)
    s = Surrogate(cfg, seed=0, features=features)
    assert counted_flops(lambda: s.fit(g, losses, steps=3)) == s.training_flops(len(g), steps=3)
    assert counted_flops(lambda: s.predict(g)) == s.inference_flops(len(g))
    back = Surrogate(cfg, seed=5)  # no features given: the state brings them
    back.load_state_dict(load(save(s.state_dict())))
    np.testing.assert_array_equal(back.predict(g)[0], s.predict(g)[0])
    with pytest.raises(ValueError, match="n_features"):
        SurrogateConfig(BUCKETS, 64, inputs="structure")


def test_an_index_surrogate_ignores_the_structure_table_it_is_handed():
    g, losses, features = structured(50, 0)
    s = Surrogate(SurrogateConfig(BUCKETS, 64), seed=0, features=features)
    s.fit(g, losses, seed=0, steps=5)
    assert s.members[0].features.shape == (4 * 64, 0)

"""The gradient-free arena's core (clso.search.es): the population forward, low-rank ES and SPSA."""

import math

import pytest
import torch

from clso.model.baseline import dense_gpt2
from clso.model.crystalline import ModelConfig
from clso.search.es import Noise, Population, body_matrices, estimate, member_losses, parameters, shaped, spsa_estimate

CONFIG = ModelConfig(vocab_size=50, n_layer=2, n_embd=16, n_head=2, block_size=8, layer_gains=False)


def model_and_params(seed=0):
    model = dense_gpt2(CONFIG, seed, "cpu").eval()
    with torch.no_grad():  # nonzero biases and LayerNorms, so their noise is seen
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model, {n: p.detach() for n, p in parameters(model).items()}


def draw(params, pairs=3, sigma=0.05, rank=2, seed=0, full_rank=False):
    """Low rank on every matrix and full rank on every vector (ES), or full rank on all (MeZO)."""
    matrices = [] if full_rank else [n for n, p in params.items() if p.dim() == 2]
    rest = [n for n in params if n not in matrices]
    return Noise.draw(params, matrices, rest, pairs, sigma, rank, torch.Generator().manual_seed(seed))


def test_the_population_forward_is_transformers_gpt2():
    model, params = model_and_params()
    idx = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.block_size), generator=torch.Generator().manual_seed(1))
    ours = Population(params, None, torch.arange(1)).logits(idx, CONFIG.n_layer, CONFIG.n_head)[0]
    with torch.no_grad():
        theirs = model(input_ids=idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("full_rank", [False, True])
def test_each_member_is_the_model_with_its_perturbation_formed(full_rank):
    """Low rank on every matrix (embeddings and tied head included), or full rank on all: each
    member's logits are those of transformers' model with θ + Δ_p written into it."""
    model, params = model_and_params()
    noise = draw(params, full_rank=full_rank)
    idx = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size), generator=torch.Generator().manual_seed(2))
    ours = Population(params, noise, torch.arange(noise.members)).logits(idx, CONFIG.n_layer, CONFIG.n_head)
    for p in range(noise.members):
        member, sign = dense_gpt2(CONFIG, 0, "cpu").eval(), 1.0 if p % 2 == 0 else -1.0
        with torch.no_grad():
            for name, value in parameters(member).items():
                value.copy_(params[name] + sign * noise.sigma * noise.dense(name)[p // 2])
            theirs = member(input_ids=idx).logits
        torch.testing.assert_close(ours[p], theirs, rtol=1e-4, atol=1e-4)


def test_the_low_rank_product_is_x_times_w_plus_e_without_forming_e():
    _, params = model_and_params()
    name = body_matrices(params)[0]
    noise = draw(params, pairs=2, rank=3)
    x = torch.randn(4, 5, params[name].shape[0], generator=torch.Generator().manual_seed(3))
    got = Population(params, noise, torch.arange(4)).matmul(x, name)
    for p in range(4):
        w = params[name] + (1 - 2 * (p % 2)) * noise.sigma * noise.dense(name)[p // 2]
        torch.testing.assert_close(got[p], x[p] @ w, rtol=1e-5, atol=1e-5)


def test_the_body_matrices_are_the_blocks_four_per_block():
    _, params = model_and_params()
    assert body_matrices(params) == [f"transformer.h.{i}.{m}.weight" for i in range(2)
                                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_antithetic_pairs_cancel_a_constant_fitness_exactly():
    _, params = model_and_params()
    noise = draw(params, pairs=5)
    g = estimate(noise, torch.full((noise.members,), 3.7))
    assert set(g) == set(params) and all(bool((v == 0).all()) for v in g.values())
    assert all(bool((v == 0).all()) for v in estimate(noise, shaped(torch.full((10,), 2.0))).values())


def quadratic(theta, target):
    return sum(0.5 * float(((theta[n] - target[n]) ** 2).sum()) for n in theta)


def planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    target = {n: torch.randn(t.shape, generator=g) for n, t in theta.items()}
    return theta, target


def cosine(estimated, true):
    a = torch.cat([estimated[n].flatten() for n in true])
    b = torch.cat([true[n].flatten() for n in true])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("rank", [1, 2])
def test_low_rank_es_points_along_the_gradient_of_a_planted_quadratic(rank):
    theta, target = planted()
    noise = Noise.draw(theta, ["w"], ["b"], 3000, 0.01, rank, torch.Generator().manual_seed(4))
    losses = torch.tensor([quadratic({n: theta[n] + (1 - 2 * (p % 2)) * noise.sigma * noise.dense(n)[p // 2]
                                      for n in theta}, target) for p in range(noise.members)])
    true = {n: theta[n] - target[n] for n in theta}
    assert cosine(estimate(noise, shaped(losses)), true) > 0.9
    assert cosine(estimate(noise, losses), true) > 0.9
    few = Noise.draw(theta, ["w"], ["b"], 2, 0.01, rank, torch.Generator().manual_seed(4))
    assert cosine(estimate(few, losses[:4]), true) < 0.9  # two pairs span too little: the test can fail


def test_spsa_points_along_the_gradient_and_leaves_theta_bit_for_bit():
    theta, target = planted(1)
    before = {n: t.clone() for n, t in theta.items()}
    noise = Noise.draw(theta, [], ["w", "b"], 3000, 1e-3, 1, torch.Generator().manual_seed(5))
    losses = torch.tensor([quadratic({n: theta[n] + (1 - 2 * (p % 2)) * noise.sigma * noise.full[n][p // 2]
                                      for n in theta}, target) for p in range(noise.members)])
    g = spsa_estimate(noise, losses)
    assert cosine(g, {n: theta[n] - target[n] for n in theta}) > 0.9
    assert all(torch.equal(theta[n], before[n]) for n in theta)


@pytest.mark.parametrize("full_rank", [False, True])  # ES's low-rank members; MeZO's θ ± εz, formed beside θ
def test_member_losses_read_theta_and_never_write_it(full_rank):
    model, params = model_and_params()
    before = {n: p.clone() for n, p in params.items()}
    noise = draw(params, pairs=4, full_rank=full_rank)
    idx = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size + 1), generator=torch.Generator().manual_seed(6))
    losses = member_losses(params, noise, idx[:, :-1], idx[:, 1:], CONFIG.n_layer, CONFIG.n_head, chunk=3)
    assert losses.shape == (8,) and torch.isfinite(losses).all() and len(set(losses.tolist())) == 8
    assert all(torch.equal(params[n], before[n]) for n in params)
    alone = member_losses(params, None, idx[:, :-1], idx[:, 1:], CONFIG.n_layer, CONFIG.n_head)
    with torch.no_grad():
        theirs = torch.nn.functional.cross_entropy(model(input_ids=idx[:, :-1]).logits.flatten(0, 1), idx[:, 1:].flatten())
    assert float(alone[0]) == pytest.approx(float(theirs), rel=1e-5)
    assert math.isclose(float(losses[0::2].mean() + losses[1::2].mean()) / 2, float(alone[0]), rel_tol=0.05)


@pytest.mark.parametrize("full_rank", [False, True])
def test_the_population_flops_are_what_pytorch_counts(full_rank):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clso.search.es import population_flops

    _, params = model_and_params()
    noise = draw(params, pairs=2, rank=3, full_rank=full_rank)
    idx = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.block_size), generator=torch.Generator().manual_seed(7))
    pop = Population(params, noise, torch.arange(noise.members))
    # the math kernel of attention: its matmuls are counted (the CPU's fused kernel has no formula)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        pop.logits(idx, CONFIG.n_layer, CONFIG.n_head)
    counted = counter.get_total_flops()
    ours = population_flops(CONFIG.gpt2(), CONFIG.block_size, 3, noise.members, noise)
    assert counted == ours, (counted, ours)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from clso.data.tokens import TokenData
    from tests.conftest import prepare_text_corpus

    return TokenData.open(prepare_text_corpus(tmp_path_factory.mktemp("es"), n_docs=10, lines=80))


@pytest.mark.parametrize("method, sigma, lr", [("es", 0.02, 3e-3), ("mezo", 1e-3, 3e-2)])
def test_each_method_lowers_the_val_loss_and_stops_on_its_flop_budget(data, tmp_path, method, sigma, lr):
    from clso.search.zeroth_order import Settings, train

    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16, layer_gains=False)
    model = dense_gpt2(config, 0, "cpu")
    s = Settings(method, pairs=8, sigma=sigma, lr=lr, rank=1, batch_size=4, max_steps=10_000, eval_interval=20, eval_batches=4)
    from clso.search.es import population_flops

    per_step = population_flops(config.gpt2(), 16, 4, 16, None)
    result = train(model, s, data, mode="pure", seed=0, budget_flops=60 * per_step, device="cpu",
                   meter_options=dict(device="cpu", rapl_root=tmp_path))
    assert result.stopped == "FLOP budget spent" and result.flops >= 60 * per_step
    curve = [r["val_loss"] for r in result.curve]
    assert curve[-1] < curve[0] - 0.05, curve


def test_hybrid_perturbs_the_body_and_gets_exactly_the_adam_phases_it_is_given(data, tmp_path):
    from clso.search.zeroth_order import AdamPhases, Settings, perturbed, train

    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16, layer_gains=False)
    model = dense_gpt2(config, 0, "cpu")
    before = {n: p.detach().clone() for n, p in parameters(model).items()}
    low, full = perturbed(before, "es", "hybrid")
    assert low == body_matrices(before) and full == []
    assert perturbed(before, "mezo", "hybrid") == ([], body_matrices(before))
    assert sorted(sum(perturbed(before, "es", "pure"), [])) == sorted(before)
    s = Settings("es", pairs=4, sigma=0.02, lr=3e-3, rank=1, batch_size=4, max_steps=12, eval_interval=4, eval_batches=1)
    meter = dict(device="cpu", rapl_root=tmp_path)
    alone = train(dense_gpt2(config, 0, "cpu"), s, data, mode="hybrid", seed=0, budget_flops=10**15, device="cpu",
                  meter_options=meter)
    assert alone.stopped == "step cap" and alone.adam_phases == 0
    phases = AdamPhases(at=(0.0, 0.3, 0.6), steps=2, lr=1e-3, batch_size=2)
    result = train(model, s, data, mode="hybrid", seed=0, budget_flops=alone.flops, device="cpu", meter_options=meter,
                   phases=phases)
    assert result.adam_phases == 3 and result.adam_flops > 0
    after = {n: p.detach() for n, p in parameters(model).items()}
    assert all(not torch.equal(after[n], before[n]) for n in before)  # ES moved the body, Adam the rest
    capped = train(dense_gpt2(config, 0, "cpu"), s, data, mode="hybrid", seed=0, budget_flops=10**15, device="cpu",
                   meter_options=meter, phases=AdamPhases(at=(0.5, 0.9), steps=1, lr=1e-3, batch_size=2))
    assert capped.stopped == "step cap" and capped.adam_phases == 2  # owed phases run at the stop
    assert capped.curve[-1]["step"] == 12 and capped.curve[-1]["flops"] == capped.flops


@pytest.mark.parametrize("method", ["es", "mezo"])
def test_a_killed_run_resumes_to_the_same_weights_and_curve(data, tmp_path, method):
    from clso.field.checkpoint import FieldCheckpoint
    from clso.search.zeroth_order import AdamPhases, Settings, train

    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16, layer_gains=False)
    s = Settings(method, pairs=3, sigma=0.02, lr=3e-3, rank=1, batch_size=2, max_steps=9, eval_interval=3, eval_batches=1)
    phases = AdamPhases(at=(0.2, 0.7), steps=1, lr=1e-3, batch_size=2)
    meter, seen = dict(device="cpu", rapl_root=tmp_path), []

    def run(folder, kill_at=None):
        model = dense_gpt2(config, 0, "cpu")
        seen.clear()

        def stop(row):
            seen.append(row["step"])
            if row["step"] == kill_at:
                raise KeyboardInterrupt

        result = train(model, s, data, mode="hybrid", seed=0, budget_flops=10**15, device="cpu", meter_options=meter,
                       phases=phases, on_eval=stop, checkpoint=FieldCheckpoint(tmp_path / folder, "fp"))
        return model, result

    whole_model, whole = run("whole")
    with pytest.raises(KeyboardInterrupt):
        run("killed", kill_at=6)
    model, resumed = run("killed")
    assert seen == [6, 9]  # resumed at its checkpoint, not from the start
    assert all(torch.equal(a, b) for a, b in zip(whole_model.state_dict().values(), model.state_dict().values()))
    key = ("step", "val_loss", "flops")
    assert [tuple(r[k] for k in key) for r in resumed.curve] == [tuple(r[k] for k in key) for r in whole.curve]
    assert resumed.adam_phases == whole.adam_phases == 2 and resumed.flops == whole.flops


def test_the_whole_val_split_is_scored_once_at_another_runs_flops(data, tmp_path):
    from clso.data.tokens import FINAL_BATCH, split_loss
    from clso.search.zeroth_order import Settings, train

    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16, layer_gains=False)
    s = Settings("es", pairs=2, sigma=0.02, lr=3e-3, rank=1, batch_size=2, max_steps=6, eval_interval=3, eval_batches=1)
    meter = dict(device="cpu", rapl_root=tmp_path)
    whole = train(dense_gpt2(config, 0, "cpu"), s, data, mode="pure", seed=0, budget_flops=10**15, device="cpu",
                  meter_options=meter)
    per_step = whole.flops // 6
    model = dense_gpt2(config, 0, "cpu")
    half = train(model, Settings(**{**s.__dict__, "max_steps": 3}), data, mode="pure", seed=0, budget_flops=10**15,
                 device="cpu", meter_options=meter)
    scored = train(dense_gpt2(config, 0, "cpu"), s, data, mode="pure", seed=0, budget_flops=10**15, device="cpu",
                   meter_options=meter, score_at=2 * per_step + 1)
    assert scored.scored_at["step"] == 3 and scored.scored_at["flops"] == 3 * per_step
    expected = split_loss(lambda x: model(input_ids=x).logits, data.tokens("val"), 16, FINAL_BATCH)
    assert scored.scored_at["val_loss"] == pytest.approx(expected, rel=1e-6)  # the model as it was at step 3
    assert scored.flops == whole.flops and half.scored_at is None


def test_an_adam_phase_that_crosses_the_score_point_is_scored_right_after_it(data, tmp_path):
    from clso.search.zeroth_order import AdamPhases, Settings, train

    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16, layer_gains=False)
    s = Settings("es", pairs=2, sigma=0.02, lr=3e-3, rank=1, batch_size=2, max_steps=4, eval_interval=2, eval_batches=1)
    meter = dict(device="cpu", rapl_root=tmp_path)
    one_step = train(dense_gpt2(config, 0, "cpu"), Settings(**{**s.__dict__, "max_steps": 1}), data, mode="hybrid",
                     seed=0, budget_flops=10**15, device="cpu", meter_options=meter).flops
    phases = AdamPhases(at=(0.0,), steps=2, lr=1e-3, batch_size=2)  # due right after the first step
    run = train(dense_gpt2(config, 0, "cpu"), s, data, mode="hybrid", seed=0, budget_flops=10**15, device="cpu",
                meter_options=meter, phases=phases, score_at=one_step + 1)
    # the step stops short of the score point; the phase crosses it, and the score follows the phase
    assert run.scored_at["step"] == 1 and run.scored_at["flops"] == one_step + run.adam_flops


def test_an_adam_phase_is_charged_what_pytorch_counts(data):
    import numpy as np
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from clso.search.zeroth_order import AdamPhases, adam_phase
    from tests.conftest import counted_flops

    config = ModelConfig(vocab_size=data.vocab_size, n_layer=2, n_embd=16, n_head=2, block_size=16, layer_gains=False)
    model = dense_gpt2(config, 0, "cpu")
    frozen = body_matrices(parameters(model))
    phases = AdamPhases(at=(0.0,), steps=2, lr=1e-3, batch_size=2)
    charged = {}
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, its backward counted too
        counted = counted_flops(lambda: charged.setdefault("flops", adam_phase(
            model, frozen, phases, data.tokens("train"), np.random.default_rng(0), "cpu")))
    assert charged["flops"] == counted  # the body's matrices pass gradients down but compute none of their own
    assert all(p.requires_grad for p in parameters(model).values())  # and train again in the next ES step


def test_the_sweeps_curve_reads_the_train_split_only(data, tmp_path):
    from clso.search.zeroth_order import Settings, train

    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16, layer_gains=False)
    s = Settings("mezo", pairs=2, sigma=0.02, lr=3e-3, rank=1, batch_size=2, max_steps=4, eval_interval=2, eval_batches=1)

    class Spy:  # the token data, every split it hands out noted
        def __init__(self):
            self.seen = set()

        def __getattr__(self, name):
            return getattr(data, name)

        def tokens(self, split):
            self.seen.add(split)
            return data.tokens(split)

    for curve_split, expected in (("train", {"train"}), ("val", {"train", "val"})):
        spy = Spy()
        train(dense_gpt2(config, 0, "cpu"), s, spy, mode="pure", seed=0, budget_flops=10**15, device="cpu",
              meter_options=dict(device="cpu", rapl_root=tmp_path), curve_split=curve_split)
        assert spy.seen == expected, curve_split  # the sweep's (train) never sees val; a contestant's curve does

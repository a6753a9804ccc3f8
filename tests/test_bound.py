"""The frozen-head bound: a true lower bound on every body's loss, and a tight one."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clso.data.tokens import EvalBatch, split_targets
from clso.model.bound import frozen_head_bound
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library
from clso.search.evaluate import population_losses

V, D = 40, 8


def head_and_norm(seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, D, generator=g) * scale, 1 + 0.1 * torch.randn(D, generator=g), 0.05 * torch.randn(D, generator=g)


def loss_of_hidden(head, gamma, beta, hidden, targets):
    return F.cross_entropy(F.layer_norm(hidden, (D,), gamma, beta) @ head.t(), targets, reduction="none")


def test_no_hidden_state_beats_it_and_gradient_descent_gets_within_its_gap():
    head, gamma, beta = head_and_norm(scale=0.5)
    targets = torch.arange(V)
    per_target = [frozen_head_bound(head, gamma, beta, np.array([y])) for y in range(V)]
    lower = torch.tensor([b["loss"] for b in per_target])
    # any final hidden state whatever, even one chosen knowing the target
    hidden = torch.randn(20000, D) * torch.rand(20000, 1) * 10
    for y in range(0, V, 7):
        assert float(loss_of_hidden(head, gamma, beta, hidden, torch.full((20000,), y)).min()) >= lower[y] - 1e-9
    # and the bound is tight: Adam on each target's hidden state comes down to it
    h = torch.randn(V, D, requires_grad=True)
    opt = torch.optim.Adam([h], lr=0.05)
    for _ in range(3000):
        loss = loss_of_hidden(head, gamma, beta, h, targets).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    reached = loss_of_hidden(head, gamma, beta, h.detach(), targets)
    assert (reached >= lower - 1e-6).all()
    assert float((reached - lower).max()) < 0.02


def test_the_split_bound_weighs_each_target_by_its_count():
    head, gamma, beta = head_and_norm()
    one, two = (frozen_head_bound(head, gamma, beta, np.array([y])) for y in (3, 5))
    both = frozen_head_bound(head, gamma, beta, np.array([3, 5, 5, 5]))
    assert both["loss"] == pytest.approx((one["loss"] + 3 * two["loss"]) / 4)
    assert both["distinct_targets"] == 2 and 0 <= both["solver_gap"] < 1e-4
    assert both["ppl"] == pytest.approx(math.exp(both["loss"]))


def test_a_pure_crystalline_gpt2_never_goes_below_it():
    config = ModelConfig(vocab_size=V, n_layer=1, n_embd=D * 2, n_head=2, block_size=16)
    library = Library.generate(0, D * 2, size=30, shares={"ternary_lowrank": 0.5, "block_diag": 0.5})[0]
    model = CrystallineGPT2(config, library, seed=0)
    tokens = np.random.default_rng(0).integers(0, V, size=16 * 8 + 1)
    gpt = model.gpt2
    bound = frozen_head_bound(gpt.lm_head.weight, gpt.transformer.ln_f.weight, gpt.transformer.ln_f.bias,
                              split_targets(tokens, 16))
    batch = EvalBatch.from_tokens(tokens, np.arange(8) * 16, 16)
    genomes = np.random.default_rng(1).integers(0, 30, size=(200, 4))
    losses = population_losses(model, genomes, batch)
    assert losses.min() > bound["loss"]

from types import SimpleNamespace

import pytest

from clso.model.flops import backward_flops, forward_flops, linear_shapes, train_step_flops

TINY = SimpleNamespace(n_layer=2, n_embd=4, n_head=2, vocab_size=10, n_inner=None)


def test_forward_matches_a_hand_count():
    T = 3  # one sequence of 3 tokens
    per_layer = (
        T * 4 * 12 * 2      # c_attn: (3×4) @ (4×12)
        + 2 * (T * 2 * T) * 2  # QKᵀ per head: (3×2) @ (2×3), 2 heads
        + 2 * (T * T * 2) * 2  # AV per head: (3×3) @ (3×2), 2 heads
        + T * 4 * 4 * 2      # attn c_proj
        + T * 4 * 16 * 2     # c_fc
        + T * 16 * 4 * 2     # mlp c_proj
    )
    head = T * 4 * 10 * 2
    assert forward_flops(TINY, seq_len=3) == 2 * per_layer + head == 2 * 1296 + 240
    assert forward_flops(TINY, seq_len=3, n_seqs=5) == 5 * (2 * per_layer + head)


def test_backward_is_twice_forward_when_everything_trains():
    assert backward_flops(TINY, 3, 2) == 2 * forward_flops(TINY, 3, 2)
    assert train_step_flops(TINY, 3, 2) == 3 * forward_flops(TINY, 3, 2)


def test_frozen_matrices_still_pass_gradients_down():
    fwd = forward_flops(TINY, 3)
    linears = fwd - forward_flops(SimpleNamespace(**{**vars(TINY), "n_layer": 0}), 3) - 2 * 4 * 3 * 3 * 4
    frozen = backward_flops(TINY, 3, train_linears=False)
    assert frozen == 2 * fwd - linears


def test_factored_layers_are_charged_their_own_cost():
    # a rank-2 factorisation of c_fc in layer 0: x@U (4×2) then @Vᵀ (2×16) = 2·(8+32) per token
    factored = {(0, "mlp.c_fc"): 2 * (4 * 2 + 2 * 16)}
    saved = 2 * 4 * 16 - 2 * (4 * 2 + 2 * 16)
    assert forward_flops(TINY, 3, linear_flops=factored) == forward_flops(TINY, 3) - 3 * saved


def test_gpt2_small_is_about_six_n_per_token():
    cfg = SimpleNamespace(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_inner=None)
    n_params = 12 * sum(i * o for i, o in linear_shapes(cfg).values()) + 768 * 50257
    per_token = train_step_flops(cfg, seq_len=1024, n_seqs=1) / 1024
    attention = 3 * 12 * 4 * 1024 * 768
    assert per_token == pytest.approx(6 * n_params + attention)

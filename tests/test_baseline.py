from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from clso import ClsoError
from clso.data.tokens import TokenData
from clso.model.baseline import TrainingSetup, TrainStep, dense_gpt2, learning_rate, state_for_saving, train_baseline
from clso.model.crystalline import ModelConfig

CFG = SimpleNamespace(steps=40, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.1,
                      grad_clip=1.0, eval_interval=10, eval_batches=2, micro_batch_size=0, precision="auto",
                      attention="sdpa", adamw="auto", torch_compile="auto")


def test_warmup_then_cosine_to_min_lr():
    assert learning_rate(0, CFG) == pytest.approx(CFG.lr / 5)
    assert learning_rate(4, CFG) == pytest.approx(CFG.lr)
    assert learning_rate(40, CFG) == pytest.approx(CFG.min_lr)
    lrs = [learning_rate(s, CFG) for s in range(5, 41)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import prepare_text_corpus

    return TokenData.open(prepare_text_corpus(tmp_path_factory.mktemp("baseline"), n_docs=10, lines=80))


def test_training_lowers_the_loss_and_the_curve_is_cumulative(data, tmp_path):
    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16)
    result = train_baseline(data, config, CFG, seed=0, device="cpu",
                            meter_options=dict(device="cpu", rapl_root=tmp_path))
    curve = result.curve
    assert [r["step"] for r in curve] == [0, 10, 20, 30, 40]
    assert curve[-1]["val_loss"] < curve[0]["val_loss"] - 0.5
    for a, b in zip(curve, curve[1:]):
        assert b["energy_wh"] >= a["energy_wh"] and b["flops"] > a["flops"] and b["tokens"] > a["tokens"]
    assert result.train_energy["method"] == "estimate" and result.train_energy["eval_energy_wh"] > 0


def test_same_seed_same_training(data, tmp_path):
    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16)
    cfg = SimpleNamespace(**{**vars(CFG), "steps": 5, "eval_interval": 5})
    runs = [train_baseline(data, config, cfg, seed=1, device="cpu", meter_options=dict(device="cpu", rapl_root=tmp_path))
            for _ in range(2)]
    assert [r["val_loss"] for r in runs[0].curve] == [r["val_loss"] for r in runs[1].curve]
    a, b = state_for_saving(runs[0].model), state_for_saving(runs[1].model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_state_loads_into_a_stock_gpt2():
    config = ModelConfig(vocab_size=50, n_layer=1, n_embd=16, n_head=2, block_size=8)
    model = dense_gpt2(config, 0, "cpu")
    state = state_for_saving(model)
    assert "lm_head.weight" not in state
    fresh = GPT2LMHeadModel(config.gpt2())
    fresh.load_state_dict(state, strict=False)
    x = torch.from_numpy(np.arange(8)[None])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)


def _cfg(**changes):
    return SimpleNamespace(**{**vars(CFG), "steps": 6, "eval_interval": 3, **changes})


def _train(data, tmp_path, **changes):
    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16)
    return train_baseline(data, config, _cfg(**changes), seed=2, device="cpu",
                          meter_options=dict(device="cpu", rapl_root=tmp_path))


def test_auto_on_a_cpu_is_the_fp32_reference():
    setup = TrainingSetup.resolve(CFG, "cpu")
    assert setup == TrainingSetup("fp32", "sdpa", "default", "none", CFG.batch_size)
    with pytest.raises(ClsoError, match="tf32 needs a CUDA GPU"):
        TrainingSetup.resolve(_cfg(precision="tf32"), "cpu")


def test_gradient_accumulation_trains_the_model_the_whole_batch_does(data, tmp_path):
    whole, parts = _train(data, tmp_path), _train(data, tmp_path, micro_batch_size=2)
    assert parts.setup.micro_batch_size == 2 and whole.setup.micro_batch_size == 4
    a, b = state_for_saving(whole.model), state_for_saving(parts.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # another summation order: really another path
    for x, y in zip(whole.curve, parts.curve):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)


@pytest.mark.parametrize("changes, tolerance", [({"attention": "eager"}, 1e-4), ({"adamw": "foreach"}, 1e-4),
                                                ({"adamw": "fused"}, 1e-4), ({"precision": "bf16"}, 0.05)])
def test_every_setting_trains_the_same_model(data, tmp_path, changes, tolerance):
    reference, other = _train(data, tmp_path), _train(data, tmp_path, **changes)
    assert [r["val_loss"] for r in other.curve] == pytest.approx([r["val_loss"] for r in reference.curve],
                                                                 abs=tolerance)
    assert other.curve[-1]["val_loss"] < other.curve[0]["val_loss"]


def _step(**changes):
    cfg = SimpleNamespace(**{**vars(CFG), **changes})
    setup = TrainingSetup.resolve(cfg, "cpu")
    model = dense_gpt2(ModelConfig(vocab_size=50, n_layer=1, n_embd=16, n_head=2, block_size=8), 0, "cpu",
                       setup.attention).train()
    return model, TrainStep(model, setup, lr=1e-3, weight_decay=0.1, grad_clip=1.0, device="cpu")


def test_each_setting_reaches_the_step_it_names():
    model, step = _step(attention="eager", adamw="fused", precision="bf16")
    assert model.config._attn_implementation == "eager" and step.optimizer.defaults["fused"] is True
    assert _step(adamw="foreach")[1].optimizer.defaults["foreach"] is True
    x = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    seen = []
    step.loss.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    step(x[:, :-1], x[:, 1:], 1e-3)
    assert seen == [torch.bfloat16, torch.float32]  # bf16 logits under autocast, the loss in float32


def test_the_compiled_step_trains_the_model_that_is_saved():
    """torch.compile wraps the model: its steps must move the very parameters the stage saves."""
    model, step = _step(torch_compile="default")
    reference_model, reference = _step()
    assert isinstance(step.loss, torch._dynamo.eval_frame.OptimizedModule)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        losses = step(x[:, :-1], x[:, 1:], 1e-3), reference(x[:, :-1], x[:, 1:], 1e-3)
    assert float(losses[0]) == pytest.approx(float(losses[1]), abs=1e-4)
    after, expected = model.state_dict(), reference_model.state_dict()
    assert all(torch.allclose(after[k], expected[k], atol=1e-5) for k in after)
    assert not torch.equal(after["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"])


def test_throughput_is_reported_with_the_energy(data, tmp_path):
    energy = _train(data, tmp_path).train_energy
    assert energy["tokens_per_s"] == pytest.approx(6 * 4 * 16 / energy["wall_s"], rel=1e-3)
    assert energy["achieved_tflops"] == pytest.approx(energy["flops"] / energy["wall_s"] / 1e12, rel=1e-2, abs=1e-4)
    assert energy["mfu"] is None and energy["device_name"] == "cpu"  # no known peak for a CPU
    assert "gpu_wh" not in energy  # CPU-only work has no parts to tell apart
    assert 0 < energy["first_step"]["wall_s"] < energy["wall_s"] and energy["first_step"]["energy_wh"] <= energy["energy_wh"]


def test_tf32_holds_through_backward():
    """TF32 is a matmul mode, not autocast: it must hold while the gradients are computed too."""
    model = dense_gpt2(ModelConfig(vocab_size=50, n_layer=1, n_embd=16, n_head=2, block_size=8), 0, "cpu").train()
    step = TrainStep(model, TrainingSetup("tf32", "sdpa", "default", "none", 4), lr=1e-3, weight_decay=0.1,
                     grad_clip=1.0, device="cpu")
    modes = []
    model.transformer.h[0].mlp.c_fc.weight.register_hook(
        lambda grad: modes.append(torch.backends.cuda.matmul.allow_tf32) or grad)
    x = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    before = torch.backends.cuda.matmul.allow_tf32
    step(x[:, :-1], x[:, 1:], 1e-3)
    assert modes == [True] and torch.backends.cuda.matmul.allow_tf32 == before


def test_the_baseline_keeps_its_best_val_point_and_what_it_cost_by_then(data, tmp_path, monkeypatch):
    """Early stopping, as a practitioner would: the weights of the lowest val loss on the curve, the
    FLOPs and energy spent by then, and what came after apart."""
    import clso.model.baseline as b

    losses, states = iter([5.0, 4.0, 3.0, 3.5, 4.0]), []

    def val_loss(model, *args):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(losses)

    monkeypatch.setattr(b, "_val_loss", val_loss)
    config = ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16)
    result = train_baseline(data, config, CFG, seed=0, device="cpu", meter_options=dict(device="cpu", rapl_root=tmp_path))
    assert result.best_step == 20
    kept = result.model.state_dict()
    assert all(torch.equal(kept[k], states[2][k]) for k in kept) and not torch.equal(kept["transformer.wte.weight"],
                                                                                     states[4]["transformer.wte.weight"])
    whole, step = result.train_energy, result.curve[1]["flops"] // 10
    assert result.to_best["flops"] == 20 * step and result.after_best["flops"] == 20 * step == whole["flops"] // 2
    assert result.to_best["energy_wh"] == pytest.approx(result.curve[2]["energy_wh"], abs=1e-6)
    assert result.to_best["energy_wh"] + result.after_best["energy_wh"] == pytest.approx(whole["energy_wh"], abs=2e-6)
    # the stage charges the record that point: its cost, its curve cut there, what came after uncharged
    from stages.baseline import to_best_point

    charged, points, after = to_best_point(result, CFG.steps)
    assert charged["flops"] == 20 * step and charged["energy_wh"] == pytest.approx(result.to_best["energy_wh"], abs=1e-6)
    assert [p["step"] for p in points] == [0, 10, 20] and points[-1]["loss"] == 3.0
    assert after["training_after_best"]["flops"] == 20 * step


def test_a_baseline_at_its_last_point_is_charged_its_whole_run_and_one_that_never_learned_stops():
    from types import SimpleNamespace

    from clso import ClsoError
    from stages.baseline import to_best_point

    whole = {"energy_wh": 2.0, "method": "estimate", "wall_s": 9.0, "flops": 300, "tokens_per_s": 5.0}
    curve = [{"step": s, "val_loss": v, "energy_wh": e, "flops": f, "wall_s": 1.0}
             for s, v, e, f in ((0, 5.0, 0.0, 0), (10, 4.0, 1.0, 150), (20, 3.0, 2.0, 300))]
    result = SimpleNamespace(best_step=20, train_energy=whole, curve=curve, to_best=None, after_best=None)
    charged, points, after = to_best_point(result, 20)
    assert charged == {k: whole[k] for k in ("energy_wh", "method", "wall_s", "flops")} and after == {}
    assert len(points) == 3
    result.best_step = 0  # val never fell below its value at initialisation: no baseline to charge
    with pytest.raises(ClsoError, match="never fell below its value at initialisation"):
        to_best_point(result, 20)

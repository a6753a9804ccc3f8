"""The neuron-field LM (document 004): its op, growth, hard and soft freezing, and its .crystal files."""

import re
import subprocess
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from clso import ClsoError
from clso.data.tokens import TokenData
from clso.export import format as fmt
from clso.export.compile import build_runtime, runtime_logits
from clso.export.fuzz import tiny_field_lm, tiny_models, tiny_tokenizers
from clso.export.reader import read_crystal
from clso.export.reference import CrystalModel
from clso.export.writer import build_crystal, field_spec
from clso.field.model import FieldConfig, NeuronField, field_op, forward_flops
from clso.field.train import FieldSchedule, NeuronAdam, ages, give_birth, hard_freeze, train_field
from clso.params import FieldParams, defaults


@pytest.fixture(autouse=True)
def _own_random_state():
    """Each test draws from its own seeded generator and leaves the global one as it found it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return build_runtime(tmp_path_factory.mktemp("runtime") / "crystal")


def test_field_op_is_the_journals_formula_with_distances_in_units_of_root_d():
    x, p, v, tau = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0.3, -0.2, 1.0])
    distance = torch.cdist(x.double(), p.double())
    expected = torch.exp(-distance / (8 ** 0.5 * (tau.double().abs() + 0.1))) @ v.double()
    torch.testing.assert_close(field_op(x, p, v, tau).double(), expected, rtol=1e-4, atol=1e-5)
    # a query on a neuron: the gradient stays finite
    p = p.clone().requires_grad_()
    field_op(p.detach()[:1].clone(), p, v, tau).sum().backward()
    assert torch.isfinite(p.grad).all()


def test_schedule_births_and_tide():
    s = FieldSchedule(steps=100, grow_every=3, grow_by=2)
    assert [s.births(step, 10, 100) for step in range(7)] == [0, 0, 0, 2, 0, 0, 2]
    assert s.births(3, 99, 100) == 1 and s.births(3, 100, 100) == 0
    assert FieldSchedule(steps=10, grow_every=0).births(5, 1, 9) == 0
    assert s.tide(0) == 0.05 and s.tide(100) == pytest.approx(0.8) and s.tide(50) == pytest.approx(0.425)
    assert replace(s, rising_tide=False).tide(80) == 0.05


def test_a_birth_adds_neurons_without_changing_the_function():
    model = tiny_field_lm(1)
    idx = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        before = model(idx)
    queries = torch.randn(1, 4, 16)
    optimizer = NeuronAdam(model.fields[0])
    give_birth(model.fields[0], optimizer, 3, queries, 7, 0.6, np.random.default_rng(0))
    f = model.fields[0]
    assert f.alive == 8 and f.birth_step[5:8].tolist() == [7, 7, 7]
    assert torch.equal(f.temperatures[5:8], torch.full((3,), 0.6))
    rows = [r.tolist() for r in queries.reshape(-1, 16)]
    assert all(p.tolist() in rows for p in f.positions[5:8])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, rtol=0, atol=0)


def test_soft_freeze_multiplier_follows_the_schedule():
    s = FieldSchedule(steps=100, freeze="soft", half_life=10.0, floor=0.01)
    age = torch.tensor([0, 10, 20, 35, 66, 67, 1000])
    expected = torch.clamp(0.5 ** (age.float() / 10.0), min=0.01)
    assert torch.equal(s.lr_multiplier(age), expected)
    assert s.lr_multiplier(torch.tensor([0]))[0] == 1 and s.lr_multiplier(torch.tensor([10]))[0] == 0.5
    assert s.lr_multiplier(torch.tensor([1000]))[0] == pytest.approx(0.01)
    assert torch.equal(replace(s, freeze="none").lr_multiplier(age), torch.ones(7))


def test_a_neurons_update_is_its_learning_rate_times_its_multiplier():
    """Adam's first step moves each coordinate by lr · sign(g): the multiplier must scale exactly that."""
    f = NeuronField(4, 6)
    give_birth(f, None, 3, torch.randn(10, 4), 0, 0.5, np.random.default_rng(0))
    optimizer = NeuronAdam(f)
    before = [t.detach().clone() for t in (f.positions, f.values, f.temperatures)]
    for t in (f.positions, f.values, f.temperatures):
        t.grad = torch.ones_like(t)
    multiplier = torch.tensor([1.0, 0.25, 0.01, 1.0, 1.0, 1.0])
    optimizer.step(0.1, multiplier)
    moved = (before[1] - f.values).detach()
    torch.testing.assert_close(moved[:3], (0.1 * multiplier[:3])[:, None].expand(3, 4), rtol=1e-5, atol=1e-7)
    assert torch.equal(f.values[3:], before[1][3:]), "a neuron not yet born moved"
    assert optimizer.steps.tolist() == [1, 1, 1, 0, 0, 0]


def test_a_hard_frozen_neuron_stays_bit_for_bit_while_others_learn():
    f = NeuronField(4, 4)
    give_birth(f, None, 4, torch.randn(10, 4), 0, 0.5, np.random.default_rng(0))
    f.birth_step[2:] = 30  # two young neurons
    schedule = FieldSchedule(steps=100, freeze="hard", hard_age=40)
    hard_freeze(f, schedule, 45, None)
    assert f.frozen.tolist() == [True, True, False, False]
    optimizer = NeuronAdam(f)
    before = [t.detach().clone() for t in (f.positions, f.values, f.temperatures)]
    for step in range(5):
        for t in (f.positions, f.values, f.temperatures):
            t.grad = torch.randn_like(t)
        optimizer.step(0.05, schedule.lr_multiplier(ages(f, 45 + step)))
    for old, new in zip(before, (f.positions, f.values, f.temperatures)):
        assert torch.equal(old[:2], new[:2])
        assert not torch.equal(old[2:], new[2:])


def test_hard_freeze_by_stability_freezes_only_the_still_neurons():
    f = NeuronField(4, 3)
    give_birth(f, None, 3, torch.randn(10, 4), 0, 0.5, np.random.default_rng(0))
    with torch.no_grad():
        f.values.normal_()
    schedule = FieldSchedule(steps=100, freeze="hard", hard_stability=0.01, stability_window=10)
    snapshot = hard_freeze(f, schedule, 10, None)
    with torch.no_grad():
        f.values[1] += 1.0  # neuron 1 moved; 0 and 2 did not
    hard_freeze(f, schedule, 20, snapshot)
    assert f.frozen.tolist() == [True, False, True]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tests.conftest import prepare_text_corpus

    return TokenData.open(prepare_text_corpus(tmp_path_factory.mktemp("field"), n_docs=10, lines=40))


def _cfg(**changes) -> FieldParams:
    small = dict(n_layer=1, n_embd=16, n_head=2, initial_neurons=3, max_neurons=9, grow_every=2, grow_by=2, steps=9,
                 batch_size=2, warmup_steps=1, eval_interval=4)
    return replace(defaults(FieldParams), **{**small, **changes})


def _train(data, cfg, seed=0):
    return train_field(data, cfg, block_size=16, seed=seed, device="cpu",
                       meter_options={"device": "cpu"})


def test_growth_adds_exactly_the_scheduled_neurons(prepared):
    cfg = _cfg()
    result = _train(prepared, cfg)
    # row k: after k steps; births happen before steps 2, 4, 6, 8 (two each), capped at 9
    assert [r["neurons"] for r in result.curve] == [0, 3, 3, 5, 5, 7, 7, 9, 9, 9]
    born = result.model.fields[0].birth_step
    assert sorted(born[born >= 0].tolist()) == [0, 0, 0, 2, 2, 4, 4, 6, 6]
    assert [r["step"] for r in result.curve if r["val_loss"] is not None] == [0, 4, 8, 9]
    assert all(r["energy_method"] for r in result.curve if r["val_loss"] is not None)
    assert result.curve[-1]["flops"] == result.train_energy["flops"] > 0


def test_neurons_are_born_at_training_queries_never_at_validation_ones(prepared, monkeypatch):
    """Births at steps that also evaluate (every 2nd and 4th): the queries must be the training batch's."""
    import clso.field.train as train

    seen, real = [], train.give_birth

    def spy(field, optimizer, count, queries, *args):
        seen.append(tuple(queries.shape))
        return real(field, optimizer, count, queries, *args)

    monkeypatch.setattr(train, "give_birth", spy)
    cfg = _cfg(batch_size=3)
    windows = (len(prepared.tokens("val")) - 1) // 16
    val_batches = {min(train.EVAL_BATCH, windows - first) for first in range(0, windows, train.EVAL_BATCH)}
    assert cfg.batch_size not in val_batches  # so a validation batch's queries cannot pass for a training batch's
    _train(prepared, cfg)
    assert seen and set(seen) == {(cfg.batch_size, 16, cfg.n_embd)}


def test_training_is_deterministic_and_soft_frozen_neurons_reach_the_floor(prepared):
    cfg = _cfg(half_life=1.0, floor=0.05)
    one, two = _train(prepared, cfg), _train(prepared, cfg)
    for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in one.curve] == [r["train_loss"] for r in two.curve]
    last = one.curve[-1]
    # ages 9, 9, 9, 7, 7, 5, 5, 3, 3 at the end: 0.5^age ≤ 0.05 from age 5 on
    assert last["frozen_share"] == pytest.approx(7 / 9)


def _spy_on_neuron_updates(monkeypatch) -> list[dict]:
    """Each NeuronAdam.step of a training run: its multiplier, the neurons' birth steps and frozen
    marks, and their parameters before and after."""
    calls, real = [], NeuronAdam.step

    def spy(self, lr, multiplier):
        f = self.field
        before = [t.detach().clone() for t in (f.positions, f.values, f.temperatures)]
        real(self, lr, multiplier)
        calls.append({"multiplier": multiplier.clone(), "born": f.birth_step[:f.alive].clone(),
                      "frozen": f.frozen[:f.alive].clone(), "before": before,
                      "after": [t.detach().clone() for t in (f.positions, f.values, f.temperatures)]})

    monkeypatch.setattr(NeuronAdam, "step", spy)
    return calls


def test_training_applies_the_soft_freeze_schedule_to_every_neuron_at_every_step(prepared, monkeypatch):
    calls = _spy_on_neuron_updates(monkeypatch)
    cfg = _cfg(half_life=2.0, floor=0.1)
    _train(prepared, cfg)
    assert len(calls) == cfg.steps
    for step, call in enumerate(calls):
        age = step - call["born"]
        assert (age >= 0).all() and len(call["multiplier"]) == len(age)
        assert torch.equal(call["multiplier"], torch.clamp(0.5 ** (age.float() / 2.0), min=0.1)), step
        assert (call["multiplier"][age == 0] == 1).all()  # a newborn learns at the full rate
    assert calls[-1]["multiplier"].min() == pytest.approx(0.1)  # the first neurons reached the floor


def test_training_with_hard_freezing_leaves_frozen_neurons_bit_for_bit(prepared, monkeypatch):
    calls = _spy_on_neuron_updates(monkeypatch)
    cfg = _cfg(freeze="hard", hard_age=3)
    result = _train(prepared, cfg)
    for step, call in enumerate(calls):
        age = step - call["born"]
        assert torch.equal(call["frozen"], age >= 3), step
        old, new = (torch.cat([t[:, None] if t.dim() == 1 else t for t in ts], 1) for ts in (call["before"], call["after"]))
        moved = (old != new).any(1)
        assert torch.equal(moved[:len(age)], ~call["frozen"]), step  # the frozen stay, every other neuron learns
        assert not moved[len(age):].any(), "a neuron not yet born moved"
    last = result.curve[-1]
    assert last["frozen_share"] == pytest.approx(7 / 9)  # ages 9, 9, 9, 7, 7, 5, 5, 3, 3 at the end


def test_the_flat_field_has_no_attention_and_costs_its_flops(prepared):
    cfg = _cfg(attention=False)
    result = _train(prepared, cfg)
    names = [n for n, _ in result.model.named_parameters()]
    assert not [n for n in names if ".attn." in n or ".ln_1." in n] and "blocks.0.field.positions" in names
    config = FieldConfig.from_params(cfg, prepared.vocab_size, 16)
    with_attention = replace(config, attention=True)
    d = cfg.n_embd
    assert forward_flops(with_attention, [5], 16) - forward_flops(config, [5], 16) == 16 * (8 * d * d + 4 * 16 * d)
    assert result.curve[-1]["flops"] == sum(3 * forward_flops(config, [r["neurons"]], 16, cfg.batch_size)
                                            for r in result.curve[1:]) + forward_flops(config, [0], 16, cfg.batch_size)


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_results(prepared, tmp_path):
    from clso.field.checkpoint import FieldCheckpoint

    cfg = _cfg(freeze="hard", hard_age=3, hard_stability=0.5, stability_window=2)
    whole = _train(prepared, cfg)

    def kill_at(step):
        def on_step(row):
            if row["step"] == step:
                raise _Killed
        return on_step

    checkpoint = FieldCheckpoint(tmp_path / "ckpt", "fingerprint")
    with pytest.raises(_Killed):  # saved before step 4 and before step 8, killed at 7: resumes at 4
        train_field(prepared, cfg, block_size=16, seed=0, device="cpu", meter_options={"device": "cpu"},
                    checkpoint=checkpoint, on_step=kill_at(7))
    assert checkpoint.load()[0]["step"] == 4
    resumed = train_field(prepared, cfg, block_size=16, seed=0, device="cpu", meter_options={"device": "cpu"},
                          checkpoint=checkpoint)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    timing = {"energy_wh", "wall_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in whole.curve] == \
           [{k: v for k, v in r.items() if k not in timing} for r in resumed.curve]
    assert resumed.train_energy["flops"] == whole.train_energy["flops"]
    assert resumed.train_energy["energy_wh"] > 0 and resumed.train_energy["checkpoint_energy_wh"] > 0
    # another run's checkpoint (other params, code or inputs) is not resumed; a corrupt one is a clear error
    assert FieldCheckpoint(tmp_path / "ckpt", "another").load() is None
    (tmp_path / "ckpt" / "state.json").write_text("{not json")
    with pytest.raises(ClsoError, match="checkpoint unreadable"):
        checkpoint.load()
    checkpoint.clear()
    assert checkpoint.load() is None


@pytest.mark.parametrize("attention", [True, False], ids=["field", "flat_field"])
def test_field_files_run_in_the_c_runtime_like_pytorch_in_every_mode(runtime, tmp_path, attention):
    model = tiny_field_lm(3, n_layer=2, attention=attention)
    ids = np.array([0, 4, 2, 8, 6, 10, 12, 2, 22, 16])
    with torch.no_grad():
        float_logits = model(torch.from_numpy(ids[None]))[0].double().numpy()
    for mode in fmt.MODES:
        blob = build_crystal(field_spec(model), mode, tiny_tokenizers()["bpe"])
        c = read_crystal(blob)
        assert c.header["version"] == 2
        assert fmt.ARCHITECTURES[c.header["architecture"]] == ("field" if attention else "flat_field")
        assert c.has("h.1.c_attn.p0.w") == c.has("h.1.ln_1.w") == attention
        with torch.no_grad():
            ref = CrystalModel(c)(torch.from_numpy(ids[None]))[0].double().numpy()
        if mode == "f32":
            np.testing.assert_allclose(ref, float_logits, rtol=1e-5, atol=1e-5)
        path = tmp_path / f"{mode}.crystal"
        path.write_bytes(blob)
        np.testing.assert_allclose(runtime_logits(runtime, path, ids), ref, rtol=1e-4, atol=1e-4, err_msg=mode)


def test_a_field_with_no_neurons_compiles_to_the_same_function():
    model = tiny_field_lm(2)
    f = model.fields[0]
    f.birth_step.fill_(-1)
    f.alive = 0
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(CrystalModel(read_crystal(build_crystal(field_spec(model), "f32")))(ids),
                                   model(ids), rtol=1e-5, atol=1e-5)


def test_fuzz_seeds_hold_field_files():
    architectures = [fmt.ARCHITECTURES[read_crystal(blob).header["architecture"]] for blob in tiny_models().values()]
    assert architectures.count("field") >= 2 and architectures.count("flat_field") >= 1


def _rewrite_header(blob: bytes, **changes) -> bytes:
    names = fmt.HEADER_NAMES
    fields = dict(zip(names, fmt.HEADER.unpack_from(blob, 0)), **changes, header_crc32=0)
    head = fmt.HEADER.pack(*[fields[n] for n in names]).ljust(fmt.HEADER_BYTES, b"\0")
    fields["header_crc32"] = zlib.crc32(head)
    return fmt.HEADER.pack(*[fields[n] for n in names]).ljust(fmt.HEADER_BYTES, b"\0") + blob[fmt.HEADER_BYTES:]


def _rename(blob: bytes, old: str, new: str) -> bytes:
    """Rename a tensor (same length), checksums fixed: the field then lacks it."""
    at = blob.index(old.encode() + b"\0", fmt.HEADER_BYTES)
    body = bytearray(blob)
    body[at:at + len(new)] = new.encode()
    return _rewrite_header(bytes(body), payload_crc32=zlib.crc32(bytes(body[fmt.HEADER_BYTES:])))


def test_malformed_field_sections_are_rejected_by_both_readers_in_one_line(runtime, tmp_path):
    blob = build_crystal(field_spec(tiny_field_lm(4)), "mixed8", tiny_tokenizers()["bpe"])
    gpt2 = tiny_models()["dense-f32-bpe"]
    flat = build_crystal(field_spec(tiny_field_lm(4, attention=False)), "mixed8", tiny_tokenizers()["bpe"])

    def with_field(**tensors) -> bytes:
        spec = field_spec(tiny_field_lm(4))
        spec.fields["h.0"].update(tensors)
        return build_crystal(spec, "mixed8", tiny_tokenizers()["bpe"])

    pos = field_spec(tiny_field_lm(4)).fields["h.0"]["pos"]
    bad = {  # what is wrong: (the file, what both readers' one line must name)
        "fewer values than positions": (with_field(val=torch.zeros(4, 16)), "h.0.field.val"),
        "a temperature short": (with_field(temp=torch.zeros(4)), "h.0.field.temp"),
        "positions of another width": (with_field(pos=pos[:, :8].contiguous(), val=torch.zeros(5, 8)), "h.0.field"),
        "temperatures as a matrix": (with_field(temp=torch.zeros(5, 1)), "h.0.field.temp"),
        "temperatures missing": (_rename(blob, "h.0.field.temp", "h.0.field.tmpx"), "h.0.field.temp"),
        "values missing": (_rename(blob, "h.0.field.val", "h.0.field.vax"), "h.0.field.val"),
        "field LayerNorm missing": (_rename(blob, "h.0.field.ln.w", "h.0.field.ln.x"), "h.0.field.ln.w"),
        "unknown architecture": (_rewrite_header(blob, architecture=len(fmt.ARCHITECTURES)), "unknown architecture"),
        "a flat field that claims attention": (_rewrite_header(flat, architecture=fmt.ARCHITECTURES.index("field")),
                                               "h.0.ln_1.w"),
        "a field in a version-1 file": (_rewrite_header(blob, version=1), "unknown architecture 1"),
        "a GPT-2 file that claims a field": (_rewrite_header(gpt2, architecture=1), "h.0.field.pos"),
    }
    for what, (data, reason) in bad.items():
        with pytest.raises(fmt.CrystalFormatError, match=re.escape(reason)):
            read_crystal(data)
        path = tmp_path / "bad.crystal"
        path.write_bytes(data)
        done = subprocess.run([str(runtime), "logits", str(path), "1"], capture_output=True, text=True)
        assert done.returncode == 1 and not done.stdout, what
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("crystal: error:"), (what, done.stderr)
        assert reason in done.stderr, (what, done.stderr)


def test_version_1_gpt2_files_are_still_read(runtime, tmp_path):
    blob = _rewrite_header(tiny_models()["dense-f32-bpe"], version=1)
    c = read_crystal(blob)
    assert c.header["version"] == 1 and c.header["architecture"] == 0
    path = tmp_path / "v1.crystal"
    path.write_bytes(blob)
    assert runtime_logits(runtime, path, [1, 2]).shape == (2, 24)


def test_field_params_are_checked(tmp_path):
    import yaml

    from clso import ParamsError
    from clso.params import load_params

    raw = yaml.safe_load((Path(__file__).parent / "params_tiny.yaml").read_text())
    for change, message in (({"n_head": 5}, "field.n_head"), ({"initial_neurons": 2000}, "field.initial_neurons"),
                            ({"freeze": "warm"}, "field.freeze"), ({"half_life": 0}, "field.half_life")):
        bad = {**raw, "field": {**raw["field"], **change}}
        path = tmp_path / "params.yaml"
        with open(path, "w") as out:
            yaml.safe_dump(bad, out)
        with pytest.raises(ParamsError, match=message):
            load_params(path)

"""The transfer stage on tiny models and a hand-made task: what it writes, that the held-out
examples never reach training, and one-line errors."""

import contextlib
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from clso.data.tasks import load_task, split_task
from clso.data.tokens import TokenData
from clso.model.baseline import dense_gpt2, save_baseline
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library
from clso.params import load_params
from clso.transfer import chosen_genes, partial_search
from stages.paths import searched
from stages.prepare import prepare
from stages.transfer import transfer
from tests.conftest import REPO

WORDS = "the a film movie story actor scene plot long short old new".split()


def task_file(path: Path, seed: int = 0, poison: set[int] = frozenset()) -> Path:
    """120 examples: 'good …' or 'bad …' and filler words; lines in `poison` get the other label
    and other words."""
    rng = np.random.default_rng(seed)
    lines = ["label\ttext"]
    for i in range(120):
        label = ("pos", "neg")[i % 2]
        word = {"pos": "good", "neg": "bad"}[label]
        filler = " ".join(rng.choice(WORDS, size=6))
        if i in poison:
            label, filler = ("neg" if label == "pos" else "pos"), filler.upper()
        lines.append(f"{label}\t{word} {filler}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transfer")
    raw = yaml.safe_load((REPO / "tests/params_tiny.yaml").read_text())
    raw["transfer"].update(tasks=[f"file:{folder / 'task.tsv'}"], head_iterations=15, finetune_steps=4, batch_size=8,
                           val_fraction=0.2, test_fraction=0.2)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    task_file(folder / "task.tsv")
    with contextlib.chdir(folder):
        prepare.__wrapped__(Path("params.yaml"))
        p = load_params(Path("params.yaml"))
        vocab = TokenData.open("data/prepared").vocab_size
        config = ModelConfig.from_params(p.model, vocab)
        library, tensors = Library.generate(p.base.seed, config.n_embd, size=4, shares={"ternary_lowrank": 1.0})
        library.save("models/library", tensors)
        clso = CrystallineGPT2(config, library, seed=p.base.seed)
        clso.set_genome([1, 2, 3, 0])
        me = searched("evolve", p.transfer.clso_mode, p.grid)
        me.model_dir.mkdir(parents=True)
        clso.save(me.model_dir, fitness_loss=8.0, name=me.name, mode=me.mode)
        Path("models/baseline").mkdir(parents=True)
        save_baseline(dense_gpt2(ModelConfig.from_params(p.model, vocab, layer_gains=False), p.base.seed, "cpu"),
                      "models/baseline")
        transfer.__wrapped__(Path("params.yaml"))
    return folder


def read(folder: Path):
    metrics = json.loads((folder / "metrics/detail/transfer.json").read_text())
    with open(folder / "plots/transfer.csv") as f:
        return metrics, list(csv.DictReader(f))


SIDES = ("clso_head", "clso_partial", "baseline", "baseline_head", "no_pretraining", "no_pretraining_finetuned")


def test_every_side_is_scored_on_every_split_and_charged(workdir):
    metrics, curve = read(workdir)
    [(spec, r)] = metrics["tasks"].items()
    assert spec.startswith("file:") and r["metric"] == "accuracy" and metrics["clso"] == "evolve@hybrid-1337"
    assert {k: v["examples"] for k, v in r["splits"].items()} == {"train": 72, "val": 24, "test": 24}
    for side in (*SIDES, "clso"):
        s = r[side]
        assert all(0 <= s[split] <= 1 for split in ("train", "val", "test"))
        assert s["energy_wh"] > 0 and s["flops"] > 0 and s["method"] in ("estimate", "rapl")
    assert [sum(row["side"] == side for row in curve) for side in ("baseline", "no_pretraining_finetuned")] == [4, 4]
    for probe in ("clso_head", "clso_partial", "baseline_head", "no_pretraining"):  # L-BFGS: evaluations, at most ~1.25 a step
        assert 1 <= sum(row["side"] == probe for row in curve) <= 15 * 1.25 + 1
    assert sum(row["side"] == "clso_partial_search" for row in curve) == 2  # the tiny params' generations
    option = max(("clso_head", "clso_partial"), key=lambda side: r[side]["val"])  # chosen on val
    clso = r["clso"]
    assert clso["option"] == option.removeprefix("clso_") and clso["test"] == r[option]["test"]
    # choosing took both options, so CLSO is charged both, val scoring included
    assert clso["flops"] == r["clso_head"]["flops"] + r["clso_partial"]["flops"]
    for probe in ("clso_head", "clso_partial", "baseline_head", "no_pretraining"):
        assert r[probe]["probe_evaluations"] >= r[probe]["probe_iterations"] >= 1
    partial = r["clso_partial"]
    assert partial["prior_fitness"] > 0 and partial["best_fitness"] <= partial["pretrained_fitness"]
    assert partial["search_accepted"] == (partial["best_fitness"] < min(partial["pretrained_fitness"], partial["prior_fitness"]))
    assert partial["search_accepted"] or partial["changed_genes"] == []
    assert clso["energy_wh"] == pytest.approx(r["clso_head"]["energy_wh"] + r["clso_partial"]["energy_wh"], abs=2e-6)
    assert r["clso_within_tolerance"] == {"test": clso["test"] >= 0.95 * r["baseline"]["test"]}  # accuracy ≥ 0
    assert r["energy_ratio"] == pytest.approx(clso["energy_wh"] / r["baseline"]["energy_wh"], rel=0.03)  # metrics round to 1e-6 Wh
    assert r["clso_partial"]["flops"] > r["clso_head"]["flops"]  # its search is charged too
    assert r["clso_partial"]["search"].startswith("random search")  # one chosen gene


def test_the_tolerance_holds_for_a_matthews_correlation_at_or_below_zero():
    from clso.transfer import within_tolerance

    assert within_tolerance(0.96, 1.0) and not within_tolerance(0.94, 1.0)
    assert within_tolerance(0.0, 0.0) and not within_tolerance(-0.01, 0.0)
    assert within_tolerance(-0.104, -0.1) and not within_tolerance(-0.106, -0.1)


def test_partial_changes_only_the_chosen_genes(workdir):
    metrics, _ = read(workdir)
    [r] = metrics["tasks"].values()
    partial, pretrained = r["clso_partial"], json.loads(
        (workdir / "models/search/evolve/hybrid-1337/best_genome.json").read_text())["genome"]
    assert partial["chosen_genes"] == [3]  # 15 % of the tiny model's 4 genes: the one nearest the head
    assert set(partial["changed_genes"]) <= set(partial["chosen_genes"])
    assert [g for i, g in enumerate(partial["genome"]) if i not in partial["chosen_genes"]] == \
        [g for i, g in enumerate(pretrained) if i not in partial["chosen_genes"]]


def test_the_partial_search_moves_only_its_genes_and_never_loses_the_pretrained_choice():
    genome = np.zeros(48, dtype=np.int64)
    chosen = chosen_genes(48, 0.15)
    assert chosen.tolist() == list(range(41, 48))
    target = np.arange(7) + 3
    evaluated = []

    def distance(g):
        evaluated.append(g.copy())
        return float(np.abs(g[chosen] - target).sum()), 1

    best, fitness, start, flops = partial_search(genome, chosen, 50, distance, population=16, generations=30, seed=0)
    assert (best[:41] == 0).all() and fitness < start == np.abs(target).sum() and flops == len(evaluated) > 16
    assert all((g[:41] == 0).all() for g in evaluated)  # no genome off the chosen genes was ever tried
    assert len({tuple(g[chosen]) for g in evaluated}) == len(evaluated)  # each distinct genome once
    # when the pretrained genes are the best there is, the search keeps them
    best, fitness, _, _ = partial_search(genome, chosen, 50, lambda g: (float(np.abs(g[chosen]).sum()), 1),
                                         population=8, generations=3, seed=1)
    assert fitness == 0 and (best == 0).all()


def test_cached_body_features_are_the_whole_models_for_a_changed_gene():
    """`partial` runs the blocks below its first gene once; a stale cache or a wrong first block
    would give another genome's features."""
    import torch

    from clso.transfer import CachedBody, Encoded, features

    config = ModelConfig(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=16)
    library, _ = Library.generate(0, config.n_embd, size=6, shares={"ternary_lowrank": 0.5, "block_diagonal": 0.5})
    model = CrystallineGPT2(config, library, seed=0).eval()
    model.set_genome([1] * 12)
    encoded = Encoded(torch.randint(0, 40, (10, 12), generator=torch.Generator().manual_seed(0)),
                      torch.tensor([12, 3, 7, 12, 1, 5, 9, 12, 2, 8]))
    idx = np.array([4, 0, 7, 2, 9, 5])
    body = CachedBody(model, encoded, idx, first=2, batch_size=4, device="cpu")
    changed = [1] * 11 + [4]
    x, flops = body.features(changed, "mean")
    model.set_genome(changed)
    whole, whole_flops = features(lambda ids: model.gpt2.transformer(input_ids=ids).last_hidden_state, encoded, idx,
                                  "mean", 4, "cpu", lambda T, B: 1)
    assert torch.allclose(x, whole, atol=1e-6) and not torch.allclose(x, body.features([1] * 12, "mean")[0])
    from clso.transfer import body_flops

    assert flops == sum(body_flops(model.config.gpt2(), T, B, model.linear_flops(changed), range(2, 3))
                        for T, B in body.sizes)  # the last of three blocks per genome
    assert body.flops == sum(body_flops(model.config.gpt2(), T, B, model.linear_flops([1] * 12), range(2))
                             for T, B in body.sizes)  # the two below, once


def run_poisoned(workdir: Path, folder: Path, splits_to_poison: tuple[str, ...]):
    """The stage again in a copy of `workdir`, the examples of `splits_to_poison` given the other
    label and other words; returns (before, after): each the task's metrics and its curve."""
    shutil.copytree(workdir, folder)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    splits = split_task(load_task(params["transfer"]["tasks"][0]), 0.2, 0.2, seed=params["base"]["seed"])
    poisoned = task_file(folder / "task.tsv", poison={i for split in splits_to_poison for i in splits[split].tolist()})
    params["transfer"]["tasks"] = [f"file:{poisoned}"]
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    with contextlib.chdir(folder):
        transfer.__wrapped__(Path("params.yaml"))
    (before, before_curve), (after, after_curve) = read(workdir), read(folder)
    [b], [a] = before["tasks"].values(), after["tasks"].values()
    return (b, before_curve), (a, after_curve)


def test_held_out_examples_never_reach_training(workdir, tmp_path):
    """Flip the labels and change the words of every val and test example: the training curves stay
    the same to the bit, while the test scores move (so the poison was really read, by scoring)."""
    (b, before_curve), (a, after_curve) = run_poisoned(workdir, tmp_path / "poisoned", ("val", "test"))
    assert [r["loss"] for r in before_curve] == [r["loss"] for r in after_curve]
    assert {k: v["sha256"] for k, v in b["splits"].items()} == {k: v["sha256"] for k, v in a["splits"].items()}
    assert b["splits"]["train"] == a["splits"]["train"]  # the same examples, the same labels
    assert any(a[side]["test"] != b[side]["test"] for side in SIDES)


def test_the_test_split_chooses_nothing(workdir, tmp_path):
    """Poison only the test examples: everything but the test scores stays the same to the bit,
    CLSO's option (chosen on val) included."""
    (b, before_curve), (a, after_curve) = run_poisoned(workdir, tmp_path / "test-poisoned", ("test",))
    assert [r["loss"] for r in before_curve] == [r["loss"] for r in after_curve]
    assert a["clso"]["option"] == b["clso"]["option"]
    for side in (*SIDES, "clso"):
        assert (a[side]["train"], a[side]["val"], a[side]["flops"]) == (b[side]["train"], b[side]["val"], b[side]["flops"])
    assert any(a[side]["test"] != b[side]["test"] for side in SIDES)


def test_the_verdict_takes_the_option_better_on_val_even_when_test_disagrees():
    from clso.energy import EnergyReading
    from clso.transfer import Side, task_result

    reading = lambda wh: EnergyReading(wh, "estimate", 1.0, 1.0, wh, "estimate")  # noqa: E731
    side = lambda val, test, wh=0.1: Side({"train": 0.9, "val": val, "test": test}, reading(wh), 10)  # noqa: E731
    task = load_task("debates_2016")
    splits = split_task(task, 0.1, 0.1, seed=0)
    sides = {"clso_head": side(0.60, 0.50, 0.2), "clso_partial": side(0.55, 0.70, 0.3), "baseline": side(0.7, 0.52, 0.4),
             "baseline_head": side(0.6, 0.6), "no_pretraining": side(0.5, 0.45), "no_pretraining_finetuned": side(0.6, 0.4)}
    r = task_result(task, splits, sides)
    assert r["clso"]["option"] == "head" and r["clso"]["test"] == 0.50  # not partial's better test score
    assert r["clso_within_tolerance"] == {"test": True}  # 0.50 ≥ 0.52 − 5 % of 0.52
    assert r["clso"]["energy_wh"] == pytest.approx(0.5) and r["energy_ratio"] == pytest.approx(1.25)
    assert r["lift"] == pytest.approx({"pretraining_finetuned": 0.12, "pretraining_probe": 0.15, "clso_probe": 0.05})
    assert not r["no_pretraining_within_tolerance"]


def test_statement_and_table_for_mnli_and_a_matthews_correlation():
    from clso.report import partial_statement, transfer_section, transfer_statement

    side = lambda test, mm, **extra: {"train": 0.9, "val": 0.5, "test": test, "test_mismatched": mm,  # noqa: E731
                                      "energy_wh": 0.1, "method": "estimate", "flops": 1e9, **extra}
    r = {"metric": "accuracy", "splits": {"test": {"examples": 9815}},
         "majority_class": {"test": 0.35, "test_mismatched": 0.36},
         "clso": side(0.40, 0.41, option="partial"), "clso_head": side(0.4, 0.41), "clso_partial": side(0.4, 0.41),
         "baseline": side(0.80, 0.81), "baseline_head": side(0.6, 0.6), "no_pretraining": side(0.4, 0.4),
         "no_pretraining_finetuned": side(0.6, 0.6), "clso_within_tolerance": {"test": False, "test_mismatched": False},
         "no_pretraining_within_tolerance": False,
         "lift": {"pretraining_finetuned": 0.2, "pretraining_probe": 0.2, "clso_probe": 0.0}, "energy_ratio": 1.0}
    text = transfer_statement(r, 0.05)
    assert "(mismatched: 0.4100 against 0.8100, not within): not within the tolerance (5%)" in text
    assert "does not test pretraining" not in text and partial_statement(r) is None
    noisy = {**r, "clso_partial": side(0.4, 0.41, best_fitness=0.70, pretrained_fitness=0.71, prior_fitness=0.69,
                                       search_accepted=False)}
    assert partial_statement(noisy) == ("`partial` kept the pretrained genes: its search's best fitness (0.7000 nats) "
                                        "beat neither the pretrained genes' (0.7100) nor the label prior's (0.6900).")
    lines = "\n".join(transfer_section({"clso": "evolve@hybrid-1", "tolerance": 0.05, "tasks": {"glue/mnli": noisy}}))
    assert "| `glue/mnli` | CLSO, charged both options (partial) | 0.9 | 0.5 | 0.4000, 0.4100 |" in lines
    assert "| `glue/mnli` | majority class of train | — | — | 0.3500, 0.3600 | — | — |" in lines
    assert "(accuracy, 9815 test examples)" in lines and "`partial` kept the pretrained genes" in lines
    r_cola = {**r, "metric": "matthews", "majority_class": {"test": 0.0}, "clso_within_tolerance": {"test": True},
              "no_pretraining_within_tolerance": True}
    assert "does not test pretraining" in transfer_statement(r_cola, 0.05)


def test_a_pair_is_encoded_as_first_separator_second():
    from clso.transfer import encode

    class Words:  # a stand-in tokenizer: one id per word
        def encode_batch(self, texts):
            from types import SimpleNamespace
            return [SimpleNamespace(ids=[len(w) for w in t.split()]) for t in texts]

    enc = encode(Words(), ["a bb", ("ccc dddd eeeee", "ff g"), "h"], max_tokens=5, pad_id=0)
    assert enc.ids.tolist() == [[1, 2, 0, 0, 0], [3, 4, 0, 2, 1], [1, 0, 0, 0, 0]]
    assert enc.lengths.tolist() == [2, 5, 1]


def test_a_bad_task_file_stops_the_stage_with_one_line_and_exit_2(workdir, tmp_path, stage_env):
    folder = tmp_path / "bad"
    shutil.copytree(workdir, folder)
    (folder / "task.tsv").write_text("label\ttext\npos\tgood film\nneg\t \n", encoding="utf-8")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["transfer"]["tasks"] = [f"file:{folder / 'task.tsv'}"]
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    before = {p: p.read_bytes() for p in (folder / "metrics").rglob("*.json")}
    run = subprocess.run([sys.executable, "-m", "stages.transfer"], cwd=folder, env=stage_env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"clso transfer: error: {folder / 'task.tsv'}:3: empty text for label 'neg'; "
                                               "give every example its text"]
    assert {p: p.read_bytes() for p in (folder / "metrics").rglob("*.json")} == before


def test_a_pair_keeps_its_second_text_and_cuts_the_first():
    from clso.transfer import joined_pair

    assert joined_pair([1, 2, 3], [7, 8], 0, 10) == [1, 2, 3, 0, 7, 8]
    assert joined_pair([1, 2, 3, 4, 5], [7, 8], 0, 5) == [1, 2, 0, 7, 8]  # the premise gives way
    assert joined_pair([1, 2], [7, 8, 9, 10], 0, 3) == [0, 7, 8]  # a hypothesis longer than all: cut last


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_replaying_the_blocks_above_a_cut_gives_the_whole_model_to_the_bit(attention):
    """`partial` runs the frozen blocks below its genes once and replays the rest per genome."""
    import torch
    from transformers import GPT2Config, GPT2Model

    from clso.transfer import block_inputs, replay_blocks

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=3, n_head=4,
                                 attn_implementation=attention)).eval()
    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).last_hidden_state
        for first in range(3):
            assert torch.equal(replay_blocks(model, block_inputs(model, ids, first), first), whole)
        inputs = block_inputs(model, ids, 2)
        model.h[2].mlp.c_proj.weight.mul_(2)  # a block above the cut changes: the replay sees it
        assert torch.equal(replay_blocks(model, inputs, 2), model(input_ids=ids, use_cache=False).last_hidden_state)
        assert not torch.equal(replay_blocks(model, inputs, 2), whole)


def test_a_probe_is_fitted_to_its_optimum_on_ill_conditioned_features():
    """The objective is convex: at its optimum the gradient vanishes. On features correlated with
    scales four orders apart (standardising each one cannot undo that), 2000 full-batch AdamW
    steps stop at a gradient of 9e-5; L-BFGS goes below 3e-5."""
    import torch
    import torch.nn.functional as F

    from clso.transfer import fit_probe

    g = torch.Generator().manual_seed(0)
    base = torch.randn(600, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    x = base @ (q * torch.logspace(-3, 1, 8)) @ q.T
    y = (base[:, 0] + 0.5 * base[:, 1] + 0.3 * torch.randn(600, generator=g) > 0).long()
    probe, flops, fit = fit_probe(x, y, 2, iterations=500, l2=1e-4, seed=0)
    loss = F.cross_entropy(probe(x), y) + 0.5e-4 * probe.linear.weight.square().sum()
    grads = torch.autograd.grad(loss, list(probe.linear.parameters()))
    assert max(float(gr.abs().max()) for gr in grads) < 3e-5 and fit.max_gradient < 3e-5
    assert fit.converged and fit.iterations < 500
    assert (flops - 2 * 600 * 8) == fit.evaluations * 600 * 4 * 8 * 2  # standardising once, then whole evaluations
    _, _, capped = fit_probe(x, y, 2, iterations=3, l2=1e-4, seed=0)
    assert not capped.converged and capped.iterations <= 3 and capped.max_gradient > 3e-5  # stopped by a cap


def test_body_flops_are_the_forward_flops_without_the_lm_head_and_add_up_by_blocks():
    from types import SimpleNamespace

    from clso.model.flops import dense_linear_flops, forward_flops
    from clso.transfer import body_flops

    config = SimpleNamespace(n_layer=3, n_embd=16, n_inner=None, vocab_size=100)
    assert body_flops(config, 8, 2) == forward_flops(config, 8, 2) - dense_linear_flops(16, 100) * 8 * 2
    assert body_flops(config, 8, 2, layers=range(1)) + body_flops(config, 8, 2, layers=range(1, 3)) == \
        body_flops(config, 8, 2)

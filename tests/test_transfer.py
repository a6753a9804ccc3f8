"""The transfer stage on tiny models and a hand-made task: what it writes, that the held-out
examples never reach training, and one-line errors."""

import contextlib
import csv
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import save_file

from clso.baseline import dense_gpt2, state_for_saving
from clso.data import TokenData
from clso.library import Library
from clso.model import CrystallineGPT2, ModelConfig
from clso.params import load_params
from clso.tasks import load_task, split_task
from clso.transfer import chosen_genes, partial_search
from stages.prepare import prepare
from stages.transfer import transfer
from stages.variants import Variant
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
    raw["transfer"].update(tasks=[f"file:{folder / 'task.tsv'}"], head_steps=15, finetune_steps=4, batch_size=8,
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
        searched = Variant("evolve", p.transfer.clso_mode, p.grid.seeds[0]).model_dir
        searched.mkdir(parents=True)
        (searched / "best_genome.json").write_text(json.dumps({"genome": clso.genome, "model": asdict(config)}))
        save_file(clso.continuous_state(), searched / "continuous.safetensors")
        Path("models/baseline").mkdir(parents=True)
        save_file(state_for_saving(dense_gpt2(ModelConfig.from_params(p.model, vocab, layer_gains=False),
                                              p.base.seed, "cpu")), "models/baseline/model.safetensors")
        transfer.__wrapped__(Path("params.yaml"))
    return folder


def read(folder: Path):
    metrics = json.loads((folder / "metrics/transfer.json").read_text())
    with open(folder / "plots/transfer.csv") as f:
        return metrics, list(csv.DictReader(f))


def test_every_side_is_scored_on_val_and_test_and_charged(workdir):
    metrics, curve = read(workdir)
    [(spec, r)] = metrics["tasks"].items()
    assert spec.startswith("file:") and r["metric"] == "accuracy" and metrics["clso_variant"] == "evolve@hybrid-1337"
    assert {k: v["examples"] for k, v in r["splits"].items()} == {"train": 72, "val": 24, "test": 24}
    sides = ("clso_head", "clso_partial", "no_pretraining", "baseline")
    for side in sides:
        s = r[side]
        assert 0 <= s["val"] <= 1 and 0 <= s["test"] <= 1 and s["energy_wh"] > 0 and s["flops"] > 0
        assert s["method"] in ("estimate", "rapl")
    assert [sum(row["side"] == side for row in curve) for side in sides] == [15, 15, 15, 4]
    assert sum(row["side"] == "clso_partial_search" for row in curve) == 2  # the tiny params' generations
    option = max(("clso_head", "clso_partial"), key=lambda side: r[side]["val"])  # chosen on val
    assert r["clso_option"] == option
    assert r["clso_within_tolerance"] == (r[option]["test"] >= 0.95 * r["baseline"]["test"])  # accuracy ≥ 0
    assert r["clso_partial"]["flops"] > r["clso_head"]["flops"]  # its search is charged too


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
    best, fitness, flops = partial_search(genome, chosen, 50, lambda g: (float(np.abs(g[chosen] - target).sum()), 1),
                                          population=16, generations=30, seed=0)
    assert (best[:41] == 0).all() and fitness < np.abs(target).sum() and flops > 16
    # when the pretrained genes are the best there is, the search keeps them
    best, fitness, _ = partial_search(genome, chosen, 50, lambda g: (float(np.abs(g[chosen]).sum()), 1),
                                      population=8, generations=3, seed=1)
    assert fitness == 0 and (best == 0).all()


def test_held_out_examples_never_reach_training(workdir, tmp_path):
    """Flip the labels and change the words of every val and test example: the training curves stay
    the same to the bit, while the test scores move (so the poison was really read, by scoring)."""
    folder = tmp_path / "poisoned"
    shutil.copytree(workdir, folder)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    task = load_task(params["transfer"]["tasks"][0])
    splits = split_task(task, 0.2, 0.2, seed=params["base"]["seed"])
    held_out = set(splits["val"].tolist()) | set(splits["test"].tolist())
    poisoned = task_file(folder / "task.tsv", poison=held_out)
    params["transfer"]["tasks"] = [f"file:{poisoned}"]
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    with contextlib.chdir(folder):
        transfer.__wrapped__(Path("params.yaml"))
    (before, before_curve), (after, after_curve) = read(workdir), read(folder)
    assert [r["train_loss"] for r in before_curve] == [r["train_loss"] for r in after_curve]
    [b], [a] = before["tasks"].values(), after["tasks"].values()
    assert {k: v["sha256"] for k, v in b["splits"].items()} == {k: v["sha256"] for k, v in a["splits"].items()}
    assert b["splits"]["train"] == a["splits"]["train"]  # the same examples, the same labels
    assert any(a[side]["test"] != b[side]["test"] for side in ("clso_head", "clso_partial", "no_pretraining", "baseline"))


def test_a_bad_task_file_stops_the_stage_with_one_line_and_exit_2(workdir, tmp_path, stage_env):
    folder = tmp_path / "bad"
    shutil.copytree(workdir, folder)
    (folder / "task.tsv").write_text("label\ttext\npos\tgood film\nneg\t \n", encoding="utf-8")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["transfer"]["tasks"] = [f"file:{folder / 'task.tsv'}"]
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    before = (folder / "metrics/transfer.json").read_bytes()
    run = subprocess.run([sys.executable, "-m", "stages.transfer"], cwd=folder, env=stage_env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"clso transfer: error: {folder / 'task.tsv'}:3: empty text for label 'neg'; "
                                               "give every example its text"]
    assert (folder / "metrics/transfer.json").read_bytes() == before

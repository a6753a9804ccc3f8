"""Every file format beside the class that owns it: saved and loaded back whole, and a file that does
not fit is one clear error."""

import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clso import ClsoError
from clso.model.baseline import dense_gpt2, load_baseline, save_baseline, state_for_saving
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library
from clso.record import Record
from clso.search.surrogate import Surrogate, SurrogateConfig
from stages.paths import Contestant

MODEL = SimpleNamespace(n_layer=1, n_embd=16, n_head=2, block_size=8, tie_embeddings=True, layer_gains=True)
ME = Contestant("random", "hybrid", 5)
DENSE = ModelConfig.from_params(MODEL, 30, layer_gains=False)


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A library, a searched model saved by CrystallineGPT2.save and a baseline's state, in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    library, tensors = Library.generate(0, 16, size=4, shares={"ternary_lowrank": 1.0})
    library.save("models/library", tensors)
    clso = CrystallineGPT2(ModelConfig.from_params(MODEL, 30), library, seed=0)
    clso.set_genome([1, 2, 3, 0])
    with torch.no_grad():
        clso.gpt2.transformer.wte.weight.mul_(1.5)  # a trained weight, not the seeded one
    ME.model_dir.mkdir(parents=True)
    clso.save(ME.model_dir, fitness_loss=3.25, name=ME.name, mode="hybrid")
    (tmp_path / "models/baseline").mkdir(parents=True)
    return library, clso, state_for_saving(dense_gpt2(DENSE, 1, "cpu"))


def test_a_searched_model_loads_back_bit_for_bit(saved):
    library, clso, _ = saved
    loaded = CrystallineGPT2.load(ME.model_dir, library, seed=0)
    assert loaded.genome == [1, 2, 3, 0] and str(ME.model_dir) == "models/search/random/hybrid-5"
    x = torch.randint(0, 30, (2, 8))
    assert torch.equal(loaded(x), clso.eval()(x))
    about = json.loads((ME.model_dir / "best_genome.json").read_text())
    assert (about["contestant"], about["mode"], about["fitness_loss"]) == ("random@hybrid-5", "hybrid", 3.25)


def test_the_baseline_loads_with_its_tied_head(saved):
    model = dense_gpt2(DENSE, 1, "cpu")
    save_baseline(model, "models/baseline")
    baseline = load_baseline("models/baseline", DENSE, seed=7)
    assert baseline.lm_head.weight is baseline.transformer.wte.weight
    assert all(torch.equal(a, b) for a, b in zip(baseline.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("damage", ["drop", "extra", "reshape"])
def test_a_baseline_file_that_does_not_fit_is_one_clear_error(saved, damage):
    state = dict(saved[2])
    if damage == "drop":
        del state["transformer.h.0.ln_2.weight"]
    elif damage == "extra":
        state["transformer.h.1.ln_1.weight"] = state["transformer.h.0.ln_1.weight"].clone()
    else:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:4].contiguous()
    save_file(state, "models/baseline/model.safetensors")
    with pytest.raises(ClsoError, match="does not fit params.yaml's model.*dvc repro -f baseline"):
        load_baseline("models/baseline", DENSE, seed=1)


@pytest.mark.parametrize("damage", ["genome", "config", "continuous"])
def test_a_searched_model_that_does_not_fit_is_one_clear_error(saved, damage):
    library, _, state = saved
    best = json.loads((ME.model_dir / "best_genome.json").read_text())
    if damage == "genome":
        best["genome"] = [1, 2, 3]
    elif damage == "config":
        best["model"]["n_embd"] = 32
    else:
        save_file({"transformer.wte.weight": state["transformer.wte.weight"]}, ME.model_dir / "continuous.safetensors")
    (ME.model_dir / "best_genome.json").write_text(json.dumps(best))
    with pytest.raises(ClsoError, match="models/search/random/hybrid-5: does not fit.*dvc repro -f random@hybrid-5"):
        CrystallineGPT2.load(ME.model_dir, library, seed=0)


def test_a_missing_file_names_itself_and_the_fix(saved):
    (ME.model_dir / "continuous.safetensors").unlink()
    with pytest.raises(ClsoError, match="continuous.safetensors: not found; run `dvc repro`"):
        CrystallineGPT2.load(ME.model_dir, saved[0], seed=0)


def test_the_surrogate_loads_back_with_the_genomes_it_learnt_from(tmp_path):
    model = Surrogate(SurrogateConfig((0, 1, 0, 1), 4, steps=5), seed=3)
    genomes = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 1, 1]])
    losses = np.array([4.0, math.inf, 5.0])
    model.fit(genomes, losses)
    model.save(tmp_path, genomes, losses, np.array([2, 0]))
    loaded, g, l = Surrogate.load(tmp_path)
    assert loaded.config == model.config and np.array_equal(g, genomes) and np.array_equal(l, losses)
    assert np.array_equal(loaded.predict(genomes)[0], model.predict(genomes)[0])
    assert json.loads((tmp_path / "data.json").read_text())["holdout"] == [0, 2]
    (tmp_path / "surrogate.json").write_text(json.dumps({**asdict(model.config), "hidden": "wide"}))
    with pytest.raises(ClsoError, match="unreadable surrogate.*dvc repro -f surrogate"):
        Surrogate.load(tmp_path)


def test_a_record_loads_back_and_a_stale_one_is_one_clear_error(tmp_path):
    record = Record("evolve@pure-1", "clso", "CLSO", 5.0, 5.5, {"search": {"energy_wh": 1.0, "method": "estimate",
                                                                          "flops": 10}},
                    {"loss": "val", "points": []}, ("library",), "pure", 1, {"generations": 3})
    record.save(tmp_path / "r.json")
    assert Record.load(tmp_path / "r.json") == record
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["val_ppl"] == pytest.approx(math.exp(5.0)) and saved["test_ppl"] == pytest.approx(math.exp(5.5))
    (tmp_path / "r.json").write_text(json.dumps({**saved, "version": 0}))
    with pytest.raises(ClsoError, match="record version 0"):
        Record.load(tmp_path / "r.json")


@pytest.mark.parametrize("args, expected", [
    (["fixed_body", "--mode", "pure"], "clso fixed_body: error: --mode pure: not valid for fixed_body; valid: hybrid"),
    (["random", "--mode", "hybrid", "--seed", "5"], "clso random: error: metrics/detail/surrogate.json: not found"),
    (["fixed_body", "--mode", "hybrid", "--seed", "5"],
     "clso fixed_body: error: metrics/detail/contestants/evolve@hybrid-5.json: not found"),
])
def test_a_search_stage_without_what_it_needs_is_one_line(tmp_path, stage_env, args, expected):
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run = subprocess.run([sys.executable, "-m", "stages.evolve", *args], cwd=tmp_path, env=stage_env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith(expected) and "Traceback" not in run.stdout + run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]

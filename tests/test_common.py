"""What stages share: loading the final models strictly."""

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from safetensors.torch import save_file

from clso import ClsoError
from clso.model.baseline import dense_gpt2, state_for_saving
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library
from stages.final_models import baseline_model, searched_model
from stages.variants import Variant

MODEL = SimpleNamespace(n_layer=1, n_embd=16, n_head=2, block_size=8, tie_embeddings=True, layer_gains=True)
PARAMS = SimpleNamespace(base=SimpleNamespace(seed=0), model=MODEL)
VARIANT = Variant("random", "hybrid", 5)


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    library, tensors = Library.generate(0, 16, size=4, shares={"ternary_lowrank": 1.0})
    library.save("models/library", tensors)
    config = ModelConfig.from_params(MODEL, 30)
    clso = CrystallineGPT2(config, library, seed=0)
    VARIANT.model_dir.mkdir(parents=True)
    (VARIANT.model_dir / "best_genome.json").write_text(json.dumps({"genome": [1, 2, 3, 0], "model": asdict(config)}))
    save_file(clso.continuous_state(), VARIANT.model_dir / "continuous.safetensors")
    (tmp_path / "models/baseline").mkdir(parents=True)
    return state_for_saving(dense_gpt2(ModelConfig.from_params(MODEL, 30, layer_gains=False), 1, "cpu"))


def test_the_baseline_loads_with_its_tied_head(stage_dir):
    save_file(stage_dir, "models/baseline/model.safetensors")
    clso, baseline = searched_model(PARAMS, VARIANT, "cpu"), baseline_model(PARAMS, 30, "cpu")
    assert clso.genome == [1, 2, 3, 0] and str(VARIANT.model_dir) == "models/search/random/hybrid-5"
    assert baseline.lm_head.weight is baseline.transformer.wte.weight
    assert (baseline.transformer.h[0].mlp.c_fc.weight == stage_dir["transformer.h.0.mlp.c_fc.weight"]).all()


@pytest.mark.parametrize("damage", ["drop", "extra", "reshape"])
def test_a_baseline_file_that_does_not_fit_is_one_clear_error(stage_dir, damage):
    state = dict(stage_dir)
    if damage == "drop":
        del state["transformer.h.0.ln_2.weight"]
    elif damage == "extra":
        state["transformer.h.1.ln_1.weight"] = state["transformer.h.0.ln_1.weight"].clone()
    else:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:4].contiguous()
    save_file(state, "models/baseline/model.safetensors")
    with pytest.raises(ClsoError, match="does not fit params.yaml's model.*dvc repro -f baseline"):
        baseline_model(PARAMS, 30, "cpu")


@pytest.mark.parametrize("damage", ["genome", "config", "continuous"])
def test_an_evolved_model_that_does_not_fit_is_one_clear_error(stage_dir, damage, tmp_path):
    save_file(stage_dir, "models/baseline/model.safetensors")
    best = json.loads((VARIANT.model_dir / "best_genome.json").read_text())
    if damage == "genome":
        best["genome"] = [1, 2, 3]
    elif damage == "config":
        best["model"]["n_embd"] = 32
    else:
        save_file({"transformer.wte.weight": stage_dir["transformer.wte.weight"]},
                  VARIANT.model_dir / "continuous.safetensors")
    (VARIANT.model_dir / "best_genome.json").write_text(json.dumps(best))
    with pytest.raises(ClsoError, match="models/search/random/hybrid-5: does not fit.*dvc repro -f random@hybrid-5"):
        searched_model(PARAMS, VARIANT, "cpu")


@pytest.mark.parametrize("args, expected", [
    (["fixed_body", "--mode", "pure"], "clso fixed_body: error: --mode pure: not valid for fixed_body; valid: hybrid"),
    (["random", "--mode", "hybrid", "--seed", "5"], "clso random: error: metrics/surrogate.json: not found"),
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

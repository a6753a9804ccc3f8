"""The final models, as the stages after the search (compile, compare) load them."""

import torch
from safetensors.torch import load_file

from clso import ClsoError
from clso.field.model import FieldConfig, FieldLM
from clso.model.baseline import dense_gpt2
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library
from stages.common import read_json
from stages.variants import Variant


def searched_model(p, variant: Variant, device, library: Library | None = None) -> CrystallineGPT2:
    """A variant's searched model (its folder under models/search, on models/library), in eval mode."""
    folder = variant.model_dir
    genome = read_json(folder / "best_genome.json")
    library = library or Library.load("models/library")
    try:
        model = CrystallineGPT2(ModelConfig(**genome["model"]), library, seed=p.base.seed).to(device)
        model.load_continuous_state(_safetensors(folder / "continuous.safetensors"))
        model.set_genome(genome["genome"])
    except (KeyError, TypeError, ValueError) as e:
        raise ClsoError(f"{folder}: does not fit models/library ({type(e).__name__}: {str(e)[:120]}); "
                        f"re-create it with `dvc repro -f {variant.name}`") from None
    return model.eval()


def baseline_model(p, vocab_size: int, device):
    """The trained dense baseline (models/baseline), in eval mode."""
    config = ModelConfig.from_params(p.model, vocab_size, layer_gains=False)
    baseline = dense_gpt2(config, p.base.seed, device)
    path = "models/baseline/model.safetensors"
    try:
        missing, unexpected = baseline.load_state_dict(_safetensors(path), strict=False)
    except RuntimeError:  # a tensor of another shape
        missing, unexpected = ["(shapes differ)"], []
    # the tied head is the embedding, saved once: every other parameter must come from the file
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ClsoError(f"{path}: does not fit params.yaml's model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); re-create it with `dvc repro -f baseline`")
    baseline.tie_weights()
    return baseline.eval()


def field_model(device) -> FieldLM:
    """The trained neuron-field LM (models/field), in eval mode: its config.json, then its weights."""
    folder = "models/field"
    config = read_json(f"{folder}/config.json")
    try:
        with torch.random.fork_rng(devices=[]):  # its initialisation is overwritten: leave the global generator be
            model = FieldLM(FieldConfig(**config)).to(device)
        model.load_state_dict(_safetensors(f"{folder}/model.safetensors"))
    except (TypeError, RuntimeError) as e:
        raise ClsoError(f"{folder}: config.json and model.safetensors do not fit ({type(e).__name__}: {str(e)[:120]}); "
                        "re-create it with `dvc repro -f field`") from None
    return model.eval()


def _safetensors(path) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ClsoError(f"{path}: not found; run `dvc repro` so the earlier stages write it") from None
    except Exception as e:
        raise ClsoError(f"{path}: unreadable ({type(e).__name__}); re-create it with `dvc repro -f`") from None

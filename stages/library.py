"""Stage `library`: M crystalline matrices per weight shape, stored factored in safetensors."""

from pathlib import Path

from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_json_atomic
from clso.library import FAMILIES, Library, library_metrics
from clso.params import load_params
from clso.progress import progress_bar
from stages.common import PARAMS_OPTION, run_alone, stage

OUT_DIR = Path("models/library")
METRICS = Path("metrics/library.json")


@stage("library", sections=("base", "model", "library"))
def library(params: Path = PARAMS_OPTION) -> None:
    """Generate the basis library from base.seed: models/library/{library.safetensors,
    manifest.json} and metrics/library.json."""
    p = load_params(params)
    cfg = p.library
    shares = {f: getattr(cfg, f"share_{f}") for f in FAMILIES}
    with EnergyMeter("cpu", cpu_watts_per_core=p.base.cpu_watts_per_core) as meter, progress_bar() as bar:
        task = bar.add_task("library", total=4 * cfg.size, info="")
        lib, tensors = Library.generate(
            p.base.seed, p.model.n_embd, size=cfg.size, shares=shares, ternary_levels=cfg.ternary_levels,
            max_rank_fraction=cfg.max_rank_fraction, progress=lambda: bar.advance(task))
        with atomic_dir(OUT_DIR) as tmp:
            lib.save(tmp, tensors)
    metrics = library_metrics(lib, OUT_DIR / "library.safetensors")
    write_json_atomic(METRICS, {**metrics, **meter.reading.as_metrics()})
    print(f"library: {cfg.size} matrices × {len(lib.shapes)} buckets, "
          f"{metrics['file_bytes']:,} bytes ({metrics['bytes_vs_dense']:.1%} of dense) → {OUT_DIR}")


if __name__ == "__main__":
    run_alone("library")

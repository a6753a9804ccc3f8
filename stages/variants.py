"""The grid's variants: CLSO's search and its controls, one per (stage, mode, seed), and the one
name each has everywhere — DVC stage instance `evolve@pure-1337`, models/search/evolve/pure-1337/,
metrics/search/evolve/pure-1337.json, plots/search/evolve/pure-1337.csv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# dvc.yaml's matrix stage → the search strategy it runs (clso.search.evolve.STRATEGIES), and how reports name it
STRATEGY = {"evolve": "ga", "random": "random", "no_surrogate": "no_surrogate", "fixed_body": "fixed_body"}
LABEL = {"evolve": "CLSO (GA + surrogate)", "random": "random search", "no_surrogate": "GA without surrogate",
         "fixed_body": "fixed random body"}


@dataclass(frozen=True)
class Variant:
    stage: str
    mode: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.stage}@{self.mode}-{self.seed}"  # as DVC names the matrix item

    @property
    def strategy(self) -> str:
        return STRATEGY[self.stage]

    @property
    def label(self) -> str:
        return f"{LABEL[self.stage]}, {self.mode}"

    @property
    def _key(self) -> str:
        return f"{self.stage}/{self.mode}-{self.seed}"

    @property
    def model_dir(self) -> Path:
        return Path("models/search") / self._key

    @property
    def metrics(self) -> Path:
        return Path(f"metrics/search/{self._key}.json")

    @property
    def curve(self) -> Path:
        return Path(f"plots/search/{self._key}.csv")

    @property
    def figure(self) -> Path:
        return Path(f"plots/search/{self._key}.png")

    @property
    def checkpoints(self) -> Path:
        return Path("checkpoints/search") / self._key

    def clso(self) -> Variant:
        """The CLSO search this control is matched to (itself, for CLSO)."""
        return Variant("evolve", self.mode, self.seed)


def grid_variants(grid) -> list[Variant]:
    """Every variant params.yaml's grid runs, CLSO first, in dvc.yaml's order."""
    return [Variant(stage, mode, seed) for stage in STRATEGY for mode in getattr(grid, stage) for seed in grid.seeds]


def compiled_variant(p) -> Variant:
    """The CLSO search `compile` builds: compile.mode at the first seed."""
    return Variant("evolve", p.compile.mode, p.grid.seeds[0])

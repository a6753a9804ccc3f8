"""Every path the pipeline writes, in one place, and the one name each contestant has everywhere.

A contestant is a DVC stage instance that trains a model for the frontier. Its name is the stage's
(`baseline`, `field`), or for a search of the crystalline GPT-2 run once per mode and seed of
params.yaml's grid, `STAGE@MODE-SEED` as DVC names the matrix item (`evolve@pure-1337`): the same in
dvc.yaml, in models/, in its record metrics/detail/contestants/NAME.json and in plots/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PREPARED = Path("data/prepared")
LIBRARY = Path("models/library")
SURROGATE = Path("models/surrogate")
BUILD = Path("build")
COMPILE_REPORT = BUILD / "report.json"  # every compiled file's figures, the benchmarks and the samples
REPORT = Path("metrics/report.md")
RECORDS = Path("metrics/detail/contestants")  # every contestant's record: compare depends on the folder
FIELD_NEURONS = Path("plots/field_neurons.png")
TRANSFER_CURVES = Path("plots/transfer.csv")


def metrics(stage: str) -> Path:
    """A stage's declared metrics: the few numbers `dvc exp show` compares across experiments."""
    return Path(f"metrics/{stage}.json")


def detail(stage: str) -> Path:
    """Everything else a stage measured, in git beside its metrics (a contestant's is its record)."""
    return Path(f"metrics/detail/{stage}.json")


def frontier(mode: str, suffix: str = ".csv") -> Path:
    """The frontier of one mode (every contestant of the mode, the baseline and the field LM): its CSV,
    or with suffix -energy.png or -flops.png its pictures."""
    return Path(f"plots/frontier/{mode}{suffix}")


@dataclass(frozen=True)
class Entry:
    """A line of the registry: a stage whose runs are contestants."""

    stage: str
    kind: str  # clso.record.KINDS
    label: str
    # how it searches, run once per mode and seed of params.yaml's grid (its list grid.STAGE): a strategy
    # of clso.search.evolve.STRATEGIES on the crystalline GPT-2, or a dense trainer of
    # clso.search.zeroth_order.METHODS; None: one run
    strategy: str | None = None
    arena: bool = False  # a search of the arena: run at grid.arena_seeds, not every seed of grid.seeds


# Everything on the frontier. Adding a contestant: a stage that writes its record, and a line here.
REGISTRY = (
    Entry("baseline", "baseline", "AdamW baseline"),
    Entry("field", "contestant", "neuron-field LM"),
    Entry("field_no_neurons", "contestant", "field LM without neurons"),
    Entry("evolve", "clso", "CLSO (GA + surrogate)", strategy="ga"),
    Entry("random", "control", "random search", strategy="random"),
    Entry("no_surrogate", "control", "GA without surrogate", strategy="no_surrogate"),
    Entry("fixed_body", "control", "fixed random body", strategy="fixed_body"),
    Entry("ngopt", "contestant", "nevergrad NGOpt", strategy="ngopt", arena=True),
    Entry("head_only", "contestant", "head-only hybrid (no backward through the body)", strategy="head_only", arena=True),
    Entry("es", "contestant", "low-rank evolution strategies", strategy="es", arena=True),
    Entry("mezo", "contestant", "zeroth-order SGD (MeZO)", strategy="mezo", arena=True),
)
ENTRIES = {e.stage: e for e in REGISTRY}


@dataclass(frozen=True)
class Contestant:
    stage: str
    mode: str | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        return self.stage if self.mode is None else f"{self.stage}@{self.mode}-{self.seed}"  # as DVC names it

    @property
    def kind(self) -> str:
        return ENTRIES[self.stage].kind

    @property
    def strategy(self) -> str | None:
        return ENTRIES[self.stage].strategy

    @property
    def label(self) -> str:
        label = ENTRIES[self.stage].label
        return label if self.mode is None else f"{label}, {self.mode}"

    @property
    def _key(self) -> str:
        return self.stage if self.mode is None else f"search/{self.stage}/{self.mode}-{self.seed}"

    @property
    def model_dir(self) -> Path:
        return Path("models") / self._key

    @property
    def record(self) -> Path:
        return RECORDS / f"{self.name}.json"

    @property
    def curve(self) -> Path:
        return Path(f"plots/{self._key}.csv")

    @property
    def figure(self) -> Path:
        return Path(f"plots/{self._key}.png")

    @property
    def checkpoints(self) -> Path:
        return Path("checkpoints") / self._key

    def clso(self) -> Contestant:
        """The CLSO search a control of the grid is matched to (itself, for CLSO)."""
        return Contestant("evolve", self.mode, self.seed)


def contestants(grid) -> list[Contestant]:
    """Every contestant one `dvc repro` trains under params.yaml's `grid`, in the registry's order."""
    out = []
    for e in REGISTRY:
        if e.strategy:
            seeds = grid.arena_seeds if e.arena else grid.seeds
            out += [Contestant(e.stage, mode, seed) for mode in getattr(grid, e.stage) for seed in seeds]
        else:
            out.append(Contestant(e.stage))
    return out


def searched(stage: str, mode: str, grid) -> Contestant:
    """The search of `stage` in `mode` at the first of grid.seeds (what compile and transfer take)."""
    return Contestant(stage, mode, grid.seeds[0])

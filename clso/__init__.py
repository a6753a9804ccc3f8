"""CLSO: Crystalline Latent Space Optimization, measured against a dense AdamW baseline."""

__version__ = "0.1.0"

# The architecture, from the bottom up: a module may import from its own layer and the layers below
# it, never from one above (tests/test_layers.py). `stages` are the DVC stages, `cli` the `clso` command.
LAYERS = (
    ("clso", "clso.io", "clso.progress", "clso.params"),  # errors, atomic files, progress bars, params.yaml
    ("clso.context", "clso.energy", "clso.record"),  # device, threads, precision, seeds; metering; a contestant's record
    ("clso.data",),  # corpora, tokenizers, token memmaps, classification tasks
    ("clso.model",),  # the crystalline GPT-2 and its library, the dense baseline, FLOPs, the frozen-head bound
    ("clso.search", "clso.field"),  # the GA, surrogate and controls; the neuron-field LM
    ("clso.export", "clso.transfer", "clso.bench"),  # .crystal files and the C runtime; fine-tuning; benchmarks
    ("clso.compare", "clso.report", "clso.plots"),  # the comparison's arithmetic, its prose, its figures
    ("stages",),
    ("cli",),
)


class ClsoError(Exception):
    """A problem the user can fix: bad params, a missing or corrupt file, no network.

    Stages print it as one line and exit with `exit_code`, without a traceback.
    """

    exit_code = 1


class ParamsError(ClsoError):
    exit_code = 2

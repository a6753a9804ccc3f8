"""CLSO: Crystalline Latent Space Optimization, measured against a dense AdamW baseline."""

__version__ = "0.1.0"


class ClsoError(Exception):
    """A problem the user can fix: bad params, a missing or corrupt file, no network.

    Stages print it as one line and exit with `exit_code`, without a traceback.
    """

    exit_code = 1


class ParamsError(ClsoError):
    exit_code = 2

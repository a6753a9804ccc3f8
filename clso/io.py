"""Write outputs so that a crash never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from clso import ClsoError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
    return Path(name)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: str | Path, fields, rows) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, out.getvalue())


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path, fix: str = "run `dvc repro` so the earlier stages write it") -> dict:
    """A JSON file, or a one-line ClsoError naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClsoError(f"{path}: not found; {fix}") from None
    except (OSError, ValueError):
        raise ClsoError(f"{path}: not valid JSON; re-create it with `dvc repro -f`") from None


def read_tensors(path: str | Path, fix: str = "run `dvc repro` so the earlier stages write it") -> dict:
    """A safetensors file's tensors, or a one-line ClsoError naming it and `fix`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ClsoError(f"{path}: not found; {fix}") from None
    except Exception as e:  # noqa: BLE001 -- OSError or safetensors' own error: both mean unreadable
        raise ClsoError(f"{path}: unreadable ({type(e).__name__}); re-create it with `dvc repro -f`") from None


def read_curve(path: str | Path) -> list[dict]:
    """A CSV curve as rows of Python numbers (as JSON wants), or a one-line ClsoError."""
    import pandas as pd  # here, not at the top: few readers need it

    try:
        return pd.read_csv(path).astype(object).to_dict("records")
    except FileNotFoundError:
        raise ClsoError(f"{path}: not found; run `dvc repro` so the earlier stages write it") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise ClsoError(f"{path}: not a readable curve ({type(e).__name__}); re-create it with `dvc repro -f`") from None


def sha256_text(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
    return h.hexdigest()

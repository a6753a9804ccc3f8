"""The field run's checkpoint: a folder holding tensors-STEP.safetensors (the model, both optimizers,
the last training batch's queries, the hard-freeze snapshots) and state.json (the step, the curve so
far, the random generators, the energy so far), which names the tensor file. The tensors are
written first and state.json is replaced atomically last, so a kill at any instant leaves the new
checkpoint or the old one. Only a checkpoint of the same fingerprint (params, inputs, code) resumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from clso import ClsoError
from clso.io import write_bytes_atomic, write_text_atomic

CHECKPOINT_VERSION = 1


class FieldCheckpoint:
    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(state, tensors) saved here; None when there is none or it is another run's."""
        path = self.folder / "state.json"
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != self.fingerprint:
                return None
            return state, load_file(str(self.folder / state["tensor_file"]))
        except Exception as e:  # noqa: BLE001 -- json, OSError, safetensors' own error: all mean unreadable
            raise ClsoError(f"{self.folder}: checkpoint unreadable ({type(e).__name__}); delete the folder to "
                            "train afresh") from None

    def save(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        name = f"tensors-{state['step']}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.folder / name, save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}))
        write_text_atomic(self.folder / "state.json", json.dumps({**state, "version": CHECKPOINT_VERSION,
                                                                   "fingerprint": self.fingerprint, "tensor_file": name}))
        for old in self.folder.glob("tensors-*.safetensors"):
            if old.name != name:
                old.unlink()

    def clear(self) -> None:
        """After the run's outputs are written: a later run starts afresh. The folder stays (an output
        of the stage even when the run was too short to save)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "state.json").unlink(missing_ok=True)
        for old in self.folder.glob("tensors-*.safetensors"):
            old.unlink()

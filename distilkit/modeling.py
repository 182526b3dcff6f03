"""Loading helpers shared by every save/load path: Auto-class registration of distilkit's own
model classes, and reading a saved directory's tensors."""
from __future__ import annotations

import importlib
import json
import os

import torch

# Modules that register model classes with the transformers Auto classes on import.
_REGISTERING_MODULES: list[str] = ["distilkit.students.bilstm"]

_done = False


def ensure_registered() -> None:
    """Import the modules that register distilkit's model classes with the Auto classes, so
    ``AutoModel*.from_pretrained`` works on directories distilkit saved."""
    global _done
    if _done:
        return
    for name in _REGISTERING_MODULES:
        importlib.import_module(name)
    _done = True


def load_state_dict_from_dir(path: str) -> dict[str, torch.Tensor]:
    """All tensors saved by ``save_pretrained`` in ``path`` (single file or sharded)."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    raise FileNotFoundError(f"{path}: no model.safetensors (or index) here; files: "
                            f"{sorted(os.listdir(path)) if os.path.isdir(path) else 'not a directory'}")

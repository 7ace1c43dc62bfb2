"""Component state in checkpoints: JSON for plain values, safetensors for tensors (never pickle)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from opd_plugins.paths import atomic_write

STATE_JSON = "opd_components.json"
STATE_TENSORS = "opd_components.safetensors"
COMPLETE_MARKER = "opd_checkpoint_complete"


def save_component_states(directory: str, components: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    plain: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, comp in components.items():
        state = comp.state_dict()
        if not state:
            continue
        entry = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}::{name}"] = value.detach().cpu().contiguous()
                entry[name] = {"__tensor__": f"{key}::{name}"}
            else:
                try:
                    json.dumps(value)
                except TypeError as exc:
                    raise TypeError(
                        f"component {key} ({type(comp).__name__}) state {name!r} is neither a tensor nor JSON-serializable: {exc}"
                    ) from None
                entry[name] = value
        plain[key] = entry
    atomic_write(os.path.join(directory, STATE_JSON), json.dumps(plain, indent=1).encode())
    if tensors:
        tmp = os.path.join(directory, STATE_TENSORS + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(directory, STATE_TENSORS))


def load_component_states(directory: str, components: dict[str, Any]) -> list[str]:
    """Restore states saved by :func:`save_component_states`; returns the keys restored."""
    path = os.path.join(directory, STATE_JSON)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        plain = json.load(f)
    tensors: dict[str, torch.Tensor] = {}
    tpath = os.path.join(directory, STATE_TENSORS)
    if os.path.exists(tpath):
        from safetensors.torch import load_file

        tensors = load_file(tpath)
    restored = []
    for key, entry in plain.items():
        if key not in components:
            raise KeyError(f"checkpoint {directory} has state for component {key!r}, which this run does not have")
        state = {
            name: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v for name, v in entry.items()
        }
        components[key].load_state_dict(state)
        restored.append(key)
    return restored


def mark_complete(directory: str) -> None:
    atomic_write(os.path.join(directory, COMPLETE_MARKER), b"ok\n")

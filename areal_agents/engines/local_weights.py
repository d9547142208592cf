"""Loading a ``WeightUpdate`` into an in-process model: its HF-named tensors, or a directory
of ``*.safetensors`` files read one tensor at a time, every name and shape checked against
the model before any parameter changes (``apply_weight_update``). ``LocalEngine`` and the
engine server (``service``) load base weights with it; adapter updates read their tensors
with ``read_tensors``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from .base import WeightUpdate

__all__ = ["apply_weight_update", "read_tensors"]


def apply_weight_update(model: torch.nn.Module, update: WeightUpdate) -> int:
    """Copy HF-named tensors (or a safetensors directory) into ``model``; returns the count.

    All names are checked before any parameter changes. A directory is read one tensor at a
    time (names and shapes from the files' headers first), so it never needs the whole update
    in memory.

    Raises:
        KeyError: a name the model does not have (the message suggests close names).
        ValueError: a tensor whose shape differs from the parameter's.
        FileNotFoundError: ``update.path`` has no ``*.safetensors`` file.
    """
    if update.path is not None:
        return _apply_directory(model, update.path)
    tensors = read_tensors(update)
    targets = model.state_dict(keep_vars=True)
    for name, tensor in tensors.items():
        _check_target(targets, name, tuple(tensor.shape))
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    return len(tensors)


def read_tensors(update: WeightUpdate) -> dict[str, torch.Tensor]:
    """The tensors of ``update``: its ``named_tensors`` or its directory's ``*.safetensors``.

    Raises:
        FileNotFoundError: ``update.path`` has no ``*.safetensors`` file.
    """
    if update.path is None:
        assert update.named_tensors is not None
        return dict(update.named_tensors)
    from safetensors.torch import load_file

    files = sorted(Path(update.path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {update.path!r}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _apply_directory(model: torch.nn.Module, path: str | Path) -> int:
    """``apply_weight_update`` of a safetensors directory, one tensor in memory at a time."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}")
    targets = model.state_dict(keep_vars=True)
    names: dict[str, Path] = {}
    for file in files:  # headers only
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                _check_target(targets, name, tuple(f.get_slice(name).get_shape()))
                names[name] = file
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    targets[name].copy_(f.get_tensor(name))
    return len(names)


def _check_target(targets: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> None:
    """Raise unless ``targets`` (the model's state dict) has ``name`` with ``shape``."""
    if name not in targets:
        close = difflib.get_close_matches(name, list(targets), n=3)
        raise KeyError(f"update_weights: the model has no tensor {name!r}"
                       + (f"; did you mean {close}?" if close else ""))
    if tuple(targets[name].shape) != shape:
        raise ValueError(f"update_weights: {name!r} has shape {shape}, the model "
                         f"expects {tuple(targets[name].shape)}")

"""Weights and gradients in the forms they travel in: a module's state as numpy arrays (the wire's
``tensors`` kind) and a parameter list's gradients as one flat vector (``client_grad``, ``align``).

One copy of each conversion, shared by the device's trainer, the orchestrator's server step and
the in-process engine, so both ends flatten in the same (``parameters()``) order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "copy_numpy_state",
    "flat_grad",
    "flatten",
    "load_numpy_state",
    "set_flat_grad",
    "state_to_numpy",
    "unflatten",
]


def state_to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A module's state as CPU numpy arrays, in state_dict order (for the wire)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_numpy_state(module: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load wire arrays into a module; strict, so a mismatched model is an error, not noise."""
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    module.load_state_dict(tensors, strict=True)


def copy_numpy_state(module: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy wire arrays into a module's own tensors, in place: an optimizer built over the
    module keeps its parameters (and their momentum). A missing name is a KeyError."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            tensor.copy_(torch.from_numpy(np.array(state[name])))


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Tensors as one vector, each flattened in C order, concatenated in order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each of ``like`` (the inverse of :func:`flatten`)."""
    total = sum(t.numel() for t in like)
    if total != flat.numel():
        raise ValueError(f"flat gradient has {flat.numel()} values, parameters hold {total}")
    parts, offset = [], 0
    for t in like:
        n = t.numel()
        parts.append(flat[offset : offset + n].view_as(t))
        offset += n
    return parts


def flat_grad(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """All parameters' gradients as one vector (zeros where a parameter has none)."""
    return flatten(p.grad if p.grad is not None else torch.zeros_like(p) for p in params)


def set_flat_grad(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a vector back into the parameters' ``.grad`` (the inverse of :func:`flat_grad`)."""
    params = list(params)
    # unflatten checks the length first: a mismatch must not leave half the grads written
    for p, part in zip(params, unflatten(flat, params)):
        p.grad = part.clone()

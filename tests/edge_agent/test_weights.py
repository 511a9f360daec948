"""``edge_agent.weights``: numpy state to and from a module, and a parameter list's gradients to
and from one flat vector, the forms weights and gradients travel in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent.weights import (
    copy_numpy_state,
    flat_grad,
    flatten,
    load_numpy_state,
    set_flat_grad,
    state_to_numpy,
    unflatten,
)


def _small_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_flat_grad_and_set_flat_grad_round_trip() -> None:
    net = _small_module()
    net(torch.randn(5, 3)).square().sum().backward()
    params = list(net.parameters())
    before = [torch.zeros(0) if p.grad is None else p.grad.clone() for p in params]
    flat = flat_grad(params)
    assert flat.shape == (sum(p.numel() for p in params),)
    set_flat_grad(params, flat)
    assert all(p.grad is not None and torch.equal(p.grad, b) for p, b in zip(params, before))
    # Writing a changed vector back changes every parameter's slice, and only by that change.
    set_flat_grad(params, 2.0 * flat)
    assert all(p.grad is not None and torch.equal(p.grad, 2 * b) for p, b in zip(params, before))
    assert torch.equal(flat_grad(params), 2.0 * flat)


def test_set_flat_grad_copies_and_flat_grad_fills_missing_with_zeros() -> None:
    net = _small_module()
    params = list(net.parameters())
    assert torch.equal(flat_grad(params), torch.zeros(sum(p.numel() for p in params)))
    flat = torch.arange(float(sum(p.numel() for p in params)))
    set_flat_grad(params, flat)
    flat.zero_()  # the parameters' gradients must not alias the vector they came from
    assert float(flat_grad(params).abs().sum()) > 0


def test_set_flat_grad_refuses_a_vector_of_the_wrong_length() -> None:
    params = list(_small_module().parameters())
    n = sum(p.numel() for p in params)
    with pytest.raises(ValueError, match="values"):
        set_flat_grad(params, torch.zeros(n + 1))
    with pytest.raises((ValueError, RuntimeError)):
        set_flat_grad(params, torch.zeros(n - 1))


def test_numpy_state_round_trips_and_loads_strictly() -> None:
    net = _small_module()
    state = state_to_numpy(net)
    assert list(state) == list(net.state_dict())
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = _small_module()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    load_numpy_state(other, state)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters()))
    with pytest.raises(RuntimeError):  # strict: a name too few is an error, not noise
        load_numpy_state(other, {k: v for k, v in state.items() if k != "0.bias"})


def test_copy_numpy_state_keeps_the_modules_own_tensors() -> None:
    net = _small_module()
    first = next(net.parameters())
    state = {k: np.full(v.shape, 0.5, v.dtype) for k, v in state_to_numpy(net).items()}
    copy_numpy_state(net, state)
    assert next(net.parameters()) is first  # an optimizer over the module still holds it
    assert all(bool((p == 0.5).all()) for p in net.parameters())
    with pytest.raises(KeyError):
        copy_numpy_state(net, {})


def test_unflatten_gives_views_shaped_like_the_parts() -> None:
    parts = [torch.arange(6.0).reshape(2, 3), torch.arange(4.0)]
    flat = flatten(parts)
    assert flat.shape == (10,)
    back = unflatten(flat, parts)
    assert all(torch.equal(a, b) for a, b in zip(back, parts))
    flat.zero_()
    assert all(float(b.abs().sum()) == 0 for b in back)  # views of the vector, not copies
    with pytest.raises(ValueError, match="values"):
        unflatten(torch.zeros(11), parts)

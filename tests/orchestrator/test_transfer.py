"""Round tensors to the server partition's device and back: CPU as before, CUDA through pinned memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.training.transfer import to_device, to_host

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _frames() -> list[np.ndarray]:
    """Arrays as decode() hands them over: read-only views."""
    rng = np.random.default_rng(0)
    out: list[np.ndarray] = [
        rng.standard_normal((4, 3, 2)).astype(np.float32),
        rng.integers(0, 10, 4).astype(np.int64),
        np.zeros((0, 5), np.float32),
    ]
    for a in out:
        a.setflags(write=False)
    return out


def test_cpu_copies_are_writable_and_independent() -> None:
    arrays = _frames()
    tensors = to_device(arrays, torch.device("cpu"))
    for a, t in zip(arrays, tensors):
        assert t.device.type == "cpu" and tuple(t.shape) == a.shape
        assert t.dtype == torch.from_numpy(np.array(a)).dtype
        np.testing.assert_array_equal(t.numpy(), a)
    tensors[0].add_(1.0)  # the server may write to its inputs; the frame must not change
    assert not np.array_equal(tensors[0].numpy(), arrays[0])


def test_cpu_gradients_come_back_detached_and_equal() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    g = (x * 2).sum(dim=1, keepdim=True).expand(3, 4)  # part of a graph
    out = to_host([g, x])
    assert all(isinstance(a, np.ndarray) for a in out)
    np.testing.assert_array_equal(out[0], g.detach().numpy())
    np.testing.assert_array_equal(out[1], x.detach().numpy())


def test_cpu_path_is_the_one_the_round_loop_had() -> None:
    """Bit for bit what ``torch.from_numpy(np.array(a)).to(dev)`` and ``.cpu().numpy()`` gave."""
    arrays = _frames()
    for a, t in zip(arrays, to_device(arrays, torch.device("cpu"))):
        assert torch.equal(t, torch.from_numpy(np.array(a)))
    grads = [torch.randn(2, 3), torch.randn(5)]
    for g, h in zip(grads, to_host(grads)):
        assert np.array_equal(h, g.cpu().numpy())


@needs_cuda
def test_cuda_round_trip_through_pinned_memory() -> None:
    arrays = _frames()
    device = torch.device("cuda")
    tensors = to_device(arrays, device)
    for a, t in zip(arrays, tensors):
        assert t.is_cuda and tuple(t.shape) == a.shape
    # work queued on the device after the copies, then brought back without an explicit sync
    grads = [t * 2 if t.is_floating_point() else t + 1 for t in tensors]
    back = to_host(grads)
    np.testing.assert_array_equal(back[0], arrays[0] * 2)
    np.testing.assert_array_equal(back[1], arrays[1] + 1)
    assert back[2].shape == (0, 5)


@needs_cuda
def test_cuda_copies_do_not_race_a_reused_buffer() -> None:
    """Many large non-blocking copies in a row, each from a freshly filled staging buffer."""
    device = torch.device("cuda")
    arrays = [np.full((256, 1024), float(k), np.float32) for k in range(16)]
    tensors = to_device(arrays, device)
    back = to_host(tensors)
    for k, b in enumerate(back):
        assert (b == k).all()

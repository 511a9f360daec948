"""Moving a round's cut-layer tensors between host numpy arrays and the server partition's device.

On the CPU this is a plain copy out of the (read-only) received frames. On CUDA the copies go
through page-locked host memory with ``non_blocking=True``: a copy from pageable memory is
staged by the driver and blocks the host, a pinned one is a straight DMA that can overlap with
the next copy. Gradients come back the same way, with one synchronisation before numpy reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Writable tensors on ``device`` holding copies of ``arrays`` (dtype and shape kept)."""
    if device.type != "cuda":
        # np.array copies: frames are read-only, and torch wants writable memory.
        return [torch.from_numpy(np.array(a)).to(device) for a in arrays]
    out = []
    for a in arrays:
        staging = torch.empty(a.shape, dtype=_torch_dtype(a.dtype), pin_memory=True)
        staging.numpy()[...] = a  # the one host copy, straight into pinned memory
        # The caching host allocator keeps ``staging`` from reuse until the copy is done.
        out.append(staging.to(device, non_blocking=True))
    return out


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """numpy copies of ``tensors`` (detached); safe to read when this returns."""
    cuda = [t for t in tensors if t.device.type == "cuda"]
    if not cuda:
        return [t.detach().cpu().numpy() for t in tensors]
    out: list[np.ndarray | torch.Tensor] = []
    for t in tensors:
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            out.append(host)
        else:
            out.append(t.detach().cpu().numpy())
    # A non-blocking device-to-host copy returns before the bytes land: wait for every device
    # the copies were queued on before numpy may look at them.
    for device in {t.device for t in cuda}:
        torch.cuda.synchronize(device)
    return [h.numpy() if isinstance(h, torch.Tensor) else h for h in out]


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype

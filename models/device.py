"""Pick the torch device a partition runs on, from a user preference such as `--device auto`."""

from __future__ import annotations

import torch

from models.errors import DeviceUnavailable, UnknownChoiceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    # torch.backends.mps exists only from torch 1.12 on, and only macOS builds can use it.
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(preference: str = "auto") -> torch.device:
    """Resolve `preference` to a usable device.

    "auto" picks CUDA if available, then Apple MPS, else CPU. An explicit "cpu", "cuda",
    "cuda:N" or "mps" that this machine cannot provide raises DeviceUnavailable (a ValueError)
    saying why.
    """
    choice = preference.strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not _mps_available():
            raise DeviceUnavailable("device 'mps' requested but Apple MPS is not available here")
        return torch.device("mps")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {preference!r} requested but CUDA is not available "
                "(no GPU, driver, or CUDA-enabled torch build)"
            )
        index_text = choice[len("cuda:") :] if ":" in choice else "0"
        count = torch.cuda.device_count()
        if not index_text.isdigit() or int(index_text) >= count:
            raise DeviceUnavailable(
                f"device {preference!r} requested but this machine has {count} CUDA device(s)"
            )
        return torch.device(choice)
    raise UnknownChoiceError(
        f"unknown device {preference!r}; valid choices: auto, cpu, cuda[:N], mps"
    )

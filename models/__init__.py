"""Split-able PyTorch models with named cut points, for parallel split learning.

Each model is a fixed sequence of named stages; `build_split(name, cut)` keeps the stages up to
`cut` on the device (the client partition) and the rest on the server. `name` may also be a
factory of one's own, "package.module:factory" (models.custom).
"""

from __future__ import annotations

from models.base import ModelInfo, SplitModel
from models.device import DEVICE_CHOICES, select_device
from models.errors import DeviceUnavailable, ModelError, SpecError, UnknownChoiceError
from models.registry import (
    available_models,
    build_model,
    build_split,
    default_model,
    model_info,
    resolve_model,
)

__all__ = [
    "DEVICE_CHOICES",
    "DeviceUnavailable",
    "ModelError",
    "ModelInfo",
    "SpecError",
    "SplitModel",
    "UnknownChoiceError",
    "available_models",
    "build_model",
    "build_split",
    "default_model",
    "model_info",
    "resolve_model",
    "select_device",
]

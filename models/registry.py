"""The model registry: look models up by name and build them split at a named cut point.

Construction is deterministic: all stages of the unsplit network are created in one fixed
order before the split, so after the same `torch.manual_seed` every cut of a model yields the
same weights, and client-then-server equals the unsplit forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from torch import nn

from models.base import ModelInfo, SplitModel, Stage, StageBuilder
from models.cnn import (
    CIFAR_CNN,
    DIGITS_CNN,
    DIGITS_CNN_FC,
    FMNIST_CNN,
    cifar_cnn_stages,
    digits_cnn_fc_stages,
    digits_cnn_stages,
    fmnist_cnn_stages,
)
from models.custom import factory_stages
from models.errors import UnknownChoiceError
from models.mlp import DIGITS_MLP, FMNIST_MLP, digits_mlp_stages, fmnist_mlp_stages
from models.resnet import RESNET18, resnet18_stages
from models.spec import is_spec

_REGISTRY: dict[str, tuple[ModelInfo, StageBuilder]] = {
    info.name: (info, builder)
    for info, builder in (
        (DIGITS_MLP, digits_mlp_stages),
        (DIGITS_CNN, digits_cnn_stages),
        (DIGITS_CNN_FC, digits_cnn_fc_stages),
        (FMNIST_CNN, fmnist_cnn_stages),
        (FMNIST_MLP, fmnist_mlp_stages),
        (CIFAR_CNN, cifar_cnn_stages),
        (RESNET18, resnet18_stages),
    )
}

# The small model each dataset trains by default (manifest `training.model = "auto"`).
_DATASET_DEFAULTS: dict[str, str] = {
    "digits": "digits_cnn",
    "fashion_mnist": "fmnist_cnn",
    "cifar10": "cifar_cnn",
}


def _unknown(kind: str, value: str, choices: Iterable[str]) -> UnknownChoiceError:
    listed = ", ".join(repr(c) for c in choices)
    return UnknownChoiceError(f"unknown {kind} {value!r}; valid choices: {listed}")


def available_models() -> list[str]:
    """Names of all registered models, in registry order."""
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Metadata of model `name`; raises `UnknownChoiceError` naming the valid models."""
    try:
        return _REGISTRY[name][0]
    except KeyError:
        raise _unknown("model", name, _REGISTRY) from None


def default_model(dataset: str) -> str:
    """The default small model for `dataset` (digits, fashion_mnist or cifar10)."""
    try:
        return _DATASET_DEFAULTS[dataset]
    except KeyError:
        raise _unknown("dataset", dataset, _DATASET_DEFAULTS) from None


def resolve_model(model: str, dataset: str, input_shape: tuple[int, ...]) -> str:
    """`model`, or for "auto" the default of `dataset`; a dataset of one's own (a folder or a
    loader) gets the default of the built-in dataset whose inputs are shaped like its own."""
    if model != "auto":
        return model
    if dataset in _DATASET_DEFAULTS:
        return _DATASET_DEFAULTS[dataset]
    for name in _DATASET_DEFAULTS.values():
        if model_info(name).input_shape == tuple(input_shape):
            return name
    shape = "x".join(map(str, input_shape))
    raise UnknownChoiceError(
        f'"auto" has no model for inputs shaped {shape}; name a model of the zoo that takes '
        'them or a factory of your own as "package.module:factory"'
    )


def _stages(name: str, num_classes: int) -> tuple[ModelInfo, list[Stage]]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if is_spec(name):
        return factory_stages(name, num_classes)
    info = model_info(name)
    return info, _REGISTRY[name][1](num_classes)


def build_model(name: str, num_classes: int = 10) -> nn.Sequential:
    """The unsplit model as one `nn.Sequential` whose children are the named stages.

    Under the same seed its weights equal those of `build_split` (same construction order).
    """
    return nn.Sequential(OrderedDict(_stages(name, num_classes)[1]))


def build_split(name: str, cut: str = "default", num_classes: int = 10) -> SplitModel:
    """Build model `name` and split it after stage `cut` ("default" = the model's default cut).

    `name` is a model of the registry or a factory of one's own, "package.module:factory"
    (models.custom); a factory that cannot be had raises SpecError.

    The client gets every stage up to and including `cut`, the server the rest; both are
    `nn.Sequential` keyed by stage name, so state_dict keys do not depend on the cut.
    Unknown names or cuts raise `UnknownChoiceError` (a ValueError) listing the valid ones.
    """
    info, stages = _stages(name, num_classes)
    chosen = info.default_cut if cut == "default" else cut
    if chosen not in info.cuts:
        raise _unknown(f"cut for model {name!r}", cut, ("default",) + info.cuts)
    split_at = [stage_name for stage_name, _ in stages].index(chosen) + 1
    return SplitModel(
        client=nn.Sequential(OrderedDict(stages[:split_at])),
        server=nn.Sequential(OrderedDict(stages[split_at:])),
        cut=chosen,
        info=info,
    )

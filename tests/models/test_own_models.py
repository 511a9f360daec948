"""Models of one's own (``"package.module:factory"``): named stages, cut points, the same
weights under the same seed at every cut, and one-line errors for a factory that cannot serve."""

from __future__ import annotations

import pytest
import torch

from models import SpecError, UnknownChoiceError, build_model, build_split, resolve_model

OWN = "tests.own_model_example"


def test_every_stage_but_the_last_is_a_cut_and_the_first_is_the_default() -> None:
    split = build_split(f"{OWN}:tiny_mlp", num_classes=3)
    assert split.info.cuts == ("hidden", "bottleneck") and split.cut == "hidden"
    assert list(split.client._modules) == ["hidden"]
    assert list(split.server._modules) == ["bottleneck", "head"]
    assert split.forward(torch.zeros(2, 12)).shape == (2, 3)


def test_the_same_seed_gives_the_same_weights_at_every_cut() -> None:
    torch.manual_seed(5)
    whole = build_model(f"{OWN}:tiny_mlp", num_classes=3)
    for cut in ("hidden", "bottleneck"):
        torch.manual_seed(5)
        split = build_split(f"{OWN}:tiny_mlp", cut, num_classes=3)
        parts = {**split.client.state_dict(), **split.server.state_dict()}
        assert parts.keys() == whole.state_dict().keys()
        for key, value in whole.state_dict().items():
            assert torch.equal(parts[key], value), (cut, key)
        x = torch.randn(4, 12)
        assert torch.equal(split.forward(x), whole(x))


def test_a_sequential_with_declared_cuts() -> None:
    split = build_split(f"{OWN}:tiny_cnn", num_classes=4)
    assert split.info.cuts == ("conv",) and split.cut == "conv"
    assert split.forward(torch.zeros(2, 1, 6, 6)).shape == (2, 4)
    with pytest.raises(UnknownChoiceError, match="'pool'"):
        build_split(f"{OWN}:tiny_cnn", "pool", num_classes=4)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("nosuchpackage.nets:tiny", "module 'nosuchpackage.nets' does not import"),
        (f"{OWN}:absent", "has no attribute 'absent'"),
        (f"{OWN}:NOT_CALLABLE", "not a callable"),
        (f"{OWN}:not_stages", "must return a list of (name, nn.Module) stages, got Linear"),
        (f"{OWN}:blobs", "stages, got an item ndarray"),  # a loader is no factory
        ("tests.own_model_example:", 'not of the form "package.module:name"'),
    ],
)
def test_a_factory_that_cannot_serve_is_one_spec_error(spec: str, says: str) -> None:
    with pytest.raises(SpecError) as caught:
        build_split(spec, num_classes=3)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_auto_picks_the_zoo_model_for_the_shape_or_says_it_has_none() -> None:
    assert resolve_model("auto", "digits", (1, 8, 8)) == "digits_cnn"
    assert resolve_model("auto", "/data/mine", (3, 32, 32)) == "cifar_cnn"
    assert resolve_model(f"{OWN}:tiny_mlp", "/data/mine", (12,)) == f"{OWN}:tiny_mlp"
    with pytest.raises(UnknownChoiceError, match="package.module:factory"):
        resolve_model("auto", "/data/mine", (12,))

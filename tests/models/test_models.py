"""Tests of the model zoo: every cut builds, splits are exact and deterministic, digits learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import (
    SplitModel,
    UnknownChoiceError,
    available_models,
    build_model,
    build_split,
    default_model,
    model_info,
    select_device,
)

ALL_CUTS = [(name, cut) for name in available_models() for cut in model_info(name).cuts]
SMALL_MODELS = [name for name in available_models() if name != "resnet18"]


def _batch(name: str, n: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *model_info(name).input_shape), generator=gen)


def _full_state(split: SplitModel) -> dict[str, torch.Tensor]:
    state = dict(split.client.state_dict())
    state.update(split.server.state_dict())
    return state


def test_registry_lists_the_required_models() -> None:
    assert set(available_models()) >= {
        "digits_mlp",
        "digits_cnn",
        "fmnist_cnn",
        "cifar_cnn",
        "resnet18",
    }
    for name in available_models():
        info = model_info(name)
        assert info.name == name
        assert info.default_cut in info.cuts
        assert info.description


def test_dataset_defaults() -> None:
    assert default_model("digits") == "digits_cnn"
    assert default_model("fashion_mnist") == "fmnist_cnn"
    assert default_model("cifar10") == "cifar_cnn"
    with pytest.raises(ValueError, match="fashion_mnist"):
        default_model("imagenet")


@pytest.mark.parametrize(("name", "cut"), ALL_CUTS)
def test_shapes_flow_client_to_server(name: str, cut: str) -> None:
    split = build_split(name, cut)
    assert split.cut == cut
    with torch.no_grad():
        logits = split.server(split.client(_batch(name)))
    assert logits.shape == (3, 10)
    assert logits.dtype == torch.float32


def test_num_classes_sets_the_output_width() -> None:
    split = build_split("digits_cnn", num_classes=7)
    with torch.no_grad():
        assert split.forward(_batch("digits_cnn")).shape == (3, 7)
    with pytest.raises(ValueError, match="num_classes"):
        build_split("digits_cnn", num_classes=0)


def test_default_cut_is_resolved() -> None:
    for name in available_models():
        assert build_split(name).cut == model_info(name).default_cut
        assert build_split(name, "default").cut == model_info(name).default_cut


@pytest.mark.parametrize("name", available_models())
def test_same_seed_gives_identical_weights(name: str) -> None:
    # One cut per model suffices: the cut-invariance test below covers the others.
    torch.manual_seed(11)
    first = build_split(name)
    torch.manual_seed(11)
    second = build_split(name)
    for part in ("client", "server"):
        a = getattr(first, part).state_dict()
        b = getattr(second, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_cut_does_not_change_weights_or_outputs(name: str) -> None:
    torch.manual_seed(5)
    whole = build_model(name)
    splits = []
    for cut in model_info(name).cuts:
        torch.manual_seed(5)
        splits.append(build_split(name, cut))
    x = _batch(name)
    with torch.no_grad():
        expected = whole(x)
        for split in splits:
            state = _full_state(split)
            assert state.keys() == whole.state_dict().keys()
            assert all(torch.equal(state[k], v) for k, v in whole.state_dict().items())
            assert torch.equal(split.server(split.client(x)), expected)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_split_backward_matches_unsplit_gradients(name: str) -> None:
    """Sending the cut-layer gradient back gives the client the gradient of the unsplit model."""
    torch.manual_seed(3)
    split = build_split(name)
    torch.manual_seed(3)
    whole = build_model(name)
    x = _batch(name, n=4)
    y = torch.tensor([0, 1, 2, 3])

    nn.functional.cross_entropy(whole(x), y).backward()

    smashed = split.client(x)
    received = smashed.detach().requires_grad_(True)
    nn.functional.cross_entropy(split.server(received), y).backward()
    assert received.grad is not None
    smashed.backward(received.grad)

    reference = dict(whole.named_parameters())
    for part in (split.client, split.server):
        for key, param in part.named_parameters():
            assert param.grad is not None, key
            torch.testing.assert_close(param.grad, reference[key].grad)


@pytest.mark.parametrize(("name", "cut"), ALL_CUTS)
def test_no_batchnorm_in_client_partitions(name: str, cut: str) -> None:
    split = build_split(name, cut)
    for part in (split.client, split.server):
        batchnorms = [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert not batchnorms


# Models of the gated accuracy study, whose devices hold most of the weights by design.
STUDY_MODELS = ("fmnist_mlp", "digits_cnn_fc")


@pytest.mark.parametrize("name", [n for n in SMALL_MODELS if n not in STUDY_MODELS])
def test_default_client_partitions_are_small(name: str) -> None:
    # The client-space GAPSL variant uploads the whole client gradient every round.
    assert 100 <= build_split(name).client_numel() <= 10_000


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError) as excinfo:
        build_split("vgg16")
    message = str(excinfo.value)
    assert "vgg16" in message
    for name in available_models():
        assert name in message
    with pytest.raises(KeyError):
        model_info("vgg16")


def test_unknown_cut_names_the_choices() -> None:
    with pytest.raises(ValueError) as excinfo:
        build_split("resnet18", "layer4")
    message = str(excinfo.value)
    assert "layer4" in message
    for cut in model_info("resnet18").cuts:
        assert repr(cut) in message
    assert isinstance(excinfo.value, UnknownChoiceError)


def test_digits_cnn_learns_sklearn_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1500], order[1500:]

    # One thread: the tensors are tiny, and on a busy 2-core machine extra threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        split = build_split("digits_cnn")
        params = list(split.client.parameters()) + list(split.server.parameters())
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        for _ in range(150):
            idx = train[torch.randint(len(train), (32,), generator=gen)]
            loss = nn.functional.cross_entropy(split.forward(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predicted = split.forward(images[test]).argmax(dim=1)
    finally:
        torch.set_num_threads(threads)
    accuracy = (predicted == labels[test]).float().mean().item()
    assert accuracy > 0.9, accuracy


@pytest.mark.skipif(
    torch.cuda.is_available()
    or bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    reason="an accelerator is present",
)
def test_select_device_auto_is_cpu_without_accelerators() -> None:
    assert select_device("auto") == torch.device("cpu")
    assert select_device() == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_select_device_rejects_missing_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(ValueError, match="CUDA"):
        select_device("cuda:1")


def test_select_device_prefers_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda"


def test_select_device_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="auto, cpu"):
        select_device("tpu")

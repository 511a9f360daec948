"""Datasets of one's own (edge_agent/owndata.py): folders of any input shape and class count,
loaders, where a device finds a folder, and fingerprints that cover the inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.data import DataError, labels_fingerprint, load_dataset
from edge_agent.owndata import own_dataset
from tests.own_model_example import blobs

OWN = "tests.own_model_example"


def _save(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A folder whose train.npz and test.npz both hold ``x`` and ``y``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", x=x, y=y)
    return folder


def test_a_folder_of_hwc_images_becomes_chw_with_classes_from_the_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 5, 7, 3), dtype=np.uint8)  # N x H x W x C
    y = np.arange(20) % 6
    ds = load_dataset(str(_save(tmp_path / "rgb", x, y)))
    assert ds.input_shape == (3, 5, 7) and ds.num_classes == 6 and ds.scale == 255.0
    assert np.array_equal(ds.x_train, x.transpose(0, 3, 1, 2))
    out = ds.normalize(ds.x_train)
    assert out.dtype == np.float32 and out.shape == (20, 3, 5, 7)
    assert np.allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert np.allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_float_features_are_standardised_per_feature() -> None:
    ds = load_dataset(f"{OWN}:blobs")
    assert ds.input_shape == (12,) and ds.num_classes == 3 and ds.x_train.dtype == np.float32
    out = ds.normalize(ds.x_train)
    assert np.allclose(out.mean(axis=0), 0, atol=1e-5) and np.allclose(
        out.std(axis=0), 1, atol=1e-4
    )
    assert np.array_equal(ds.normalize(ds.x_train[3]), out[3])  # one sample alone, as a batch
    with pytest.raises(ValueError, match="expected inputs shaped N x 12"):
        ds.normalize(np.zeros((2, 5), np.float32))


def test_the_fingerprint_of_one_s_own_data_covers_the_inputs() -> None:
    x, y, xt, yt = blobs(None)
    a = own_dataset("mine", (x, y, xt, yt), "mine")
    b = own_dataset("mine", (x + 1e-3, y, xt, yt), "mine")  # same labels, other inputs
    assert a.fingerprint == own_dataset("mine", (x, y, xt, yt), "mine").fingerprint
    assert a.fingerprint != b.fingerprint
    assert load_dataset(f"{OWN}:blobs").fingerprint == a.fingerprint  # the name does not count


def test_a_device_finds_the_folder_under_its_data_dir(tmp_path: Path) -> None:
    x = np.zeros((4, 3), np.uint8)
    _save(tmp_path / "device-data" / "my-set", x, np.array([0, 1, 0, 1]))
    ds = load_dataset("/orchestrator/only/my-set", tmp_path / "device-data")
    assert ds.input_shape == (3,) and ds.num_classes == 2


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        ((np.zeros((4, 3)), np.array([0, 1, 0, 1]), np.zeros((2, 4)), np.array([0, 1])), "differ"),
        (
            (np.zeros((4, 3)), np.array([0, 1, 0]), np.zeros((2, 3)), np.array([0, 1])),
            "expected 4 integer labels",
        ),
        (
            (np.zeros((4, 3)), np.array([0, -1, 0, 1]), np.zeros((2, 3)), np.array([0, 1])),
            "0 or more",
        ),
        (
            (np.zeros((4, 3)), np.zeros(4, np.int64), np.zeros((2, 3)), np.zeros(2, np.int64)),
            "one class",
        ),
        (
            (np.full((4, 3), np.nan), np.array([0, 1, 0, 1]), np.zeros((2, 3)), np.array([0, 1])),
            "NaN",
        ),
        ((np.zeros(4), np.array([0, 1, 0, 1]), np.zeros(2), np.array([0, 1])), "N samples"),
        (
            (
                np.zeros((4, 3), bool),
                np.array([0, 1, 0, 1]),
                np.zeros((2, 3), bool),
                np.array([0, 1]),
            ),
            "dtype bool",
        ),
    ],
)
def test_arrays_that_do_not_fit_are_one_data_error(
    arrays: tuple[np.ndarray, ...], says: str
) -> None:
    with pytest.raises(DataError, match=says):
        own_dataset("mine", arrays, "mine")


def test_a_folder_with_one_split_only_is_incomplete(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    np.savez(tmp_path / "half" / "train.npz", x=np.zeros((2, 3)), y=np.array([0, 1]))
    with pytest.raises(DataError, match="incomplete dataset, missing test.npz"):
        load_dataset(str(tmp_path / "half"))


def test_a_loader_that_fails_is_one_data_error_naming_it() -> None:
    with pytest.raises(DataError, match=f"{OWN}:three_arrays must return"):
        load_dataset(f"{OWN}:three_arrays")
    with pytest.raises(DataError, match="does not import"):
        load_dataset("no_such_lab_module:load")


def test_a_device_whose_loader_returns_other_inputs_refuses_the_job() -> None:
    from edge_agent.config import AgentConfig
    from edge_agent.errors import JobFailed
    from edge_agent.jobload import build_trainer
    from edge_agent.jobspec import JobSpec

    ds = load_dataset(f"{OWN}:blobs")
    fields = {"model": f"{OWN}:tiny_mlp", "cut": "hidden", "dataset": f"{OWN}:blobs"}
    fields |= {"num_classes": 3, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}
    fields |= {"seed": 0, "rank": 0}
    cfg = AgentConfig(url="ws://127.0.0.1:9", device_id="a", token="t", device="cpu")
    shard = np.arange(8)
    # the labels alone agree: the fingerprint of the labels is not the dataset's
    other = JobSpec(**fields, dataset_fingerprint=labels_fingerprint(ds.y_train))  # type: ignore[arg-type]
    with pytest.raises(JobFailed, match="differs from the orchestrator's"):
        build_trainer(other, shard, {}, cfg)
    same = JobSpec(**fields, dataset_fingerprint=ds.fingerprint)  # type: ignore[arg-type]
    from edge_agent.weights import state_to_numpy
    from models import build_split

    weights = state_to_numpy(build_split(f"{OWN}:tiny_mlp", "hidden", 3).client)
    assert build_trainer(same, shard, weights, cfg).shard_size == 8

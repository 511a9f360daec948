"""The job of a run: the data, the shards, the identical initial weights, the server partition
and its optimizer, and the job frame each device receives. Built once, before any device joins."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_agent.data import Dataset, load_dataset, partition
from edge_agent.jobspec import JobSpec
from edge_agent.protocol import encode
from edge_agent.weights import state_to_numpy
from models import build_split, resolve_model, select_device
from orchestrator.algorithms.dispatch import rule_class, rule_for
from orchestrator.config.manifest import Manifest


@dataclass
class Job:
    """What the run trains, built once before any device is admitted."""

    dataset: Dataset
    model: str
    cut: str
    shards: list[np.ndarray]
    client_init: dict[str, np.ndarray]
    server: torch.nn.Module
    client_template: torch.nn.Module
    server_device: torch.device
    x_test: torch.Tensor
    y_test: torch.Tensor
    act_bytes_per_sample: int = 0  # cut-layer activation size of one sample, float32
    optimizer: Any = None  # the server partition's SGD, built here: its first build imports
    # a good deal of torch, which must not stall the event loop


_BUILD_LOCK = threading.Lock()


def prepare_job(m: Manifest, dataset: Dataset | None = None) -> Job:
    """Load data (unless the preflights already did: ``dataset``), partition it, and build the
    identical initial weights every device starts from."""
    t = m.training
    if dataset is None:
        dataset = load_dataset(m.dataset_spec(), m.data_dir(), download=m.data.download)
    ds = dataset
    model = resolve_model(t.model, t.dataset, ds.input_shape)
    shards = partition(
        ds.y_train,
        len(m.devices),
        m.data.partition,
        seed=t.seed,
        alpha=m.data.alpha,
        shards_per_device=m.data.shards_per_device,
    )
    if rule_class(t.algorithm).pooled:  # the ceiling: one learner holding everyone's data
        shards = [np.sort(np.concatenate(shards))]
    # torch's generator is process-wide: engines preparing jobs in threads at once must not
    # take each other's draws, so seeding and building happen under a lock on a forked RNG.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        split = build_split(model, t.cut, num_classes=ds.num_classes)
    device = select_device(m.server.device)
    x_test, y_test = ds.x_test, ds.y_test
    if 0 < m.data.test_limit < len(y_test):
        keep = np.sort(np.random.default_rng(t.seed).permutation(len(y_test))[: m.data.test_limit])
        x_test, y_test = x_test[keep], y_test[keep]
    with torch.no_grad():
        probe_x = torch.from_numpy(ds.normalize(ds.x_train[:1]))
        act_bytes = int(split.client(probe_x).numel()) * 4
    server = split.server.to(device)
    optimizer = torch.optim.SGD(
        server.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
    )
    return Job(
        optimizer=optimizer,
        act_bytes_per_sample=act_bytes,
        dataset=ds,
        model=model,
        cut=split.cut,
        shards=shards,
        client_init=state_to_numpy(split.client),
        server=server,
        client_template=split.client.to(device),
        server_device=device,
        x_test=torch.from_numpy(ds.normalize(x_test)).to(device),
        y_test=torch.from_numpy(y_test.astype(np.int64)).to(device),
    )


def build_job_spec(m: Manifest, job: Job, rank: int, resume_round: int = 0) -> JobSpec:
    """What device ``rank`` trains: the spec behind the ``job`` field of its job message."""
    t = m.training
    role = rule_for(m).device_role()
    return JobSpec(
        model=job.model,
        cut=job.cut,
        dataset=m.dataset_spec(),
        num_classes=job.dataset.num_classes,
        dataset_fingerprint=job.dataset.fingerprint,
        algorithm=t.algorithm,
        rounds=t.rounds,
        batch_size=t.batch_size,
        lr=t.lr * t.client_lr_scale,
        lr_decay=t.lr_decay,
        client_anchor=t.client_anchor,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        seed=t.seed,
        rank=rank,
        # what the rule asks of the device's trainer
        gapsl_space=role.space,
        gda_mode=role.gda_mode,
        gapsl_leader=role.leader,
        track_beta=role.track_beta,
        compression=t.compression,
        resume_round=resume_round,
    )


def job_spec(m: Manifest, job: Job, rank: int) -> dict[str, Any]:
    """The job description a device receives (the ``job`` field of the protocol's job message)."""
    return build_job_spec(m, job, rank).to_wire()


def job_message(
    m: Manifest,
    job: Job,
    run_id: str,
    rank: int,
    resume_round: int = 0,
    weights: dict[str, np.ndarray] | None = None,
) -> bytes:
    """The job frame of one device; a resumed run sends the round and that device's weights."""
    return encode(
        "job",
        run_id=run_id,
        job=build_job_spec(m, job, rank, resume_round).to_wire(),
        shard=job.shards[rank],
        weights=job.client_init if weights is None else weights,
    )

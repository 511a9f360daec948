"""What every training rule shares: the :class:`Rule` interface the round loop dispatches
through, the result of a server step, and PSL's backward that every server rule starts from.

Rules are tensor code with no I/O: the distributed orchestrator and the in-process engine call the
same objects, and a rule says what it needs of the devices as data, never by sending anything.

PSL (parallel split learning): one shared server partition. Each device i uploads activations
``a_i`` of a batch of ``b_i`` samples; the server minimises the batch-weighted mean loss
``L = sum_i (b_i / B) * l_i`` with one optimizer step, and returns to device i the gradient of
*its own* mean loss, ``dl_i/da_i``, so a device's step size does not shrink with fleet size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn import Module
from torch.optim import Optimizer

from orchestrator.config.manifest import Manifest

Weights = dict[str, np.ndarray]  # a client partition as the devices send it
Tensors = Sequence[torch.Tensor]  # one tensor per device, in the round's device order
POOLED_ID = "pooled"  # the one learner of a pooled rule (the ceiling), as the records name it


@dataclass
class ServerStepResult:
    grads: list[torch.Tensor]  # dl_i/da_i, one per device, shaped like its activations
    losses: list[float]  # l_i, device i's mean loss on its batch
    loss: float  # L, the batch-weighted mean
    diag: dict[str, object] = field(default_factory=dict)  # leaders, cosines, ... for the records


def psl_backward(
    server: Module, optimizer: Optimizer, activations: Tensors, labels: Tensors
) -> ServerStepResult:
    """PSL's backward without the optimizer step: fills the server's ``.grad`` with the
    gradient of L and returns each device's dl_i/da_i. Every server rule starts from this, so
    each reproduces PSL bit for bit when its own term is switched off."""
    if not activations or len(activations) != len(labels):
        raise ValueError("need one label tensor per activation tensor, and at least one device")
    leaves = [a.detach().requires_grad_(True) for a in activations]
    sizes = [len(y) for y in labels]
    total = sum(sizes)
    server.train()
    optimizer.zero_grad(set_to_none=True)
    # One forward over the concatenated batch: the server partition has no cross-sample
    # layers (GroupNorm, not BatchNorm), so this equals per-device forwards and is faster.
    logits = server(torch.cat(leaves))
    per_sample = F.cross_entropy(logits, torch.cat(list(labels)), reduction="none")
    loss = per_sample.mean()  # == sum_i (b_i / B) * l_i
    loss.backward()
    losses, grads, start = [], [], 0
    for leaf, b in zip(leaves, sizes):
        losses.append(float(per_sample[start : start + b].detach().mean()))
        assert leaf.grad is not None
        grads.append(leaf.grad * (total / b))  # d(l_i)/d(a_i) = (B / b_i) * dL/da_i
        start += b
    return ServerStepResult(grads=grads, losses=losses, loss=float(loss.detach()))


@dataclass(frozen=True)
class ServerPart:
    """The server partition a rule steps, with its optimizer."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class DeviceRole:
    """What a rule asks of every device's trainer; it travels in the job (``gapsl_space``,
    ``gda_mode``, ``gapsl_leader``). The defaults are plain PSL: back-propagate and step."""

    space: str = ""  # "client": keep the client gradient, upload it, and wait for the leader
    gda_mode: str = ""  # how a device blends its gradient with the leader it receives
    leader: str = "gradient"  # what the leader is made of: the devices' gradients or updates
    track_beta: float = 0.0  # tracking GDA: the EMA coefficient of each device's own reference


@dataclass(frozen=True)
class Alignment:
    """A leader to send down to the devices that uploaded their client gradients."""

    leader: np.ndarray
    mode: str
    lam: float
    diag: dict[str, object]


class Rule:
    """One training rule. The round loop calls these hooks and never tests a rule's name.

    A rule owns its manifest section's settings and its state across rounds (``state_dict`` goes
    into the run's checkpoint). Per round the loop calls :meth:`server_step`; when
    :attr:`holds_client_grads` is set the devices upload their client gradients and the loop
    sends down what :meth:`align` returns; when :meth:`averages` says so after a round, the loop
    collects the client partitions and sets every device to :meth:`average` of them.
    """

    name: ClassVar[str] = ""
    pooled: ClassVar[bool] = False  # one learner that takes everyone's batch (the ceiling)
    simulate_only: ClassVar[bool] = False  # runs only in the in-process engine
    # needs every device at one batch size (a position-wise rule): scheduler.policy "uniform"
    uniform_batches: ClassVar[bool] = False
    holds_client_grads: bool = False

    def __init__(self, m: Manifest) -> None:
        self.m = m

    def device_role(self) -> DeviceRole:
        return DeviceRole()

    def setup(self, job: Any, ids: Sequence[str]) -> None:
        """Once, before the first round: the run's job (data, shards) and its device ids, in
        shard order (``ids[k]`` holds ``job.shards[k]``)."""

    def begin_round(self, r: int, ids: Sequence[str]) -> None:
        """Round r's participants, in the order of the activations the server step receives."""

    def server_step(self, part: ServerPart, acts: Tensors, labels: Tensors) -> ServerStepResult:
        """One server update on the devices' activations; returns their activation gradients."""
        raise NotImplementedError

    def align(self, client_grads: Sequence[torch.Tensor], sizes: Sequence[int]) -> Alignment:
        """The leader for the devices' uploaded client gradients (rules that hold them)."""
        raise NotImplementedError(f"{type(self).__name__} does not hold client gradients")

    def averages(self, r: int) -> bool:
        """Whether the client partitions are collected and averaged after round ``r``."""
        return False

    def average(self, states: Sequence[Weights], weights: Sequence[float]) -> Weights:
        raise NotImplementedError(f"{type(self).__name__} does not average client partitions")

    def state_dict(self) -> dict[str, Any]:
        """The rule's state across rounds, as tensors and plain values (for the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Put a :meth:`state_dict` back; tensors go to the server's ``device``."""

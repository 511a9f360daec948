"""PSL, parallel split learning: one shared server partition, client partitions never averaged.

Each device i uploads activations ``a_i`` of a batch of ``b_i`` samples; the server minimises the
batch-weighted mean loss ``L = sum_i (b_i / B) * l_i`` with one optimizer step, and returns to
device i the gradient of *its own* mean loss, ``dl_i/da_i``, so a device's step size does not
shrink with fleet size. What travels: activations and labels up, activation gradients down."""

from __future__ import annotations

from torch.nn import Module
from torch.optim import Optimizer

from orchestrator.algorithms.base import Rule, ServerPart, ServerStepResult, Tensors, psl_backward


def psl_server_step(
    server: Module, optimizer: Optimizer, activations: Tensors, labels: Tensors
) -> ServerStepResult:
    """One PSL server update on the devices' activations; returns their activation gradients."""
    result = psl_backward(server, optimizer, activations, labels)
    optimizer.step()
    return result


class Psl(Rule):
    name = "psl"

    def server_step(self, part: ServerPart, acts: Tensors, labels: Tensors) -> ServerStepResult:
        return psl_server_step(part.module, part.optimizer, acts, labels)

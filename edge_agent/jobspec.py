"""The job spec: the typed counterpart of the ``job`` map in the protocol's ``job`` message.

The orchestrator builds a :class:`JobSpec` and sends :meth:`JobSpec.to_wire`; the agent reads the
map back with :meth:`JobSpec.from_wire`, which refuses an unknown key, a missing key and a value
of the wrong type with a :class:`~edge_agent.errors.JobSpecError` naming the key (docs/protocol.md,
``job``). Pure: no torch, no asyncio, so the orchestrator and the protocol tests import it freely.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .compress import MODES as COMPRESSIONS
from .errors import JobSpecError
from .protocol import FIELD_KINDS
from .schedule import LR_DECAYS

__all__ = ["COMPRESSIONS", "LEADER_KINDS", "LR_DECAYS", "JobSpec"]

# GAPSL's client space compares either raw gradients or the momentum steps built from them.
LEADER_KINDS = ("gradient", "update")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What one device trains, field for field the wire map (in its key order).

    The defaults serve specs built by hand in one process (tests, the in-process engine's tools);
    on the wire every key but ``resume_round`` must be present.
    """

    model: str  # a model of models/ or "package.module:factory", "auto" already resolved
    cut: str  # the named cut point: the client partition is the model up to it
    # digits | fashion_mnist | cifar10, loaded from the device's data dir; a folder's path
    # (resolved on the orchestrator); or "package.module:loader", imported by the device
    dataset: str = ""
    num_classes: int
    dataset_fingerprint: str = ""  # Dataset.fingerprint: the training labels (and own inputs)
    algorithm: str = ""  # training.algorithm, for information
    rounds: int = 1  # the planned rounds: only the lr schedule needs them
    batch_size: int = 0  # training.batch_size, for information: each round says its own
    lr: float  # training.lr * training.client_lr_scale
    lr_decay: str = "none"
    client_anchor: float = 0.0  # L2 pull towards the initial weights; 0 = none
    momentum: float
    weight_decay: float
    seed: int
    rank: int  # the device's position in the manifest's device list
    gapsl_space: str = ""  # "" unless the rule keeps client gradients ("client")
    gda_mode: str = ""  # exact | first_order | pull | tracking | anchor, or "" for plain PSL
    gapsl_leader: str = "gradient"
    track_beta: float = 0.0  # tracking GDA: the EMA coefficient of the device's own reference
    compression: str = "none"  # the codec of activations and their gradients
    resume_round: int = 0  # > 0 only in a resumed run: the round it resumes from

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # f.type is the annotation's text ("str", "int", "float"), a protocol field kind.
            if not FIELD_KINDS[str(f.type)](value):
                raise JobSpecError(f.name, f"expected {f.type}, got {_describe(value)}")
            if f.type == "float" and not isinstance(value, float):  # msgpack may carry 1 for 1.0
                object.__setattr__(self, f.name, float(value))
        if not 0.0 <= self.track_beta < 1.0:
            raise JobSpecError("track_beta", f"must be in [0, 1), got {self.track_beta!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                value = getattr(self, name)
                raise JobSpecError(name, f"{value!r} is not one of {', '.join(choices)}")

    @classmethod
    def from_wire(cls, job: Mapping[str, Any]) -> JobSpec:
        """The spec of a received ``job`` map: every key but ``resume_round`` present, no other.

        Raises :class:`~edge_agent.errors.JobSpecError` naming the first offending key.
        """
        return cls._parse(job, _WIRE_REQUIRED)

    @classmethod
    def from_partial(cls, job: Mapping[str, Any]) -> JobSpec:
        """A spec from a map written by hand, which may leave out any key that has a default;
        unknown keys and wrongly typed values are still a JobSpecError."""
        return cls._parse(job, _NO_DEFAULT)

    @classmethod
    def _parse(cls, job: Mapping[str, Any], required: tuple[str, ...]) -> JobSpec:
        for key in job:
            if key not in _NAMES:
                close = difflib.get_close_matches(str(key), _NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise JobSpecError(str(key)[:40], f"unknown key{hint}")
        for name in required:
            if name not in job:
                raise JobSpecError(name, "missing")
        return cls(**job)

    def to_wire(self) -> dict[str, Any]:
        """The ``job`` map of the protocol's ``job`` message, keys in declaration order."""
        wire = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.resume_round:  # only a resumed run sends it
            del wire["resume_round"]
        return wire


def _describe(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # nan, inf: a float, but not a number a job can use
    return type(value).__name__


_NAMES = tuple(f.name for f in fields(JobSpec))
_WIRE_REQUIRED = tuple(n for n in _NAMES if n != "resume_round")
_NO_DEFAULT = tuple(f.name for f in fields(JobSpec) if f.default is MISSING)
# Values the trainer cannot work with fail the job here, where the key is known.
_CHOICES: dict[str, tuple[str, ...]] = {
    "lr_decay": LR_DECAYS,
    "gapsl_leader": LEADER_KINDS,
    "compression": COMPRESSIONS,
}

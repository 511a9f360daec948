"""``edge_agent.jobspec``: the job map round-trips through JobSpec and the wire, and an unknown,
missing or mistyped key is refused with the key named; the orchestrator's map is a JobSpec's."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.errors import AgentError, JobSpecError
from edge_agent.jobspec import COMPRESSIONS, LEADER_KINDS, LR_DECAYS, JobSpec
from edge_agent.protocol import ORCHESTRATOR_TYPES, decode, encode
from orchestrator.config.manifest import parse_manifest
from orchestrator.training.job import build_job_spec, job_spec

from .protocol_helpers import JOB_MAP as WIRE
from .protocol_helpers import PROPERTY, heavy_imports_of

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f.name: f.type for f in dataclasses.fields(JobSpec)}

_ints = st.integers(-(2**63), 2**63 - 1)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_BY_KIND = {
    "str": st.text(max_size=20),
    "int": _ints,
    "float": _floats | st.integers(-(2**53), 2**53),  # ints a float holds exactly
}
_CHOSEN = {"lr_decay": LR_DECAYS, "gapsl_leader": LEADER_KINDS, "compression": COMPRESSIONS}
_RANGED = {"track_beta": st.floats(0.0, 1.0, exclude_max=True)}  # an EMA coefficient


@st.composite
def wire_maps(draw: st.DrawFn) -> dict[str, Any]:
    """Job maps as a peer may send them: any value of each key's kind (ints for floats too)."""
    job = {
        name: draw(
            st.sampled_from(_CHOSEN[name])
            if name in _CHOSEN
            else _RANGED.get(name, _BY_KIND[str(kind)])
        )
        for name, kind in FIELDS.items()
    }
    if draw(st.booleans()):
        del job["resume_round"]
    return job


@PROPERTY
@given(job=wire_maps())
def test_a_job_map_round_trips_through_the_spec_and_the_wire(job: dict[str, Any]) -> None:
    spec = JobSpec.from_wire(job)
    assert all(getattr(spec, k) == v for k, v in job.items())
    assert all(type(getattr(spec, k)) is float for k, t in FIELDS.items() if t == "float")
    assert JobSpec.from_wire(spec.to_wire()) == spec
    frame = encode("job", run_id="r", job=spec.to_wire(), shard=np.zeros(0, np.int64), weights={})
    assert JobSpec.from_wire(decode(frame, ORCHESTRATOR_TYPES)["job"]) == spec
    wire = spec.to_wire()
    assert list(wire) == [k for k in FIELDS if k != "resume_round" or spec.resume_round]


def test_resume_round_travels_only_in_a_resumed_run() -> None:
    spec = JobSpec.from_wire(WIRE)
    assert spec.resume_round == 0 and spec.to_wire() == WIRE
    resumed = dataclasses.replace(spec, resume_round=40)
    assert resumed.to_wire() == {**WIRE, "resume_round": 40}
    assert JobSpec.from_wire(resumed.to_wire()) == resumed


@pytest.mark.parametrize(
    ("key", "hint"), [("lrr", "did you mean 'lr'?"), ("resume", "resume_round"), ("zz", "")]
)
def test_an_unknown_key_is_refused_by_name(key: str, hint: str) -> None:
    with pytest.raises(JobSpecError, match=rf"^job\.{key}: unknown key") as err:
        JobSpec.from_wire({**WIRE, key: 1})
    assert err.value.key == key and hint in str(err.value)
    with pytest.raises(JobSpecError, match=rf"job\.{key}: unknown key"):
        JobSpec.from_partial({"model": "m", key: 1})


@pytest.mark.parametrize("key", sorted(WIRE))
def test_every_key_but_resume_round_is_required_on_the_wire(key: str) -> None:
    with pytest.raises(JobSpecError, match=rf"^job\.{key}: missing$") as err:
        JobSpec.from_wire({k: v for k, v in WIRE.items() if k != key})
    assert err.value.key == key


def _wrong_values(kind: str) -> list[Any]:
    return {
        "str": [1, None, b"digits", ["digits"]],
        "int": ["1", 1.0, True, None],
        "float": ["0.05", True, math.nan, math.inf, None],
    }[kind]


@pytest.mark.parametrize(
    ("key", "value"),
    [(k, v) for k, kind in FIELDS.items() for v in _wrong_values(str(kind))],
    ids=lambda x: repr(x),
)
def test_a_mistyped_value_is_refused_by_name(key: str, value: Any) -> None:
    with pytest.raises(JobSpecError, match=rf"^job\.{key}: expected {FIELDS[key]}, got ") as err:
        JobSpec.from_wire({**WIRE, key: value})
    assert err.value.key == key


@pytest.mark.parametrize("key", sorted(_CHOSEN))
def test_a_value_the_trainer_cannot_use_is_refused_by_name(key: str) -> None:
    with pytest.raises(JobSpecError, match=rf"^job\.{key}: 'bogus' is not one of "):
        JobSpec.from_wire({**WIRE, key: "bogus"})


@pytest.mark.parametrize("beta", [-0.1, 1.0, 2.5])
def test_a_tracking_coefficient_outside_its_range_is_refused_by_name(beta: float) -> None:
    with pytest.raises(JobSpecError, match=r"^job\.track_beta: must be in \[0, 1\)"):
        JobSpec.from_wire({**WIRE, "track_beta": beta})


def test_a_hand_written_map_may_leave_out_what_has_a_default() -> None:
    need = {"model": "m", "cut": "c", "num_classes": 10, "lr": 0.1, "momentum": 0.9,
            "weight_decay": 0, "seed": 1, "rank": 0}  # fmt: skip
    spec = JobSpec.from_partial(need)
    assert (spec.lr_decay, spec.gapsl_leader, spec.compression) == ("none", "gradient", "none")
    assert spec.weight_decay == 0.0 and type(spec.weight_decay) is float
    with pytest.raises(JobSpecError, match=r"^job\.rank: missing$"):
        JobSpec.from_partial({k: v for k, v in need.items() if k != "rank"})
    with pytest.raises(JobSpecError, match=r"job\.seed: expected int"):
        JobSpec.from_partial({**need, "seed": "1"})


def test_job_spec_errors_are_agent_errors_and_value_errors() -> None:
    with pytest.raises(JobSpecError) as err:
        JobSpec.from_wire({})
    assert isinstance(err.value, AgentError) and isinstance(err.value, ValueError)


def test_the_orchestrators_job_map_is_a_job_spec() -> None:
    m = parse_manifest('[testbed]\nlisten = "127.0.0.1:0"\n[[devices]]\nid = "a"\ntoken = "t"\n')
    # job_spec reads only these of a prepared job; preparing one would cost seconds
    dataset = SimpleNamespace(num_classes=10, fingerprint="0123456789abcdef")
    job: Any = SimpleNamespace(model="digits_mlp", cut="default", dataset=dataset)
    spec = build_job_spec(m, job, 0)
    assert job_spec(m, job, 0) == spec.to_wire()
    assert JobSpec.from_wire(job_spec(m, job, 0)) == spec
    assert build_job_spec(m, job, 0, resume_round=7).to_wire()["resume_round"] == 7


def test_the_pure_modules_import_no_asyncio_websockets_or_torch() -> None:
    modules = (
        "edge_agent.jobspec",
        "edge_agent.scanner",
        "edge_agent.errors",
        "edge_agent.schedule",
    )
    pulled = heavy_imports_of(*modules)
    assert pulled == "", f"importing {modules} pulled in: {pulled}"

"""latency_balanced's small batches: the floor and the step scaling the planner asks for."""

from __future__ import annotations

import pytest

from orchestrator.config.manifest import local_device_toml, parse_manifest
from orchestrator.errors import ManifestError
from orchestrator.training.latency import DeviceProfile
from orchestrator.training.scheduler import Planner

TEXT = "[training]\nbatch_size = 32\n" + "".join(
    local_device_toml(i, f"t-{i}") for i in ("fast", "slow")
)


def _planner(*sets: str) -> Planner:
    m = parse_manifest(TEXT, overrides=["scheduler.policy=latency_balanced", *sets])
    p = Planner(m, pooled=False, wire_ratio=1.0)
    p.act_bytes_per_sample = 4096.0
    p.profiles = {
        "fast": DeviceProfile(fwd_ms_per_sample=0.1, bwd_ms_per_sample=0.1, rtt_ms=1.0),
        # a link so slow that balancing pins it to the floor
        "slow": DeviceProfile(
            fwd_ms_per_sample=0.1, bwd_ms_per_sample=0.1, rtt_ms=80.0, uplink_mbps=1.0
        ),
    }
    return p


def test_linear_scaling_scales_only_devices_below_the_batch() -> None:
    p = _planner()
    _, batch, _ = p.plan(2, ["fast", "slow"])
    assert batch == {"fast": 56, "slow": 8}  # the floor: a quarter of 32
    assert p.step_scales(batch) == {"slow": 8 / 32}
    assert p.step_scales({"fast": 32, "slow": 32}) == {}  # uniform batches: untouched


def test_none_keeps_the_full_step_and_the_floor_follows_its_key() -> None:
    p = _planner("scheduler.step_scaling=none", "scheduler.min_batch_fraction=0.5")
    _, batch, _ = p.plan(2, ["fast", "slow"])
    assert batch == {"fast": 48, "slow": 16}
    assert p.step_scales(batch) == {}


@pytest.mark.parametrize(
    "bad",
    [
        "scheduler.min_batch_fraction=0",
        "scheduler.min_batch_fraction=1.5",
        "scheduler.step_scaling=sqrt",
        "scheduler.top_up=sometimes",
    ],  # fmt: skip
)
def test_bad_values_name_the_key(bad: str) -> None:
    with pytest.raises(ManifestError, match=bad.split("=")[0].split(".")[1]):
        parse_manifest(TEXT, overrides=[bad])


def test_epsl_with_balanced_batches_is_refused_naming_the_key() -> None:
    """EPSL averages position j of every device's batch, so it needs equal batches: refused by
    the preflights ``check`` and ``run`` share instead of failing at the first server step."""
    from orchestrator.preflight import check_schedule

    sets = ["training.algorithm=epsl", "scheduler.policy=latency_balanced"]
    with pytest.raises(ManifestError, match=r"\[scheduler\]\.policy") as err:
        check_schedule(parse_manifest(TEXT, overrides=sets))
    assert "epsl" in str(err.value) and "\n" not in str(err.value)
    check_schedule(parse_manifest(TEXT, overrides=["training.algorithm=epsl"]))  # uniform: fine
    check_schedule(parse_manifest(TEXT, overrides=sets[1:]))  # PSL takes any batches

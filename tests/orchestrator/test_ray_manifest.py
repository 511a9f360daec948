"""``[ray]`` and ``[devices.ray]``: defaults, errors naming the key, and the one-line failures
of ``run``/``check`` before anything starts (no Ray, no cluster, an unreachable listen). Pure
or nearly: no cluster is started here (tests/test_ray_fleet.py starts one)."""

from __future__ import annotations

import builtins
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.errors import ManifestError
from orchestrator.fleet import rayfleet

BASE = """
[testbed]
listen = "127.0.0.1:0"
[ray]
address = "10.0.0.1:6379"
num_cpus = 2
[[devices]]
id = "placed"
token = "t1"
launch = "ray"
[devices.ray]
num_gpus = 1
[[devices]]
id = "local"
token = "t2"
launch = "local"
"""


def _error(text: str, *overrides: str) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, overrides=overrides)
    return str(info.value)


def test_device_keys_left_out_take_the_ray_sections_and_round_trip() -> None:
    m = parse_manifest(BASE)
    placed = m.device("placed").ray
    assert (placed.num_cpus, placed.num_gpus, placed.memory_mb, placed.node_ip) == (2, 1, 0, "")
    assert m.ray.address == "10.0.0.1:6379" and m.ray.dial_host == ""
    text = manifest_to_toml(m)
    assert text.count("[devices.ray]") == 1  # only the Ray device has one
    assert parse_manifest(text) == m
    overridden = parse_manifest(BASE, overrides=["devices.placed.ray.memory_mb=512"])
    assert overridden.device("placed").ray.memory_mb == 512


def test_defaults() -> None:
    m = parse_manifest('[[devices]]\nid = "a"\ntoken = "t"\nlaunch = "ray"\n')
    assert m.ray.address == "auto"
    assert (m.ray.num_cpus, m.ray.num_gpus, m.ray.memory_mb) == (1.0, 0.0, 0)
    assert m.device("a").ray == type(m.device("a").ray)()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("num_gpus = 1", "num_gpu = 1"), '[devices.placed.ray].num_gpu: unknown key (did you mean "num_gpus"?)'),
        (('"10.0.0.1:6379"', '"head"'), "[ray].address: must be"),
        (("num_cpus = 2", "num_cpus = -1"), "[ray].num_cpus: must be >= 0"),
        (("num_cpus = 2", "num_cpu = 2"), "[ray].num_cpu: unknown key"),
        (('launch = "local"', 'launch = "local"\n[devices.ray]\nnum_cpus = 1'), '[devices.local].ray: set, but launch is not "ray"'),
    ],
)  # fmt: skip
def test_errors_name_the_key(edit: tuple[str, str], expected: str) -> None:
    assert expected in _error(BASE.replace(*edit))


@pytest.mark.parametrize("address", ["auto", "local", "head:6379", "ray://head:10001"])
def test_addresses(address: str) -> None:
    assert parse_manifest(BASE, overrides=[f'ray.address="{address}"']).ray.address == address


def test_tls_needs_the_ca_for_ray_placed_agents() -> None:
    text = BASE.replace('launch = "local"', 'launch = "remote"')
    tls = ['testbed.tls_cert="c.pem"', 'testbed.tls_key="k.pem"']
    assert "[testbed].tls_ca: missing" in _error(text, *tls)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def test_run_without_a_cluster_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BASE.replace("10.0.0.1:6379", f"127.0.0.1:{_closed_port()}"))
    started = time.monotonic()
    code = main(["run", str(path), "--no-dashboard", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "[ray].address: no Ray cluster at 127.0.0.1:" in err
    assert time.monotonic() - started < 15  # the TCP probe, not Ray's own retries
    assert not (tmp_path / "run").exists()  # nothing started


def test_without_ray_check_and_run_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    path = _write(tmp_path, BASE)
    for argv in (["check", str(path)], ["run", str(path), "--no-dashboard"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(
            '[devices.placed].launch: "ray" needs Ray on this machine: pip install "gapsl-testbed[ray]"'
        ), err


def _fake_ray(*ips: str) -> Any:
    nodes = [{"NodeManagerAddress": ip, "Alive": True} for ip in ips]
    util = SimpleNamespace(get_node_ip_address=lambda: "192.0.2.7")
    return SimpleNamespace(nodes=lambda: nodes, util=util)


def test_a_loopback_listen_is_refused_when_the_cluster_has_other_hosts() -> None:
    m = parse_manifest(BASE)
    rayfleet.check_listen(m, _fake_ray("127.0.0.1"))  # every node on this machine: fine
    with pytest.raises(ManifestError) as info:
        rayfleet.check_listen(m, _fake_ray("127.0.0.1", "198.51.100.9"))
    assert "[testbed].listen: is 127.0.0.1:0, which the Ray nodes on 198.51.100.9" in str(
        info.value
    )
    wide = parse_manifest(BASE, overrides=['testbed.listen="0.0.0.0:8765"'])
    rayfleet.check_listen(wide, _fake_ray("198.51.100.9"))


def test_the_host_placed_agents_dial() -> None:
    ray = _fake_ray()
    assert rayfleet.dial_host(parse_manifest(BASE), ray) == "127.0.0.1"
    wide = ['testbed.listen="0.0.0.0:8765"']
    assert rayfleet.dial_host(parse_manifest(BASE, overrides=wide), ray) == "192.0.2.7"
    named = [*wide, 'ray.dial_host="lab-server"']
    assert rayfleet.dial_host(parse_manifest(BASE, overrides=named), ray) == "lab-server"


def test_the_commented_examples_in_testbed_toml_are_valid() -> None:
    text = (Path(__file__).resolve().parents[2] / "testbed.toml").read_text(encoding="utf-8")
    blocks, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith(("# [ray]", "# [[devices]]")) or (block and line.startswith("# ")):
            block.append(line[2:])
        elif block:
            blocks.append("\n".join(block))
            block = []
    ray_table = next(b for b in blocks if b.startswith("[ray]"))
    device = next(b for b in blocks if 'launch = "ray"' in b)
    m = parse_manifest(ray_table + "\n" + device)
    assert m.ray == type(m.ray)()  # the example shows the defaults
    assert (m.device("ray-01").ray.num_cpus, m.device("ray-01").ray.num_gpus) == (2.0, 1.0)

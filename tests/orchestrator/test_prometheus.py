"""The ``/metrics`` endpoint: scraped over HTTP during a real local-fleet run, its values are what
the run's records say; a manifest that asks for it without prometheus-client fails in one line."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cli
from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.errors import ManifestError
from orchestrator.preflight import check_listen
from orchestrator.ui import prometheus

parser = pytest.importorskip("prometheus_client.parser")

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
DEVICES = ("dev-a", "dev-b")

MANIFEST = f"""
[testbed]
name = "metrics-run"
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
join_timeout_s = {120.0 * SCALE}

[training]
dataset = "digits"
rounds = 6
eval_every = 2
batch_size = 16
seed = 5

[data]
partition = "iid"
test_limit = 200
""" + "".join("\n" + local_device_toml(d, f"tok-{d}") for d in DEVICES)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10 * SCALE) as reply:
        text = reply.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def _check(got: Samples, seen: dict[str, Any]) -> None:
    """Every figure the exporter shows against the records it has been given so far."""

    def one(name: str, device: str | None = None) -> float:
        return got[("gapsl_" + name, (("device", device),) if device else ())]

    r, ev = seen["rounds"], seen["metrics"]
    assert one("round") == r["round"]
    assert one("round_time_seconds") == pytest.approx(r["round_time_s"])
    assert one("round_predicted_seconds") == pytest.approx(r["predicted_s"])
    assert one("round_uplink_bytes") == r["uplink_bytes"] > 0
    assert one("eval_round") == ev["round"]
    assert one("accuracy_mean") == pytest.approx(ev["acc_mean"])
    assert one("accuracy_min") == pytest.approx(ev["acc_min"])
    assert one("accuracy_max") == pytest.approx(ev["acc_max"])
    for d in DEVICES:
        assert one("device_accuracy", d) == pytest.approx(ev["acc"][d])
        x = r["devices"][d]
        assert one("device_compute_seconds", d) == pytest.approx(x["compute_s"])
        assert one("device_batch", d) == x["batch"]
        assert one("device_uplink_bytes", d) == x["uplink_bytes"]
        link = seen["devices"][d]
        assert one("device_rtt_seconds", d) == pytest.approx(link["rtt_ms"] / 1000)
        if link.get("uplink_mbps") is not None:
            assert one("device_uplink_bytes_per_second", d) == pytest.approx(
                link["uplink_mbps"] * 1e6 / 8
            )
    assert one("rounds") == 6


def test_metrics_endpoint_agrees_with_the_records(tmp_path: Path) -> None:
    m = parse_manifest(MANIFEST)
    run_dir = tmp_path / "run"
    engine = Engine(m, run_dir, manifest_to_toml(m, absolute_paths=True), run_id="metrics")
    seen: dict[str, Any] = {"devices": {}}
    url: list[str] = []
    checked: list[int] = []

    def follow(name: str, record: dict[str, Any]) -> None:
        # This subscriber runs before the exporter's (it subscribes when the run starts), so a
        # scrape now shows every record before this one: what `seen` holds.
        if url and "metrics" in seen and "rounds" in seen and len(checked) < 3:
            if not checked or seen["rounds"]["round"] > checked[-1]:
                _check(_scrape(url[0]), seen)
                checked.append(seen["rounds"]["round"])
        if name == "events" and record.get("event") == "metrics_listening":
            url.append(record["url"])
        elif name == "devices":
            link = {k: v for k, v in record.items() if v is not None}
            seen["devices"].setdefault(record["device"], {}).update(link)
        elif name in ("rounds", "metrics"):
            seen[name] = record

    engine.records.subscribe(follow)
    status = asyncio.run(asyncio.wait_for(engine.run(), 240 * SCALE))
    assert status == "completed", engine.snapshot().message
    assert url and url[0].startswith("http://127.0.0.1:") and not url[0].endswith(":0/metrics")
    assert len(checked) == 3 and checked[0] >= 2, checked
    assert all(not math.isnan(v) for v in seen["metrics"]["acc"].values())


def test_metrics_without_prometheus_client_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(MANIFEST)
    manifest.chmod(0o600)
    monkeypatch.setattr(prometheus, "_installed", lambda: False)
    run_dir = tmp_path / "run"
    for argv in (["check", str(manifest)], ["run", str(manifest), "--run-dir", str(run_dir)]):
        code = cli.main([*argv, "--no-dashboard"] if argv[0] == "run" else argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1, err
        assert "[testbed].metrics_listen" in err and "[metrics]" in err
    assert not run_dir.exists()


def test_a_taken_metrics_port_fails_the_preflight(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m = parse_manifest(MANIFEST.replace('"127.0.0.1:0"\njoin', f'"127.0.0.1:{port}"\njoin'))
        with pytest.raises(ManifestError, match=r"\[testbed\]\.metrics_listen: .*in use"):
            check_listen(m)


def test_metrics_listen_must_be_host_port_or_empty() -> None:
    off = MANIFEST.replace('metrics_listen = "127.0.0.1:0"\n', "")
    assert parse_manifest(off).testbed.metrics_listen == ""
    with pytest.raises(ManifestError, match=r"\[testbed\]\.metrics_listen"):
        parse_manifest(MANIFEST.replace('"127.0.0.1:0"\njoin', '"9108"\njoin'))

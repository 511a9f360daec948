"""The run's Prometheus metrics at ``testbed.metrics_listen``'s ``/metrics``, set from its records.

Like the dashboard, the endpoint shows what the run directory's records say and nothing else:
`RecordMetrics` subscribes to the records writer (and first reads a resumed run's records), so a
scrape agrees with ``rounds.jsonl``, ``metrics.jsonl`` and ``devices.jsonl``. Units follow the
Prometheus convention (seconds, bytes); README.md lists every metric.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.manifest import Manifest
from orchestrator.config.values import split_listen
from orchestrator.errors import RunError
from orchestrator.records.reader import finite
from orchestrator.records.writer import RunRecords
from orchestrator.ui.watch import read_records

__all__ = ["METRICS_KEY", "MetricsServer", "RecordMetrics", "require_metrics", "start_metrics"]

METRICS_KEY = "testbed.metrics_listen"
_PREFIX = "gapsl_"
# (name, help, record file, record key, factor to base units); the last record's value counts.
_RUN = (
    ("round", "the last finished round", "rounds", "round", 1.0),
    ("round_time_seconds", "the last round's measured time", "rounds", "round_time_s", 1.0),
    ("round_predicted_seconds", "the latency model's time for the last round", "rounds",
     "predicted_s", 1.0),
    ("round_loss", "the server's mean loss in the last round", "rounds", "loss", 1.0),
    ("round_uplink_bytes", "activation and label bytes uploaded in the last round", "rounds",
     "uplink_bytes", 1.0),
    ("eval_round", "the round of the last evaluation", "metrics", "round", 1.0),
    ("accuracy_mean", "mean device accuracy at the last evaluation", "metrics", "acc_mean", 1.0),
    ("accuracy_min", "lowest device accuracy at the last evaluation", "metrics", "acc_min", 1.0),
    ("accuracy_max", "highest device accuracy at the last evaluation", "metrics", "acc_max", 1.0),
    ("eval_loss", "mean test loss at the last evaluation", "metrics", "loss", 1.0),
)  # fmt: skip
# Per device (label ``device``), from devices.jsonl: the latest measurement of each figure.
_LINK = (
    ("device_rtt_seconds", "round-trip time", "rtt_ms", 1e-3),
    ("device_uplink_bytes_per_second", "uplink throughput", "uplink_mbps", 1e6 / 8),
    ("device_downlink_bytes_per_second", "downlink throughput", "downlink_mbps", 1e6 / 8),
    ("device_compute_seconds_per_sample", "compute time per sample", "compute_ms_per_sample",
     1e-3),
)  # fmt: skip
# Per device, from its entry in the last rounds.jsonl line that it took part in.
_ROUND = (
    ("device_compute_seconds", "compute time in its last round", "compute_s", 1.0),
    ("device_wait_seconds", "time until its activations arrived in its last round", "wait_s", 1.0),
    ("device_batch", "batch size in its last round", "batch", 1.0),
    ("device_loss", "the server's loss on its batch in its last round", "loss", 1.0),
    ("device_uplink_bytes", "bytes it uploaded in its last round", "uplink_bytes", 1.0),
)  # fmt: skip


def _installed() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def require_metrics(m: Manifest) -> None:
    """A manifest that asks for the endpoint needs prometheus-client: say so in one line (a
    preflight of ``check`` and ``run``; the engine asks again for callers that skip them)."""
    if m.testbed.metrics_listen and not _installed():
        raise m.error(
            METRICS_KEY,
            "needs prometheus-client: pip install 'gapsl-testbed[metrics]'  "
            '(or: pip install prometheus-client), or set it to ""',
        )


class RecordMetrics:
    """Prometheus gauges in a registry of their own, set by each record (a `RunRecords`
    subscriber: ``add(name, record)``)."""

    def __init__(self, m: Manifest) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry(auto_describe=True)
        info = Gauge(
            _PREFIX + "run_info",
            "the run's manifest name, algorithm and dataset (value 1)",
            ("name", "algorithm", "dataset"),
            registry=self.registry,
        )
        info.labels(m.testbed.name, m.training.algorithm, m.training.dataset).set(1)
        Gauge(_PREFIX + "rounds", "rounds the run is to train", registry=self.registry).set(
            m.training.rounds
        )
        self.run = {
            (file, key): (Gauge(_PREFIX + name, doc, registry=self.registry), factor)
            for name, doc, file, key, factor in _RUN
        }
        self.link = {
            key: (Gauge(_PREFIX + name, doc, ("device",), registry=self.registry), factor)
            for name, doc, key, factor in _LINK
        }
        self.per_round = {
            key: (Gauge(_PREFIX + name, doc, ("device",), registry=self.registry), factor)
            for name, doc, key, factor in _ROUND
        }
        self.device_acc = Gauge(
            _PREFIX + "device_accuracy",
            "the device's accuracy at the last evaluation",
            ("device",),
            registry=self.registry,
        )

    def add(self, name: str, record: dict[str, Any]) -> None:
        for (file, key), (gauge, factor) in self.run.items():
            if file == name and (v := finite(record.get(key))) is not None:
                gauge.set(v * factor)
        if name == "devices" and isinstance(dev := record.get("device"), str):
            for key, (gauge, factor) in self.link.items():
                if (v := finite(record.get(key))) is not None:
                    gauge.labels(dev).set(v * factor)
        elif name == "rounds":
            for dev, fields in (record.get("devices") or {}).items():
                if not isinstance(fields, dict):
                    continue
                for key, (gauge, factor) in self.per_round.items():
                    if (v := finite(fields.get(key))) is not None:
                        gauge.labels(dev).set(v * factor)
        elif name == "metrics":
            for dev, acc in (record.get("acc") or {}).items():
                if (v := finite(acc)) is not None:
                    self.device_acc.labels(dev).set(v)


class MetricsServer:
    """The HTTP endpoint serving one `RecordMetrics` registry, in a thread of its own."""

    def __init__(self, metrics: RecordMetrics, listen: str) -> None:
        from prometheus_client import start_http_server

        host, port = split_listen(listen)
        try:
            self.server, self.thread = start_http_server(port, host, metrics.registry)
        except OSError as exc:
            raise RunError(f"{METRICS_KEY} = {listen!r}: cannot serve metrics: {exc}") from exc
        self.port = int(self.server.server_address[1])
        self.url = f"http://{listen.rpartition(':')[0]}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


def start_metrics(m: Manifest, records: RunRecords) -> MetricsServer | None:
    """Serve the run's metrics when the manifest asks for them (after `require_metrics`):
    the records already written (a resumed run's), then every record as it is written."""
    if not m.testbed.metrics_listen:
        return None
    metrics = RecordMetrics(m)
    read_records(records.dir, metrics)
    records.subscribe(metrics.add)
    server = MetricsServer(metrics, m.testbed.metrics_listen)
    records.event("metrics_listening", None, url=server.url)
    return server

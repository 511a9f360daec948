"""What each round and each evaluation leaves behind: its records in the run directory.

The round loop hands over plain results; this turns them into ``rounds.jsonl`` /
``metrics.jsonl`` lines and the round's events. The dashboard shows nothing that is not written
here or elsewhere in the records: it is a fold of them (``orchestrator.ui.fold``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orchestrator.training.devices import ForwardOut
from orchestrator.training.latency import Prediction
from orchestrator.training.state import RunState

CHURN_WINDOW = 20  # rounds over which the leader set's turnover is averaged (``churn``)


class Recorder:
    """Writes the records of one run's rounds and evaluations."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.records = state.records
        self.last_leaders: set[str] | None = None
        self.churn: collections.deque[float] = collections.deque(maxlen=CHURN_WINDOW)
        # Per device, the compute time per sample its last round measured (devices.jsonl shows
        # it for a device the probe has not measured).
        self.compute_ms: dict[str, float] = {}
        # In a resumed run, the last round rounds.jsonl and metrics.jsonl already held: a round
        # recorded again (the rounds past the checkpoint the run went back to) is marked
        # ``"repeat": true``, and readers keep the later copy (``records.reader.by_round``).
        self.held = {"rounds": 0, "metrics": 0}

    def profiled(self, profiles: Mapping[str, Any]) -> None:
        """The probe's measurement of every device, before the first round."""
        for i, p in profiles.items():
            self.records.append(
                "devices",
                {
                    "t": round(self.records.elapsed(), 3),
                    "device": i,
                    "source": "probe",
                    **p.record(),
                },
            )
            shown = (
                "rtt_ms", "uplink_mbps", "downlink_mbps", "compute_ms_per_sample",
                "compute_fixed_ms",
            )  # fmt: skip
            self.state.event("profiled", i, {k: v for k, v in p.record().items() if k in shown})

    def refined(self, profiles: Mapping[str, Any]) -> None:
        """Every device's profile as the rounds so far refined it (``source: fit``): the affine
        compute fit (``compute_fixed_ms``, ``compute_ms_per_sample``) and the link figures."""
        t = round(self.records.elapsed(), 3)
        for i, p in profiles.items():
            self.records.append("devices", {"t": t, "device": i, "source": "fit", **p.record()})

    def round_started(self, r: int, batch: Mapping[str, int]) -> None:
        """Round r asked these devices for their activations: one ``round_started`` event for
        the round (not one per device), which the dashboard shows as the devices computing."""
        self.state.event("round_started", None, {"round": r, "asked": ",".join(batch)})

    def round(
        self, r: int, ids: list[str], round_s: float, fwd: dict[str, ForwardOut],
        losses: Mapping[str, float], loss: float, server_s: float, downlink_s: float,
        diag: dict[str, Any], predicted: Prediction | None,
    ) -> None:  # fmt: skip
        """Round r's ``rounds.jsonl`` line: timing, the loss per device, LGI's leaders."""
        for i in ids:
            self.compute_ms[i] = 1000.0 * fwd[i].compute_s / max(len(fwd[i].labels), 1)
        per_device = {
            i: {
                "batch": int(len(f.labels)),
                "compute_s": round(f.compute_s, 6),
                "uplink_s": round(max(f.wait_s - f.compute_s, 0.0), 6),
                "wait_s": round(f.wait_s, 6),
                # activations and labels as framed; None in-process, where nothing travels
                "uplink_bytes": int(f.nbytes) or None,
                "loss": losses.get(i),  # the server's loss on this device's batch
            }
            for i, f in fwd.items()
        }
        leaders = diag.get("leaders")
        if leaders is not None:
            diag["leaders"] = [ids[k] for k in leaders]
        record = {
            "round": r,
            "round_time_s": round(round_s, 6),
            "predicted_s": round(predicted.total_s, 6) if predicted else None,
            "predicted": None
            if predicted is None
            else {
                "critical": predicted.critical,
                "compute_s": round(predicted.compute_s, 6),
                "uplink_s": round(predicted.uplink_s, 6),
                "server_s": round(predicted.server_s, 6),
                "downlink_s": round(predicted.downlink_s, 6),
                # GAPSL's client space: the backward trip's slowest path and the alignment
                "sync_s": round(predicted.sync_s, 6),
            },
            "participants": ids,
            "server_s": round(server_s, 6),
            "downlink_s": round(downlink_s, 6),
            "uplink_bytes": sum(int(f.nbytes) for f in fwd.values()) or None,
            "loss": loss,
            "leaders": diag.pop("leaders", None),
            "mean_cos": diag.pop("mean_cos", None),
            "devices": per_device,
        }
        record.update(diag)
        if record["leaders"] is not None and "cos" in record:
            record["churn"] = self._churn(record["leaders"])
        if r <= self.held["rounds"]:
            record["repeat"] = True
        self.records.append("rounds", record)
        self.state.round_times.append(round_s)

    def _churn(self, leaders: list[str]) -> float | None:
        """The mean share of the leader set replaced per round, over the last rounds."""
        current = set(leaders)
        if self.last_leaders is not None:
            self.churn.append(len(current ^ self.last_leaders) / max(len(current), 1))
        self.last_leaders = current
        return float(np.mean(self.churn)) if self.churn else None

    def evaluation(
        self,
        r: int,
        ids: Sequence[str],
        scores: Sequence[tuple[float, float]],
        spread: float | None,
    ) -> None:
        """Every device's accuracy and loss after round r: one ``metrics.jsonl`` line."""
        accs = [a for a, _ in scores]
        record: dict[str, Any] = {
            "round": r,
            "time_s": self.records.elapsed(),
            "acc_mean": float(np.mean(accs)),
            "acc_min": float(np.min(accs)),
            "acc_max": float(np.max(accs)),
            "loss": float(np.mean([loss for _, loss in scores])),
            "acc": dict(zip(ids, accs)),
            "client_spread": spread,
        }
        if r <= self.held["metrics"]:
            record["repeat"] = True
        self.records.append("metrics", record)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_leaders": None if self.last_leaders is None else sorted(self.last_leaders),
            "churn": list(self.churn),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        last = state["last_leaders"]
        self.last_leaders = None if last is None else set(last)
        self.churn.extend(state["churn"])

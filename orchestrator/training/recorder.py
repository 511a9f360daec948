"""What each round and each evaluation leaves behind: its record in the run directory and what
the dashboard shows of it. The round loop hands over plain results; this turns them into
``rounds.jsonl`` / ``metrics.jsonl`` lines and into the run state's views."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orchestrator.training.devices import ForwardOut
from orchestrator.training.latency import Prediction
from orchestrator.training.state import RunState
from orchestrator.ui.snapshot import EvalPoint, GapslView, RoundPoint

CHURN_WINDOW = 20  # rounds over which the dashboard averages the leader set's turnover


class Recorder:
    """Writes the records of one run's rounds and evaluations, and keeps the state's views."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.records = state.records
        self.last_leaders: set[str] | None = None
        self.churn: collections.deque[float] = collections.deque(maxlen=CHURN_WINDOW)

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
            shown = ("rtt_ms", "uplink_mbps", "downlink_mbps", "compute_ms_per_sample")
            self.state.event("profiled", i, {k: v for k, v in p.record().items() if k in shown})
        self.state.profiles = dict(profiles)

    def computing(self, r: int, batch: Mapping[str, int]) -> None:
        """Round r asked these devices for their activations."""
        for s in self.state.sessions:
            s.status = "computing" if s.id in batch else s.status

    def answered(self, r: int, fwd: Mapping[str, ForwardOut]) -> None:
        """These devices' activations of round r arrived."""
        for s in self.state.sessions:
            if s.id in fwd:
                s.status = "joined"

    def round(
        self, r: int, ids: list[str], round_s: float, fwd: dict[str, ForwardOut],
        losses: Mapping[str, float], loss: float, server_s: float, downlink_s: float,
        diag: dict[str, Any], predicted: Prediction | None,
    ) -> None:  # fmt: skip
        st = self.state
        for i in ids:
            st.device_loss[i] = losses[i]
            st.device_rounds[i] = r
            st.device_batch[i] = len(fwd[i].labels)
            st.compute_ms[i] = 1000.0 * fwd[i].compute_s / max(len(fwd[i].labels), 1)
        per_device = {
            i: {
                "batch": int(len(f.labels)),
                "compute_s": round(f.compute_s, 6),
                "uplink_s": round(max(f.wait_s - f.compute_s, 0.0), 6),
                "wait_s": round(f.wait_s, 6),
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
            },
            "participants": ids,
            "server_s": round(server_s, 6),
            "downlink_s": round(downlink_s, 6),
            "loss": loss,
            "leaders": diag.pop("leaders", None),
            "mean_cos": diag.pop("mean_cos", None),
            "devices": per_device,
        }
        record.update(diag)
        self.records.append("rounds", record)
        slowest = max(per_device.values(), key=lambda d: d["wait_s"])
        st.rounds.append(
            RoundPoint(
                round=r, round_time_s=round_s, loss=loss, compute_s=slowest["compute_s"],
                uplink_s=slowest["uplink_s"], server_s=server_s, downlink_s=downlink_s,
                predicted_s=predicted.total_s if predicted else None,
            )
        )  # fmt: skip
        if record["leaders"] is not None and "cos" in record:
            self._leaders(record, ids)

    def _leaders(self, record: dict[str, Any], ids: list[str]) -> None:
        current = set(record["leaders"])
        if self.last_leaders is not None:
            self.churn.append(len(current ^ self.last_leaders) / max(len(current), 1))
        self.last_leaders = current
        self.state.gapsl = GapslView(
            churn=float(np.mean(self.churn)) if self.churn else None,
            leaders=tuple(record["leaders"]),
            cosine=tuple(tuple(row) for row in record["cos"]),
            device_ids=tuple(ids),
            align_before=record.get("align_before"),
            align_after=record.get("align_after"),
        )

    def evaluation(
        self,
        r: int,
        ids: Sequence[str],
        scores: Sequence[tuple[float, float]],
        spread: float | None,
    ) -> None:
        st = self.state
        accs = [a for a, _ in scores]
        for i, acc in zip(ids, accs):
            st.device_acc[i] = acc
        point = EvalPoint(
            round=r,
            time_s=self.records.elapsed(),
            acc_mean=float(np.mean(accs)),
            acc_min=float(np.min(accs)),
            acc_max=float(np.max(accs)),
            loss=float(np.mean([loss for _, loss in scores])),
        )
        record: dict[str, Any] = {
            k: getattr(point, k)
            for k in ("round", "time_s", "acc_mean", "acc_min", "acc_max", "loss")
        }
        record["acc"] = dict(zip(ids, accs))
        record["client_spread"] = spread
        self.records.append("metrics", record)
        st.add_eval(point)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_leaders": None if self.last_leaders is None else sorted(self.last_leaders),
            "churn": list(self.churn),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        last = state["last_leaders"]
        self.last_leaders = None if last is None else set(last)
        self.churn.extend(state["churn"])

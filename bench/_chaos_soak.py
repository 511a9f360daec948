"""The soak of ``bench.chaos``: drive an orchestrator process, inject faults, see them survived.

The run directory is the bench's only view of the run, as it is anyone's: ``rounds.jsonl``
says who took part in each round (a fault is survived once its device takes part in a round
written after it), ``events.jsonl`` the port served and the checkpoints. Fault bookkeeping
counts lines, not rounds: after a resume the rounds come again, the lines only grow.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import _chaos_faults as faults

TICK_S = 0.1  # how often the soak looks at the records and the clock
EXIT_WAIT_S = 30.0  # a SIGKILLed orchestrator's agents must be gone by then (PR_SET_PDEATHSIG)
STOP_WAIT_S = 240.0  # SIGINT to exit: one round, the weight collection, the agents' goodbye


@dataclass(frozen=True)
class Plan:
    soak_s: float  # faults start within this long of the orchestrator's start
    gap_s: tuple[float, float]  # seconds between two faults, drawn uniformly
    stall_s: tuple[float, float]  # how long a SIGSTOP lasts
    kill_at: tuple[float, float]  # the orchestrator's kill, as a share of the training time
    recover_s: float  # after the soak, how long the faults still pending may take


@dataclass
class Fault:
    kind: str  # sigkill | stall | drop | orchestrator_kill
    device: str | None
    t: float  # seconds since the soak started
    line: int  # rounds.jsonl lines written when it struck
    detail: str = ""
    survived: bool = False
    back_s: float | None = None  # from the fault to the first round that shows it survived

    def describe(self) -> str:
        who = self.device or "the orchestrator"
        return f"{self.kind} of {who} at {self.t:.1f} s after rounds.jsonl line {self.line}" + (
            f" ({self.detail})" if self.detail else ""
        )


class _Tail:
    """Whole JSONL lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        out = []
        for line in whole.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the checks count torn lines; here only progress matters
        return out


class Soak:
    """One soak: start, fault, kill and resume, recover, stop. ``faults``, ``kills`` and
    ``findings`` hold what happened; ``cleanup`` must run whatever happens."""

    def __init__(
        self,
        manifest: Path,
        run_dir: Path,
        devices: Sequence[str],
        kinds: Sequence[str],
        plan: Plan,
        rng: random.Random,
        cli: Callable[..., list[str]],
        env: dict[str, str],
        log: Callable[[str], None],
    ) -> None:
        self.manifest, self.run_dir, self.devices = manifest, run_dir, list(devices)
        self.kinds, self.plan, self.rng, self.cli, self.env, self.log = (
            kinds, plan, rng, cli, env, log,
        )  # fmt: skip
        self.faults: list[Fault] = []
        self.kills: list[dict[str, int]] = []  # per orchestrator kill: checkpoint, recorded
        self.findings: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.stalled: dict[str, tuple[int, float]] = {}  # device -> (pid, SIGCONT at)
        self.lines = 0
        self.max_round = 0
        self.seen: dict[str, int] = {}  # device -> the last rounds.jsonl line it took part in
        self.port = 0
        self.cp_round = 0  # the newest checkpoint's round, as the events say
        self.t0 = time.monotonic()
        self.elapsed_s = 0.0
        self._rounds = _Tail(run_dir / "rounds.jsonl")
        self._events = _Tail(run_dir / "events.jsonl")

    def now(self) -> float:
        return time.monotonic() - self.t0

    # --- the orchestrator -----------------------------------------------------------------------

    def _start(self, *args: str) -> None:
        with open(self.manifest.parent / "orchestrator.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.cli(*args), cwd=self.manifest.parent, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _kill_orchestrator(self) -> None:
        assert self.proc is not None
        self._unstall_all()  # a stopped agent would not act on the kernel's SIGTERM
        t = self.now()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=EXIT_WAIT_S)
        self._leftovers("the SIGKILLed orchestrator")
        self._poll()  # the last lines it wrote: every line from now on is the resumed run's
        fault = Fault("orchestrator_kill", None, t, self.lines)
        from orchestrator.records import checkpoint  # torch: only once it is needed

        state = checkpoint.load(self.run_dir)
        cp = int(state["round"]) if state else 0
        self.kills.append({"checkpoint": cp, "recorded": self.max_round})
        fault.detail = f"checkpoint of round {cp}, rounds.jsonl at round {self.max_round}"
        self.faults.append(fault)
        self.log(f"{fault.t:7.1f} s  SIGKILL the orchestrator ({fault.detail}); run --resume")
        self._start("run", "--resume", str(self.run_dir))

    def _leftovers(self, whose: str) -> None:
        """Agents of the run still alive ``EXIT_WAIT_S`` after ``whose`` end: a finding."""
        _, left = psutil.wait_procs(faults.agents_in(self.run_dir), timeout=EXIT_WAIT_S)
        if left:
            pids = ", ".join(str(p.pid) for p in left)
            self.findings.append(
                f"{len(left)} agents outlived {whose} by {EXIT_WAIT_S:.0f} s: {pids}"
            )
            for p in left:
                faults.signal_pid(p.pid, signal.SIGKILL)

    def _stop(self) -> None:
        """SIGINT: the run finishes its round, checkpoints it and ends as interrupted (130)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.findings.append(
                f"the orchestrator did not stop within {STOP_WAIT_S:.0f} s of SIGINT"
            )
            return
        if code != 130:
            self.findings.append(f"the orchestrator exited {code} on SIGINT, not 130")
        self._leftovers("the interrupted run")

    # --- what the records say -------------------------------------------------------------------

    def _poll(self) -> None:
        for rec in self._rounds.new():
            self.lines += 1
            self.max_round = max(self.max_round, int(rec.get("round", 0)))
            for dev in rec.get("participants") or []:
                self.seen[dev] = self.lines
        for ev in self._events.new():
            name = ev.get("event")
            if name == "listening":
                self.port = int(str(ev["url"]).rsplit(":", 1)[1])
            elif name == "checkpoint":
                self.cp_round = int(ev.get("round", 0))
        for f in self.faults:
            if f.survived:
                continue
            # A device's first line after the fault may be the round that was in flight, its part
            # done before the fault struck: it is back once it takes part in a later one. Every
            # line after an orchestrator kill is the resumed run's.
            if f.device is None:
                back = self.lines > f.line
            else:
                back = self.seen.get(f.device, 0) >= f.line + 2
            if back:
                f.survived, f.back_s = True, round(self.now() - f.t, 1)

    def _at_work(self) -> dict[str, int]:
        """Devices that may take a fault now, with their agent's pid: not stalled, and back
        from every earlier fault."""
        assert self.proc is not None
        if any(f.device is None and not f.survived for f in self.faults):
            return {}  # the resumed run is not training yet
        agents = faults.agents_of(self.proc.pid)
        busy = {f.device for f in self.faults if not f.survived} | set(self.stalled)
        return {d: agents[d].pid for d in self.devices if d in agents and d not in busy}

    # --- faults ---------------------------------------------------------------------------------

    def _inject(self) -> None:
        ready = self._at_work()
        if not ready:
            return
        device = self.rng.choice(sorted(ready))
        kind = self.rng.choice(list(self.kinds))
        pid, detail = ready[device], ""
        if kind == "sigkill":
            if not faults.signal_pid(pid, signal.SIGKILL):
                return
        elif kind == "stall":
            hold = self.rng.uniform(*self.plan.stall_s)
            if not faults.stall(pid):
                return
            self.stalled[device] = (pid, self.now() + hold)
            detail = f"{hold:.1f} s"
        else:
            how = faults.cut_link(pid, self.port)
            if how is None:
                return  # dialling just now: nothing to cut
            detail = how
        self._poll()  # the lines written before it struck
        fault = Fault(kind, device, self.now(), self.lines, detail)
        self.faults.append(fault)
        self.log(f"{fault.t:7.1f} s  {kind} {device}" + (f" ({detail})" if detail else ""))

    def _unstall_due(self, all_now: bool = False) -> None:
        for device, (pid, until) in list(self.stalled.items()):
            if all_now or self.now() >= until:
                faults.unstall(pid)
                del self.stalled[device]

    def _unstall_all(self) -> None:
        self._unstall_due(all_now=True)

    # --- the soak -------------------------------------------------------------------------------

    def run(self) -> None:
        plan = self.plan
        self._start("run", str(self.manifest), "--run-dir", str(self.run_dir))
        next_fault = kill_t = None
        while self.now() < plan.soak_s:
            self._poll()
            self._unstall_due()
            if not self._alive():
                code = self.proc.returncode if self.proc else None
                self.findings.append(f"the orchestrator exited {code} during the soak")
                self.elapsed_s = self.now()
                return
            now = self.now()
            if kill_t is None and self.lines:  # training began: plan the orchestrator's kill
                kill_t = now + self.rng.uniform(*plan.kill_at) * (plan.soak_s - now)
                next_fault = now
            # Killed with rounds recorded past its checkpoint, so that the resume repeats some.
            past = self.max_round - self.cp_round >= 2 if self.cp_round else False
            if kill_t is not None and not self.kills and now >= kill_t and past:
                self._kill_orchestrator()
            elif next_fault is not None and now >= next_fault:
                self._inject()
                next_fault = now + self.rng.uniform(*plan.gap_s)
            time.sleep(TICK_S)
        if not self.kills:
            self.findings.append("the orchestrator was never killed: no checkpoint in the soak")
        self._unstall_all()
        end = self.now() + plan.recover_s
        while self.now() < end and not all(f.survived for f in self.faults) and self._alive():
            self._poll()
            time.sleep(TICK_S)
        self.elapsed_s = self.now()
        if self._alive():
            self._stop()
        self._poll()

    def cleanup(self) -> None:
        """Leave nothing running: stalled agents continued, the orchestrator and agents killed."""
        self._unstall_all()
        if self._alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        for p in faults.agents_in(self.run_dir):
            faults.signal_pid(p.pid, signal.SIGKILL)

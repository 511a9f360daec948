"""Chaos soak: a local fleet trains for N minutes under random faults, and nothing is lost.

    python -m bench.chaos [--minutes 10] [--seed 0] [--devices 4] [--kinds sigkill,stall,drop]
                          [--work-dir DIR] [--quick]

The orchestrator runs as ``python -m orchestrator run`` (its own process) on a manifest of
``--devices`` local agents training GAPSL on the bundled digits, with more rounds than the soak
can reach, ``testbed.respawn_local`` high and ``testbed.patience_s`` far above any stall. Once
training has begun, every few seconds one agent that is at work (it took part in a round since
its last fault) gets one fault: SIGKILL (the orchestrator starts it again), a SIGSTOP stall
ended by SIGCONT, or its connection cut (``bench/_chaos_faults.py``). Once, mid-soak, the
orchestrator itself is SIGKILLed (with rounds recorded past its checkpoint, so that the resume
records some again) and restarted with ``run --resume``. After ``--minutes`` no
new fault starts; once every fault is survived (the device took part in a round after it) the
run is stopped with SIGINT, which checkpoints it, and the records are checked
(``bench/_chaos_check.py``). The same manifest then runs without faults in ``simulate`` for
the same number of rounds, and the final accuracies are compared (agent SIGKILLs send a device
back to its last checkpoint, so they are expected to differ a little; stalls, cut links and the
orchestrator's kill are not).

The last line printed is one JSON object: ``minutes``, ``rounds``, ``faults`` (by kind),
``faults_total``, ``survived``, ``lost_records``, ``torn_lines``, ``final_acc_mean``,
``reference_acc_mean``, ``acc_diff``, ``ok``. Exit 0 when nothing was lost and every fault was
survived, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import _chaos_faults as faults
from bench._chaos_check import check_records, final_eval
from bench._chaos_soak import Plan, Soak
from orchestrator.config.manifest import local_device_toml

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("sigkill", "stall", "drop")
EVAL_EVERY = 10

MANIFEST = """
[testbed]
name = "chaos"
listen = "127.0.0.1:0"
join_timeout_s = 600.0
patience_s = 180.0
lost_timeout_s = 900.0
respawn_local = 100000
[training]
algorithm = "gapsl"
dataset = "digits"
rounds = 1000000
eval_every = {eval_every}
seed = {seed}
[server]
device = "cpu"
[data]
partition = "dirichlet"
alpha = 0.5
"""


def write_manifest(work: Path, devices: int, seed: int) -> Path:
    path = work / "chaos.toml"
    text = MANIFEST.format(eval_every=EVAL_EVERY, seed=seed)
    text += "".join(local_device_toml(f"d{i}", f"chaos-token-{i}") for i in range(devices))
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # it holds the tokens, which `run --resume` reads again from here
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args, "--no-dashboard"]


def reference(manifest: Path, work: Path, rounds: int, timeout_s: float) -> dict[str, Any] | None:
    """The same manifest for ``rounds`` rounds without faults, in the reference engine."""
    ref = work / "reference"
    cmd = _cli("simulate", str(manifest), "--run-dir", str(ref))
    with open(work / "reference.log", "wb") as log:
        try:
            done = subprocess.run(
                [*cmd, "--set", f"training.rounds={rounds}"], cwd=work, env=_env(), stdout=log,
                stderr=subprocess.STDOUT, timeout=timeout_s,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return None
    return final_eval(ref) if done.returncode == 0 else None


def _plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(
            soak_s=args.minutes * 60 if args.minutes_given else 50.0,
            gap_s=(1.0, 2.5),
            stall_s=(0.5, 2.0),
            kill_at=(0.25, 0.4),
            recover_s=90.0,
        )
    return Plan(
        soak_s=args.minutes * 60, gap_s=(2.0, 7.0), stall_s=(1.0, 8.0), kill_at=(0.3, 0.6),
        recover_s=180.0,
    )  # fmt: skip


def _table(res: dict[str, Any]) -> None:
    rows = [("fault", "injected", "survived")]
    for kind, n in res["faults"].items():
        rows.append((kind, str(n), str(res["survived_by_kind"].get(kind, 0))))
    for row in rows:
        print(f"{row[0]:<20}{row[1]:>10}{row[2]:>10}")
    c = res["checks"]
    print(
        f"rounds {res['rounds']} ({c['repeated_rounds']} recorded twice after the resume, "
        f"marked: {c['wrongly_marked'] == 0}), evaluations {c['evaluations']}, "
        f"lost records {c['lost_records']}, torn lines {c['torn_lines']}"
    )
    print(
        f"final accuracy at round {res['final_round']}: {res['final_acc_mean']} under faults, "
        f"{res['reference_acc_mean']} without (difference {res['acc_diff']})"
    )
    for line in res["findings"]:
        print(f"finding: {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--minutes", type=float, default=None, help="soak length (default 10)")
    p.add_argument("--seed", type=int, default=0, help="faults and training seed")
    p.add_argument("--devices", type=int, default=None, help="local agents (default 4; quick 3)")
    p.add_argument("--kinds", default=",".join(KINDS), help="faults on agents, comma-separated")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the runs here")
    p.add_argument("--quick", action="store_true", help="a short soak (about a minute)")
    args = p.parse_args(argv)
    args.minutes_given = args.minutes is not None
    args.minutes = 10.0 if args.minutes is None else args.minutes
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        p.error(f"--kinds: {','.join(bad) or 'none given'}: choose from {','.join(KINDS)}")
    if args.minutes <= 0:
        p.error("--minutes must be positive")
    devices = args.devices or (3 if args.quick else 4)
    if devices < 2:
        p.error("--devices must be at least 2")
    with tempfile.TemporaryDirectory(prefix="gapsl-chaos-") as tmp:
        work = args.work_dir or Path(tmp)
        if (work / "run").exists():
            p.error(f"--work-dir: {work} holds a soak already; name a new folder")
        work.mkdir(parents=True, exist_ok=True)
        manifest = write_manifest(work, devices, args.seed)
        soak = Soak(
            manifest, work / "run", [f"d{i}" for i in range(devices)], kinds, _plan(args),
            random.Random(args.seed), _cli, _env(), log=lambda line: print(line, flush=True),
        )  # fmt: skip
        try:
            soak.run()
        except faults.FaultError as exc:
            print(f"bench.chaos: {exc}", file=sys.stderr)
            return 1
        finally:
            soak.cleanup()
        checks = check_records(soak.run_dir, EVAL_EVERY, soak.kills)
        last = final_eval(soak.run_dir)
        ref = None
        if last is not None:
            ref = reference(manifest, work, int(last["round"]), timeout_s=600)
        res = _result(args, soak, checks, last, ref)
    _table(res)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


def _result(
    args: argparse.Namespace,
    soak: Soak,
    checks: dict[str, Any],
    last: dict[str, Any] | None,
    ref: dict[str, Any] | None,
) -> dict[str, Any]:
    by_kind: dict[str, int] = {}
    survived: dict[str, int] = {}
    for f in soak.faults:
        by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        survived[f.kind] = survived.get(f.kind, 0) + f.survived
    acc = last.get("acc_mean") if last else None
    ref_acc = ref.get("acc_mean") if ref else None
    findings = list(soak.findings)
    findings += [f"not survived: {f.describe()}" for f in soak.faults if not f.survived]
    if ref is None:
        findings.append("the reference run without faults failed (reference.log)")
    records_ok = (
        checks["lost_records"] == 0 and checks["torn_lines"] == 0 and checks["wrongly_marked"] == 0
        and checks["repeats_as_said"] and checks["reader_keeps_later"]
        and not checks["extra_rounds"] and checks["status"] == "interrupted"
    )  # fmt: skip
    if not records_ok:
        findings.append(f"records: {json.dumps(checks)}")
    return {
        "bench": "chaos",
        "quick": bool(args.quick),
        "seed": args.seed,
        "devices": len(soak.devices),
        "minutes": round(soak.elapsed_s / 60, 2),
        "rounds": checks["last_round"],
        "faults": by_kind,
        "faults_total": sum(by_kind.values()),
        "survived": sum(survived.values()),
        "survived_by_kind": survived,
        "lost_records": checks["lost_records"],
        "torn_lines": checks["torn_lines"],
        "checks": checks,
        "final_round": last.get("round") if last else None,
        "final_acc_mean": acc,
        "reference_acc_mean": ref_acc,
        "acc_diff": None if acc is None or ref_acc is None else round(acc - ref_acc, 6),
        "findings": findings,
        "ok": records_ok and all(f.survived for f in soak.faults) and ref is not None
        and not soak.findings,
    }  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

"""What ``bench.chaos`` checks in the run directory once the soak is over: nothing was lost.

Every round from 1 to the last appears in ``rounds.jsonl``; every evaluation round in
``metrics.jsonl``; a round written more than once (after ``run --resume`` went back to an
earlier checkpoint) is marked ``repeat`` on every copy but the first and on no first copy, the
``resumed`` events say which rounds came again, and the records reader keeps the later copy;
every line of every record file parses (none torn).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from orchestrator.records.reader import RECORD_NAMES, by_round


def read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every record of a JSONL file and the number of lines that do not parse (torn)."""
    rows: list[dict[str, Any]] = []
    torn = 0
    if not path.exists():
        return rows, torn
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(rec, dict):
            rows.append(rec)
        else:
            torn += 1
    return rows, torn


def _copies(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rec in rows:
        if isinstance(rec.get("round"), int):
            out[rec["round"]].append(rec)
    return out


def _marking(copies: dict[int, list[dict[str, Any]]]) -> tuple[int, list[int]]:
    """(copies marked wrongly: a repeat unmarked or a first copy marked, the repeated rounds)."""
    wrong, repeated = 0, []
    for r, recs in sorted(copies.items()):
        wrong += bool(recs[0].get("repeat"))
        wrong += sum(not rec.get("repeat") for rec in recs[1:])
        if len(recs) > 1:
            repeated.append(r)
    return wrong, repeated


def check_records(run_dir: Path, eval_every: int, kills: list[dict[str, int]]) -> dict[str, Any]:
    """The soak's record checks. ``kills`` holds, per orchestrator kill, the round of the
    newest checkpoint and the last round ``rounds.jsonl`` held at that moment."""
    files = {name: read_lines(run_dir / f"{name}.jsonl") for name in RECORD_NAMES}
    torn = {name: t for name, (_, t) in files.items() if t}
    rounds, metrics, events = files["rounds"][0], files["metrics"][0], files["events"][0]
    path = run_dir / "summary.json"  # none when the orchestrator died for good
    summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    last = int(summary.get("rounds") or 0)
    by_r, by_e = _copies(rounds), _copies(metrics)
    missing_rounds = [r for r in range(1, last + 1) if r not in by_r]
    missing_evals = [r for r in range(eval_every, last + 1, eval_every) if r not in by_e]
    wrong_r, repeated_r = _marking(by_r)
    wrong_e, repeated_e = _marking(by_e)
    # The reader keeps the later copy: the one written last, by the resumed run.
    kept_later = all(rec is by_r[rec["round"]][-1] for rec in by_round(rounds)) and all(
        rec is by_e[rec["round"]][-1] for rec in by_round(metrics)
    )
    resumed = [e for e in events if e.get("event") == "resumed"]
    # Each resume goes back to the checkpoint the kill left and repeats what was past it.
    expected = sorted(r for k in kills for r in range(k["checkpoint"] + 1, k["recorded"] + 1))
    said = sorted(
        r for e in resumed for r in range(int(e["round"]) + 1, int(e.get("recorded_round", 0)) + 1)
    )
    resumes_agree = [(e["round"], e.get("recorded_round")) for e in resumed] == [
        (k["checkpoint"], k["recorded"]) for k in kills
    ]
    return {
        "status": summary.get("status"),
        "last_round": last,
        "checkpoint_round": summary.get("checkpoint_round"),
        "evaluations": len(by_e),
        "missing_rounds": missing_rounds,
        "missing_evals": missing_evals,
        "lost_records": len(missing_rounds) + len(missing_evals),
        "wrongly_marked": wrong_r + wrong_e,
        "repeated_rounds": len(repeated_r),
        "repeated_evals": len(repeated_e),
        "repeats_as_said": repeated_r == expected == said and resumes_agree,
        "reader_keeps_later": kept_later,
        "torn_lines": sum(torn.values()),
        "torn_files": torn,
        "torn_cut_on_resume": sum(e.get("event") == "torn_line" for e in events),
        "extra_rounds": sorted(r for r in by_r if r > last),
    }


def final_eval(run_dir: Path) -> dict[str, Any] | None:
    """The run's last evaluation (the later copy of a repeated one)."""
    rows, _ = read_lines(run_dir / "metrics.jsonl")
    latest = by_round(rows)
    return latest[-1] if latest else None

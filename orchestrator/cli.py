"""``gapsl-orchestrator``: run a testbed manifest, or check one; report, watch, make TLS files.

Exit codes are :class:`~orchestrator.errors.ExitCode`; every command's ``--help`` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import logging
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import secrets
from orchestrator.config.manifest import Manifest, load_manifest, manifest_to_toml
from orchestrator.errors import ExitCode, GapslError, exit_code_help
from orchestrator.names import Phase

if TYPE_CHECKING:
    from orchestrator.records.resume import Resume

DEFAULT_MANIFEST = "testbed.toml"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's default, except that text with line breaks (the exit-code table) is kept as
    written instead of being re-flowed into one paragraph."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _with_exit_codes(parser: argparse.ArgumentParser) -> None:
    """Put the exit-code table (from ``ExitCode``) at the end of ``parser``'s help."""
    table = exit_code_help()
    parser.epilog = f"{parser.epilog}\n\n{table}" if parser.epilog else table
    parser.formatter_class = _HelpFormatter


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gapsl-orchestrator",
        description="Orchestrator of the GAPSL split-learning testbed.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run a manifest on its fleet"),
        ("simulate", "run a manifest with every device in this process (the reference engine)"),
    ):
        run = sub.add_parser(name, help=text)
        run.add_argument("manifest", nargs="?", default=DEFAULT_MANIFEST)
        run.add_argument("--no-dashboard", action="store_true", help="log lines, no live view")
        run.add_argument(
            "--run-dir", type=Path, default=None, help="default: under testbed.runs_dir"
        )
        run.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
        )
        if name == "run":
            run.add_argument(
                "--resume",
                type=Path,
                default=None,
                metavar="RUN_DIR",
                help="continue an interrupted run in place, from its last checkpoint",
            )
    check = sub.add_parser("check", help="validate a manifest and exit")
    check.add_argument("manifest", nargs="?", default=DEFAULT_MANIFEST)
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    from orchestrator.ui.report import add_parser as add_report

    add_report(sub)
    from orchestrator.fleet.tls import add_parser as add_tls

    add_tls(sub)
    from orchestrator.ui.watch import add_parser as add_watch

    add_watch(sub)
    # Every command, also those other modules register, shows the same table in its --help.
    for parser in (p, *sub.choices.values()):
        _with_exit_codes(parser)
    return p


def default_run_dir(m: Manifest) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{m.testbed.name}-{m.training.algorithm}-s{m.training.seed}-{stamp}"
    return Path(m.testbed.runs_dir) / name


def _check(args: argparse.Namespace) -> int:
    m = load_manifest(args.manifest, args.set)
    exposed = secrets.exposed_warning(m)
    if exposed is not None:  # valid all the same: a warning, not an error
        print(f"warning: {exposed}", file=sys.stderr)
    local = sum(d.launch == "local" for d in m.devices)
    placed = sum(d.launch == "ray" for d in m.devices)
    if placed:  # whether the cluster answers, `run` says before it starts anything
        from orchestrator.fleet.rayfleet import import_ray

        import_ray(m)
    on_ray = f", {placed} on Ray at {m.ray.address}" if placed else ""
    print(
        f"{args.manifest}: ok — {m.training.algorithm} on {m.training.dataset}, "
        f"{len(m.devices)} devices ({local} local{on_ray}), {m.training.rounds} rounds"
    )
    return ExitCode.OK


async def _run_async(
    m: Manifest,
    run_dir: Path,
    dashboard: bool,
    in_process: bool,
    run_id: str,
    resume: Resume | None = None,
) -> str:
    from orchestrator.engine import Engine

    engine = Engine(
        m,
        run_dir,
        manifest_to_toml(m, absolute_paths=True, redact_tokens=True),
        run_id=run_id,
        in_process=in_process,
        resume=resume.checkpoint if resume else None,
        elapsed_s=resume.wall_s if resume else 0.0,
    )
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def on_signal() -> None:
        # During training the first signal stops at the next round boundary with a checkpoint;
        # a second one stops at once (the last evaluation's checkpoint stands).
        training = engine.state.phase in (Phase.TRAINING, Phase.EVALUATING)
        if engine.state.stop_requested or in_process or not training:
            main.cancel()  # nothing learnt yet that a checkpoint could keep
        else:
            engine.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    stop = asyncio.Event()
    view: asyncio.Task[None] | None = None
    if dashboard:
        from rich.console import Console

        from orchestrator.ui.live import LiveDashboard

        live = LiveDashboard(Console(), m.dashboard.refresh_hz, engine.snapshot)
        view = asyncio.create_task(live.run(stop), name="dashboard")
    else:
        engine.fold.on_line = lambda line: print(line, flush=True)
    try:
        return await engine.run()
    finally:
        stop.set()
        if view is not None:
            await asyncio.gather(view, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _run(args: argparse.Namespace) -> int:
    resume = None
    if getattr(args, "resume", None) is not None:
        from orchestrator.records.resume import prepare_resume

        resume = prepare_resume(args.resume, args.set, args.run_dir)
        m, run_dir = resume.manifest, args.resume
    else:
        m = load_manifest(args.manifest, args.set)
        run_dir = args.run_dir or default_run_dir(m)
    dashboard = not args.no_dashboard and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    run_id = resume.run_id if resume else uuid.uuid4().hex[:12]
    in_process = args.command == "simulate"
    if not in_process and any(d.launch == "ray" for d in m.devices):
        from orchestrator.fleet import rayfleet

        # Before anything starts: no Ray or no cluster is the user's to fix (one line, exit 2).
        # The engine keeps this connection for the run.
        rayfleet.connect(m, rayfleet.namespace_of(run_id))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = asyncio.run(_run_async(m, run_dir, dashboard, in_process, run_id, resume))
    except (KeyboardInterrupt, asyncio.CancelledError):
        status = Phase.INTERRUPTED
    summary = run_dir / "summary.json"
    if status == Phase.INTERRUPTED:
        print(
            f"interrupted; resume with: gapsl-orchestrator run --resume {run_dir}",
            file=sys.stderr,
        )
        return ExitCode.INTERRUPTED
    completed = status == Phase.COMPLETED
    print(f"run {status}: {run_dir}", file=sys.stdout if completed else sys.stderr)
    if not completed:
        import json

        reason = json.loads(summary.read_text()).get("error", "") if summary.exists() else ""
        print(f"reason: {reason}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args)
        if args.command in ("report", "tls-init", "watch"):
            return int(args.func(args))
        return _run(args)
    except GapslError as exc:  # the user's to fix: one line, the class says which exit code
        print(f"gapsl-orchestrator: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

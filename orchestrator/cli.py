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
    from edge_agent.data import Dataset
    from orchestrator.records.resume import Resume

DEFAULT_MANIFEST = "testbed.toml"


# What each command's --help shows first in its epilog: a command line to copy.
EXAMPLES = {
    "run": "gapsl-orchestrator run testbed.toml --set training.rounds=50 --no-dashboard",
    "simulate": "gapsl-orchestrator simulate testbed.toml --set training.algorithm=gapsl",
    "check": "gapsl-orchestrator check testbed.toml --set data.dir=/srv/datasets/fashion_mnist",
    "report": "gapsl-orchestrator report runs/digits-local-psl-s0-* --out report",
    "watch": "gapsl-orchestrator watch runs/digits-local-psl-s0-20261124-101500 --once",
    "tls-init": "gapsl-orchestrator tls-init ~/gapsl-tls --host lab-server --host 192.168.1.20",
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's default, except that text with line breaks (the exit-code table) is kept as
    written instead of being re-flowed into one paragraph, and every option with a real default
    says it (as ``ArgumentDefaultsHelpFormatter`` would, less its "(default: None)" noise)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _finish_help(parser: argparse.ArgumentParser, name: str | None) -> None:
    """End ``parser``'s help with an example (if it has one), then the exit-code table."""
    parts = [parser.epilog] if parser.epilog else []
    if name in EXAMPLES:
        parts.append(f"example:\n  {EXAMPLES[name]}")
    parts.append(exit_code_help())
    parser.epilog = "\n\n".join(parts)
    parser.formatter_class = _HelpFormatter
    debug = "on a failure, show its traceback instead of one line"
    if name is None:
        parser.add_argument("--debug", action="store_true", help=debug)
    else:  # also after the command; SUPPRESS keeps a --debug given before it
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)


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
        run = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        run.add_argument("manifest", nargs="?", default=DEFAULT_MANIFEST, help="the manifest")
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
    check = sub.add_parser(
        "check",
        help="validate a manifest and run the preflights of run, then exit",
        description="Validate a manifest and run the preflights that run does: the data is "
        "there and loads, the model builds at its cut and runs on a batch of the data, the "
        "listen port is free, the TLS files load. Exit 0 means run starts.",
    )
    check.add_argument("manifest", nargs="?", default=DEFAULT_MANIFEST, help="the manifest")
    check.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    check.add_argument(
        "--run-dir", type=Path, default=None, help="also check that run could write here"
    )
    from orchestrator.ui.report import add_parser as add_report

    add_report(sub)
    from orchestrator.fleet.tls import add_parser as add_tls

    add_tls(sub)
    from orchestrator.ui.watch import add_parser as add_watch

    add_watch(sub)
    # Every command, also those other modules register, shows the same table in its --help.
    _finish_help(p, None)
    for name, parser in sub.choices.items():
        _finish_help(parser, name)
    return p


def default_run_dir(m: Manifest) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{m.testbed.name}-{m.training.algorithm}-s{m.training.seed}-{stamp}"
    return Path(m.testbed.runs_dir) / name


def _check(args: argparse.Namespace) -> int:
    from orchestrator.preflight import check_run_dir, preflight

    m = load_manifest(args.manifest, args.set)
    pre = preflight(m)  # the same preflights as run: check ok means run starts
    if args.run_dir is not None:
        check_run_dir(args.run_dir)
    exposed = secrets.exposed_warning(m)
    if exposed is not None:  # valid all the same: a warning, not an error
        print(f"warning: {exposed}", file=sys.stderr)
    local = sum(d.launch == "local" for d in m.devices)
    placed = sum(d.launch == "ray" for d in m.devices)
    if placed:  # whether the cluster answers, `run` says before it starts anything
        from orchestrator.fleet.rayfleet import import_ray

        import_ray(m)
    on_ray = f", {placed} on Ray at {m.ray.address}" if placed else ""
    host, port = m.listen_host_port()
    listen = f"{host}:{port}" if port else f"{host}, a free port"
    print(
        f"{args.manifest}: ok — {m.training.algorithm} on {m.training.dataset} "
        f"({len(pre.dataset.y_train)} training samples), {pre.model} cut at {pre.cut}, "
        f"{len(m.devices)} devices ({local} local{on_ray}), {m.training.rounds} rounds, "
        f"listening on {listen}"
    )
    return ExitCode.OK


async def _run_async(
    m: Manifest,
    run_dir: Path,
    dashboard: bool,
    in_process: bool,
    run_id: str,
    resume: Resume | None = None,
    dataset: Dataset | None = None,
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
        dataset=dataset,
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
    from orchestrator.preflight import claim_run_dir, preflight

    resume = None
    in_process = args.command == "simulate"
    if getattr(args, "resume", None) is not None:
        from orchestrator.records.resume import prepare_resume

        resume = prepare_resume(args.resume, args.set, args.run_dir)
        m, run_dir = resume.manifest, args.resume
        pre = preflight(m, network=not in_process)
    else:
        m = load_manifest(args.manifest, args.set)
        # Everything the user can get wrong fails here, in one line, before a run directory
        # exists (orchestrator/preflight.py; check runs the same).
        pre = preflight(m, network=not in_process)
        chosen = args.run_dir is not None
        run_dir = claim_run_dir(args.run_dir if chosen else default_run_dir(m), chosen)
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
        status = asyncio.run(
            _run_async(m, run_dir, dashboard, in_process, run_id, resume, dataset=pre.dataset)
        )
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
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`watch RUN | head -1`): as the Python docs advise for SIGPIPE,
        # point stdout at devnull so the interpreter's final flush cannot fail again, and exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.FAILED


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args)
        if args.command in ("report", "tls-init", "watch"):
            return int(args.func(args))
        return _run(args)
    except GapslError as exc:  # the user's to fix: one line, the class says which exit code
        if args.debug:
            raise
        print(f"gapsl-orchestrator: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

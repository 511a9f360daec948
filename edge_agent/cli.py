"""``gapsl-agent``: run a device's agent against an orchestrator, or check the device first.

Exit codes: 0 run ended, 1 job failed, 2 usage, 3 refused (id/token), 4 orchestrator unreachable,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .agent import Agent, AgentExit
from .checkpoint import default_root
from .config import AgentConfig
from .emulation import EmulationProfile
from .errors import TlsConfigError
from .tlsctx import client_ssl_context

# The token's environment variable: like --token-file, it keeps the token out of ``ps``.
TOKEN_ENV = "GAPSL_TOKEN"
# The defaults of the flags below are the config's own, so they exist once.
_DEFAULTS = AgentConfig(url="", device_id="", token="")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gapsl-agent",
        description="Edge agent of the GAPSL testbed: trains this device's client partition.",
        epilog="Exit codes: 0 ok, 1 job failed, 2 usage, 3 refused, 4 unreachable, 130 interrupted. "
        "'gapsl-agent doctor --help' checks a device before a run.",
    )
    p.add_argument("--orchestrator", required=True, help="ws://HOST:PORT or wss://HOST:PORT")
    p.add_argument("--id", required=True, dest="device_id", help="this device's id in the manifest")
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token", help=f"this device's token in the manifest (visible in ps; or ${TOKEN_ENV})"
    )
    token.add_argument(
        "--token-file", type=Path, help="read the token from this file (keeps it out of ps)"
    )
    p.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="with wss://: trust only this CA certificate (the ca.pem of tls-init)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="folder with train.npz/test.npz")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument(
        "--give-up-s",
        type=float,
        default=_DEFAULTS.give_up_s,
        help="stop redialling after this long without an orchestrator",
    )
    p.add_argument(
        "--idle-timeout-s",
        type=float,
        default=_DEFAULTS.idle_timeout_s,
        help="redial when the orchestrator has sent nothing for this long",
    )
    p.add_argument(
        "--send-timeout-s",
        type=float,
        default=_DEFAULTS.send_timeout_s,
        help="redial when a frame cannot be sent within this long",
    )
    p.add_argument("--max-message-bytes", type=int, default=_DEFAULTS.max_message_bytes)
    p.add_argument(
        "--compute-slowdown", type=float, default=1.0, help="emulate a slower device (>= 1)"
    )
    p.add_argument(
        "--compute-fixed-ms",
        type=float,
        default=0.0,
        help="emulate a fixed cost added to every compute step, whatever its batch (>= 0)",
    )
    p.add_argument("--uplink-mbps", type=float, default=0.0, help="emulated uplink (0 = unlimited)")
    p.add_argument(
        "--downlink-mbps", type=float, default=0.0, help="emulated downlink (0 = unlimited)"
    )
    p.add_argument("--rtt-ms", type=float, default=0.0, help="emulated round-trip time")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where to keep local checkpoints (default: $XDG_STATE_HOME/gapsl-agent)",
    )
    p.add_argument("--no-checkpoints", action="store_true", help="keep no local checkpoints")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _token(args: argparse.Namespace) -> str | None:
    """The token from --token, --token-file or $GAPSL_TOKEN; None (after saying why) if none."""
    if args.token is not None:
        return str(args.token)
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"gapsl-agent: cannot read --token-file: {exc}", file=sys.stderr)
            return None
        if args.token_file.stat().st_mode & 0o077:
            logging.getLogger(__name__).warning(
                "%s can be read by other users of this host: chmod 600 it", args.token_file
            )
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(f"gapsl-agent: give --token, --token-file or ${TOKEN_ENV}", file=sys.stderr)
        return None
    return token


def _doctor(argv: list[str]) -> int:
    from .doctor import run_doctor

    p = argparse.ArgumentParser(
        prog="gapsl-agent doctor", description="Check this device before a run."
    )
    p.add_argument("--orchestrator", default=None, help="check that this URL answers")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--dataset",
        default=None,
        help="load this training.dataset as a job would (a folder, or package.module:loader)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="build this training.model as a job would (e.g. package.module:factory)",
    )
    args = p.parse_args(argv)
    return run_doctor(
        args.orchestrator, args.data_dir, args.device, model=args.model, dataset=args.dataset
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:
        return _doctor(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {args.device_id} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        emulation = EmulationProfile(
            compute_slowdown=args.compute_slowdown,
            compute_fixed_ms=args.compute_fixed_ms,
            uplink_mbps=args.uplink_mbps,
            downlink_mbps=args.downlink_mbps,
            rtt_ms=args.rtt_ms,
        )
    except ValueError as exc:
        print(f"gapsl-agent: {exc}", file=sys.stderr)
        return AgentExit.USAGE
    try:
        client_ssl_context(args.ca_file, args.orchestrator)  # a bad --ca-file is a usage error
    except TlsConfigError as exc:
        print(f"gapsl-agent: {exc}", file=sys.stderr)
        return AgentExit.USAGE
    token = _token(args)
    if token is None:
        return AgentExit.USAGE
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    cfg = AgentConfig(
        url=args.orchestrator,
        device_id=args.device_id,
        token=token,
        data_dir=args.data_dir,
        download=args.download,
        device=args.device,
        emulation=emulation,
        max_message_bytes=args.max_message_bytes,
        give_up_s=args.give_up_s,
        idle_timeout_s=args.idle_timeout_s,
        send_timeout_s=args.send_timeout_s,
        ca_file=args.ca_file,
        checkpoint_dir=None if args.no_checkpoints else (args.checkpoint_dir or default_root()),
    )
    try:
        return int(asyncio.run(Agent(cfg).run()))
    except KeyboardInterrupt:
        return AgentExit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""The local fleet: devices with ``launch = "local"`` run as ``gapsl-agent`` subprocesses.

Every agent is stopped when the run ends, fails or is interrupted; on Linux each one also asks the
kernel to send it SIGTERM if the orchestrator dies (PR_SET_PDEATHSIG), so even a SIGKILLed
orchestrator leaves no orphans. Agent output goes to ``agents/<id>.log`` in the run directory.
Tokens reach the agents in files of mode 0600 in a private folder outside the run directory
(``--token-file``), never on a command line, and the folder is removed when the fleet stops.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Callable

from orchestrator.config.manifest import DeviceConfig
from orchestrator.fleet.netns import Wire

_PR_SET_PDEATHSIG = 1
# A local agent whose orchestrator is gone (or not yet listening) stops redialing after this
# long: the orchestrator starts its agents only once it listens, so a minute covers a respawn's
# start and a slow machine, yet no agent outlives its run by much.
AGENT_GIVE_UP_S = 60
# After the run's bye, agents get this long to leave by themselves (save, close, exit 0) ...
STOP_GRACE_S = 5.0
# ... then SIGTERM, then SIGKILL, each followed by this long a wait for the exits.
SIGNAL_WAIT_S = 3.0


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def agent_command(
    device: DeviceConfig,
    url: str,
    token_file: Path | None,
    data_dir: Path | None,
    download: bool,
    ca_file: Path | None = None,
) -> list[str]:
    """The command line that starts one agent. The token stays in ``token_file`` (or, when it
    is None, in the agent's ``$GAPSL_TOKEN``): a command line is readable by every user of the
    host (``ps``, ``/proc/PID/cmdline``)."""
    cmd = [sys.executable, "-m", "edge_agent", "--orchestrator", url, "--id", device.id]
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    cmd += ["--device", device.device]
    cmd += ["--give-up-s", str(AGENT_GIVE_UP_S)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    if download:
        cmd.append("--download")
    if ca_file is not None:
        cmd += ["--ca-file", str(ca_file)]
    em = device.emulate
    if em != type(em)():  # only non-default emulation goes on the command line
        cmd += [
            "--compute-slowdown",
            repr(em.compute_slowdown),
            "--uplink-mbps",
            repr(em.uplink_mbps),
        ]
        cmd += ["--downlink-mbps", repr(em.downlink_mbps), "--rtt-ms", repr(em.rtt_ms)]
        if em.compute_fixed_ms:
            cmd += ["--compute-fixed-ms", repr(em.compute_fixed_ms)]
    return cmd


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of an agent's log ("" when there is none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def private_dir() -> Path:
    """A new folder only this user can enter (0700), for secrets the agents read: in
    ``$XDG_RUNTIME_DIR`` (a per-user tmpfs) when there is one, else in the temp folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    parent = runtime if runtime and os.path.isdir(runtime) else None
    return Path(tempfile.mkdtemp(prefix="gapsl-tokens-", dir=parent))


def write_secret(path: Path, secret: str) -> Path:
    """Write ``secret`` to a new file of mode 0600 (never widened by the umask in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    return path


class LocalFleet:
    """Starts and always stops the local agents of a run."""

    def __init__(self, log_dir: Path, on_exit: Callable[[str, int], None]) -> None:
        self.log_dir = log_dir
        self.on_exit = on_exit
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._logs: list[IO[bytes]] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._commands: dict[str, list[str]] = {}
        self._env: dict[str, str] = {}
        self.token_dir: Path | None = None  # the agents' token files, private to this user
        self.stopping = False

    async def start(
        self,
        devices: list[DeviceConfig],
        url: str,
        data_dir: Path | None,
        download: bool,
        ca_file: Path | None = None,
        wires: Mapping[str, Wire] | None = None,
    ) -> None:
        """Start an agent per device; one in ``wires`` runs in its network namespace, dials the
        orchestrator at its veth pair's host end and leaves the shaping to the kernel."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Local agents share this machine's cores: one torch thread each avoids oversubscription.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        project_root = str(Path(__file__).resolve().parents[2])  # the folder holding orchestrator/
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (project_root, env.get("PYTHONPATH", "")) if p
        )
        self._env = env
        self.token_dir = private_dir()
        for device in devices:
            token_file = write_secret(self.token_dir / f"{device.id}.token", device.token)
            wire = (wires or {}).get(device.id)
            dial = url if wire is None else wire.url(url)
            told = device if wire is None else wire.device(device)
            cmd = agent_command(told, dial, token_file, data_dir, download, ca_file)
            cmd += ["--threads", "1", "--checkpoint-dir", str(self.log_dir / "checkpoints")]
            cmd = cmd if wire is None else wire.command(cmd)
            self._commands[device.id] = cmd
            await self._launch(device.id)

    def command(self, device_id: str) -> list[str]:
        """The command line this fleet starts ``device_id``'s agent with (valid while the run
        lasts: the token file it names is removed by :meth:`stop`), with :attr:`env`."""
        return list(self._commands[device_id])

    @property
    def env(self) -> dict[str, str]:
        """The environment the local agents are started with."""
        return dict(self._env)

    async def _launch(self, device_id: str) -> None:
        log = open(self.log_dir / f"{device_id}.log", "ab")
        self._logs.append(log)
        # The log says how its agent was started, so that it can be started again by hand.
        log.write(f"# started: {shlex.join(self._commands[device_id])}\n".encode())
        log.flush()
        kwargs: dict[str, Any] = {
            "stdout": log,
            "stderr": log,
            "env": self._env,
            "stdin": asyncio.subprocess.DEVNULL,
            "start_new_session": True,  # Ctrl-C reaches the orchestrator, which stops agents
        }
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = die_with_parent
        proc = await asyncio.create_subprocess_exec(*self._commands[device_id], **kwargs)
        self.procs[device_id] = proc
        self._watchers.append(
            asyncio.create_task(self._watch(device_id, proc), name=f"watch-{device_id}")
        )

    async def respawn(self, device_id: str) -> None:
        """Start a local agent again after it died; it resumes from its local checkpoint."""
        if self.stopping or device_id not in self._commands:
            return
        await self._launch(device_id)

    async def _watch(self, device_id: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.on_exit(device_id, code)

    def log_tail(self, device_id: str, lines: int = 5) -> str:
        return log_tail(self.log_dir / f"{device_id}.log", lines)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Give agents ``grace_s`` to leave after the run's bye, then terminate, then kill.

        Bounded: at most ``grace_s + 2 * SIGNAL_WAIT_S``. Cancelled part-way, it leaves the
        agents still alive to PR_SET_PDEATHSIG (SIGTERM when this process exits, on Linux).
        """
        self.stopping = True
        try:
            await self._end_agents(grace_s)
        finally:  # even when cancelled: the tokens must not outlive the run
            for log in self._logs:
                log.close()
            if self.token_dir is not None:
                shutil.rmtree(self.token_dir, ignore_errors=True)

    async def _end_agents(self, grace_s: float) -> None:
        await _wait_exits(self.procs.values(), grace_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self.procs.values() if p.returncode is None]
            if not alive:
                break
            for p in alive:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
            await _wait_exits(alive, SIGNAL_WAIT_S)
        for w in self._watchers:
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


async def _wait_exits(procs: Iterable[asyncio.subprocess.Process], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for every process still running to exit."""
    waits = [asyncio.ensure_future(p.wait()) for p in procs if p.returncode is None]
    if not waits:
        return
    try:
        await asyncio.wait(waits, timeout=timeout_s)
    finally:
        for w in waits:
            w.cancel()  # the ones still waiting: owned here, not left pending


def dial_host(host: str) -> str:
    """The address local agents dial for an orchestrator listening on ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)

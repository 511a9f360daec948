"""The faults ``bench.chaos`` injects into a local fleet, and how it finds what to hit.

Local agents are children of the orchestrator process (``--id`` names the device). A stall is
SIGSTOP, later SIGCONT; a kill is SIGKILL. A dropped connection cuts the agent's TCP connection
to the orchestrator while both processes live on: ``ss -K`` (SOCK_DESTROY: the agent's socket is
aborted, the orchestrator's end gets a RST) where the kernel and our privileges allow it, else
the agent's own socket is shut down through a duplicate of its descriptor (``pidfd_getfd``).
``tc netem`` would need a qdisc module that hosts often lack, and a proxy would change the very
path under test, so neither is used.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
CUT_CHECK_S = 2.0  # how long a cut connection may take to leave the kernel's table


class FaultError(RuntimeError):
    """A fault that cannot be injected on this machine at all (not one that missed its mark)."""


def agents_of(orchestrator_pid: int) -> dict[str, psutil.Process]:
    """The orchestrator's live local agents, by device id."""
    found: dict[str, psutil.Process] = {}
    try:
        children = psutil.Process(orchestrator_pid).children()
    except psutil.NoSuchProcess:
        return found
    for p in children:
        try:
            cmd = p.cmdline()
            if "edge_agent" in cmd and "--id" in cmd and p.status() != psutil.STATUS_ZOMBIE:
                found[cmd[cmd.index("--id") + 1]] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return found


def agents_in(run_dir: Path) -> list[psutil.Process]:
    """Every live agent process started for ``run_dir`` (its checkpoint folder names it),
    whoever its parent is now: what an orchestrator killed outright might leave behind."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or "edge_agent" not in cmd:
            continue
        if any(str(run_dir) in c for c in cmd):
            found.append(p)
    return found


def signal_pid(pid: int, sig: int) -> bool:
    """Send ``sig``; False when the process is gone already."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stall(pid: int) -> bool:
    return signal_pid(pid, signal.SIGSTOP)


def unstall(pid: int) -> bool:
    return signal_pid(pid, signal.SIGCONT)


def _links(pid: int, port: int) -> Iterator[Any]:
    """The process's established TCP connections to ``port`` (the orchestrator's)."""
    try:
        conns = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return
    for c in conns:
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED:
            yield c


def _still_open(pid: int, port: int, local_port: int) -> bool:
    end = time.monotonic() + CUT_CHECK_S
    while time.monotonic() < end:
        if not any(c.laddr.port == local_port for c in _links(pid, port)):
            return False
        time.sleep(0.05)
    return True


def _ss_kill(conn: Any, port: int) -> bool:
    cmd = ["ss", "-K", "-t", "dst", conn.raddr.ip, "dport", "=", str(port)]
    cmd += ["src", conn.laddr.ip, "sport", "=", str(conn.laddr.port)]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _shutdown_in(pid: int, fd: int) -> None:
    """Shut down the agent's socket ``fd`` (both ways) through a duplicate of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        os.close(pidfd)
    with socket.socket(fileno=dup) as s:
        s.shutdown(socket.SHUT_RDWR)


def cut_link(pid: int, port: int) -> str | None:
    """Cut ``pid``'s connection to the orchestrator at ``port``; how (``rst`` or ``shutdown``),
    or None when it has none open just now (it is dialling). FaultError when neither way
    works here."""
    conn = next(_links(pid, port), None)
    if conn is None:
        return None
    if _ss_kill(conn, port) and not _still_open(pid, port, conn.laddr.port):
        return "rst"
    try:
        _shutdown_in(pid, conn.fd)
    except (OSError, AttributeError) as exc:
        if not any(c.laddr.port == conn.laddr.port for c in _links(pid, port)):
            return None  # it closed by itself meanwhile: not our cut
        raise FaultError(
            f"cannot cut a connection here: ss -K did not close it and pidfd_getfd failed ({exc})"
        ) from exc
    return "shutdown"

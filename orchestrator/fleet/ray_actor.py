"""What runs on a Ray node for a ``launch = "ray"`` device: an actor that starts ``gapsl-agent``.

The actor (an async Ray actor; ``orchestrator.fleet.rayfleet`` wraps this class with
``ray.remote``) runs the same ``python -m edge_agent`` command line as a local agent, with the
node's own Python, as a subprocess that dies with the actor's worker (PR_SET_PDEATHSIG): a
killed actor leaves no agent behind. The token reaches the agent in its environment
(``GAPSL_TOKEN``), the lab CA's certificate in a file of mode 0600; both arrive as arguments of
the ``run`` call, which Ray does not keep, not of the actor's constructor, which it does.
Checkpoints and the agent's output live in a per-run folder of mode 0700 on the node, found
again by a respawned actor placed on the same node, and removed once the agent ends normally.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.fleet.launcher import SIGNAL_WAIT_S, die_with_parent

LOG_TAIL_BYTES = 64 * 1024  # how much of the agent's output goes back to the run directory


def state_dir(namespace: str, device_id: str) -> Path:
    """The node's folder for one device of one run (private to the user Ray runs as)."""
    root = Path(tempfile.gettempdir()) / f"gapsl-ray-{os.getuid()}" / namespace / device_id
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in (root, root.parent, root.parent.parent):
        os.chmod(p, 0o700)
    return root


class AgentHost:
    """One device's agent on the node Ray placed this actor on."""

    def __init__(self, device_id: str, namespace: str) -> None:
        self.device_id = device_id
        self.namespace = namespace
        self.proc: asyncio.subprocess.Process | None = None

    async def where(self) -> dict[str, Any]:
        """The node this actor runs on: its IP and id as Ray knows them, hostname, pid, and the
        GPUs Ray gave it (``num_gpus``; the agent sees them through CUDA_VISIBLE_DEVICES)."""
        import ray  # type: ignore[import-not-found, unused-ignore]

        ctx = ray.get_runtime_context()
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ctx.get_node_id(),
            "node_hostname": socket.gethostname(),
            "actor_pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    async def run(self, argv: list[str], token: str, ca_pem: str, threads: int) -> tuple[int, str]:
        """Run the agent (``argv``: its arguments after ``python -m edge_agent``) to its exit;
        returns its exit code and the tail of its output. Cancelling stops the agent."""
        state = state_dir(self.namespace, self.device_id)
        args = [*argv, "--threads", str(threads), "--checkpoint-dir", str(state / "checkpoints")]
        if ca_pem:
            ca = state / "ca.pem"
            fd = os.open(ca, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(ca_pem)
            args += ["--ca-file", str(ca)]
        import edge_agent

        env = dict(os.environ, GAPSL_TOKEN=token, PYTHONUNBUFFERED="1")
        env["OMP_NUM_THREADS"] = str(threads)
        root = str(Path(edge_agent.__file__).resolve().parent.parent)  # the agent this node has
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        log_path = state / "agent.log"
        with open(log_path, "ab") as log:
            kwargs: dict[str, Any] = {"stdout": log, "stderr": log, "env": env}
            if sys.platform.startswith("linux"):
                kwargs["preexec_fn"] = die_with_parent
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge_agent", *args,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, **kwargs,
            )  # fmt: skip
            try:
                code = await self.proc.wait()
            finally:
                await self.stop()
        tail = _tail(log_path)
        if code == 0:  # the run is over for this device: nothing on the node to resume from
            shutil.rmtree(state, ignore_errors=True)
        return code, tail

    async def stop(self) -> None:
        """Terminate the agent, then kill it; bounded by twice ``SIGNAL_WAIT_S``."""
        proc = self.proc
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc is None or proc.returncode is not None:
                return
            try:
                proc.send_signal(sig)
                await asyncio.wait_for(proc.wait(), SIGNAL_WAIT_S)
            except (ProcessLookupError, asyncio.TimeoutError):
                pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""

"""The kernel's link shaping for local agents (``testbed.link_shaper = "kernel"``).

Each local agent with an emulated link runs in a network namespace of its own, joined to this
machine by a veth pair: tbf on the agent's end shapes its uplink, tbf on the host's end its
downlink, and netem (where the kernel has it) delays each way by half the RTT; where it does
not, the agent keeps its own one-way delay for the RTT. The agent dials the host's end of its
pair, where the orchestrator listens too. Names carry the run id, so that what a killed
orchestrator left behind can be found and removed: ``ip netns list | grep gapsl-`` and
``ip netns del NAME`` (which removes the namespace's veth pair with it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from orchestrator.config.manifest import DeviceConfig, Manifest
from orchestrator.errors import RunError

KEY = "testbed.link_shaper"
# Each agent gets a /30 of this block (host end .1, agent end .2), one not already in use here.
SUBNET = ipaddress.IPv4Network("10.213.0.0/16")
# tbf's bucket: what passes at once after an idle spell. A millisecond of the rate, but at least
# two full-size packets (tbf stalls on a packet larger than its bucket): small next to the
# profiler's 512 KiB transfers, so their measured rate is the set one within about 3 %.
BURST_S = 0.001
MIN_BURST_BYTES = 2 * 1514
# tbf counts whole Ethernet frames, a set rate is of the payload (as the agent's own shaper counts
# it): the rate given to tbf is raised by the headers' share of a full-size TCP segment on the
# veth's 1500-byte MTU (14 Ethernet + 20 IP + 20 TCP + 12 timestamp option bytes).
WIRE_PER_PAYLOAD = 1514 / 1448
# Packets queue at most this long in tbf: long enough that a transfer is paced, not dropped.
QUEUE_MS = 500
TC_TIMEOUT_S = 10.0  # one `ip` or `tc` command; they answer in milliseconds


def wanted(m: Manifest) -> list[DeviceConfig]:
    """The local devices the kernel shapes: with ``link_shaper = "kernel"``, those with a link
    figure set (a device that only computes slower needs no namespace)."""
    if m.testbed.link_shaper != "kernel":
        return []
    return [
        d
        for d in m.devices
        if d.launch == "local"
        and max(d.emulate.uplink_mbps, d.emulate.downlink_mbps, d.emulate.rtt_ms) > 0
    ]


def _run(*cmd: str) -> str:
    """Run an ``ip``/``tc`` command; its output, or an OSError naming it and why it failed."""
    try:
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=TC_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise OSError(f"`{' '.join(cmd)}` failed: {why[-1] if why else exc.returncode}") from exc
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"`{' '.join(cmd)}` did not answer in {TC_TIMEOUT_S:g} s") from exc
    return done.stdout


def _quiet(*cmd: str) -> bool:
    try:
        _run(*cmd)
    except OSError:
        return False
    return True


def _missing() -> str | None:
    """Why this machine cannot shape with the kernel at all (cheap: no namespace is made)."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return 'needs root (network namespaces and tc); run as root or use "agent"'
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2) on PATH"
    return None


def check(m: Manifest) -> None:
    """The preflight: where the kernel cannot shape here, one ManifestError naming the key.

    Makes and removes a namespace holding a veth pair with tbf on it: root alone does not mean
    the kernel allows it (a container may refuse namespaces, a kernel may lack tbf)."""
    if not wanted(m):
        return
    problem = unavailable()
    if problem is None and m.tls_files() is not None:
        problem = "works with ws:// only (the agents dial addresses a certificate does not name)"
    if problem is not None:
        raise m.error(KEY, f'"kernel" {problem}')


def unavailable() -> str | None:
    """Why the kernel cannot shape links on this machine, or None when it can."""
    return _missing() or _trial(f"gapsl-check-{os.getpid()}")


def _trial(ns: str) -> str | None:
    try:
        _run("ip", "netns", "add", ns)
    except OSError as exc:
        return f"cannot make a network namespace here: {exc}"
    try:
        _in(ns, "ip", "link", "add", "gck0", "type", "veth", "peer", "name", "gck1")
        _in(ns, "tc", "qdisc", "add", "dev", "gck0", "root", *_tbf(1.0))
    except OSError as exc:
        return f"cannot shape a veth pair here: {exc}"
    finally:
        _quiet("ip", "netns", "del", ns)
    return None


def _in(ns: str, *cmd: str) -> None:
    _run("ip", "netns", "exec", ns, *cmd)


def _tbf(mbps: float) -> tuple[str, ...]:
    burst = max(MIN_BURST_BYTES, int(mbps * 1e6 / 8 * BURST_S))
    rate = mbps * 1e6 * WIRE_PER_PAYLOAD
    return ("tbf", "rate", f"{rate:.0f}bit", "burst", str(burst), "latency", f"{QUEUE_MS}ms")


@dataclass(frozen=True)
class Wire:
    """One agent's namespace and veth pair."""

    netns: str
    host_if: str
    agent_if: str
    host_ip: str
    agent_ip: str
    netem: bool  # the RTT is the kernel's too (else the agent's own delay)

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace (``ip netns exec`` execs it: the pid is the agent's)."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def device(self, d: DeviceConfig) -> DeviceConfig:
        """``d`` as its agent is told: no bandwidth of its own, and no RTT when netem has it."""
        em = replace(d.emulate, uplink_mbps=0.0, downlink_mbps=0.0)
        return replace(d, emulate=replace(em, rtt_ms=0.0) if self.netem else em)

    def url(self, url: str) -> str:
        """The orchestrator's ``url`` as this agent reaches it: at the host's end of its pair."""
        return re.sub(r"//[^/]*:", f"//{self.host_ip}:", url, count=1)


class KernelLinks:
    """Makes the namespaces of one run and always removes them (:meth:`close`)."""

    def __init__(self, run_id: str) -> None:
        self.tag = re.sub(r"[^a-z0-9]", "", run_id.lower())[:12] or "run"
        self.wires: dict[str, Wire] = {}
        self._made: list[Wire] = []
        self.netem = False

    def open(self, devices: Sequence[DeviceConfig]) -> dict[str, Wire]:
        """A namespace and a shaped veth pair per device; a RunError naming the failing command
        when one cannot be made (what was made is removed again)."""
        try:
            self.netem = _has_netem(f"gapsl-{self.tag}-netem")
            subnets = _free_subnets(len(devices))
            for i, (d, net) in enumerate(zip(devices, subnets)):
                self.wires[d.id] = self._wire(i, d, net)
        except OSError as exc:
            self.close()
            raise RunError(f'{KEY} = "kernel": {exc}') from exc
        return dict(self.wires)

    def _wire(self, i: int, d: DeviceConfig, net: ipaddress.IPv4Network) -> Wire:
        host_ip, agent_ip = (str(a) for a in list(net.hosts())[:2])
        # IFNAMSIZ: an interface name has at most 15 characters; "g" + 8 of the run id + "-N" + end
        name = f"g{self.tag[:8]}-{i}"
        w = Wire(f"gapsl-{self.tag}-{i}", f"{name}h", f"{name}a", host_ip, agent_ip, self.netem)
        _run("ip", "netns", "add", w.netns)
        self._made.append(w)
        _run("ip", "link", "add", w.host_if, "type", "veth", "peer", "name", w.agent_if)
        _run("ip", "link", "set", w.agent_if, "netns", w.netns)
        _run("ip", "addr", "add", f"{host_ip}/{net.prefixlen}", "dev", w.host_if)
        _run("ip", "link", "set", w.host_if, "up")
        _in(w.netns, "ip", "addr", "add", f"{agent_ip}/{net.prefixlen}", "dev", w.agent_if)
        _in(w.netns, "ip", "link", "set", w.agent_if, "up")
        _in(w.netns, "ip", "link", "set", "lo", "up")
        em = d.emulate
        _shape(w.agent_if, em.uplink_mbps, em.rtt_ms if self.netem else 0.0, w.netns)
        _shape(w.host_if, em.downlink_mbps, em.rtt_ms if self.netem else 0.0, None)
        return w

    def close(self) -> None:
        """Remove every namespace and veth pair this run made (a missing one is no error)."""
        for w in self._made:
            _quiet("ip", "link", "del", w.host_if)  # removes both ends; the namespace's goes next
            _quiet("ip", "netns", "del", w.netns)
        self._made.clear()


def _shape(dev: str, mbps: float, rtt_ms: float, ns: str | None) -> None:
    """tbf at ``mbps`` on ``dev``'s egress, under netem's delay of half the RTT when given."""
    run = _run if ns is None else (lambda *c: _in(ns, *c))
    parent: tuple[str, ...] = ("root",)
    if rtt_ms > 0:  # tc-netem(8): netem at the root, the rate limit as its child
        run(
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "handle",
            "1:",
            "netem",
            "delay",
            f"{rtt_ms / 2:g}ms",
        )
        parent = ("parent", "1:1", "handle", "10:")
    if mbps > 0:
        run("tc", "qdisc", "add", "dev", dev, *parent, *_tbf(mbps))


def _has_netem(ns: str) -> bool:
    """Whether this kernel has netem (a module some kernels are built without), tried on the
    loopback of a namespace made for the purpose."""
    _run("ip", "netns", "add", ns)
    try:
        return _quiet(
            "ip",
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "netem",
            "delay",
            "1ms",
        )
    finally:
        _quiet("ip", "netns", "del", ns)


def _free_subnets(n: int) -> list[ipaddress.IPv4Network]:
    """``n`` /30s of :data:`SUBNET` that no interface of this machine has an address in (other
    runs' host ends included)."""
    out = _run("ip", "-4", "-o", "addr", "show")
    used = [ipaddress.ip_interface(a).ip for a in re.findall(r"inet (\S+)", out)]
    free = (net for net in SUBNET.subnets(new_prefix=30) if not any(a in net for a in used))
    picked = [net for _, net in zip(range(n), free)]
    if len(picked) < n:
        raise OSError(f"no free /30 left in {SUBNET} for {n} agents")
    return picked


async def kernel_links(
    m: Manifest,
    run_id: str,
    stack: contextlib.AsyncExitStack,
    listen: Callable[[list[str]], Any],
    event: Callable[[str, str | None, dict[str, Any]], None],
) -> dict[str, Wire]:
    """The run's wires (none unless ``link_shaper = "kernel"``), removed when ``stack``
    unwinds, with a listener from ``listen`` at their host ends (never the wildcard address:
    each socket is bound to one veth's address, reachable from its namespace alone)."""
    devices = wanted(m)
    if not devices:
        return {}
    links = KernelLinks(run_id)
    stack.callback(links.close)  # registered first: it runs even if open fails half-way
    wires = links.open(devices)  # milliseconds per agent: not worth a thread that could outlive us
    await stack.enter_async_context(listen([w.host_ip for w in wires.values()]))
    fields: dict[str, Any] = {"agents": len(wires), "rtt": "netem" if links.netem else "agent"}
    if not links.netem:
        fields["why"] = (
            "this kernel has no netem: each agent keeps its own one-way delay for the RTT"
        )
    event("kernel_links", None, fields)
    return wires

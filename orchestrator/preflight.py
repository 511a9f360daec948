"""The preflights: what a user can get wrong that would otherwise show only once a run started.

``check`` and ``run``/``simulate`` call the same functions, so ``check`` passing means ``run``
starts: the compute devices asked for exist here; the data is there, loads and fingerprints as
the devices will check it; the model builds at its cut and runs forward on a batch of the
dataset's images; the listen address can be bound (and is released again at once); the TLS
files load. Each failure is one ``ManifestError`` naming the key to fix (exit 2); a run
directory that already holds files is a ``PreflightError`` naming it (exit 2).
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_agent.data import DATASETS, Dataset, load_dataset
from edge_agent.errors import DataError
from models import available_models, build_split, model_info, resolve_model, select_device
from models.errors import ModelError, SpecError, UnknownChoiceError
from models.spec import is_spec
from orchestrator.config.manifest import Manifest
from orchestrator.config.values import split_listen
from orchestrator.errors import PreflightError
from orchestrator.fleet import netns
from orchestrator.fleet.tls import TlsError, server_ssl_context
from orchestrator.ui.prometheus import METRICS_KEY, require_metrics

__all__ = [
    "Preflight",
    "bind_problem",
    "check_devices",
    "check_schedule",
    "check_listen",
    "check_model",
    "check_run_dir",
    "check_tls",
    "claim_run_dir",
    "load_data",
    "preflight",
]


@dataclass(frozen=True)
class Preflight:
    """What the preflights found: the loaded data (the run reuses it) and the resolved model."""

    dataset: Dataset
    model: str  # "auto" resolved to the dataset's default
    cut: str  # "default" resolved to the model's default cut
    fingerprint: str  # Dataset.fingerprint, as every device checks its own copy


def preflight(m: Manifest, network: bool = True) -> Preflight:
    """Every preflight of ``m``, cheapest first; ``network=False`` (simulate) skips TLS and
    the listen address, which the in-process engine does not use."""
    require_metrics(m)  # the in-process engine serves metrics too
    if network:
        check_tls(m)
        check_listen(m)
        netns.check(m)  # testbed.link_shaper = "kernel": root, iproute2, namespaces allowed
        if any(d.launch == "ray" for d in m.devices):  # Ray installed, its head answering
            from orchestrator.fleet.rayfleet import check_reachable

            check_reachable(m)
    check_devices(m)
    check_schedule(m)
    ds = load_data(m)
    model, cut = check_model(m, ds)
    return Preflight(ds, model, cut, ds.fingerprint)


def check_schedule(m: Manifest) -> None:
    """A rule that averages across devices position by position (EPSL) needs equal batches."""
    from orchestrator.algorithms.dispatch import rule_class

    if rule_class(m.training.algorithm).uniform_batches and m.scheduler.policy != "uniform":
        raise m.error(
            "scheduler.policy",
            f'is "{m.scheduler.policy}", but training.algorithm = "{m.training.algorithm}" '
            'needs every device at one batch size ("uniform")',
        )


def check_devices(m: Manifest) -> None:
    """The compute devices this machine must provide: the server partition's, and those of
    the local agents (a remote device's is its own machine's business, checked by its agent)."""
    wanted = [("server.device", m.server.device)]
    wanted += [(f"devices.{d.id}.device", d.device) for d in m.devices if d.launch == "local"]
    for key, device in wanted:
        try:
            select_device(device)
        except ModelError as exc:  # DeviceUnavailable: e.g. "cuda" on a machine without one
            raise m.error(key, str(exc)) from exc


def load_data(m: Manifest) -> Dataset:
    """The run's dataset, loaded as ``prepare_job`` will load it; a DataError names data.dir
    (for a built-in image set) or training.dataset (digits, a folder or a loader of one's own)."""
    name = m.training.dataset
    try:
        ds = load_dataset(m.dataset_spec(), m.data_dir(), download=m.data.download)
        ds.fingerprint  # noqa: B018  (computed here: a failure names the key)
    except DataError as exc:  # its text says where it looked and what to do
        # digits ships with scikit-learn and ignores data.dir: its only failure is the package
        key = "data.dir" if name in DATASETS and name != "digits" else "training.dataset"
        raise m.error(key, str(exc)) from exc
    return ds


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def check_model(m: Manifest, ds: Dataset) -> tuple[str, str]:
    """Build the model at its cut and run it forward once on a batch of ``ds``.

    Returns ``(model, cut)`` resolved. A model built for other images (a 3-channel model on
    1-channel digits) would otherwise fail on the first device's first batch, mid-run.
    """
    t = m.training
    try:
        name = resolve_model(t.model, t.dataset, ds.input_shape)
        # a factory of one's own declares no input shape: the forward run below checks it
        info = None if is_spec(name) else model_info(name)
    except ModelError as exc:
        raise m.error("training.model", str(exc)) from exc
    if info is not None and tuple(info.input_shape) != ds.input_shape:
        fits = [n for n in available_models() if model_info(n).input_shape == ds.input_shape]
        raise m.error(
            "training.model",
            f"{name} takes {_shape(info.input_shape)} images, but {t.dataset} has "
            f'{_shape(ds.input_shape)}; use "auto" or one of: {", ".join(fits) or "none"}',
        )
    try:
        with torch.random.fork_rng(devices=[]):  # the run's seeded weights are not disturbed
            split = build_split(name, t.cut, num_classes=ds.num_classes)
    except SpecError as exc:  # the factory does not import, run or return stages
        raise m.error("training.model", str(exc)) from exc
    except UnknownChoiceError as exc:
        raise m.error("training.cut", str(exc)) from exc
    batch = torch.from_numpy(ds.normalize(ds.x_train[:2]))
    try:
        with torch.no_grad():
            logits = split.forward(batch)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise m.error(
            "training.model", f"{name} cut at {split.cut} does not run on {t.dataset}: {first}"
        ) from exc
    if tuple(logits.shape) != (len(batch), ds.num_classes):
        raise m.error(
            "training.model",
            f"{name} gives outputs shaped {tuple(logits.shape)} for a batch of {len(batch)}, "
            f"not {ds.num_classes} class scores each",
        )
    return name, split.cut


def bind_problem(exc: OSError, host: str, port: int) -> str:
    """What to tell the user when ``host:port`` cannot be bound (also the engine's, should
    another process take the port between the preflight and the run's own bind)."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where} is already in use (another run or program listens there); stop it, "
            "pick another port, or use port 0 for a free one"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; use 0.0.0.0 to listen on all of them"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need root)"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def check_listen(m: Manifest) -> None:
    """Bind every address ``testbed.listen`` resolves to, then release them at once; the same
    for ``testbed.metrics_listen`` when the run serves its metrics."""
    host, port = m.listen_host_port()
    _check_bind(m, "testbed.listen", host, port)
    if m.testbed.metrics_listen:
        _check_bind(m, METRICS_KEY, *split_listen(m.testbed.metrics_listen))


def _check_bind(m: Manifest, key: str, host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise m.error(key, f"cannot resolve host {host!r}: {exc.strerror}") from exc
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            # As the server's own socket will be (asyncio's defaults): a port left in TIME_WAIT
            # by an earlier run is free, and IPv6 does not also claim the IPv4 port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise m.error(key, bind_problem(exc, host, port)) from exc


def _readable(m: Manifest, key: str, path: Path) -> None:
    if not path.is_file():
        raise m.error(key, f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise m.error(key, f"{path}: cannot read: {exc.strerror or exc}") from exc


def check_tls(m: Manifest) -> None:
    """With TLS on: the certificate and key load together, and the CA local agents get loads."""
    tls = m.tls_files()
    if tls is None:
        return
    _readable(m, "testbed.tls_cert", tls.cert)
    _readable(m, "testbed.tls_key", tls.key)
    try:
        server_ssl_context(tls.cert, tls.key)
    except TlsError as exc:
        raise m.error("testbed.tls_cert", str(exc)) from exc
    if tls.ca is not None:
        _readable(m, "testbed.tls_ca", tls.ca)
        try:
            ssl.create_default_context(cafile=str(tls.ca))
        except (ssl.SSLError, OSError) as exc:
            raise m.error(
                "testbed.tls_ca", f"{tls.ca}: not a usable PEM CA certificate ({exc})"
            ) from exc


def check_run_dir(path: Path) -> None:
    """A chosen run directory must be new or empty: one run's records are never mixed."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PreflightError(
            f"{path}: the run directory already exists and holds files; choose another "
            f"--run-dir, or continue an interrupted run with: gapsl-orchestrator run --resume {path}"
        )


def claim_run_dir(path: Path, chosen: bool) -> Path:
    """Create the run directory. A chosen one (``--run-dir``) must be new or empty; a default
    one that is taken (two runs started in the same second) gets a ``-2``, ``-3``, ... suffix.
    ``mkdir`` is the claim, so two runs starting at once never share a directory."""
    if chosen:
        check_run_dir(path)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise PreflightError(f"{path}: a thousand run directories of this name exist already")

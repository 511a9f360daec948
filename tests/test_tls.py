"""Tests of ``wss://`` with a lab CA: real TLS handshakes over real sockets on localhost.

One lab CA (and a second, unrelated one) is made for the module; each test starts a websockets
server with the orchestrator's server context on 127.0.0.1, port 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import stat
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidHandshake

from edge_agent.tlsctx import TlsConfigError, client_ssl_context, describe_tls_failure
from orchestrator.errors import ExitCode, GapslError
from orchestrator.fleet.tls import (
    LabFiles,
    TlsError,
    TlsFilesExistError,
    add_parser,
    create_lab_ca,
    server_ssl_context,
)

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
T = TypeVar("T")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabFiles:
    return create_lab_ca(tmp_path_factory.mktemp("lab"), hosts=["lab-server", "10.20.30.40"])


@pytest.fixture(scope="module")
def other_lab(tmp_path_factory: pytest.TempPathFactory) -> LabFiles:
    return create_lab_ca(tmp_path_factory.mktemp("other"), hosts=[])


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


def _with_tls_server(lab: LabFiles, client: Callable[[int], Awaitable[T]]) -> T:
    """Run ``client(port)`` against an echo server that speaks only wss:// on 127.0.0.1."""

    async def scenario() -> T:
        context = server_ssl_context(lab.server_cert, lab.server_key)
        async with serve(_echo, "127.0.0.1", 0, ssl=context) as server:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.wait_for(client(port), timeout=10 * SCALE)

    return asyncio.run(scenario())


def test_a_client_trusting_the_lab_ca_exchanges_frames_over_wss(lab: LabFiles) -> None:
    async def client(port: int) -> tuple[bytes, str | None]:
        async with connect(
            f"wss://127.0.0.1:{port}", ssl=client_ssl_context(lab.ca_cert), open_timeout=5 * SCALE
        ) as ws:
            await ws.send(b"\x81\xa4type\xa5hello")
            echoed = await ws.recv()
            tls = ws.transport.get_extra_info("ssl_object")
            assert isinstance(echoed, bytes)
            return echoed, tls.version() if tls is not None else None

    echoed, version = _with_tls_server(lab, client)
    assert echoed == b"\x81\xa4type\xa5hello"
    assert version in ("TLSv1.2", "TLSv1.3")


def test_the_server_name_is_checked_too(lab: LabFiles) -> None:
    # "localhost" is always in the certificate; a name that is not fails the hostname check.
    async def client(port: int) -> None:
        context = client_ssl_context(lab.ca_cert, f"wss://localhost:{port}")
        async with connect(f"wss://localhost:{port}", ssl=context, open_timeout=5 * SCALE):
            pass
        async with connect(
            f"wss://127.0.0.1:{port}", ssl=context, server_hostname="elsewhere.example"
        ):
            pass

    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _with_tls_server(lab, client)
    hint = describe_tls_failure(info.value)
    assert hint is not None and "--host" in hint


def test_a_client_trusting_another_ca_fails_verification(
    lab: LabFiles, other_lab: LabFiles
) -> None:
    async def client(port: int) -> None:
        async with connect(
            f"wss://127.0.0.1:{port}",
            ssl=client_ssl_context(other_lab.ca_cert),
            open_timeout=5 * SCALE,
        ):
            pass

    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _with_tls_server(lab, client)
    assert "ca.pem" in (describe_tls_failure(info.value) or "")


def test_a_plain_ws_agent_is_refused_when_tls_is_on(lab: LabFiles) -> None:
    async def client(port: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}", open_timeout=5 * SCALE):
            pass

    # The server reads the HTTP upgrade as a broken TLS record and drops the connection.
    with pytest.raises((InvalidHandshake, OSError, EOFError)):
        _with_tls_server(lab, client)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_keys_are_private_and_certificates_readable(lab: LabFiles) -> None:
    for key in (lab.server_key, lab.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for cert in (lab.server_cert, lab.ca_cert):
        assert not stat.S_IMODE(cert.stat().st_mode) & 0o022
    assert not [p for p in lab.ca_cert.parent.iterdir() if p.name.startswith(".")]


def test_the_certificate_names_the_given_hosts_and_loopback(lab: LabFiles) -> None:
    cert = x509.load_pem_x509_certificate(lab.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["lab-server", "localhost"]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert ips == ["10.20.30.40", "127.0.0.1", "::1"]
    assert lab.hosts == ("lab-server", "10.20.30.40", "localhost", "127.0.0.1", "::1")
    ca = x509.load_pem_x509_certificate(lab.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("host", ["lab server", "https://lab", "10.0.0.1:8765", "10.0.0.300", ""])
def test_a_bad_host_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(TlsError, match="--host"):
        create_lab_ca(tmp_path, hosts=[host])
    assert not list(tmp_path.iterdir())


def test_server_context_errors_name_the_files(lab: LabFiles, other_lab: LabFiles) -> None:
    with pytest.raises(TlsError, match="does not belong"):
        server_ssl_context(lab.server_cert, other_lab.server_key)
    with pytest.raises(TlsError, match="not found"):
        server_ssl_context(lab.server_cert.with_name("missing.pem"), lab.server_key)
    assert issubclass(TlsError, GapslError)


def test_client_context_follows_the_url(lab: LabFiles, tmp_path: Path) -> None:
    assert client_ssl_context(None, "ws://10.0.0.1:8765") is None
    system = client_ssl_context(None, "wss://lab-server:8765")
    assert system is not None and system.check_hostname
    assert system.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TlsConfigError, match="wss://"):
        client_ssl_context(lab.ca_cert, "ws://10.0.0.1:8765")
    with pytest.raises(TlsConfigError, match="no such file"):
        client_ssl_context(tmp_path / "absent.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="no PEM certificate"):
        client_ssl_context(not_pem)


def _tls_init(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gapsl-orchestrator")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args: Any = parser.parse_args(["tls-init", *argv])
    return int(args.func(args))


def test_tls_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tls"
    assert _tls_init([str(out), "--host", "lab-server", "--host", "192.168.1.10"]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert f'tls_cert = "{(out / "server.pem").resolve()}"' in printed
    assert f'tls_key = "{(out / "server-key.pem").resolve()}"' in printed
    assert "--ca-file" in printed and "wss://lab-server:" in printed
    first_ca = (out / "ca.pem").read_bytes()

    assert _tls_init([str(out), "--host", "lab-server"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err
    assert (out / "ca.pem").read_bytes() == first_ca
    with pytest.raises(TlsFilesExistError):
        create_lab_ca(out, hosts=[])

    assert _tls_init([str(out), "--host", "lab-server", "--force"]) == ExitCode.OK
    assert (out / "ca.pem").read_bytes() != first_ca


def test_tls_errors_are_usage_errors_under_the_root() -> None:
    # A bad host, validity or file is the user's to fix: one line and exit 2, like a bad manifest.
    assert issubclass(TlsFilesExistError, TlsError)
    assert TlsError.exit_code == TlsFilesExistError.exit_code == ExitCode.USAGE

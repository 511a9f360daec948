"""TLS for a lab testbed: a small lab certificate authority and the orchestrator's ``wss://`` side.

``gapsl-orchestrator tls-init OUT_DIR --host NAME ...`` makes a CA certificate (copied to every
device, which then trusts nothing else for this orchestrator) and a server certificate signed by
it for the names and addresses the devices dial. The manifest's ``testbed.tls_cert`` and
``testbed.tls_key`` then turn the orchestrator's listener into ``wss://``, and a device that
dials plain ``ws://`` fails its handshake. ``cryptography`` is imported only when certificates are
made or inspected, so the rest of the orchestrator does not depend on it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
import re
import socket
import ssl
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Union

from orchestrator.config.values import toml_str
from orchestrator.errors import ExitCode, GapslError

__all__ = [
    "ALWAYS_HOSTS",
    "LabFiles",
    "TlsError",
    "TlsFilesExistError",
    "add_parser",
    "create_lab_ca",
    "run_tls",
    "server_ssl_context",
]

INSTALL_HINT = "pip install 'gapsl-testbed[tls]'  (or: pip install cryptography)"
# Local agents dial loopback (see the engine's dial host), so the certificate always covers it.
ALWAYS_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca-key.pem", "server.pem", "server-key.pem"
DEFAULT_DAYS = 825  # the longest validity that every mainstream TLS client still accepts
# Lab devices without a real-time clock (Raspberry Pi) may boot a little behind: backdate.
_BACKDATE = _dt.timedelta(days=1)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class TlsError(GapslError):
    """A certificate or key cannot be made or used; the message names the file or host."""

    exit_code = ExitCode.USAGE  # the user's files or flags are wrong, as with a bad manifest


class TlsFilesExistError(TlsError):
    """``tls-init`` would overwrite existing certificate or key files (``--force`` allows it)."""


@dataclass(frozen=True)
class LabFiles:
    """What :func:`create_lab_ca` wrote: CA certificate and key, server certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_key: Path
    hosts: tuple[str, ...]  # the SubjectAltName entries of the server certificate, in order


def lab_paths(out_dir: Path) -> tuple[Path, Path, Path, Path]:
    """``(ca_cert, server_cert, server_key, ca_key)`` as :func:`create_lab_ca` names them."""
    return (out_dir / CA_CERT, out_dir / SERVER_CERT, out_dir / SERVER_KEY, out_dir / CA_KEY)


def _parse_host(host: str) -> str | IpAddress:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):  # "[::1]", as in a URL
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    name = text.rstrip(".").lower()
    labels = name.split(".")
    # An all-digit last label is a mistyped IP address (no top-level domain is numeric).
    if (
        name
        and len(name) <= 253
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    ):
        return name
    raise TlsError(
        f"--host {host!r}: not a DNS name or an IP address (give the name or address devices "
        "dial, without a scheme or port)"
    )


def _subject_alt_names(hosts: Sequence[str]) -> list[str | IpAddress]:
    seen: list[str | IpAddress] = []
    for host in [*hosts, *ALWAYS_HOSTS]:
        parsed = _parse_host(host)
        if parsed not in seen:
            seen.append(parsed)
    return seen


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, the new file having ``mode`` from its creation.

    A key must never exist, even briefly, with wider permissions: the temporary file is created
    0600 (mkstemp) and then widened to ``mode`` if that is wider, before it takes the name.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _need_cryptography() -> None:
    # An optional dependency (the `tls` extra): say what to install, in one line.
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise TlsError(
            f"making certificates needs the cryptography package, which is not installed: "
            f"{INSTALL_HINT}"
        ) from exc


def create_lab_ca(
    out_dir: Path, *, hosts: Sequence[str], days: int = DEFAULT_DAYS, force: bool = False
) -> LabFiles:
    """Create a lab CA and a server certificate it signs for ``hosts``, under ``out_dir``.

    ``hosts`` are DNS names or IP addresses (IPv6 may be bracketed); ``localhost``,
    ``127.0.0.1`` and ``::1`` are always added. Keys are ECDSA P-256 and are written with
    permissions 0600, certificates 0644. Raises :class:`TlsFilesExistError` when any of the four
    files exists and ``force`` is false (nothing is written then), :class:`TlsError` for a bad
    host or validity.
    """
    if days < 1:
        raise TlsError(f"--days must be >= 1, got {days}")
    _need_cryptography()  # before anything is written
    names = _subject_alt_names(hosts)
    ca_cert_path, cert_path, key_path, ca_key_path = lab_paths(out_dir)
    existing = [p for p in (ca_cert_path, ca_key_path, cert_path, key_path) if p.exists()]
    if existing and not force:
        listed = ", ".join(p.name for p in existing)
        raise TlsFilesExistError(
            f"{out_dir}: {listed} already exist; use --force to replace them (devices that "
            f"trust the old {CA_CERT} then need the new one)"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlsError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = _dt.datetime.now(_dt.timezone.utc)
    start, end = now - _BACKDATE, now + _dt.timedelta(days=days)

    def key_usage(*, signs_certs: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not signs_certs,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=signs_certs,
            crl_sign=signs_certs,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GAPSL testbed"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"GAPSL lab CA ({socket.gethostname()[:40]})"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length 0: this CA signs server certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(signs_certs=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    first = str(names[0])
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(n) if isinstance(n, str) else x509.IPAddress(n) for n in names
    ]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GAPSL testbed"),
                    # Clients match the SubjectAltName; the common name is only for people.
                    x509.NameAttribute(
                        NameOID.COMMON_NAME, first if len(first) <= 64 else "gapsl-orchestrator"
                    ),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(signs_certs=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        # Strict verifiers (Python >= 3.13's default context) insist on the authority key id.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        # Unencrypted: the orchestrator starts unattended; the 0600 mode is the protection.
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    pem = serialization.Encoding.PEM
    try:
        # Keys first: a certificate on disk without its key would be of no use.
        _write_private(ca_key_path, key_pem(ca_key), 0o600)
        _write_private(key_path, key_pem(server_key), 0o600)
        _write_private(ca_cert_path, ca_cert.public_bytes(pem), 0o644)
        _write_private(cert_path, server_cert.public_bytes(pem), 0o644)
    except OSError as exc:
        raise TlsError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    return LabFiles(
        ca_cert=ca_cert_path,
        server_cert=cert_path,
        server_key=key_path,
        ca_key=ca_key_path,
        hosts=tuple(str(n) for n in names),
    )


def _refuse_password() -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal and hang an unattended start.
    raise TlsError("encrypted private keys are not supported (the orchestrator starts unattended)")


def _check_validity(cert: Path) -> None:
    """Raise a clear TlsError for an expired certificate (clients would only say "expired")."""
    try:
        from cryptography import x509
    except ImportError:  # the check is a courtesy; the TLS handshake enforces validity anyway
        return
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError:
        return  # not PEM as cryptography reads it: load_cert_chain gives the real error
    end = getattr(parsed, "not_valid_after_utc", None)  # cryptography >= 42
    if end is None:
        end = parsed.not_valid_after.replace(tzinfo=_dt.timezone.utc)
    if end <= _dt.datetime.now(_dt.timezone.utc):
        raise TlsError(
            f"{cert}: the certificate expired on {end:%Y-%m-%d}; make a new one "
            "(gapsl-orchestrator tls-init OUT_DIR --force) and give devices the new ca.pem"
        )


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``cert`` (PEM, may hold a chain) with ``key``.

    Raises :class:`TlsError` naming the file for a missing or unreadable file, a key that does
    not match the certificate, an encrypted key, or an expired certificate.
    """
    for label, path in (("certificate", cert), ("private key", key)):
        if not path.is_file():
            raise TlsError(f"{path}: TLS {label} not found")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"{key}: this private key does not belong to {cert}") from exc
        raise TlsError(f"{cert} / {key}: not a usable PEM certificate and key ({exc})") from exc
    except OSError as exc:
        raise TlsError(f"{cert} / {key}: cannot read: {exc.strerror or exc}") from exc
    _check_validity(cert)
    return context


# --- tls-init ----------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register the ``tls-init`` command (its handler is ``run_tls``, also set as ``func``)."""
    p = sub.add_parser(
        "tls-init",
        help="create a lab CA and a server certificate for wss://",
        description="Create a lab CA and a server certificate it signs, for wss:// between "
        "the orchestrator and the devices, and print the manifest keys and agent flags to use.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address the devices dial (repeat for several); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=run_tls)


def run_tls(args: argparse.Namespace) -> int:
    """Handle ``tls-init``: write the files and print how to use them. 0 ok, 2 bad usage."""
    try:
        files = create_lab_ca(args.out_dir, hosts=args.host, days=args.days, force=args.force)
    except TlsError as exc:
        print(f"gapsl-orchestrator: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    ca, cert, key = (p.resolve() for p in (files.ca_cert, files.server_cert, files.server_key))
    dial = args.host[0].strip() if args.host else "localhost"
    if ":" in dial and not dial.startswith("["):
        dial = f"[{dial}]"  # an IPv6 address in a URL
    lines = [
        f"lab CA and server certificate for {', '.join(files.hosts)} ({args.days} days):",
        f"  {ca}  CA certificate: copy it to every device",
        f"  {files.ca_key.resolve()}  CA key: keep it on this machine only",
        f"  {cert}  server certificate",
        f"  {key}  server key",
        "",
        "manifest, in [testbed]:",
        f"  tls_cert = {toml_str(str(cert))}",
        f"  tls_key = {toml_str(str(key))}",
        f"  tls_ca = {toml_str(str(ca))}  # what local agents trust",
        "",
        f"on each device, with its copy of {CA_CERT} (the port is the one of testbed.listen):",
        f"  gapsl-agent --orchestrator wss://{dial}:8765 --ca-file /path/to/{CA_CERT} "
        "--id DEVICE_ID --token-file TOKEN_FILE",
    ]
    print("\n".join(lines), flush=True)
    return ExitCode.OK

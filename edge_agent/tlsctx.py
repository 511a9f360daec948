"""The agent's side of ``wss://``: which certificate authority it trusts for the orchestrator.

Only the standard library's ``ssl``: a lab device needs no extra package to verify the lab CA's
certificate that ``gapsl-orchestrator tls-init`` made. Verification is never switched off: with a
CA file the orchestrator must present a certificate that CA signed, for the host name or address
in the URL; without one, the system's trust store decides.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from .errors import TlsConfigError

__all__ = ["TlsConfigError", "client_ssl_context", "describe_tls_failure"]


def _scheme(url: str) -> str:
    try:
        return urlsplit(url.strip()).scheme.lower()
    except ValueError:  # e.g. an unclosed "[" : websockets reports the bad URL itself
        return ""


def client_ssl_context(ca_file: Path | None, url: str | None = None) -> ssl.SSLContext | None:
    """The ``ssl`` argument for ``connect(url, ssl=...)``.

    - ``ca_file`` given: a TLS 1.2+ context that trusts only the certificates in that PEM file,
      with host name checking on. With a ``ws://`` ``url`` this is a mistake (the orchestrator
      would be reached without TLS while the user asked for verification): TlsConfigError.
    - no ``ca_file`` and a ``wss://`` ``url``: the same, trusting the system's store (for an
      orchestrator with a publicly trusted certificate).
    - otherwise (plain ``ws://``, or no url): None, no TLS.
    """
    scheme = _scheme(url) if url is not None else ""
    if ca_file is None:
        return _context(None) if scheme == "wss" else None
    if scheme == "ws":
        raise TlsConfigError(f"--ca-file is for wss:// URLs; the orchestrator URL is {url}")
    return _context(ca_file)


def _context(ca_file: Path | None) -> ssl.SSLContext:
    # create_default_context: CERT_REQUIRED and check_hostname, the secure defaults.
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if ca_file is None else str(ca_file)
        )
    except FileNotFoundError as exc:
        raise TlsConfigError(f"--ca-file {ca_file}: no such file") from exc
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"--ca-file {ca_file}: no PEM certificate in it (use the ca.pem that "
            f"'gapsl-orchestrator tls-init' wrote): {exc}"
        ) from exc
    except OSError as exc:
        raise TlsConfigError(f"--ca-file {ca_file}: cannot read: {exc.strerror or exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def describe_tls_failure(exc: BaseException) -> str | None:
    """A hint for a failed certificate check, or None when ``exc`` is not one.

    The agent keeps redialling after such a failure (a device that booted with its clock behind
    recovers once NTP has set it), so the hint is what tells the user the likely fix.
    """
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return None
    message = str(exc.verify_message or exc)
    if "not yet valid" in message or "expired" in message:
        hint = "check this device's clock (date; NTP) and the certificate's dates"
    elif "Hostname mismatch" in message or "IP address mismatch" in message:
        hint = "the URL's host is not in the certificate: re-run tls-init with --host for it"
    else:
        hint = "is --ca-file the ca.pem of this orchestrator's lab CA?"
    return f"certificate check failed ({message}): {hint}"

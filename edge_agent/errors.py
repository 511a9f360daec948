"""The agent package's exceptions, under one root, so a caller can catch everything it raises on
purpose with one clause and still tell a bug (anything else) from a refusal.

Pure: no imports beyond the standard library, so the wire protocol can use it.

::

    AgentError                        root: every error edge_agent raises on purpose
    ├── ProtocolError                 a frame breaks the wire protocol; .code is the close code
    ├── JobSpecError (ValueError)     the job map has an unknown, missing or mistyped key; .key
    ├── JobFailed                     the job cannot run here; the agent reports ``job_failed``
    ├── CheckpointError (ValueError)  a local checkpoint does not fit the job's trainer
    ├── LinkTimeout (TimeoutError)    a send or receive on the connection outlived its bound
    ├── DataError                     data could not be found, verified or parsed
    ├── CompressionError (ValueError) a tensor a codec cannot pack, or not a codec's wire form
    └── TlsConfigError (ValueError)   ``--ca-file`` and the URL do not fit, or the CA is unusable

The second bases are kept because callers catch them: ``ValueError`` from value checks, and
``TimeoutError`` where any bounded wait may run out.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "CheckpointError",
    "CompressionError",
    "DataError",
    "JobFailed",
    "JobSpecError",
    "LinkTimeout",
    "ProtocolError",
    "TlsConfigError",
]


class AgentError(Exception):
    """Root of the exceptions edge_agent raises on purpose."""


class ProtocolError(AgentError):
    """A frame that does not follow the protocol; ``code`` is the close code to use."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class JobSpecError(AgentError, ValueError):
    """A job map that is not a job spec; ``key`` names the offending key (``str()`` too)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"job.{key}: {problem}")
        self.key = key


class JobFailed(AgentError):
    """The job cannot run on this device; the reason goes to the orchestrator and the log."""


class CheckpointError(AgentError, ValueError):
    """A local checkpoint that does not fit the trainer (another model, a damaged state)."""


class LinkTimeout(AgentError, TimeoutError):
    """A frame took too long to send, or none arrived for too long: the link is given up."""


class DataError(AgentError):
    """Data could not be found, verified or parsed; the message says what to do about it."""


class CompressionError(AgentError, ValueError):
    """A tensor that cannot be packed (non-finite values) or a wire form that is not a codec's."""


class TlsConfigError(AgentError, ValueError):
    """``--ca-file`` and ``--orchestrator`` do not fit together, or the CA file is unusable."""

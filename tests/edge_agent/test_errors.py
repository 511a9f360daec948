"""``edge_agent.errors``: every exception the package defines is an AgentError, sits in the tree
of the module's docstring, and keeps the standard base its callers catch it by."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import edge_agent
from edge_agent import errors


def _package_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.iter_modules(edge_agent.__path__, "edge_agent."):
        if info.name == "edge_agent.__main__":  # running it is the CLI
            continue
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("edge_agent"):
                found[name] = obj
    return found


def test_every_exception_derives_from_the_root_and_is_in_the_tree() -> None:
    found = _package_exceptions()
    assert {"ProtocolError", "JobSpecError", "DataError", "CompressionError"} <= set(found)
    for name, cls in found.items():
        assert issubclass(cls, errors.AgentError), name
        assert name in (errors.__doc__ or ""), f"{name} is missing from edge_agent/errors.py's tree"


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (errors.JobSpecError, ValueError),
        (errors.CheckpointError, ValueError),
        (errors.CompressionError, ValueError),
        (errors.TlsConfigError, ValueError),
        (errors.LinkTimeout, TimeoutError),
    ],
)
def test_the_standard_bases_callers_rely_on_are_kept(
    cls: type[BaseException], base: type[BaseException]
) -> None:
    assert issubclass(cls, base) and issubclass(cls, errors.AgentError)


def test_the_modules_that_raise_them_still_export_them() -> None:
    from edge_agent import compress, data, protocol, tlsctx

    assert protocol.ProtocolError is errors.ProtocolError
    assert compress.CompressionError is errors.CompressionError
    assert data.DataError is errors.DataError
    assert tlsctx.TlsConfigError is errors.TlsConfigError
    exc = errors.ProtocolError(1007, "bad")
    assert (exc.code, exc.reason, str(exc)) == (1007, "bad", "bad")

"""The exceptions of ``models``: one root, so a caller can catch every model error at once.

    ModelError (ValueError)           a model, cut or compute device that cannot be had
    ├── UnknownChoiceError (KeyError)  a model, cut or dataset name that is not one of the choices
    ├── SpecError                      a "package.module:name" that does not resolve, or whose
    │                                  factory or loader fails or returns the wrong thing
    └── DeviceUnavailable              a compute device (cuda, cuda:N, mps) this machine lacks

Every one is a ValueError (a bad argument), as callers caught before the tree existed.
"""

from __future__ import annotations


class ModelError(ValueError):
    """Root of the package's exceptions."""


class UnknownChoiceError(ModelError, KeyError):
    """A name that is not one of the valid choices; the message lists them.

    It is a ValueError (bad argument) and also a KeyError (failed lookup), so callers may catch
    either.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SpecError(ModelError):
    """A user's ``package.module:name`` that cannot be imported, called, or used as returned."""


class DeviceUnavailable(ModelError):
    """A compute device that was asked for and that this machine cannot provide."""

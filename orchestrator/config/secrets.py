"""Device tokens stay out of the run's records: the stored manifest says where they are instead.

A run directory is meant to be shared (``watch`` from another machine, reports), so the resolved
``manifest.toml`` written there holds :data:`REDACTED` in place of every token and a
``# tokens-from:`` line naming the manifest file they were read from; ``run --resume`` reads
them back from that file. A manifest file holding tokens that other users can read is worth one
warning (:func:`exposed_warning`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from orchestrator.config.sections import Manifest
from orchestrator.config.values import toml_str

REDACTED = "<not stored here: see tokens-from>"
_ORIGIN_PREFIX = "# tokens-from: "
_ORIGIN = re.compile(r"^# tokens-from: (\".*\")$", re.MULTILINE)


def origin_line(m: Manifest) -> str:
    """The stored manifest's comment naming the file its tokens are read from on resume."""
    return _ORIGIN_PREFIX + toml_str(m.tokens_from or m.source)


def redacted(m: Manifest) -> Manifest:
    """``m`` with every device's token replaced by :data:`REDACTED`."""
    devices = tuple(dataclasses.replace(d, token=REDACTED) for d in m.devices)
    return dataclasses.replace(m, devices=devices)


def tokens_origin(stored_text: str) -> str:
    """The file a stored manifest's ``tokens-from`` line names; "" when it has none."""
    found = _ORIGIN.search(stored_text)
    # toml_str's escapes are all JSON escapes too: the quoted path reads back as JSON.
    return str(json.loads(found.group(1))) if found else ""


def exposed_warning(m: Manifest) -> str | None:
    """Why the file holding ``m``'s tokens is readable by others (mode & 0o077), or None."""
    path = m.tokens_from
    if not path or not m.devices:
        return None
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{path} holds device tokens and is readable by other users (mode {mode:04o}); chmod 600 it"
    )

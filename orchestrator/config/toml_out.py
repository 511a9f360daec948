"""Writes a ``Manifest`` back out as ``testbed.toml`` text that reads back to an equal manifest.

Run records store this resolved text, so a run can be repeated or resumed from its own folder.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

from orchestrator.config import secrets
from orchestrator.config.sections import SECTIONS, Manifest
from orchestrator.config.values import toml_str, toml_value


def manifest_to_toml(
    m: Manifest, *, absolute_paths: bool = False, redact_tokens: bool = False
) -> str:
    """The manifest as TOML text that ``parse_manifest`` reads back to an equal ``Manifest``.

    With ``absolute_paths``, a relative ``data.dir`` (and a ``training.dataset`` folder) is
    written resolved, so the text keeps pointing at the same data when it is stored away from
    the original manifest's folder.
    With ``redact_tokens`` (the run directory's copy), tokens are left out and a line names
    the file they come from (``orchestrator.config.secrets``).
    """
    lines = [
        "# Resolved testbed manifest: every key, defaults and --set overrides included.",
        f"# Read from {toml_str(m.source)}.",
    ]
    if redact_tokens:
        lines.append(secrets.origin_line(m))
        m = secrets.redacted(m)
    data = m.data
    if absolute_paths and m.data_dir() is not None:
        data = replace(data, dir=str(m.data_dir()))
    training = replace(m.training, dataset=m.dataset_spec()) if absolute_paths else m.training
    testbed, tls = m.testbed, m.tls_files() if absolute_paths else None
    if tls is not None:  # like data.dir: the files must still be found from a run directory
        ca = str(tls.ca) if tls.ca is not None else ""
        testbed = replace(testbed, tls_cert=str(tls.cert), tls_key=str(tls.key), tls_ca=ca)
    resolved: dict[str, Any] = {"testbed": testbed, "training": training}
    tables = [
        (f"[{name}]", resolved.get(name, getattr(m, name))) for name in SECTIONS if name != "data"
    ]
    tables.insert(2, ("[data]", data))
    for dev in m.devices:
        tables += [("[[devices]]", dev), ("[devices.emulate]", dev.emulate)]
        if dev.launch == "ray":  # the loader refuses the table on any other device
            tables.append(("[devices.ray]", dev.ray))
    for header, obj in tables:
        lines += [header] if header.startswith("[devices.") else ["", header]
        lines += [
            f"{f.name} = {toml_value(getattr(obj, f.name))}"
            for f in fields(obj)
            if not is_dataclass(getattr(obj, f.name))
        ]
    return "\n".join(lines)


def local_device_toml(device_id: str, token: str, **emulate: float) -> str:
    """One ``[[devices]]`` table for an agent the orchestrator starts on this machine (CPU),
    with an ``[devices.emulate]`` table when emulation keys are given: for generated manifests."""
    text = f"[[devices]]\nid = {toml_str(device_id)}\ntoken = {toml_str(token)}\n"
    text += 'launch = "local"\ndevice = "cpu"\n'
    if emulate:
        text += "[devices.emulate]\n" + "".join(
            f"{k} = {toml_value(v)}\n" for k, v in emulate.items()
        )
    return text

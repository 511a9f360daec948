"""The testbed manifest (``testbed.toml``): read once, validated, frozen into dataclasses.

This is the only place that looks at raw TOML. Each section becomes a frozen dataclass (defined in
``manifest_sections``) whose fields carry their own constraints, so the key list, the defaults and
the checks exist once. Every problem raises ``ManifestError`` naming the key, e.g.
``testbed.toml: [devices.pi-03].token: missing``. ``--set KEY=VALUE`` overrides are applied to
the raw table before validation, so a bad override is reported like a bad key (source ``--set``).
The sections and the writer (``manifest_toml``) are re-exported here: import them from this module.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
from collections.abc import Sequence
from dataclasses import MISSING, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

from orchestrator.config.gapsl_rules import resolve_gapsl
from orchestrator.config.sections import (
    DEVICE_ID,
    OVERRIDE_SOURCE,
    RAY_DEVICE_KEYS,
    SECTIONS,
    Check,
    DashboardConfig,
    DataConfig,
    DeviceConfig,
    EmulateConfig,
    EpslConfig,
    GapslConfig,
    Manifest,
    RayConfig,
    SchedulerConfig,
    ServerConfig,
    SflConfig,
    TestbedConfig,
    TlsFiles,
    TrainingConfig,
    blame,
    split_listen,
)
from orchestrator.config.toml_out import local_device_toml, manifest_to_toml
from orchestrator.config.values import toml_str, toml_value
from orchestrator.errors import GapslError, ManifestError

__all__ = [
    "OVERRIDE_SOURCE",
    "Check",
    "DashboardConfig",
    "DataConfig",
    "DeviceConfig",
    "EmulateConfig",
    "EpslConfig",
    "GapslConfig",
    "Manifest",
    "RayConfig",
    "SchedulerConfig",
    "ServerConfig",
    "SflConfig",
    "TestbedConfig",
    "TlsFiles",
    "TrainingConfig",
    "load_manifest",
    "local_device_toml",
    "manifest_to_toml",
    "parse_manifest",
    "parse_override",
    "split_listen",
]

# --- reading TOML ----------------------------------------------------------------------------

_KINDS = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
}


def _describe(v: Any) -> str:
    text = toml_value(v)
    return f"{_KINDS.get(type(v), 'date/time')} {text if len(text) <= 60 else text[:57] + '...'}"


def _toml_module() -> Any:
    try:
        return importlib.import_module("tomllib")  # Python >= 3.11
    except ModuleNotFoundError:
        try:
            return importlib.import_module("tomli")  # the same parser, for older Pythons
        except ModuleNotFoundError as exc:
            raise GapslError(
                "reading testbed.toml on Python < 3.11 needs the 'tomli' package "
                "(pip install tomli)"
            ) from exc


# --- validation ------------------------------------------------------------------------------


class _Context:
    """Knows the manifest's source and which keys came from --set, to blame the right one."""

    def __init__(self, source: str, overridden: Sequence[str]) -> None:
        self.source = source
        self.overridden = tuple(overridden)

    def error(self, key: str, problem: str) -> ManifestError:
        return blame(self.source, self.overridden, key, problem)


@cache
def _schema(cls: type) -> dict[str, tuple[Any, bool, Any]]:
    """Field name -> (type, required, dataclass field) for one section class."""
    hints = get_type_hints(cls)
    return {
        f.name: (hints[f.name], f.default is MISSING and f.default_factory is MISSING, f)
        for f in fields(cls)
    }


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and is_dataclass(kind)


def _unknown(ctx: _Context, key: str, known: Sequence[str], what: str) -> ManifestError:
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f'did you mean "{close[0]}"?' if close else "known: " + ", ".join(known)
    return ctx.error(key, f"unknown {what} ({hint})")


_TYPES: dict[type, tuple[str, Any]] = {bool: ("a boolean", bool), int: ("an integer", int), float: ("a number", (int, float)),
          str: ("a string", str)}  # fmt: skip


def _value(ctx: _Context, key: str, kind: Any, f: Any, v: Any) -> Any:
    expected, accepted = _TYPES[kind]
    if not isinstance(v, accepted) or (isinstance(v, bool) and kind is not bool):
        raise ctx.error(key, f"expected {expected}, got {_describe(v)}")  # TOML true is no 1
    if kind is float:
        v = float(v)
        if not math.isfinite(v):
            raise ctx.error(key, f"must be a finite number, got {toml_value(v)}")
    if kind is str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. undecodable bytes from argv
            raise ctx.error(key, "must be valid Unicode text") from None
    choices = f.metadata.get("choices", ())
    if choices and v not in choices:
        options = ", ".join(toml_str(c) for c in choices)
        raise ctx.error(key, f"must be one of {options}; got {_describe(v)}")
    check = f.metadata.get("check")
    problem = check(v) if check is not None else None
    if problem:
        raise ctx.error(key, problem)
    return v


def _build(ctx: _Context, cls: type, table: Any, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ctx.error(prefix, f"expected a table, got {_describe(table)}")
    schema = _schema(cls)
    for name in table:
        if name not in schema:
            raise _unknown(ctx, f"{prefix}.{name}", list(schema), "key")
    kwargs = {}
    for name, (kind, required, f) in schema.items():
        key = f"{prefix}.{name}"
        if name not in table:
            if required:
                raise ctx.error(key, "missing")
        elif _is_section(kind):
            kwargs[name] = _build(ctx, kind, table[name], key)
        else:
            kwargs[name] = _value(ctx, key, kind, f, table[name])
    return cls(**kwargs)


def _device_key(entry: Any, index: int) -> str:
    dev_id = entry.get("id") if isinstance(entry, dict) else None
    ok = isinstance(dev_id, str) and DEVICE_ID.fullmatch(dev_id)
    return f"devices.{dev_id}" if ok else f"devices[{index}]"


def _build_devices(ctx: _Context, raw: Any, ray: RayConfig) -> tuple[DeviceConfig, ...]:
    if raw is None:
        raise ctx.error("devices", "missing (at least one [[devices]] entry is required)")
    if not isinstance(raw, list):
        raise ctx.error(
            "devices", f"expected an array of tables ([[devices]]), got {_describe(raw)}"
        )
    if not raw:
        raise ctx.error("devices", "at least one [[devices]] entry is required")
    devices: list[DeviceConfig] = []
    first_seen: dict[str, int] = {}
    for index, entry in enumerate(raw):
        key = _device_key(entry, index)
        if isinstance(entry, dict) and entry.get("launch") == "ray":
            # [devices.ray] keys left out take [ray]'s: the resolved manifest then says them all.
            own = entry.get("ray", {})
            own = (
                {**{k: getattr(ray, k) for k in RAY_DEVICE_KEYS}, **own}
                if isinstance(own, dict)
                else own
            )
            entry = {**entry, "ray": own}
        elif isinstance(entry, dict) and "ray" in entry:
            raise ctx.error(f"{key}.ray", 'set, but launch is not "ray"')
        dev = _build(ctx, DeviceConfig, entry, key)
        if dev.id in first_seen:
            raise ctx.error(
                f"{key}.id", f"duplicate device id (also devices[{first_seen[dev.id]}])"
            )
        first_seen[dev.id] = index
        devices.append(dev)
    return tuple(devices)


def _validate(raw: dict[str, Any], ctx: _Context, base_dir: Path) -> Manifest:
    for name, value in raw.items():
        if name not in SECTIONS and name != "devices":
            what = "section" if isinstance(value, dict) else "key"
            raise _unknown(ctx, name, [*SECTIONS, "devices"], what)
    sections = {name: _build(ctx, cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    devices = _build_devices(ctx, raw.get("devices"), sections["ray"])
    need = sections["scheduler"].min_participants
    if need > len(devices):
        raise ctx.error(
            "scheduler.min_participants", f"is {need}, but only {len(devices)} devices are listed"
        )
    tb = sections["testbed"]
    if bool(tb.tls_cert) != bool(tb.tls_key):
        missing = "testbed.tls_key" if tb.tls_cert else "testbed.tls_cert"
        raise ctx.error(missing, "missing (tls_cert and tls_key go together)")
    if tb.tls_ca and not tb.tls_cert:
        raise ctx.error("testbed.tls_ca", "set, but TLS is off (testbed.tls_cert is empty)")
    if tb.tls_cert and not tb.tls_ca and any(d.launch != "remote" for d in devices):
        raise ctx.error(
            "testbed.tls_ca", "missing (local and Ray-placed agents must trust the CA of tls_cert)"
        )
    if tb.penalty_max_s < tb.penalty_s:
        raise ctx.error(
            "testbed.penalty_max_s",
            f"is {tb.penalty_max_s}, below testbed.penalty_s ({tb.penalty_s})",
        )
    sections["gapsl"] = resolve_gapsl(sections["gapsl"], raw.get("gapsl", {}), ctx.error)
    if "listen" not in raw.get("testbed", {}) and all(d.launch == "local" for d in devices):
        # Only this machine's own agents dial in, and they are told the bound port: any free
        # port does, so two runs on one host never collide. A listen the user set is kept.
        host, _ = split_listen(tb.listen)
        sections["testbed"] = replace(tb, listen=f"{host}:0")
    return Manifest(
        **sections,
        devices=devices,
        source=ctx.source,
        base_dir=base_dir,
        overridden=ctx.overridden,
    )


# --- overrides -------------------------------------------------------------------------------


def _split_override(item: str) -> tuple[list[str], str]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise ManifestError(OVERRIDE_SOURCE, key, f"expected KEY=VALUE, got {toml_str(item)}")
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise ManifestError(OVERRIDE_SOURCE, "", f"bad key in {toml_str(item)}: empty name")
    return parts, text.strip()


def _parse_value(text: str) -> Any:
    try:
        doc = _toml_module().loads(f"v = {text}")
    except ValueError:  # TOMLDecodeError: not a TOML value, so take the text as it is
        return text
    # "1\nx = 2" parses but is not one value; treat such input as a plain string too.
    return doc["v"] if list(doc) == ["v"] else text


def parse_override(item: str) -> tuple[list[str], object]:
    """Split ``--set`` item ``"KEY=VALUE"`` into the dotted key's parts and the TOML value.

    VALUE is read as a TOML value (``50``, ``0.1``, ``true``, ``"quoted"``, ``[1, 2]``), or
    taken as a bare string when it is not valid TOML (so ``training.algorithm=psl`` works).
    """
    parts, text = _split_override(item)
    return parts, _parse_value(text)


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one ``--set`` item to the raw table; return the canonical dotted key it set."""
    parts, text = _split_override(item)
    value = _parse_value(text)
    ctx = _Context(OVERRIDE_SOURCE, ())
    dotted = ".".join(parts)
    cls: type
    if parts[0] == "devices":
        if len(parts) < 3:
            raise ctx.error(dotted, "name a device and a key, e.g. devices.pi-01.token=...")
        entries = raw.get("devices")
        entries = entries if isinstance(entries, list) else []
        ids = [e.get("id") if isinstance(e, dict) else None for e in entries]
        # Ids may contain dots: the longest leading run of parts that names a device wins.
        k = next((k for k in range(len(parts) - 1, 1, -1) if ".".join(parts[1:k]) in ids), 0)
        if not k:
            known = ", ".join(str(i) for i in ids if i is not None) or "none"
            raise ctx.error(dotted, f"no [[devices]] entry has this id (known ids: {known})")
        table = entries[ids.index(".".join(parts[1:k]))]
        prefix, path, cls = ".".join(parts[:k]), parts[k:], DeviceConfig
    elif parts[0] in SECTIONS:
        if len(parts) == 1:
            raise ctx.error(dotted, "name a key in this section, e.g. training.rounds=50")
        table, prefix, path = raw.setdefault(parts[0], {}), parts[0], parts[1:]
        cls = SECTIONS[parts[0]]
    else:
        raise _unknown(ctx, parts[0], [*SECTIONS, "devices"], "section")
    key = prefix
    for i, name in enumerate(path):
        key = f"{key}.{name}"
        schema = _schema(cls)
        if name not in schema:
            raise _unknown(ctx, key, list(schema), "key")
        kind = schema[name][0]
        if not isinstance(table, dict):
            # The file itself has a scalar where a table belongs; validation reports that.
            return key
        if i == len(path) - 1:
            # A string key keeps the text as typed: --set testbed.name=2024 names, not counts.
            is_scalar = isinstance(value, (bool, int, float)) or hasattr(value, "isoformat")
            table[name] = text if kind is str and is_scalar else value
            return key
        if not _is_section(kind):
            raise ctx.error(dotted, f'"{name}" is a single value, not a table of keys')
        table, cls = table.setdefault(name, {}), kind
    return key  # pragma: no cover - path is never empty


# --- entry points ----------------------------------------------------------------------------


def parse_manifest(
    text: str,
    *,
    source: str = "<string>",
    base_dir: Path | None = None,
    overrides: Sequence[str] = (),
) -> Manifest:
    """Validate manifest ``text`` (with ``--set`` overrides) into a ``Manifest``.

    Raises ManifestError naming the first bad key. ``base_dir`` (default: the working
    directory) is where a relative ``data.dir`` (or ``training.dataset`` folder) resolves.
    """
    toml = _toml_module()
    try:
        raw = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise ManifestError(source, "", f"not valid TOML: {exc}") from exc
    overridden = [_apply_override(raw, item) for item in overrides]
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return _validate(raw, _Context(source, overridden), base)


def load_manifest(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Manifest:
    """Read and validate the manifest file at ``path`` (errors are named after it)."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(source, "", f"cannot read the manifest: {exc}") from exc
    resolved = Path(source).expanduser().resolve()
    m = parse_manifest(text, source=source, base_dir=resolved.parent, overrides=overrides)
    return replace(m, tokens_from=str(resolved))

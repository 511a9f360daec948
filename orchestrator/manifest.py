"""The testbed manifest (``testbed.toml``): read once, validated, frozen into dataclasses.

This is the only place that looks at raw TOML. Each section becomes a frozen dataclass whose
fields carry their own constraints, so the key list, the defaults and the checks exist once.
Every problem raises ``ManifestError`` naming the key, e.g.
``testbed.toml: [devices.pi-03].token: missing``. ``--set KEY=VALUE`` overrides are applied to
the raw table before validation, so a bad override is reported like a bad key (source ``--set``).
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, get_type_hints

from orchestrator.errors import GapslError, ManifestError

Check = Callable[[Any], Optional[str]]  # returns a problem, or None when the value is fine

OVERRIDE_SOURCE = "--set"
_DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


# --- constraints -----------------------------------------------------------------------------


def _rule(ok: Callable[[Any], bool], rule: str) -> Check:
    return lambda v: None if ok(v) else f"must be {rule}, got {_toml_value(v)}"


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) into host and port; ValueError if bad."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or "[" in host or "]" in host:
        raise ValueError(f'must be "HOST:PORT", got {_toml_value(listen)}')
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {_toml_value(port)}")
    return host, int(port)


def _listen(v: str) -> str | None:
    try:
        split_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


def _opt(default: Any, *, choices: Sequence[str] = (), check: Check | None = None) -> Any:
    return field(default=default, metadata={"choices": tuple(choices), "check": check})


_positive = _rule(lambda v: v > 0, "> 0")
_non_negative = _rule(lambda v: v >= 0, ">= 0")
_at_least_one = _rule(lambda v: v >= 1, ">= 1")
_unit_open_hi = _rule(lambda v: 0 <= v < 1, "in [0, 1)")
_unit_open_lo = _rule(lambda v: 0 < v <= 1, "in (0, 1]")
_non_empty = _rule(lambda v: bool(v.strip()), "non-empty")
_device_id = _rule(lambda v: bool(_DEVICE_ID.fullmatch(v)), "made of A-Za-z0-9_.- only")
_deadline = _rule(lambda v: v == 0 or v >= 1, "0 (no deadline) or >= 1")


# --- sections --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedConfig:
    """Where the orchestrator listens and how long it waits for the fleet."""

    __test__ = False  # not a pytest test class, despite the name

    name: str = _opt("digits-local", check=_non_empty)
    listen: str = _opt("127.0.0.1:8765", check=_listen)  # port 0: pick a free port
    join_timeout_s: float = _opt(120.0, check=_positive)
    round_timeout_s: float = _opt(120.0, check=_positive)
    max_message_bytes: int = _opt(64 * 1024 * 1024, check=_positive)
    ping_interval_s: float = _opt(10.0, check=_positive)
    ping_timeout_s: float = _opt(30.0, check=_positive)
    runs_dir: str = _opt("runs", check=_non_empty)  # relative to the working directory
    # wss:// (README, "TLS for a lab testbed"): PEM files; relative paths resolve against the
    # manifest's folder. "" for tls_cert and tls_key = plain ws://.
    tls_cert: str = _opt("")
    tls_key: str = _opt("")
    tls_ca: str = _opt("")  # the CA local agents trust (--ca-file); needed with local agents
    # A device whose connection has been gone this long is left out of rounds until it is back.
    patience_s: float = _opt(30.0, check=_positive)
    # With fewer than scheduler.min_participants devices connected, wait this long, then fail.
    lost_timeout_s: float = _opt(300.0, check=_positive)
    # Local agents that die (killed, crashed) are started again, at most this many times each.
    respawn_local: int = _opt(3, check=_non_negative)


@dataclass(frozen=True)
class TrainingConfig:
    """The learning problem and the optimiser every device and the server use."""

    # "central" (pooled data, one learner: the accuracy ceiling) runs only in-process (simulate).
    algorithm: str = _opt("psl", choices=("psl", "gapsl", "sfl", "epsl", "central"))
    dataset: str = _opt("digits", choices=("digits", "fashion_mnist", "cifar10"))
    model: str = _opt("auto", check=_non_empty)  # "auto": the dataset's default small model
    cut: str = _opt("default", check=_non_empty)
    rounds: int = _opt(100, check=_at_least_one)
    batch_size: int = _opt(32, check=_at_least_one)
    eval_every: int = _opt(10, check=_at_least_one)
    seed: int = _opt(0, check=_non_negative)  # numpy generators refuse negative seeds
    lr: float = _opt(0.05, check=_positive)
    momentum: float = _opt(0.9, check=_unit_open_hi)
    weight_decay: float = _opt(0.0, check=_non_negative)
    # Cut-layer activations and their gradients on the wire: "fp16", or "int8" with one scale
    # per tensor. Lossy: the study in docs/results.md measures what it costs in accuracy.
    compression: str = _opt("none", choices=("none", "fp16", "int8"))


@dataclass(frozen=True)
class DataConfig:
    """How the dataset is found and split across devices."""

    partition: str = _opt("iid", choices=("iid", "dirichlet", "shards"))
    alpha: float = _opt(0.5, check=_positive)
    shards_per_device: int = _opt(2, check=_at_least_one)
    dir: str = _opt("")  # "" = default lookup; relative paths resolve against the manifest
    download: bool = _opt(False)
    test_limit: int = _opt(0, check=_non_negative)  # 0 = the whole test set


@dataclass(frozen=True)
class ServerConfig:
    """Where the server partition runs."""

    device: str = _opt("auto", choices=_DEVICE_CHOICES)
    # torch CPU threads for the server partition; 0 = one thread when local agents share this
    # machine's cores (more would only contend with them), else torch's default
    threads: int = _opt(0, check=_non_negative)


@dataclass(frozen=True)
class GapslConfig:
    """LGI and GDA knobs (see DESIGN.md: an explicit reconstruction of the method)."""

    space: str = _opt("client", choices=("server", "client", "cut"))
    gda_mode: str = _opt("first_order", choices=("exact", "first_order", "pull"))
    gda_lambda: float = _opt(1.0, check=_non_negative)
    tau: float = _opt(
        0.0, check=_rule(lambda v: -1 <= v <= 1, "in [-1, 1]")
    )  # a mean cosine, so it lives in [-1, 1]
    rho: float = _opt(0.5, check=_unit_open_lo)
    ema_beta: float = _opt(0.9, check=_unit_open_hi)


@dataclass(frozen=True)
class SflConfig:
    """SplitFed baseline: FedAvg of client partitions every ``avg_every`` rounds."""

    avg_every: int = _opt(1, check=_at_least_one)


@dataclass(frozen=True)
class EpslConfig:
    """EPSL baseline: last-layer gradient aggregation ratio (0 is PSL)."""

    phi: float = _opt(0.5, check=_rule(lambda v: 0 <= v <= 1, "in [0, 1]"))


@dataclass(frozen=True)
class SchedulerConfig:
    """Who takes part in a round and how long the server waits for them."""

    policy: str = _opt("uniform", choices=("uniform", "latency_balanced"))
    deadline_factor: float = _opt(0.0, check=_deadline)
    min_participants: int = _opt(1, check=_at_least_one)
    participation: float = _opt(1.0, check=_unit_open_lo)


@dataclass(frozen=True)
class DashboardConfig:
    """The live terminal view."""

    refresh_hz: float = _opt(4.0, check=_positive)


@dataclass(frozen=True)
class EmulateConfig:
    """An emulated device profile; the defaults emulate nothing."""

    compute_slowdown: float = _opt(1.0, check=_rule(lambda v: v >= 1, ">= 1"))
    uplink_mbps: float = _opt(0.0, check=_non_negative)  # 0 = unlimited
    downlink_mbps: float = _opt(0.0, check=_non_negative)  # 0 = unlimited
    rtt_ms: float = _opt(0.0, check=_non_negative)

    @property
    def active(self) -> bool:
        """Whether any setting differs from "no emulation"."""
        return self != EmulateConfig()


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[[devices]]`` entry: a lab device, or a local agent the orchestrator starts."""

    id: str = field(metadata={"check": _device_id})
    token: str = field(repr=False, metadata={"check": _non_empty})  # kept out of logs
    launch: str = _opt("remote", choices=("remote", "local"))
    device: str = _opt("auto", choices=_DEVICE_CHOICES)
    emulate: EmulateConfig = field(default_factory=EmulateConfig)


_SECTIONS: dict[str, type] = {
    "testbed": TestbedConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "server": ServerConfig,
    "gapsl": GapslConfig,
    "sfl": SflConfig,
    "epsl": EpslConfig,
    "scheduler": SchedulerConfig,
    "dashboard": DashboardConfig,
}


class TlsFiles(NamedTuple):
    """``testbed.tls_*`` resolved to paths."""

    cert: Path
    key: Path
    ca: Path | None


@dataclass(frozen=True)
class Manifest:
    """A validated testbed manifest. ``source``/``base_dir`` say where it came from and are left
    out of equality, so a manifest equals its own ``manifest_to_toml`` round trip."""

    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    gapsl: GapslConfig = field(default_factory=GapslConfig)
    sfl: SflConfig = field(default_factory=SflConfig)
    epsl: EpslConfig = field(default_factory=EpslConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    devices: tuple[DeviceConfig, ...] = ()
    source: str = field(default="<string>", compare=False)
    base_dir: Path = field(default_factory=Path.cwd, compare=False)

    def listen_host_port(self) -> tuple[str, int]:
        """``testbed.listen`` as ``(host, port)``; port 0 means "pick a free port"."""
        return split_listen(self.testbed.listen)

    def data_dir(self) -> Path | None:
        """``data.dir`` resolved against the manifest's folder, or None for the default lookup."""
        return self._path(self.data.dir)

    def tls_files(self) -> TlsFiles | None:
        """``testbed.tls_cert``/``tls_key``/``tls_ca`` as paths, or None when TLS is off."""
        cert, key = self._path(self.testbed.tls_cert), self._path(self.testbed.tls_key)
        if cert is None or key is None:
            return None
        return TlsFiles(cert, key, self._path(self.testbed.tls_ca))

    def _path(self, value: str) -> Path | None:
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def device(self, id: str) -> DeviceConfig:
        """The ``[[devices]]`` entry with this id; KeyError if there is none."""
        for dev in self.devices:
            if dev.id == id:
                return dev
        raise KeyError(f"no device {id!r} in the manifest")


# --- TOML values -----------------------------------------------------------------------------

# TOML basic strings: escape quote, backslash and every control character (TOML 1.0, "String").
_ESCAPES = {i: f"\\u{i:04X}" for i in [*range(0x20), 0x7F]}
_ESCAPES.update({ord(c): "\\" + e for c, e in zip('"\\\b\t\n\f\r', '"\\btnfr')})
_KINDS = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
}


def _toml_str(s: str) -> str:
    return '"' + s.translate(_ESCAPES) + '"'


def _toml_value(v: Any) -> str:
    """``v`` written as a TOML value (inline for arrays and tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, str)):
        return _toml_str(v) if isinstance(v, str) else str(v)
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float; inf/nan are TOML too
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = (f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{" + ", ".join(items) + "}"
    return v.isoformat() if hasattr(v, "isoformat") else str(v)  # TOML dates and times


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_str(k)


def _describe(v: Any) -> str:
    text = _toml_value(v)
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
        from_set = any(key == o or key.startswith(o + ".") for o in self.overridden)
        return ManifestError(OVERRIDE_SOURCE if from_set else self.source, key, problem)


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
            raise ctx.error(key, f"must be a finite number, got {_toml_value(v)}")
    if kind is str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. undecodable bytes from argv
            raise ctx.error(key, "must be valid Unicode text") from None
    choices = f.metadata.get("choices", ())
    if choices and v not in choices:
        options = ", ".join(_toml_str(c) for c in choices)
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
    ok = isinstance(dev_id, str) and _DEVICE_ID.fullmatch(dev_id)
    return f"devices.{dev_id}" if ok else f"devices[{index}]"


def _build_devices(ctx: _Context, raw: Any) -> tuple[DeviceConfig, ...]:
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
        if name not in _SECTIONS and name != "devices":
            what = "section" if isinstance(value, dict) else "key"
            raise _unknown(ctx, name, [*_SECTIONS, "devices"], what)
    sections = {name: _build(ctx, cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    devices = _build_devices(ctx, raw.get("devices"))
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
    if tb.tls_cert and not tb.tls_ca and any(d.launch == "local" for d in devices):
        raise ctx.error("testbed.tls_ca", "missing (local agents must trust the CA of tls_cert)")
    return Manifest(**sections, devices=devices, source=ctx.source, base_dir=base_dir)


# --- overrides -------------------------------------------------------------------------------


def _split_override(item: str) -> tuple[list[str], str]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise ManifestError(OVERRIDE_SOURCE, key, f"expected KEY=VALUE, got {_toml_str(item)}")
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise ManifestError(OVERRIDE_SOURCE, "", f"bad key in {_toml_str(item)}: empty name")
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
    elif parts[0] in _SECTIONS:
        if len(parts) == 1:
            raise ctx.error(dotted, "name a key in this section, e.g. training.rounds=50")
        table, prefix, path = raw.setdefault(parts[0], {}), parts[0], parts[1:]
        cls = _SECTIONS[parts[0]]
    else:
        raise _unknown(ctx, parts[0], [*_SECTIONS, "devices"], "section")
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
    directory) is where a relative ``data.dir`` resolves.
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
    base_dir = Path(source).expanduser().resolve().parent
    return parse_manifest(text, source=source, base_dir=base_dir, overrides=overrides)


def manifest_to_toml(m: Manifest, *, absolute_paths: bool = False) -> str:
    """The manifest as TOML text that ``parse_manifest`` reads back to an equal ``Manifest``.

    With ``absolute_paths``, a relative ``data.dir`` is written resolved, so the text keeps
    pointing at the same data when it is stored away from the original manifest's folder.
    """
    lines = [
        "# Resolved testbed manifest: every key, defaults and --set overrides included.",
        f"# Read from {_toml_str(m.source)}.",
    ]
    data = m.data
    if absolute_paths and m.data_dir() is not None:
        data = replace(data, dir=str(m.data_dir()))
    testbed, tls = m.testbed, m.tls_files() if absolute_paths else None
    if tls is not None:  # like data.dir: the files must still be found from a run directory
        ca = str(tls.ca) if tls.ca is not None else ""
        testbed = replace(testbed, tls_cert=str(tls.cert), tls_key=str(tls.key), tls_ca=ca)
    tables = [
        (f"[{name}]", testbed if name == "testbed" else getattr(m, name))
        for name in _SECTIONS
        if name != "data"
    ]
    tables.insert(2, ("[data]", data))
    for dev in m.devices:
        tables += [("[[devices]]", dev), ("[devices.emulate]", dev.emulate)]
    for header, obj in tables:
        lines += [header] if header == "[devices.emulate]" else ["", header]
        lines += [
            f"{f.name} = {_toml_value(getattr(obj, f.name))}"
            for f in fields(obj)
            if not is_dataclass(getattr(obj, f.name))
        ]
    return "\n".join(lines)

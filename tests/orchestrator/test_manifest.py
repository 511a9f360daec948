"""Tests for the testbed manifest loader: defaults, errors in the house format, --set, round trip."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config.manifest import (
    DeviceConfig,
    EmulateConfig,
    Manifest,
    load_manifest,
    manifest_to_toml,
    parse_manifest,
    parse_override,
)
from orchestrator.errors import ExitCode, GapslError, ManifestError, exit_code_help

ROOT = Path(__file__).resolve().parents[2]

BASE = """
[[devices]]
id = "pi-01"
token = "t1"

[[devices]]
id = "pi-02"
token = "t2"
"""


def error_of(text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, source="testbed.toml", overrides=overrides)
    return str(info.value)


# --- the default manifest and defaults ---------------------------------------------------------


def test_default_manifest_parses() -> None:
    m = load_manifest(ROOT / "testbed.toml")
    assert m.training.dataset == "digits" and m.training.algorithm == "gapsl"  # shows the method
    assert m.training.model == "auto"
    assert (m.training.rounds, m.training.batch_size, m.training.eval_every) == (150, 32, 10)
    assert (m.data.partition, m.data.alpha) == ("dirichlet", 0.5)
    assert [d.id for d in m.devices] == ["dev-1", "dev-2", "dev-3", "dev-4"]
    assert all(d.launch == "local" and d.token for d in m.devices)
    assert len({d.token for d in m.devices}) == 4
    # every device is local and listen is left unset: a free port, so runs never collide
    assert m.listen_host_port() == ("127.0.0.1", 0)
    assert m.base_dir == ROOT and m.data_dir() is None


LOCAL = BASE.replace('token = "t1"', 'token = "t1"\nlaunch = "local"').replace(
    'token = "t2"', 'token = "t2"\nlaunch = "local"'
)


def test_an_all_local_fleet_listens_on_a_free_port_unless_listen_is_set() -> None:
    assert parse_manifest(LOCAL).testbed.listen == "127.0.0.1:0"
    # a remote device dials the documented default port
    assert parse_manifest(LOCAL.replace('launch = "local"', "", 1)).testbed.listen.endswith(":8765")
    explicit = '[testbed]\nlisten = "127.0.0.1:8765"\n' + LOCAL
    assert parse_manifest(explicit).testbed.listen == "127.0.0.1:8765"
    by_set = parse_manifest(LOCAL, overrides=["testbed.listen=127.0.0.1:9001"])
    assert by_set.testbed.listen == "127.0.0.1:9001"
    # the resolved manifest a run directory keeps (and --resume reads) stays on a free port
    assert parse_manifest(manifest_to_toml(parse_manifest(LOCAL))).testbed.listen.endswith(":0")


def test_defaults_fill_in() -> None:
    m = parse_manifest(BASE)
    assert m.testbed.listen == "127.0.0.1:8765" and m.testbed.max_message_bytes == 64 * 2**20
    assert m.training.rounds == 100 and m.training.lr == 0.05
    assert m.data.partition == "iid" and m.data.dir == "" and m.data.download is False
    assert m.gapsl.space == "client" and m.gapsl.gda_mode == "anchor"
    assert m.gapsl.prior_tau == 1.0
    assert m.sfl.avg_every == 1 and m.epsl.phi == 0.5 and m.dashboard.refresh_hz == 4.0
    assert m.scheduler.policy == "uniform" and m.server.device == "auto"
    dev = m.device("pi-02")
    assert (dev.token, dev.launch, dev.device) == ("t2", "remote", "auto")
    assert dev.emulate == EmulateConfig() and not dev.emulate.active
    with pytest.raises(KeyError):
        m.device("nope")


def test_ints_accepted_as_floats_and_paths_resolve(tmp_path: Path) -> None:
    text = BASE + '[training]\nlr = 1\n[data]\ndir = "sets/digits"\n[testbed]\nlisten = "[::1]:0"\n'
    m = parse_manifest(text, base_dir=tmp_path)
    assert m.training.lr == 1.0 and isinstance(m.training.lr, float)
    assert m.data_dir() == tmp_path / "sets" / "digits"
    assert m.listen_host_port() == ("::1", 0)


def test_token_stays_out_of_repr() -> None:
    m = parse_manifest(BASE)
    # quoted, as a field's value would be: the bare "t1" may be part of a path in the repr
    assert m.devices and not any(repr(d.token) in repr(m) for d in m.devices)


# --- errors name their key in the house format -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + '[[devices]]\nid = "pi-03"\n',
            "testbed.toml: [devices.pi-03].token: missing",
        ),
        (
            BASE + '[[devices]]\ntoken = "x"\n',
            "testbed.toml: [devices[2]].id: missing",
        ),
        (
            BASE + '[[devices]]\nid = "pi 03"\ntoken = "x"\n',
            'testbed.toml: [devices[2]].id: must be made of A-Za-z0-9_.- only, got "pi 03"',
        ),
        (
            BASE + '[[devices]]\nid = "pi-01"\ntoken = "x"\n',
            "testbed.toml: [devices.pi-01].id: duplicate device id (also devices[0])",
        ),
        (
            BASE + '[[devices]]\nid = "pi-03"\ntoken = ""\n',
            'testbed.toml: [devices.pi-03].token: must be non-empty, got ""',
        ),
        (
            BASE + "[training]\nroundz = 5\n",
            'testbed.toml: [training].roundz: unknown key (did you mean "rounds"?)',
        ),
        (
            BASE + "[trainng]\nrounds = 5\n",
            'testbed.toml: trainng: unknown section (did you mean "training"?)',
        ),
        (
            BASE + '[training]\nrounds = "fifty"\n',
            'testbed.toml: [training].rounds: expected an integer, got string "fifty"',
        ),
        (
            BASE + "[training]\nrounds = true\n",
            "testbed.toml: [training].rounds: expected an integer, got boolean true",
        ),
        (
            BASE + "[training]\nrounds = 5.0\n",
            "testbed.toml: [training].rounds: expected an integer, got float 5.0",
        ),
        (
            BASE + "[data]\nalpha = true\n",
            "testbed.toml: [data].alpha: expected a number, got boolean true",
        ),
        (
            BASE + '[training]\nalgorithm = "fedavg"\n',
            "testbed.toml: [training].algorithm: must be one of "
            '"psl", "gapsl", "sfl", "epsl", "central"; got string "fedavg"',
        ),
        (
            BASE + '[testbed]\nlisten = "localhost"\n',
            'testbed.toml: [testbed].listen: must be "HOST:PORT", got "localhost"',
        ),
        (
            BASE + '[testbed]\nlisten = "localhost:http"\n',
            'testbed.toml: [testbed].listen: port must be an integer in 0..65535, got "http"',
        ),
        (
            BASE + "[training]\nmomentum = 1.0\n",
            "testbed.toml: [training].momentum: must be in [0, 1), got 1.0",
        ),
        (
            BASE + "[scheduler]\ndeadline_factor = 0.5\n",
            "testbed.toml: [scheduler].deadline_factor: must be 0 (no deadline) or >= 1, got 0.5",
        ),
        (
            BASE + "[data]\nalpha = nan\n",
            "testbed.toml: [data].alpha: must be a finite number, got nan",
        ),
        (
            BASE + "[devices.emulate]\nrtt = 3\n",
            'testbed.toml: [devices.pi-02.emulate].rtt: unknown key (did you mean "rtt_ms"?)',
        ),
        (
            "training = 3\n" + BASE,
            "testbed.toml: training: expected a table, got integer 3",
        ),
        ("[training]\nrounds = 5\n", "testbed.toml: devices: missing"),
        (
            BASE + "[scheduler]\nmin_participants = 3\n",
            "testbed.toml: [scheduler].min_participants: is 3, but only 2 devices are listed",
        ),
    ],
    ids=lambda v: v.split(": ")[1] if v.startswith("testbed.toml: ") else "manifest",
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    assert error_of("[training\n").startswith("testbed.toml: not valid TOML:")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "absent.toml")
    assert info.value.key == "" and str(info.value).startswith(str(tmp_path / "absent.toml"))


def test_error_tree_and_exit_codes() -> None:
    err = ManifestError("testbed.toml", "devices.pi-03.token", "missing")
    assert isinstance(err, GapslError)
    assert (err.source, err.key, err.problem) == ("testbed.toml", "devices.pi-03.token", "missing")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    assert str(ManifestError("--set", "devices", "missing")) == "--set: devices: missing"
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 130]  # 3: watch --once, run not ended
    assert "130" in exit_code_help() and "usage" in exit_code_help()
    assert "incomplete" in exit_code_help()


# --- --set overrides ---------------------------------------------------------------------------


def test_parse_override_values() -> None:
    assert parse_override("training.rounds=50") == (["training", "rounds"], 50)
    assert parse_override("data.alpha=0.1") == (["data", "alpha"], 0.1)
    assert parse_override("training.algorithm=psl") == (["training", "algorithm"], "psl")
    assert parse_override('testbed.name="a b"') == (["testbed", "name"], "a b")
    assert parse_override("data.download=true") == (["data", "download"], True)
    assert parse_override("x.y=[1,2]") == (["x", "y"], [1, 2])
    assert parse_override("x.y=1\nz = 2") == (["x", "y"], "1\nz = 2")


def test_overrides_apply() -> None:
    m = parse_manifest(
        BASE,
        overrides=(
            "training.rounds=50",
            "data.alpha=0.1",
            "training.algorithm=gapsl",
            'testbed.name="quoted name"',
            "training.seed=3",
            "devices.pi-01.token=abc",
            "devices.pi-02.emulate.rtt_ms=20",
            "devices.pi-02.launch=local",
        ),
    )
    assert (m.training.rounds, m.data.alpha, m.training.algorithm) == (50, 0.1, "gapsl")
    assert (m.testbed.name, m.training.seed) == ("quoted name", 3)
    assert m.device("pi-01").token == "abc"
    assert m.device("pi-02").emulate.rtt_ms == 20.0 and m.device("pi-02").launch == "local"


def test_override_string_key_keeps_text_and_dotted_device_ids() -> None:
    text = '[[devices]]\nid = "lab.pi.1"\ntoken = "t"\n'
    m = parse_manifest(text, overrides=("testbed.name=2024", "devices.lab.pi.1.emulate.rtt_ms=5"))
    assert m.testbed.name == "2024"
    assert m.device("lab.pi.1").emulate.rtt_ms == 5.0


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("training.rounds=0", "--set: [training].rounds: must be >= 1, got 0"),
        ("training.rounds=abc", '--set: [training].rounds: expected an integer, got string "abc"'),
        ("training.algorithm=fedavg", "--set: [training].algorithm: must be one of"),
        ("training.roundz=5", '--set: [training].roundz: unknown key (did you mean "rounds"?)'),
        ("trainin.rounds=5", '--set: trainin: unknown section (did you mean "training"?)'),
        ("devices.pi-09.token=x", "--set: [devices.pi-09].token: no [[devices]] entry"),
        ("devices.pi-01.emulate.rtt_ms=-1", "--set: [devices.pi-01.emulate].rtt_ms: must be >= 0"),
        ("devices.pi-01.tokn=x", '--set: [devices.pi-01].tokn: unknown key (did you mean "token"'),
        ("training.rounds", '--set: [training].rounds: expected KEY=VALUE, got "training.rounds"'),
        ("training=5", "--set: training: name a key in this section"),
    ],
)
def test_bad_overrides_name_the_key(item: str, expected: str) -> None:
    assert error_of(BASE, (item,)).startswith(expected)


def test_file_errors_keep_the_file_as_source() -> None:
    # An override elsewhere must not take the blame for a bad key in the file.
    text = BASE + "[training]\nrounds = 0\n"
    assert error_of(text, ("data.alpha=0.2",)).startswith("testbed.toml: [training].rounds:")


# --- manifest_to_toml round trip ---------------------------------------------------------------

ODD_STRINGS = [
    'say "hi"',
    "back\\slash\\",
    "tab\tnew\nline\r",
    "ünïcødé ✓ 数据",
    "\x00\x1f\x7f",
    "'",
]


def test_round_trip_default_and_odd_strings(tmp_path: Path) -> None:
    m = load_manifest(ROOT / "testbed.toml", overrides=("training.lr=1e-05", "data.alpha=3"))
    assert parse_manifest(manifest_to_toml(m)) == m
    for s in ODD_STRINGS:
        odd = replace(
            m,
            testbed=replace(m.testbed, name=s),
            data=replace(m.data, dir=s),
            devices=(DeviceConfig(id="x.y-z_1", token=s, emulate=EmulateConfig(rtt_ms=0.1)),),
        )
        back = parse_manifest(manifest_to_toml(replace(odd, source=s)))
        assert back == odd and back.devices[0].token == s


def test_round_trip_can_write_absolute_data_dir(tmp_path: Path) -> None:
    m = parse_manifest(BASE + '[data]\ndir = "data"\n', base_dir=tmp_path)
    back = parse_manifest(manifest_to_toml(m, absolute_paths=True), base_dir=Path("/elsewhere"))
    assert back.data_dir() == tmp_path / "data"


_ids = st.text("abcXYZ019_.-", min_size=1, max_size=12)
_text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() != "")
_float = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(_ids, min_size=1, max_size=4, unique=True),
    token=_text,
    name=_text,
    data_dir=st.text(max_size=20),
    lr=_float.filter(lambda x: x > 0),
    rtt=_float,
    seed=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_round_trip_property(
    ids: list[str], token: str, name: str, data_dir: str, lr: float, rtt: float, seed: int
) -> None:
    m = Manifest(devices=tuple(DeviceConfig(id=i, token=token + i) for i in ids))
    m = replace(
        m,
        testbed=replace(m.testbed, name=name),
        training=replace(m.training, lr=lr, seed=seed),
        data=replace(m.data, dir=data_dir),
        devices=m.devices[:-1] + (replace(m.devices[-1], emulate=EmulateConfig(rtt_ms=rtt)),),
    )
    assert parse_manifest(manifest_to_toml(m)) == m


@pytest.mark.parametrize(
    "override", ["gapsl.space=server", "gapsl.space=cut", "gapsl.leader=update"]
)
def test_gapsl_defaults_outside_the_client_space_are_those_that_apply_there(override: str) -> None:
    """The anchor and the prior correction need the client space with gradient leaders; where a
    manifest picks something else, the keys it leaves unset mean first-order GDA and no prior."""
    m = parse_manifest(BASE, overrides=["training.algorithm=gapsl", override])
    assert (m.gapsl.gda_mode, m.gapsl.prior_tau) == ("first_order", 0.0)
    with pytest.raises(ManifestError, match=r"\[gapsl\]\.gda_mode"):  # said, it is an error
        parse_manifest(
            BASE, overrides=["training.algorithm=gapsl", override, "gapsl.gda_mode=anchor"]
        )

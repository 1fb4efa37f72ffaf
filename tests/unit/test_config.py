"""Unit tests of resource URLs (``xatm.core.urls``) and TOML config files (``xatm.core.config``).

No database server is needed: a TransactionManager does not connect until it is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

import pytest

from xatm import ConfigurationError, TransactionManager
from xatm.admin import ResourceSpec, parse_url, redact
from xatm.core.config import load_config

SECRET = "s3cr3t-Pw"


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in (SECRET, *secrets):
        assert secret not in text, text


def config_error(source: object) -> str:
    """The message of the ConfigurationError that parse_url(source) raises (checked hidden)."""
    with pytest.raises(ConfigurationError) as excinfo:
        parse_url(source)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- URLs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scheme", "kind", "port"),
    [
        ("postgresql", "postgresql", 5432),
        ("postgres", "postgresql", 5432),
        ("postgresql+psycopg", "postgresql", 5432),
        ("POSTGRESQL", "postgresql", 5432),
        ("mysql", "mysql", 3306),
        ("mariadb", "mysql", 3306),
        ("mysql+mysqlconnector", "mysql", 3306),
        ("mariadb+mysqlconnector", "mysql", 3306),
    ],
)
def test_every_scheme(scheme: str, kind: str, port: int) -> None:
    spec = parse_url(f"{scheme}://app:{SECRET}@db1/ledger")
    assert (spec.kind, spec.host, spec.port, spec.user, spec.database) == (
        kind,
        "db1",
        port,
        "app",
        "ledger",
    )
    assert spec.password == SECRET
    assert spec.options == ()
    assert_hidden(repr(spec))
    assert_hidden(str(spec))


def test_url_parts() -> None:
    spec = parse_url("postgresql://app@db1:6543/ledger")
    assert (spec.host, spec.port, spec.user, spec.password) == ("db1", 6543, "app", None)
    assert spec.redacted() == "postgresql://app@db1:6543/ledger"
    bare = parse_url("mysql://db2")
    assert (bare.user, bare.password, bare.database, bare.port) == (None, None, None, 3306)
    v6 = parse_url(f"postgresql://app:{SECRET}@[::1]:5433/db")
    assert v6.host == "::1" and v6.redacted() == "postgresql://app:***@[::1]:5433/db"
    encoded = parse_url("postgresql://us%40er:p%40ss%3Aw%2Ford@h/my%20db")
    assert (encoded.user, encoded.password, encoded.database) == ("us@er", "p@ss:w/ord", "my db")
    assert encoded.redacted() == "postgresql://us%40er:***@h:5432/my%20db"


def test_url_options() -> None:
    spec = parse_url(
        f"mysql://app:{SECRET}@db2/wallet?ssl_disabled=true&unix_socket=/run/my.sock&charset="
    )
    assert spec.options == (
        ("ssl_disabled", "true"),
        ("unix_socket", "/run/my.sock"),
        ("charset", ""),
    )
    assert spec.redacted() == (
        "mysql://app:***@db2:3306/wallet?ssl_disabled=true&unix_socket=%2Frun%2Fmy.sock&charset="
    )
    pg = parse_url("postgresql://app@db1/ledger?sslmode=require&application_name=pay")
    assert dict(pg.options) == {"sslmode": "require", "application_name": "pay"}


def test_password_given_as_an_option_is_hidden() -> None:
    spec = parse_url(f"postgresql://app@db1/ledger?password={SECRET}&sslpassword={SECRET}x")
    assert dict(spec.options)["password"] == SECRET
    assert_hidden(spec.redacted())
    assert_hidden(repr(spec))
    assert "password=***" in spec.redacted()


# Every piece of these passwords contains "Qz", so "Qz" must never show, not even in part.
AWKWARD_PASSWORDS = [
    "Qz1",
    "Qz1:Qz2",
    "Qz1:Qz2:Qz3",
    "Qz1@Qz2",
    "Qz1@Qz2@Qz3",
    "Qz1/Qz2",
    "Qz1@Qz2/Qz3",
    "Qz1?Qz2",
    "Qz1#Qz2",
    "Qz1 Qz2",
    "Qz1%40Qz2%2FQz3%3A",
    "12/Qz1",
    "12?a=Qz1",
    "12#Qz1",
    "Qz1'Qz2\"",
]


@pytest.mark.parametrize("password", AWKWARD_PASSWORDS)
def test_unencoded_special_characters_never_leak(password: str) -> None:
    url = f"postgresql://app:{password}@db1:5432/ledger"
    try:
        spec = parse_url(url)
    except ConfigurationError as e:
        message = str(e)
        assert "\n" not in message
    else:
        assert spec.password == unquote(password)
        assert (spec.host, spec.port, spec.database) == ("db1", 5432, "ledger")
        message = f"{spec!r} {spec} {spec.redacted()}"
    assert_hidden(message, "Qz")
    if " " not in password:  # redact() of free text cannot tell where such a URL ends
        assert_hidden(redact(url), "Qz")
    # ... and in every error that quotes the URL
    for broken in (
        url.replace("postgresql:", "oracle:"),
        url + "/extra",
        url + "?a=b&&c",
        url.replace(":5432", ":99999"),
        url.replace(":5432", ":port"),
        url.replace("db1:5432", ""),
    ):
        assert_hidden(config_error(broken), "Qz")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("oracle://app:{pw}@db/x", "unsupported scheme 'oracle'"),
        ("db1:5432/ledger", "unsupported scheme"),
        ("postgresql://app:{pw}@/ledger", "names no host"),
        ("postgresql://app:{pw}@db/ledger/more", "just a database name"),
        ("postgresql://app:{pw}@db/ledger?a=b&&c", "malformed query string"),
        ("postgresql://app:{pw}@db:99999/ledger", "port must be a number"),
        ("postgresql://app:{pw}@db:abc/ledger", "port must be a number"),
        ("postgresql://app:{pw}@[::1/ledger", "malformed resource URL"),
        ("postgresql://app:12/{pw}@db", "an '@' after the host"),
    ],
)
def test_url_errors_are_clear_and_hidden(url: str, expected: str) -> None:
    message = config_error(url.format(pw=SECRET))
    assert expected in message
    assert_hidden(message)


@pytest.mark.parametrize("value", [None, "", "   ", 42, b"postgresql://h/db"])
def test_url_must_be_a_string(value: object) -> None:
    assert "non-empty string" in config_error(value)


def test_percent_encoded_password_is_hidden() -> None:
    spec = parse_url("mysql://app:p%40ss%2Fw%3A@db/x")
    assert spec.password == "p@ss/w:"
    for shown in (repr(spec), str(spec), spec.redacted()):
        assert "p%40ss" not in shown and "p@ss" not in shown
    message = config_error("mysql://app:p%40ss%2Fw%3A@db/x/y")
    assert "p%40ss" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no url here", "no url here"),
        (
            f"connect to postgresql://app:{SECRET}@db1/x failed",
            "connect to postgresql://app:***@db1/x failed",
        ),
        (
            f"mysql://a:{SECRET}@h1/x and mariadb://b:{SECRET}2@h2/y",
            "mysql://a:***@h1/x and mariadb://b:***@h2/y",
        ),
        (f"'postgresql://u:{SECRET}@h/db': bad", "'postgresql://u:***@h/db': bad"),
        ("postgresql://app@db1:5432/x", "postgresql://app@db1:5432/x"),
        ("http://example.com:8080/path", "http://example.com:8080/path"),
        (f"host=db password={SECRET} user=app", "host=db password=*** user=app"),
        (f"?sslmode=require&password={SECRET}&x=1", "?sslmode=require&password=***&x=1"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("password", [p for p in AWKWARD_PASSWORDS if " " not in p])
def test_redact_text_with_awkward_passwords(password: str) -> None:
    text = f"error: cannot reach postgresql://app:{password}@db1/x (timeout)"
    shown = redact(text)
    assert "Qz" not in shown
    assert shown == "error: cannot reach postgresql://app:***@db1/x (timeout)"


def test_resource_spec_is_accepted_as_is() -> None:
    spec = parse_url(f"postgresql://app:{SECRET}@db1/ledger")
    assert isinstance(spec, ResourceSpec)
    tm_repr = repr({"ledger": spec})
    assert_hidden(tm_repr)


# -- config files --------------------------------------------------------------------------
def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "xatm.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigurationError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert_hidden(message)
    with pytest.raises(ConfigurationError) as again:
        TransactionManager.from_config(path)
    assert str(again.value) == message
    return message


GOOD = f"""
node_id = "api-1"
log = "@LOG@"
timeout = 12.5

[resources.ledger]
url = "postgresql://app:{SECRET}@db1:5432/ledger"

[resources.wallet]
url = "mysql://app:${{XATM_TEST_WALLET_PW}}@db2:3306/wallet?ssl_disabled=true"
"""


def test_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XATM_TEST_WALLET_PW", "env-" + SECRET)
    log = tmp_path / "abs-log"
    path = _write_config(tmp_path, GOOD.replace("@LOG@", str(log)))
    settings = load_config(path)
    assert settings.node_id == "api-1"
    assert settings.timeout == 12.5
    assert settings.log == str(log)
    assert sorted(settings.resources) == ["ledger", "wallet"]
    assert settings.resources["wallet"].password == "env-" + SECRET
    assert settings.resources["wallet"].options == (("ssl_disabled", "true"),)
    assert_hidden(repr(settings), "env-" + SECRET)
    with TransactionManager.from_config(path) as tm:
        assert tm.node_id == "api-1"
        assert tm.timeout == 12.5
        assert tm.log_directory == str(log)
        assert sorted(tm.resource_names) == ["ledger", "wallet"]
        assert tm.resources["ledger"].kind == "postgresql"
        assert tm.resources["wallet"].kind == "mysql"
        assert_hidden(repr(tm) + repr(tm.resources), "env-" + SECRET)
        assert (log / "api-1" / "lock").exists()


def test_defaults_and_extra(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        'node_id = "n"\nlog = "/tmp/x"\n[sweeper]\ninterval = 5\n'
        '[resources.a]\nurl = "postgresql://h/d"\n',
    )
    settings = load_config(path)
    assert settings.timeout == 30.0
    assert settings.extra == {"sweeper": {"interval": 5}}


def test_relative_log_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write_config(
        tmp_path, 'node_id = "n"\nlog = "state/log"\n[resources.a]\nurl = "postgresql://h/d"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(path).log == str((tmp_path / "conf" / "state" / "log").resolve())
    # a relative path to the file itself works the same way
    assert load_config(os.path.relpath(path)).log == str(
        (tmp_path / "conf" / "state" / "log").resolve()
    )


def test_env_in_log_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XATM_TEST_STATE", str(tmp_path / "state"))
    path = _write_config(
        tmp_path,
        'node_id = "n"\nlog = "${XATM_TEST_STATE}/log"\n[resources.a]\nurl = "postgresql://h/d"\n',
    )
    assert load_config(path).log == str(tmp_path / "state" / "log")


def test_missing_env_var_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XATM_TEST_WALLET_PW", raising=False)
    path = _write_config(tmp_path, GOOD.replace("@LOG@", str(tmp_path / "log")))
    message = load_error(path)
    assert "XATM_TEST_WALLET_PW" in message
    assert "wallet" in message and str(path) in message


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.toml")
    assert "does not exist" in message and "nope.toml" in message


def test_unreadable_file_is_a_directory(tmp_path: Path) -> None:
    assert "cannot read config file" in load_error(tmp_path)


def test_invalid_toml(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        f'node_id = "n"\nlog = "/tmp/x"\n[resources.a]\nurl = "postgresql://u:{SECRET}@h/d\n',
    )
    message = load_error(path)
    assert "not valid TOML" in message and "line" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('node_id = "n"\nlog = "/x"\nthreads = 4\n', "unknown setting(s): threads"),
        ('node_id = "n"\nlog = "/x"\n[resource.a]\nurl = "postgresql://h/d"\n', "resource"),
        ('log = "/x"\n', "'node_id' is required"),
        ('node_id = "n"\n', "'log' is required"),
        ('node_id = "n"\nlog = "/x"\n', "[resources.NAME]"),
        ('node_id = "n"\nlog = "/x"\nresources = {}\n', "[resources.NAME]"),
        ('node_id = "n"\nlog = "/x"\n[resources.a]\nuri = "postgresql://h/d"\n', "'url'"),
        ('node_id = "n"\nlog = "/x"\n[resources.a]\nurl = 5\n', "'url'"),
        ('node_id = "n"\nlog = "/x"\nresources = {a = "postgresql://h/d"}\n', "'url'"),
        (
            'node_id = "n"\nlog = "/x"\n[resources.a]\nurl = "postgresql://h/d"\npasword = "x"\n',
            "unknown setting(s) in [resources.a]: pasword",
        ),
        ('node_id = "n"\nlog = ""\n[resources.a]\nurl = "postgresql://h/d"\n', "'log' must"),
        ('node_id = "n"\nlog = 3\n[resources.a]\nurl = "postgresql://h/d"\n', "'log' must"),
    ],
)
def test_structure_errors(tmp_path: Path, body: str, expected: str) -> None:
    message = load_error(_write_config(tmp_path, body))
    assert expected in message
    assert "xatm.toml" in message


RESOURCE = f'[resources.a]\nurl = "postgresql://app:{SECRET}@h/d"\n'


@pytest.mark.parametrize("timeout", ['"30"', "0", "-1", "true", "nan", "[1]"])
def test_bad_timeout(tmp_path: Path, timeout: str) -> None:
    path = _write_config(tmp_path, f'node_id = "n"\nlog = "/x"\ntimeout = {timeout}\n{RESOURCE}')
    assert "timeout must be a positive number" in load_error(path)


@pytest.mark.parametrize("node_id", ['"a b"', '"a.b"', '""', "7", '"' + "n" * 31 + '"'])
def test_bad_node_id(tmp_path: Path, node_id: str) -> None:
    path = _write_config(tmp_path, f'node_id = {node_id}\nlog = "/x"\n{RESOURCE}')
    assert "node_id must be" in load_error(path)


def test_bad_resource_name(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        f'node_id = "n"\nlog = "/x"\n[resources."a b"]\nurl = "postgresql://u:{SECRET}@h/d"\n',
    )
    assert "resource name" in load_error(path)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("oracle://app:{pw}@h/d", "unsupported scheme"),
        ("postgresql://app:{pw}@h/d/e", "just a database name"),
        ("postgresql://app:{pw}@h:port/d", "port must be a number"),
        ("postgresql://app:p@{pw}/x@h/d/e", "an '@' after the host"),
        ("postgresql://app:${{XATM_TEST_PW}}@h/d/e", "port must be a number"),
    ],
)
def test_bad_url_in_config_hides_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    monkeypatch.setenv("XATM_TEST_PW", "from-env-" + SECRET + "/@x")
    url = url.format(pw=SECRET)
    path = _write_config(
        tmp_path, f'node_id = "n"\nlog = "/x"\n[resources.ledger]\nurl = "{url}"\n'
    )
    message = load_error(path)
    assert expected in message and "'ledger'" in message
    assert_hidden(message, "from-env-")


def test_decision_retention(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path, f'node_id = "n"\nlog = "/x"\ndecision_retention = 600\n{RESOURCE}'
    )
    assert load_config(path).extra == {"decision_retention": 600}
    for bad in ('"600"', "-1", "true", "inf", "nan"):
        path = _write_config(
            tmp_path, f'node_id = "n"\nlog = "/x"\ndecision_retention = {bad}\n{RESOURCE}'
        )
        assert "decision_retention must be a number of seconds >= 0" in load_error(path)


# -- XATM_FAILPOINT ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["after_decison", "after_decision:pause", "AFTER_PREPARE"])
def test_a_failpoint_typo_is_an_error(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in XATM_FAILPOINT would test nothing, silently: a manager refuses to start,
    naming the valid values; nothing is opened."""
    from xatm.aio import AsyncTransactionManager

    monkeypatch.setenv("XATM_FAILPOINT", value)
    resources = {"db": "postgresql://u@127.0.0.1:1/db"}
    for make in (TransactionManager, AsyncTransactionManager):
        with pytest.raises(ConfigurationError) as raised:
            make(resources, tmp_path / "log", "fp")
        assert repr(value) in str(raised.value)
        assert "after_decision" in str(raised.value) and "saga_after_step" in str(raised.value)
    assert not (tmp_path / "log").exists()


def test_valid_failpoints_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from xatm.core import failpoint as _failpoint

    for value in ("", "after_decision", "before_decision:stop", "commit_batch_open"):
        monkeypatch.setenv("XATM_FAILPOINT", value)
        _failpoint.check()


def test_max_active(tmp_path: Path) -> None:
    path = _write_config(tmp_path, f'node_id = "n"\nlog = "/x"\nmax_active = 16\n{RESOURCE}')
    assert load_config(path).extra == {"max_active": 16}
    for bad in ('"16"', "0", "-1", "true", "2.5"):
        path = _write_config(tmp_path, f'node_id = "n"\nlog = "/x"\nmax_active = {bad}\n{RESOURCE}')
        assert "'max_active' must be an integer >= 1" in load_error(path)

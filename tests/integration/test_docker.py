"""docker/: the compose file's syntax and structure, its xatm.toml, and (with Docker) MySQL 8.

The compose checks need no Docker engine: its YAML is parsed with PyYAML when installed (else
that test is skipped, saying so), and ``docker compose config -q`` runs only if an engine and
the compose plugin answer. The container tests start PostgreSQL 16 and MySQL 8.4 with
testcontainers (``xatm.testing.containers``) only when XATM_TEST_DOCKER=1 and an engine is
reachable; otherwise they are skipped with the reason.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from xatm.core.config import load_config
from xatm.testing import containers

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
INIT_SQL = DOCKER / "mysql-init" / "01-xatm.sql"
_numbers = itertools.count(1)
SERVICES = {
    "pg1": "postgres:16",
    "pg2": "postgres:16",
    "mysql": "mysql:8.4",
    "mariadb": "mariadb:11",
}


# -- the compose file ---------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed: the compose file's YAML structure is not checked"
    )
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_yaml_structure() -> None:
    compose = _compose()
    services = compose["services"]
    assert {name: s["image"] for name, s in services.items()} == SERVICES
    for name, service in services.items():
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert check["retries"] > 0 and check["interval"], name
        assert service["ports"], name
        for port in service["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name in ("pg1", "pg2"):
        command = services[name]["command"]
        flags = dict(re.findall(r"(\w+)=(\d+)", " ".join(command)))
        assert int(flags["max_prepared_transactions"]) > 0
        assert services[name]["environment"]["POSTGRES_USER"] == "xatm"
    mount = services["mysql"]["volumes"][0].split(":")
    assert (DOCKER / mount[0]).resolve() == INIT_SQL.parent
    assert mount[1] == "/docker-entrypoint-initdb.d"
    assert services["mariadb"]["environment"]["MARIADB_USER"] == "xatm"
    published = sorted(int(str(p).split(":")[1]) for s in services.values() for p in s["ports"])
    assert len(set(published)) == len(published)


def test_compose_text_without_a_yaml_parser() -> None:
    """What can be checked on the text alone (runs even without PyYAML)."""
    text = COMPOSE.read_text()
    assert "\t" not in text  # YAML forbids tabs for indentation
    services = re.findall(r"^  (\w+):\s*$", text.split("\nservices:\n", 1)[1], re.MULTILINE)
    assert services == list(SERVICES)
    assert text.count("healthcheck:") >= 3  # the two PostgreSQL share one (a YAML anchor)
    assert re.search(r"max_prepared_transactions=([1-9]\d*)", text)
    for port in re.findall(r'"([\d.]*:?\d+:\d+)"', text):
        assert port.startswith("127.0.0.1:"), port
    for image in SERVICES.values():
        assert f"image: {image}\n" in text


def test_mysql_init_grants_xa_recover_admin() -> None:
    sql = INIT_SQL.read_text()
    assert re.search(r"CREATE USER IF NOT EXISTS 'xatm'@'%'", sql)
    assert re.search(r"GRANT XA_RECOVER_ADMIN ON \*\.\* TO 'xatm'@'%';", sql)


def test_xatm_toml_points_at_the_compose_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XATM_DB_PASSWORD", "from-the-environment")
    settings = load_config(DOCKER / "xatm.toml")
    ports = {name: spec.port for name, spec in settings.resources.items()}
    kinds = {name: spec.kind for name, spec in settings.resources.items()}
    published = {int(p) for p in re.findall(r'"127\.0\.0\.1:(\d+):\d+"', COMPOSE.read_text())}
    assert set(ports.values()) == published
    assert sorted(kinds.values()) == ["mysql", "mysql", "postgresql", "postgresql"]
    assert all(spec.password == "from-the-environment" for spec in settings.resources.values())
    assert all(spec.host == "127.0.0.1" for spec in settings.resources.values())
    assert Path(settings.log) == DOCKER / "log"


def test_docker_compose_config() -> None:
    reason = containers.docker_engine_reason()
    if reason is not None:
        pytest.skip(f"docker compose config not run: {reason}")
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker compose config not run: no docker command")
    plugin = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if plugin.returncode != 0:
        pytest.skip("docker compose config not run: the compose plugin is not installed")
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# -- testcontainers: PostgreSQL 16 + MySQL 8.4 --------------------------------------------------


@pytest.fixture(scope="module")
def container_urls() -> Iterator[dict[str, str]]:
    reason = containers.docker_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with containers.postgres_container() as pg, containers.mysql_container() as mysql:
        yield {"pg": pg, "mysql": mysql}


@pytest.fixture
def mysql8_orm(container_urls: dict[str, str]) -> Iterator[Any]:
    from sqlalchemy import create_engine

    from tests.support.sa_models import Orm, make_models, sa_url

    suffix = f"docker_{os.getpid()}_{next(_numbers)}"
    base, ledger, wallet = make_models(suffix)
    pg = create_engine(sa_url(container_urls["pg"]))
    my = create_engine(sa_url(container_urls["mysql"]), connect_args={"use_pure": True})
    ledger.__table__.create(pg)
    wallet.__table__.create(my)
    with pg.begin() as conn:
        conn.execute(ledger.__table__.insert(), [{"id": 1, "owner": "ann", "balance": 1000}])
    with my.begin() as conn:
        conn.execute(wallet.__table__.insert(), [{"id": 1, "owner": "bob", "balance": 1000}])
    try:
        yield Orm(pg, my, base, ledger, wallet, suffix)
    finally:
        pg.dispose()
        my.dispose()


@pytest.mark.docker
def test_mysql8_cross_database_commit(mysql8_orm: Any, tmp_path: Path) -> None:
    from xatm import TransactionManager

    orm = mysql8_orm
    with TransactionManager(orm.resources, tmp_path / "log", "docker-1", sweeper=False) as tm:
        assert tm.doctor().ok, tm.doctor()
        with tm.transaction() as tx:
            session = tx.session(binds=orm.binds)
            session.get(orm.ledger, 1).balance -= 5
            session.get(orm.wallet, 1).balance += 5
        assert tx.state.value == "committed"
        with pytest.raises(RuntimeError), tm.transaction() as tx:
            tx.session(binds=orm.binds).get(orm.wallet, 1).balance = 0
            raise RuntimeError("rolled back on MySQL 8 too")
    assert orm.rows(orm.ledger)[1] == ("ann", 995)
    assert orm.rows(orm.wallet)[1] == ("bob", 1005)


@pytest.mark.docker
def test_mysql8_crash_after_decision_then_recover(
    mysql8_orm: Any, container_urls: dict[str, str], tmp_path: Path
) -> None:
    from xatm import TransactionManager

    orm = mysql8_orm
    log = tmp_path / "log"
    cfg = {
        "pg_url": container_urls["pg"],
        "mysql_url": container_urls["mysql"],
        "log": str(log),
        "node_id": "docker-crashy",
        "suffix": orm.suffix,
        "amount": 40,
    }
    path = tmp_path / "sa-worker.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.workers.sa_worker", str(path)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "XATM_FAILPOINT": "after_decision"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with TransactionManager(orm.resources, log, "docker-crashy", sweeper=False) as tm:
        before = tm.indoubt()
        assert len(before.transactions) == 1, before  # both branches prepared, one gtrid
        report = tm.recover()  # XA RECOVER works: the user has XA_RECOVER_ADMIN
        assert report.committed == 2 and report.in_doubt == 0 and report.unreachable == ()
    assert orm.rows(orm.ledger) == {1: ("ann", 960)}
    assert orm.rows(orm.wallet) == {1: ("bob", 1040), 2: ("new", 40)}

"""ORM models for the SQLAlchemy tests (shared with the crash worker, tests.workers.sa_worker), and
the engines and models of one test (``Orm``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def sa_url(url: str) -> str:
    """A test server's URL with SQLAlchemy's driver name: psycopg, and for MySQL the driver
    the URL names, or else the one of this test run (XATM_TEST_MYSQL_DRIVER: mysql-connector
    by default)."""
    from tests.support import MYSQL_DRIVER, MYSQL_DRIVERS

    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("mysql://"):  # a subprocess may not see XATM_TEST_MYSQL_DRIVER: a URL
        return MYSQL_DRIVERS[MYSQL_DRIVER][2] + url[len("mysql") :]  # naming one keeps it
    return url


def make_models(suffix: str) -> tuple[Any, Any, Any]:
    """A declarative base and two models: Ledger (meant for PostgreSQL) and Wallet (for
    MariaDB), on tables of their own per test (``suffix``)."""

    class Base(DeclarativeBase):
        pass

    class Ledger(Base):
        __tablename__ = f"sa_ledger_{suffix}"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        owner: Mapped[str] = mapped_column(String(40))
        balance: Mapped[int]

    class Wallet(Base):
        __tablename__ = f"sa_wallet_{suffix}"
        __table_args__ = {"mysql_engine": "InnoDB"}
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        owner: Mapped[str] = mapped_column(String(40))
        balance: Mapped[int]

    return Base, Ledger, Wallet


@dataclass
class Orm:
    """Engines on pg1 and maria, the models, and counters of the engines' pool events."""

    pg: Engine
    my: Engine
    base: Any
    ledger: Any
    wallet: Any
    suffix: str
    events: dict[str, int] = field(default_factory=dict)

    @property
    def resources(self) -> dict[str, Engine]:
        return {"ledger": self.pg, "wallet": self.my}

    @property
    def binds(self) -> dict[Any, str]:
        return {self.ledger: "ledger", self.wallet: "wallet"}

    def rows(self, model: Any) -> dict[int, tuple[str, int]]:
        """The committed rows of ``model``'s table, read outside xatm."""
        engine = self.pg if model is self.ledger else self.my
        with engine.connect() as conn:
            result = conn.execute(select(model.id, model.owner, model.balance))
            return {int(i): (str(o), int(b)) for i, o, b in result}

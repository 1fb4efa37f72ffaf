"""ORM models for the SQLAlchemy tests (shared with the crash worker, tests.sa_worker)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, String
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

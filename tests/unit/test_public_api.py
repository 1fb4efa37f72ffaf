"""The public surface: xatm's top level is what an application uses; operators' types are in
xatm.admin; importing xatm loads no exporter and puts no top-level ``cli`` package around."""

from __future__ import annotations

import importlib

import xatm
import xatm.admin


def test_the_top_level_is_what_an_application_uses() -> None:
    assert len(xatm.__all__) <= 30
    for name in ("TransactionManager", "Transaction", "Saga", "SagaAbort", "XatmError"):
        assert name in xatm.__all__
    for name in ("Inspector", "Resolution", "Xid", "Sweeper", "parse_url"):
        assert name not in xatm.__all__ and not hasattr(xatm, name)


def test_every_exported_name_exists() -> None:
    for module in (xatm, xatm.admin):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)


def test_admin_holds_the_operator_types() -> None:
    for name in ("Inspector", "InDoubtReport", "Resolution", "ResolutionRefused", "Xid"):
        assert name in xatm.admin.__all__
    assert importlib.import_module("xatm.admin").Inspector.__module__ == "xatm.ops.inspect"

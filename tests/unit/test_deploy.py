"""The deployment recipes in deploy/: the systemd unit (``systemd-analyze verify`` where it
exists), the Kubernetes manifests (YAML, the fields that matter, probes on the daemon's own
endpoints, a grace period above ``--grace``), the Dockerfile; in each, the ``xatm`` command
line is parsed by the real command, and the config in the ConfigMap loads."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from tests.support import ROOT
from xatm import load_config
from xatm.cli.main import main

DEPLOY = ROOT / "deploy"
XATM = Path(sys.executable).parent / "xatm"
yaml = pytest.importorskip("yaml")


def _parse(argv: list[str]) -> dict[str, Any]:
    """The options ``xatm sweep`` gets from ``argv`` (global options first), as the real
    command parses them: a misspelt or misplaced option fails here."""
    at = argv.index("sweep")
    ctx = main.make_context("xatm", [*argv[:at], "sweep"])
    sub = main.commands["sweep"].make_context("sweep", argv[at + 1 :], parent=ctx)
    return dict(sub.params)


def _manifests(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"].get("name"), doc
    return docs


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    return deployment


def _sweeper_container(deployment: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    for container in pod["containers"]:
        argv = [*container.get("command", [])[1:], *container.get("args", [])]
        if "sweep" in argv:
            return container, _parse(argv)
    raise AssertionError("no container runs xatm sweep")


def _probes(container: dict[str, Any]) -> dict[str, str]:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    out = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in container:
            get = container[kind]["httpGet"]
            assert get["port"] in ports, get
            out[kind] = get["path"]
    return out


def test_the_standalone_deployment() -> None:
    docs = _manifests("sweeper-deployment.yaml")
    deployment = _deployment(docs)
    spec = deployment["spec"]
    # an upgrade never runs two live coordinators of one node
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    container, params = _sweeper_container(deployment)
    assert params["metrics_port"] == 9464 and params["metrics_address"] == "0.0.0.0"
    assert _probes(container) == {
        "startupProbe": "/livez",
        "livenessProbe": "/livez",
        "readinessProbe": "/readyz",
    }
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > params["grace"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]


def test_the_sidecar() -> None:
    deployment = _deployment(_manifests("sweeper-sidecar.yaml"))
    container, params = _sweeper_container(deployment)
    assert container["command"] == ["xatm"]
    # a standby sidecar is healthy: it must not keep its pod out of the Service
    assert _probes(container) == {"livenessProbe": "/livez", "readinessProbe": "/livez"}
    assert params["standby"] is True
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > params["grace"]


def test_the_configmap_holds_a_config_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (config,) = [d for d in _manifests("sweeper-deployment.yaml") if d["kind"] == "ConfigMap"]
    path = tmp_path / "xatm.toml"
    path.write_text(config["data"]["xatm.toml"])
    for name in ("LOG_PASSWORD", "LEDGER_PASSWORD", "WALLET_PASSWORD"):
        monkeypatch.setenv(name, "x")
    settings = load_config(path)
    assert set(settings.resources) == {"ledger", "wallet"}
    assert settings.log.startswith("postgresql://")


def test_the_systemd_unit() -> None:
    unit = (DEPLOY / "systemd" / "xatm-sweeper.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[0].endswith("/xatm")
    params = _parse(argv[1:])
    (stop,) = [line for line in unit.splitlines() if line.startswith("TimeoutStopSec=")]
    assert float(stop.split("=")[1]) > params["grace"]
    assert "Restart=always" in unit.splitlines()


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "xatm-sweeper.service").read_text()
    # the same unit, with this checkout's command (verify checks that it is executable)
    local = tmp_path / "xatm-sweeper.service"
    local.write_text(unit.replace("/opt/xatm/bin/xatm", str(XATM)))
    proc = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no unknown key, no bad value


def test_the_dockerfile() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    instructions = [line.split(None, 1) for line in lines if line and line[0] not in "# "]
    kinds = [k for k, *_ in instructions]
    assert kinds[0] == "FROM" and "USER" in kinds and "STOPSIGNAL" in kinds
    for kind, rest in instructions:
        if kind == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    entry = next(json.loads(rest) for kind, rest in instructions if kind == "ENTRYPOINT")
    cmd = next(json.loads(rest) for kind, rest in instructions if kind == "CMD")
    assert entry == ["xatm"]
    params = _parse(cmd)
    assert params["metrics_address"] == "0.0.0.0" and params["grace"] == 25.0


def test_the_recipes_parse_nothing_invalid() -> None:
    with pytest.raises(click.exceptions.NoSuchOption):
        _parse(["sweep", "--no-such-option"])

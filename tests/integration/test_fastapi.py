"""xatm.fastapi under a real ASGI server (uvicorn, in a process of its own) with a real HTTP
client (httpx), on the test servers: a response is sent only once its transaction committed,
a rollback is never a 200, and the exception handlers answer 409 / 503 / 500."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Bank, CommitsBlocked
from tests.support.recovery import wait_for, write_config
from xatm.testing.servers import free_port

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str, stderr: Path, cid: Path) -> None:
        self.proc, self.url, self.stderr, self.cid = proc, url, stderr, cid


@pytest.fixture
def served(bank: Bank, tmp_path: Path) -> Iterator[Served]:
    dead = f"postgresql://xatm:x@127.0.0.1:{free_port()}/xatm"
    urls = {"pg1": bank.urls["pg1"], "maria": bank.urls["maria"], "dead": dead}
    config = write_config(tmp_path / "xatm.toml", urls, tmp_path / "log", node_id="web")
    config.write_text(config.read_text() + "[sweeper]\nenabled = false\n")
    port = free_port()
    stderr = tmp_path / "uvicorn.err"
    cid = tmp_path / "cid"
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "XATM_CONFIG": str(config),
        "APP_TABLE": bank.table,
        "APP_CID": str(cid),
    }
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.support.fastapi_app:app", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, stderr.read_text()
        try:
            return httpx.get(f"{url}/node", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 60, "uvicorn to serve")
        yield Served(proc, url, stderr, cid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_the_response_is_sent_only_after_the_commit(served: Served, bank: Bank) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as client:
        done = client.post("/transfer", params={"amount": 10, "tid": "ok1"})
        assert done.status_code == 200, done.text
        # no waiting: by the time the client has its 200, both branches are committed
        assert "ok1" in bank.journal_ids()["pg1"]
        assert bank.balance("pg1", 1) == 990 and bank.balance("maria", 1) == 1010

        refused = client.post("/transfer", params={"amount": 10, "tid": "rb1", "rollback": True})
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["gtrid"].startswith("xatm.web.") and "rolled back" in body["detail"]
        assert "rb1" not in bank.journal_ids()["pg1"] and bank.balance("pg1", 1) == 990

        raised = client.post("/refuse")
        assert raised.status_code == 422 and bank.balance("pg1", 2) == 1000

        synced = client.post("/sync-transfer", params={"amount": 4, "tid": "sy1"})
        assert synced.status_code == 200, synced.text
        assert "sy1" in bank.journal_ids()["maria"] and bank.balance("pg1", 3) == 996

        down = client.post("/down")
        assert down.status_code == 503 and down.headers["retry-after"] == "1", down.text
        assert "x@" not in down.text  # no URL, no password in the body
    assert bank.total() == bank.initial_total


def test_an_in_doubt_commit_is_a_500_with_its_gtrid(served: Served, bank: Bank) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as client:
        assert client.post("/transfer", params={"amount": 1, "tid": "warm"}).status_code == 200
        blocked = CommitsBlocked(bank.urls["maria"])
        try:

            def cid() -> int | None:
                return int(served.cid.read_text()) if served.cid.exists() else None

            interrupter = threading.Thread(target=blocked.interrupt, args=(cid,))
            interrupter.start()
            doubt = client.post("/doubt")
            interrupter.join(60)
        finally:
            blocked.close()
    assert doubt.status_code == 500, doubt.text
    assert doubt.json()["gtrid"].startswith("xatm.web.") and "not known" in doubt.json()["detail"]


def test_a_client_that_disconnects_does_not_stop_the_commit(served: Served, bank: Bank) -> None:
    """Starlette does not cancel a plain endpoint when its client goes: the transaction
    commits anyway (so a client that retries needs an idempotency key)."""
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=served.url, timeout=0.3) as c:
        c.post("/slow", params={"tid": "gone"})
    wait_for(lambda: "gone" in bank.journal_ids()["pg1"], 30, "the endpoint to commit")


def test_shutdown_drains_and_closes_cleanly(served: Served, bank: Bank) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as client:
        assert client.post("/transfer", params={"amount": 2, "tid": "last"}).status_code == 200
    served.proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert served.proc.wait(60) == 0
    assert time.monotonic() - started < 30
    text = served.stderr.read_text()
    assert "Traceback" not in text and "could not be logged" not in text, text

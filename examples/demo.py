"""``make demo``: xatm's whole story in one run, on private throwaway servers.

A transfer moves money out of a ``ledger`` table in PostgreSQL and into a ``wallet`` table in
MariaDB, as one global transaction. The demo

1. starts private PostgreSQL and MariaDB servers from the local binaries (loopback only);
2. creates the two tables (and a journal of transfers on each side);
3. runs a short transfer workload through xatm, including one transfer the database refuses;
4. runs one more transfer in a child coordinator process that is killed (SIGKILL) right after
   its COMMIT decision is durable and before any branch is committed
   (``XATM_FAILPOINT=after_decision``);
5. shows the in-doubt branches it left prepared on each server, the recovery plan, and what
   an operator sees with ``xatm indoubt``;
6. shows that those branches still hold their row locks;
7. runs ``xatm recover`` (the operator's command line), which takes over the dead
   coordinator's log, and ``xatm show`` for the transaction's audit trail;
8. runs the same transfer as sagas (``examples/demo_sagas.py``): one completes, one is
   compensated, one is killed mid-way, shown by ``xatm sagas`` and finished by recovery;
9. checks the invariant: no money created or lost, every transfer on both sides or neither,
   every saga completed or compensated.

The servers and every file are deleted at the end, also on error or Ctrl-C. Exit status: 0 when
the invariant holds, 1 when it does not (or the demo failed), 130 when interrupted.

Each step is one function, so more steps can be added between them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import mysql.connector
import psycopg

from examples import demo_sagas
from xatm import TransactionManager, TransactionRolledBack
from xatm.admin import ResourceSpec, Xid, parse_url, redact
from xatm.testing import servers as devservers

PASSWORD_ENV = "XATM_DEMO_PASSWORD"
ACCOUNTS = 5
OPENING_BALANCE = 1000
TRANSFERS = 12
OVERDRAFT_AT = 7  # this transfer asks for more than the account holds
CRASH_ID = "t-crash"
APP_NODE = "demo-app"
CRASH_NODE = "demo-crashy"
OPS_NODE = "demo-ops"
CHILD_TIMEOUT = 60.0


class DemoError(Exception):
    """Something in the demo itself went wrong (not the invariant)."""


# --------------------------------------------------------------------------- output


def step(number: int, title: str) -> None:
    print(f"\n{number}. {title}", flush=True)


def say(text: str = "") -> None:
    print(redact(f"   {text}") if text else "", flush=True)


def say_unredacted(text: str) -> None:
    """For text that holds no secret but looks like a URL with one (``${VAR}``)."""
    print(f"   {text}", flush=True)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Transfer:
    """Money moved from a ledger account (PostgreSQL) to a wallet account (MariaDB)."""

    tid: str
    src: int
    dst: int
    amount: int


@dataclass
class Demo:
    """What the steps share."""

    basedir: Path
    servers: devservers.ServerSet
    ledger: ResourceSpec  # on pg1
    wallet: ResourceSpec  # on maria
    acknowledged: list[Transfer] = field(default_factory=list)  # committed, the app was told
    refused: list[Transfer] = field(default_factory=list)  # rolled back, the app was told
    crashed: Transfer | None = None
    crashed_gtrid: str = ""
    saga_states: dict[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.basedir / "log"

    @property
    def opening_total(self) -> int:
        return 2 * ACCOUNTS * OPENING_BALANCE


def pg_connect(spec: ResourceSpec) -> psycopg.Connection[Any]:
    """A plain autocommit connection to the ledger database, outside xatm."""
    return psycopg.connect(
        host=spec.host,
        port=spec.port,
        user=spec.user,
        password=spec.password,
        dbname=spec.database,
        autocommit=True,
    )


def maria_connect(spec: ResourceSpec) -> Any:
    """A plain autocommit connection to the wallet database, outside xatm."""
    return mysql.connector.connect(
        host=spec.host,
        port=spec.port,
        user=spec.user,
        password=spec.password,
        database=spec.database,
        autocommit=True,
        use_pure=True,
    )


def maria_query(conn: Any, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    try:
        cur.execute(query, params)
        return list(cur.fetchall()) if cur.description else []
    finally:
        cur.close()


def config_path(demo: Demo, node_id: str) -> Path:
    return demo.basedir / f"{node_id}.toml"


def write_config(demo: Demo, node_id: str, *, sweeper: bool = True, sagas: bool = False) -> Path:
    """The TOML config of one coordinator; the password stays in the environment."""
    path = config_path(demo, node_id)
    text = (
        f'node_id = "{node_id}"\n'
        'log = "log"          # relative to this file: every coordinator shares it\n'
        "timeout = 10.0\n" + (f'sagas = ["{demo_sagas.REFERENCE}"]\n' if sagas else "") + "\n"
        "[resources.ledger]\n"
        f'url = "postgresql://{demo.ledger.user}:${{{PASSWORD_ENV}}}'
        f'@{demo.ledger.host}:{demo.ledger.port}/{demo.ledger.database}"\n\n'
        "[resources.wallet]\n"
        f'url = "mysql://{demo.wallet.user}:${{{PASSWORD_ENV}}}'
        f'@{demo.wallet.host}:{demo.wallet.port}/{demo.wallet.database}"\n'
    )
    if not sweeper:
        text += (
            "\n[sweeper]\n"
            "enabled = false      # no background recovery: the demo calls recover() itself\n"
        )
    path.write_text(text)
    path.chmod(0o600)
    return path


def run_cli(demo: Demo, *args: str) -> None:
    """Run the ``xatm`` command as an operator would, with the ops config, and show it."""
    cmd = [sys.executable, "-m", "xatm", "--config", str(config_path(demo, OPS_NODE))]
    say(f"$ xatm {' '.join(args)}")
    proc = subprocess.run(
        [*cmd, *args],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "XATM_ACTOR": "cli:on-call"},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        say(f"  {line}")
    if proc.returncode != 0:
        raise DemoError(f"xatm {' '.join(args)} exited with status {proc.returncode}")


def run_transfer(tx: Any, t: Transfer) -> None:
    """The application's work: credit the wallet (MariaDB), debit the ledger (PostgreSQL)."""
    tx.execute(
        "wallet",
        "UPDATE wallet SET balance = balance + %s WHERE account = %s",
        (t.amount, t.dst),
    )
    tx.execute(
        "wallet",
        "INSERT INTO wallet_moves (transfer_id, account, amount) VALUES (%s, %s, %s)",
        (t.tid, t.dst, t.amount),
    )
    tx.execute(
        "ledger",
        "UPDATE ledger SET balance = balance - %s WHERE account = %s",
        (t.amount, t.src),
    )
    tx.execute(
        "ledger",
        "INSERT INTO ledger_moves (transfer_id, account, amount) VALUES (%s, %s, %s)",
        (t.tid, t.src, -t.amount),
    )


# --------------------------------------------------------------------------- the steps


def start_servers(basedir: Path) -> devservers.ServerSet:
    step(1, "Starting private throwaway servers (local binaries, 127.0.0.1 only)")
    started = time.monotonic()
    servers = devservers.start_all(basedir)
    say(f"PostgreSQL pg1  {redact(servers.pg1.url())}   <- resource 'ledger'")
    say(f"PostgreSQL pg2  {redact(servers.pg2.url())}   (not used here)")
    say(f"MariaDB    maria {redact(servers.maria.url())}   <- resource 'wallet'")
    say(f"up in {time.monotonic() - started:.1f} s, under {basedir}")
    return servers


def create_tables(demo: Demo) -> None:
    step(2, "Creating the tables, and the coordinator's config")
    with pg_connect(demo.ledger) as pg:
        pg.execute(
            "CREATE TABLE ledger (account INT PRIMARY KEY,"
            " balance INT NOT NULL CHECK (balance >= 0))"
        )
        pg.execute(
            "CREATE TABLE ledger_moves (transfer_id VARCHAR(20) PRIMARY KEY,"
            " account INT NOT NULL, amount INT NOT NULL)"
        )
        for account in range(1, ACCOUNTS + 1):
            pg.execute("INSERT INTO ledger VALUES (%s, %s)", (account, OPENING_BALANCE))
    maria = maria_connect(demo.wallet)
    try:
        maria_query(
            maria,
            "CREATE TABLE wallet (account INT PRIMARY KEY, balance INT NOT NULL) ENGINE=InnoDB",
        )
        maria_query(
            maria,
            "CREATE TABLE wallet_moves (transfer_id VARCHAR(20) PRIMARY KEY,"
            " account INT NOT NULL, amount INT NOT NULL) ENGINE=InnoDB",
        )
        for account in range(1, ACCOUNTS + 1):
            maria_query(maria, "INSERT INTO wallet VALUES (%s, %s)", (account, OPENING_BALANCE))
    finally:
        maria.close()
    say("PostgreSQL: ledger(account, balance CHECK (balance >= 0)), ledger_moves(transfer_id, ...)")
    say("MariaDB:    wallet(account, balance),                      wallet_moves(transfer_id, ...)")
    say(
        f"{ACCOUNTS} accounts on each side with {OPENING_BALANCE} each:"
        f" {demo.opening_total} in total, which no transfer may change"
    )
    config = write_config(demo, APP_NODE)
    say(f"{config.name} (the password comes from ${PASSWORD_ENV}, not from the file):")
    for line in config.read_text().splitlines():
        say_unredacted(f"  | {line}")  # no secret in it: the password is ${XATM_DEMO_PASSWORD}


def run_workload(demo: Demo) -> None:
    step(3, f"Running {TRANSFERS} transfers through xatm (coordinator node {APP_NODE!r})")
    say("each one: credit the wallet in MariaDB, debit the ledger in PostgreSQL, in one")
    say("`with tm.transaction() as tx:` block: two branches, so two-phase commit")
    rng = random.Random(2024)
    with TransactionManager.from_config(config_path(demo, APP_NODE)) as tm:
        for n in range(1, TRANSFERS + 1):
            amount = 5 * OPENING_BALANCE if n == OVERDRAFT_AT else rng.randrange(10, 200)
            t = Transfer(f"t{n:02d}", rng.randrange(1, ACCOUNTS + 1), rng.randrange(1, 6), amount)
            what = f"{t.tid}: ledger #{t.src} -> wallet #{t.dst}, {t.amount:5d}"
            try:
                with tm.transaction() as tx:
                    run_transfer(tx, t)
            except psycopg.errors.CheckViolation:
                demo.refused.append(t)
                say(f"{what}  REFUSED by PostgreSQL (balance would go negative):")
                say("        the MariaDB credit, already made in its branch, was rolled back too")
                continue
            except TransactionRolledBack as e:
                demo.refused.append(t)
                say(f"{what}  rolled back: {e}")
                continue
            demo.acknowledged.append(t)
            if n <= 2:
                states = ", ".join(f"{r} {s.value}" for r, s in tx.branches.items())
                say(f"{what}  committed")
                say(f"        gtrid {tx.gtrid}; branches: {states}")
            elif n == 3:
                say("...")
    say(f"{len(demo.acknowledged)} committed, {len(demo.refused)} refused")
    for seg in sorted((demo.log_dir / APP_NODE).glob("seg-*")):
        say(
            f"coordinator log {seg.relative_to(demo.basedir)}: {seg.stat().st_size} bytes"
            " (one COMMIT record forced per transfer, then an END)"
        )


def crash_coordinator(demo: Demo) -> None:
    step(4, "Crashing a coordinator between the two phases")
    t = Transfer(CRASH_ID, 2, 4, 250)
    demo.crashed = t
    config = write_config(demo, CRASH_NODE)
    say(f"a second application process (node {CRASH_NODE!r}) runs transfer {t.tid}:")
    say(f"ledger #{t.src} -> wallet #{t.dst}, {t.amount}, with XATM_FAILPOINT=after_decision")
    env = {**os.environ, "XATM_FAILPOINT": "after_decision"}
    cmd = [sys.executable, "-m", "examples.demo", "--crash-child", str(config)]
    cmd += [t.tid, str(t.src), str(t.dst), str(t.amount)]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = child.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if child.poll() is None:  # interrupted or timed out: our child, by its pid
            child.kill()
            child.wait()
    lines = out.decode(errors="replace").splitlines()
    gtrids = [line.split(" ", 1)[1] for line in lines if line.startswith("gtrid ")]
    if child.returncode != -signal.SIGKILL or not gtrids:
        tail = "\n".join(lines[-10:])
        raise DemoError(f"the child should have been SIGKILLed (got {child.returncode}):\n{tail}")
    demo.crashed_gtrid = gtrids[0]
    say(f"global transaction {demo.crashed_gtrid}")
    say("both branches prepared, COMMIT decision forced to the log, then: the process died,")
    say(f"killed by SIGKILL (exit status {child.returncode}) before committing either branch.")
    say("Presumed abort does not apply: the decision is durable, so the transfer IS committed;")
    say("its branches just have not been told yet.")


def show_in_doubt(demo: Demo, ops: TransactionManager) -> None:
    step(5, "The in-doubt branches it left behind")
    with pg_connect(demo.ledger) as pg:
        rows = pg.execute(
            "SELECT gid, prepared, owner FROM pg_prepared_xacts WHERE database = current_database()"
        ).fetchall()
        say("PostgreSQL, SELECT gid, prepared, owner FROM pg_prepared_xacts:")
        for gid, prepared, owner in rows:
            xid = Xid.from_pg_gid(gid)
            say(f"  gid {gid}")
            say(f"      prepared at {prepared:%H:%M:%S} by role {owner}")
            if xid is not None:
                say(f"      = formatID {xid.format_id}, gtrid {xid.gtrid}, bqual {xid.bqual!r}")
        for x in pg.tpc_recover():
            if x.format_id is not None:
                say(f"  psycopg's own tpc_recover() parses it too: format_id {x.format_id},")
                say(f"      gtrid {x.gtrid!r}, bqual {x.bqual!r}")
    maria = maria_connect(demo.wallet)
    try:
        say("MariaDB, XA RECOVER:")
        for format_id, glen, blen, data in maria_query(maria, "XA RECOVER"):
            xid = Xid.from_mysql(int(format_id), int(glen), int(blen), bytes(data))
            shown = f"gtrid {xid.gtrid}, bqual {xid.bqual!r}" if xid else repr(bytes(data))
            say(f"  formatID {format_id}, {shown}")
    finally:
        maria.close()
    plan = ops.recover(dry_run=True)
    say(f"recover(dry_run=True) from a new coordinator (node {OPS_NODE!r}) plans:")
    for a in plan.actions:
        say(f"  {a.action:8s} the {a.resource} branch: {a.reason}")
    say("")
    say("what the on-call operator sees, one row per global transaction, its branches under it")
    say("(--json gives the same as data):")
    run_cli(demo, "indoubt")


def show_locks(demo: Demo) -> None:
    step(6, "Prepared branches keep their locks until they are resolved")
    t = demo.crashed
    assert t is not None
    with pg_connect(demo.ledger) as pg:
        try:
            pg.execute("SELECT balance FROM ledger WHERE account = %s FOR UPDATE NOWAIT", (t.src,))
            say("PostgreSQL: the ledger row was NOT locked (unexpected)")
        except psycopg.errors.LockNotAvailable as e:
            say(f"PostgreSQL: SELECT ... FOR UPDATE NOWAIT on ledger #{t.src} -> {e.sqlstate}:")
            say(f"  {str(e).strip().splitlines()[0]}")
        row = pg.execute("SELECT balance FROM ledger WHERE account = %s", (t.src,)).fetchone()
        say(f"  a plain read still sees the old balance: {row[0] if row else '?'}")
    maria = maria_connect(demo.wallet)
    try:
        try:
            maria_query(
                maria, "SELECT balance FROM wallet WHERE account = %s FOR UPDATE NOWAIT", (t.dst,)
            )
            say("MariaDB: the wallet row was NOT locked (unexpected)")
        except mysql.connector.Error as e:
            say(f"MariaDB: SELECT ... FOR UPDATE NOWAIT on wallet #{t.dst} -> error {e.errno}:")
            say(f"  {e.msg}")
        rows = maria_query(maria, "SELECT balance FROM wallet WHERE account = %s", (t.dst,))
        say(f"  a plain read still sees the old balance: {rows[0][0] if rows else '?'}")
    finally:
        maria.close()
    say("every writer of these rows waits until someone resolves the branches")


def recover(demo: Demo, ops: TransactionManager) -> None:
    step(7, "Recovery: the operator runs `xatm recover` (one recovery pass)")
    say(f"the log lock of node {CRASH_NODE!r} is free (its process is dead), so this pass")
    say("takes that log over and settles the branches by the decision found there")
    say(f"(the command runs as node {OPS_NODE}-cli: it never takes an application's node_id)")
    run_cli(demo, "recover")
    say("")
    say("the transaction, with its audit trail (log/audit.d/), after recovery:")
    run_cli(demo, "show", demo.crashed_gtrid)
    say(f"({OPS_NODE} runs with [sweeper] enabled = false, so that each step can be seen;")
    say(" with the sweeper on, the default, any live coordinator sharing the log directory")
    say(" does this on its own every [sweeper] interval, 10 s unless configured)")
    show_unlocked(demo)


def show_unlocked(demo: Demo) -> None:
    """After recovery the rows are free again and show the crashed transfer's effect."""
    t = demo.crashed
    assert t is not None
    with pg_connect(demo.ledger) as pg, pg.transaction():
        row = pg.execute(
            "SELECT balance FROM ledger WHERE account = %s FOR UPDATE NOWAIT", (t.src,)
        ).fetchone()
        say(f"ledger #{t.src} can be locked again; balance now {row[0] if row else '?'}")
    maria = maria_connect(demo.wallet)
    try:
        maria_query(maria, "BEGIN")
        rows = maria_query(
            maria, "SELECT balance FROM wallet WHERE account = %s FOR UPDATE NOWAIT", (t.dst,)
        )
        maria_query(maria, "ROLLBACK")
        say(f"wallet #{t.dst} can be locked again; balance now {rows[0][0] if rows else '?'}")
    finally:
        maria.close()


def run_sagas(demo: Demo) -> None:
    step(8, "Sagas: the same transfer as a sequence of compensable steps")
    config = write_config(demo, "demo-sagas", sagas=True)
    crash_config = write_config(demo, "demo-saga-crashy", sagas=True)
    demo.saga_states = demo_sagas.story(
        config, crash_config, say, lambda *args: run_cli(demo, *args), CHILD_TIMEOUT
    )


def check_invariant(demo: Demo) -> bool:
    step(9, "Checking the invariant")
    assert demo.crashed is not None
    with pg_connect(demo.ledger) as pg:
        ledger = dict(pg.execute("SELECT account, balance FROM ledger").fetchall())
        ledger_moves = {
            tid: amount
            for tid, amount in pg.execute("SELECT transfer_id, amount FROM ledger_moves")
        }
        pg_prepared = [
            gid
            for (gid,) in pg.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            )
            if (x := Xid.from_pg_gid(gid)) is not None and x.is_xatm
        ]
    maria = maria_connect(demo.wallet)
    try:
        wallet = dict(maria_query(maria, "SELECT account, balance FROM wallet"))
        wallet_moves = dict(maria_query(maria, "SELECT transfer_id, amount FROM wallet_moves"))
        maria_prepared = [
            row
            for row in maria_query(maria, "XA RECOVER")
            if (x := Xid.from_mysql(int(row[0]), int(row[1]), int(row[2]), bytes(row[3])))
            is not None
            and x.is_xatm
        ]
    finally:
        maria.close()

    total = sum(ledger.values()) + sum(wallet.values())
    both = set(ledger_moves) & set(wallet_moves)
    one_sided = set(ledger_moves) ^ set(wallet_moves)
    unequal = [t for t in both if ledger_moves[t] != -wallet_moves[t]]
    acked = {t.tid for t in demo.acknowledged}
    refused = {t.tid for t in demo.refused}
    opening = ACCOUNTS * OPENING_BALANCE
    journals_match = (
        sum(ledger_moves.values()) == sum(ledger.values()) - opening
        and sum(wallet_moves.values()) == sum(wallet.values()) - opening
    )
    checks = [
        (
            f"money conserved: ledger {sum(ledger.values())} + wallet {sum(wallet.values())}"
            f" = {total} (opening {demo.opening_total})",
            total == demo.opening_total,
        ),
        (
            f"every transfer on both sides or on neither ({len(both)} on both,"
            f" {len(one_sided)} on one side only, {len(unequal)} with unequal amounts)",
            not one_sided and not unequal,
        ),
        (
            f"every acknowledged transfer is there ({len(acked)})",
            acked <= set(ledger_moves) and acked <= set(wallet_moves),
        ),
        (
            f"every refused transfer left no trace ({len(refused)})",
            not refused & (set(ledger_moves) | set(wallet_moves)),
        ),
        (
            f"the crashed transfer {CRASH_ID} is committed on both sides",
            CRASH_ID in ledger_moves and CRASH_ID in wallet_moves,
        ),
        ("each side's balances agree with its journal", journals_match),
        (
            "sagas: "
            + ", ".join(f"{tid} {state}" for tid, state in sorted(demo.saga_states.items()))
            + " (s02 moved and moved back on both sides)",
            demo.saga_states == {"s01": "completed", "s02": "compensated", "s03": "completed"}
            and {"s01", "s03"} <= set(ledger_moves) & set(wallet_moves)
            and {"s02", "s02-r"} <= set(ledger_moves) & set(wallet_moves),
        ),
        (
            "no xatm branch is left prepared on either server",
            not pg_prepared and not maria_prepared,
        ),
    ]
    for text, ok in checks:
        say(f"{'ok    ' if ok else 'FAILED'} {text}")
    return all(ok for _, ok in checks)


def destroy(servers: devservers.ServerSet | None, basedir: Path) -> None:
    step(10, "Stopping the servers and deleting everything")
    if servers is not None:
        try:
            servers.destroy()
        except Exception as e:
            say(f"could not stop every server cleanly: {e}")
    shutil.rmtree(basedir, ignore_errors=True)
    say(f"removed {basedir}")


# --------------------------------------------------------------------------- the child


def crash_child(config: str, tid: str, src: int, dst: int, amount: int) -> int:
    """The coordinator that crashes: it runs one transfer and dies at the failpoint."""
    with TransactionManager.from_config(config) as tm, tm.transaction() as tx:
        print(f"gtrid {tx.gtrid}", flush=True)
        run_transfer(tx, Transfer(tid, src, dst, amount))
        # leaving the block: prepare both, force COMMIT to the log, then SIGKILL
    print("survived the failpoint: XATM_FAILPOINT was not set?", flush=True)
    return 3


# --------------------------------------------------------------------------- main


class _Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` eats it
    pass


@contextlib.contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM back while servers start, so none is left running untracked."""
    received: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def story() -> int:
    started = time.monotonic()
    print("xatm demo: a transfer debits PostgreSQL and credits MariaDB, all or nothing,")
    print("even when the coordinator process crashes in the middle of committing it.")
    signal.signal(signal.SIGTERM, _raise_interrupted)
    basedir = devservers.make_basedir("xatm-demo-")
    servers: devservers.ServerSet | None = None
    status = 1
    try:
        with _deferred_signals() as received:
            servers = start_servers(basedir)
        if received:
            raise _Interrupted(signal.Signals(received[0]).name)
        os.environ[PASSWORD_ENV] = devservers.PASSWORD  # the configs say ${XATM_DEMO_PASSWORD}
        demo = Demo(basedir, servers, parse_url(servers.pg1.url()), parse_url(servers.maria.url()))
        create_tables(demo)
        run_workload(demo)
        crash_coordinator(demo)
        ops_config = write_config(demo, OPS_NODE, sweeper=False, sagas=True)
        with TransactionManager.from_config(ops_config) as ops:
            show_in_doubt(demo, ops)
            show_locks(demo)
            recover(demo, ops)
        run_sagas(demo)
        status = 0 if check_invariant(demo) else 1
    except (KeyboardInterrupt, _Interrupted):
        print("\ninterrupted: cleaning up", flush=True)
        status = 130
    except Exception as e:
        print(f"\nthe demo failed: {redact(f'{type(e).__name__}: {e}')}", flush=True)
    finally:
        with _deferred_signals():
            destroy(servers, basedir)
    elapsed = time.monotonic() - started
    if status == 0:
        print(f"\nOK: the invariant holds ({elapsed:.1f} s).")
    elif status == 1:
        print(f"\nFAILED ({elapsed:.1f} s).")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--crash-child", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.crash_child:
        config, tid, src, dst, amount = args.crash_child
        return crash_child(config, tid, int(src), int(dst), int(amount))
    return story()


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# The driver-sensitive tests once per MySQL driver (`make drivers`, part of `make test`).
#
# The full suite runs once with the default driver (mysql-connector, whichever connection
# class it picks); each leg here runs the MySQL-facing tests, the crash matrix and a short
# chaos run again with one driver pinned by XATM_TEST_MYSQL_DRIVER (tests/support/__init__.py):
#
#   connector-pure  mysql-connector, MySQLConnection (use_pure=true)          in .venv
#   connector-c     mysql-connector 9.5.0, CMySQLConnection (C extension)     in .venv-cext
#                   (the run stops at once if the extension does not load, and
#                   tests/integration/test_drivers.py asserts the class of the connections in use)
#   pymysql         PyMySQL                                                   in .venv
#   mysqldb         mysqlclient (MySQLdb), if it could be built (`make mysqlclient`)
#
# Every leg prints its own pytest closing line; a summary of all of them comes last. Exits
# non-zero if any leg failed (a leg that cannot run is reported, and fails only if it is
# the C-extension leg, which must run).
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
CEXT_VENV=${CEXT_VENV:-.venv-cext}
export XATM_CHAOS_SECONDS=${DRIVER_CHAOS_SECONDS:-8}
# MariaDB frozen under load with a shorter freeze and timeout than the full suite's
export XATM_FREEZE_SECONDS=${DRIVER_FREEZE_SECONDS:-14}
export XATM_FREEZE_TIMEOUT=${DRIVER_FREEZE_TIMEOUT:-1}
TESTS=(
    tests/integration/test_drivers.py
    tests/integration/test_core.py
    tests/integration/test_marker.py
    tests/integration/test_sqlalchemy.py
    tests/integration/test_sagas.py
    tests/crash/test_phase2_faults.py
    tests/cli/test_inspect.py
    tests/crash/test_crash_matrix.py
    tests/chaos/test_chaos.py
    tests/field/test_silent_servers.py
)
# the chaos test in its strict mode only (short), not the omission-fault modes; the crash
# matrix with two branches (every failpoint, mode and recoverer: the three-branch cases add
# coordinator logic, not driver calls, and run in the full suite); MariaDB frozen under
# load and a connect to it frozen (the recovery pass and the command with a frozen server,
# and a frozen PostgreSQL cluster, are the same whatever the MySQL driver); the other tests
# in full
SELECT='not (test_bank_transfers_under_chaos and not strict) and not 3-branches'
SELECT+=' and not test_transfers_under_omission_faults'
SELECT+=' and not (frozen_server and pg1) and not frozen_resource and not say_early'

# The legs run two at a time (each pytest session starts servers of its own, on free ports);
# each leg's output is printed whole when it ends.
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
leg() {
    local driver=$1 venv=$2
    XATM_TEST_MYSQL_DRIVER=$driver "$venv/bin/pytest" -ra -q -p no:cacheprovider \
        -k "$SELECT" "${TESTS[@]}" >"$results/$driver.out" 2>&1
    echo $? >"$results/$driver.rc"
    {
        echo
        echo "=== MySQL driver leg: $driver ($venv)"
        cat "$results/$driver.out"
    }
}

summary=()
legs=()
# mysql-connector's pure-Python class is what the full suite ran with when its C extension
# does not load in $VENV (it does not with mysql-connector 26.x on Debian 12): no second run
if "$VENV/bin/python" -c 'import mysql.connector as m; raise SystemExit(0 if m.HAVE_CEXT else 1)'; then
    legs+=("connector-pure $VENV")
else
    summary+=("connector-pure: not run again: the full suite ran with it (no C extension in $VENV)")
fi
legs+=("connector-c $CEXT_VENV" "pymysql $VENV")
if "$VENV/bin/python" -c "import MySQLdb" 2>/dev/null; then
    legs+=("mysqldb $VENV")
else
    summary+=("mysqldb: not run: mysqlclient is not installed in $VENV ($(cat "$VENV/.mysqlclient-skipped" 2>/dev/null || echo 'see make mysqlclient'))")
fi
for ((i = 0; i < ${#legs[@]}; i += 2)); do
    # shellcheck disable=SC2086
    leg ${legs[i]} &
    if ((i + 1 < ${#legs[@]})); then
        # shellcheck disable=SC2086
        leg ${legs[i + 1]} &
    fi
    wait
done

status=0
for entry in "${legs[@]}"; do
    driver=${entry%% *}
    rc=$(cat "$results/$driver.rc" 2>/dev/null || echo 1)
    summary+=("$driver: $(tail -n 1 "$results/$driver.out")")
    if [ "$rc" -ne 0 ]; then status=1; fi
done

echo
echo "=== MySQL driver legs"
printf '%s\n' "${summary[@]}"
exit "$status"

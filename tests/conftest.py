"""The test suite's fixtures, loaded as plugins from tests/plugins/: private database servers
(``servers``), per-test tables (``bank``) and transaction managers (``make_tm``).

The servers (two PostgreSQL clusters with max_prepared_transactions > 0, one MariaDB) are
started once per test session from the local binaries, on free loopback ports, and destroyed
at the end. With XATM_TEST_PG1_URL, XATM_TEST_PG2_URL and XATM_TEST_MYSQL_URL set, the tests
use those servers instead, and the tests that must kill a server are skipped.

XATM_TEST_MYSQL_DRIVER picks the MySQL driver xatm uses (``connector-pure``, ``connector-c``,
``pymysql``, ``mysqldb``; unset: mysql-connector's default class): the ``maria`` URL is
rewritten for it (``tests.support.with_mysql_driver``). A driver that cannot be used here
(the C extension does not load, say) stops the run at once rather than testing another one.
"""

pytest_plugins = [
    "tests.plugins.servers",
    "tests.plugins.isolation",
    "tests.plugins.managers",
    "tests.plugins.foreign",
]

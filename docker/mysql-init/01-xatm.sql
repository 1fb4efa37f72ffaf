-- Run once by the mysql image's entrypoint, on an empty data directory.
-- The application/recovery user of docker/xatm.toml and of the tests (XATM_TEST_MYSQL_URL).
CREATE USER IF NOT EXISTS 'xatm'@'%' IDENTIFIED BY 'xatm-secret';
GRANT ALL PRIVILEGES ON xatm.* TO 'xatm'@'%';
-- MySQL 8: without XA_RECOVER_ADMIN, XA RECOVER fails (1401) instead of listing the prepared
-- branches, and recovery cannot finish what a crashed coordinator left.
GRANT XA_RECOVER_ADMIN ON *.* TO 'xatm'@'%';
FLUSH PRIVILEGES;

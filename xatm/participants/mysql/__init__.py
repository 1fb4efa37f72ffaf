"""MySQL / MariaDB: native XA through any common driver."""

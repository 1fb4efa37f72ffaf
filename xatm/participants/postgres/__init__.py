"""PostgreSQL: native prepared transactions through psycopg 3."""

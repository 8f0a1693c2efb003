"""Django's PostgreSQL backend with a connection health check that costs no round trip."""
from __future__ import annotations

import select

from django.db.backends.postgresql import base
from django.db.backends.postgresql.base import *  # noqa: F403  (a backend module exports the whole API)


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        """Whether a kept connection can serve the next request, judged without a query.

        Django's own check runs `SELECT 1`: a round trip at the start of every request, two per labeling cycle.
        A connection between requests has nothing to read. When the server ends it (a restart, a shutdown,
        `pg_terminate_backend`, an idle timeout) it sends its reason and closes the socket, which turns
        readable. So a readable socket, or a connection that is broken, busy or in a failed transaction (where
        `SELECT 1` fails too), is not usable, and Django opens a new one. A notice sent to an idle session also
        reads as unusable: rare, and it costs only a reconnect. A server that vanished without a word (a lost
        machine) passes, as does a session the server is ending at this very moment: the request's first query
        fails, the request answers 503 and Django closes the connection, so the next request reconnects.
        """
        if not base.is_psycopg3:
            return super().is_usable()
        connection = self.connection
        if connection is None or connection.closed or connection.broken:
            return False
        pgconn = connection.pgconn
        try:
            # poll, not select: select refuses a descriptor numbered 1024 or more, which a busy process can hold.
            poller = select.poll()
            poller.register(pgconn.socket, select.POLLIN | select.POLLPRI)
            readable = bool(poller.poll(0))
        except (OSError, ValueError, base.Database.Error):
            return False
        status = base.Database.pq.TransactionStatus
        return (not readable and pgconn.status == base.Database.pq.ConnStatus.OK
                and pgconn.transaction_status in (status.IDLE, status.INTRANS))

"""PostgreSQL connections: statements a kept connection repeats are prepared, and its health check costs no query."""
from __future__ import annotations

import pytest
from django.db import connection

from labeling.models import ApiToken


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_repeated_query_runs_as_a_prepared_statement():
    def prepared() -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements WHERE NOT from_sql")
            return [row[0] for row in cursor.fetchall()]

    assert not [s for s in prepared() if "labeling_apitoken" in s]
    for _ in range(4):
        # The API-key lookup of every authenticated API request.
        list(ApiToken.objects.select_related("user", "project").filter(key_hash="no such key", revoked_at=None))
    assert [s for s in prepared() if "labeling_apitoken" in s]


@pytest.fixture
def kept():
    """A second connection to the test database, as a server process keeps one between requests, and its
    backend's pid; closed after the test."""
    from django.db import connections

    wrapper = connections.create_connection("default")
    wrapper.connect()
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    wrapper.close_if_unusable_or_obsolete()  # the end of a request: the next cursor runs the health check
    yield wrapper, pid
    wrapper.close()


@pytest.mark.postgres
@pytest.mark.django_db
def test_the_health_check_of_a_kept_connection_sends_no_query(monkeypatch, kept):
    kept, _ = kept
    assert kept.health_check_enabled and not kept.health_check_done
    sent = []
    raw = kept.connection
    monkeypatch.setattr(raw, "execute", lambda *a, **k: sent.append(a))
    monkeypatch.setattr(raw, "cursor", lambda *a, **k: sent.append(a))
    assert kept.is_usable()
    kept.close_if_health_check_failed()
    assert kept.connection is raw and kept.health_check_done
    assert sent == []
    monkeypatch.undo()


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_connection_the_server_ended_fails_the_health_check_and_is_replaced(kept):
    from tests.reliability.servers import wait_until

    kept, pid = kept
    assert kept.is_usable()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        assert cursor.fetchone()[0] is True
    wait_until(lambda: not kept.is_usable(), what="the ended session's socket to turn readable", timeout=10)
    # The next request's first cursor: the check closes the dead connection and a new one answers.
    with kept.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_connection_in_a_failed_transaction_is_not_usable(kept):
    from django.db import DatabaseError

    kept, _ = kept
    kept.set_autocommit(False)
    with pytest.raises(DatabaseError):
        with kept.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")
    assert not kept.is_usable()
    kept.rollback()
    kept.set_autocommit(True)
    assert kept.is_usable()


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_kept_connection_on_a_descriptor_past_1023_passes_the_health_check():
    """A busy process (threads, model files, client sockets) can hold more than 1,024 descriptors; a check that
    cannot look at the connection's socket would call it unusable and reconnect on every request."""
    import os
    import resource

    from django.db import connections

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = []
    try:
        while not filler or filler[-1] < 1100:  # the lowest free numbers, taken, push the next socket past 1100
            filler.append(os.open(os.devnull, os.O_RDONLY))
        wrapper = connections.create_connection("default")
        wrapper.connect()
        try:
            assert wrapper.connection.pgconn.socket > 1023
            assert wrapper.is_usable()
        finally:
            wrapper.close()
    finally:
        for descriptor in filler:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

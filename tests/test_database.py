"""PostgreSQL connections prepare the statements they repeat, so a kept connection does not plan them again."""
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

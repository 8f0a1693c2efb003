"""The hand-written statements of the labeling hot path: SQL built from the models, rows read as the ORM would."""
from __future__ import annotations

import pytest
from django.db import connection

from labeling.models import Lease, Pair, Project, Prompt
from labeling.queries import RowReader, Statement
from tests.factories import PairFactory, UserFactory


def test_a_statement_names_the_models_tables_and_the_lock_this_database_has():
    reader = RowReader(Pair, ["label_count", "id"])
    statement = Statement("SELECT {pair_columns} FROM {pair} p WHERE p.id = %s {skip_locked p}",
                          pair_columns=(reader, "p"))
    quote = connection.ops.quote_name
    table = quote(Pair._meta.db_table)
    assert statement.sql.startswith(f"SELECT p.{quote('id')}, p.{quote('label_count')} FROM {table} p")
    if connection.vendor == "postgresql":
        assert statement.sql.endswith(" FOR UPDATE OF p SKIP LOCKED")
    else:
        assert "FOR UPDATE" not in statement.sql


def test_a_reader_refuses_a_field_the_model_does_not_have():
    with pytest.raises(ValueError, match="no field nope"):
        RowReader(Pair, ["id", "nope"])


@pytest.mark.django_db
def test_rows_read_as_the_orm_reads_them_json_dates_and_booleans_included(project, labeler):
    pair = PairFactory(project=project, prompt__content=[{"role": "user", "content": "héllo"}])
    lease = Lease.objects.create(pair=pair, labeler=labeler, swapped=True, expires_at=pair.created_at)
    prompt_reader = RowReader.all_fields(Prompt)
    lease_reader = RowReader(Lease, ["id", "swapped", "expires_at", "skipped"])
    statement = Statement("""
        SELECT {prompt_columns}, {lease_columns} FROM {lease} l
        JOIN {pair} p ON p.id = l.pair_id JOIN {prompt} q ON q.id = p.prompt_id WHERE l.id = %s""",
                          prompt_columns=(prompt_reader, "q"), lease_columns=(lease_reader, "l"))
    row = statement.fetch_one([lease.pk])

    prompt = prompt_reader.read(row)
    expected = Prompt.objects.get(pk=pair.prompt_id)
    assert prompt.pk == expected.pk and prompt.content == expected.content == [{"role": "user", "content": "héllo"}]
    assert prompt.created_at == expected.created_at and prompt.created_at.tzinfo is not None
    assert not prompt._state.adding

    read = lease_reader.read(row, prompt_reader.width)
    assert (read.pk, read.swapped, read.skipped, read.expires_at) == (lease.pk, True, False, lease.expires_at)
    assert isinstance(read.swapped, bool)
    # Fields not read are deferred, loaded on access like any deferred field.
    assert read.get_deferred_fields() == {"pair_id", "labeler_id", "created_at"}


@pytest.mark.django_db
def test_a_write_statement_reports_the_rows_it_touched(project):
    statement = Statement("UPDATE {project} SET guidelines = %s WHERE slug = %s")
    assert statement.execute(["Be kind.", project.slug]) == 1
    assert statement.execute(["Be kind.", "no-such-project"]) == 0
    assert Project.objects.get(pk=project.pk).guidelines == "Be kind."


@pytest.mark.django_db
def test_a_staff_user_sees_any_project_and_an_outsider_none(project):
    from labeling.errors import NotFound
    from labeling.selectors import project_get_for_user

    staff = UserFactory(is_staff=True)
    assert project_get_for_user(slug=project.slug, user=staff).pk == project.pk
    with pytest.raises(NotFound):
        project_get_for_user(slug=project.slug, user=UserFactory())


@pytest.mark.django_db
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_the_open_pair_candidates_walk_the_queue_index_even_as_a_prepared_statement(project, labeler,
                                                                                   plan_cache_mode):
    # The partial index pair_queue_open holds open, non-gold pairs; the planner can use it only when it can prove
    # the statement's conditions imply the index's, which a prepared statement's generic plan cannot do for a
    # parameter. The statement writes them as literals; this keeps it so.
    if connection.vendor != "postgresql":
        pytest.skip("plans are PostgreSQL's")
    from django.utils import timezone
    from psycopg import sql as psycopg_sql

    from labeling.services import _candidates

    PairFactory.create_batch(3, project=project)
    statement = _candidates(gold=False, tried=0, lock=False)
    params = [project.pk, labeler.pk, labeler.pk, project.labels_per_pair, timezone.now()]
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL plan_cache_mode = {plan_cache_mode}")
        # A three-pair table is read whole; with that plan off, what is left shows whether the index is usable.
        cursor.execute("SET LOCAL enable_seqscan = off")
        # The project, the labeler twice, the overlap, now.
        cursor.execute("PREPARE candidates (bigint, integer, integer, integer, timestamptz) AS "
                       + _numbered(statement.sql))
        try:
            # EXPLAIN takes no bound parameters: the values go in as literals.
            values = psycopg_sql.SQL(", ").join(psycopg_sql.Literal(value) for value in params)
            cursor.execute(psycopg_sql.SQL("EXPLAIN EXECUTE candidates ({})").format(values))
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("DEALLOCATE candidates")
    assert "pair_queue_open" in plan, plan


def _numbered(sql: str) -> str:
    """%s placeholders as PostgreSQL's $1, $2... for PREPARE."""
    parts = sql.split("%s")
    return "".join(part + (f"${index + 1}" if index < len(parts) - 1 else "") for index, part in enumerate(parts))

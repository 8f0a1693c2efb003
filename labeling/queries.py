"""Hand-written SQL for the labeling hot path (next pair, submit): each statement is built once per database from
the models' own table and column names, and its rows become model instances through the ORM's own converters.

The queryset versions of these statements cost more CPU to build and compile on every request than the database
took to run them: half of a labeling cycle's CPU (bench/load_labeling.py). Everything else uses the ORM."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from django.db import connection
from django.db.models import Model

from labeling.models import Comparison, Lease, Membership, Pair, Project, Prompt, Response

_TABLES: dict[str, type[Model]] = {
    "pair": Pair, "lease": Lease, "comparison": Comparison, "project": Project, "membership": Membership,
    "prompt": Prompt, "response": Response,
}


def _lock_clause(alias: str, *, skip_locked: bool) -> str:
    """Row locks where the database has them (PostgreSQL); SQLite serializes writers and has no such clause."""
    features = connection.features
    if not features.has_select_for_update:
        return ""
    clause = " FOR UPDATE"
    if features.has_select_for_update_of:
        clause += f" OF {alias}"
    if skip_locked and features.has_select_for_update_skip_locked:
        clause += " SKIP LOCKED"
    return clause


class Statement:
    """A statement written once: `{pair}`, `{lease}`... become the quoted table names, `{lock p}` a row lock on
    the rows of alias p, `{skip_locked p}` one that skips rows other transactions hold, and each `{name}` given
    in `columns` as (reader, alias) that reader's select list. The SQL is built on first use per database."""

    def __init__(self, template: str, **columns: tuple[RowReader, str]) -> None:
        self.template = template
        self.columns = columns
        self._sql: dict[str, str] = {}

    @property
    def sql(self) -> str:
        sql = self._sql.get(connection.vendor)
        if sql is None:
            sql = re.sub(r"\{lock (\w+)\}", lambda m: _lock_clause(m.group(1), skip_locked=False), self.template)
            sql = re.sub(r"\{skip_locked (\w+)\}", lambda m: _lock_clause(m.group(1), skip_locked=True), sql)
            quote = connection.ops.quote_name
            names = {name: quote(model._meta.db_table) for name, model in _TABLES.items()}
            names.update({name: reader.columns(alias) for name, (reader, alias) in self.columns.items()})
            sql = sql.format(**names)
            self._sql[connection.vendor] = sql
        return sql

    def fetch_one(self, params: Sequence[Any]) -> tuple | None:
        with connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            return cursor.fetchone()

    def execute(self, params: Sequence[Any]) -> int:
        """Run a write; the number of rows it touched."""
        with connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            return cursor.rowcount


class RowReader:
    """Reads `fields` of `model` (attribute names) from consecutive columns of a row into a model instance whose
    other fields are deferred, converting each value as the ORM would (JSON text, SQLite's dates and booleans)."""

    def __init__(self, model: type[Model], fields: Sequence[str]) -> None:
        order = [field.attname for field in model._meta.concrete_fields]
        unknown = set(fields) - set(order)
        if unknown:
            raise ValueError(f"{model.__name__} has no field {sorted(unknown)[0]}")
        # Model.from_db takes the values in the model's field order.
        self.model = model
        self.fields = [name for name in order if name in set(fields)]
        self.width = len(self.fields)
        self._converters: dict[str, list[list[tuple[Callable, Any]]]] = {}

    @classmethod
    def all_fields(cls, model: type[Model]) -> RowReader:
        return cls(model, [field.attname for field in model._meta.concrete_fields])

    def columns(self, alias: str) -> str:
        """The select list for these fields of the table aliased `alias` (unqualified when blank), in the order
        `read` expects."""
        quote = connection.ops.quote_name
        meta = self.model._meta
        prefix = f"{alias}." if alias else ""
        return ", ".join(f"{prefix}{quote(meta.get_field(name).column)}" for name in self._field_names())

    def _field_names(self) -> list[str]:
        names = {field.attname: field.name for field in self.model._meta.concrete_fields}
        return [names[attname] for attname in self.fields]

    def _converters_for_connection(self) -> list[list[tuple[Callable, Any]]]:
        converters = self._converters.get(connection.vendor)
        if converters is None:
            converters = []
            for name in self._field_names():
                column = self.model._meta.get_field(name).get_col(self.model._meta.db_table)
                found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
                converters.append([(converter, column) for converter in found])
            self._converters[connection.vendor] = converters
        return converters

    def read(self, row: Sequence[Any], start: int = 0) -> Model:
        values = list(row[start:start + self.width])
        for index, converters in enumerate(self._converters_for_connection()):
            for converter, column in converters:
                values[index] = converter(values[index], column, connection)
        return self.model.from_db(connection.alias, self.fields, values)


def db_datetime(value: Any) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def member_role(project_id: str) -> str:
    """A select-list subquery: the role of the user given as the next parameter in the project whose id is the
    column `project_id`, NULL for a non-member."""
    return f"(SELECT m.role FROM {{membership}} m WHERE m.project_id = {project_id} AND m.user_id = %s)"


PROJECT = RowReader.all_fields(Project)
PAIR = RowReader.all_fields(Pair)

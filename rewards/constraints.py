"""Hard constraints on reranked candidates: length, regular expression, JSON and JSON Schema checks."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from labeling.errors import DomainError

KNOWN = ("max_chars", "min_chars", "regex", "json", "json_schema")


def _max_regex_chars() -> int:
    return int(settings.PREFLAB.get("RERANK_MAX_REGEX_CHARS", 500))


def _field(name: str) -> str:
    return f"constraints.{name}"


def _non_negative_int(value: Any, name: str) -> int:
    # bool is an int in Python; `"max_chars": true` is a client mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DomainError(f"{name} must be a whole number of characters, 0 or more.", field=_field(name))
    return value


@dataclass(frozen=True)
class Constraints:
    """Validated constraints; `check` returns why a candidate fails them (empty when it passes)."""

    max_chars: int | None = None
    min_chars: int | None = None
    regex: re.Pattern[str] | None = None
    json: bool = False
    json_schema: Any = None  # a jsonschema validator

    @property
    def empty(self) -> bool:
        return (self.max_chars is None and self.min_chars is None and self.regex is None and not self.json
                and self.json_schema is None)

    def check(self, candidate: str) -> list[str]:
        reasons: list[str] = []
        length = len(candidate)
        if self.max_chars is not None and length > self.max_chars:
            reasons.append(f"max_chars: {length} characters, more than {self.max_chars}")
        if self.min_chars is not None and length < self.min_chars:
            reasons.append(f"min_chars: {length} characters, fewer than {self.min_chars}")
        if self.regex is not None and self.regex.fullmatch(candidate) is None:
            reasons.append("regex: does not match the pattern")
        if self.json or self.json_schema is not None:
            try:
                document = json.loads(candidate)
            except ValueError as exc:
                reasons.append(f"json: not valid JSON ({exc})")
            else:
                if self.json_schema is not None:
                    error = next(iter(sorted(self.json_schema.iter_errors(document), key=lambda e: list(e.path))),
                                 None)
                    if error is not None:
                        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
                        reasons.append(f"json_schema: at {where}: {error.message}")
        return reasons


def constraints_parse(raw: Any) -> Constraints:
    """Validate the request's `constraints` object; every problem is a 400 naming `constraints.<name>`."""
    if raw is None:
        return Constraints()
    if not isinstance(raw, dict):
        raise DomainError("constraints must be an object.", field="constraints")
    unknown = sorted(set(raw) - set(KNOWN))
    if unknown:
        raise DomainError(f"Unknown constraint '{unknown[0]}'; known: {', '.join(KNOWN)}.", field=_field(unknown[0]))

    max_chars = _non_negative_int(raw["max_chars"], "max_chars") if raw.get("max_chars") is not None else None
    min_chars = _non_negative_int(raw["min_chars"], "min_chars") if raw.get("min_chars") is not None else None
    if max_chars is not None and min_chars is not None and min_chars > max_chars:
        raise DomainError(f"min_chars ({min_chars}) is larger than max_chars ({max_chars}).", field=_field("min_chars"))

    pattern = None
    if raw.get("regex") is not None:
        source = raw["regex"]
        if not isinstance(source, str):
            raise DomainError("regex must be a string.", field=_field("regex"))
        # Python's re has no time limit; a short pattern bounds how pathological a backtracking one can be.
        limit = _max_regex_chars()
        if len(source) > limit:
            raise DomainError(f"regex is {len(source)} characters long; at most {limit} are allowed.",
                              field=_field("regex"))
        try:
            pattern = re.compile(source)
        except re.error as exc:
            raise DomainError(f"regex does not compile: {exc}.", field=_field("regex")) from exc

    must_parse = raw.get("json", False)
    if not isinstance(must_parse, bool):
        raise DomainError("json must be true or false.", field=_field("json"))

    validator = None
    if raw.get("json_schema") is not None:
        schema = raw["json_schema"]
        if not isinstance(schema, dict):
            raise DomainError("json_schema must be a JSON Schema object.", field=_field("json_schema"))
        from jsonschema import exceptions as schema_errors
        from jsonschema import validators

        validator_class = validators.validator_for(schema)
        try:
            validator_class.check_schema(schema)
        except schema_errors.SchemaError as exc:
            raise DomainError(f"json_schema is not a valid schema: {exc.message}.",
                              field=_field("json_schema")) from exc
        validator = validator_class(schema)

    return Constraints(max_chars=max_chars, min_chars=min_chars, regex=pattern, json=must_parse,
                       json_schema=validator)

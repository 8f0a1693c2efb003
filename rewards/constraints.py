"""Hard constraints on reranked candidates: length, regular expression, JSON and JSON Schema checks."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import re2
from django.conf import settings

from labeling.errors import DomainError

KNOWN = ("max_chars", "min_chars", "regex", "json", "json_schema")
# Lone surrogates (JSON "\ud800" escapes) cannot be encoded as UTF-8, which matching and the cache key need.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a client's bad pattern is a 400, not a line in the server's log
    return options


def regex_compile(source: str, *, field: str) -> Any:
    """Compile a client's pattern with RE2, whose matching time is linear in the text whatever the pattern:
    Python's backtracking `re` can spend hours on a short pattern such as `(x+x+)+y`, and has no time limit."""
    try:
        return re2.compile(source, _re2_options())
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise DomainError(f"regex does not compile: {reason} (RE2 syntax: no backreferences or lookaround).",
                          field=field) from exc


def _json_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """JSON Schema's `pattern` keyword matched with RE2 instead of jsonschema's `re.search` (see regex_compile)."""
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and regex_compile(pattern, field=_field("json_schema")).search(
            instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _schema_walk(value: Any) -> None:
    """Refuse what a schema could use to make validation hang or fail: lone surrogates, `patternProperties`
    (jsonschema matches those with the backtracking `re` in several keywords), and patterns RE2 cannot run."""
    name = _field("json_schema")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise DomainError("json_schema contains an unpaired surrogate character.", field=name)
    elif isinstance(value, list):
        for item in value:
            _schema_walk(item)
    elif isinstance(value, dict):
        if isinstance(value.get("patternProperties"), dict):
            raise DomainError("json_schema: 'patternProperties' is not supported; use 'properties' or "
                              "'additionalProperties'.", field=name)
        for key, item in value.items():
            _schema_walk(key)
            _schema_walk(item)
        if isinstance(value.get("pattern"), str):
            regex_compile(value["pattern"], field=name)


# Keywords whose values are instances, not schemas: a "$ref" key inside them is data, not a reference.
_INSTANCE_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
# Keywords whose values map names to schemas: a name there ("enum", say) is a property's, not a keyword.
_SCHEMA_MAP_KEYWORDS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


def _schema_refs_check(validator_class: Any, schema: dict) -> None:
    """Resolve every reference of the schema now, against the schema itself and the metaschemas only, so that
    a reference that cannot be resolved is a 400 whatever the candidates are (validation would only meet it on a
    candidate that parses as JSON). Nothing is fetched."""
    import referencing
    import referencing.jsonschema
    from jsonschema_specifications import REGISTRY as METASCHEMAS
    from referencing.exceptions import Unresolvable

    specification = referencing.jsonschema.specification_with(
        validator_class.ID_OF(validator_class.META_SCHEMA) or "", default=referencing.jsonschema.DRAFT202012)
    root = METASCHEMAS.combine(referencing.Registry()).resolver_with_root(specification.create_resource(schema))

    def walk(resolver: Any, value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                walk(resolver, item)
        elif isinstance(value, dict):
            # A subschema with its own $id changes the base that its references are resolved against.
            resolver = resolver.in_subresource(specification.create_resource(value))
            for keyword in _REFERENCE_KEYWORDS:
                reference = value.get(keyword)
                if isinstance(reference, str):
                    try:
                        resolver.lookup(reference)
                    except Unresolvable as exc:
                        raise DomainError(f"json_schema has a {keyword} that cannot be resolved: {reference!r} "
                                          "(references must point inside the schema; nothing is fetched).",
                                          field=_field("json_schema")) from exc
            for key, item in value.items():
                if key in _SCHEMA_MAP_KEYWORDS and isinstance(item, dict):
                    for subschema in item.values():
                        walk(resolver, subschema)
                elif key not in _INSTANCE_KEYWORDS:
                    walk(resolver, item)

    walk(root, schema)


@functools.cache
def _with_re2_patterns(validator_class: Any) -> Any:
    from jsonschema import validators

    return validators.extend(validator_class, {"pattern": _json_pattern})


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
    regex: Any = None  # a compiled RE2 pattern
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
            except RecursionError:
                reasons.append("json: nested too deeply to parse")
            else:
                if self.json_schema is not None:
                    from referencing.exceptions import Unresolvable

                    try:
                        error = next(iter(sorted(self.json_schema.iter_errors(document),
                                                 key=lambda e: list(e.path))), None)
                    except RecursionError:
                        reasons.append("json_schema: the document is nested too deeply to validate")
                        return reasons
                    except Unresolvable as exc:
                        # Nothing is fetched: a $ref must point inside the schema itself.
                        raise DomainError(f"json_schema has a $ref that cannot be resolved: {exc}.",
                                          field=_field("json_schema")) from exc
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
        limit = _max_regex_chars()
        if len(source) > limit:
            raise DomainError(f"regex is {len(source)} characters long; at most {limit} are allowed.",
                              field=_field("regex"))
        if _SURROGATE.search(source):
            raise DomainError("regex contains an unpaired surrogate character.", field=_field("regex"))
        pattern = regex_compile(source, field=_field("regex"))

    must_parse = raw.get("json", False)
    if not isinstance(must_parse, bool):
        raise DomainError("json must be true or false.", field=_field("json"))

    validator = None
    if raw.get("json_schema") is not None:
        schema = raw["json_schema"]
        if not isinstance(schema, dict):
            raise DomainError("json_schema must be a JSON Schema object.", field=_field("json_schema"))
        import referencing
        from jsonschema import exceptions as schema_errors
        from jsonschema import validators

        try:
            _schema_walk(schema)
            validator_class = validators.validator_for(schema)
            validator_class.check_schema(schema)
            _schema_refs_check(validator_class, schema)
        except schema_errors.SchemaError as exc:
            raise DomainError(f"json_schema is not a valid schema: {exc.message}.",
                              field=_field("json_schema")) from exc
        except RecursionError as exc:
            raise DomainError("json_schema is nested too deeply.", field=_field("json_schema")) from exc
        # An empty registry retrieves nothing: without it jsonschema would fetch a remote $ref over the network.
        validator = _with_re2_patterns(validator_class)(schema, registry=referencing.Registry())

    return Constraints(max_chars=max_chars, min_chars=min_chars, regex=pattern, json=must_parse,
                       json_schema=validator)

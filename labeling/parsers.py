"""The API's JSON request parser: DRF's, with a nesting limit so deep documents are a 400, never a 500."""
from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

# No request body of this API is more than a few levels deep (a JSON Schema constraint is the deepest); a limit
# keeps the recursive code that walks a body afterwards (serializers, json.dumps, jsonschema) within Python's
# recursion limit.
MAX_DEPTH = 100


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests lists and objects more than `limit` levels deep (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            # The standard library's decoder recurses once per level and gives up near 1,000 levels.
            raise ParseError(f"JSON parse error - nested more than {MAX_DEPTH} levels deep.")
        if json_depth_exceeds(data, MAX_DEPTH):
            raise ParseError(f"JSON parse error - nested more than {MAX_DEPTH} levels deep.")
        return data

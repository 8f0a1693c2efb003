"""Streaming export of a project's preferences as JSONL: TRL preference rows, HH-RLHF transcripts or raw labels."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from django.db.models import CharField, Func, Q

from labeling.errors import DomainError
from labeling.imports import hh_transcript_build
from labeling.models import Comparison, Project, Prompt
from labeling.selectors import PreferenceRow, preference_rows

FORMATS = ("trl", "hh", "comparisons")
CHUNK_SIZE = 2000


def _line(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False) + "\n"


class _JSONType(Func):
    """The type of a JSON value: 'array' for a list, on PostgreSQL and SQLite alike."""

    function = "JSONB_TYPEOF"
    output_field = CharField()

    def as_sqlite(self, compiler, connection, **extra_context):
        return super().as_sql(compiler, connection, function="JSON_TYPE", **extra_context)


def _trl_layout(project: Project) -> tuple[bool, bool]:
    """Whether every TRL row of the project must be conversational, and whether every row must carry a margin.

    TRL reads one layout per file (it looks at the first row), and its reward collator needs a number in every
    row's margin. So where any labeled pair has a chat prompt, string prompts are written as one user message,
    as training reads them (rewards.training.data.prompt_messages), and where any label carries a margin or a
    strength, a pair without one gets 0.0, as training gives it."""
    conversational = (Prompt.objects.filter(project=project, pairs__label_count__gt=0)
                      .annotate(kind=_JSONType("content")).filter(kind="array").exists())
    margins = Comparison.objects.filter(project=project).filter(
        Q(margin__isnull=False) | Q(strength__isnull=False)).exists()
    return conversational, margins


def _trl_row(row: PreferenceRow, *, conversational: bool, margins: bool) -> dict[str, Any]:
    prompt = [{"role": "user", "content": row.prompt}] if conversational and isinstance(row.prompt, str) else row.prompt
    if isinstance(prompt, list):
        out: dict[str, Any] = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": row.chosen}],
            "rejected": [{"role": "assistant", "content": row.rejected}],
        }
    else:
        out = {"prompt": prompt, "chosen": row.chosen, "rejected": row.rejected}
    if row.margin is not None:
        out["margin"] = row.margin
    elif margins:
        out["margin"] = 0.0
    return out


def _hh_row(row: PreferenceRow) -> dict[str, Any]:
    out: dict[str, Any] = {"chosen": hh_transcript_build(row.prompt, row.chosen),
                           "rejected": hh_transcript_build(row.prompt, row.rejected)}
    if row.margin is not None:
        out["margin"] = row.margin  # not in Anthropic's files; the hh import reads it back
    return out


def _comparison_rows(project: Project) -> Iterator[dict[str, Any]]:
    fields = ("id", "pair_id", "pair__prompt__content", "pair__response_a__text", "pair__response_b__text",
              "choice", "strength", "margin", "rationale", "flags", "swapped", "time_ms", "labeler__username",
              "source", "created_at")
    rows = (Comparison.objects.filter(project=project).order_by("id").values_list(*fields)
            .iterator(chunk_size=CHUNK_SIZE))
    for (comparison_id, pair_id, prompt, text_a, text_b, choice, strength, margin, rationale, flags, swapped,
         time_ms, username, source, created_at) in rows:
        yield {
            "id": comparison_id, "pair": pair_id, "prompt": prompt, "response_a": text_a, "response_b": text_b,
            "choice": choice, "strength": strength, "margin": margin, "rationale": rationale, "flags": flags,
            "swapped": swapped, "time_ms": time_ms, "labeler": username, "source": source,
            "created_at": created_at.isoformat(),
        }


# The export is sent in blocks of about this many characters: written line by line, the server spent more time on
# one socket write and chunk header per line than on producing the lines.
EXPORT_BLOCK_CHARS = 64 * 1024


def blocks(lines: Iterator[str], size: int = EXPORT_BLOCK_CHARS) -> Iterator[bytes]:
    """Export lines joined into UTF-8 blocks of about `size` characters, for a streamed download."""
    buffer: list[str] = []
    buffered = 0
    for line in lines:
        buffer.append(line)
        buffered += len(line)
        if buffered >= size:
            yield "".join(buffer).encode("utf-8")
            buffer, buffered = [], 0
    if buffer:
        yield "".join(buffer).encode("utf-8")


def preferences_export(*, project: Project, format: str) -> Iterator[str]:
    """JSONL lines of the project in one of FORMATS, streamed from the database with constant memory.

    `trl` and `hh` hold one row per decided pair (majority of its labels, see selectors.preference_rows);
    `trl` is TRL's conversational format for chat prompts and its standard format for string prompts, one
    layout and margins on all rows or none within a file (see _trl_layout).
    `comparisons` holds every raw label. The format is checked before the first line is produced."""
    if format not in FORMATS:
        raise DomainError(f"Unknown format '{format}'; use one of {', '.join(FORMATS)}.", field="format")
    return _generate(project=project, format=format)


def _generate(*, project: Project, format: str) -> Iterator[str]:
    if format == "comparisons":
        for value in _comparison_rows(project):
            yield _line(value)
        return
    if format == "hh":
        for row in preference_rows(project=project, chunk_size=CHUNK_SIZE):
            yield _line(_hh_row(row))
        return
    conversational, margins = _trl_layout(project)
    for row in preference_rows(project=project, chunk_size=CHUNK_SIZE):
        yield _line(_trl_row(row, conversational=conversational, margins=margins))

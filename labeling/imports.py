"""Streaming import of preference data (HH-RLHF, TRL preference rows, candidate lists) into a project."""
from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from django.conf import settings
from django.db import DataError, IntegrityError, transaction

from labeling.errors import DomainError
from labeling.models import Comparison, Pair, Project, Prompt, Response, content_hash, unstorable_path

FORMATS = ("hh", "trl", "candidates")
BATCH_LINES = 1000
# A batch is also written once its lines reach this size: a thousand long lines (up to IMPORT_MAX_LINE_BYTES each)
# would otherwise be held in memory together, parsed, several times over.
BATCH_BYTES = 32 * 1024 * 1024
MAX_BAD_LINES_STORED = 1000
# A candidates line with n responses makes n*(n-1)/2 pairs; this keeps one line from flooding the queue.
MAX_CANDIDATES = 32
MAX_MODEL_NAME = 200
INT32 = 2**31 - 1

Messages = list[dict[str, str]]
PromptContent = str | Messages


class BadLine(Exception):
    """A line that cannot be imported; the message is the reason shown in the report."""


@dataclass(frozen=True)
class ResponseIn:
    text: str
    model_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedLine:
    """One good input line: a prompt and its responses. `labeled` rows carry a preference (responses[0] is
    chosen, responses[1] rejected); unlabeled rows are candidates paired with each other."""

    number: int
    prompt: PromptContent
    responses: tuple[ResponseIn, ...]
    labeled: bool
    margin: float | None = None
    priority: int = 0


@dataclass
class ImportReport:
    format: str
    lines_read: int = 0
    pairs_created: int = 0
    comparisons_created: int = 0
    duplicates_skipped: int = 0
    bad_line_count: int = 0
    bad_lines: list[dict[str, Any]] = field(default_factory=list)

    def add_bad(self, number: int, reason: str) -> None:
        self.bad_line_count += 1
        if len(self.bad_lines) < MAX_BAD_LINES_STORED:
            self.bad_lines.append({"line": number, "reason": reason})

    @property
    def bad_lines_truncated(self) -> bool:
        return self.bad_line_count > len(self.bad_lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "lines_read": self.lines_read,
            "pairs_created": self.pairs_created,
            "comparisons_created": self.comparisons_created,
            "duplicates_skipped": self.duplicates_skipped,
            "bad_line_count": self.bad_line_count,
            "bad_lines": list(self.bad_lines),
            "bad_lines_truncated": self.bad_lines_truncated,
        }


# --- reading lines ---------------------------------------------------------------------------------------


# Leading bytes of compressed files. Imports read plain JSONL only, so an archive is refused before anything is
# written instead of being reported as thousands of lines of binary noise (and is never decompressed).
_ARCHIVE_MAGIC = {
    b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"PK\x05\x06": "zip", b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd", b"7z\xbc\xaf\x27\x1c": "7z",
    **{b"BZh%d1AY&SY" % level: "bzip2" for level in range(1, 10)},
}


def refuse_archive(head: bytes) -> None:
    """Refuse a file whose first bytes (`head`) are those of a compressed archive, before anything is read from
    it: an archive is never inflated, so a small bomb cannot fill memory or disk."""
    for magic, kind in _ARCHIVE_MAGIC.items():
        if head.startswith(magic):
            raise DomainError(f"The file is a {kind} archive; upload the uncompressed JSONL file.", field="file",
                              code="unsupported_file")


def _content_length(raw: bytes) -> int:
    """Length of a line without its ending (LF or CRLF), which the line limit does not count."""
    if raw.endswith(b"\r\n"):
        return len(raw) - 2
    return len(raw) - 1 if raw.endswith(b"\n") else len(raw)


_BOM = b"\xef\xbb\xbf"


def _read_lines(stream: IO[bytes], *, max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (1-based number, raw line or None when it is too long, bytes consumed) with bounded memory:
    a line is never read past `max_line_bytes` and its ending, the rest of an over-long line is skipped in
    chunks. A UTF-8 byte order mark at the start of the file is dropped from the first line."""
    number = 0
    while True:
        # Room for the longest allowed line and a CRLF ending.
        raw = stream.readline(max_line_bytes + 2)
        if not raw:
            return
        if isinstance(raw, str):
            raise DomainError("The import stream must be opened in binary mode.", field="file")
        if number == 0:
            refuse_archive(raw)
        number += 1
        consumed = len(raw)
        if _content_length(raw) > max_line_bytes:
            while not raw.endswith(b"\n"):
                raw = stream.readline(1024 * 1024)
                if not raw:
                    break
                consumed += len(raw)
            yield number, None, consumed
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        yield number, raw, consumed


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # json reads 1e999 as infinity, which no column can store (PostgreSQL's jsonb refuses it).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


# NUL and lone surrogates (models.UNSTORABLE) only arrive in a line through \u escapes.
def _decode(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"invalid UTF-8 at byte offset {exc.start}")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise BadLine(f"invalid JSON: {exc}")
    if not isinstance(value, dict):
        raise BadLine(f"expected a JSON object, got {_type_name(value)}")
    if "\\u" in text:
        _check_storable(value)
    return value


def _check_storable(value: Any) -> None:
    where = unstorable_path(value)
    if where:
        raise BadLine(f"'{where}' contains a NUL character or an unpaired surrogate")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# --- field checks ----------------------------------------------------------------------------------------


def _require(row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise BadLine(f"missing field '{key}'")
    return row[key]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadLine(f"'{name}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise BadLine(f"'{name}' is empty")
    return value


def _messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list):
        raise BadLine(f"'{name}' must be a list of messages, got {_type_name(value)}")
    messages: Messages = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise BadLine(f"'{where}' must be an object with 'role' and 'content', got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadLine(f"'{where}.role' must be a non-empty string")
        if not isinstance(content, str):
            raise BadLine(f"'{where}.content' must be a string, got {_type_name(content)}")
        messages.append({"role": role, "content": content})
    return messages


def _prompt(value: Any, name: str = "prompt") -> PromptContent:
    if isinstance(value, list):
        messages = _messages(value, name)
        if not messages:
            raise BadLine(f"'{name}' is an empty message list")
        return messages
    if isinstance(value, str):
        return _text(value, name)
    raise BadLine(f"'{name}' must be a string or a list of messages, got {_type_name(value)}")


def _margin(row: dict[str, Any]) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadLine(f"'margin' must be a finite number, got {_type_name(value)}")
    try:
        margin = float(value)
    except OverflowError:  # an integer literal of hundreds of digits: JSON reads any length as an int
        raise BadLine("'margin' is out of range")
    if not math.isfinite(margin):
        raise BadLine(f"'margin' must be a finite number, got {_type_name(value)}")
    return margin


def _distinct(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise BadLine("'chosen' and 'rejected' are identical")


# --- formats ---------------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_transcript_parse(transcript: str, name: str) -> Messages:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into chat messages. Some copies of
    the data set drop the blank line before the first turn ("Human: ..."): read the same."""
    head = transcript.lstrip()
    if head.startswith("Human:") and not transcript.startswith("\n\nHuman:"):
        transcript = "\n\n" + head
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise BadLine(f"'{name}' must start with a 'Human:' turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": _HH_ROLES[speaker], "content": content[1:] if content.startswith(" ") else content})
    if not messages:
        raise BadLine(f"'{name}' has no 'Human:'/'Assistant:' turns")
    return messages


def hh_transcript_build(prompt: PromptContent, reply: str) -> str:
    """The inverse of hh_transcript_parse for a prompt and the final assistant reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    names = {"user": "Human", "assistant": "Assistant"}
    turns = [(names.get(m["role"], m["role"].capitalize()), m["content"]) for m in messages]
    turns.append(("Assistant", reply))
    return "".join(f"\n\n{speaker}: {content}" if content else f"\n\n{speaker}:" for speaker, content in turns)


def _split_dialogue(chosen: Messages, rejected: Messages, *, chosen_name: str,
                    rejected_name: str) -> tuple[Messages, str, str]:
    """Shared prefix and the two final assistant replies of two dialogues that differ only in that reply."""
    for messages, name in ((chosen, chosen_name), (rejected, rejected_name)):
        if not messages:
            raise BadLine(f"'{name}' has no messages")
        if messages[-1]["role"] != "assistant":
            raise BadLine(f"'{name}' must end with an assistant reply, ends with '{messages[-1]['role']}'")
        if not messages[-1]["content"].strip():
            raise BadLine(f"the last reply of '{name}' is empty")
    if chosen[:-1] != rejected[:-1]:
        raise BadLine(f"'{chosen_name}' and '{rejected_name}' differ before the last assistant reply")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def parse_hh(row: dict[str, Any], number: int) -> ParsedLine:
    chosen = hh_transcript_parse(_text(_require(row, "chosen"), "chosen"), "chosen")
    rejected = hh_transcript_parse(_text(_require(row, "rejected"), "rejected"), "rejected")
    prompt, chosen_reply, rejected_reply = _split_dialogue(chosen, rejected, chosen_name="chosen",
                                                           rejected_name="rejected")
    if not prompt:
        raise BadLine("the transcripts have no turns before the last assistant reply")
    _distinct(chosen_reply, rejected_reply)
    return ParsedLine(number=number, prompt=prompt, responses=(ResponseIn(chosen_reply), ResponseIn(rejected_reply)),
                      labeled=True, margin=_margin(row))


def parse_trl(row: dict[str, Any], number: int) -> ParsedLine:
    chosen_value, rejected_value = _require(row, "chosen"), _require(row, "rejected")
    if isinstance(chosen_value, str):
        if not isinstance(rejected_value, str):
            raise BadLine(f"'rejected' must be a string like 'chosen', got {_type_name(rejected_value)}")
        if "prompt" not in row:
            raise BadLine("missing field 'prompt' (an implicit prompt needs message lists)")
        prompt_value = row["prompt"]
        if not isinstance(prompt_value, str):
            raise BadLine(f"'prompt' must be a string when 'chosen' is, got {_type_name(prompt_value)}")
        prompt: PromptContent = _text(prompt_value, "prompt")
        chosen, rejected = _text(chosen_value, "chosen"), _text(rejected_value, "rejected")
    elif isinstance(chosen_value, list):
        chosen_messages = _messages(chosen_value, "chosen")
        rejected_messages = _messages(rejected_value, "rejected")
        prefix: Messages = []
        if "prompt" in row:
            prompt_value = row["prompt"]
            if not isinstance(prompt_value, list):
                raise BadLine(f"'prompt' must be a list of messages when 'chosen' is, got {_type_name(prompt_value)}")
            prefix = _messages(prompt_value, "prompt")
        shared, chosen, rejected = _split_dialogue(chosen_messages, rejected_messages, chosen_name="chosen",
                                                   rejected_name="rejected")
        prompt = prefix + shared
        if not prompt:
            raise BadLine("missing field 'prompt' and 'chosen'/'rejected' share no messages before the reply")
    else:
        raise BadLine(f"'chosen' must be a string or a list of messages, got {_type_name(chosen_value)}")
    _distinct(chosen, rejected)
    return ParsedLine(number=number, prompt=prompt, responses=(ResponseIn(chosen), ResponseIn(rejected)),
                      labeled=True, margin=_margin(row))


def parse_candidates(row: dict[str, Any], number: int) -> ParsedLine:
    prompt = _prompt(_require(row, "prompt"))
    values = _require(row, "responses")
    if not isinstance(values, list):
        raise BadLine(f"'responses' must be a list, got {_type_name(values)}")
    if len(values) > MAX_CANDIDATES:
        raise BadLine(f"'responses' has {len(values)} items; at most {MAX_CANDIDATES} are allowed")
    responses: dict[str, ResponseIn] = {}
    for index, value in enumerate(values):
        name = f"responses[{index}]"
        if isinstance(value, str):
            response = ResponseIn(_text(value, name))
        elif isinstance(value, dict):
            model = value.get("model") or ""
            if not isinstance(model, str) or len(model) > MAX_MODEL_NAME:
                raise BadLine(f"'{name}.model' must be a string of at most {MAX_MODEL_NAME} characters")
            metadata = value.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise BadLine(f"'{name}.metadata' must be an object, got {_type_name(metadata)}")
            response = ResponseIn(_text(_require(value, "text"), f"{name}.text"), model, metadata)
        else:
            raise BadLine(f"'{name}' must be a string or an object with 'text', got {_type_name(value)}")
        responses.setdefault(response.text, response)
    if len(responses) < 2:
        raise BadLine("'responses' needs at least two distinct responses")
    priority = row.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -INT32 - 1 <= priority <= INT32:
        raise BadLine("'priority' must be an integer between -2147483648 and 2147483647")
    return ParsedLine(number=number, prompt=prompt, responses=tuple(responses.values()), labeled=False,
                      priority=priority)


PARSERS: dict[str, Callable[[dict[str, Any], int], ParsedLine]] = {
    "hh": parse_hh, "trl": parse_trl, "candidates": parse_candidates,
}


# --- writing batches -------------------------------------------------------------------------------------


def _ids_by_hash(model: type[Prompt] | type[Response], *, project: Project,
                 wanted: dict[str, Prompt | Response]) -> dict[str, int]:
    """Ids of the rows with these hashes, inserting the missing ones (ignore_conflicts keeps a concurrent
    import of the same content from failing the batch)."""
    found = dict(model.objects.filter(project=project, content_hash__in=list(wanted))
                 .values_list("content_hash", "id"))
    missing = [obj for key, obj in wanted.items() if key not in found]
    if missing:
        model.objects.bulk_create(missing, ignore_conflicts=True)
        found.update(model.objects.filter(project=project, content_hash__in=[obj.content_hash for obj in missing])
                     .values_list("content_hash", "id"))
    return found


@dataclass
class _BatchCounts:
    pairs: int = 0
    comparisons: int = 0
    duplicates: int = 0


def _write_batch(*, project: Project, rows: list[ParsedLine]) -> _BatchCounts:
    prompts: dict[str, Prompt] = {}
    responses: dict[str, Response] = {}
    row_keys: list[tuple[str, list[str]]] = []
    for row in rows:
        prompt_key = content_hash(row.prompt)
        prompts.setdefault(prompt_key, Prompt(project=project, content=row.prompt, content_hash=prompt_key))
        keys = []
        for response in row.responses:
            key = content_hash(response.text)
            responses.setdefault(key, Response(project=project, text=response.text, model_name=response.model_name,
                                               metadata=response.metadata, content_hash=key))
            keys.append(key)
        row_keys.append((prompt_key, keys))
    prompt_ids = _ids_by_hash(Prompt, project=project, wanted=prompts)
    response_ids = _ids_by_hash(Response, project=project, wanted=responses)

    existing = {
        (prompt_id, min(a, b), max(a, b))
        for prompt_id, a, b in Pair.objects.filter(project=project, prompt_id__in=set(prompt_ids.values()))
        .values_list("prompt_id", "response_a_id", "response_b_id")
    }
    counts = _BatchCounts()
    labeled_status = Pair.Status.COMPLETE if project.labels_per_pair <= 1 else Pair.Status.OPEN
    new_pairs: list[Pair] = []
    # Labels of the pairs made here and of pairs already in the project: key -> (chosen response's id, margin).
    margins: dict[tuple[int, int, int], tuple[int, float | None]] = {}
    later: dict[tuple[int, int, int], tuple[int, float | None]] = {}
    for row, (prompt_key, keys) in zip(rows, row_keys, strict=True):
        prompt_id = prompt_ids[prompt_key]
        ids = [response_ids[key] for key in keys]
        for a, b in itertools.combinations(ids, 2):
            key = (prompt_id, min(a, b), max(a, b))
            if a != b and key in existing and row.labeled and key not in margins and key not in later:
                later[key] = (a, row.margin)
                continue
            if a == b or key in existing:
                counts.duplicates += 1
                continue
            existing.add(key)
            if row.labeled:
                margins[key] = (a, row.margin)  # a labeled row lists the chosen response first
                new_pairs.append(Pair(project=project, prompt_id=prompt_id, response_a_id=a, response_b_id=b,
                                      label_count=1, status=labeled_status, source="import"))
            else:
                new_pairs.append(Pair(project=project, prompt_id=prompt_id, response_a_id=a, response_b_id=b,
                                      priority=row.priority, source="import"))
    if new_pairs:
        Pair.objects.bulk_create(new_pairs, ignore_conflicts=True)
        counts.pairs = len(new_pairs)
    if margins:
        counts.comparisons = _label_new_pairs(project=project, margins=margins)
    if later:
        added = _label_existing_pairs(project=project, labels=later)
        counts.comparisons += added
        counts.duplicates += len(later) - added
    return counts


def _label_new_pairs(*, project: Project, margins: dict[tuple[int, int, int], tuple[int, float | None]]) -> int:
    """The imported label of each pair this batch made from a labeled row. The side is read from the stored pair:
    an import running at the same time may have stored it first with A and B the other way round."""
    created = Pair.objects.filter(project=project, prompt_id__in={key[0] for key in margins},
                                  source="import").values_list("id", "prompt_id", "response_a_id", "response_b_id")
    comparisons = []
    for pair_id, prompt_id, a, b in created:
        key = (prompt_id, min(a, b), max(a, b))
        if key in margins:
            chosen, margin = margins.pop(key)
            comparisons.append(Comparison(pair_id=pair_id, project=project, labeler=None,
                                          source=Comparison.Source.IMPORT,
                                          choice=Comparison.Choice.A if a == chosen else Comparison.Choice.B,
                                          margin=margin))
    Comparison.objects.bulk_create(comparisons, ignore_conflicts=True)
    return len(comparisons)


def _label_existing_pairs(*, project: Project, labels: dict[tuple[int, int, int], tuple[int, float | None]]) -> int:
    """Add the imported label of each pair that has none yet (a pair imported as `candidates`, or made here,
    labeled later by a file of the team's own labels), under the pairs' row locks like a labeler's answer, and
    complete the pairs it fills. A pair that already carries an imported label, and a gold pair (its answer is the
    manager's), keep what they have. Returns how many labels were added."""
    ids = {}
    for pair_id, prompt_id, a, b in (Pair.objects.filter(project=project, prompt_id__in={key[0] for key in labels})
                                     .values_list("id", "prompt_id", "response_a_id", "response_b_id")):
        key = (prompt_id, min(a, b), max(a, b))
        if key in labels:
            ids[pair_id] = key
    # Locked in id order, so that two imports of overlapping files wait for each other instead of deadlocking;
    # the imported labels are read after the locks are held, so a concurrent import's label is seen.
    pairs = list(Pair.objects.select_for_update().filter(id__in=list(ids), gold_choice__isnull=True).order_by("id"))
    labeled = set(Comparison.objects.filter(pair_id__in=[pair.pk for pair in pairs], source=Comparison.Source.IMPORT)
                  .values_list("pair_id", flat=True))
    pairs = [pair for pair in pairs if pair.pk not in labeled]
    comparisons = []
    for pair in pairs:
        chosen, margin = labels[ids[pair.pk]]
        comparisons.append(Comparison(pair=pair, project=project, labeler=None, source=Comparison.Source.IMPORT,
                                      choice=Comparison.Choice.A if pair.response_a_id == chosen
                                      else Comparison.Choice.B, margin=margin))
        pair.label_count += 1
        if pair.label_count >= project.labels_per_pair:
            pair.status = Pair.Status.COMPLETE
    Comparison.objects.bulk_create(comparisons)
    Pair.objects.bulk_update(pairs, ["label_count", "status"])
    return len(comparisons)


def _count(report: ImportReport, counts: _BatchCounts) -> None:
    report.pairs_created += counts.pairs
    report.comparisons_created += counts.comparisons
    report.duplicates_skipped += counts.duplicates


def _flush(*, project: Project, rows: list[ParsedLine], report: ImportReport) -> None:
    """Write a batch in one transaction; if the database refuses it, write its lines one by one so that only
    the offending lines are lost, each reported with the database's reason."""
    if not rows:
        return
    try:
        with transaction.atomic():
            counts = _write_batch(project=project, rows=rows)
        _count(report, counts)
        return
    except (DataError, IntegrityError):
        pass
    for row in rows:
        try:
            with transaction.atomic():
                counts = _write_batch(project=project, rows=[row])
            _count(report, counts)
        except (DataError, IntegrityError) as exc:
            report.add_bad(row.number, f"the database refused the line: {str(exc).splitlines()[0]}")


def preferences_import(*, project: Project, stream: IO[bytes], format: str, batch_lines: int = BATCH_LINES,
                       progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Import a JSONL stream (binary) of one of FORMATS into `project`, batch by batch (`batch_lines` lines, or
    fewer when they add up to BATCH_BYTES).

    Bad lines are reported with their 1-based number and reason and never stop the import; each batch of
    good lines commits on its own. Prompts and responses are deduplicated by content hash within the project
    and pairs regardless of A/B order, so importing the same file twice creates nothing the second time.
    `progress(lines_read, bytes_read)` is called after every batch."""
    parser = PARSERS.get(format)
    if parser is None:
        raise DomainError(f"Unknown format '{format}'; use one of {', '.join(FORMATS)}.", field="format")
    max_line_bytes = int(settings.PREFLAB["IMPORT_MAX_LINE_BYTES"])
    report = ImportReport(format=format)
    rows: list[ParsedLine] = []
    bytes_read = 0
    pending = pending_bytes = 0
    for number, raw, consumed in _read_lines(stream, max_line_bytes=max_line_bytes):
        report.lines_read = number
        bytes_read += consumed
        pending += 1
        pending_bytes += consumed
        if raw is None:
            report.add_bad(number, f"line is longer than {max_line_bytes} bytes")
        elif raw.strip():
            try:
                rows.append(parser(_decode(raw), number))
            except BadLine as exc:
                report.add_bad(number, str(exc))
        if pending >= batch_lines or pending_bytes >= BATCH_BYTES:
            _flush(project=project, rows=rows, report=report)
            rows, pending, pending_bytes = [], 0, 0
            if progress is not None:
                progress(report.lines_read, bytes_read)
    _flush(project=project, rows=rows, report=report)
    if progress is not None:
        progress(report.lines_read, bytes_read)
    return report

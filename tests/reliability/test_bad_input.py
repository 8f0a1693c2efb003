"""Bad input catalogue: imports, rerank and generate get a clear 4xx or a line-numbered report; nothing else changes."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import threading
import tracemalloc
import zipfile
from collections import Counter

import psutil
import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from labeling.models import ApiToken, Comparison, Lease, Pair, Project, Prompt, Response
from labeling.services import api_token_create
from rewards import generation, scoring, serving
from rewards.models import Policy, RewardModel
from rewards.services import reward_model_register
from tests.conftest import client_for
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

TABLES = (Project, Prompt, Response, Pair, Comparison, Lease, ApiToken, RewardModel)


def _snapshot() -> Counter:
    return Counter({model.__name__: model.objects.count() for model in TABLES})


def _changes(before: Counter, after: Counter) -> dict[str, int]:
    """Rows added (or removed) per table, zero entries left out."""
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def _line(value: dict | str | bytes, *, ascii_only: bool = True) -> bytes:
    if isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=ascii_only)
    return value.encode("utf-8") if isinstance(value, str) else value


def _stored_pairs(project) -> set[tuple[str, str, str]]:
    """(prompt as JSON, response A, response B) of every pair of the project, texts exactly as stored."""
    return {(json.dumps(p.prompt.content, ensure_ascii=False), p.response_a.text, p.response_b.text)
            for p in Pair.objects.filter(project=project).select_related("prompt", "response_a", "response_b")}


def _trl(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def _hh(human: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"\n\nHuman: {human}\n\nAssistant: {chosen}",
            "rejected": f"\n\nHuman: {human}\n\nAssistant: {rejected}"}


def _hh_prompt(human: str) -> str:
    return json.dumps([{"role": "user", "content": human}], ensure_ascii=False)


@pytest.fixture
def manager_client(manager):
    return client_for(manager)


def _upload(client, project, content: bytes, *, fmt: str = "trl", name: str = "data.jsonl"):
    return client.post(f"/api/v1/projects/{project.slug}/import/",
                       {"format": fmt, "file": SimpleUploadedFile(name, content)}, format="multipart")


# --- import: one file per case, bad lines reported by number, exactly the good lines stored -------------------

USER = {"role": "user", "content": "Pick one."}
LATIN1 = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
OVERLONG = b'{"prompt": "slash \xc0\xaf", "chosen": "a", "rejected": "b"}'
CESU_SURROGATE = b'{"prompt": "q", "chosen": "\xed\xa0\x80", "rejected": "b"}'
TRUNCATED_UTF8 = b'{"prompt": "q", "chosen": "euro \xe2\x82", "rejected": "b"}'
LONE_CONTINUATION = b'{"prompt": "q", "chosen": "a", "rejected": "\x80"}'
INVALID_UTF8 = [(LATIN1, b"\xe9"), (OVERLONG, b"\xc0"), (CESU_SURROGATE, b"\xed"), (TRUNCATED_UTF8, b"\xe2"),
                (LONE_CONTINUATION, b"\x80")]

# (id, format, lines, {line number: expected reason prefix}, pairs stored as (prompt JSON, chosen, rejected))
IMPORT_CASES = [
    ("invalid-json", "trl", [
        _trl("p1", "c1", "r1"),
        b'{"prompt": "q", "chosen": "a", "rejected": "b",}',
        b"{'prompt': 'q', 'chosen': 'a', 'rejected': 'b'}",
        b'{"prompt": "q", "chosen": "a", "rejected": "b"} {"prompt": "q2"}',
        b'{"prompt": "q", "chosen": "a", "rejected": "b", "margin": Infinity}',
        b'{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1e999}',
        b'{"prompt": "q", "chosen": "a", "rejected": "b", "margin": ' + b"9" * 5000 + b"}",
        b"[" * 100_000,
        b"null",
        b'"a string"',
        _trl("p2", "c2", "r2"),
        b'{"prompt": "q", "chosen": "a", "rejected": "b"',
    ], {
        2: "invalid JSON: Expecting property name enclosed in double quotes",
        3: "invalid JSON: Expecting property name enclosed in double quotes",
        4: "invalid JSON: Extra data",
        5: "invalid JSON: Infinity is not valid JSON",
        6: "invalid JSON: the number 1e999 is out of range",
        7: "invalid JSON: Exceeds the limit (4300 digits)",
        8: "invalid JSON: maximum recursion depth exceeded",
        9: "expected a JSON object, got null",
        10: "expected a JSON object, got a string",
        12: "invalid JSON: Expecting ',' delimiter",
    }, {('"p1"', "c1", "r1"), ('"p2"', "c2", "r2")}),

    ("wrong-types-trl", "trl", [
        {"prompt": {"text": "q"}, "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": None, "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": 7},
        _trl("q", "a", "b", margin=True),
        _trl("q", "a", "b", margin="0.5"),
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": 5}],
         "rejected": [{"role": "assistant", "content": "x"}]},
        {"prompt": [USER], "chosen": [{"role": None, "content": "A"}],
         "rejected": [{"role": "assistant", "content": "B"}]},
        _trl("typed", "fine", "also fine", margin=1.5),
    ], {
        1: "'prompt' must be a string when 'chosen' is, got an object",
        2: "'chosen' must be a string or a list of messages, got null",
        3: "'rejected' must be a string like 'chosen', got a number",
        4: "'margin' must be a finite number, got a boolean",
        5: "'margin' must be a finite number, got a string",
        6: "'chosen[0].content' must be a string, got a number",
        7: "'chosen[0].role' must be a non-empty string",
    }, {('"typed"', "fine", "also fine")}),

    ("wrong-types-hh", "hh", [
        {"chosen": ["\n\nHuman: a\n\nAssistant: b"], "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": {"text": "c"}},
        {"chosen": True, "rejected": False},
        _hh("Typed?", "Yes.", "No."),
    ], {
        1: "'chosen' must be a string, got a list",
        2: "'rejected' must be a string, got an object",
        3: "'chosen' must be a string, got a boolean",
    }, {(_hh_prompt("Typed?"), "Yes.", "No.")}),

    ("wrong-types-candidates", "candidates", [
        {"prompt": 5, "responses": ["a", "b"]},
        {"prompt": "q", "responses": {"a": "b"}},
        {"prompt": "q", "responses": ["a", "b"], "priority": 1.5},
        {"prompt": "q", "responses": ["a", "b"], "priority": 2**40},
        {"prompt": "q", "responses": [{"text": "a", "model": 5}, "b"]},
        {"prompt": "q", "responses": [{"text": "a", "metadata": ["x"]}, "b"]},
        {"prompt": "q", "responses": [None, "b"]},
        {"prompt": "cq", "responses": ["x1", "x2", "x3"]},
    ], {
        1: "'prompt' must be a string or a list of messages, got a number",
        2: "'responses' must be a list, got an object",
        3: "'priority' must be an integer between -2147483648 and 2147483647",
        4: "'priority' must be an integer between -2147483648 and 2147483647",
        5: "'responses[0].model' must be a string of at most 200 characters",
        6: "'responses[0].metadata' must be an object, got a list",
        7: "'responses[0]' must be a string or an object with 'text', got null",
    }, {('"cq"', "x1", "x2"), ('"cq"', "x1", "x3"), ('"cq"', "x2", "x3")}),

    ("missing-fields-trl", "trl", [
        {}, {"prompt": "q", "chosen": "a"}, {"prompt": "q", "rejected": "b"}, _trl("kept", "a", "b"),
    ], {1: "missing field 'chosen'", 2: "missing field 'rejected'", 3: "missing field 'chosen'"},
     {('"kept"', "a", "b")}),

    ("missing-fields-candidates", "candidates", [
        {"responses": ["a", "b"]}, {"prompt": "q"}, {"prompt": "kept", "responses": ["a", "b"]},
    ], {1: "missing field 'prompt'", 2: "missing field 'responses'"}, {('"kept"', "a", "b")}),

    ("identical-chosen-and-rejected", "trl", [
        _trl("q", "Same.", "Same."),
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Same."}],
         "rejected": [{"role": "assistant", "content": "Same."}]},
        {"chosen": [USER, {"role": "assistant", "content": "Same."}],
         "rejected": [USER, {"role": "assistant", "content": "Same."}]},
        _trl("q", "Same.", "Same. "),
    ], {1: "'chosen' and 'rejected' are identical", 2: "'chosen' and 'rejected' are identical",
        3: "'chosen' and 'rejected' are identical"}, {('"q"', "Same.", "Same. ")}),

    ("identical-hh", "hh", [
        _hh("Twice?", "Yes.", "Yes."), _hh("Once?", "Yes.", "No."),
    ], {1: "'chosen' and 'rejected' are identical"}, {(_hh_prompt("Once?"), "Yes.", "No.")}),

    ("invalid-utf8", "trl", [
        LATIN1, OVERLONG, CESU_SURROGATE, TRUNCATED_UTF8, LONE_CONTINUATION, _trl("utf8", "ok", "fine"),
    ], {number: f"invalid UTF-8 at byte offset {line.index(byte)}"
        for number, (line, byte) in enumerate(INVALID_UTF8, start=1)}, {('"utf8"', "ok", "fine")}),

    ("utf16-file", "trl", [
        ("\ufeff" + json.dumps(_trl("q", "a", "b")) + "\n" + json.dumps(_trl("q", "c", "d"))).encode("utf-16-le"),
    ], {1: "invalid UTF-8 at byte offset 0", 2: "invalid JSON: "}, set()),

    ("unstorable-escapes", "trl", [
        _trl("q", "a\u0000b", "c"),
        _trl("\ud800", "a", "b"),
        _trl("q", "a", "\udfff"),
        {"prompt": [{"role": "user", "content": "q\u0000"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        _trl("escaped pair", "\ud83d\ude00", "\u00e9"),
    ], {
        1: "'chosen' contains a NUL character or an unpaired surrogate",
        2: "'prompt' contains a NUL character or an unpaired surrogate",
        3: "'rejected' contains a NUL character or an unpaired surrogate",
        4: "'prompt[0].content' contains a NUL character or an unpaired surrogate",
    }, {('"escaped pair"', "\U0001f600", "\u00e9")}),

    ("unstorable-metadata", "candidates", [
        {"prompt": "q", "responses": [{"text": "a", "metadata": {"\udc00": 1}}, "b"]},
        b'{"prompt": "q", "responses": [{"text": "a", "metadata": {"t": 1e999}}, "b"]}',
        {"prompt": "meta", "responses": [{"text": "a", "metadata": {"t": 0.7, "ok": "\u2603"}}, "b"]},
    ], {1: "'responses[0].metadata' contains a NUL character or an unpaired surrogate",
        2: "invalid JSON: the number 1e999 is out of range"}, {('"meta"', "a", "b")}),

    ("valid-unicode-and-layout", "trl", [
        b"\xef\xbb\xbf" + _line(_trl("bom first", "a", "b")),
        _line(_trl("crlf", "a", "b")) + b"\r",
        b"",
        b"  \t ",
        _line(_trl("\u202eRTL override", "\u05e9\u05dc\u05d5\u05dd \u200f", "\u0645\u0631\u062d\u0628\u0627"),
              ascii_only=False),
        _line(_trl("combining", "e\u0301\u0301\u0301", "Z\u0351\u0352\u0353\u0354"), ascii_only=False),
        _line(_trl("emoji", "\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f44d\U0001f3fd",
                   "\U0001f1eb\U0001f1f7"), ascii_only=False),
        _line(_trl("zero width", "\u200b", "\u200c\u2060"), ascii_only=False),
        _line(_trl("separators", "line\u2028para\u2029next\x85", "\uffff\ue000"), ascii_only=False),
        b"\xef\xbb\xbf" + _line(_trl("bom later", "a", "b")),
        _line(_trl("no final newline", "a", "b")),
    ], {10: "invalid JSON: Unexpected UTF-8 BOM"}, {
        ('"bom first"', "a", "b"), ('"crlf"', "a", "b"),
        ('"\u202eRTL override"', "\u05e9\u05dc\u05d5\u05dd \u200f", "\u0645\u0631\u062d\u0628\u0627"),
        ('"combining"', "e\u0301\u0301\u0301", "Z\u0351\u0352\u0353\u0354"),
        ('"emoji"', "\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f44d\U0001f3fd", "\U0001f1eb\U0001f1f7"),
        ('"zero width"', "\u200b", "\u200c\u2060"),
        ('"separators"', "line\u2028para\u2029next\x85", "\uffff\ue000"),
        ('"no final newline"', "a", "b"),
    }),

    ("hh-file-read-as-trl", "trl", [_hh("Hi?", "Hello.", "Go."), _hh("Bye?", "Bye.", "No.")],
     {1: "missing field 'prompt' (an implicit prompt needs message lists)",
      2: "missing field 'prompt' (an implicit prompt needs message lists)"}, set()),

    ("trl-file-read-as-candidates", "candidates", [_trl("q", "a", "b")], {1: "missing field 'responses'"}, set()),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("fmt", "lines", "bad", "stored"), [case[1:] for case in IMPORT_CASES],
                         ids=[case[0] for case in IMPORT_CASES])
def test_import_catalogue(project, manager_client, fmt, lines, bad, stored):
    # No newline after the last line: a file that ends without one still has its last line read.
    content = b"\n".join(_line(line) for line in lines)
    before = _snapshot()
    response = _upload(manager_client, project, content, fmt=fmt)
    assert response.status_code == (201 if stored else 200), response.json()
    report = response.json()
    assert report["lines_read"] == content.count(b"\n") + 1
    reasons = {entry["line"]: entry["reason"] for entry in report["bad_lines"]}
    assert sorted(reasons) == sorted(bad), reasons
    for number, prefix in bad.items():
        assert reasons[number].startswith(prefix), (number, reasons[number])
    assert report["bad_line_count"] == len(bad) and report["bad_lines_truncated"] is False
    # Exactly the good lines are stored, with their text unchanged, and nothing else anywhere.
    assert _stored_pairs(project) == stored
    labeled = fmt != "candidates"
    texts = {text for _, a, b in stored for text in (a, b)}
    assert report["pairs_created"] == len(stored)
    assert report["comparisons_created"] == (len(stored) if labeled else 0)
    expected = {"Prompt": len({prompt for prompt, _, _ in stored}), "Response": len(texts), "Pair": len(stored),
                "Comparison": len(stored) if labeled else 0}
    assert _changes(before, _snapshot()) == {name: n for name, n in expected.items() if n}


# --- import: requests refused as a whole change nothing ----------------------------------------------------------

BOMB_BYTES = 16 * 1024 * 1024


def _zip(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


ARCHIVES = [
    ("gzip-bomb", lambda: gzip.compress(bytes(BOMB_BYTES)), "gzip"),
    ("zip-bomb", lambda: _zip("data.jsonl", bytes(BOMB_BYTES)), "zip"),
    ("bzip2-bomb", lambda: bz2.compress(bytes(BOMB_BYTES)), "bzip2"),
    ("xz-bomb", lambda: lzma.compress(bytes(BOMB_BYTES)), "xz"),
    ("gzip-of-good-jsonl", lambda: gzip.compress(_line(_trl("q", "a", "b")) + b"\n"), "gzip"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("make", "kind"), [case[1:] for case in ARCHIVES], ids=[case[0] for case in ARCHIVES])
def test_archives_are_refused_unopened(project, manager_client, make, kind):
    data = make()
    assert len(data) < BOMB_BYTES // 100
    before = _snapshot()
    # Once untraced: the first request of a process imports and builds what every later one reuses (megabytes that
    # have nothing to do with the file).
    _upload(manager_client, project, data, name=f"data.jsonl.{kind}")
    tracemalloc.start()
    try:
        response = _upload(manager_client, project, data, name=f"data.jsonl.{kind}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("unsupported_file", "file")
    assert error["message"] == f"The file is a {kind} archive; upload the uncompressed JSONL file."
    assert _snapshot() == before
    # Never inflated: the request used a small fraction of what the archive expands to.
    assert peak < BOMB_BYTES // 4


@pytest.mark.django_db
def test_the_command_refuses_an_archive_with_a_clear_message(project, tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress(_line(_hh("Hi?", "Hello.", "Go.")) + b"\n"))
    before = _snapshot()
    with pytest.raises(CommandError, match=r"^The file is a gzip archive; upload the uncompressed JSONL file\.$"):
        call_command("import_preferences", str(path), project=project.slug, format="hh", no_progress=True,
                     stdout=io.StringIO(), stderr=io.StringIO())
    assert _snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize(("data", "status", "code", "field"), [
    ({"format": "trl", "file": SimpleUploadedFile("empty.jsonl", b"")}, 400, "invalid", "file"),
    ({"format": "trl", "file": "not a file"}, 400, "invalid", "file"),
    ({"format": "TRL", "file": SimpleUploadedFile("a.jsonl", b"{}\n")}, 400, "invalid", "format"),
    ({"file": SimpleUploadedFile("a.jsonl", b"{}\n")}, 400, "invalid", "format"),
], ids=["empty-file", "file-as-text-field", "format-wrong-case", "format-missing"])
def test_import_requests_refused_as_a_whole(project, manager_client, data, status, code, field):
    before = _snapshot()
    response = manager_client.post(f"/api/v1/projects/{project.slug}/import/", data, format="multipart")
    assert response.status_code == status
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (code, field)
    assert _snapshot() == before


@pytest.mark.django_db
def test_an_import_sent_as_json_is_415_and_blank_files_import_nothing(project, manager_client):
    before = _snapshot()
    as_json = manager_client.post(f"/api/v1/projects/{project.slug}/import/",
                                  {"format": "trl", "file": json.dumps(_trl("q", "a", "b"))}, format="json")
    assert as_json.status_code == 415 and as_json.json()["error"]["code"] == "unsupported_media_type"
    blank = _upload(manager_client, project, b"\n  \n\t\r\n\n")
    assert blank.status_code == 200
    assert (blank.json()["lines_read"], blank.json()["bad_line_count"], blank.json()["pairs_created"]) == (4, 0, 0)
    assert _snapshot() == before


# --- import: a 50 MB line and a million-line file, streamed --------------------------------------------------------


def _tracemalloc_peak(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.django_db
def test_a_50_mb_line_is_reported_by_number_without_reading_the_file_into_memory(project, tmp_path, settings):
    limit = settings.PREFLAB["IMPORT_MAX_LINE_BYTES"]
    path = tmp_path / "giant-line.jsonl"
    chunk = b"x" * (1024 * 1024)
    with path.open("wb") as out:
        out.write(_line(_trl("before", "a", "b")) + b"\n")
        out.write(b'{"prompt": "giant", "chosen": "')
        for _ in range(50):
            out.write(chunk)
        out.write(b'", "rejected": "b"}\n')
        out.write(_line(_trl("after", "a", "b")) + b"\n")
        out.write(b"{broken\n")
    size = path.stat().st_size
    assert size > 50 * 1024 * 1024
    before = _snapshot()
    out, err = io.StringIO(), io.StringIO()
    peak = _tracemalloc_peak(lambda: call_command("import_preferences", str(path), project=project.slug,
                                                  format="trl", no_progress=True, stdout=out, stderr=err))
    assert "4 lines read: 2 pairs created, 2 comparisons created, 0 duplicates skipped, 2 bad lines." in out.getvalue()
    assert f"line 2: line is longer than {limit} bytes" in err.getvalue()
    assert "line 4: invalid JSON: " in err.getvalue()
    assert _stored_pairs(project) == {('"before"', "a", "b"), ('"after"', "a", "b")}
    assert _changes(before, _snapshot()) == {"Prompt": 2, "Response": 2, "Pair": 2, "Comparison": 2}
    # About one line's worth of bytes (the limit, read in chunks and joined) is held at a time, never the 50 MB
    # line or the file.
    assert peak < limit * 3 < size // 4


class _PeakRss:
    """Samples this process's resident memory from a thread while the block runs (tracemalloc would slow a
    million-line import several times over); `growth` is the peak over the starting size."""

    def __enter__(self) -> _PeakRss:
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


MILLION = 1_000_000
GOOD_EVERY = 100_000
# Four kinds of broken line in turn, each with the reason the report gives it.
BROKEN = [
    (b'{"prompt": "q", "chosen": "a", "rejected": }', "invalid JSON: Expecting value: line 1 column 44 (char 43)"),
    (b'{"prompt": "q\xff", "chosen": "a", "rejected": "b"}', "invalid UTF-8 at byte offset 13"),
    (b'["prompt", "q", "chosen", "a", "rejected", "b"]', "expected a JSON object, got a list"),
    (b'{"prompt": "q", "chosen": "a", "rejeted": "b"}', "missing field 'rejected'"),
]


@pytest.mark.django_db
def test_a_million_line_file_streams_through_the_command_in_bounded_memory(project, tmp_path):
    """999,990 broken lines and 10 good ones: every line is read and counted, exactly the good ones are stored,
    the first 1,000 bad lines are reported by number, and memory stays far below the file's size."""
    path = tmp_path / "million.jsonl"
    with path.open("wb") as out:
        block = []
        for number in range(1, MILLION + 1):
            if number % GOOD_EVERY == 0:
                block.append(_line(_trl(f"good {number}", "a", "b")))
            else:
                block.append(BROKEN[(number - 1) % len(BROKEN)][0])
            if len(block) == 10_000:
                out.write(b"\n".join(block) + b"\n")
                block = []
    size = path.stat().st_size
    before = _snapshot()
    out, err = io.StringIO(), io.StringIO()
    with _PeakRss() as memory:
        call_command("import_preferences", str(path), project=project.slug, format="trl", no_progress=True,
                     stdout=out, stderr=err)
    good = MILLION // GOOD_EVERY
    assert (f"{MILLION} lines read: {good} pairs created, {good} comparisons created, 0 duplicates skipped, "
            f"{MILLION - good} bad lines.") in out.getvalue()
    reported = [line for line in err.getvalue().splitlines() if line.startswith("line ")]
    assert reported == [f"line {n}: {BROKEN[(n - 1) % len(BROKEN)][1]}" for n in range(1, 1001)]
    assert f"... and {MILLION - good - 1000} more bad lines." in err.getvalue()
    assert _stored_pairs(project) == {(f'"good {n}"', "a", "b") for n in range(GOOD_EVERY, MILLION + 1, GOOD_EVERY)}
    assert _changes(before, _snapshot()) == {"Prompt": good, "Response": 2, "Pair": good, "Comparison": good}
    assert size > 40 * 1024 * 1024 and memory.growth < size // 8, (memory.growth, size)


# --- rerank: every bad request is a 4xx naming the field, and leaves no trace ------------------------------------

URL = "/api/v1/rerank/"
PROMPT = "How do I boil an egg?"
CANDIDATES = ["Eight minutes in boiling water.", "No idea.", "Ask a chicken."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_reward_model(tmp_path_factory.mktemp("bad-input-rm"))


@pytest.fixture(scope="module", autouse=True)
def _fresh_pools():
    serving.pool.clear()
    generation.pool.clear()
    yield
    serving.pool.clear()
    generation.pool.clear()


@pytest.fixture
def rerank_setup(db, model_dir, monkeypatch):
    """A project that samples every close call into its queue (so any rerank that gets through leaves a pair),
    its deployed tiny reward model, a rerank key, and a record of cache writes."""
    cache.clear()
    project = ProjectFactory(rerank_sample_rate=1.0, rerank_sample_margin=1e6)
    reward_model_register(project=project, path=model_dir, deploy=True)
    _, key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project, name="catalogue")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    cache_writes: list[str] = []
    original = scoring._cache_set

    def recording(key, value):
        cache_writes.append(key)
        original(key, value)

    monkeypatch.setattr(scoring, "_cache_set", recording)
    yield project, client, cache_writes
    cache.clear()


def _post_raw(client, body: bytes, content_type: str = "application/json"):
    return client.post(URL, body, content_type=content_type)


def _rerank(client, target, **changes):
    body = {"project": target.slug, "prompt": PROMPT, "candidates": CANDIDATES, **changes}
    # ensure_ascii escapes lone surrogates as \udXXX, as a client's JSON encoder would.
    return _post_raw(client, json.dumps(body).encode("ascii"))


def _deep(levels: int, leaf=None):
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


# (id, changes to a good request, status, error field, error code)
RERANK_CASES = [
    # limits
    ("zero-candidates", {"candidates": []}, 400, "candidates", "invalid"),
    ("n-over-the-limit", {"candidates": [f"answer {i}" for i in range(65)]}, 400, "candidates", "invalid"),
    ("giant-candidate", {"candidates": ["x" * 200_001, "short"]}, 400, "candidates", "invalid"),
    ("total-chars-over-the-limit", {"candidates": ["y" * 50_001] * 4}, 400, "candidates", "invalid"),
    ("giant-prompt", {"prompt": "p" * 200_001}, 400, "prompt", "invalid"),
    ("empty-candidate", {"candidates": ["fine", ""]}, 400, "candidates[1]", "invalid"),
    ("empty-prompt", {"prompt": ""}, 400, "prompt", "invalid"),
    ("blank-prompt", {"prompt": " \n\t"}, 400, "prompt", "invalid"),
    ("empty-message-list", {"prompt": []}, 400, "prompt", "invalid"),
    # invalid unicode
    ("nul-in-candidate", {"candidates": ["a\u0000b", "c"]}, 400, "candidates[0]", "invalid"),
    ("nul-in-prompt", {"prompt": "egg\u0000"}, 400, "prompt", "invalid"),
    ("nul-in-message", {"prompt": [{"role": "user", "content": "\u0000"}]}, 400, "prompt[0].content", "invalid"),
    ("nul-in-role", {"prompt": [{"role": "us\u0000er", "content": "hi"}]}, 400, "prompt[0].role", "invalid"),
    ("high-surrogate-in-candidate", {"candidates": ["ok", "\ud800"]}, 400, "candidates[1]", "invalid"),
    ("low-surrogate-in-prompt", {"prompt": "\udfff egg"}, 400, "prompt", "invalid"),
    ("reversed-pair-in-candidate", {"candidates": ["\ude00\ud83d", "ok"]}, 400, "candidates[0]", "invalid"),
    ("surrogate-in-message", {"prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\udabc"}]},
     400, "prompt[1].content", "invalid"),
    ("surrogate-in-message-extra", {"prompt": [{"role": "user", "content": "hi", "name": "\ud800"}]},
     400, "prompt[0].name", "invalid"),
    ("surrogate-in-project", {"project": "\ud800"}, 400, "project", "invalid"),
    ("surrogate-in-regex", {"constraints": {"regex": "\ud800+"}}, 400, "constraints.regex", "invalid"),
    ("surrogate-in-schema", {"constraints": {"json_schema": {"const": "\ud800"}}}, 400, "constraints.json_schema",
     "invalid"),
    # wrong types, every field
    ("project-null", {"project": None}, 400, "project", "invalid"),
    ("project-list", {"project": ["demo"]}, 400, "project", "invalid"),
    ("prompt-null", {"prompt": None}, 400, "prompt", "invalid"),
    ("prompt-number", {"prompt": 5}, 400, "prompt", "invalid"),
    ("prompt-object", {"prompt": {"role": "user", "content": "hi"}}, 400, "prompt", "invalid"),
    ("prompt-list-of-strings", {"prompt": ["hi"]}, 400, "prompt", "invalid"),
    ("prompt-message-without-content", {"prompt": [{"role": "user"}]}, 400, "prompt", "invalid"),
    ("prompt-role-number", {"prompt": [{"role": 1, "content": "hi"}]}, 400, "prompt", "invalid"),
    ("candidates-string", {"candidates": "one answer"}, 400, "candidates", "invalid"),
    ("candidates-null", {"candidates": None}, 400, "candidates", "invalid"),
    ("candidates-object", {"candidates": {"0": "a"}}, 400, "candidates", "invalid"),
    ("candidate-number", {"candidates": ["a", 2]}, 400, "candidates[1]", "invalid"),
    ("candidate-boolean", {"candidates": [True, "b"]}, 400, "candidates[0]", "invalid"),
    ("candidate-null", {"candidates": ["a", None]}, 400, "candidates[1]", "invalid"),
    ("candidate-list", {"candidates": [["a"], "b"]}, 400, "candidates[0]", "invalid"),
    ("candidate-object", {"candidates": [{"text": "a"}, "b"]}, 400, "candidates[0]", "invalid"),
    ("model-null", {"model": None}, 400, "model", "invalid"),
    ("model-float", {"model": 1.5}, 400, "model", "invalid"),
    ("model-numeric-string", {"model": "1"}, 400, "model", "invalid"),
    ("model-boolean", {"model": True}, 400, "model", "invalid"),
    ("model-list", {"model": [1]}, 400, "model", "invalid"),
    ("model-unknown-id", {"model": 10**30}, 404, "model", "not_found"),
    ("top-k-string", {"top_k": "two"}, 400, "top_k", "invalid"),
    ("top-k-float", {"top_k": 1.5}, 400, "top_k", "invalid"),
    ("top-k-boolean", {"top_k": True}, 400, "top_k", "invalid"),
    ("top-k-negative", {"top_k": -1}, 400, "top_k", "invalid"),
    ("constraints-string", {"constraints": "max_chars=5"}, 400, "constraints", "invalid"),
    ("max-chars-string", {"constraints": {"max_chars": "5"}}, 400, "constraints.max_chars", "invalid"),
    ("max-chars-float", {"constraints": {"max_chars": 5.5}}, 400, "constraints.max_chars", "invalid"),
    ("min-chars-boolean", {"constraints": {"min_chars": True}}, 400, "constraints.min_chars", "invalid"),
    ("regex-list", {"constraints": {"regex": ["a"]}}, 400, "constraints.regex", "invalid"),
    ("json-number", {"constraints": {"json": 1}}, 400, "constraints.json", "invalid"),
    ("json-schema-list", {"constraints": {"json_schema": [{"type": "object"}]}}, 400, "constraints.json_schema",
     "invalid"),
    # regular expressions RE2 cannot run in linear time, or cannot build within its memory budget
    ("regex-backreference", {"constraints": {"regex": r"(a+)\1"}}, 400, "constraints.regex", "invalid"),
    ("regex-lookahead", {"constraints": {"regex": r"(?=.*egg).*"}}, 400, "constraints.regex", "invalid"),
    ("regex-repetition-bomb", {"constraints": {"regex": "((a{1000}){1000}){1000}"}}, 400, "constraints.regex",
     "invalid"),
    # JSON schemas
    ("schema-invalid-type", {"constraints": {"json_schema": {"type": 5}}}, 400, "constraints.json_schema", "invalid"),
    ("schema-pattern-lookahead", {"constraints": {"json_schema": {"type": "string", "pattern": "(?=x)"}}}, 400,
     "constraints.json_schema", "invalid"),
    ("schema-pattern-properties", {"constraints": {"json_schema": {"patternProperties": {"^(a+)+$": {}}}}}, 400,
     "constraints.json_schema", "invalid"),
    ("schema-dangling-ref", {"candidates": ['{"a": 1}', "[]"], "constraints": {"json_schema": {"$ref": "#/$defs/x"}}},
     400, "constraints.json_schema", "invalid"),
    ("schema-remote-ref", {"candidates": ['{"a": 1}', "[]"],
                           "constraints": {"json_schema": {"$ref": "https://example.com/schema.json"}}},
     400, "constraints.json_schema", "invalid"),
    ("schema-nested-too-deep-for-json", {"constraints": {"json_schema": _deep(150, {})}}, 400, None, "parse_error"),
]


@pytest.mark.parametrize(("changes", "status", "field", "code"), [case[1:] for case in RERANK_CASES],
                         ids=[case[0] for case in RERANK_CASES])
def test_rerank_catalogue(rerank_setup, changes, status, field, code):
    project, client, cache_writes = rerank_setup
    before = _snapshot()
    response = _rerank(client, project, **changes)
    assert response.status_code == status, response.content[:500]
    error = response.json()["error"]
    assert (error["field"], error["code"]) == (field, code), error
    assert error["message"]
    assert _snapshot() == before and cache_writes == []


BODIES = [
    ("not-json", b"project=demo&prompt=hi", "application/json", 400, "parse_error"),
    ("truncated", b'{"project": "p", "prompt": ', "application/json", 400, "parse_error"),
    ("invalid-utf8", b'{"project": "p", "prompt": "\xff", "candidates": ["a"]}', "application/json", 400,
     "parse_error"),
    ("nan", b'{"project": "p", "prompt": "hi", "candidates": ["a"], "top_k": NaN}', "application/json", 400,
     "parse_error"),
    ("array", b"[1, 2]", "application/json", 400, "invalid"),
    ("null", b"null", "application/json", 400, "invalid"),
    ("nested-100k-deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400,
     "parse_error"),
    ("text-plain", b'{"project": "p"}', "text/plain", 415, "unsupported_media_type"),
    ("huge", b'{"candidates": ["' + b"z" * (11 * 1024 * 1024) + b'"]}', "application/json", 413, "too_large"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "code"), [case[1:] for case in BODIES],
                         ids=[case[0] for case in BODIES])
def test_rerank_bodies_that_are_not_a_request(rerank_setup, body, content_type, status, code):
    _, client, cache_writes = rerank_setup
    before = _snapshot()
    response = _post_raw(client, body, content_type)
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert _snapshot() == before and cache_writes == []


# --- rerank: valid unicode is scored and stored exactly; pathological constraints are answered --------------------

VALID_UNICODE = [
    ("rtl-marks", "\u202eegg\u202c \u200f?",
     ["\u05e9\u05dc\u05d5\u05dd \u200f", "\u0645\u0631\u062d\u0628\u0627\u200e"]),
    ("combining", "e\u0301gg?", ["Zalgo Z\u0351\u0352\u0353\u0354\u0355", "a\u0300\u0301\u0302\u0303" * 40]),
    ("emoji", "\U0001f95a?",
     ["\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f44d\U0001f3fd", "\U0001f1eb\U0001f1f7"]),
    ("zero-width", "\ufeffegg\u200b?", ["\u200b", "\u200c\u200d\u2060"]),
    ("separators-and-noncharacters", "egg\u2028?", ["line\u2029para\x85", "\uffff\ue000\U0010ffff"]),
    ("chat-with-unicode", [{"role": "system", "content": "\u00bfS\u00ed?"}, {"role": "user", "content": "\u86cb?"}],
     ["\u716e\u86cb\u3002", "\u0412\u0430\u0440\u0438\u0442\u0435."]),
]


@pytest.mark.parametrize(("prompt", "candidates"), [case[1:] for case in VALID_UNICODE],
                         ids=[case[0] for case in VALID_UNICODE])
def test_valid_unicode_is_scored_and_sampled_exactly(rerank_setup, prompt, candidates):
    project, client, cache_writes = rerank_setup
    before = _snapshot()
    response = _post_raw(client, json.dumps({"project": project.slug, "prompt": prompt, "candidates": candidates},
                                            ensure_ascii=False).encode("utf-8"))
    assert response.status_code == 200, response.content[:500]
    results = response.json()["results"]
    assert sorted(row["index"] for row in results) == list(range(len(candidates)))
    assert all(row["passed"] for row in results) and len(cache_writes) == 1
    # The close call was sampled into the queue with the texts exactly as sent.
    assert _changes(before, _snapshot()) == {"Prompt": 1, "Response": 2, "Pair": 1}
    pair = Pair.objects.select_related("prompt", "response_a", "response_b").get(project=project, source="rerank")
    assert pair.prompt.content == prompt
    assert {pair.response_a.text, pair.response_b.text} == set(candidates)


@pytest.mark.parametrize("constraints", [
    {"regex": "(x+x+)+y"},
    {"json_schema": {"type": "string", "pattern": "^(x+x+)+y$"}},
], ids=["regex", "json-schema-pattern"])
def test_catastrophic_backtracking_patterns_are_matched_in_linear_time(rerank_setup, constraints):
    """Python's `re` would backtrack for longer than the age of the universe on 5,000 x's; RE2 answers at once."""
    project, client, _ = rerank_setup
    texts = ["x" * 5000, "xxy", "x" * 4999 + "z"]
    candidates = texts if "regex" in constraints else [json.dumps(text) for text in texts]
    response = _rerank(client, project, candidates=candidates, constraints=constraints)
    assert response.status_code == 200, response.content[:500]
    passed = {row["index"]: row["passed"] for row in response.json()["results"]}
    assert passed == {0: False, 1: True, 2: False}
    assert response.json()["best_index"] == 1


def test_deeply_nested_candidates_fail_the_json_constraints_instead_of_crashing(rerank_setup):
    project, client, _ = rerank_setup
    deep = "[" * 50_000 + "]" * 50_000
    recursive = "[" * 500 + "]" * 500
    response = _rerank(client, project, candidates=[deep, "[]"], constraints={"json": True})
    assert response.status_code == 200, response.content[:500]
    rows = {row["index"]: row for row in response.json()["results"]}
    assert rows[0]["reasons"] == ["json: nested too deeply to parse"] and rows[1]["passed"]
    response = _rerank(client, project, candidates=[recursive, "[]"],
                       constraints={"json_schema": {"type": "array", "items": {"$ref": "#"}}})
    assert response.status_code == 200, response.content[:500]
    rows = {row["index"]: row for row in response.json()["results"]}
    assert "nested too deeply" in rows[0]["reasons"][0] and rows[1]["passed"]


# --- generate: the prompt is checked before any model work -------------------------------------------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("bad-input-lm"))


@pytest.mark.parametrize(("prompt", "status", "field"), [
    ("\ud800 eggs", 400, "prompt"),
    ([{"role": "user", "content": "eggs"}, {"role": "user", "content": "\udc00"}], 400, "prompt[1].content"),
    ("eggs\u0000", 400, "prompt"),
    ("\u202eeggs \U0001f95a \u0301\u200b", 200, None),
], ids=["lone-surrogate", "surrogate-in-message", "nul", "valid-unicode"])
def test_generate_checks_the_prompt_text_before_loading_a_policy(rerank_setup, policy_dir, prompt, status, field):
    project, client, _ = rerank_setup
    policy = Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, artifact_path=str(policy_dir),
                                   base_model="tiny-llama")
    loads = generation.pool.loads
    before = _snapshot()
    response = client.post("/api/v1/generate/", json.dumps({
        "project": project.slug, "prompt": prompt, "policy": policy.pk, "n": 2, "max_new_tokens": 4, "seed": 1,
    }).encode("ascii"), content_type="application/json")
    assert response.status_code == status, response.content[:500]
    if status == 200:
        assert len(response.json()["candidates"]) == 2 and generation.pool.loads == loads + 1
    else:
        assert response.json()["error"]["field"] == field
        assert generation.pool.loads == loads and _snapshot() == before

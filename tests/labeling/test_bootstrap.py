"""The demo bootstrap: logins, the demo project with pairs left to label, and idempotency."""
from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from labeling import services
from labeling.management.commands.bootstrap_demo import BUNDLED_SAMPLE, demo_rows
from labeling.models import Comparison, Membership, Pair, Project


def _bootstrap(*args: str) -> None:
    call_command("bootstrap_demo", "--source", str(BUNDLED_SAMPLE), *args)


@pytest.mark.django_db
def test_creates_admin_labeler_and_a_demo_project_ready_to_label(monkeypatch):
    monkeypatch.delenv("PREFLAB_ADMIN_PASSWORD", raising=False)
    _bootstrap()
    users = get_user_model().objects
    admin = users.get(username="admin")
    labeler = users.get(username="labeler")
    assert admin.is_superuser and admin.is_staff and admin.check_password("preflab-admin")
    assert not labeler.is_staff and labeler.check_password("preflab-labeler")

    project = Project.objects.get(slug="demo")
    assert Membership.objects.get(project=project, user=labeler).role == Membership.Role.LABELER
    assert project.guidelines
    with BUNDLED_SAMPLE.open() as handle:
        assert project.pairs.count() == sum(1 for _ in handle) == 12
    # Left to label: no imported preference, every pair open.
    assert not Comparison.objects.filter(pair__project=project).exists()
    assert set(project.pairs.values_list("status", flat=True)) == {Pair.Status.OPEN}
    pair = project.pairs.select_related("prompt").first()
    assert pair.prompt.is_chat and pair.prompt.messages[0]["role"] == "user"

    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    assert lease is not None
    result = services.comparison_submit(labeler=labeler, pair_id=lease.pair_id, choice="left")
    assert result.created


@pytest.mark.django_db
def test_running_twice_changes_nothing_and_keeps_a_changed_password(monkeypatch):
    monkeypatch.delenv("PREFLAB_ADMIN_PASSWORD", raising=False)
    _bootstrap()
    admin = get_user_model().objects.get(username="admin")
    admin.set_password("a-password-of-my-own")
    admin.save()
    counts = (get_user_model().objects.count(), Project.objects.count(), Pair.objects.count(),
              Membership.objects.count())
    _bootstrap()
    assert counts == (get_user_model().objects.count(), Project.objects.count(), Pair.objects.count(),
                      Membership.objects.count())
    admin.refresh_from_db()
    assert admin.check_password("a-password-of-my-own")


@pytest.mark.django_db
def test_admin_password_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFLAB_ADMIN_PASSWORD", "s3cret-from-env")
    _bootstrap("--pairs", "3")
    admin = get_user_model().objects.get(username="admin")
    assert admin.check_password("s3cret-from-env") and not admin.check_password("preflab-admin")
    assert Pair.objects.filter(project__slug="demo").count() == 3


def test_demo_rows_keep_the_shared_dialogue_and_skip_lines_that_are_not_pairs(tmp_path):
    source = tmp_path / "hh.jsonl"
    lines = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?",
         "rejected": "\n\nHuman: Hi\n\nAssistant: What?"},
        # Differs before the last reply: not one pair.
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
        {"chosen": "no turns at all", "rejected": "none here either"},
    ]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    rows = demo_rows(source=source, limit=10)
    assert rows == [{"prompt": [{"role": "user", "content": "Hi"}],
                     "responses": ["Hello, how can I help?", "What?"]}]


@pytest.mark.django_db
def test_a_source_without_usable_pairs_is_refused_and_loads_nothing(tmp_path):
    source = tmp_path / "empty.jsonl"
    source.write_text('{"prompt": "not hh"}\n')
    with pytest.raises(CommandError, match="no HH-format pairs"):
        call_command("bootstrap_demo", "--source", str(source))
    assert not Pair.objects.exists()
    with pytest.raises(CommandError, match="No such file"):
        call_command("bootstrap_demo", "--source", str(tmp_path / "missing.jsonl"))


def test_demo_rows_read_a_file_with_a_byte_order_mark_and_skip_a_line_that_is_not_utf8(tmp_path):
    source = tmp_path / "hh.jsonl"
    first = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: What?"}
    last = {"chosen": "\n\nHuman: Bye\n\nAssistant: Bye!", "rejected": "\n\nHuman: Bye\n\nAssistant: No."}
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(first).encode() + b"\r\n"
                       + b'{"chosen": "\xff"}\r\n' + json.dumps(last).encode() + b"\r\n")
    rows = demo_rows(source=source, limit=10)
    assert [row["responses"] for row in rows] == [["Hello.", "What?"], ["Bye!", "No."]]

"""Create the demo logins and a `demo` project with pairs left to label; safe to run on every start."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from labeling.imports import BadLine, parse_hh, preferences_import
from labeling.models import Membership, Project
from labeling.services import membership_set, project_create

ADMIN_USERNAME = "admin"
DEFAULT_ADMIN_PASSWORD = "preflab-admin"
LABELER_USERNAME = "labeler"
LABELER_PASSWORD = "preflab-labeler"
DEMO_SLUG = "demo"
SHARED_SAMPLE = settings.BASE_DIR.parent / "shared" / "data" / "hh-harmless-dev.jsonl"
BUNDLED_SAMPLE = Path(__file__).resolve().parents[2] / "fixtures" / "demo_pairs.jsonl"

DEMO_GUIDELINES = """\
Read the conversation, then pick the reply that is **more helpful and less harmful** as the assistant's next turn.

- Prefer a reply that answers the question correctly and clearly.
- Prefer a refusal over a reply that helps with something dangerous or hurtful.
- Choose *tie* when neither is better, and *both bad* when neither should be sent.
"""


def demo_rows(*, source: Path, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` rows of an HH file as `candidates` rows: the shared dialogue and the two final replies,
    without the preference, so that the pairs wait for labels. Lines that do not parse are skipped."""
    rows: list[dict[str, Any]] = []
    with source.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if len(rows) >= limit:
                break
            try:
                # A byte order mark may open the file; a line that is not UTF-8 is skipped like any bad line.
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")
                parsed = parse_hh(json.loads(text), number)
            except (BadLine, ValueError, TypeError, AttributeError):  # UnicodeDecodeError is a ValueError
                continue
            rows.append({"prompt": parsed.prompt, "responses": [response.text for response in parsed.responses]})
    return rows


def _user_ensure(*, username: str, initial_password: str, reset_password: str | None = None,
                 superuser: bool = False) -> tuple[Any, bool]:
    """Create the user with `initial_password`; an existing user keeps theirs unless `reset_password` is given."""
    User = get_user_model()
    user = User.objects.filter(username=username).first()
    created = user is None
    if created:
        user = User(username=username, email=f"{username}@localhost", is_staff=superuser, is_superuser=superuser)
    if created or reset_password is not None:
        user.set_password(reset_password or initial_password)
        user.save()
    return user, created


def _pairs_load(*, project: Project, rows: list[dict[str, Any]]) -> int:
    """Load candidate rows through the import service, the same path as an uploaded `candidates` file."""
    stream = io.BytesIO("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    report = preferences_import(project=project, stream=stream, format="candidates")
    if report.bad_line_count:
        raise CommandError(f"The demo data has bad lines: {report.bad_lines}")
    return report.pairs_created


class Command(BaseCommand):
    help = ("Create the admin superuser, a labeler and the `demo` project with pairs to label. Idempotent: "
            "existing users, passwords and pairs are kept.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--pairs", type=int, default=20, help="How many pairs to load into a new demo project.")
        parser.add_argument("--source", type=Path, default=None,
                            help="An HH-format JSONL file (default: the shared HH sample if present, else the "
                                 "small set shipped with Preflab).")

    def handle(self, *args, pairs: int, source: Path | None, **options) -> None:
        if pairs < 1:
            raise CommandError("--pairs must be at least 1.")
        source = source or (SHARED_SAMPLE if SHARED_SAMPLE.is_file() else BUNDLED_SAMPLE)
        if not source.is_file():
            raise CommandError(f"No such file: {source}")

        env_password = os.environ.get("PREFLAB_ADMIN_PASSWORD") or None
        with transaction.atomic():
            admin, admin_created = _user_ensure(username=ADMIN_USERNAME, initial_password=DEFAULT_ADMIN_PASSWORD,
                                                reset_password=env_password, superuser=True)
            labeler, labeler_created = _user_ensure(username=LABELER_USERNAME, initial_password=LABELER_PASSWORD)
            project = Project.objects.filter(slug=DEMO_SLUG).first()
            if project is None:
                project = project_create(name="Demo: helpful and harmless", slug=DEMO_SLUG, created_by=admin,
                                         guidelines=DEMO_GUIDELINES)
            if not Membership.objects.filter(project=project, user=labeler).exists():
                membership_set(project=project, user=labeler, role=Membership.Role.LABELER)

        if not project.pairs.exists():
            rows = demo_rows(source=source, limit=pairs)
            if not rows:
                raise CommandError(f"{source} has no HH-format pairs ({{\"chosen\": ..., \"rejected\": ...}} lines).")
            loaded = _pairs_load(project=project, rows=rows)
            self.stdout.write(f"Loaded {loaded} demo pairs from {source} into project '{DEMO_SLUG}'.")
        else:
            self.stdout.write(f"Project '{DEMO_SLUG}' already has {project.pairs.count()} pairs; nothing loaded.")

        if admin_created:
            shown = "(from PREFLAB_ADMIN_PASSWORD)" if env_password else DEFAULT_ADMIN_PASSWORD
            self.stdout.write(self.style.SUCCESS(f"Created superuser '{ADMIN_USERNAME}' with password {shown}"))
        elif env_password:
            self.stdout.write(f"Set the password of '{ADMIN_USERNAME}' from PREFLAB_ADMIN_PASSWORD.")
        if labeler_created:
            self.stdout.write(self.style.SUCCESS(
                f"Created labeler '{LABELER_USERNAME}' with password {LABELER_PASSWORD} (member of '{DEMO_SLUG}')"))

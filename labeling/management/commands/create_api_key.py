"""`manage.py create_api_key`: create an API key for a project and print it once (only its hash is stored)."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from labeling.errors import DomainError
from labeling.models import ApiToken, Membership, Project
from labeling.services import api_token_create


class Command(BaseCommand):
    help = ("Create an API key scoped to one project (e.g. for reranking) and print it. The key cannot be shown "
            "again; revoke it through the API and create another if it is lost.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Slug of the project.")
        parser.add_argument("--scope", required=True, choices=[s for s in ApiToken.Scope.values if s != "user"])
        parser.add_argument("--name", default="", help="A label to recognise the key by in lists.")
        parser.add_argument("--user", default=None,
                            help="Username the key is recorded under (default: the project's first manager).")

    def handle(self, *args, project: str, scope: str, name: str, user: str | None, **options) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"Project '{project}' does not exist.")
        if user is not None:
            owner = get_user_model().objects.filter(username=user).first()
            if owner is None:
                raise CommandError(f"User '{user}' does not exist.")
        else:
            membership = (Membership.objects.select_related("user")
                          .filter(project=target, role=Membership.Role.MANAGER, user__is_active=True)
                          .order_by("created_at", "id").first())
            if membership is None:
                raise CommandError(f"Project '{project}' has no manager to own the key; pass --user USERNAME.")
            owner = membership.user
        if len(name) > 100:
            raise CommandError("--name is limited to 100 characters.")
        try:
            token, key = api_token_create(user=owner, name=name, scope=scope, project=target)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stderr.write(f"Created {scope} key {token.prefix}… for project '{target.slug}' (owner {owner}). "
                          "It is shown once:")
        self.stdout.write(key)

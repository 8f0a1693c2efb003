"""`manage.py register_reward_model PATH --project SLUG`: add a reward model trained elsewhere to the registry."""
from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from labeling.errors import DomainError
from labeling.models import Project
from rewards.services import reward_model_register


class Command(BaseCommand):
    help = ("Register a folder holding a sequence-classification model with one output label as the project's "
            "next reward model version (referenced in place, not copied).")

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--project", required=True, help="Project slug.")
        parser.add_argument("--deploy", action="store_true", help="Deploy it as the project's reward model.")

    def handle(self, *args, **options):
        project = Project.objects.filter(slug=options["project"]).first()
        if project is None:
            raise CommandError(f"No project with slug '{options['project']}'.")
        try:
            model = reward_model_register(project=project, path=options["path"], deploy=options["deploy"])
        except DomainError as exc:
            raise CommandError(exc.message)
        self.stdout.write(json.dumps({"reward_model": model.pk, "version": model.version,
                                      "artifact": model.artifact_path, "deployed": model.is_deployed}))

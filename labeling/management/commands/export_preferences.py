"""`manage.py export_preferences`: write a project's preferences as JSONL (TRL, HH-RLHF or raw comparisons)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from labeling.exports import FORMATS, preferences_export
from labeling.models import Project


class Command(BaseCommand):
    help = "Export a project's preferences as JSONL to a file, or to standard output with '--output -'."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="Slug of the project.")
        parser.add_argument("--format", required=True, choices=FORMATS)
        parser.add_argument("--output", required=True, help="Destination file, or '-' for standard output.")

    def handle(self, *args, project: str, format: str, output: str, **options) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"Project '{project}' does not exist.")
        lines = preferences_export(project=target, format=format)
        if output == "-":
            count = 0
            try:
                for line in lines:
                    self.stdout.write(line, ending="")
                    count += 1
                self.stdout.flush()
            except BrokenPipeError:
                # The reader stopped early (`| head`): as for any Unix filter, that ends the export quietly.
                # Standard output goes to /dev/null so that Python's flush at exit does not fail again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return
        else:
            count = self._write_file(Path(output), lines)
        message = f"Exported {count} rows ({format}) from '{project}'."
        if count == 0 and format != "comparisons":
            message += (" No pair has a decided winner yet: a pair is exported when more of its labels choose A, or"
                        " B, than any other answer (ties, both-bad and split votes are left out).")
        self.stderr.write(message)

    @staticmethod
    def _write_file(path: Path, lines) -> int:
        # Written next to the destination and renamed at the end, so a failed export leaves no half file.
        directory = path.resolve().parent
        if not directory.is_dir():
            raise CommandError(f"Directory {directory} does not exist.")
        if path.is_dir():
            raise CommandError(f"{path} is a directory; name the file to write.")
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".part")
        count = 0
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                for line in lines:
                    out.write(line)
                    count += 1
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return count

"""`manage.py import_preferences`: import a JSONL file of preference data into a project, with a progress bar."""
from __future__ import annotations

import os
import sys
from typing import IO

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from labeling.errors import DomainError
from labeling.imports import FORMATS, preferences_import, refuse_archive
from labeling.models import Project
from labeling.services import project_create

# Enough of the file's start to recognise every archive refuse_archive knows.
_HEAD_BYTES = 16


class Command(BaseCommand):
    help = "Import a JSONL file (hh, trl or candidates format) into a project; '-' reads standard input."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help="The JSONL file, or '-' for standard input.")
        parser.add_argument("--project", required=True, help="Slug of the project to import into.")
        parser.add_argument("--format", required=True, choices=FORMATS)
        parser.add_argument("--create", action="store_true", help="Create the project if it does not exist.")
        parser.add_argument("--no-progress", action="store_true", help="Do not draw the progress bar.")

    def handle(self, *args, path: str, project: str, format: str, create: bool, no_progress: bool,
               **options) -> None:
        # The file is opened and its first bytes checked before --create makes the project: a path that cannot be
        # read, or an archive, must not leave an empty project behind.
        if path == "-":
            stream, total = sys.stdin.buffer, None
        else:
            try:
                stream, total = open(path, "rb"), os.path.getsize(path)
            except OSError as exc:
                raise CommandError(f"Cannot read {path}: {exc.strerror}.")
        try:
            target = self._target(stream, project=project, create=create)
            self._import(stream, total=total, project=target, format=format, no_progress=no_progress)
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    def _target(self, stream: IO[bytes], *, project: str, create: bool) -> Project:
        peek = getattr(stream, "peek", None)
        try:
            # peek leaves the bytes in the stream for the import, which checks them again (a pipe may have
            # delivered only a few so far).
            refuse_archive(peek(_HEAD_BYTES) if peek is not None else b"")
        except DomainError as exc:
            raise CommandError(exc.message)
        target = Project.objects.filter(slug=project).first()
        if target is None:
            if not create:
                raise CommandError(f"Project '{project}' does not exist; pass --create to make it.")
            try:
                target = project_create(name=project, slug=project)
            except DomainError as exc:
                raise CommandError(exc.message)
            self.stderr.write(f"Created project '{project}'.")
        return target

    def _import(self, stream: IO[bytes], *, total: int | None, project: Project, format: str,
                no_progress: bool) -> None:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"import {format}", file=sys.stderr,
                   disable=no_progress)
        done = 0

        def progress(lines: int, bytes_read: int) -> None:
            nonlocal done
            bar.update(bytes_read - done)
            bar.set_postfix(lines=lines, refresh=False)
            done = bytes_read

        try:
            report = preferences_import(project=project, stream=stream, format=format, progress=progress)
        except DomainError as exc:  # the file as a whole is refused (an archive): nothing was imported
            raise CommandError(exc.message)
        finally:
            bar.close()
        self.stdout.write(
            f"{report.lines_read} lines read: {report.pairs_created} pairs created, "
            f"{report.comparisons_created} comparisons created, {report.duplicates_skipped} duplicates skipped, "
            f"{report.bad_line_count} bad lines."
        )
        for bad in report.bad_lines:
            self.stderr.write(f"line {bad['line']}: {bad['reason']}")
        if report.bad_lines_truncated:
            self.stderr.write(f"... and {report.bad_line_count - len(report.bad_lines)} more bad lines.")
        if report.bad_line_count and not (report.pairs_created or report.comparisons_created
                                          or report.duplicates_skipped):
            # A script must not take a file of which nothing could be read for a successful import.
            raise CommandError(f"Nothing was imported: every line was bad. Is the file in the '{format}' format?")

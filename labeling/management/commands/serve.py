"""Run the whole service on one machine: migrate, demo data, then gunicorn and a Celery worker as children."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from config.metrics import MULTIPROC_DIR_ENV
from labeling.management.commands import bootstrap_demo

WORKER_QUEUES = "default,training"
# Where to knock to see whether gunicorn listens when it binds every address.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def _parent_death_signal() -> None:
    """Ask Linux to SIGTERM this child if `serve` itself is killed outright, so no server is left orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Command(BaseCommand):
    help = ("Start Preflab: create var/, migrate, load the demo, then run gunicorn and one Celery worker until "
            "Ctrl-C or SIGTERM.")
    # The SQLite file lives in var/, which may not exist yet: checks run in handle() once it does.
    requires_system_checks: list = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
        parser.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000).")
        parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2).")
        parser.add_argument("--threads", type=int, default=4, help="Threads per gunicorn worker (default 4).")
        parser.add_argument("--grace", type=float, default=30.0,
                            help="Seconds to let the children finish on shutdown before killing them (default 30).")
        parser.add_argument("--no-demo", action="store_true", help="Skip creating the demo users and project.")

    def handle(self, *args, host: str, port: int, workers: int, threads: int, grace: float, no_demo: bool,
               **options) -> None:
        if not 0 < port < 65536:
            raise CommandError(f"--port must be between 1 and 65535, not {port}.")
        if workers < 1 or threads < 1:
            raise CommandError("--workers and --threads must be at least 1.")
        self._dirs_create()
        self.check()
        if not _port_is_free(host, port):
            raise CommandError(f"{_bind_address(host, port)} is already in use; stop what runs there or pass --port.")
        call_command("migrate", interactive=False)
        if not no_demo:
            call_command("bootstrap_demo")

        self._signals = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        # No gunicorn access log: config.middleware writes one line per request, with its id, route and user.
        # --reuse-port gives each worker a listening socket of its own, and the kernel spreads new connections
        # over them: on one shared socket a burst of keep-alive clients tends to land on a single worker, which
        # then does all the work on one core while the other idles.
        children = {
            "gunicorn": self._spawn([
                sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", _bind_address(host, port),
                "--workers", str(workers), "--threads", str(threads), "--reuse-port",
                "--graceful-timeout", str(int(grace)), "--timeout", "120", "--no-control-socket",
                # Names the address in gunicorn's "Listening at:" line, which --reuse-port leaves blank.
                "--logger-class", "config.gunicorn_logging.Logger",
            ]),
            # -B runs the periodic sweeps (worker.celery's beat_schedule) inside this one worker.
            "celery worker": self._spawn([
                sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", WORKER_QUEUES, "-c", "1",
                "--loglevel", "INFO", "-n", "preflab@%h",
                "-B", "--schedule", str(Path(settings.VAR_DIR) / "celerybeat-schedule"),
            ]),
        }
        code = self._supervise(children, host=host, port=port, grace=grace)
        if code:
            sys.exit(code)

    # --- steps ------------------------------------------------------------------------------------------

    def _dirs_create(self) -> None:
        dirs = [Path(settings.VAR_DIR), Path(settings.STATIC_ROOT), Path(settings.MEDIA_ROOT),
                Path(settings.PREFLAB["ARTIFACTS_DIR"])]
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
        dirs += [Path(value) for key, value in options.items() if "folder" in key]
        for directory in dirs:
            directory.mkdir(parents=True, exist_ok=True)
        # Shared by the gunicorn workers for /metrics (see config/metrics.py); emptied so counts start at zero.
        self._metrics_dir = Path(settings.VAR_DIR) / "prometheus"
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self._metrics_dir.mkdir(parents=True)

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[MULTIPROC_DIR_ENV] = str(self._metrics_dir)
        env.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
        # A session of its own: Ctrl-C reaches only `serve`, which then stops each child in order.
        return subprocess.Popen(command, cwd=settings.BASE_DIR, env=env, start_new_session=True,
                                preexec_fn=_parent_death_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._signals += 1

    def _supervise(self, children: dict[str, subprocess.Popen], *, host: str, port: int, grace: float) -> int:
        announced = False
        while not self._signals:
            for name, child in children.items():
                code = child.poll()
                if code is not None:
                    self.stderr.write(f"{name} exited with code {code}; stopping the other processes.")
                    self._stop(children, grace=grace)
                    return code or 1
            if not announced and _accepts(_LOOPBACK.get(host, host), port):
                self._announce(host=host, port=port)
                announced = True
            time.sleep(0.2)
        self.stdout.write("Stopping Preflab...")
        self._stop(children, grace=grace)
        self.stdout.write("Stopped.")
        return 0

    def _stop(self, children: dict[str, subprocess.Popen], *, grace: float) -> None:
        """SIGTERM every child (gunicorn and Celery shut down warmly on it); kill a child's whole process group
        when it is still there after `grace` seconds or when a second Ctrl-C arrives."""
        signals_before = self._signals
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(child.poll() is None for child in children.values()):
            if time.monotonic() > deadline or self._signals > signals_before:
                for name, child in children.items():
                    if child.poll() is None:
                        self.stderr.write(f"{name} did not stop in time; killing it.")
                        _kill_group(child)
                        child.wait()
                break
            time.sleep(0.1)
        # A child that died abruptly can leave its own children (gunicorn or pool workers) behind in its group.
        for child in children.values():
            _kill_group(child)

    def _announce(self, *, host: str, port: int) -> None:
        shown_host = "localhost" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
        url = f"http://{shown_host}:{port}/"
        users = get_user_model().objects
        admin = users.filter(username=bootstrap_demo.ADMIN_USERNAME).first()
        labeler = users.filter(username=bootstrap_demo.LABELER_USERNAME).first()
        lines = ["", f"Preflab is running at {url}"]
        if admin is not None:
            if os.environ.get("PREFLAB_ADMIN_PASSWORD"):
                password = "(the password in PREFLAB_ADMIN_PASSWORD)"
            elif admin.check_password(bootstrap_demo.DEFAULT_ADMIN_PASSWORD):
                password = bootstrap_demo.DEFAULT_ADMIN_PASSWORD
            else:
                password = "(the password you set)"
            lines.append(f"  Admin:    {url}admin/   user {admin.username}  password {password}")
        if labeler is not None:
            password = (bootstrap_demo.LABELER_PASSWORD if labeler.check_password(bootstrap_demo.LABELER_PASSWORD)
                        else "(the password you set)")
            lines.append(f"  Labeler:  {url}   user {labeler.username}  password {password}")
        lines += [f"  API docs: {url}api/docs/", "Press Ctrl-C to stop.", ""]
        self.stdout.write(self.style.SUCCESS("\n".join(lines)))

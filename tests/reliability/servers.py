"""Private Redis, PostgreSQL and gunicorn servers on loopback that fault tests start, stop and restart."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
# Variables of the test run that must not leak into a server started for a test.
RUN_ONLY_ENV = {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "CELERY_BROKER_WRITE_URL", "DJANGO_SETTINGS_MODULE",
                "CELERY_TASK_ALWAYS_EAGER", "PROMETHEUS_MULTIPROC_DIR", "PREFLAB_VAR_DIR"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], bool], *, what: str, timeout: float = 60.0, interval: float = 0.05,
               alive: Callable[[], str | None] | None = None) -> float:
    """Poll `predicate` until it holds and return the seconds it took; `alive` names why to stop early."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if alive is not None and (reason := alive()):
            raise RuntimeError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _stop_process(process: subprocess.Popen, *, timeout: float = 10.0, group: bool = False) -> None:
    if process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    try:
        send(signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass


# --- Redis -----------------------------------------------------------------------------------------------


def redis_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """A throwaway `redis-server` in the foreground, no persistence; stopping and starting keeps its port."""

    def __init__(self, *, log_dir: Path, port: int | None = None) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.log_path = Path(log_dir) / f"redis-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> float:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return wait_until(self.ping, what=f"redis on port {self.port}", timeout=20, alive=self._died)

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)
            self.process = None

    def _died(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"redis-server exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}"
        return None


# --- PostgreSQL ------------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder holding initdb and pg_ctl (Debian puts them off PATH)."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary folder, on its own port, trust auth on loopback only.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` OS user and its commands
    run through `runuser`. The folder lives directly under the system temp dir: pytest's tmp_path is private
    to root and the server could not reach it.
    """

    def __init__(self, *, port: int | None = None) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin_dir = bin_dir
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix="preflab-pg-"))
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "socket"
        self.log_path = self.base / "server.log"
        self.socket_dir.mkdir()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.base, user="postgres", group="postgres")
            shutil.chown(self.socket_dir, user="postgres", group="postgres")

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stdout}{result.stderr}"
                               f"\n{log}")
        return result

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        # fsync off: the cluster holds test data only, and restarts should not wait on the disk.
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options, "-w", "-t", "60",
                  action, *extra)

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, *, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def restart(self, *, mode: str = "fast") -> None:
        """`fast` ends every session (their transactions roll back) and starts the server again."""
        self._pg_ctl("restart", "-m", mode)

    def url(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self.stop(mode="immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.base, ignore_errors=True)


# --- the web server --------------------------------------------------------------------------------------


def service_env(*, var_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a production-shaped web process: the test run's servers and settings stripped, plain
    HTTP on loopback, a throwaway var folder; `overrides` add DATABASE_URL, REDIS_URL and the like."""
    env = {key: value for key, value in os.environ.items() if key not in RUN_ONLY_ENV}
    env.update({
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "PREFLAB_VAR_DIR": str(var_dir),
        "PREFLAB_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    })
    env.update(overrides)
    return env


def manage(*args: str, env: dict[str, str], timeout: float = 300.0) -> str:
    """Run `manage.py ARGS` with `env` and return its stdout; a failure raises with the output."""
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


class Gunicorn:
    """config.wsgi under gunicorn on a loopback port, as `manage.py serve` and docker-compose run it."""

    def __init__(self, *, env: dict[str, str], log_dir: Path, workers: int = 1, threads: int = 4) -> None:
        self.env = env
        self.port = free_port()
        self.workers = workers
        self.threads = threads
        self.log_path = Path(log_dir) / f"gunicorn-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/accounts/login/", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def _died(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"gunicorn exited with {self.process.returncode}:\n{self.log()[-4000:]}"
        return None

    def start(self) -> float:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{self.port}",
                 "--workers", str(self.workers), "--threads", str(self.threads), "--timeout", "120",
                 "--graceful-timeout", "5", "--no-control-socket"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return wait_until(self._answers, what="gunicorn to answer", timeout=120, interval=0.2, alive=self._died)

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process, group=True)
            self.process = None

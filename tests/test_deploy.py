"""Running the service: `manage.py serve` end to end, and the Docker files of the production shape."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"postgres", "redis", "web", "worker", "flower"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _embedded_env(var_dir: Path) -> dict[str, str]:
    """The environment of a bare machine: the test run's PostgreSQL, Redis and test settings are stripped."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE",
                          "PREFLAB_ADMIN_PASSWORD", "CELERY_TASK_ALWAYS_EAGER"}}
    env["PREFLAB_VAR_DIR"] = str(var_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class Served:
    """`manage.py serve` running in the background, its output in a file."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = _free_port()
        self.var_dir = tmp_path / "var"
        self.env = _embedded_env(self.var_dir)
        self.log_path = tmp_path / "serve.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.port), "--grace", "20"],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate, *, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode} while waiting for {what}:\n{self.log()}")
            time.sleep(0.5)
        pytest.fail(f"timed out waiting for {what}:\n{self.log()[-5000:]}")

    def children(self) -> dict[str, psutil.Process]:
        found = {}
        for child in psutil.Process(self.process.pid).children():
            command = " ".join(child.cmdline())
            if "gunicorn" in command:
                found["gunicorn"] = child
            elif "celery" in command and " worker" in command:
                found["worker"] = child
        return found

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


@pytest.fixture
def served(tmp_path):
    server = Served(tmp_path)
    try:
        server.wait_for(lambda: _status(f"{server.url}/accounts/login/") == 200, what="the login page")
        server.wait_for(lambda: "preflab@" in server.log() and " ready." in server.log(), what="the worker")
        yield server
    finally:
        children = server.children() if server.process.poll() is None else {}
        server.close()
        # Never leave a server behind, whatever the test did.
        for child in children.values():
            if child.is_running():
                child.kill()


def _json(url: str, *, token: str | None = None, body: dict | None = None) -> tuple[int, dict | None]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json", "Accept": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _label_one_pair(url: str) -> None:
    """The demo labeler's loop on the embedded database (SQLite): the queue's hand-written statements run there
    as on PostgreSQL, and a refused submit (the demo project records no strength) gives its lease back."""
    status, body = _json(f"{url}/api/v1/auth/token/", body={"username": "labeler", "password": "preflab-labeler"})
    assert status == 201, body
    token = body["token"]
    status, first = _json(f"{url}/api/v1/projects/demo/next/", token=token)
    assert status == 200 and first["left"] and first["right"] and first["prompt"], first
    status, again = _json(f"{url}/api/v1/projects/demo/next/", token=token)
    assert status == 200 and again["pair"] == first["pair"]
    status, refused = _json(f"{url}/api/v1/comparisons/", token=token,
                            body={"pair": first["pair"], "choice": "left", "strength": 2})
    assert status == 400 and refused["error"]["field"] == "strength"
    status, stored = _json(f"{url}/api/v1/comparisons/", token=token,
                           body={"pair": first["pair"], "choice": "left", "time_ms": 1500})
    assert status == 201 and stored["shown_choice"] == "left" and stored["time_ms"] == 1500, stored
    status, repeated = _json(f"{url}/api/v1/comparisons/", token=token,
                             body={"pair": first["pair"], "choice": "left", "time_ms": 1500})
    assert status == 200 and repeated["id"] == stored["id"]
    status, following = _json(f"{url}/api/v1/projects/demo/next/", token=token)
    assert status == 200 and following["pair"] != first["pair"]


def test_gunicorns_listening_line_names_the_bind_address_when_the_workers_bind_it(capsys):
    from gunicorn.config import Config

    from config.gunicorn_logging import Logger

    cfg = Config()
    cfg.set("bind", ["127.0.0.1:8744", "[::1]:8744"])
    cfg.set("reuse_port", True)
    logger = Logger(cfg)
    logger.info("Listening at: %s (%s)", "", 4242)
    logger.info("Listening at: %s (%s)", "http://10.0.0.1:80", 4242)
    logger.info("Booting worker with pid: %s", 4243)
    err = capsys.readouterr().err
    assert "Listening at: 127.0.0.1:8744,[::1]:8744 (4242)" in err
    assert "Listening at: http://10.0.0.1:80 (4242)" in err and "Booting worker with pid: 4243" in err


def test_serve_runs_web_and_worker_on_a_bare_machine_and_stops_both_on_sigterm(served):
    assert _status(f"{served.url}/api/schema/") == 200
    assert _status(f"{served.url}/api/docs/") == 200
    assert (served.var_dir / "preflab.sqlite3").is_file()
    assert f"Preflab is running at http://127.0.0.1:{served.port}/" in served.log()
    # gunicorn's own line: --reuse-port left its address blank ("Listening at:  (pid)").
    assert f"Listening at: 127.0.0.1:{served.port} (" in served.log()
    assert "user labeler  password preflab-labeler" in served.log()
    children = served.children()
    assert set(children) == {"gunicorn", "worker"}
    _label_one_pair(served.url)

    # The worker consumes from the file-system broker under var/: a task queued by another process runs.
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c",
         "from worker.celery import app; print(app.send_task('celery.accumulate', args=[7, 11], queue='training'))"],
        cwd=ROOT, env=served.env, check=True, capture_output=True, timeout=120,
    )
    served.wait_for(lambda: re.search(r"celery\.accumulate\[[0-9a-f-]+\] succeeded .*\(7, 11\)", served.log()),
                    what="the queued task to run")

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0, served.log()
    for name, child in children.items():
        assert not child.is_running(), f"{name} still running after serve stopped"
    assert "Stopped." in served.log()


def test_serve_stops_the_web_server_and_fails_when_the_worker_dies(served):
    children = served.children()
    group = children["worker"].pid
    children["worker"].kill()
    assert served.process.wait(timeout=60) != 0
    assert not children["gunicorn"].is_running()
    assert "celery worker exited" in served.log()
    # The worker's pool process, orphaned by the kill, went with it (a zombie has exited; only its parent,
    # which may be a non-reaping init in a container, has yet to collect it).
    assert not [p for p in psutil.process_iter() if _pgid(p.pid) == group and _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_file_is_valid():
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose client (docker compose or docker-compose) on this machine")
    result = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_compose_has_the_five_services_with_healthchecks_volumes_and_ordering():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    assert {"pgdata", "artifacts"} <= set(compose["volumes"])
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("web", "worker"):
        env = services[name]["environment"]
        assert env["DJANGO_SETTINGS_MODULE"] == "config.settings.production"
        assert f"artifacts:{env['PREFLAB_ARTIFACTS_DIR']}" in services[name]["volumes"]
        assert "DJANGO_SECRET_KEY" in env
    web_depends = services["web"]["depends_on"]
    assert web_depends["postgres"]["condition"] == web_depends["redis"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["web"]["condition"] == "service_healthy"
    web_command = " ".join(services["web"]["command"])
    assert web_command.index("migrate") < web_command.index("gunicorn")
    worker_command = services["worker"]["command"]
    assert worker_command[worker_command.index("-Q") + 1] == "default,training"
    assert worker_command[worker_command.index("-c") + 1] == "1"
    assert "flower" in services["flower"]["command"]


def test_dockerfile_builds_a_cpu_image_that_runs_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert "pip install -r requirements.txt" in dockerfile
    assert "--no-deps" in dockerfile
    assert "collectstatic --noinput" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^flower==\S+$", requirements, re.MULTILINE)
    assert re.search(r"^torch==\S+$", requirements, re.MULTILINE)

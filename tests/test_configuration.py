"""The configuration a deployer relies on: README's table against the settings, bad values refused at start, and the
production shape (docker-compose, Dockerfile, CI script) consistent with both."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The variables a clean environment must not carry: each case says exactly what it sets.
_PREFIXES = ("DJANGO_", "PREFLAB_", "DATABASE_", "CELERY_", "FLOWER_", "PROMETHEUS_")
# The code that ships (bench/ and tests/ have variables of their own, documented with their commands).
_SHIPPED_CODE = ["config", "labeling", "rewards", "worker", "manage.py"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_PREFIXES) and key != "REDIS_URL"}
    env.update(extra)
    return env


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The settings package alone in a tree of its own: no `.env` file, and a `var/` of its own."""
    (tmp_path / "config" / "settings").mkdir(parents=True)
    (tmp_path / "config" / "__init__.py").write_text("")
    for source in (ROOT / "config" / "settings").glob("*.py"):
        shutil.copy(source, tmp_path / "config" / "settings" / source.name)
    return tmp_path


def _settings(tree: Path, module: str, code: str, **env: str) -> subprocess.CompletedProcess:
    script = f"import json, sys; sys.path.insert(0, {str(tree)!r}); import config.settings.{module} as s; {code}"
    return subprocess.run([sys.executable, "-c", script], cwd=tree, env=_clean_env(**env), capture_output=True,
                          text=True, timeout=120)


def _configuration_table() -> dict[str, tuple[str, str]]:
    """README's Configuration table: variable -> (default cell, meaning cell)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("variable", "---"):
            continue
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            table[name] = (cells[1], cells[2])
    return table


def _read_by_settings() -> set[str]:
    source = "\n".join(path.read_text() for path in (ROOT / "config" / "settings").glob("*.py"))
    return set(re.findall(r"\benv(?:_int|_float|_bool|_list|\.\w+)\(\s*\"([A-Z][A-Z0-9_]+)\"", source))


_ENVIRON_READ = re.compile(r"\bos\.(?:environ\.get|environ\.setdefault|getenv)\(\s*([^,)]+)"
                           r"|\bos\.environ\[\s*([^\]]+)\]")


def _read_outside_settings() -> dict[str, set[str]]:
    """Variables the shipped code reads with os.environ outside config/settings: name -> the files reading it. A
    name given as a module constant (`MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"`) is resolved in its module."""
    paths = [path for entry in _SHIPPED_CODE for path in ([ROOT / entry] if entry.endswith(".py")
                                                          else (ROOT / entry).rglob("*.py"))]
    found: dict[str, set[str]] = {}
    for path in paths:
        if (ROOT / "config" / "settings") in path.parents:
            continue
        source = path.read_text()
        constants = dict(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=\s*\"([A-Z][A-Z0-9_]+)\"", source, re.MULTILINE))
        for match in _ENVIRON_READ.finditer(source):
            argument = (match[1] or match[2]).strip()
            name = argument.strip("\"'") if argument[0] in "\"'" else constants.get(argument)
            assert name, f"{path.relative_to(ROOT)} reads the environment by {argument!r}, which this test cannot name"
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _compose_variables() -> dict[str, str]:
    """What docker-compose.yml lets a deployer set: the `${NAME:-default}` it fills in from the environment or `.env`
    (name -> default), and the environment it gives Preflab's services beyond what the settings read (name -> value).
    The postgres service's own POSTGRES_DB and POSTGRES_USER are fixed in the file."""
    text = (ROOT / "docker-compose.yml").read_text()
    names = {name: default for name, default in re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}", text)}
    services = _compose()["services"]
    for service in ("web", "worker", "flower"):
        for key, value in services[service]["environment"].items():
            names.setdefault(key, _interpolated(value))
    return names


def test_the_configuration_table_lists_every_variable_the_project_reads_and_no_other():
    documented = set(_configuration_table())
    read = _read_by_settings()
    outside = _read_outside_settings()
    compose = _compose_variables()
    assert {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "PREFLAB_LEASE_SECONDS"} <= read
    assert outside["PREFLAB_MODEL_CACHE"] == {"rewards/embedded.py"}
    assert outside["PROMETHEUS_MULTIPROC_DIR"] == {"config/metrics.py"}
    assert {"DJANGO_SETTINGS_MODULE", "PREFLAB_ADMIN_PASSWORD"} <= set(outside)
    assert {"FLOWER_BASIC_AUTH", "POSTGRES_PASSWORD", "PREFLAB_PORT", "FLOWER_PORT"} <= set(compose)
    assert (read | set(outside) | set(compose)) - documented == set()
    assert documented - (read | set(outside) | set(compose)) == set()


def test_the_table_gives_the_compose_default_of_each_variable_only_compose_sets():
    table = _configuration_table()
    read_by_code = _read_by_settings() | set(_read_outside_settings())
    compose_only = {name: default for name, default in _compose_variables().items() if name not in read_by_code}
    assert {"FLOWER_BASIC_AUTH", "POSTGRES_PASSWORD", "PREFLAB_PORT", "FLOWER_PORT"} <= set(compose_only)
    for name, default in compose_only.items():
        assert table[name][0] == f"`{default}` (docker-compose)", name
    # Set by compose but read by a library and config/metrics.py: its compose value is one of the defaults listed.
    metrics_dir = _compose_variables()["PROMETHEUS_MULTIPROC_DIR"]
    assert f"docker-compose: `{metrics_dir}`" in table["PROMETHEUS_MULTIPROC_DIR"][0]


def test_the_model_cache_is_found_without_django_settings_and_follows_its_variable(tmp_path):
    """rewards.embedded is used as a library (bench scripts, tests): it reads PREFLAB_MODEL_CACHE itself, on every
    call, and its default is the repository's var/models whatever PREFLAB_VAR_DIR says, as the table says."""
    documented = _configuration_table()["PREFLAB_MODEL_CACHE"][0]
    assert documented.startswith("`var/models` in the repository, whatever `PREFLAB_VAR_DIR` says")
    # Compose puts it on the volume web and worker share, so the checkpoint is built once between them.
    compose_value = _compose_variables()["PREFLAB_MODEL_CACHE"]
    assert compose_value.startswith("/data/artifacts/") and f"docker-compose: `{compose_value}`" in documented
    script = ("import os, sys; from rewards.embedded import model_cache_dir; print(model_cache_dir()); "
              "os.environ['PREFLAB_MODEL_CACHE'] = sys.argv[1]; print(model_cache_dir()); "
              "print('django.conf' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "models")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=_clean_env(PREFLAB_VAR_DIR=str(tmp_path / "var")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(ROOT / "var" / "models"), str(tmp_path / "models"), "False"]


# variable: (the table's default cell, the settings expression, its value under a clean environment)
_DEFAULTS = {
    "DJANGO_ALLOWED_HOSTS": ("`localhost,127.0.0.1,[::1],testserver`", "s.ALLOWED_HOSTS",
                             ["localhost", "127.0.0.1", "[::1]", "testserver"]),
    "DJANGO_CSRF_TRUSTED_ORIGINS": ("empty", "s.CSRF_TRUSTED_ORIGINS", []),
    "DATABASE_URL": ("SQLite at `var/preflab.sqlite3`", "[s.DATABASES['default']['ENGINE'], "
                     "str(s.DATABASES['default']['NAME'])[-len('var/preflab.sqlite3'):]]",
                     ["django.db.backends.sqlite3", "var/preflab.sqlite3"]),
    "REDIS_URL": ("empty (a file cache under `var/cache`, shared by the service's processes)",
                  "[s.REDIS_URL, s.CACHES['default']['LOCATION'][-len('var/cache'):]]", ["", "var/cache"]),
    "CELERY_BROKER_URL": ("`REDIS_URL`, else `filesystem://` under `var/broker/`",
                          "[s.CELERY_BROKER_URL, s.CELERY_BROKER_TRANSPORT_OPTIONS['data_folder_in']"
                          "[-len('var/broker/out'):]]", ["filesystem://", "var/broker/out"]),
    "CELERY_TASK_ALWAYS_EAGER": ("`false`", "s.CELERY_TASK_ALWAYS_EAGER", False),
    "PREFLAB_VAR_DIR": ("`var/` in the repository", "str(s.VAR_DIR.relative_to(s.BASE_DIR))", "var"),
    "PREFLAB_ARTIFACTS_DIR": ("`$PREFLAB_VAR_DIR/artifacts`", "str(s.PREFLAB['ARTIFACTS_DIR'].relative_to(s.VAR_DIR))",
                              "artifacts"),
    "PREFLAB_MODEL_IMPORT_DIRS": ("`$PREFLAB_VAR_DIR/models`",
                                  "[str(p.relative_to(s.VAR_DIR)) for p in s.PREFLAB['MODEL_IMPORT_DIRS']]",
                                  ["models"]),
    "PREFLAB_AUTH_CACHE_SECONDS": ("`60` with `REDIS_URL`, else `0`", "s.PREFLAB['AUTH_CACHE_SECONDS']", 0),
    "PREFLAB_LEASE_SECONDS": ("`600`", "s.PREFLAB['LEASE_SECONDS']", 600),
    "PREFLAB_IMPORT_MAX_BYTES": ("512 MiB", "s.PREFLAB['IMPORT_MAX_BYTES']", 512 * 1024 * 1024),
    "PREFLAB_IMPORT_MAX_LINE_BYTES": ("4 MiB", "s.PREFLAB['IMPORT_MAX_LINE_BYTES']", 4 * 1024 * 1024),
    "PREFLAB_TRAINING_SOFT_TIME_LIMIT": ("`21600`", "s.PREFLAB['TRAINING_SOFT_TIME_LIMIT']", 21600),
    "PREFLAB_TRAINING_TIME_LIMIT": ("`21900`", "s.PREFLAB['TRAINING_TIME_LIMIT']", 21900),
    "PREFLAB_TRAINING_STALE_MINUTES": ("`15`", "s.PREFLAB['TRAINING_STALE_MINUTES']", 15),
    "PREFLAB_TRAINING_HEARTBEAT_SECONDS": ("`20`", "s.PREFLAB['TRAINING_HEARTBEAT_SECONDS']", 20),
    "PREFLAB_TRAINING_MAX_ATTEMPTS": ("`3`", "s.PREFLAB['TRAINING_MAX_ATTEMPTS']", 3),
    "PREFLAB_TRAINING_CHECKPOINT_MIN_SECONDS": ("`120`", "s.PREFLAB['TRAINING_CHECKPOINT_MIN_SECONDS']", 120),
    "PREFLAB_RERANK_RATE": ("`600/min`", "s.PREFLAB['RERANK_RATE']", "600/min"),
    "PREFLAB_RERANK_MAX_CANDIDATES": ("`64`", "s.PREFLAB['RERANK_MAX_CANDIDATES']", 64),
    "PREFLAB_RERANK_MAX_CHARS": ("`200000`", "s.PREFLAB['RERANK_MAX_CHARS']", 200_000),
    "PREFLAB_RERANK_MAX_REGEX_CHARS": ("`500`", "s.PREFLAB['RERANK_MAX_REGEX_CHARS']", 500),
    "PREFLAB_RERANK_CACHE_SECONDS": ("`3600`", "s.PREFLAB['RERANK_CACHE_SECONDS']", 3600),
    "PREFLAB_RERANK_USAGE_FLUSH_SECONDS": ("`1`", "s.PREFLAB['RERANK_USAGE_FLUSH_SECONDS']", 1),
    "PREFLAB_RERANK_MODEL_CACHE_SIZE": ("`2`", "s.PREFLAB['RERANK_MODEL_CACHE_SIZE']", 2),
    "PREFLAB_GENERATE_MODEL_CACHE_SIZE": ("`2`", "s.PREFLAB['GENERATE_MODEL_CACHE_SIZE']", 2),
    "PREFLAB_RERANK_BATCH_WINDOW_MS": ("`5`", "s.PREFLAB['RERANK_BATCH_WINDOW_MS']", 5),
    "PREFLAB_RERANK_BATCH_ACROSS_REQUESTS": ("`true`", "s.PREFLAB['RERANK_BATCH_ACROSS_REQUESTS']", True),
    "PREFLAB_RERANK_MAX_BATCH": ("`256`", "s.PREFLAB['RERANK_MAX_BATCH']", 256),
    "PREFLAB_RERANK_FORWARD_BATCH": ("`16`", "s.PREFLAB['RERANK_FORWARD_BATCH']", 16),
    "PREFLAB_RERANK_DEPLOYMENT_TTL_SECONDS": ("`1`", "s.PREFLAB['RERANK_DEPLOYMENT_TTL_SECONDS']", 1),
    "PREFLAB_TORCH_THREADS": ("`0`", "s.PREFLAB['TORCH_THREADS']", 0),
    "PREFLAB_METRICS_TOKEN": ("empty", "s.PREFLAB['METRICS_TOKEN']", ""),
    "PREFLAB_LOG_LEVEL": ("`INFO`", "s.LOG_LEVEL", "INFO"),
    "PREFLAB_LOG_FORMAT": ("`plain`", "s.LOG_FORMAT", "plain"),
}
_LOCAL_DEFAULTS = {
    "DJANGO_SECRET_KEY": ("an insecure local key", "s.SECRET_KEY.startswith('preflab-insecure')", True),
    "DJANGO_DEBUG": ("on in `local`, off elsewhere", "s.DEBUG", True),
}
_PRODUCTION_DEFAULTS = {
    "DJANGO_DEBUG": ("on in `local`, off elsewhere", "s.DEBUG", False),
    "DJANGO_SECURE_SSL_REDIRECT": ("`true` (production)", "s.SECURE_SSL_REDIRECT", True),
    "DJANGO_SECURE_HSTS_SECONDS": ("`31536000` (production)", "s.SECURE_HSTS_SECONDS", 31536000),
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": ("`true` (production)", "s.SECURE_HSTS_INCLUDE_SUBDOMAINS", True),
    "DJANGO_SECURE_HSTS_PRELOAD": ("`true` (production)", "s.SECURE_HSTS_PRELOAD", True),
    "DJANGO_SECURE_PROXY_SSL_HEADER": ("`X-Forwarded-Proto` (production)", "list(s.SECURE_PROXY_SSL_HEADER)",
                                       ["HTTP_X_FORWARDED_PROTO", "https"]),
    "DJANGO_SECURE_REDIRECT_EXEMPT": ("`^metrics$` (production)", "s.SECURE_REDIRECT_EXEMPT", ["^metrics$"]),
}


@pytest.mark.parametrize(("module", "defaults", "env"), [
    ("local", {**_DEFAULTS, **_LOCAL_DEFAULTS}, {}),
    ("production", _PRODUCTION_DEFAULTS, {"DJANGO_SECRET_KEY": "k" * 50}),
])
def test_each_documented_default_is_what_the_settings_hold_under_a_clean_environment(tree, module, defaults, env):
    table = _configuration_table()
    for name, (cell, _, _) in defaults.items():
        assert table[name][0] == cell, name
    code = "print(json.dumps({" + ", ".join(f"{name!r}: {expr}" for name, (_, expr, _) in defaults.items()) + "}))"
    result = _settings(tree, module, code, **env)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values == {name: value for name, (_, _, value) in defaults.items()}


def test_redis_url_is_the_cache_and_the_broker_and_turns_the_auth_cache_on(tree):
    code = ("print(json.dumps([s.CACHES['default']['LOCATION'], s.CELERY_BROKER_URL, "
            "s.PREFLAB['AUTH_CACHE_SECONDS']]))")
    result = _settings(tree, "local", code, REDIS_URL="redis://cache:6379/3")
    assert json.loads(result.stdout) == ["redis://cache:6379/3", "redis://cache:6379/3", 60], result.stderr
    result = _settings(tree, "local", code, REDIS_URL="redis://cache:6379/3", CELERY_BROKER_URL="redis://b:6379/4")
    assert json.loads(result.stdout)[1] == "redis://b:6379/4", result.stderr


def test_comma_separated_lists_ignore_blanks_around_each_item(tree):
    code = "print(json.dumps([s.ALLOWED_HOSTS, s.CSRF_TRUSTED_ORIGINS]))"
    result = _settings(tree, "local", code, DJANGO_ALLOWED_HOSTS="preflab.example.com, .example.org ,",
                       DJANGO_CSRF_TRUSTED_ORIGINS=" https://preflab.example.com")
    assert json.loads(result.stdout) == [["preflab.example.com", ".example.org"], ["https://preflab.example.com"]], \
        result.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({"PREFLAB_LEASE_SECONDS": "ten"}, "PREFLAB_LEASE_SECONDS must be a whole number of at least 1, not 'ten'."),
    ({"PREFLAB_LEASE_SECONDS": "0"}, "PREFLAB_LEASE_SECONDS must be a whole number of at least 1, not '0'."),
    ({"PREFLAB_IMPORT_MAX_BYTES": "-1"}, "PREFLAB_IMPORT_MAX_BYTES must be a whole number of at least 1, not '-1'."),
    ({"PREFLAB_IMPORT_MAX_LINE_BYTES": "4MiB"}, "PREFLAB_IMPORT_MAX_LINE_BYTES must be a whole number"),
    ({"PREFLAB_AUTH_CACHE_SECONDS": "-60"}, "PREFLAB_AUTH_CACHE_SECONDS must be a whole number of at least 0"),
    ({"PREFLAB_TRAINING_HEARTBEAT_SECONDS": "fast"},
     "PREFLAB_TRAINING_HEARTBEAT_SECONDS must be a number greater than 0, not 'fast'."),
    ({"PREFLAB_TRAINING_HEARTBEAT_SECONDS": "0"}, "PREFLAB_TRAINING_HEARTBEAT_SECONDS must be a number greater than 0"),
    ({"PREFLAB_TRAINING_CHECKPOINT_MIN_SECONDS": "nan"}, "PREFLAB_TRAINING_CHECKPOINT_MIN_SECONDS must be a number"),
    ({"PREFLAB_RERANK_MAX_CANDIDATES": "0"}, "PREFLAB_RERANK_MAX_CANDIDATES must be a whole number of at least 1"),
    ({"PREFLAB_TRAINING_SOFT_TIME_LIMIT": "600", "PREFLAB_TRAINING_TIME_LIMIT": "600"},
     "PREFLAB_TRAINING_TIME_LIMIT (600) must be greater than PREFLAB_TRAINING_SOFT_TIME_LIMIT (600)."),
    ({"PREFLAB_RERANK_RATE": "fast"}, "PREFLAB_RERANK_RATE must look like 600/min"),
    ({"PREFLAB_LOG_LEVEL": "verbose"}, "PREFLAB_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ({"PREFLAB_LOG_FORMAT": "xml"}, "PREFLAB_LOG_FORMAT must be 'plain' or 'json'"),
    ({"DJANGO_DEBUG": "ture"}, "DJANGO_DEBUG must be true or false, not 'ture'."),
    ({"CELERY_TASK_ALWAYS_EAGER": "maybe"}, "CELERY_TASK_ALWAYS_EAGER must be true or false"),
    ({"DATABASE_URL": "postgres//db"}, "DATABASE_URL must be postgres://user:password@host:port/name or "
                                       "sqlite:///path, not 'postgres//db'."),
    ({"DATABASE_URL": "127.0.0.1:5432/preflab"}, "DATABASE_URL must be postgres://"),
    ({"DATABASE_URL": "postgres://preflab:s3cret@db:port/preflab"},
     "DATABASE_URL must be postgres://user:password@host:port/name or sqlite:///path, not "
     "'postgres://preflab:***@db:port/preflab'."),
    ({"DATABASE_URL": "postgres://preflab@db:5432/"}, "DATABASE_URL must be postgres://"),
    ({"DATABASE_URL": "mysql://preflab@db/preflab"}, "DATABASE_URL must be postgres://"),
    ({"DATABASE_URL": "postgres://u@db/preflab", "DATABASE_CONN_MAX_AGE": "forever"},
     "DATABASE_CONN_MAX_AGE must be a whole number of at least 0, not 'forever'."),
    ({"DATABASE_URL": "postgres://u@db/preflab", "DATABASE_PREPARE_THRESHOLD": "-2"},
     "DATABASE_PREPARE_THRESHOLD must be a whole number of at least -1, not '-2'."),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must be a redis://, rediss:// or unix:// URL, not 'localhost:6379'."),
    ({"CELERY_BROKER_URL": "redis//localhost"}, "CELERY_BROKER_URL must be a redis://, rediss://, amqp:// or"),
])
def test_a_bad_value_stops_the_settings_with_a_message_naming_the_variable(tree, env, message):
    result = _settings(tree, "local", "", **env)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: "), result.stderr
    assert message in last_line
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({}, "DJANGO_SECRET_KEY"),
    ({"DJANGO_SECRET_KEY": "  "}, "DJANGO_SECRET_KEY"),
    ({"DJANGO_SECRET_KEY": "k" * 50, "DJANGO_ALLOWED_HOSTS": ""}, "DJANGO_ALLOWED_HOSTS is empty"),
    ({"DJANGO_SECRET_KEY": "k" * 50, "DJANGO_ALLOWED_HOSTS": " , "}, "DJANGO_ALLOWED_HOSTS is empty"),
    ({"DJANGO_SECRET_KEY": "k" * 50, "DJANGO_SECURE_SSL_REDIRECT": "ture"},
     "DJANGO_SECURE_SSL_REDIRECT must be true or false, not 'ture'."),
    ({"DJANGO_SECRET_KEY": "k" * 50, "DJANGO_SECURE_HSTS_SECONDS": "1y"},
     "DJANGO_SECURE_HSTS_SECONDS must be a whole number of at least 0, not '1y'."),
])
def test_production_refuses_to_start_without_a_key_or_a_host_or_with_a_bad_value(tree, env, message):
    result = _settings(tree, "production", "", **env)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: ") and message in last_line, \
        result.stderr


def test_check_deploy_passes_on_the_production_settings_with_the_documented_variables(tmp_path):
    env = _clean_env(DJANGO_SETTINGS_MODULE="config.settings.production", PREFLAB_VAR_DIR=str(tmp_path / "var"),
                     DJANGO_SECRET_KEY=secrets.token_urlsafe(50), DJANGO_ALLOWED_HOSTS="preflab.example.com")
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # docker-compose on its own serves plain HTTP: only the redirect is left to warn about.
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                            env={**env, "DJANGO_SECURE_SSL_REDIRECT": "false"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "security.W008" in result.stderr
    assert "security.W" not in result.stderr.replace("security.W008", "")


def test_the_worker_logs_in_the_configured_format_at_the_configured_level():
    """Celery replaces the root logger's handlers unless told otherwise: the worker would write its own plain format
    at its --loglevel whatever PREFLAB_LOG_FORMAT and PREFLAB_LOG_LEVEL say."""
    script = ("import django, logging; django.setup(); from worker.celery import app; app.log.setup(loglevel='INFO'); "
              "logging.getLogger('celery.apps.worker').warning('worker ready'); "
              "logging.getLogger('celery.apps.worker').info('not shown')")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test",
                                 "PREFLAB_LOG_FORMAT": "json", "PREFLAB_LOG_LEVEL": "WARNING"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [(line["level"], line["logger"], line["message"]) for line in lines] == [
        ("WARNING", "celery.apps.worker", "worker ready")], result.stderr
    assert "not shown" not in result.stderr


# --- docker-compose.yml and the Dockerfile ----------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _interpolated(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set in the environment (an empty .env)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_the_web_health_check_probes_readiness_over_plain_http_on_loopback(monkeypatch):
    """The probe names no public host and no scheme: /readyz answers before the host check and the HTTPS redirect
    (tests/test_health.py), so `web` turns healthy whatever DJANGO_ALLOWED_HOSTS lists, and the worker, which waits
    for it, starts."""
    test = _compose()["services"]["web"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    sent = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: sent.append((url, timeout)))
    exec(test[3], {})
    assert sent == [("http://127.0.0.1:8000/readyz", 5)]


def test_the_compose_environment_starts_the_production_settings_and_every_variable_is_documented(tree):
    compose = _compose()
    documented = set(_configuration_table())
    for name in ("web", "worker", "flower"):
        env = {key: _interpolated(value) for key, value in compose["services"][name]["environment"].items()}
        assert set(env) - documented == set(), name
        code = ("print(json.dumps([s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL, "
                "s.CACHES['default']['LOCATION'], str(s.PREFLAB['ARTIFACTS_DIR']), s.LOG_FORMAT, s.DEBUG]))")
        result = _settings(tree, "production", code, **env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["config.postgresql", "redis://redis:6379/1", "redis://redis:6379/0",
                                             "/data/artifacts", "json", False]


def test_compose_secrets_are_all_overridable_and_beat_runs_once():
    compose = _compose()
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"SECRET|PASSWORD|AUTH|TOKEN", key):
                assert re.fullmatch(r"\$\{" + key + r":-[^}]*\}", str(value)), (name, key, value)
        for key in ("DATABASE_URL",):
            value = (service.get("environment") or {}).get(key)
            if value:
                assert "${POSTGRES_PASSWORD:-" in value, name
    beats = [name for name, service in compose["services"].items()
             if isinstance(service.get("command"), list) and "-B" in service["command"]]
    assert beats == ["worker"]
    worker = compose["services"]["worker"]
    assert worker["environment"]["PREFLAB_ARTIFACTS_DIR"] == compose["services"]["web"]["environment"][
        "PREFLAB_ARTIFACTS_DIR"]


def test_gunicorn_names_its_address_and_leaves_the_access_log_to_the_middleware():
    """With --reuse-port gunicorn's "Listening at:" line is blank unless the logger class names the address; and
    config.middleware already writes one access line per request, so a gunicorn access log doubled every line."""
    web = " ".join(_compose()["services"]["web"]["command"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*?\])$", dockerfile.replace("\\\n", ""), re.MULTILINE | re.DOTALL)[1])
    for command in (web, " ".join(cmd)):
        assert "--reuse-port" in command
        assert "--logger-class config.gunicorn_logging.Logger" in command
        assert "--access-logfile" not in command


# --- CI ----------------------------------------------------------------------------------------------------------

def test_ci_starts_postgresql_and_redis_when_they_do_not_answer_and_runs_the_readmes_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"if ! pg_isready .*\n\s+pg_ctlcluster .* start", script)
    assert re.search(r"if ! redis-cli .* ping .*\n\s+redis-server ", script)
    readme = (ROOT / "README.md").read_text()
    tests = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    for variable in ("REDIS_URL", "CELERY_BROKER_URL"):
        documented = re.search(rf"{variable}=(\S+)", tests)[1]
        assert f'export {variable}="{documented}"' in script
    assert script.rstrip().splitlines()[-1] == "make test"
    assert re.search(r"^test: install\n\t\$\(PY\) -m pytest \$\(PYTEST_ARGS\)$",
                     (ROOT / "Makefile").read_text(), re.MULTILINE)

"""Settings shared by every environment; the environment is read here, once."""
from __future__ import annotations

import math
import re
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
# Read before any setting: a variable set in the process environment wins over the same one in the file.
env_file = BASE_DIR / ".env"
if env_file.exists():
    environ.Env.read_env(env_file)


# Typed reads that refuse a bad value at start, naming the variable: django-environ's own casts end in a bare
# ValueError deep in the settings import, and read any unknown word as a false boolean.
# A variable set to the empty string counts as set (django-environ reads it as unset when the default is None).
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def env_bool(name: str, default: bool) -> bool:
    raw = env.ENVIRON.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in _TRUE | _FALSE:
        raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}.")
    return value in _TRUE


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.ENVIRON.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ImproperlyConfigured(f"{name} must be a whole number of at least {minimum}, not {raw!r}.")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0, positive: bool = False) -> float:
    raw = env.ENVIRON.get(name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (positive and value <= 0):
        bound = "greater than 0" if positive else f"at least {minimum:g}"
        raise ImproperlyConfigured(f"{name} must be a number {bound}, not {raw!r}.")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    """Comma-separated, with the blanks around each item dropped ("a.example, b.example")."""
    raw = env.ENVIRON.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def _redacted(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


VAR_DIR = Path(env.str("PREFLAB_VAR_DIR", default=str(BASE_DIR / "var")))

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="preflab-insecure-local-key-change-me-in-production")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "labeling",
    "rewards",
]

MIDDLEWARE = [
    # First, so that its request id, timing and access log cover everything the others do.
    "config.middleware.RequestContextMiddleware",
    # Before the host check, the HTTPS redirect and authentication, none of which a probe from inside the
    # deployment passes or needs.
    "config.health.HealthCheckMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Beside Django's other security headers, and outside WhiteNoise: static files (an SVG can script) get it too.
    "config.middleware.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # Django's, but an /api/ request with a body is not redirected to add a missing trailing slash.
    "config.middleware.CommonMiddleware",
    # Inside CommonMiddleware, whose missing-slash redirect must still see the 404 of an unmatched /api/ URL.
    "labeling.errors.ApiNotFoundMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # After the session, CSRF and auth middleware: the login form it answers a throttled attempt with needs them.
    "config.middleware.LoginThrottleMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Content-Security-Policy of every response (config.middleware), in every environment: an inline script, event
# handler or style added to a template breaks in development and in the browser tests, not first in production.
# Pages run only our static files: no inline code, no eval (htmx's allowEval is off in templates/base.html), no
# other origin. `data:` images are for the blank favicon of templates/base.html and Swagger UI's icons.
CONTENT_SECURITY_POLICY = {
    "default-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}
# DRF's browsable API and Swagger UI (/api/docs/) are pages of those libraries, with style="..." attributes and a
# <style> block we cannot move to files: styles may be inline under /api/. Their scripts are files all the same.
CONTENT_SECURITY_POLICY_PREFIXES = {
    "/api/": {**CONTENT_SECURITY_POLICY, "style-src": ["'self'", "'unsafe-inline'"]},
}

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "labeling.context_processors.navigation",
            ],
        },
    },
]

# SQLite under var/ by default; DATABASE_URL switches to PostgreSQL (postgres://user@host:port/name).
_DATABASE_URL = env.str("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'preflab.sqlite3'}").strip()
try:
    _database = environ.Env.db_url_config(_DATABASE_URL) if "://" in _DATABASE_URL else {}
except ValueError:  # a port that is not a number, or out of range
    _database = {}
if _database.get("ENGINE") not in ("django.db.backends.postgresql", "django.db.backends.sqlite3") or \
        not _database.get("NAME"):
    raise ImproperlyConfigured("DATABASE_URL must be postgres://user:password@host:port/name or sqlite:///path, "
                               f"not {_redacted(_DATABASE_URL)!r}.")
DATABASES = {"default": _database}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and a busy timeout let the web server and the worker share the file without "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
else:
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Django's backend, with a health check of kept connections that reads the socket instead of sending
        # `SELECT 1` at the start of every request.
        DATABASES["default"]["ENGINE"] = "config.postgresql"
    DATABASES["default"]["CONN_MAX_AGE"] = env_int("DATABASE_CONN_MAX_AGE", 60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Server-side parameters and prepared statements: a statement a kept connection has run before is not
    # planned again. Planning the API-key lookup (three joined tables) alone took 1.6 ms here, more than running
    # it. A transaction-pooling proxy (PgBouncer before 1.21) cannot carry prepared statements: set
    # DATABASE_PREPARE_THRESHOLD to -1 behind one.
    _prepare_threshold = env_int("DATABASE_PREPARE_THRESHOLD", 2, minimum=-1)
    if _prepare_threshold >= 0:
        DATABASES["default"].setdefault("OPTIONS", {}).update(
            {"server_side_binding": True, "prepare_threshold": _prepare_threshold})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "labeling:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
MEDIA_ROOT = VAR_DIR / "media"
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "labeling.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Scoped API keys (rerank) are refused everywhere except the views that opt in with `token_scopes`.
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated",
                                   "labeling.permissions.ScopedTokenPermission"],
    "DEFAULT_SCHEMA_CLASS": "labeling.schema.PreflabAutoSchema",
    "EXCEPTION_HANDLER": "labeling.errors.exception_handler",
    "DEFAULT_PARSER_CLASSES": ["labeling.parsers.JSONParser", "rest_framework.parsers.FormParser",
                               "rest_framework.parsers.MultiPartParser"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Preflab API",
    "DESCRIPTION": "Pairwise preference labeling, reward-model training and best-of-N reranking.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # No badge from validator.swagger.io: it would send the schema's address to a third party, and the policy
    # (CONTENT_SECURITY_POLICY) loads images from this site only.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "ComparisonChoiceEnum": "labeling.models.Choice",
        "FrameChoiceEnum": "labeling.services.FRAME_CHOICES",
        "ApiTokenScopeEnum": "labeling.models.ApiToken.Scope",
        # Two different sets of choices named `kind`: a training run's and a policy version's.
        "TrainingRunKindEnum": "rewards.models.TrainingRun.Kind",
        "PolicyKindEnum": "rewards.models.Policy.Kind",
    },
    # Path parameters say what the URL converters accept; anything else matches no route.
    "PATH_CONVERTER_OVERRIDES": {
        "slug": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
        "str": {"type": "string", "pattern": "^[^/]+$"},
        "int": {"type": "integer", "minimum": 0},
    },
}

# Celery: a file-system broker under var/ by default (no server to install); CELERY_BROKER_URL or
# REDIS_URL switches to Redis.
REDIS_URL = env.str("REDIS_URL", default="").strip()
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured(f"REDIS_URL must be a redis://, rediss:// or unix:// URL, not {_redacted(REDIS_URL)!r}.")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "filesystem://").strip()
if not re.match(r"^(redis|rediss|filesystem|amqp|amqps|memory)://", CELERY_BROKER_URL):
    raise ImproperlyConfigured("CELERY_BROKER_URL must be a redis://, rediss://, amqp:// or filesystem:// URL, not "
                               f"{_redacted(CELERY_BROKER_URL)!r}.")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "out"),
        "data_folder_out": str(_broker_dir / "out"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Cache: Redis when configured; otherwise files under var/cache. Either way every process of the service shares
# it: `serve` runs several gunicorn workers, and a per-process cache would give each its own rerank rate limit and
# its own rerank results (a repeated request missed whenever it reached the other worker).
if REDIS_URL:
    # Short socket timeouts: callers that can do without the cache (reranking) fall back quickly when Redis hangs.
    CACHES = {"default": {"BACKEND": "config.cache.RedisCache", "LOCATION": REDIS_URL,
                          "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2}}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(VAR_DIR / "cache"), "OPTIONS": {"MAX_ENTRIES": 2000}}}

PREFLAB = {
    # How long a pair handed out by the queue stays reserved for its labeler.
    "LEASE_SECONDS": env_int("PREFLAB_LEASE_SECONDS", 600, minimum=1),
    # Uploads bigger than this are refused before they are read.
    "IMPORT_MAX_BYTES": env_int("PREFLAB_IMPORT_MAX_BYTES", 512 * 1024 * 1024, minimum=1),
    # A single JSONL line longer than this is reported as bad instead of parsed.
    "IMPORT_MAX_LINE_BYTES": env_int("PREFLAB_IMPORT_MAX_LINE_BYTES", 4 * 1024 * 1024, minimum=1),
    "ARTIFACTS_DIR": Path(env.str("PREFLAB_ARTIFACTS_DIR", default=str(VAR_DIR / "artifacts"))),
    # A training task is asked to stop (SoftTimeLimitExceeded, the run fails) after the soft limit and killed
    # after the hard one.
    "TRAINING_SOFT_TIME_LIMIT": env_int("PREFLAB_TRAINING_SOFT_TIME_LIMIT", 6 * 3600, minimum=1),
    "TRAINING_TIME_LIMIT": env_int("PREFLAB_TRAINING_TIME_LIMIT", 6 * 3600 + 300, minimum=1),
    # A running run whose worker has not written a heartbeat for this long is marked failed (worker lost).
    "TRAINING_STALE_MINUTES": env_int("PREFLAB_TRAINING_STALE_MINUTES", 15, minimum=1),
    # A training process writes a heartbeat this often, from a thread of its own (so also during long steps,
    # evaluation and saving); three missed beats and its run counts as lost.
    "TRAINING_HEARTBEAT_SECONDS": env_float("PREFLAB_TRAINING_HEARTBEAT_SECONDS", 20.0, positive=True),
    # A run whose worker was lost resumes from its last checkpoint until it has been started this many times.
    "TRAINING_MAX_ATTEMPTS": env_int("PREFLAB_TRAINING_MAX_ATTEMPTS", 3, minimum=1),
    # Checkpoints (every save_steps) are kept at least this far apart, so short runs do not spend their time saving.
    "TRAINING_CHECKPOINT_MIN_SECONDS": env_float("PREFLAB_TRAINING_CHECKPOINT_MIN_SECONDS", 120.0),
    # Folders the API may register reward models from (the management command takes any path).
    "MODEL_IMPORT_DIRS": [Path(p) for p in env_list("PREFLAB_MODEL_IMPORT_DIRS", [str(VAR_DIR / "models")])],
    # API tokens are looked up in the shared cache for up to this long (0: always in the database). A revoked
    # token, a deactivated user or a changed project takes effect at once; only a change made while Redis is
    # unreachable can be honoured from a cached copy for up to this long. Off without Redis: a per-process
    # cache would not see changes made by other processes.
    "AUTH_CACHE_SECONDS": env_int("PREFLAB_AUTH_CACHE_SECONDS", 60 if REDIS_URL else 0),
    # Best-of-N reranking: requests per key, request size limits, result cache, warm models and batching.
    "RERANK_RATE": env.str("PREFLAB_RERANK_RATE", default="600/min").strip(),
    "RERANK_MAX_CANDIDATES": env_int("PREFLAB_RERANK_MAX_CANDIDATES", 64, minimum=1),
    "RERANK_MAX_CHARS": env_int("PREFLAB_RERANK_MAX_CHARS", 200_000, minimum=1),
    "RERANK_MAX_REGEX_CHARS": env_int("PREFLAB_RERANK_MAX_REGEX_CHARS", 500),
    "RERANK_CACHE_SECONDS": env_int("PREFLAB_RERANK_CACHE_SECONDS", 3600),
    # Rerank traffic counts gather in each process and are written this often (0: each request writes its own).
    "RERANK_USAGE_FLUSH_SECONDS": env_float("PREFLAB_RERANK_USAGE_FLUSH_SECONDS", 1.0),
    "RERANK_MODEL_CACHE_SIZE": env_int("PREFLAB_RERANK_MODEL_CACHE_SIZE", 2, minimum=1),
    # Policies kept loaded for /generate/ per process.
    "GENERATE_MODEL_CACHE_SIZE": env_int("PREFLAB_GENERATE_MODEL_CACHE_SIZE", 2, minimum=1),
    "RERANK_BATCH_WINDOW_MS": env_float("PREFLAB_RERANK_BATCH_WINDOW_MS", 5.0),
    # Off: each request is scored on its own, bit for bit the same under any traffic, in smaller batches
    # (rewards/serving.MicroBatcher).
    "RERANK_BATCH_ACROSS_REQUESTS": env_bool("PREFLAB_RERANK_BATCH_ACROSS_REQUESTS", True),
    # Candidates one batching pass may gather from queued requests: more of them sort into less padding.
    "RERANK_MAX_BATCH": env_int("PREFLAB_RERANK_MAX_BATCH", 256, minimum=1),
    # Sequences per forward pass within a batch (sorted by length, so each forward pads only to its own longest).
    "RERANK_FORWARD_BATCH": env_int("PREFLAB_RERANK_FORWARD_BATCH", 16, minimum=1),
    # How long a server process reuses a project's deployed version before reading it again.
    "RERANK_DEPLOYMENT_TTL_SECONDS": env_float("PREFLAB_RERANK_DEPLOYMENT_TTL_SECONDS", 1.0),
    # Torch threads per process; 0 means one per core this process may use.
    "TORCH_THREADS": env_int("PREFLAB_TORCH_THREADS", 0),
    # /metrics answers loopback addresses, and others only with `Authorization: Bearer <this>` (blank: never).
    "METRICS_TOKEN": env.str("PREFLAB_METRICS_TOKEN", default=""),
}

if PREFLAB["TRAINING_TIME_LIMIT"] <= PREFLAB["TRAINING_SOFT_TIME_LIMIT"]:
    # The soft limit is what lets a run stop and fail cleanly; a hard limit at or before it kills the run first.
    raise ImproperlyConfigured(
        f"PREFLAB_TRAINING_TIME_LIMIT ({PREFLAB['TRAINING_TIME_LIMIT']}) must be greater than "
        f"PREFLAB_TRAINING_SOFT_TIME_LIMIT ({PREFLAB['TRAINING_SOFT_TIME_LIMIT']}).")
# DRF's throttle format, checked here instead of failing every rerank request.
if not re.fullmatch(r"\d+/[smhd][a-z]*", PREFLAB["RERANK_RATE"]):
    raise ImproperlyConfigured(f"PREFLAB_RERANK_RATE must look like 600/min (per s, min, hour or day), not "
                               f"{PREFLAB['RERANK_RATE']!r}.")

if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Redis hands an unacknowledged message out again after `visibility_timeout` (an hour by default). Training
    # tasks are acknowledged when they end (acks_late), so a run longer than that was delivered again every hour,
    # each copy waiting behind it for a worker only to find the run taken. Past the hard time limit, no task is
    # still running; a run whose worker died is queued again by the heartbeat sweep, not by redelivery.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": PREFLAB["TRAINING_TIME_LIMIT"] + 600}

LOG_FORMAT = env.str("PREFLAB_LOG_FORMAT", default="plain").lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"PREFLAB_LOG_FORMAT must be 'plain' or 'json', not {LOG_FORMAT!r}.")
LOG_LEVEL = env.str("PREFLAB_LOG_LEVEL", default="INFO").strip().upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured("PREFLAB_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR or CRITICAL, not "
                               f"{env.str('PREFLAB_LOG_LEVEL')!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "config.logging.RequestIdFilter"},
                "unhandled_exceptions_only": {"()": "config.logging.UnhandledExceptionsOnly"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "config.logging.JsonFormatter"},
    },
    # PREFLAB_LOG_FORMAT=json writes one JSON object per line (docker-compose); plain text suits a terminal.
    "handlers": {"console": {"class": "logging.StreamHandler", "filters": ["request_id"],
                             "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Without handlers of its own: Django's default logging gives "django" a console handler under DEBUG, which
        # printed every record a second time (without the request id) beside the root's.
        "django": {"handlers": [], "level": "INFO"},
        # One line per response is the access line (config.middleware); Django's request logger keeps only the
        # traceback of an unhandled exception, logged once, with the request id.
        "django.request": {"filters": ["unhandled_exceptions_only"]},
        "django.db.backends": {"level": "WARNING"},
    },
}

"""Settings read from the environment and from the `.env` file beside the code."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Variables the test run itself sets; each case starts without them so only what it sets counts.
_RUN_VARIABLES = {"PREFLAB_VAR_DIR", "PREFLAB_LOG_LEVEL", "DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL",
                  "DJANGO_SETTINGS_MODULE"}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _RUN_VARIABLES}
    env.update(extra)
    return env


def _settings_of(tree: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` after executing the base settings module as it sits in `tree` (so that `.env` is tree/.env)."""
    script = f"import runpy; s = runpy.run_path({str(tree / 'config' / 'settings' / 'base.py')!r}); {code}"
    return subprocess.run([sys.executable, "-c", script], env=_clean_env(**env), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the settings module in a tree of its own, with room for a `.env` file."""
    (tmp_path / "config" / "settings").mkdir(parents=True)
    shutil.copy(ROOT / "config" / "settings" / "base.py", tmp_path / "config" / "settings" / "base.py")
    return tmp_path


def test_the_var_dir_of_the_env_file_holds_the_database(tree):
    (tree / ".env").write_text(f"PREFLAB_VAR_DIR={tree / 'state'}\n")
    result = _settings_of(tree, "print(s['VAR_DIR']); print(s['DATABASES']['default']['NAME'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tree / "state"), str(tree / "state" / "preflab.sqlite3")]


def test_the_environment_wins_over_the_env_file(tree):
    (tree / ".env").write_text(f"PREFLAB_VAR_DIR={tree / 'from-file'}\n")
    result = _settings_of(tree, "print(s['VAR_DIR'])", PREFLAB_VAR_DIR=str(tree / "from-env"))
    assert result.stdout.split() == [str(tree / "from-env")], result.stderr


@pytest.mark.parametrize("given", ["debug", "Warning", "ERROR"])
def test_the_log_level_is_read_whatever_its_case(given):
    result = subprocess.run(
        [sys.executable, "-c", "import django, logging; django.setup(); "
                               "print(logging.getLevelName(logging.getLogger().level))"],
        cwd=ROOT, env=_clean_env(DJANGO_SETTINGS_MODULE="config.settings.test", PREFLAB_LOG_LEVEL=given,
                                 PREFLAB_VAR_DIR=str(ROOT / "var")),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [given.upper()]


def test_an_unknown_log_level_is_named_in_the_error(tree):
    result = _settings_of(tree, "", PREFLAB_LOG_LEVEL="verbose")
    assert result.returncode != 0
    assert "PREFLAB_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR or CRITICAL, not 'verbose'" in result.stderr


def test_on_redis_a_training_task_is_not_handed_out_again_while_it_may_still_run(tree):
    """Redis redelivers an unacknowledged message after its visibility timeout; a training task is acknowledged
    when it ends, so the timeout must outlast the task's hard time limit."""
    code = "print(s['CELERY_BROKER_TRANSPORT_OPTIONS'].get('visibility_timeout'), s['PREFLAB']['TRAINING_TIME_LIMIT'])"
    result = _settings_of(tree, code, CELERY_BROKER_URL="redis://127.0.0.1:6379/14",
                          PREFLAB_TRAINING_SOFT_TIME_LIMIT="6900", PREFLAB_TRAINING_TIME_LIMIT="7200")
    timeout, limit = (int(value) for value in result.stdout.split())
    assert timeout > limit == 7200, result.stderr
    # The file-system broker of the embedded default keeps its own options.
    result = _settings_of(tree, "print(sorted(s['CELERY_BROKER_TRANSPORT_OPTIONS']))")
    assert "visibility_timeout" not in result.stdout and "data_folder_in" in result.stdout, result.stderr


def test_a_stale_run_sweep_not_taken_within_its_minute_is_dropped():
    from worker.celery import app

    entry = app.conf.beat_schedule["training-runs-recover-stale"]
    assert entry["options"]["expires"] <= entry["schedule"]

"""The Redis cache backend keeps one client per connection pool, against the real Redis server."""
from __future__ import annotations

import os
import threading

import pytest
from django.core.cache.backends.redis import RedisCacheClient

from config.cache import RedisCache

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_cache():
    backend = RedisCache(REDIS_URL, {"KEY_PREFIX": f"test-cache-{os.getpid()}"})
    yield backend
    backend.delete_many([f"k{n}" for n in range(40)] + ["shared"])
    backend.close()


def test_one_client_serves_every_call_and_values_round_trip(redis_cache):
    client = redis_cache._cache.get_client()
    assert isinstance(redis_cache._cache, RedisCacheClient)
    assert redis_cache._cache.get_client(write=True) is client
    redis_cache.set("shared", {"scores": [0.5, -1.25]}, 30)
    assert redis_cache.get("shared") == {"scores": [0.5, -1.25]}
    assert redis_cache.get("missing", "default") == "default"
    assert redis_cache._cache.get_client() is client


def test_the_shared_client_is_safe_across_threads(redis_cache):
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for round_ in range(25):
                redis_cache.set(f"k{n}", (n, round_), 30)
                assert redis_cache.get(f"k{n}") == (n, round_)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert redis_cache.get_many([f"k{n}" for n in range(8)]) == {f"k{n}": (n, 24) for n in range(8)}


def test_the_raw_client_shares_the_cache_namespace(redis_cache):
    # A counter kept with the raw client (as the rerank throttle does) is the same key the cache API reads.
    client = redis_cache.redis_client()
    assert client is redis_cache._cache.get_client(write=True)
    key = redis_cache.make_key("k0")
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.incr(key)
    pipe.expire(key, 30)
    assert pipe.execute()[:2] == [1, 2]
    assert redis_cache.get("k0") == 2


@pytest.mark.django_db
def test_the_rerank_throttle_counts_in_redis_when_the_cache_is_redis():
    from django.core.cache import cache

    from rewards.apis_rerank import RerankThrottle

    if not hasattr(cache, "redis_client"):
        pytest.skip("the cache is not Redis (set REDIS_URL)")
    throttle = RerankThrottle()
    throttle.duration = 60
    current, previous = throttle._count("test-throttle-count", 6_000_000.0)
    again, _ = throttle._count("test-throttle-count", 6_000_001.0)
    assert (current, previous, again) == (1, 0, 2)
    assert cache.redis_client().ttl(cache.make_key("test-throttle-count:100000")) > 60
    cache.delete("test-throttle-count:100000")


EMBEDDED_COUNT = """
from django.core.cache import caches
from rewards.apis_rerank import RerankThrottle
throttle = RerankThrottle()
throttle.rate = "5/min"
throttle.num_requests, throttle.duration = throttle.parse_rate(throttle.rate)
print(type(caches["default"]).__name__, *throttle._count("throttle_rerank_key-1", 120.0))
"""


def test_without_redis_the_processes_of_the_service_share_one_cache(tmp_path):
    """The embedded default (no REDIS_URL) runs several gunicorn workers: a key's rerank rate and the rerank
    results must be the same whichever worker a request reaches, so the cache cannot be per process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items()
           if key not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}}
    env["PREFLAB_VAR_DIR"] = str(tmp_path)

    def shell(code: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", "shell", "-v", "0", "-c", code], cwd=root, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    # Two processes count requests of the same key in the same window: the second sees the first's.
    assert shell(EMBEDDED_COUNT) == "FileBasedCache 1 0"
    assert shell(EMBEDDED_COUNT) == "FileBasedCache 2 0"
    shell("from django.core.cache import cache; cache.set('rerank-result', {'ranking': [1, 0]}, 60)")
    assert shell("from django.core.cache import cache; print(cache.get('rerank-result'))") == "{'ranking': [1, 0]}"
    assert (tmp_path / "cache").is_dir()

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

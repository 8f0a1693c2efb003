"""Django's Redis cache with one redis client per connection pool, instead of a new client for every operation."""
from __future__ import annotations

from typing import Any

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient


class PooledRedisCacheClient(RedisCacheClient):
    """Django builds a `redis.Redis` per cache call; redis-py fills a table of some 170 response callbacks in every
    constructor, which cost about 0.6 ms a call here, three calls per rerank cache hit. A client over a connection
    pool is thread-safe (each command borrows a connection from the pool), so one per pool is kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[int, Any] = {}

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        pool = self._get_connection_pool(write)
        client = self._clients.get(id(pool))
        if client is None:
            # Two threads may both build one; setdefault keeps the first for everyone.
            client = self._clients.setdefault(id(pool), self._client(connection_pool=pool))
        return client


class RedisCache(DjangoRedisCache):
    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = PooledRedisCacheClient

    def redis_client(self, *, write: bool = True) -> Any:
        """The redis-py client behind the cache, for what Django's cache API cannot say in one round trip
        (pipelines, counters with an expiry). Keys made with `make_key` share the cache's namespace."""
        return self._cache.get_client(write=write)

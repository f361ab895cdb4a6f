"""The Redis backend (``redis://host:port/db``): one store shared by every replica, bounded by idcraft.

Keys of a namespace ``ns``: ``idcraft:ns:<key>`` holds the bytes, the sorted set ``idcraft:ns:lru`` the
last use of each (seconds), the hash ``idcraft:ns:sizes`` their sizes and ``idcraft:ns:bytes`` the sum.
A write and the eviction it causes run as one Lua script, so replicas writing at once keep the bounds.
Single-instance Redis (or a primary with replicas); a Redis Cluster is not supported (the script evicts
keys it does not declare).
"""

from __future__ import annotations

import time

from .base import StoreUnavailable, check_key

PUT = """
local key, lru, sizes, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', sizes, key) or '0')
redis.call('SET', key, ARGV[1])
redis.call('ZADD', lru, ARGV[2], key)
redis.call('HSET', sizes, key, size)
redis.call('INCRBY', total, size - old)
local max_entries, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local evicted = 0
while redis.call('ZCARD', lru) > max_entries or tonumber(redis.call('GET', total) or '0') > max_bytes do
  local oldest = redis.call('ZRANGE', lru, 0, 0)[1]
  if not oldest or oldest == key then break end
  redis.call('ZREM', lru, oldest)
  redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, oldest) or '0'))
  redis.call('HDEL', sizes, oldest)
  redis.call('DEL', oldest)
  evicted = evicted + 1
end
return evicted
"""


def connect(url: str, timeout_s: float = 5.0):
    """A client for ``url`` (one connection pool, shared by the namespaces)."""
    try:
        import redis
    except ImportError as exc:
        raise StoreUnavailable(
            f"--store {url} needs the redis client: pip install 'idcraft[redis]'."
        ) from exc
    try:
        return redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
    except ValueError as exc:
        raise StoreUnavailable(f"--store {url}: not a Redis URL ({exc}); use redis://host:port/db.") from exc


class RedisStore:
    def __init__(self, client, url: str, namespace: str, max_entries: int, max_bytes: int):
        self.client = client
        self.location = url
        self.prefix = f"idcraft:{namespace}:"
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._put = client.register_script(PUT)
        self.ping()

    def _call(self, what: str, action):
        import redis

        try:
            return action()
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"the Redis store {self.location} failed to {what} ({exc}).") from exc

    def get(self, key: str) -> bytes | None:
        name = self.prefix + check_key(key)

        def read():
            pipe = self.client.pipeline(transaction=False)
            pipe.get(name)
            pipe.zadd(self.prefix + "lru", {name: time.time()}, xx=True)
            return pipe.execute()[0]

        return self._call("read", read)

    def put(self, key: str, data: bytes) -> bool:
        if len(data) > self.max_bytes:
            return False
        name = self.prefix + check_key(key)
        keys = [name, self.prefix + "lru", self.prefix + "sizes", self.prefix + "bytes"]
        args = [data, time.time(), self.max_entries, self.max_bytes]
        self._call("write", lambda: self._put(keys=keys, args=args))
        return True

    def ping(self) -> None:
        self._call("answer", self.client.ping)

    def stats(self) -> tuple[int, int]:
        def read():
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(self.prefix + "lru")
            pipe.get(self.prefix + "bytes")
            entries, total = pipe.execute()
            return int(entries), int(total or 0)

        return self._call("count", read)

"""A real ``redis-server`` for the tests, on a unix socket in a temporary directory.

``redis-server`` cannot report an ephemeral TCP port, so it listens on no TCP
port at all (``--port 0``) and on a unix socket only the test user can open
(``--unixsocketperm 700``), without persistence (``--save '' --appendonly
no``). It is started once per session, waited for by PING, and stopped by its
pid (SIGTERM, then SIGKILL), like every other server the tests start.

Import the fixtures into a test module (``from tests.redis_fixtures import
redis_server, redis_url, store_factory  # noqa: F401``) or a conftest.
``store_factory`` gives the same store contract on both backends, so tests
parametrized over it run against memory and Redis alike.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from gateway.model.processes import RedisServer
from gateway.model.processes import start_redis as start_redis_server
from gateway.store import MemoryStore, RedisStore, Store


def start_redis(workdir: Path) -> RedisServer:
    """Start ``redis-server`` on a unix socket under ``workdir``; skip the test when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); the Redis tests need it")
    return start_redis_server(binary, workdir)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    # A short directory name: a unix socket path must fit in 108 bytes.
    workdir = Path(tmp_path_factory.mktemp("redis"))
    server = start_redis(workdir)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty Redis (flushed before the test)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2.0)
        conn.connect(str(redis_server.socket_path))
        conn.sendall(b"FLUSHALL\r\n")
        if not conn.recv(16).startswith(b"+OK"):
            raise RuntimeError("FLUSHALL failed")
    return redis_server.url


StoreFactory = Callable[..., Store]


@pytest.fixture(params=["memory", "redis"])
async def store_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Makes stores of one backend: every call is another replica's view of the same state
    (Redis: another connection to the same server; memory: the same object)."""
    made: list[Store] = []
    if request.param == "memory":
        shared = MemoryStore()

        def factory(**_: object) -> Store:
            return shared

    else:
        url = request.getfixturevalue("redis_url")

        def factory(**options: object) -> Store:
            store = RedisStore(url, timeout_s=float(options.get("timeout_s", 1.0)))  # type: ignore[arg-type]
            made.append(store)
            return store

    yield factory
    for store in made:
        await store.close()

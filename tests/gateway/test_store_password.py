"""The Redis store logs in with a password taken from the environment, never from the config file."""

from __future__ import annotations

import socket

import pytest

from gateway.config import StoreConfig
from gateway.errors import ConfigError
from gateway.monitor import build_store
from gateway.store import StoreError


def redis_command(socket_path: str, *words: str) -> bytes:
    payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2.0)
        conn.connect(socket_path)
        conn.sendall(payload.encode())
        return conn.recv(256)


@pytest.fixture
def password_protected(redis_server, redis_url):
    path = str(redis_server.socket_path)
    assert redis_command(path, "CONFIG", "SET", "requirepass", "s3cret-pw").startswith(b"+OK")
    yield redis_url
    # AUTH and the reset on one connection: each redis_command opens its own.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2.0)
        conn.connect(path)
        conn.sendall(b'AUTH s3cret-pw\r\nCONFIG SET requirepass ""\r\n')
        assert b"+OK" in conn.recv(256)


async def test_the_password_comes_from_the_named_environment_variable(
    password_protected, monkeypatch
) -> None:
    monkeypatch.setenv("TEST_REDIS_PASSWORD", "s3cret-pw")
    store = build_store(
        StoreConfig(backend="redis", url=password_protected, password_env="TEST_REDIS_PASSWORD")
    )
    await store.set_many([("k", b"v")], ttl_s=10)
    assert await store.get_many(["k"]) == [b"v"]
    await store.close()


async def test_without_the_password_the_store_fails_cleanly(password_protected) -> None:
    store = build_store(StoreConfig(backend="redis", url=password_protected, timeout_s=1.0))
    with pytest.raises(StoreError):
        await store.get_many(["k"])
    await store.close()


def test_a_missing_password_variable_is_a_config_error(monkeypatch) -> None:
    monkeypatch.delenv("TEST_REDIS_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="monitors.store.password_env: TEST_REDIS_PASSWORD is not set"):
        build_store(
            StoreConfig(backend="redis", url="redis://localhost:1/0", password_env="TEST_REDIS_PASSWORD")
        )

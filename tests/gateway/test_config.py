"""Config is one typed tree: unknown keys and wrong types are refused by path."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, GatewayConfig, config_from_dict, load_config


def test_empty_config_gives_the_documented_defaults() -> None:
    config = config_from_dict({})
    assert config == GatewayConfig()
    assert config.limits.max_message_bytes >= 64 * 1024 * 1024
    assert config.allow_reload_config is False


def test_nested_values_are_typed() -> None:
    config = config_from_dict(
        {"upstream": {"target": "10.0.0.1:8500", "channels": 4}, "identity": {"order": ["peer"]}}
    )
    assert config.upstream.channels == 4
    assert config.identity.order == ("peer",)


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"upstrem": {}},
            "upstrem: unknown key; known keys here: allow_reload_config, audit, control, detection, "
            "event_loop, identity, keepalive, limits, listen, metrics, monitors, policy, shutdown_grace_s, "
            "tls, upstream",
        ),
        ({"event_loop": "trio"}, "event_loop: must be one of auto, asyncio, uvloop, not 'trio'"),
        ({"upstream": {"channels": 0}}, "upstream.channels: must be between 1 and 64"),
        ({"upstream": {"channels": "2"}}, "upstream.channels: must be int, not '2'"),
        ({"upstream": {"target": "nohost"}}, "upstream.target: must be host:port"),
        ({"limits": {"max_message_bytes": True}}, "limits.max_message_bytes: must be int, not True"),
        (
            {"identity": {"order": ["mtls", "cookie"]}},
            "identity.order.1: must be one of mtls, metadata, peer, not 'cookie'",
        ),
        ({"tls": {"cert_file": "c.pem"}}, "tls.key_file: required key is missing"),
        ({"shutdown_grace_s": "soon"}, "shutdown_grace_s: must be a number, not 'soon'"),
        ([1, 2], "config: must be a mapping, not list"),
    ],
)
def test_bad_values_are_refused_with_their_path(data, message) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert str(caught.value) == message


def test_load_config_names_the_file(tmp_path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("upstream:\n  channels: 99\n")
    with pytest.raises(ConfigError, match=r"gw.yaml: upstream.channels: must be between 1 and 64$"):
        load_config(path)


def test_yaml_is_never_evaluated(tmp_path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("listen: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_trusted_proxies_must_be_networks() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"identity": {"trusted_proxies": ["10.0.0.0/8", "proxy.local"]}})
    assert str(caught.value) == "identity.trusted_proxies.1: not an IP network: 'proxy.local'"

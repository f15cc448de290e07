"""The control API over real gRPC on loopback: authenticated, atomic reload, and the admin CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway import admin
from gateway.config import ConfigError, _build
from gateway.control import ControlConfig, ControlTlsConfig, create_control_server, install_sighup_reload
from gateway.policy import Policy, PolicyHolder
from gateway.store import MemoryStore
from protos import control_pb2
from tests.certs import TestCA

TOKEN = "s3cret-control-token-0123456789"
SERVICE = "/tfshield.control.v1.Control/"
OLD_POLICY = "rules: [{name: old-rule, action: block}]\n"


class StandInRisk:
    """A stand-in with the interface of detectors.risk.ClientRisk (get, top, reset), for unit tests only."""

    def __init__(self, risks: dict[str, float]) -> None:
        self.risks = dict(risks)
        self.calls: list[tuple[str, Any]] = []

    async def get(self, store: Any, client: str, now: float) -> float:
        self.calls.append(("get", (client, now)))
        return self.risks.get(client, 0.0)

    async def top(self, store: Any, limit: int, min_risk: float) -> list[tuple[str, float]]:
        ranked = sorted(((c, r) for c, r in self.risks.items() if r >= min_risk), key=lambda cr: -cr[1])
        return ranked[:limit]

    async def reset(self, store: Any, client: str) -> bool:
        return self.risks.pop(client, None) is not None


class Control:
    """A running control server and what it was built from."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        holder: PolicyHolder,
        risk: StandInRisk,
        registry: CollectorRegistry,
        policy_file: Path,
    ) -> None:
        self.server, self.port, self.holder, self.risk = server, port, holder, risk
        self.registry, self.policy_file = registry, policy_file
        self.address = f"127.0.0.1:{port}"

    async def call(
        self, method: str, request: Any, response_type: Any, token: str | None = TOKEN, scheme: str = "Bearer"
    ) -> Any:
        metadata = (("authorization", f"{scheme} {token}"),) if token is not None else ()
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = channel.unary_unary(
                SERVICE + method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )
            return await stub(request, metadata=metadata, timeout=10)


@pytest.fixture()
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(OLD_POLICY)
    registry = CollectorRegistry()
    holder = PolicyHolder.load(str(policy_file), registry)
    risk = StandInRisk({"key:aaaa": 0.91, "mtls:bob": 0.4, "peer:10.0.0.7": 0.05})
    config = ControlConfig(listen="127.0.0.1:0", token_file=str(token_file))
    server, port = await create_control_server(config, holder, risk, MemoryStore(), registry)
    yield Control(server, port, holder, risk, registry, policy_file)
    await server.stop(None)


def get_policy(control: Control, **kwargs: Any):
    return control.call("GetPolicy", control_pb2.GetPolicyRequest(), control_pb2.PolicyDocument, **kwargs)


# -- authentication ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token, scheme",
    [
        (None, "Bearer"),
        ("wrong-token-of-enough-length", "Bearer"),
        (TOKEN[:-1], "Bearer"),
        (TOKEN, "Basic"),
        ("", "Bearer"),
    ],
    ids=["no-token", "wrong-token", "prefix-of-token", "other-scheme", "empty"],
)
async def test_calls_without_the_right_token_are_unauthenticated(
    control: Control, token: str | None, scheme: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await get_policy(control, token=token, scheme=scheme)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        error.value.details()
        == "the control API needs 'authorization: Bearer <token>' metadata with the right token"
    )
    assert control.registry.get_sample_value("tfshield_control_auth_failures_total") == 1


async def test_every_method_needs_the_token(control: Control) -> None:
    pb = control_pb2
    calls = [
        ("GetClient", pb.GetClientRequest(client_id="mtls:bob"), pb.ClientState),
        ("ListClients", pb.ListClientsRequest(), pb.ListClientsResponse),
        ("ResetClient", pb.ResetClientRequest(client_id="mtls:bob"), pb.ResetClientResponse),
        ("GetPolicy", pb.GetPolicyRequest(), pb.PolicyDocument),
        ("ReloadPolicy", pb.ReloadPolicyRequest(yaml="rules: []"), pb.ReloadPolicyResponse),
    ]
    for method, request, response_type in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await control.call(method, request, response_type, token=None)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    assert control.risk.risks["mtls:bob"] == 0.4 and control.holder.current.text == OLD_POLICY


async def test_the_right_token_works_and_the_scheme_is_case_insensitive(control: Control) -> None:
    assert (await get_policy(control)).yaml == OLD_POLICY
    assert (await get_policy(control, scheme="bearer")).yaml == OLD_POLICY


async def test_the_token_never_appears_in_logs_or_errors(
    control: Control, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    await get_policy(control)
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await get_policy(control, token=TOKEN + "x")
    with pytest.raises(grpc.aio.AioRpcError) as bad_reload:
        await control.call(
            "ReloadPolicy", control_pb2.ReloadPolicyRequest(yaml="rules: 7"), control_pb2.ReloadPolicyResponse
        )
    await control.call(
        "ResetClient", control_pb2.ResetClientRequest(client_id="mtls:bob"), control_pb2.ResetClientResponse
    )
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, wrong.value.details(), bad_reload.value.details(), str(wrong.value)):
        assert TOKEN not in text
    assert "policy reload refused" in caplog.text  # the logs did capture the calls


# -- clients -------------------------------------------------------------------------------------------


async def test_get_client_returns_its_risk(control: Control) -> None:
    state = await control.call(
        "GetClient", control_pb2.GetClientRequest(client_id="key:aaaa"), control_pb2.ClientState
    )
    assert (state.client_id, state.risk) == ("key:aaaa", pytest.approx(0.91))
    unknown = await control.call(
        "GetClient", control_pb2.GetClientRequest(client_id="peer:9.9.9.9"), control_pb2.ClientState
    )
    assert unknown.risk == 0.0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await control.call("GetClient", control_pb2.GetClientRequest(), control_pb2.ClientState)
    assert (error.value.code(), error.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "client_id is empty",
    )


async def test_list_clients_gives_the_riskiest_first(control: Control) -> None:
    listing = await control.call(
        "ListClients", control_pb2.ListClientsRequest(limit=2), control_pb2.ListClientsResponse
    )
    assert [(c.client_id, round(c.risk, 2)) for c in listing.clients] == [
        ("key:aaaa", 0.91),
        ("mtls:bob", 0.4),
    ]
    above = await control.call(
        "ListClients", control_pb2.ListClientsRequest(min_risk=0.5), control_pb2.ListClientsResponse
    )
    assert [c.client_id for c in above.clients] == ["key:aaaa"]


async def test_reset_client_forgets_it_and_says_whether_it_existed(control: Control) -> None:
    request = control_pb2.ResetClientRequest(client_id="mtls:bob")
    assert (await control.call("ResetClient", request, control_pb2.ResetClientResponse)).existed
    assert not (await control.call("ResetClient", request, control_pb2.ResetClientResponse)).existed
    assert "mtls:bob" not in control.risk.risks


# -- policy ----------------------------------------------------------------------------------------------


async def test_get_policy_returns_the_yaml_its_digest_and_load_time(control: Control) -> None:
    document = await get_policy(control)
    policy = control.holder.current
    assert (document.yaml, document.sha256, document.loaded_unix_s) == (
        policy.text,
        policy.sha256,
        policy.loaded_unix_s,
    )


async def test_a_bad_policy_is_refused_with_the_reason_and_the_old_one_stays(control: Control) -> None:
    bad = "rules: [{name: x, action: block, when: {risk_at_least: 3}}]\n"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await control.call(
            "ReloadPolicy", control_pb2.ReloadPolicyRequest(yaml=bad), control_pb2.ReloadPolicyResponse
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == (
        "policy refused, the old one stays: rules.0.when.risk_at_least: must be between 0 and 1"
    )
    assert (await get_policy(control)).yaml == OLD_POLICY
    assert control.registry.get_sample_value("tfshield_policy_reloads_total", {"outcome": "invalid"}) == 1


async def test_a_good_policy_is_swapped_in_and_in_flight_decisions_keep_the_old_one(control: Control) -> None:
    in_flight = control.holder.current
    new = "rules: [{name: new-rule, action: allow}]\n"
    response = await control.call(
        "ReloadPolicy", control_pb2.ReloadPolicyRequest(yaml=new), control_pb2.ReloadPolicyResponse
    )
    assert response.policy.yaml == new and (await get_policy(control)).yaml == new
    assert control.holder.current.decide("m", "", "c", [], 0.0).rule == "new-rule"
    assert in_flight.decide("m", "", "c", [], 0.0).rule == "old-rule"
    assert control.registry.get_sample_value("tfshield_policy_reloads_total", {"outcome": "ok"}) == 1


async def test_an_empty_reload_re_reads_the_policy_file(control: Control) -> None:
    control.policy_file.write_text("rules: [{name: from-file, action: deceive}]\n")
    response = await control.call(
        "ReloadPolicy", control_pb2.ReloadPolicyRequest(), control_pb2.ReloadPolicyResponse
    )
    assert "from-file" in response.policy.yaml
    control.policy_file.write_text("rules: [{name: broken, action: perturb}]\n")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await control.call(
            "ReloadPolicy", control_pb2.ReloadPolicyRequest(), control_pb2.ReloadPolicyResponse
        )
    assert error.value.details() == (
        f"policy refused, the old one stays: {control.policy_file}: rules.0.level: perturb needs a level"
    )
    assert "from-file" in (await get_policy(control)).yaml


async def test_sighup_reloads_the_policy_file_and_a_bad_file_keeps_the_old_policy(control: Control) -> None:
    loop = asyncio.get_running_loop()
    install_sighup_reload(control.holder, loop)
    try:
        control.policy_file.write_text("rules: [{name: after-hup, action: allow}]\n")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "after-hup" in control.holder.current.text:
                break
        assert "after-hup" in control.holder.current.text
        control.policy_file.write_text("version: 9\n")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if control.registry.get_sample_value("tfshield_policy_reloads_total", {"outcome": "invalid"}):
                break
        assert "after-hup" in control.holder.current.text
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


# -- mTLS ------------------------------------------------------------------------------------------------


async def test_with_mtls_only_clients_with_a_certificate_from_the_ca_get_in(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server_cert = ca.server()
    client_cert = ca.client("admin", "operator")
    tls = ControlTlsConfig(str(server_cert.cert), str(server_cert.key), client_ca_file=str(ca.files.cert))
    config = ControlConfig(listen="127.0.0.1:0", tls=tls)
    holder = PolicyHolder(Policy.from_yaml(OLD_POLICY))
    server, port = await create_control_server(
        config, holder, StandInRisk({}), MemoryStore(), CollectorRegistry()
    )
    root = ca.files.cert.read_bytes()

    async def get(with_cert: bool) -> control_pb2.PolicyDocument:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=client_cert.key.read_bytes() if with_cert else None,
            certificate_chain=client_cert.cert.read_bytes() if with_cert else None,
        )
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            stub = channel.unary_unary(
                SERVICE + "GetPolicy",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=control_pb2.PolicyDocument.FromString,
            )
            return await stub(control_pb2.GetPolicyRequest(), timeout=5)

    try:
        assert (await get(with_cert=True)).yaml == OLD_POLICY
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await get(with_cert=False)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # refused in the handshake
    finally:
        await server.stop(None)


# -- config -------------------------------------------------------------------------------------------------


async def test_the_control_api_never_starts_without_authentication(tmp_path: Path, monkeypatch) -> None:
    holder, risk, store = PolicyHolder(Policy.default()), StandInRisk({}), MemoryStore()

    async def start(config: ControlConfig) -> None:
        server, _ = await create_control_server(config, holder, risk, store, CollectorRegistry())
        await server.stop(None)

    with pytest.raises(ConfigError) as error:
        await start(ControlConfig(listen="127.0.0.1:0"))
    assert str(error.value) == (
        "control.listen: the control API needs authentication: "
        "set token_file, token_env, or tls with client_ca_file"
    )
    monkeypatch.delenv("TEST_CONTROL_TOKEN", raising=False)
    with pytest.raises(
        ConfigError, match=r"^control.token_env: the environment variable TEST_CONTROL_TOKEN is not set$"
    ):
        await start(ControlConfig(listen="127.0.0.1:0", token_env="TEST_CONTROL_TOKEN"))
    monkeypatch.setenv("TEST_CONTROL_TOKEN", "short")
    with pytest.raises(ConfigError) as error:
        await start(ControlConfig(listen="127.0.0.1:0", token_env="TEST_CONTROL_TOKEN"))
    assert str(error.value) == "control.token_env: the token must be at least 16 characters"
    assert "short" not in str(error.value)
    monkeypatch.setenv("TEST_CONTROL_TOKEN", TOKEN)
    await start(ControlConfig(listen="127.0.0.1:0", token_env="TEST_CONTROL_TOKEN"))


# -- tfshield admin ----------------------------------------------------------------------------------------


async def admin_main(
    control: Control, *argv: str, token: str | None = TOKEN, tmp_path: Path | None = None
) -> int:
    args = ["--control", control.address]
    if token is not None:
        assert tmp_path is not None
        (tmp_path / "admin-token").write_text(token + "\n")
        args += ["--token-file", str(tmp_path / "admin-token")]
    # The CLI is synchronous: run it off the loop that serves the control API.
    return await asyncio.to_thread(admin.main, [*args, *argv])


async def test_admin_lists_gets_and_resets_clients(control: Control, tmp_path: Path, capsys) -> None:
    assert await admin_main(control, "list-clients", "--limit", "2", tmp_path=tmp_path) == 0
    assert capsys.readouterr().out == "  RISK  CLIENT\n 0.910  key:aaaa\n 0.400  mtls:bob\n"
    assert await admin_main(control, "get-client", "key:aaaa", tmp_path=tmp_path) == 0
    assert capsys.readouterr().out == "client      key:aaaa\nrisk        0.910\n"
    assert await admin_main(control, "--json", "get-client", "key:aaaa", tmp_path=tmp_path) == 0
    assert json.loads(capsys.readouterr().out) == {"client_id": "key:aaaa", "risk": 0.91}
    assert await admin_main(control, "reset-client", "mtls:bob", tmp_path=tmp_path) == 0
    assert capsys.readouterr().out == "mtls:bob: state forgotten\n"


async def test_admin_gets_and_reloads_the_policy(control: Control, tmp_path: Path, capsys) -> None:
    assert await admin_main(control, "get-policy", tmp_path=tmp_path) == 0
    captured = capsys.readouterr()
    assert captured.out == OLD_POLICY and captured.err.startswith(f"# sha256 {control.holder.current.sha256}")
    new = tmp_path / "new.yaml"
    new.write_text("rules: [{name: via-admin, action: allow}]\n")
    assert await admin_main(control, "reload-policy", str(new), tmp_path=tmp_path) == 0
    assert capsys.readouterr().out == f"policy reloaded: sha256 {control.holder.current.sha256}\n"
    new.write_text("rules: [{name: x}]\n")
    assert await admin_main(control, "reload-policy", str(new), tmp_path=tmp_path) == 1
    assert capsys.readouterr().err == (
        "tfshield admin: INVALID_ARGUMENT: policy refused, the old one stays: "
        "rules.0.action: required key is missing\n"
    )
    assert "via-admin" in control.holder.current.text


async def test_admin_reports_a_missing_token_and_takes_it_from_the_environment(
    control: Control, capsys, monkeypatch
) -> None:
    monkeypatch.delenv(admin.TOKEN_ENV, raising=False)
    assert await admin_main(control, "get-policy", token=None) == 1
    assert capsys.readouterr().err.startswith("tfshield admin: UNAUTHENTICATED: the control API needs")
    monkeypatch.setenv(admin.TOKEN_ENV, TOKEN)
    assert await admin_main(control, "get-policy", token=None) == 0


async def test_admin_says_when_the_gateway_cannot_be_reached(tmp_path: Path, capsys) -> None:
    code = await asyncio.to_thread(admin.main, ["--control", "127.0.0.1:1", "--timeout", "2", "get-policy"])
    assert code == 1
    assert capsys.readouterr().err.startswith(
        "tfshield admin: UNAVAILABLE: cannot reach the control API at 127.0.0.1:1"
    )


def test_control_config_loads_from_yaml_data_and_names_bad_keys() -> None:
    config = _build(
        ControlConfig,
        {"listen": "127.0.0.1:8510", "tls": {"cert_file": "c", "key_file": "k", "client_ca_file": "ca"}},
        "control",
    )
    assert config.mtls and config.tls == ControlTlsConfig("c", "k", "ca")
    with pytest.raises(ConfigError) as error:
        _build(ControlConfig, {"listen": "127.0.0.1:8510", "token": "x"}, "control")
    assert (
        str(error.value) == "control.token: unknown key; known keys here: listen, tls, token_env, token_file"
    )

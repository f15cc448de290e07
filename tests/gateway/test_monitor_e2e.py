"""End to end: per-client monitors in real gateways, on the in-memory store and a real Redis.

The monitors are calibrated once per session against the real model server
(``tfshield calibrate``'s library path) on benign client sequences drawn from
the demo's calibration digits. An evasion-style client (many small
perturbations of one digit, as query-based attacks send) and a benign client
(distinct held-out digits) then query through the gateway; the control API
tells their risk.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from detectors.monitor_calibration import DEFAULT_MONITORS
from protos import control_pb2
from tests.gateway.conftest import PREDICT, start_gateway
from tests.procs import Proc

TOKEN = "monitor-test-token"
ENV = {"TFSHIELD_FINGERPRINT_SALT": "fingerprint-salt-for-tests", "TFSHIELD_ID_SALT": "id-salt-for-tests"}
FLAGGED = 0.5  # a client's risk is >= 0.5 iff some monitor flagged it (detectors/risk.py)


@pytest.fixture(scope="session")
def monitor_suite(model_server: Proc, reference: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gateway.model.calibrate import calibrate_monitor_suite

    return calibrate_monitor_suite(
        "mnist",
        reference,
        model_server.address(),
        tmp_path_factory.mktemp("monitors") / "suite",
        target_fpr=0.05,
        sequence_options={
            "n_random": 12,
            "n_heavy": 2,
            "n_resend": 6,
            "random_length": (50, 150),
            "heavy_length": (400, 600),
            "resend_length": (50, 150),
        },
        log=lambda line: None,
    )


def gateway_config(
    workdir: Path, suite: Path, store: dict[str, Any] | None = None, mode: str = "open"
) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "token").write_text(TOKEN + "\n")
    monitors: dict[str, Any] = {"models": [{"model": "mnist", "suite": str(suite)}], "failure_mode": mode}
    if store:
        monitors["store"] = store
    return {"monitors": monitors, "control": {"listen": "127.0.0.1:0", "token_file": str(workdir / "token")}}


def predict(proc: Proc, image: np.ndarray, api_key: str | None) -> grpc.StatusCode:
    """One query; returns its status (the policy may throttle or block a risky client)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(image[None].astype(np.float32)))
    metadata = (("x-api-key", api_key),) if api_key else ()
    with grpc.insecure_channel(proc.address()) as channel:
        try:
            channel.unary_unary(PREDICT)(request.SerializeToString(), metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def control(proc: Proc, method: str, request: Any, response_type: Any) -> Any:
    with grpc.insecure_channel(proc.address("control")) as channel:
        raw = channel.unary_unary(f"/tfshield.control.v1.Control/{method}")(
            request.SerializeToString(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10
        )
    return response_type.FromString(raw)


def risks(proc: Proc) -> dict[str, float]:
    listed = control(
        proc, "ListClients", control_pb2.ListClientsRequest(limit=100), control_pb2.ListClientsResponse
    )
    return {c.client_id: c.risk for c in listed.clients}


def key_client(risk_by_client: dict[str, float]) -> float:
    (risk,) = [r for c, r in risk_by_client.items() if c.startswith("key:")] or [0.0]
    return risk


def probing_queries(seed_image: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """What a query-based evasion attack sends: small perturbations around one image."""
    noise = rng.normal(0.0, 0.03, size=(n, *seed_image.shape)).astype(np.float32)
    return np.clip(seed_image[None] + noise, 0.0, 1.0)


def metric(proc: Proc, name: str, **labels: str) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{proc.port('metrics')}/metrics", timeout=5).read().decode()
    )
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_probing_client_is_flagged_and_benign_client_is_not(
    model_server: Proc,
    monitor_suite: Path,
    reference: Any,
    tmp_path: Path,
) -> None:
    proc = start_gateway(
        tmp_path, model_server.address(), config=gateway_config(tmp_path, monitor_suite), env=ENV
    )
    rng = np.random.default_rng(7)
    try:
        benign = reference.heldout[rng.permutation(len(reference.heldout))[:60]]
        benign_codes = {predict(proc, image, None) for image in benign}
        flagged_after = None
        attacker_codes = []
        for i, image in enumerate(probing_queries(reference.heldout[0], 60, rng), start=1):
            attacker_codes.append(predict(proc, image, "attacker-key"))
            if flagged_after is None and key_client(risks(proc)) >= FLAGGED:
                flagged_after = i
        by_client = risks(proc)
        assert benign_codes == {grpc.StatusCode.OK}
        assert flagged_after is not None and flagged_after <= 50, by_client
        # Once flagged, the default policy's ladder escalates against the prober (throttle, block).
        assert set(attacker_codes[flagged_after:]) & {
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.PERMISSION_DENIED,
        }
        assert by_client.get("peer:127.0.0.1", 0.0) < FLAGGED
        # GetClient says which monitors put the client where it is (max combination: the largest is its risk).
        (attacker,) = [c for c in by_client if c.startswith("key:")]
        state = control(
            proc, "GetClient", control_pb2.GetClientRequest(client_id=attacker), control_pb2.ClientState
        )
        assert set(state.monitor_risk) <= set(DEFAULT_MONITORS), state
        assert state.monitor_risk.get("rate_limit", 0.0) == 0.0  # volume is never risk
        assert max(state.monitor_risk.values()) == pytest.approx(state.risk, rel=1e-3)
        assert state.risk >= FLAGGED
        assert metric(proc, "tfshield_monitor_flags_total") > 0
        assert metric(proc, "tfshield_client_risk_count") >= 120
    finally:
        proc.stop()


def test_two_gateways_sharing_redis_see_one_client(
    model_server: Proc,
    monitor_suite: Path,
    reference: Any,
    redis_url: str,
    tmp_path: Path,
) -> None:
    store = {"backend": "redis", "url": redis_url, "timeout_s": 1.0}
    a = start_gateway(
        tmp_path / "a", model_server.address(), "a", gateway_config(tmp_path / "a", monitor_suite, store), ENV
    )
    b = start_gateway(
        tmp_path / "b", model_server.address(), "b", gateway_config(tmp_path / "b", monitor_suite, store), ENV
    )
    rng = np.random.default_rng(11)
    try:
        for i, image in enumerate(probing_queries(reference.heldout[1], 60, rng)):
            predict(a if i % 2 == 0 else b, image, "alternating-attacker")
        seen_by_a, seen_by_b = risks(a), risks(b)
        # One store: one view of every client (read moments apart, while risk decays).
        assert seen_by_a.keys() == seen_by_b.keys()
        assert seen_by_a == pytest.approx(seen_by_b, abs=1e-3)
        assert key_client(seen_by_a) >= FLAGGED
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_unreachable_redis_follows_the_failure_mode(
    model_server: Proc,
    monitor_suite: Path,
    reference: Any,
    tmp_path: Path,
    mode: str,
) -> None:
    store = {"backend": "redis", "url": f"unix://{tmp_path}/no-redis.sock", "timeout_s": 0.05}
    proc = start_gateway(
        tmp_path, model_server.address(), config=gateway_config(tmp_path, monitor_suite, store, mode), env=ENV
    )
    try:
        code = predict(proc, reference.heldout[2], None)
        # Open: served, unmonitored. Closed: refused.
        assert code == (grpc.StatusCode.OK if mode == "open" else grpc.StatusCode.UNAVAILABLE)
        assert metric(proc, "tfshield_monitor_failures_total", mode=mode) >= 1
        assert metric(proc, "tfshield_store_errors_total", backend="redis") >= 1
    finally:
        proc.stop()

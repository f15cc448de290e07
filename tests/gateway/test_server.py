"""End to end: stock TF Serving clients through the gateway to the reference model server.

The gateway must be invisible on the allow path: the same response bytes,
status codes, messages, metadata and deadlines as talking to the model server
directly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tests.gateway.conftest import PREDICT, raw_unary, start_gateway
from tests.procs import REPO, Proc

SERVICE = "/tensorflow.serving.PredictionService/"


def predict_request(model: str, inputs: dict[str, np.ndarray], **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    return request


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def example_input(n: int) -> input_pb2.Input:
    examples = [
        tf.train.Example(
            features=tf.train.Features(
                feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=[i, 1.0, 2.0, 3.0]))}
            )
        )
        for i in range(n)
    ]
    return input_pb2.Input(example_list=input_pb2.ExampleList(examples=examples))


def metrics_samples(proc: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{proc.port('metrics')}/metrics", timeout=5).read().decode()
    )
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests_total(proc: Proc, model: str, method: str, code: str) -> float:
    key = ("tfshield_requests_total", (("code", code), ("method", method), ("model", model)))
    return metrics_samples(proc).get(key, 0.0)


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def wait_for_health(address: str, status: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    current = health_status(address)
    while current != status and time.monotonic() < deadline:
        time.sleep(0.05)
        current = health_status(address)
    return current


# -- byte-identical pass-through ------------------------------------------------

CASES = {
    "Predict": lambda: predict_request("mnist", {"images": digits(2)}),
    "Classify": lambda: classification_pb2.ClassificationRequest(
        model_spec={"name": "classifier", "signature_name": "classify"}, input=example_input(3)
    ),
    "Regress": lambda: regression_pb2.RegressionRequest(
        model_spec={"name": "classifier", "signature_name": "regress"}, input=example_input(3)
    ),
    "MultiInference": lambda: inference_pb2.MultiInferenceRequest(
        tasks=[
            inference_pb2.InferenceTask(
                model_spec={"name": "classifier", "signature_name": "classify"},
                method_name="tensorflow/serving/classify",
            ),
            inference_pb2.InferenceTask(
                model_spec={"name": "classifier", "signature_name": "regress"},
                method_name="tensorflow/serving/regress",
            ),
        ],
        input=example_input(2),
    ),
    "GetModelMetadata": lambda: get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": "mnist"}, metadata_field=["signature_def"]
    ),
}


@pytest.mark.parametrize("method", list(CASES))
def test_responses_are_byte_identical_to_direct(method, gateway: Proc, model_server: Proc) -> None:
    raw = CASES[method]().SerializeToString()
    direct, _ = raw_unary(model_server.address(), SERVICE + method, raw, timeout=30)
    through, _ = raw_unary(gateway.address(), SERVICE + method, raw, timeout=30)
    assert len(through) > 0
    assert through == direct


def test_stock_stub_predicts_through_the_gateway(gateway_channel: grpc.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(gateway_channel)
    response = stub.Predict(predict_request("mnist", {"images": digits(4)}), timeout=30)
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert response.model_spec.name == "mnist" and response.model_spec.version.value >= 1


def test_model_status_passes_through(gateway_channel: grpc.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(gateway_channel)
    response = stub.GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"}), timeout=30
    )
    assert response.model_version_status[0].state == response.model_version_status[0].AVAILABLE


# -- errors, metadata, deadlines ------------------------------------------------


def test_unknown_model_gives_the_upstreams_not_found(gateway: Proc, model_server: Proc) -> None:
    request = predict_request("no-such-model", {"images": digits(1)})
    errors = []
    for address in (model_server.address(), gateway.address()):
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        errors.append((caught.value.code(), caught.value.details()))
    assert errors[0][0] == grpc.StatusCode.NOT_FOUND
    assert errors[1] == errors[0]


def test_custom_metadata_reaches_the_upstream(gateway: Proc) -> None:
    raw = predict_request("echo", {"x": np.ones((1, 3), np.float32)}).SerializeToString()
    _, call = raw_unary(gateway.address(), PREDICT, raw, metadata=(("x-echo-trace", "abc-123"),), timeout=30)
    assert ("x-tfshield-echo-trace", "abc-123") in tuple(call.trailing_metadata())


def test_client_deadline_reaches_the_upstream(gateway: Proc) -> None:
    raw = predict_request("echo", {"x": np.ones((1, 3), np.float32)}).SerializeToString()
    _, call = raw_unary(gateway.address(), PREDICT, raw, metadata=(("x-echo-deadline", "1"),), timeout=5.0)
    seen = dict(tuple(call.trailing_metadata()))
    remaining_ms = float(seen["x-tfshield-deadline-ms"])
    # grpc-timeout is sent in coarse units, rounded up: allow a little over 5 s.
    assert 3000 < remaining_ms <= 5100
    _, call = raw_unary(gateway.address(), PREDICT, raw, metadata=(("x-echo-deadline", "1"),))
    assert "x-tfshield-deadline-ms" not in dict(tuple(call.trailing_metadata()))


def test_upstream_slower_than_the_deadline_gives_deadline_exceeded(gateway: Proc) -> None:
    raw = predict_request("echo", {"x": np.ones((1, 3), np.float32)}).SerializeToString()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        raw_unary(gateway.address(), PREDICT, raw, metadata=(("x-sleep-ms", "3000"),), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5


def test_a_32_mib_request_passes(gateway: Proc) -> None:
    array = np.arange(8 * 1024 * 1024, dtype=np.float32).reshape(1024, 8192)  # 32 MiB of float32
    raw = predict_request("echo", {"x": array}).SerializeToString()
    assert len(raw) > 32 * 1024 * 1024
    response, _ = raw_unary(gateway.address(), PREDICT, raw, timeout=120)
    out = predict_pb2.PredictResponse.FromString(response).outputs["y"]
    assert tf.make_ndarray(out)[1023, 8191] == array[1023, 8191]


def test_malformed_tensor_is_refused_naming_the_input_and_counted(gateway: Proc) -> None:
    request = predict_request("echo", {"x": np.ones((2, 3), np.float32)})
    request.inputs["x"].tensor_content = request.inputs["x"].tensor_content[:-4]
    before = metrics_samples(gateway).get(
        ("tfshield_invalid_requests_total", (("method", "Predict"), ("reason", "malformed"))), 0.0
    )
    with pytest.raises(grpc.RpcError) as caught:
        raw_unary(gateway.address(), PREDICT, request.SerializeToString(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("input 'x': ")
    after = metrics_samples(gateway)[
        ("tfshield_invalid_requests_total", (("method", "Predict"), ("reason", "malformed")))
    ]
    assert after == before + 1


def test_reload_config_is_refused_by_default(gateway_channel: grpc.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(gateway_channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allow_reload_config: true" in caught.value.details()


def test_reload_config_reaches_the_upstream_when_allowed(model_server: Proc, tmp_path) -> None:
    proc = start_gateway(tmp_path, model_server.address(), config={"allow_reload_config": True})
    try:
        with grpc.insecure_channel(proc.address()) as channel, pytest.raises(grpc.RpcError) as caught:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(), timeout=30
            )
        # The reference server does not implement reloads: its answer proves the call went through.
        assert caught.value.code() != grpc.StatusCode.PERMISSION_DENIED
    finally:
        proc.stop()


# -- metrics --------------------------------------------------------------------


def test_requests_are_counted_by_model_method_and_code(gateway: Proc) -> None:
    raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    before = requests_total(gateway, "echo", "Predict", "OK")
    for _ in range(3):
        raw_unary(gateway.address(), PREDICT, raw, timeout=30)
    assert requests_total(gateway, "echo", "Predict", "OK") == before + 3
    samples = metrics_samples(gateway)
    assert samples[("tfshield_request_duration_seconds_count", (("method", "Predict"),))] >= 3
    assert samples[("tfshield_upstream_up", ())] == 1.0
    assert not any("client" in dict(labels) for _, labels in samples)


def test_made_up_model_names_cannot_grow_the_label_set(model_server: Proc, tmp_path) -> None:
    proc = start_gateway(tmp_path, model_server.address(), config={"metrics": {"max_model_labels": 2}})
    try:
        for i in range(5):
            raw = predict_request(f"made-up-{i}", {"x": np.ones((1, 1), np.float32)}).SerializeToString()
            with pytest.raises(grpc.RpcError):
                raw_unary(proc.address(), PREDICT, raw, timeout=30)
        models = {
            dict(labels)["model"]
            for name, labels in metrics_samples(proc)
            if name == "tfshield_requests_total"
        }
        assert models == {"made-up-0", "made-up-1", "_other"}
    finally:
        proc.stop()


# -- upstream health ------------------------------------------------------------


def test_health_is_serving_while_the_upstream_is_up(gateway: Proc) -> None:
    assert (
        wait_for_health(gateway.address(), health_pb2.HealthCheckResponse.SERVING)
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert (
        health_status(gateway.address(), "tensorflow.serving.PredictionService")
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_unknown_health_service_is_not_found(gateway: Proc) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        health_status(gateway.address(), "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_upstream_down_gives_unavailable_and_not_serving(spare_model_server, tmp_path) -> None:
    upstream = spare_model_server(tmp_path / "upstream")
    proc = start_gateway(tmp_path / "gw", upstream.address())
    try:
        SERVING, NOT_SERVING = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert wait_for_health(proc.address(), SERVING) == SERVING
        upstream.stop()
        assert wait_for_health(proc.address(), NOT_SERVING) == NOT_SERVING
        raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
        with pytest.raises(grpc.RpcError) as caught:
            raw_unary(proc.address(), PREDICT, raw, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert metrics_samples(proc)[("tfshield_upstream_up", ())] == 0.0
    finally:
        proc.stop()
        upstream.stop()


# -- shutdown -------------------------------------------------------------------


def test_sigterm_drains_in_flight_calls(model_server: Proc, tmp_path) -> None:
    proc = start_gateway(tmp_path, model_server.address(), config={"shutdown_grace_s": 10.0})
    raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    outcome: dict[str, object] = {}

    def slow_call() -> None:
        try:
            response, _ = raw_unary(
                proc.address(), PREDICT, raw, metadata=(("x-sleep-ms", "1500"),), timeout=20
            )
            outcome["response"] = response
        except grpc.RpcError as exc:
            outcome["error"] = exc.code()

    try:
        worker = threading.Thread(target=slow_call)
        worker.start()
        time.sleep(0.5)  # the call is now in flight, sleeping upstream
        proc.signal(signal.SIGTERM)
        worker.join(20)
        assert "response" in outcome, outcome
        assert proc.wait(15) == 0
    finally:
        proc.stop()


def test_in_flight_gauge_counts_calls_being_handled(model_server: Proc, tmp_path) -> None:
    proc = start_gateway(tmp_path, model_server.address())
    raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    gauge = ("tfshield_in_flight_requests", ())
    try:
        assert metrics_samples(proc)[gauge] == 0.0
        worker = threading.Thread(
            target=raw_unary,
            args=(proc.address(), PREDICT, raw),
            kwargs={"metadata": (("x-sleep-ms", "1500"),), "timeout": 20},
        )
        worker.start()
        deadline = time.monotonic() + 1.2
        seen = 0.0
        while time.monotonic() < deadline and seen == 0.0:
            seen = metrics_samples(proc)[gauge]
            time.sleep(0.05)
        worker.join(20)
        assert seen == 1.0
        assert metrics_samples(proc)[gauge] == 0.0
    finally:
        proc.stop()


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_event_loop_is_the_configured_one(model_server: Proc, tmp_path, choice: str) -> None:
    if choice == "uvloop":
        pytest.importorskip("uvloop")
    proc = start_gateway(tmp_path, model_server.address(), config={"event_loop": choice})
    try:
        assert proc.info["event_loop"] == choice
        raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
        direct, _ = raw_unary(model_server.address(), PREDICT, raw, timeout=30)
        through, _ = raw_unary(proc.address(), PREDICT, raw, timeout=30)
        assert through == direct
    finally:
        proc.stop()


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch) -> None:
    from gateway.errors import ConfigError
    from gateway.server import event_loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: importing it raises
    factory, name = event_loop_factory("auto")
    assert name == "asyncio"
    loop = factory()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
    refused = r"event_loop: uvloop is not installed \(pip install 'tfshield\[fast\]'\)"
    with pytest.raises(ConfigError, match=refused):
        event_loop_factory("uvloop")


def test_event_loop_auto_uses_uvloop_when_installed(gateway: Proc) -> None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        expected = "asyncio"
    else:
        expected = "uvloop"
    assert gateway.info["event_loop"] == expected


# -- TLS ------------------------------------------------------------------------


def test_mtls_accepts_a_client_certificate_and_refuses_none(model_server: Proc, tmp_path) -> None:
    from tests.certs import TestCA

    ca = TestCA(tmp_path)
    server = ca.server()
    client = ca.client("client-a", "client-a")
    config = {
        "tls": {
            "cert_file": str(server.cert),
            "key_file": str(server.key),
            "client_ca_file": str(ca.files.cert),
        },
        # Served only if the gateway reads the client's identity from its certificate.
        "identity": {"order": ["mtls"], "anonymous": "refuse"},
    }
    proc = start_gateway(tmp_path, model_server.address(), config=config)
    root = ca.files.cert.read_bytes()
    raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    try:
        with_cert = grpc.ssl_channel_credentials(root, client.key.read_bytes(), client.cert.read_bytes())
        with grpc.secure_channel(f"localhost:{proc.port()}", with_cert) as channel:
            response = channel.unary_unary(PREDICT)(raw, timeout=30)
        assert list(predict_pb2.PredictResponse.FromString(response).outputs) == ["y"]
        without_cert = grpc.ssl_channel_credentials(root)
        with (
            grpc.secure_channel(f"localhost:{proc.port()}", without_cert) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            channel.unary_unary(PREDICT)(raw, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop()


# -- no TensorFlow in the gateway -----------------------------------------------


def test_the_gateway_process_never_imports_tensorflow(model_server: Proc) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        import grpc
        from gateway.config import config_from_dict
        from gateway.server import create_server
        from protos import predict_pb2

        async def main():
            config = config_from_dict({{"listen": "127.0.0.1:0", "metrics": {{"listen": "127.0.0.1:0"}},
                                        "upstream": {{"target": "{model_server.address()}"}}}})
            gateway, port = await create_server(config)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "echo"
            request.inputs["x"].dtype = 1
            request.inputs["x"].tensor_shape.dim.add().size = 1
            request.inputs["x"].float_val.append(1.0)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
                await channel.unary_unary("{PREDICT}")(request.SerializeToString(), timeout=30)
            await gateway.stop(0)
            tf_roots = ("tensorflow", "keras", "tensorflow_serving")
            print(sorted(m for m in sys.modules if m.split(".")[0] in tf_roots), flush=True)
            # This test is about what got imported; a clean exit is the SIGTERM test's business.
            os._exit(0)

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_anonymous_callers_are_refused_when_configured(model_server: Proc, tmp_path) -> None:
    proc = start_gateway(
        tmp_path, model_server.address(), config={"identity": {"order": ["metadata"], "anonymous": "refuse"}}
    )
    raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            raw_unary(proc.address(), PREDICT, raw, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "present a client certificate or an API key" in caught.value.details()
        response, _ = raw_unary(proc.address(), PREDICT, raw, metadata=(("x-api-key", "k"),), timeout=30)
        assert predict_pb2.PredictResponse.FromString(response).outputs["y"]
    finally:
        proc.stop()


def test_tls_to_the_upstream(model_server: Proc, tmp_path) -> None:
    """Gateway A speaks TLS (with a client certificate) to gateway B, whose listener needs mTLS."""
    from tests.certs import TestCA

    ca = TestCA(tmp_path)
    server = ca.server("upstream")
    client = ca.client("gateway-a", "gateway-a")
    b = start_gateway(
        tmp_path / "b",
        model_server.address(),
        "b",
        {
            "tls": {
                "cert_file": str(server.cert),
                "key_file": str(server.key),
                "client_ca_file": str(ca.files.cert),
            }
        },
    )
    upstream_tls = {
        "ca_file": str(ca.files.cert),
        "cert_file": str(client.cert),
        "key_file": str(client.key),
        "server_name": "localhost",
    }
    a = start_gateway(
        tmp_path / "a", b.address(), "a", {"upstream": {"target": b.address(), "tls": upstream_tls}}
    )
    raw = predict_request("echo", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    try:
        direct, _ = raw_unary(model_server.address(), PREDICT, raw, timeout=30)
        through, _ = raw_unary(a.address(), PREDICT, raw, timeout=30)
        assert through == direct
    finally:
        a.stop()
        b.stop()

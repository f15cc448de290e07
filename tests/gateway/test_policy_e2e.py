"""End to end: the policy decides in a real gateway in front of the real model server.

Clients are told apart by identity: callers with an API key are ``key:<hash>``,
callers without one ``peer:127.0.0.1``, so one policy can treat them differently.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from gateway.model.data import split_mnist
from tests.gateway.conftest import PREDICT, raw_unary, start_gateway
from tests.procs import REPO, Proc

POLICY = """
version: 1
client_groups:
  keyed: {prefix: ["key:"]}
outputs:
  mnist:
    - {name: probabilities, kind: probabilities}
rules:
  - {name: keyed-deceived, match: {models: [mnist], groups: [keyed]}, action: deceive}
  - {name: keyed-echo-blocked, match: {models: [echo], groups: [keyed]}, action: block}
  - {name: everyone-label-only, match: {models: [mnist]}, action: perturb, level: 3}
"""


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return split_mnist(seed=0).x_test[:64]


@pytest.fixture(scope="module")
def policy_gateway(model_server: Proc, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("policy-gateway")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    token = workdir / "token"
    token.write_text("s3cret-admin-token\n")
    proc = start_gateway(
        workdir,
        model_server.address(),
        config={
            "policy": {"file": str(policy)},
            "audit": {"file": str(workdir / "audit.jsonl")},
            "control": {"listen": "127.0.0.1:0", "token_file": str(token)},
        },
        env={"TFSHIELD_DECEIVE_KEY": "k" * 32, "TFSHIELD_ID_SALT": "salt-for-tests"},
    )
    yield proc, workdir
    proc.stop()


def probabilities(address: str, images: np.ndarray, metadata=()) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    raw, _ = raw_unary(address, PREDICT, request.SerializeToString(), metadata=metadata, timeout=30)
    return tf.make_ndarray(predict_pb2.PredictResponse.FromString(raw).outputs["probabilities"])


def test_perturbation_keeps_every_top1_class(policy_gateway, model_server: Proc, digits) -> None:
    proc, _ = policy_gateway
    direct = probabilities(model_server.address(), digits)
    through = probabilities(proc.address(), digits)
    np.testing.assert_array_equal(through.argmax(axis=1), direct.argmax(axis=1))
    # Level 3 is label-only: one-hot rows, unlike the model's own probabilities.
    assert set(np.unique(through)) <= {0.0, 1.0}
    assert not set(np.unique(direct)) <= {0.0, 1.0}


def test_deceived_client_gets_consistent_wrong_answers(policy_gateway, model_server: Proc, digits) -> None:
    proc, _ = policy_gateway
    key = (("x-api-key", "thief-key"),)
    direct = probabilities(model_server.address(), digits).argmax(axis=1)
    first = probabilities(proc.address(), digits, key)
    second = probabilities(proc.address(), digits, key)
    np.testing.assert_array_equal(first, second)
    assert (first.argmax(axis=1) != direct).mean() > 0.9
    np.testing.assert_allclose(first.sum(axis=1), 1.0, rtol=1e-5)


def test_block_rule_refuses_naming_the_rule_and_is_audited(policy_gateway) -> None:
    proc, workdir = policy_gateway
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "echo"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 2), np.float32)))
    with pytest.raises(grpc.RpcError) as caught:
        raw_unary(
            proc.address(), PREDICT, request.SerializeToString(), metadata=(("x-api-key", "k2"),), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "request refused by rule 'keyed-echo-blocked'"
    deadline = time.monotonic() + 5
    lines: list[dict] = []
    while time.monotonic() < deadline and not any(line["action"] == "block" for line in lines):
        lines = [json.loads(line) for line in (workdir / "audit.jsonl").read_text().splitlines()]
        time.sleep(0.05)
    blocked = [line for line in lines if line["action"] == "block"]
    assert blocked and blocked[-1]["rule"] == "keyed-echo-blocked"
    assert "k2" not in (workdir / "audit.jsonl").read_text()


def admin(proc: Proc, workdir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "admin",
            "--control",
            proc.address("control"),
            "--token-file",
            str(workdir / "token"),
            "--json",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_control_api_serves_the_policy_in_force_and_sighup_reloads(policy_gateway) -> None:
    proc, workdir = policy_gateway
    result = admin(proc, workdir, "get-policy")
    assert result.returncode == 0, result.stderr
    assert "keyed-deceived" in json.loads(result.stdout)["yaml"]
    (workdir / "policy.yaml").write_text(POLICY.replace("keyed-deceived", "keyed-deceived-v2"))
    proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline
        and "keyed-deceived-v2" not in json.loads(admin(proc, workdir, "get-policy").stdout)["yaml"]
    ):
        time.sleep(0.1)
    assert "keyed-deceived-v2" in json.loads(admin(proc, workdir, "get-policy").stdout)["yaml"]
    (workdir / "policy.yaml").write_text(POLICY)


def test_control_api_refuses_a_wrong_token(policy_gateway) -> None:
    proc, workdir = policy_gateway
    (workdir / "bad-token").write_text("wrong\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "admin",
            "--control",
            proc.address("control"),
            "--token-file",
            str(workdir / "bad-token"),
            "get-policy",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "UNAUTHENTICATED" in result.stderr + result.stdout

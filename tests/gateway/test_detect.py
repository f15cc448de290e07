"""End to end: the detect stage with real calibrated artefacts, a real gateway and the real
reference model server serving the demo model and the trained autoencoder.

Clients use the stock TF Serving stub. What the upstream received is counted at the
model server (``gateway.model.testhooks.read_counts``); what the gateway decided is read
from its status codes and its Prometheus metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf

from detectors.manifest import load_artefacts
from gateway.model.testhooks import read_counts
from tests.gateway.conftest import start_gateway
from tests.gateway.detect_fixtures import *  # noqa: F403  (the session fixtures)
from tests.gateway.detect_fixtures import (
    MODEL,
    artefacts_with,
    detection_config,
    flags_total,
    metrics_samples,
    predict,
)
from tests.procs import Proc

DETECTORS_WITH_SCORES = ("mahalanobis", "feature_squeezing", "autoencoder", "margin", "magnet_jsd")


def upstream_predicts(model_server: Proc) -> int:
    with grpc.insecure_channel(model_server.address()) as channel:
        return read_counts(channel)["Predict"]


def noise(n: int, seed: int = 0) -> np.ndarray:
    """Uniform noise in [0, 1]: inside the valid range, far from any digit."""
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def assert_same_outputs(through: Any, direct: Any, rows: int, same_labels: bool = False) -> None:
    """The client's answer through a model-in-the-loop gateway is the model's own, to float32 round-off."""
    assert sorted(through.outputs) == sorted(direct.outputs) == ["logits", "probabilities"]
    for key in direct.outputs:
        mine, theirs = tf.make_ndarray(through.outputs[key]), tf.make_ndarray(direct.outputs[key])
        assert mine.shape == theirs.shape == (rows, 10)
        assert through.outputs[key].dtype == direct.outputs[key].dtype
        if same_labels:
            assert np.array_equal(mine.argmax(axis=1), theirs.argmax(axis=1))
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def score_count(samples: dict, detector: str) -> float:
    return samples.get(("tfshield_detector_score_count", (("detector", detector), ("model", MODEL))), 0.0)


def single_detector_gateway(name: str, calibration, detect_model_server, tmp_path_factory) -> Iterator[Proc]:
    """A gateway whose only detector is ``name``, for a module fixture."""
    workdir = tmp_path_factory.mktemp(f"{name}-gateway")
    artefacts = artefacts_with(workdir / "artefacts", calibration, (name,))
    proc = start_gateway(workdir, detect_model_server.address(), config=detection_config(artefacts))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def squeeze_gateway(calibration, detect_model_server, tmp_path_factory) -> Iterator[Proc]:
    """Feature squeezing only (so the upstream sees only its call)."""
    yield from single_detector_gateway(
        "feature_squeezing", calibration, detect_model_server, tmp_path_factory
    )


# -- input validation -----------------------------------------------------------------


def test_nan_input_is_refused_invalid_argument_naming_the_input(
    detect_gateway, detect_model_server, reference
):
    x = reference.heldout[:3].copy()
    x[1, 5, 5, 0] = np.nan
    before = upstream_predicts(detect_model_server)
    with pytest.raises(grpc.RpcError) as raised:
        predict(detect_gateway.address(), x)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "input 'images': sample 1 holds NaN or Inf; send finite values"
    assert upstream_predicts(detect_model_server) == before


def test_values_outside_the_calibrated_range_are_refused_naming_the_input(detect_gateway, reference):
    x = reference.heldout[:2].copy()
    x[0, 0, 0, 0] = 2.0
    with pytest.raises(grpc.RpcError) as raised:
        predict(detect_gateway.address(), x)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "input 'images': sample 0 has values outside the accepted range [0, 1]"


# -- feature squeezing in the client's own call ------------------------------------------------


def test_feature_squeezing_makes_one_upstream_call_and_returns_only_the_clients_rows(
    squeeze_gateway, detect_model_server, reference
):
    x = reference.heldout[:5]
    before = upstream_predicts(detect_model_server)
    through = predict(squeeze_gateway.address(), x)
    assert upstream_predicts(detect_model_server) == before + 1
    direct = predict(detect_model_server.address(), x)
    assert_same_outputs(through, direct, rows=5, same_labels=True)


def test_an_output_filter_gets_only_the_outputs_the_client_asked_for(squeeze_gateway, reference):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(reference.heldout[:2]))
    request.output_filter.append("logits")
    with grpc.insecure_channel(squeeze_gateway.address()) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert list(response.outputs) == ["logits"]
    assert tf.make_ndarray(response.outputs["logits"]).shape == (2, 10)


@pytest.fixture(scope="module")
def margin_gateway(calibration, detect_model_server, tmp_path_factory) -> Iterator[Proc]:
    """The margin detector only (it reads the forwarded response)."""
    yield from single_detector_gateway("margin", calibration, detect_model_server, tmp_path_factory)


def test_margin_scores_the_forwarded_answer_and_passes_it_on_byte_for_byte(
    margin_gateway, detect_model_server, calibration, reference, upstream_predictor
):
    from tensorflow_serving.apis import predict_pb2

    from tests.gateway.conftest import raw_unary

    # Two digits and a blend of two others at the point where the model's label flips (bisection).
    a = reference.heldout[300]
    label = upstream_predictor("", a[None]).argmax()
    others = upstream_predictor("", reference.heldout[301:320]).argmax(axis=1)
    b = reference.heldout[301 + int(np.argmax(others != label))]
    assert upstream_predictor("", b[None]).argmax() != label
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if upstream_predictor("", ((1 - mid) * a + mid * b)[None].astype(np.float32)).argmax() == label:
            lo = mid
        else:
            hi = mid
    edge = ((1 - lo) * a + lo * b).astype(np.float32)
    x = np.stack([reference.heldout[302], reference.heldout[303], edge])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
    path = "/tensorflow.serving.PredictionService/Predict"
    before = upstream_predicts(detect_model_server)
    samples_before = metrics_samples(margin_gateway)
    through, _ = raw_unary(margin_gateway.address(), path, request.SerializeToString(), timeout=30)
    direct, _ = raw_unary(detect_model_server.address(), path, request.SerializeToString(), timeout=30)
    assert through == direct
    assert upstream_predicts(detect_model_server) == before + 2  # the gateway's call, then ours
    after = metrics_samples(margin_gateway)
    assert score_count(after, "margin") - score_count(samples_before, "margin") == 3
    offline = calibration.detectors["margin"].detect(x, upstream_predictor).flagged
    assert offline[2], "a blend at the label flip must be flagged"
    assert flags_total(after, "margin") - flags_total(samples_before, "margin") == int(offline.sum())


def test_margin_with_an_output_filter_reads_its_output_and_removes_it_again(margin_gateway, reference):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(reference.heldout[:2]))
    request.output_filter.append("logits")
    before = metrics_samples(margin_gateway)
    with grpc.insecure_channel(margin_gateway.address()) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert list(response.outputs) == ["logits"]
    assert score_count(metrics_samples(margin_gateway), "margin") - score_count(before, "margin") == 2


def test_every_detector_costs_one_model_call_and_one_autoencoder_call(
    detect_gateway, detect_model_server, reference
):
    before = upstream_predicts(detect_model_server)
    response = predict(detect_gateway.address(), reference.heldout[:4])
    assert upstream_predicts(detect_model_server) == before + 2
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (4, 10)


@pytest.fixture(scope="module")
def divergence_gateway(calibration, detect_model_server, tmp_path_factory) -> Iterator[Proc]:
    """MagNet's divergence only: the autoencoder call, then AE(x) in the client's own model call."""
    yield from single_detector_gateway("magnet_jsd", calibration, detect_model_server, tmp_path_factory)


def test_magnet_jsd_sends_the_reconstructions_in_the_clients_call_and_returns_only_its_rows(
    divergence_gateway, detect_model_server, calibration, reference, upstream_predictor
):
    x = np.concatenate([reference.heldout[:3], noise(2, seed=4)])
    before, samples_before = upstream_predicts(detect_model_server), metrics_samples(divergence_gateway)
    through = predict(divergence_gateway.address(), x)
    assert upstream_predicts(detect_model_server) == before + 2  # the autoencoder, then the model once
    direct = predict(detect_model_server.address(), x)
    assert_same_outputs(through, direct, rows=5)
    after = metrics_samples(divergence_gateway)
    assert score_count(after, "magnet_jsd") - score_count(samples_before, "magnet_jsd") == 5
    detector = calibration.detectors["magnet_jsd"]
    offline = detector.detect(x, upstream_predictor)
    assert flags_total(after, "magnet_jsd") - flags_total(samples_before, "magnet_jsd") == int(
        offline.flagged.sum()
    )
    # The scores themselves (observed in units of the threshold) are the offline ones.
    key = ("tfshield_detector_score_sum", (("detector", "magnet_jsd"), ("model", MODEL)))
    observed = after[key] - samples_before.get(key, 0.0)
    assert observed == pytest.approx(float((offline.scores / detector.threshold_).sum()), rel=1e-3)
    assert observed > 0


def fused_artefacts(
    calibration, reference, upstream_predictor, folder: Path, alone: tuple[str, ...] = ()
) -> tuple[Path, Any]:
    """The session's detectors plus a Fisher fusion of every one but validation, at 10 % target FPR."""
    import dataclasses

    from detectors.base import Detector
    from detectors.fusion import FisherFusion
    from detectors.manifest import write_artefacts

    names = calibration.manifest.detectors
    members = [n for n in names if n != "validation"]
    benign = {n: calibration.detectors[n].score(reference.calibration, upstream_predictor) for n in members}
    fusion = FisherFusion(members, alone).fit(benign).calibrate(0.10)
    manifest = dataclasses.replace(calibration.manifest, fusion=fusion.name)
    detectors = {n: Detector.load(calibration.out / n) for n in names}
    return write_artefacts(folder, manifest, detectors, fusion), fusion


@pytest.fixture(scope="module")
def fused(calibration, reference, upstream_predictor, tmp_path_factory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("fused") / "artefacts"
    return fused_artefacts(calibration, reference, upstream_predictor, folder)


@pytest.fixture(scope="module")
def fused_with_margin_alone(calibration, reference, upstream_predictor, tmp_path_factory) -> tuple[Path, Any]:
    """Fisher at 5 % OR margin's own p-value at 5 %."""
    folder = tmp_path_factory.mktemp("fused-alone") / "artefacts"
    return fused_artefacts(calibration, reference, upstream_predictor, folder, alone=("margin",))


@pytest.fixture(scope="module")
def fusion_gateway(fused, detect_model_server, tmp_path_factory) -> Iterator[Proc]:
    proc = start_gateway(
        tmp_path_factory.mktemp("fusion-gateway"),
        detect_model_server.address(),
        config=detection_config(fused[0]),
    )
    yield proc
    proc.stop()


def test_the_fusion_flags_each_digit_as_the_offline_fusion_does(
    fusion_gateway, fused, calibration, reference, upstream_predictor
):
    _, fusion = fused
    x = np.concatenate([reference.heldout[220:232], noise(2, seed=5)])
    offline = fusion.flagged(
        fusion.score({n: calibration.detectors[n].score(x, upstream_predictor) for n in fusion.members})
    )
    assert offline[-2:].all() and not offline[:12].all()
    before = metrics_samples(fusion_gateway)
    for i in range(len(x)):
        predict(fusion_gateway.address(), x[i : i + 1])
        after = metrics_samples(fusion_gateway)
        assert flags_total(after, "fisher") - flags_total(before, "fisher") == int(offline[i]), i
        before = after


def test_a_digit_only_margin_finds_extreme_is_flagged_by_the_fusion_with_margin_alone(
    fused_with_margin_alone, detect_model_server, calibration, reference, upstream_predictor, tmp_path_factory
):
    folder, fusion = fused_with_margin_alone
    x = reference.heldout
    parts = fusion.part_scores(
        {n: calibration.detectors[n].score(x, upstream_predictor) for n in fusion.members}
    )
    by_fisher = parts["fisher"] > fusion.part_thresholds_["fisher"]
    by_margin = parts["margin"] > fusion.part_thresholds_["margin"]
    margin_only = np.flatnonzero(by_margin & ~by_fisher)[:3]
    neither = np.flatnonzero(~by_margin & ~by_fisher)[:3]
    assert len(margin_only) > 0  # held-out digits near the decision boundary, unremarkable to Fisher
    proc = start_gateway(
        tmp_path_factory.mktemp("fusion-alone-gateway"),
        detect_model_server.address(),
        config=detection_config(folder),
    )
    try:
        before = metrics_samples(proc)
        for i in [*margin_only, *neither]:
            predict(proc.address(), x[i : i + 1])
            after = metrics_samples(proc)
            assert flags_total(after, "fisher") - flags_total(before, "fisher") == int(i in margin_only), i
            before = after
    finally:
        proc.stop()


def test_a_blocking_fusion_refuses_naming_its_rule(fused, detect_model_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fusion-block")
    config = detection_config(fused[0], fisher="block")
    proc = start_gateway(workdir, detect_model_server.address(), config=config)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            predict(proc.address(), noise(1, seed=6))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == "request refused by rule 'detector:fisher'"
    finally:
        proc.stop()


# -- verdicts and metrics ------------------------------------------------------------------------


def test_gateway_flags_each_digit_as_the_offline_detectors_do(
    detect_gateway, calibration, reference, upstream_predictor
):
    """One digit per call: the increase of each detector's flag counter is that digit's verdict."""
    _, detectors = load_artefacts(calibration.out)
    x = np.concatenate([reference.heldout[200:215], noise(5, seed=1)])
    before = metrics_samples(detect_gateway)
    for i in range(len(x)):
        predict(detect_gateway.address(), x[i : i + 1])
        after = metrics_samples(detect_gateway)
        for name in DETECTORS_WITH_SCORES:
            offline = bool(detectors[name].detect(x[i : i + 1], upstream_predictor).flagged[0])
            assert flags_total(after, name) - flags_total(before, name) == int(offline), (name, i)
        before = after


def test_detector_metrics_count_each_scored_sample_once(detect_gateway, calibration, reference):
    benign, odd = reference.heldout[100:104], noise(3, seed=2)
    before = metrics_samples(detect_gateway)
    predict(detect_gateway.address(), benign)
    predict(detect_gateway.address(), odd)
    after = metrics_samples(detect_gateway)
    for name in DETECTORS_WITH_SCORES:
        assert score_count(after, name) - score_count(before, name) == 7, name
    mahalanobis = calibration.detectors["mahalanobis"]
    expected_flags = int(mahalanobis.detect(np.concatenate([benign, odd])).flagged.sum())
    assert expected_flags >= 3  # the noise, at least
    assert flags_total(after, "mahalanobis") - flags_total(before, "mahalanobis") == expected_flags

    def delta(name: str) -> float:
        return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)

    # Mahalanobis is micro-batched: two sequential requests, two batches, 7 samples.
    assert delta("tfshield_batch_size_count") == 2
    assert delta("tfshield_batch_size_sum") == 7
    assert delta("tfshield_queue_wait_seconds_count") == 2


def test_block_action_refuses_uniform_noise_naming_the_rule(
    calibration, detect_model_server, reference, tmp_path
):
    artefacts = artefacts_with(tmp_path / "artefacts", calibration, ("validation", "mahalanobis"))
    config = detection_config(artefacts, mahalanobis="block")
    proc = start_gateway(tmp_path, detect_model_server.address(), config=config)
    try:
        before = upstream_predicts(detect_model_server)
        with pytest.raises(grpc.RpcError) as raised:
            predict(proc.address(), noise(1))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert raised.value.details() == "request refused by rule 'detector:mahalanobis'"
        assert upstream_predicts(detect_model_server) == before  # refused before forwarding

        scores = calibration.detectors["mahalanobis"].score(reference.heldout[:50])
        benign = reference.heldout[int(np.argmin(scores))][None]
        assert tf.make_ndarray(predict(proc.address(), benign).outputs["probabilities"]).shape == (1, 10)
    finally:
        proc.stop()


# -- failure policy ------------------------------------------------------------------------------------


def unserved_autoencoder_gateway(calibration: Any, upstream: str, workdir: Path, mode: str) -> Proc:
    """A gateway whose autoencoder detector names a model the upstream does not serve."""
    artefacts = artefacts_with(
        workdir / "artefacts",
        calibration,
        ("autoencoder",),
        autoencoder={"model_name": "missing_autoencoder"},
    )
    return start_gateway(workdir, upstream, config=detection_config(artefacts, failure_mode=mode))


def failures(proc: Proc, mode: str) -> float:
    key = ("tfshield_detector_failures_total", (("mode", mode), ("reason", "detector_error")))
    return metrics_samples(proc).get(key, 0.0)


def test_a_failing_detector_with_failure_mode_closed_refuses_unavailable_naming_it(
    calibration, detect_model_server, reference, tmp_path
):
    proc = unserved_autoencoder_gateway(calibration, detect_model_server.address(), tmp_path, "closed")
    try:
        with pytest.raises(grpc.RpcError) as raised:
            predict(proc.address(), reference.heldout[:2])
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            raised.value.details()
            == "detector 'autoencoder' could not score this request; its response was withheld"
        )
        assert failures(proc, "closed") == 1
        assert failures(proc, "open") == 0
        assert metrics_samples(proc)[("tfshield_detector_errors_total", (("detector", "autoencoder"),))] == 1
    finally:
        proc.stop()


def test_a_failing_detector_with_failure_mode_open_forwards_and_is_counted(
    calibration, detect_model_server, reference, tmp_path
):
    proc = unserved_autoencoder_gateway(calibration, detect_model_server.address(), tmp_path, "open")
    try:
        response = predict(proc.address(), reference.heldout[:2])
        assert tf.make_ndarray(response.outputs["probabilities"]).shape == (2, 10)
        assert failures(proc, "open") == 1
        assert failures(proc, "closed") == 0
    finally:
        proc.stop()

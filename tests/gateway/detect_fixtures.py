"""Session fixtures for detection end to end: detectors calibrated once against the
real model server, a model server serving the demo model and the trained
autoencoder, and gateways configured with the artefacts.

Test modules take the fixtures with ``from tests.gateway.detect_fixtures import *``
(``__all__`` lists the fixtures; import helpers and constants by name).

Calibration is kept fast: 1,000 training digits to fit, the autoencoder trained for
2 epochs (a blurry one, but its threshold is calibrated all the same), thresholds at
5 % per detector so that the held-out checks have enough flags to count.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Proc, start, tfshield_argv

__all__ = [
    "calibration",
    "detect_gateway",
    "detect_model_base",
    "detect_model_server",
    "reference",
    "upstream_predictor",
]

MODEL = "mnist"
INPUT = "images"
OUTPUT = "probabilities"
AUTOENCODER = "mnist_autoencoder"
TARGET_FPR = 0.05
FIT_SAMPLES = 1000
AUTOENCODER_EPOCHS = 2
BIG_MESSAGES = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture(scope="session")
def detect_model_base(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base path holding ``mnist`` (a symlink into the cache); calibration exports the
    autoencoder here."""
    from gateway.model.demo import DemoArtifacts

    base = tmp_path_factory.mktemp("detect-models")
    source = DemoArtifacts.at(model_cache_dir).export_dir.parent
    (base / MODEL).symlink_to(source.resolve(), target_is_directory=True)
    return base


@pytest.fixture(scope="session")
def reference(model_cache_dir: Path) -> Any:
    """The demo's benign digits, with the fit part cut to FIT_SAMPLES (see ``demo_reference``)."""
    from gateway.model.calibrate import ReferenceSplit, demo_reference

    full = demo_reference(model_cache_dir)
    return ReferenceSplit(full.fit[:FIT_SAMPLES], full.calibration, full.heldout, full.description)


@pytest.fixture(scope="session")
def calibration(
    model_server: Proc, detect_model_base: Path, reference: Any, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """Every detector calibrated against the shared model server; the CalibrationResult."""
    from gateway.model.calibrate import calibrate

    return calibrate(
        MODEL,
        reference,
        model_server.address(),
        tmp_path_factory.mktemp("artefacts") / "mnist",
        target_fpr=TARGET_FPR,
        autoencoder_model_base_path=detect_model_base,
        autoencoder_epochs=AUTOENCODER_EPOCHS,
        log=lambda line: None,
    )


@pytest.fixture(scope="session")
def detect_model_server(
    calibration: Any, detect_model_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proc]:
    """A model server serving the demo model and the autoencoder calibration exported."""
    argv = tfshield_argv("model-server", "--model-base-path", str(detect_model_base), "--port", "0")
    proc = start(argv, tmp_path_factory.mktemp("detect-model-server"), "model-server")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def upstream_predictor(detect_model_server: Proc) -> Iterator[Any]:
    """A Predictor calling the demo model and the served autoencoder directly (no gateway)."""
    from gateway.model.calibrate import UpstreamPredictor

    with UpstreamPredictor(
        detect_model_server.address(), MODEL, INPUT, OUTPUT, outputs={AUTOENCODER: "reconstruction"}
    ) as predictor:
        yield predictor


def artefacts_with(folder: Path, calibration: Any, names: tuple[str, ...], **changes: dict[str, Any]) -> Path:
    """An artefact folder holding only ``names`` of the calibrated detectors.

    ``changes`` sets attributes on a detector's reloaded copy by detector name
    (``autoencoder={"model_name": "missing"}``), leaving the session's detectors as they were.
    """
    import dataclasses

    from detectors.base import Detector
    from detectors.manifest import write_artefacts

    detectors = {}
    for name in names:
        copy = Detector.load(calibration.out / name)
        for attribute, value in changes.get(name, {}).items():
            setattr(copy, attribute, value)
        detectors[name] = copy
    manifest = dataclasses.replace(
        calibration.manifest,
        detectors=names,
        heldout_fpr={n: calibration.manifest.heldout_fpr[n] for n in names},
    )
    return write_artefacts(folder, manifest, detectors)


def detection_config(artefacts: Path, failure_mode: str = "closed", **actions: str) -> dict[str, Any]:
    return {
        "detection": {
            "models": [{"model": MODEL, "artefacts": str(artefacts), "actions": dict(actions)}],
            "failure_mode": failure_mode,
        }
    }


@pytest.fixture(scope="session")
def detect_gateway(
    calibration: Any, detect_model_server: Proc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proc]:
    """A gateway with every calibrated detector recording (none blocks), failing closed."""
    config = detection_config(calibration.out)
    # Imported here: tests/gateway/conftest.py imports this module's fixtures.
    from tests.gateway.conftest import start_gateway

    proc = start_gateway(
        tmp_path_factory.mktemp("detect-gateway"), detect_model_server.address(), config=config
    )
    yield proc
    proc.stop()


def metrics_samples(proc: Proc) -> dict[MetricKey, float]:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{proc.port('metrics')}/metrics", timeout=5).read().decode()
    )
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def flags_total(samples: dict[MetricKey, float], detector: str) -> float:
    return samples.get(("tfshield_detector_flags_total", (("detector", detector), ("model", MODEL))), 0.0)


def predict(address: str, x: np.ndarray, model: str = MODEL, timeout: float = 30) -> Any:
    """Predict with the stock stub; returns the official PredictResponse (raises grpc.RpcError)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs[INPUT].CopyFrom(tf.make_tensor_proto(x))
    with grpc.insecure_channel(address, options=BIG_MESSAGES) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)

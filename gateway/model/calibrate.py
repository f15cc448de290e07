"""``tfshield calibrate``: fit the detectors on benign data against a running model server.

What it does (DESIGN.md, decision 4: thresholds are calibrated, never hand-set):

1. Reads the protected model's signature from the upstream (``GetModelMetadata``
   with the stock ``tensorflow-serving-api`` stub) and builds the input
   validator from it (dtype and per-sample shape).
2. Splits the benign reference data, seeded, into a *fit* part (detectors
   learn from it; the autoencoder is trained on it), a *calibration* part
   (each threshold is set on it at the target false-positive rate) and a
   *held-out* part (the false-positive rate each threshold actually has,
   measured on data that set nothing). ``--from-demo`` uses the demo's own
   split instead (see :func:`demo_reference`).
3. Fits and calibrates each detector. Model-in-the-loop detectors call the
   protected model on the upstream through :class:`UpstreamPredictor`
   (Predict with the stock stub, ``--batch-size`` samples per call), so the
   thresholds are set on what the gateway will see.
4. The autoencoder (MagNet, :mod:`gateway.model.autoencoder`) is trained on
   the fit part and exported as a SavedModel to
   ``<autoencoder base path>/<model>_autoencoder/<version>``, the next free
   version (1 on a fresh base path): TF Serving picks up new versions on its
   own but never reloads a version it already serves, so overwriting one
   would leave the old weights serving under new thresholds. Its
   reconstructions for calibration are computed in this process from the
   exported SavedModel, the same graph and weights the model server loads,
   so the served copy gives the same numbers (up to float32 rounding between
   batch sizes; ``tests/gateway/test_detect.py`` checks it). The model
   server must (re)load that base path before the gateway starts with the
   artefacts (the reference server loads its models at start; TF Serving
   polls for new versions).
5. With ``fusion_target_fpr`` (``--fusion-fpr``), fuses every score
   detector but validation into one verdict (:mod:`detectors.fusion`,
   Fisher's method over their benign tail p-values on the calibration part)
   with its own threshold at that rate; the members in ``fusion_alone``
   (``--fusion-alone``, default ``margin`` when it is fused) may also flag
   by their own p-value, the rate split evenly between Fisher and each of them.
6. Prints each threshold and its false-positive rate on the held-out part,
   and writes the artefact folder (:mod:`detectors.manifest`) that the
   gateway's ``detection.models[].artefacts`` points at.

Reference data: an ``.npz`` with key ``x`` (the model's input, batch axis
first) and optionally ``y`` (ignored here). The demo's held-out files
(``DemoArtifacts.validation_npz`` / ``test_npz``) are examples.

The library entry point is :func:`calibrate`; ``tfshield eval detectors`` and
the tests call it directly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import TfshieldError
from gateway.model.processes import flushing_print

DEFAULT_DETECTORS = ("validation", "mahalanobis", "feature_squeezing", "autoencoder", "margin", "magnet_jsd")
# Detectors that need the autoencoder calibration trains and exports.
AUTOENCODER_DETECTORS = ("autoencoder", "magnet_jsd")
DEFAULT_TARGET_FPR = 0.01
# Fused detectors that may flag by their own p-value (detectors.fusion: the p-value floor): margin sees
# the minimum-distortion attacks' boundary examples that the other members often do not.
DEFAULT_FUSION_ALONE = ("margin",)
DEFAULT_SPLIT = (0.5, 0.25, 0.25)
DEFAULT_BATCH_SIZE = 256
DEFAULT_SIGNATURE = "serving_default"
AUTOENCODER_SUFFIX = "_autoencoder"
# Predict calls may carry 256 images and more: lift gRPC's 4 MiB default.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]

Log = Callable[[str], None]


class CalibrationError(TfshieldError):
    """Calibration cannot proceed; the message says what to change."""


# -- reference data -----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ReferenceSplit:
    """Benign data in three disjoint parts: fit, calibration, held-out (batch axis first)."""

    fit: np.ndarray
    calibration: np.ndarray
    heldout: np.ndarray
    # Where the parts came from, for the printed report and the logs.
    description: str = ""

    @classmethod
    def from_array(
        cls, x: np.ndarray, fractions: Sequence[float] = DEFAULT_SPLIT, seed: int = 0, description: str = ""
    ) -> ReferenceSplit:
        """Shuffle ``x`` with ``seed`` and cut it by ``fractions`` (fit, calibration, held-out).

        The fractions are normalised to sum to 1; the held-out part gets what
        is left after rounding the other two.
        """
        if len(fractions) != 3 or any(f <= 0 for f in fractions):
            raise CalibrationError(f"split fractions must be three positive numbers, got {list(fractions)}")
        total = float(sum(fractions))
        n = len(x)
        n_fit = int(round(n * fractions[0] / total))
        n_calibration = int(round(n * fractions[1] / total))
        if min(n_fit, n_calibration, n - n_fit - n_calibration) < 2:
            raise CalibrationError(
                f"{n} reference samples are too few to split {list(fractions)}: every part needs at least 2"
            )
        order = np.random.default_rng(seed).permutation(n)
        return cls(
            fit=x[order[:n_fit]],
            calibration=x[order[n_fit : n_fit + n_calibration]],
            heldout=x[order[n_fit + n_calibration :]],
            description=description
            or f"{n} samples split {n_fit}/{n_calibration}/{n - n_fit - n_calibration} (seed {seed})",
        )

    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.fit), "calibration": len(self.calibration), "heldout": len(self.heldout)}

    def astype(self, dtype: np.dtype) -> ReferenceSplit:
        return ReferenceSplit(
            self.fit.astype(dtype),
            self.calibration.astype(dtype),
            self.heldout.astype(dtype),
            self.description,
        )


def load_reference(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``x`` array of a reference ``.npz`` (loaded without pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise CalibrationError(
                    f"{path}: no array named 'x' (found: {', '.join(data.files) or 'none'}); "
                    "save the reference inputs with np.savez(path, x=inputs)"
                )
            return data["x"]
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: cannot read the reference data: {exc}") from None


def demo_reference(cache_dir: str | os.PathLike[str] | None = None) -> ReferenceSplit:
    """The demo model's benign data, split so that the thresholds are set on digits the model never saw.

    - fit: the demo's 3,500 training digits (``split_mnist``, regenerated from
      the bundled data with the demo's seed): Mahalanobis and the autoencoder
      learn the benign distribution from them;
    - calibration: the 500 validation digits and the first 500 test digits
      (``mnist_validation.npz``, ``mnist_test.npz`` of the demo cache);
    - held-out: the other 500 test digits (``tfshield eval detectors`` attacks
      these and measures false positives on them).

    Feature squeezing's scores depend on how confident the model is, which is
    higher on its training digits, so its threshold must not be set on them.
    """
    from gateway.model.data import DEFAULT_SEED, split_mnist
    from gateway.model.demo import DemoArtifacts

    artifacts = DemoArtifacts.at(cache_dir)
    if not artifacts.is_complete():
        raise CalibrationError(
            f"no trained demo model in {artifacts.root}; run tfshield demo (or train_demo_model) first"
        )
    x_validation = load_reference(artifacts.validation_npz)
    x_test, _ = artifacts.load_test_split()
    half = len(x_test) // 2
    return ReferenceSplit(
        fit=split_mnist(DEFAULT_SEED).x_train,
        calibration=np.concatenate([x_validation, x_test[:half]]),
        heldout=x_test[half:],
        description=f"demo digits: training split (fit), validation + test[:{half}] (calibration), "
        f"test[{half}:] (held-out)",
    )


def demo_heldout_labels(cache_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The labels of :func:`demo_reference`'s held-out part, in its order."""
    from gateway.model.demo import DemoArtifacts

    _, y_test = DemoArtifacts.at(cache_dir).load_test_split()
    return y_test[len(y_test) // 2 :]


# -- the upstream as a predictor ---------------------------------------------------


class UpstreamPredictor:
    """A detector :data:`~detectors.base.Predictor` calling models on a TF Serving upstream.

    ``predictor(model_name, batch)`` sends ``batch`` to ``model_name`` (``""``
    = the protected ``model``) in Predict calls of at most ``batch_size``
    samples with the stock ``tensorflow-serving-api`` stub, and returns the
    concatenated output named in ``outputs`` for that model (``""`` →
    ``output``). ``local`` maps model names to in-process functions
    ``batch -> output`` used instead of the upstream (the freshly trained
    autoencoder, before any server has loaded it). ``calls`` counts Predict
    calls sent, by model name.
    """

    def __init__(
        self,
        address: str,
        model: str,
        input_name: str,
        output: str,
        outputs: Mapping[str, str] | None = None,
        local: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout_s: float = 60.0,
    ) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        if batch_size < 1:
            raise CalibrationError(f"batch size must be >= 1, got {batch_size}")
        self.address = address
        self.model = model
        self.input_name = input_name
        self.outputs = {"": output, model: output, **(outputs or {})}
        self.local = dict(local or {})
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.calls: dict[str, int] = {}
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def __call__(self, model_name: str, batch: np.ndarray) -> np.ndarray:
        name = model_name or self.model
        if name in self.local:
            return np.asarray(self.local[name](batch))
        output = self.outputs.get(model_name) or self.outputs.get(name)
        if output is None:
            raise CalibrationError(f"no output name known for model '{name}'; pass outputs={{'{name}': ...}}")
        parts = [self._predict(name, output, chunk) for chunk in _chunks(batch, self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0,))

    def _predict(self, model: str, output: str, chunk: np.ndarray) -> np.ndarray:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.inputs[self.input_name].CopyFrom(tf.make_tensor_proto(chunk))
        request.output_filter.append(output)
        self.calls[model] = self.calls.get(model, 0) + 1
        try:
            response = self._stub.Predict(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise CalibrationError(
                f"Predict on model '{model}' at {self.address} failed: {exc.code().name}: {exc.details()}"
            ) from None
        if output not in response.outputs:
            raise CalibrationError(
                f"model '{model}' answered without output '{output}' (it has: {', '.join(response.outputs)})"
            )
        return tf.make_ndarray(response.outputs[output])

    def signature(self, signature_name: str = DEFAULT_SIGNATURE) -> Any:
        """The protected model's signature as a ``protos.meta_graph_pb2.SignatureDef`` (GetModelMetadata)."""
        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2

        from protos import meta_graph_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = self.model
        request.metadata_field.append("signature_def")
        try:
            response = self._stub.GetModelMetadata(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise CalibrationError(
                f"cannot read the signature of model '{self.model}' at {self.address}: "
                f"{exc.code().name}: {exc.details()}; is the model server up and serving it?"
            ) from None
        # The official response holds an Any; its bytes are a SignatureDefMap,
        # which the project's wire-compatible protos parse (what the validator reads).
        signatures = meta_graph_pb2.SignatureDefMap.FromString(response.metadata["signature_def"].value)
        if signature_name not in signatures.signature_def:
            known = ", ".join(sorted(signatures.signature_def)) or "none"
            raise CalibrationError(
                f"model '{self.model}' has no signature '{signature_name}' (it has: {known}); "
                "pass --signature"
            )
        return signatures.signature_def[signature_name]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> UpstreamPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def saved_model_function(
    export_dir: str | os.PathLike[str], input_name: str, output: str, batch_size: int = DEFAULT_BATCH_SIZE
) -> Callable[[np.ndarray], np.ndarray]:
    """``batch -> output`` running a SavedModel's ``serving_default`` in this process, in chunks."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))
    serve = loaded.signatures[DEFAULT_SIGNATURE]

    def run(batch: np.ndarray) -> np.ndarray:
        _ = loaded  # keeps the variables alive as long as the function is
        parts = [
            serve(**{input_name: tf.constant(chunk)})[output].numpy() for chunk in _chunks(batch, batch_size)
        ]
        return np.concatenate(parts)

    return run


# -- calibration ---------------------------------------------------------------------


@dataclass(eq=False)
class CalibrationResult:
    """What :func:`calibrate` wrote, and how each threshold did on the held-out part."""

    out: Path
    manifest: Any  # detectors.manifest.Manifest
    detectors: dict[str, Any]  # name -> calibrated Detector
    heldout_flagged: dict[str, np.ndarray]  # name -> (n_heldout,) bool
    split_sizes: dict[str, int]
    autoencoder_export: Path | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    fusion: Any = None  # detectors.fusion.FisherFusion, or None

    @property
    def heldout_size(self) -> int:
        return self.split_sizes["heldout"]

    @property
    def combined_flagged(self) -> np.ndarray:
        """Held-out samples the gateway would flag: by any detector, or with a fusion, by the fusion or
        by input validation (the fused detectors' own flags are then recorded only)."""
        from detectors.fusion import deciding

        return np.any(np.stack([self.heldout_flagged[n] for n in deciding(self.heldout_flagged)]), axis=0)


def next_version(model_dir: Path) -> int:
    """One more than the largest numeric version directory in ``model_dir`` (1 if none)."""
    versions = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if model_dir.is_dir()
        else []
    )
    return max(versions, default=0) + 1


def calibrate(
    model: str,
    reference: ReferenceSplit,
    upstream: str,
    out: str | os.PathLike[str],
    target_fpr: float = DEFAULT_TARGET_FPR,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    input_name: str = "images",
    output_name: str = "probabilities",
    signature_name: str = DEFAULT_SIGNATURE,
    autoencoder_model_base_path: str | os.PathLike[str] | None = None,
    autoencoder_epochs: int | None = None,
    detector_params: Mapping[str, Mapping[str, Any]] | None = None,
    fusion_target_fpr: float | None = None,
    fusion_alone: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    log: Log = print,
) -> CalibrationResult:
    """Fit and calibrate ``detectors`` for ``model`` served at ``upstream``; write the artefacts to ``out``.

    ``reference`` holds benign inputs (see :class:`ReferenceSplit`);
    ``detector_params`` overrides hyperparameters by detector name;
    ``autoencoder_epochs`` defaults to
    :data:`gateway.model.autoencoder.DEFAULT_EPOCHS`. ``fusion_target_fpr``
    (None: no fusion) adds a Fisher fusion of every detector but validation,
    its threshold at that false-positive rate; ``fusion_alone`` names the fused
    detectors that may also flag by their own p-value (None:
    :data:`DEFAULT_FUSION_ALONE` among the fused ones). ``seed`` seeds the
    autoencoder's training. Returns what was written, with the held-out flags.
    """
    import detectors as _registry  # noqa: F401  (registers every detector)
    from detectors.base import REGISTRY, DetectorError, detector_class
    from detectors.fusion import FisherFusion
    from detectors.manifest import Manifest, write_artefacts
    from detectors.monitor import Monitor

    if not 0.0 < target_fpr < 1.0:
        raise CalibrationError(f"target FPR must be in (0, 1), got {target_fpr}")
    names = list(dict.fromkeys(detectors))
    if not names:
        raise CalibrationError("no detectors to calibrate; name at least one")
    # Input detectors only: monitors are calibrated on client sequences (--monitors-out).
    known = sorted(n for n, cls in REGISTRY.items() if not issubclass(cls, Monitor))
    for name in names:
        if name not in known:
            raise DetectorError(f"unknown detector '{name}'; known: {', '.join(known)}")
    params = {name: dict(values) for name, values in (detector_params or {}).items()}
    out_dir = Path(out)
    timings: dict[str, float] = {}
    autoencoder_name = f"{model}{AUTOENCODER_SUFFIX}"
    needs_autoencoder = [n for n in names if n in AUTOENCODER_DETECTORS]
    if needs_autoencoder and autoencoder_model_base_path is None:
        raise CalibrationError(
            f"the {' and '.join(needs_autoencoder)} detector(s) need a model base path to export the trained "
            f"autoencoder to (it is served as '{autoencoder_name}' beside '{model}'): pass "
            f"--autoencoder-model-base-path (or --model-base-path), or leave {', '.join(needs_autoencoder)} "
            "out of --detectors"
        )
    fused = [n for n in names if n != "validation"]
    if fusion_target_fpr is not None:
        if not 0.0 < fusion_target_fpr < 1.0:
            raise CalibrationError(f"fusion target FPR must be in (0, 1), got {fusion_target_fpr}")
        if len(fused) < 2:
            raise CalibrationError(
                f"a fusion needs at least 2 detectors besides validation, got {fused}; add detectors or "
                "leave out --fusion-fpr"
            )
    if fusion_alone is None:
        alone = [n for n in DEFAULT_FUSION_ALONE if n in fused]
    elif fusion_alone and fusion_target_fpr is None:
        raise CalibrationError("--fusion-alone names parts of a fusion; pass --fusion-fpr too")
    else:
        alone = list(dict.fromkeys(fusion_alone))
        if not_fused := [n for n in alone if n not in fused]:
            raise CalibrationError(
                f"--fusion-alone names detectors that are not fused: {not_fused}; fused: {', '.join(fused)}"
            )

    with UpstreamPredictor(upstream, model, input_name, output_name, batch_size=batch_size) as predictor:
        log(f"[1/4] signature '{signature_name}' of model '{model}' at {upstream}")
        signature = predictor.signature(signature_name)
        if input_name not in signature.inputs:
            raise CalibrationError(
                f"model '{model}' has no input '{input_name}' "
                f"(its inputs: {', '.join(sorted(signature.inputs))}); pass --input"
            )
        if output_name not in signature.outputs:
            raise CalibrationError(
                f"model '{model}' has no output '{output_name}' (its outputs: "
                f"{', '.join(sorted(signature.outputs))}); pass --output"
            )
        validator = _validator(signature, input_name, params.get("validation", {}))
        log(
            f"  input '{input_name}': {validator.dtype} per-sample shape {list(validator.shape or [])}; "
            f"output '{output_name}'"
        )
        if validator.dtype is not None and reference.fit.dtype != np.dtype(validator.dtype):
            log(
                f"  casting the reference data from {reference.fit.dtype} to {validator.dtype} "
                "(the signature's dtype)"
            )
            reference = reference.astype(np.dtype(validator.dtype))

        sizes = reference.sizes()
        log(
            f"[2/4] reference data: {sizes['fit']} fit, {sizes['calibration']} calibration, "
            f"{sizes['heldout']} held-out samples ({reference.description})"
        )

        log(f"[3/4] fitting and calibrating {len(names)} detectors at target FPR {target_fpr:.4g}")
        fitted: dict[str, Any] = {}
        calibration_scores: dict[str, np.ndarray] = {}
        autoencoder_export: Path | None = None
        for name in names:
            started = time.monotonic()
            extra = params.get(name, {})
            if name == "validation":
                detector = validator
            elif name == "feature_squeezing":
                defaults = {"output": output_name, "value_range": _value_range(reference.fit)}
                detector = detector_class(name)(**{**defaults, **extra})
            elif name == "margin":
                detector = detector_class(name)(**{"output": output_name, **extra})
            elif name in AUTOENCODER_DETECTORS:
                from gateway.model.autoencoder import OUTPUT_NAME

                if autoencoder_export is None:  # trained once, for both detectors that use it
                    assert autoencoder_model_base_path is not None
                    autoencoder_export = _train_and_export_autoencoder(
                        reference,
                        Path(autoencoder_model_base_path),
                        autoencoder_name,
                        input_name,
                        autoencoder_epochs,
                        seed,
                        log,
                    )
                    predictor.local[autoencoder_name] = saved_model_function(
                        autoencoder_export, input_name, OUTPUT_NAME, batch_size
                    )
                if name == "autoencoder":
                    defaults = {"model_name": autoencoder_name, "output": OUTPUT_NAME}
                else:
                    defaults = {
                        "autoencoder_model": autoencoder_name,
                        "autoencoder_output": OUTPUT_NAME,
                        "output": output_name,
                    }
                detector = detector_class(name)(**{**defaults, **extra})
            else:
                detector = detector_class(name)(**extra)
            calls = dict(predictor.calls)
            detector.fit(reference.fit, predictor if detector.needs_predictor else None)
            # Kept: the fusion below is fitted on the same scores.
            calibration_scores[name] = detector.score(
                reference.calibration, predictor if detector.needs_predictor else None
            )
            detector.calibrate_scores(calibration_scores[name], target_fpr)
            timings[name] = time.monotonic() - started
            sent = sum(predictor.calls.values()) - sum(calls.values())
            upstream_note = f", {sent} Predict calls upstream" if sent else ""
            log(f"  {name:<18} threshold {detector.threshold_:.6g}  ({timings[name]:.1f} s{upstream_note})")
            fitted[name] = detector

        fusion = None
        if fusion_target_fpr is not None:
            started = time.monotonic()
            fusion = FisherFusion(fused, alone).fit({name: calibration_scores[name] for name in fused})
            fusion.calibrate(fusion_target_fpr)
            timings[fusion.name] = time.monotonic() - started
            parts = ", ".join(f"{part} > {t:.6g}" for part, t in fusion.part_thresholds_.items())
            log(
                f"  {'fusion ' + fusion.name:<18} over {', '.join(fused)} at target FPR "
                f"{fusion_target_fpr:.4g}, {fusion_target_fpr / len(fusion.parts):.4g} per part: {parts} "
                f"({timings[fusion.name]:.1f} s)"
            )

        log(f"[4/4] false positives on the {sizes['heldout']} held-out samples; writing {out_dir}")
        heldout_scores = {
            name: detector.score(reference.heldout, predictor if detector.needs_predictor else None)
            for name, detector in fitted.items()
        }
        flagged = {name: heldout_scores[name] > fitted[name].threshold_ for name in fitted}
        if fusion is not None:
            flagged[fusion.name] = fusion.flagged(fusion.score(heldout_scores))

    manifest = Manifest(
        model=model,
        input=input_name,
        output=output_name,
        detectors=tuple(names),
        target_fpr=float(target_fpr),
        heldout_fpr={name: float(f.mean()) for name, f in flagged.items()},
        created_unix_s=time.time(),
        fusion=fusion.name if fusion is not None else "",
    )
    write_artefacts(out_dir, manifest, fitted, fusion)
    result = CalibrationResult(out_dir, manifest, fitted, flagged, sizes, autoencoder_export, timings, fusion)
    for line in format_report(result).splitlines():
        log(line)
    return result


def _validator(signature: Any, input_name: str, params: Mapping[str, Any]) -> Any:
    from detectors.validation import InputValidator

    return InputValidator.from_tensor_info(input_name, signature.inputs[input_name], **params)


def _value_range(x: np.ndarray) -> tuple[float, float]:
    """Feature squeezing's value range: the reference data's, or (0, 1) when that is degenerate."""
    if x.dtype.kind not in "iuf" or x.size == 0:
        return (0.0, 1.0)
    low, high = float(x.min()), float(x.max())
    return (low, high) if high > low else (0.0, 1.0)


def _train_and_export_autoencoder(
    reference: ReferenceSplit,
    base_path: Path,
    name: str,
    input_name: str,
    epochs: int | None,
    seed: int,
    log: Log,
) -> Path:
    from gateway.model import autoencoder

    if input_name != autoencoder.INPUT_NAME or tuple(reference.fit.shape[1:]) != tuple(
        autoencoder.IMAGE_SHAPE
    ):
        raise CalibrationError(
            f"the bundled autoencoder takes input '{autoencoder.INPUT_NAME}' of per-sample shape "
            f"{list(autoencoder.IMAGE_SHAPE)} (MagNet's MNIST model); this model's input is '{input_name}' "
            f"{list(reference.fit.shape[1:])}: leave autoencoder out of --detectors"
        )
    epochs = autoencoder.DEFAULT_EPOCHS if epochs is None else epochs
    log(f"  autoencoder: training on {len(reference.fit)} samples, {epochs} epochs (seed {seed}) ...")
    started = time.monotonic()
    model = autoencoder.train_autoencoder(reference.fit, reference.calibration, epochs=epochs, seed=seed)
    version = next_version(base_path / name)
    export_dir = autoencoder.export_autoencoder(model, base_path, name=name, version=version)
    log(
        f"  autoencoder: trained in {time.monotonic() - started:.1f} s, reconstruction MSE "
        f"{model.validation_mse_:.5f} on the calibration part; exported to {export_dir}"
    )
    return export_dir


def calibrate_monitor_suite(
    model: str,
    reference: ReferenceSplit,
    upstream: str,
    out: str | os.PathLike[str],
    *,
    target_fpr: float,
    input_name: str = "images",
    output_name: str = "probabilities",
    names: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    sequence_options: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Calibrate the per-client monitors and write the suite the gateway's ``monitors.models`` loads.

    The embedding is fitted on the reference's fit part; benign client
    sequences (ordinary users, heavy users, near-duplicate re-senders; see
    :func:`detectors.monitor_calibration.benign_sequences`) are drawn from its
    calibration part, and their top-1 classes come from the running upstream,
    so thresholds are set on the served model's own answers. ``target_fpr`` is
    the fraction of those benign clients each monitor may flag. Blacklight's
    salt comes from TFSHIELD_FINGERPRINT_SALT if set (the gateway sets its own
    at start either way: the salt is not part of the calibration).
    """
    from detectors.monitor_calibration import DEFAULT_MONITORS, benign_sequences, calibrate_monitors

    rng = np.random.default_rng(seed)
    sequences = benign_sequences(reference.calibration, rng, **dict(sequence_options or {}))
    total = sum(len(q) for q in sequences)
    log(f"monitors: {len(sequences)} benign clients, {total} queries, from the calibration split")
    started = time.perf_counter()
    with UpstreamPredictor(upstream, model, input_name, output_name, batch_size=batch_size) as predictor:

        def predicted(batch: np.ndarray) -> np.ndarray:
            return np.asarray(predictor("", batch)).reshape(len(batch), -1).argmax(axis=1)

        suite = calibrate_monitors(
            reference.fit,
            sequences,
            target_fpr,
            predicted,
            names=tuple(names or DEFAULT_MONITORS),
            secret=os.environ.get("TFSHIELD_FINGERPRINT_SALT") or None,
        )
    folder = suite.save(out)
    for name, monitor in suite.monitors.items():
        log(f"monitors: {name:<16} threshold {monitor.threshold_:.6g}")
    log(f"monitors: calibrated in {time.perf_counter() - started:.1f} s, written to {folder}")
    return folder


def format_report(result: CalibrationResult) -> str:
    """The table ``tfshield calibrate`` prints: threshold and held-out FPR per detector."""
    n = result.heldout_size
    target = result.manifest.target_fpr

    def bound(rate: float) -> float:
        """Within sampling error: binomial, 3 standard deviations above the target ``rate``."""
        return rate + 3 * math.sqrt(rate * (1 - rate) / n)

    lines = [
        f"{'detector':<18} {'threshold':>12} {'target FPR':>11} {'held-out FPR':>13}  (n = {n}; 3σ bound "
        f"{bound(target):.2%} per detector)"
    ]
    # (name, threshold text, target FPR or None, held-out flags)
    rows: list[tuple[str, str, float | None, np.ndarray]] = [
        (name, f"{result.detectors[name].threshold_:.6g}", target, flags)
        for name, flags in result.heldout_flagged.items()
        if name in result.detectors
    ]
    if result.fusion is not None:
        fusion = result.fusion
        rows.append(
            (
                f"fusion {fusion.name}",
                # One statistic threshold per part (Fisher's, then each alone member's); the score is in
                # their units, so its own threshold is 1.
                "/".join(f"{t:.4g}" for t in fusion.part_thresholds_.values()),
                fusion.target_fpr_,
                result.heldout_flagged[fusion.name],
            )
        )
    combined = "validation+fusion" if result.fusion is not None else "any (combined)"
    rows.append((combined, "", None, result.combined_flagged))
    for name, threshold, row_target, flags in rows:
        fpr = float(flags.mean())
        target_text = "" if row_target is None else f"{row_target:.2%}"
        note = "  above the 3σ bound" if row_target is not None and fpr > bound(row_target) else ""
        lines.append(
            f"{name:<18} {threshold:>12} {target_text:>11} {fpr:>7.2%} ({int(flags.sum())}/{n}){note}"
        )
    lines.append(f"artefacts: {result.out}")
    if result.autoencoder_export is not None:
        lines.append(
            f"autoencoder: {result.autoencoder_export} (restart the reference model server, or let "
            "TF Serving pick up the new version, before starting the gateway)"
        )
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tfshield calibrate",
        description="Fit the detectors on benign reference data against a running model server, set their "
        "thresholds at a target false-positive rate, and write the artefact folder the gateway loads.",
    )
    parser.add_argument("--model", required=True, help="the protected model's name on the upstream")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--reference", type=Path, help=".npz of benign inputs under key 'x' (batch axis first)"
    )
    source.add_argument(
        "--from-demo",
        action="store_true",
        help="use the demo model's digits (training split to fit, validation + half the test split to "
        "calibrate, the other half held out)",
    )
    parser.add_argument("--out", type=Path, required=True, help="artefact folder to write")
    parser.add_argument("--upstream", required=True, help="host:port of the model server serving --model")
    parser.add_argument(
        "--target-fpr",
        type=float,
        default=DEFAULT_TARGET_FPR,
        help=f"false-positive rate each threshold is set at (default {DEFAULT_TARGET_FPR})",
    )
    parser.add_argument(
        "--detectors",
        default=",".join(DEFAULT_DETECTORS),
        help=f"comma-separated detector names (default {','.join(DEFAULT_DETECTORS)})",
    )
    parser.add_argument(
        "--fusion-fpr",
        type=float,
        help="also fuse every detector but validation into one verdict (Fisher's method over their benign "
        "p-values) with its threshold at this false-positive rate; the fused detectors' own flags are "
        "then recorded only (default: no fusion)",
    )
    parser.add_argument(
        "--fusion-alone",
        help="comma-separated fused detectors that may also flag by their own p-value, the fusion's FPR "
        "split evenly between Fisher and each of them ('' for none; default: "
        f"{','.join(DEFAULT_FUSION_ALONE)} when fused)",
    )
    parser.add_argument("--input", default="images", help="the input the detectors read (default images)")
    parser.add_argument(
        "--output",
        default="probabilities",
        help="the probability output feature squeezing reads (default probabilities)",
    )
    parser.add_argument(
        "--signature", default=DEFAULT_SIGNATURE, help="signature to read (default serving_default)"
    )
    parser.add_argument("--model-base-path", type=Path, help="the model server's --model-base-path")
    parser.add_argument(
        "--autoencoder-model-base-path",
        type=Path,
        help="where to export the trained autoencoder as <model>_autoencoder/<next version> "
        "(default: --model-base-path)",
    )
    parser.add_argument(
        "--autoencoder-epochs",
        type=int,
        help="autoencoder training epochs (default: gateway.model.autoencoder.DEFAULT_EPOCHS)",
    )
    parser.add_argument(
        "--split",
        default=",".join(str(f) for f in DEFAULT_SPLIT),
        help="fit,calibration,held-out fractions of --reference (default 0.5,0.25,0.25)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the autoencoder (default 0)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"samples per Predict call to the upstream (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="the demo cache for --from-demo (default $TFSHIELD_CACHE)"
    )
    parser.add_argument(
        "--monitors-out",
        type=Path,
        help="also calibrate the per-client monitors and write their suite here "
        "(the gateway's monitors.models.suite)",
    )
    parser.add_argument(
        "--monitors-fpr",
        type=float,
        default=0.001,
        help="fraction of benign clients each monitor may ever flag (default 0.001; below 1/n clients "
        "the threshold is extrapolated from the benign tail)",
    )
    args = parser.parse_args(argv)
    try:
        args.split = tuple(float(f) for f in args.split.split(","))
    except ValueError:
        parser.error(f"--split must be three comma-separated numbers, got {args.split!r}")
    args.detectors = tuple(d.strip() for d in args.detectors.split(",") if d.strip())
    if args.fusion_alone is not None:
        args.fusion_alone = tuple(d.strip() for d in args.fusion_alone.split(",") if d.strip())
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = flushing_print
    try:
        if args.from_demo:
            reference = demo_reference(args.cache_dir)
        else:
            reference = ReferenceSplit.from_array(
                load_reference(args.reference),
                args.split,
                args.seed,
                description=f"{args.reference}, split {'/'.join(map(str, args.split))}, seed {args.seed}",
            )
        calibrate(
            args.model,
            reference,
            args.upstream,
            args.out,
            target_fpr=args.target_fpr,
            detectors=args.detectors,
            input_name=args.input,
            output_name=args.output,
            signature_name=args.signature,
            autoencoder_model_base_path=args.autoencoder_model_base_path or args.model_base_path,
            autoencoder_epochs=args.autoencoder_epochs,
            fusion_target_fpr=args.fusion_fpr,
            fusion_alone=args.fusion_alone,
            seed=args.seed,
            batch_size=args.batch_size,
            log=log,
        )
        if args.monitors_out:
            calibrate_monitor_suite(
                args.model,
                reference,
                args.upstream,
                args.monitors_out,
                target_fpr=args.monitors_fpr,
                input_name=args.input,
                output_name=args.output,
                seed=args.seed,
                batch_size=args.batch_size,
                log=log,
            )
    except TfshieldError as exc:
        print(f"tfshield calibrate: {exc}", file=sys.stderr)
        return 1
    return 0


def _chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start : start + size]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The detect stage: score every Predict request's inputs with calibrated detectors.

For each protected model (``detection.models`` in the config, each loaded from
a folder written by ``tfshield calibrate``):

- **validation** runs inline on every request (dtype, per-sample shape,
  NaN/Inf, value range): a violation is INVALID_ARGUMENT naming the input.
- **stateless detectors** (Mahalanobis) score micro-batches gathered across
  concurrent requests (:mod:`gateway.batching`): on the event loop up to
  ``detection.inline_max_samples`` samples, in a worker thread above it.
- **feature squeezing** puts its squeezed variants into the client's own
  upstream call (one round trip), scores the split response, and returns only
  the client's rows to the client, re-encoded in the form the upstream used.
- **autoencoder** asks the autoencoder model (served beside the protected
  model) for reconstructions, concurrently with the forwarded call.
- **margin** reads the protected model's output in the forwarded response
  (the client's rows of it when feature squeezing shares the call): no extra
  upstream call.
- **magnet_jsd** (MagNet's divergence) needs the model's output on AE(x):
  the gateway awaits the autoencoder's reconstruction (the same call the
  autoencoder detector uses) BEFORE forwarding, and adds AE(x) to the client's
  own upstream call after feature squeezing's variants; the client gets only
  its rows. Its cost is one autoencoder round trip ahead of the forward.
- **fusion** (``fisher``, when the artefacts hold one): after every fused
  detector has scored the call, their scores are combined into one verdict
  (:mod:`detectors.fusion`: Fisher's method, OR the members it lets flag
  alone, such as margin), its score in units of its part thresholds; it is
  counted and acted on like a detector named ``fisher``.

Until the policy engine exists, a flag refuses the request with
PERMISSION_DENIED only when the model's ``actions`` say ``block`` for that
detector; otherwise it is recorded (counted). The refusal names the rule,
never the score.

When scoring cannot happen — the queue is full, a detector raised, the
autoencoder call failed — ``detection.failure_mode`` decides: ``closed``
refuses (RESOURCE_EXHAUSTED for a full queue, UNAVAILABLE otherwise), ``open``
forwards unscored. Both are counted; nothing is dropped silently.

Stats (labels; scores are observed in units of the detector's threshold, so
1.0 is the flag line for every detector):

==========================================  =========  =====================
tfshield_detector_score                     histogram  detector, model
tfshield_detector_flags_total               counter    detector, model
tfshield_detector_errors_total              counter    detector
tfshield_detector_failures_total            counter    reason, mode
tfshield_batch_size                         histogram  -
tfshield_queue_wait_seconds                 histogram  -
==========================================  =========  =====================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from detectors.autoencoder import AutoencoderDetector
from detectors.base import Detection, Detector
from detectors.divergence import MagnetDivergence
from detectors.fusion import FisherFusion
from detectors.manifest import Manifest, load_artefacts, load_fusion
from detectors.margin import MarginDetector
from detectors.squeeze import FeatureSqueezing
from detectors.validation import InputValidator
from gateway.batching import MicroBatcher, QueueFull
from gateway.codec import numpy_to_tensor, tensor_to_numpy, tensor_uses_content
from gateway.config import DetectionConfig, ProtectedModelConfig
from gateway.errors import ConfigError, InvalidInput
from gateway.forward import UpstreamPool
from gateway.metrics import BatchHistogram
from gateway.pipeline import Call, Refusal, Stage
from protos import predict_pb2

log = logging.getLogger(__name__)

PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
SCORE_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUEUE_WAIT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
# Responses are the upstream's: decode them without the request element limit.
RESPONSE_MAX_ELEMENTS = 2**40


class DetectMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # Observed a whole batch of scores at a time (BatchHistogram).
        self.score = BatchHistogram(
            "tfshield_detector_score",
            "Detector scores in units of the detector's threshold (1.0 = flag line).",
            ["detector", "model"],
            buckets=SCORE_RATIO_BUCKETS,
            registry=registry,
        )
        self.flags = Counter(
            "tfshield_detector_flags",
            "Samples flagged, by detector and model.",
            ["detector", "model"],
            registry=registry,
        )
        self.errors = Counter(
            "tfshield_detector_errors",
            "Detector failures (exceptions), by detector.",
            ["detector"],
            registry=registry,
        )
        self.failures = Counter(
            "tfshield_detector_failures",
            "Requests the failure mode decided (reason: queue_full or detector_error; mode: open or closed).",
            ["reason", "mode"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "tfshield_batch_size",
            "Samples per scored micro-batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "tfshield_queue_wait_seconds",
            "Time a request's samples waited for their micro-batch.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )

    def observe_batch(self, size: int, waits: list[float]) -> None:
        self.batch_size.observe(size)
        for wait in waits:
            self.queue_wait.observe(wait)


BatchScores = dict[str, "np.ndarray | Exception"]


@dataclass
class ProtectedModel:
    """Everything the stage needs for one model, built once at start."""

    manifest: Manifest
    actions: dict[str, str]
    validator: InputValidator | None
    batched: list[Detector]
    squeezer: FeatureSqueezing | None
    autoencoder: AutoencoderDetector | None
    margin: MarginDetector | None = None
    batcher: MicroBatcher[BatchScores] | None = None
    divergence: MagnetDivergence | None = None
    fusion: FisherFusion | None = None

    def autoencoder_call(self) -> tuple[str, str] | None:
        """(model name, output) of the autoencoder call, when a detector needs AE(x)."""
        if self.autoencoder is not None:
            return self.autoencoder.model_name, self.autoencoder.output
        if self.divergence is not None:
            return self.divergence.autoencoder_model, self.divergence.autoencoder_output
        return None

    def blocks(self, detector: str) -> bool:
        return self.actions.get(detector, "record") == "block"


@dataclass(slots=True)
class _CallState:
    model: ProtectedModel
    rows: int
    x: np.ndarray
    # The output the gateway added to the client's output_filter for scoring, removed again before
    # the answer leaves (None: nothing added).
    added_output: str | None = None
    autoencoder: asyncio.Task[np.ndarray] | None = None
    # The client's rows of the manifest's output, when feature squeezing decoded them already.
    outputs: np.ndarray | None = None
    # Row blocks of the shared upstream call: the client's, squeeze variants, AE(x) (1 = not shared).
    parts: int = 1
    shares_reconstruction: bool = False
    detections: list[Detection] = field(default_factory=list)


def _retrieve_exception(task: asyncio.Future[np.ndarray]) -> None:
    if not task.cancelled():
        task.exception()


def _split_scores(result: BatchScores, start: int, stop: int) -> BatchScores:
    return {name: s if isinstance(s, Exception) else s[start:stop] for name, s in result.items()}


class DetectStage(Stage):
    name = "detect"

    def __init__(
        self,
        config: DetectionConfig,
        registry: CollectorRegistry,
        upstream: Callable[[], UpstreamPool | None],
        in_flight: Callable[[], int],
    ) -> None:
        self.config = config
        self.metrics = DetectMetrics(registry)
        self._upstream = upstream
        self._closed = config.failure_mode == "closed"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfshield-detect")
        self.models: dict[str, ProtectedModel] = {}
        for model_config in config.models:
            protected = self._load(model_config)
            if protected.batched:
                protected.batcher = MicroBatcher(
                    self._batch_scorer(protected),
                    _split_scores,
                    max_batch_size=config.max_batch_size,
                    max_batch_delay_s=config.max_batch_delay_s,
                    max_queue_samples=config.max_queue_samples,
                    others_pending=in_flight,
                    executor=self._executor,
                    on_batch=self.metrics.observe_batch,
                    inline_max_samples=config.inline_max_samples,
                )
            self.models[model_config.model] = protected
        # Series at 0 from the start, so dashboards and alerts see "no errors", not "no data".
        mode = "closed" if self._closed else "open"
        for reason in ("queue_full", "detector_error"):
            self.metrics.failures.labels(reason, mode)
        for protected in self.models.values():
            for detector in (
                protected.validator,
                *protected.batched,
                protected.squeezer,
                protected.autoencoder,
                protected.margin,
                protected.divergence,
                protected.fusion,
            ):
                if detector is not None:
                    self.metrics.errors.labels(detector.name)

    @staticmethod
    def _load(model_config: ProtectedModelConfig) -> ProtectedModel:
        manifest, detectors = load_artefacts(model_config.artefacts)
        if manifest.model != model_config.model:
            log.warning(
                "artefacts in %s were calibrated for model '%s', configured for '%s'",
                model_config.artefacts,
                manifest.model,
                model_config.model,
            )
        validator = squeezer = autoencoder = margin = divergence = None
        batched: list[Detector] = []
        for detector in detectors.values():
            if isinstance(detector, InputValidator):
                validator = detector
            elif isinstance(detector, FeatureSqueezing):
                squeezer = detector
            elif isinstance(detector, AutoencoderDetector):
                autoencoder = detector
            elif isinstance(detector, MarginDetector):
                margin = detector
            elif isinstance(detector, MagnetDivergence):
                divergence = detector
            elif not detector.needs_predictor:
                batched.append(detector)
            else:
                where = model_config.artefacts
                raise ConfigError(
                    f"{where}: detector '{detector.name}' calls a model the gateway cannot feed"
                )
        if (
            autoencoder is not None
            and divergence is not None
            and (autoencoder.model_name, autoencoder.output)
            != (divergence.autoencoder_model, divergence.autoencoder_output)
        ):
            raise ConfigError(
                f"{model_config.artefacts}: autoencoder and magnet_jsd must read the same autoencoder model "
                f"and output, got '{autoencoder.model_name}' and '{divergence.autoencoder_model}'"
            )
        return ProtectedModel(
            manifest,
            dict(model_config.actions),
            validator,
            batched,
            squeezer,
            autoencoder,
            margin,
            divergence=divergence,
            fusion=load_fusion(model_config.artefacts, manifest),
        )

    def _batch_scorer(self, protected: ProtectedModel) -> Callable[[np.ndarray], BatchScores]:
        model = protected.manifest.model

        def score(batch: np.ndarray) -> BatchScores:
            # Runs where the batch is scored: for batches above inline_max_samples,
            # in the worker thread, so observing scores here keeps it off the event loop.
            result: BatchScores = {}
            for detector in protected.batched:
                try:
                    scores = detector.score(batch)
                except Exception as exc:  # one detector's failure must not hide the others'
                    result[detector.name] = exc
                    continue
                result[detector.name] = scores
                self._observe(detector, model, scores)
            return result

        return score

    def _observe(self, detector: Detector | FisherFusion, model: str, scores: np.ndarray) -> np.ndarray:
        flagged = scores > detector.threshold_
        # Thresholds can be 0 (a validator fitted on clean data): avoid dividing by it.
        scale = detector.threshold_ if detector.threshold_ > 0 else 1.0
        self.metrics.score.labels(detector.name, model).observe_many(scores / scale)
        count = int(flagged.sum())
        if count:
            self.metrics.flags.labels(detector.name, model).inc(count)
        return flagged

    # -- failure policy ----------------------------------------------------------

    def _fail(self, reason: str, detector: str, exc: BaseException | None, *, answered: bool = False) -> None:
        """Apply the failure mode; returns only when the request may go on unscored."""
        if exc is not None:
            self.metrics.errors.labels(detector).inc()
            log.warning("detector %s failed: %s", detector, exc)
        if self._closed:
            self.metrics.failures.labels(reason, "closed").inc()
            if reason == "queue_full":
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the gateway's scoring queue is full; retry with backoff",
                    rule="queue_full",
                )
            # Before forwarding the request is held back; after it, the upstream's answer is.
            outcome = "its response was withheld" if answered else "it was not forwarded"
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"detector '{detector}' could not score this request; {outcome}",
                rule="detector_error",
            )
        self.metrics.failures.labels(reason, "open").inc()

    def _verdict(
        self, state: _CallState, detector: Detector | FisherFusion, scores: np.ndarray, observed: bool = False
    ) -> None:
        # Micro-batched scores were observed (histogram, flags) by the worker thread already.
        if observed:
            flagged = scores > detector.threshold_
        else:
            flagged = self._observe(detector, state.model.manifest.model, scores)
        state.detections.append(Detection(detector.name, scores, flagged, detector.threshold_))
        if flagged.any() and state.model.blocks(detector.name):
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"request refused by rule 'detector:{detector.name}'",
                rule=f"detector:{detector.name}",
            )

    # -- the request path ----------------------------------------------------------

    async def on_request(self, call: Call) -> None:
        if call.method != "Predict" or not call.decoded:
            return
        protected = self.models.get(call.model)
        if protected is None:
            return
        manifest = protected.manifest
        x = call.inputs.get(manifest.input)
        if x is None:
            raise InvalidInput(manifest.input, "is missing; this model's detectors read it", reason="missing")
        if protected.validator is not None:
            protected.validator.check(manifest.input, x)
        state = _CallState(protected, len(x), x)
        call.detect_state = state

        if protected.autoencoder_call() is not None:
            state.autoencoder = asyncio.ensure_future(self._reconstruct(protected, x, call))
            # If the call is refused or the forward fails, nobody awaits the task: retrieve its error here.
            state.autoencoder.add_done_callback(_retrieve_exception)
        reconstruction = None
        if protected.divergence is not None:
            reconstruction = await self._reconstruction_rows(state, protected.divergence)
        if protected.squeezer is not None or reconstruction is not None:
            self._add_variants(call, state, protected.squeezer, reconstruction)
        elif protected.margin is not None and call.request.output_filter:
            self._request_output(call, state, protected.margin.output)
        if protected.batcher is not None:
            try:
                scores = await protected.batcher.submit(x)
            except QueueFull:
                self._fail("queue_full", "_queue", None)
                return
            for detector in protected.batched:
                result = scores[detector.name]
                if isinstance(result, Exception):
                    self._fail("detector_error", detector.name, result)
                else:
                    self._verdict(state, detector, result, observed=True)

    async def _reconstruction_rows(
        self, state: _CallState, divergence: MagnetDivergence
    ) -> np.ndarray | None:
        """AE(x) for magnet_jsd's rows in the shared call; None (after the failure policy) if unavailable."""
        assert state.autoencoder is not None
        try:
            return divergence.check_reconstruction(state.x, await state.autoencoder)
        except (grpc.aio.AioRpcError, Exception) as exc:  # noqa: B014 (name the gRPC case)
            self._fail("detector_error", divergence.name, exc)
            return None

    def _add_variants(
        self,
        call: Call,
        state: _CallState,
        squeezer: FeatureSqueezing | None,
        reconstruction: np.ndarray | None = None,
    ) -> None:
        """Replace the forwarded request by one holding ``[x, *variants(x), AE(x)]`` (the parts present)."""
        assert call.request is not None
        name = state.model.manifest.input
        if len(call.request.inputs) != 1:
            for detector in (squeezer, state.model.divergence if reconstruction is not None else None):
                if detector is not None:
                    self._fail(
                        "detector_error",
                        detector.name,
                        ValueError(f"{detector.name} needs a single-input model"),
                    )
            return
        original = call.request.inputs[name]
        blocks = [state.x, *(squeezer.variants(state.x) if squeezer is not None else [])]
        if reconstruction is not None:
            blocks.append(reconstruction)
            state.shares_reconstruction = True
        state.parts = len(blocks)
        batch = np.concatenate(blocks)
        request = predict_pb2.PredictRequest()
        request.CopyFrom(call.request)
        request.inputs[name].CopyFrom(numpy_to_tensor(batch, as_tensor_content=True, dtype=original.dtype))
        self._request_output(call, state, state.model.manifest.output, request)

    @staticmethod
    def _request_output(
        call: Call, state: _CallState, output: str, request: predict_pb2.PredictRequest | None = None
    ) -> None:
        """Forward ``request`` (default: the client's), asking for ``output`` too if its filter leaves
        it out (``added_output``: removed again before the answer leaves)."""
        assert call.request is not None
        if call.request.output_filter and output not in call.request.output_filter:
            if request is None:
                request = predict_pb2.PredictRequest()
                request.CopyFrom(call.request)
            request.output_filter.append(output)
            state.added_output = output
        if request is not None:
            call.forward_raw = request.SerializeToString()

    async def _reconstruct(self, protected: ProtectedModel, x: np.ndarray, call: Call) -> np.ndarray:
        target = protected.autoencoder_call()
        assert target is not None
        model_name, output = target
        pool = self._upstream()
        assert pool is not None
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.inputs[protected.manifest.input].CopyFrom(numpy_to_tensor(x, as_tensor_content=True))
        raw = await pool.callable_for(PREDICT_PATH)(request.SerializeToString(), timeout=call.timeout_s)
        response = predict_pb2.PredictResponse.FromString(raw)
        return tensor_to_numpy(response.outputs[output], output, RESPONSE_MAX_ELEMENTS)

    async def on_response(self, call: Call, response: bytes) -> bytes:
        state = call.detect_state
        if not isinstance(state, _CallState):
            return response
        protected = state.model
        if call.forward_raw is not None and state.parts > 1:
            response = self._score_shared(state, protected.squeezer, response)
        if protected.margin is not None:
            response = self._score_margin(state, protected.margin, response)
        if state.autoencoder is not None and protected.autoencoder is not None:
            detector = protected.autoencoder
            try:
                reconstruction = await state.autoencoder
                scores = detector.score(state.x, lambda _model, _batch: reconstruction)
            except (grpc.aio.AioRpcError, Exception) as exc:  # noqa: B014 (name the gRPC case)
                self._fail("detector_error", detector.name, exc, answered=True)
            else:
                self._verdict(state, detector, scores)
        if protected.fusion is not None:
            self._score_fusion(state, protected.fusion)
        return response

    def _score_fusion(self, state: _CallState, fusion: FisherFusion) -> None:
        """One verdict from the fused detectors' scores of this call (each must have scored it)."""
        try:
            scores = fusion.score({d.detector: d.scores for d in state.detections})
        except Exception as exc:  # a member that failed (failure mode open) leaves the fusion unscored
            self._fail("detector_error", fusion.name, exc, answered=True)
            return
        self._verdict(state, fusion, scores)

    def _score_shared(self, state: _CallState, squeezer: FeatureSqueezing | None, raw: bytes) -> bytes:
        """Score squeezing and magnet_jsd from the combined response; return the client's rows only."""
        response = predict_pb2.PredictResponse.FromString(raw)
        n, parts = state.rows, state.parts
        output = state.model.manifest.output
        divergence = state.model.divergence if state.shares_reconstruction else None
        decoded: dict[str, np.ndarray] = {}
        blocks: list[np.ndarray] = []
        try:
            decoded[output] = tensor_to_numpy(response.outputs[output], output, RESPONSE_MAX_ELEMENTS)
            blocks = np.split(decoded[output], parts)
            state.outputs = blocks[0]
        except Exception as exc:  # a malformed or unexpected response must not escape unscored silently
            for detector in (squeezer, divergence):
                if detector is not None:
                    self._fail("detector_error", detector.name, exc, answered=True)
        scored: list[tuple[Detector, np.ndarray]] = []
        if blocks:
            original, *variants = blocks
            reconstructed = variants.pop() if divergence is not None else None  # AE(x) rides last
            if squeezer is not None:
                try:
                    scored.append((squeezer, squeezer.score_outputs(original, variants)))
                except Exception as exc:
                    self._fail("detector_error", squeezer.name, exc, answered=True)
            if divergence is not None:
                try:
                    scored.append((divergence, divergence.score_outputs(original, reconstructed)))
                except Exception as exc:
                    self._fail("detector_error", divergence.name, exc, answered=True)
        for key, tensor in response.outputs.items():
            values = decoded[key] if key in decoded else tensor_to_numpy(tensor, key, RESPONSE_MAX_ELEMENTS)
            if values.ndim and len(values) == n * parts:
                mine = numpy_to_tensor(
                    values[:n], as_tensor_content=tensor_uses_content(tensor), dtype=tensor.dtype
                )
                tensor.CopyFrom(mine)
        if state.added_output == output:
            del response.outputs[output]
            state.added_output = None
        for detector, scores in scored:
            self._verdict(state, detector, scores)
        return response.SerializeToString()

    def _score_margin(self, state: _CallState, margin: MarginDetector, raw: bytes) -> bytes:
        """Score the client's rows of the model's output; the response leaves unchanged (byte for byte,
        unless the output was added for scoring only and is removed again)."""
        outputs = state.outputs if margin.output == state.model.manifest.output else None
        try:
            if outputs is None:
                response = predict_pb2.PredictResponse.FromString(raw)
                if margin.output not in response.outputs:
                    raise ValueError(f"the response has no output '{margin.output}'")
                outputs = tensor_to_numpy(
                    response.outputs[margin.output], margin.output, RESPONSE_MAX_ELEMENTS
                )
                if state.added_output == margin.output:
                    del response.outputs[margin.output]
                    state.added_output = None
                    raw = response.SerializeToString()
            if len(outputs) != state.rows:
                raise ValueError(f"output '{margin.output}' has {len(outputs)} rows for {state.rows} inputs")
            scores = margin.score_outputs(outputs)
        except Exception as exc:  # a malformed or unexpected response must not escape unscored silently
            self._fail("detector_error", margin.name, exc, answered=True)
            return raw
        self._verdict(state, margin, scores)
        return raw

    async def close(self) -> None:
        for protected in self.models.values():
            if protected.batcher is not None:
                await protected.batcher.close()
        self._executor.shutdown(wait=False)

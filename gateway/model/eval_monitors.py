"""``tfshield eval monitors``: query-based attacks and a benign crowd through one monitored gateway.

Steps (progress is printed; a full run takes about 10–15 minutes on 2 CPU cores):

1. The demo model (``train_demo_model``, cached) and its data split
   (:func:`~gateway.model.calibrate.demo_reference`).
2. The per-client monitors are calibrated once with
   :func:`~gateway.model.calibrate.calibrate_monitor_suite` against a model
   server, on benign sequences drawn from the *calibration* split, and cached
   in ``--out/suite`` (reused while its ``monitors.json`` lists today's default monitors).
3. A model server and ONE gateway in front of it: monitors on the memory
   store, the control API (bearer token), and a policy that only records: the
   built-in default policy with its ladder in shadow mode, so no attack is
   slowed or refused mid-run by the ladder (the rate-limit quota still
   applies; refusals are retried and counted) and "how far it got" is
   measured. Every attacker and every benign client has its own
   ``x-api-key``, so the gateway sees each as one client (``key:<hash>``).
4. Benign clients (a thread with its own asyncio loop, concurrent with the
   attacks): ordinary users (random draws from the held-out digits),
   heavy users sending as many queries as an extraction attacker's budget,
   and re-senders (the same digit again, lightly re-encoded with
   :func:`~detectors.monitor_calibration.reencode_lightly`). Each has its own
   rhythm (start offset, mean gap between calls, samples per call). After
   every call a client reads its own risk (``GetClient``), and a watcher polls
   ``ListClients(min_risk=0.5)``: a client is *flagged* if its risk was ever
   ≥ 0.5 (a monitor crossed its threshold, :mod:`detectors.risk`).
5. Attacks, one after the other, each its own client, through
   ``art.estimators.classification.BlackBoxClassifierNeuralNetwork`` whose
   predict function sends the batch through the gateway (in calls of at most
   ``chunk`` samples; n samples = n queries) and reads the attacker's risk
   after every call:

   - evasion (untargeted, on held-out digits the model classifies right; each
     digit is its own client): HopSkipJump (L2), BoundaryAttack, SquareAttack
     (L∞, ε = 0.3), SimBA (DCT). Progress = the smallest L2 distance to the
     original of any query the model already misclassified (the best
     adversarial example the attacker holds), at the first flag and at the end.
   - extraction (thief data disjoint from the benign clients' digits):
     KnockoffNets random and adaptive sampling on the demo's training digits
     (in-distribution natural data), CopycatCNN on out-of-domain images
     (training digits rotated, mirrored or inverted), and a Papernot-style
     Jacobian-based dataset augmentation (JbDA) from 10 seed digits per class.
     Progress = top-1 agreement with the victim, on the held-out digits, of a
     substitute trained (same small CNN and recipe for all) on the attacker's
     queries and the answers it got up to the first flag, and up to the end.
     For each extraction attack the same substitute is also trained on what
     the policy's output defences would have returned (perturbation level 2
     and label-only), and the rate-limit quota's minimum time cost is given.
6. Report (stdout, ``monitors_eval.md``, ``monitors_eval.json``) and
   ``risk_over_queries.png``: each attack client's risk after each call.

Each attack has a query budget and a time limit; both are in the report.
``--quick`` runs tiny budgets and a few benign clients (for tests); its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import TfshieldError
from gateway.model.evaluate import add_common_arguments

MODEL_NAME = "mnist"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
FLAG_RISK = 0.5  # a client's risk is >= 0.5 iff some monitor flagged it (detectors/risk.py)
DEFAULT_OUT = Path("eval-results") / "monitors"
DEFAULT_TARGET_FPR = 0.001
CONTROL_TOKEN = "tfshield-eval-monitors-token"
ID_SALT = "tfshield-eval-monitors-id-salt"
FINGERPRINT_SALT = "tfshield-eval-monitors-fingerprint-salt"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
CONTROL = "/tfshield.control.v1.Control/"
# Goals (issue 6, point 5).
GOAL_EVASION_QUERIES = 50
GOAL_EXTRACTION_QUERIES = 500
EVASION = ("hopskipjump", "boundary", "square", "simba")
EXTRACTION = ("knockoff_random", "knockoff_adaptive", "copycat", "jbda")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Budget:
    evasion_digits: int = 3
    evasion_queries: int = 300  # per digit (each digit is one client)
    evasion_time_s: float = 60.0  # per digit
    evasion_chunk: int = 10  # samples per Predict call: the resolution of "queries until flagged"
    extraction_queries: int = 2000
    extraction_time_s: float = 240.0
    extraction_chunk: int = 25
    n_random: int = 30
    n_heavy: int = 4
    n_resend: int = 16
    random_length: tuple[int, int] = (50, 400)
    resend_length: tuple[int, int] = (100, 600)
    benign_duration_s: float = 300.0  # each benign client spreads its calls over about this long
    substitute_epochs: int = 10
    calibration: dict[str, Any] = field(default_factory=dict)  # calibrate_monitor_suite sequence_options

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            evasion_digits=1,
            evasion_queries=60,
            evasion_time_s=20.0,
            extraction_queries=150,
            extraction_time_s=40.0,
            n_random=3,
            n_heavy=1,
            n_resend=2,
            random_length=(20, 40),
            resend_length=(20, 40),
            benign_duration_s=15.0,
            substitute_epochs=1,
            calibration={
                "n_random": 6,
                "n_heavy": 1,
                "n_resend": 3,
                "random_length": (20, 60),
                "heavy_length": (100, 150),
                "resend_length": (20, 60),
            },
        )

    @property
    def n_benign(self) -> int:
        return self.n_random + self.n_heavy + self.n_resend


class BudgetExhausted(Exception):
    """Raised inside an attack's predict function when its query budget or time limit is spent."""


# -- talking to the gateway ------------------------------------------------------------------


def _request_bytes(batch: np.ndarray) -> bytes:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    batch = np.ascontiguousarray(batch, dtype=np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs[INPUT_NAME].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in batch.shape]
            ),
            tensor_content=batch.tobytes(),
        )
    )
    return request.SerializeToString()


def _probabilities(response: bytes) -> np.ndarray:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    return tf.make_ndarray(predict_pb2.PredictResponse.FromString(response).outputs[OUTPUT_NAME])


def client_id(api_key: str) -> str:
    from gateway.config import IdentityConfig
    from gateway.identity import ClientIdentifier

    return "key:" + ClientIdentifier(IdentityConfig(), salt=ID_SALT.encode()).hash_key(api_key)


@dataclass
class Trace:
    """One client's life as the gateway saw it: risk after each call, first flag, refusals."""

    name: str
    kind: str
    api_key: str
    queries: int = 0
    calls: int = 0
    rate_limited: int = 0
    rate_limited_wait_s: float = 0.0
    queries_at_flag: int | None = None
    flagging_monitors: list[str] = field(default_factory=list)
    max_risk: float = 0.0
    max_risk_monitor: str | None = None  # the monitor with the largest risk when the client's risk peaked
    risk_points: list[tuple[int, float]] = field(default_factory=list)  # (queries so far, risk)
    started_s: float = 0.0
    elapsed_s: float = 0.0
    stopped_by: str = "finished"

    @property
    def client_id(self) -> str:
        return client_id(self.api_key)

    def record(self, risk: float, monitor_risk: dict[str, float]) -> bool:
        """Note the risk after a call; True on the first flag."""
        self.risk_points.append((self.queries, risk))
        if risk > self.max_risk:
            self.max_risk = risk
            if monitor_risk:
                self.max_risk_monitor = max(monitor_risk, key=lambda m: monitor_risk[m])
        if risk >= FLAG_RISK and self.queries_at_flag is None:
            self.queries_at_flag = self.queries
            self.flagging_monitors = sorted(m for m, r in monitor_risk.items() if r >= FLAG_RISK)
            return True
        return False


class GatewayClient:
    """One attacker: a sync channel to the gateway and one to its control API."""

    def __init__(self, gateway: str, control: str, trace: Trace) -> None:
        import grpc

        self.trace = trace
        self._grpc = grpc
        options = [("grpc.max_send_message_length", 2**28), ("grpc.max_receive_message_length", 2**28)]
        self._channel = grpc.insecure_channel(gateway, options=options)
        self._control = grpc.insecure_channel(control)
        self._predict = self._channel.unary_unary(PREDICT)
        self._get_client = self._control.unary_unary(CONTROL + "GetClient")

    def close(self) -> None:
        self._channel.close()
        self._control.close()

    def risk(self) -> tuple[float, dict[str, float]]:
        from protos import control_pb2

        raw = self._get_client(
            control_pb2.GetClientRequest(client_id=self.trace.client_id).SerializeToString(),
            metadata=(("authorization", f"Bearer {CONTROL_TOKEN}"),),
            timeout=10,
        )
        state = control_pb2.ClientState.FromString(raw)
        return state.risk, dict(state.monitor_risk)

    def send(self, batch: np.ndarray) -> tuple[np.ndarray, bool]:
        """Predict one call's batch through the gateway; returns (probabilities, flagged now)."""
        request = _request_bytes(batch)
        metadata = (("x-api-key", self.trace.api_key),)
        while True:
            try:
                response = self._predict(request, metadata=metadata, timeout=60)
                break
            except self._grpc.RpcError as exc:
                if exc.code() != self._grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise TfshieldError(
                        f"{self.trace.name}: Predict through the gateway failed: "
                        f"{exc.code().name}: {exc.details()}"
                    ) from None
                # The quota (rate_limit monitor): wait and retry, as a patient attacker would.
                self.trace.rate_limited += 1
                self.trace.rate_limited_wait_s += 0.25
                time.sleep(0.25)
        self.trace.queries += len(batch)
        self.trace.calls += 1
        risk, monitor_risk = self.risk()
        return _probabilities(response), self.trace.record(risk, monitor_risk)


class AttackOracle:
    """The predict function ART calls: through the gateway, within a budget, watching progress.

    ``on_queries(x, probabilities)`` sees every answered chunk (progress
    tracking); ``on_flag()`` is called once, right after the call that got
    the client flagged.
    """

    def __init__(
        self,
        client: GatewayClient,
        max_queries: int,
        time_limit_s: float,
        chunk: int,
        on_queries: Callable[[np.ndarray, np.ndarray], None] | None = None,
        on_flag: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.max_queries = max_queries
        self.deadline = time.monotonic() + time_limit_s
        self.chunk = chunk
        self.on_queries = on_queries
        self.on_flag = on_flag

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28, 1)
        out = []
        trace = self.client.trace
        for start in range(0, len(x), self.chunk):
            if trace.queries >= self.max_queries:
                trace.stopped_by = "query budget"
                raise BudgetExhausted
            if time.monotonic() > self.deadline:
                trace.stopped_by = "time limit"
                raise BudgetExhausted
            part = x[start : start + min(self.chunk, self.max_queries - trace.queries)]
            probabilities, flagged = self.client.send(part)
            if self.on_queries is not None:
                self.on_queries(part, probabilities)
            if flagged and self.on_flag is not None:
                self.on_flag()
            out.append(probabilities)
            if len(part) < min(self.chunk, len(x) - start):  # the budget cut this chunk short
                trace.stopped_by = "query budget"
                raise BudgetExhausted
        return np.concatenate(out).reshape(len(x), -1)


def art_blackbox(oracle: AttackOracle) -> Any:
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    return BlackBoxClassifierNeuralNetwork(
        oracle, input_shape=(28, 28, 1), nb_classes=10, channels_first=False, clip_values=(0.0, 1.0)
    )


# -- benign clients ----------------------------------------------------------------------------


@dataclass
class BenignClient:
    trace: Trace
    sequence: np.ndarray
    start_delay_s: float
    mean_gap_s: float
    max_per_call: int


def benign_population(pool: np.ndarray, budget: Budget, rng: np.random.Generator) -> list[BenignClient]:
    """Ordinary users, heavy users (the extraction budget's volume) and re-senders, each with a rhythm."""
    from detectors.monitor_calibration import benign_sequences

    def sequences(**kinds: Any) -> list[np.ndarray]:
        counts = {"n_random": 0, "n_heavy": 0, "n_resend": 0}
        counts.update({k: v for k, v in kinds.items() if k.startswith("n_")})
        return benign_sequences(
            pool, rng, **counts, **{k: v for k, v in kinds.items() if not k.startswith("n_")}
        )

    heavy_length = (budget.extraction_queries, budget.extraction_queries)
    groups = {
        "random": sequences(n_random=budget.n_random, random_length=budget.random_length),
        "heavy": sequences(n_heavy=budget.n_heavy, heavy_length=heavy_length),
        "resend": sequences(n_resend=budget.n_resend, resend_length=budget.resend_length),
    }
    clients = []
    for kind, seqs in groups.items():
        for i, seq in enumerate(seqs):
            # Heavy users send small batches; others mostly one digit per call.
            max_per_call = int(rng.integers(4, 21)) if kind == "heavy" else int(rng.choice([1, 1, 1, 2, 4]))
            calls = int(np.ceil(len(seq) / ((1 + max_per_call) / 2)))
            start = float(rng.uniform(0.0, 0.15 * budget.benign_duration_s))
            span = (budget.benign_duration_s - start) * float(rng.uniform(0.6, 1.0))
            clients.append(
                BenignClient(
                    Trace(f"benign-{kind}-{i:02d}", kind, f"benign-{kind}-{i:02d}-{rng.integers(1 << 30)}"),
                    seq,
                    start,
                    span / max(calls, 1),
                    max_per_call,
                )
            )
    return clients


class BenignCrowd:
    """Runs the benign clients concurrently (grpc.aio, own thread and loop) while attacks run."""

    def __init__(self, gateway: str, control: str, clients: list[BenignClient], seed: int) -> None:
        self.gateway = gateway
        self.control = control
        self.clients = clients
        self.seed = seed
        self.listed_flagged: set[str] = set()  # client ids ListClients(min_risk=0.5) ever returned
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="benign-crowd", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._stop.set()  # let each client finish its call in flight
            self._thread.join(30)
        return not self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Cancel every client at once (the evaluation failed or got SIGTERM); True once the thread ended."""
        self._stop.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop.call_soon_threadsafe(task.cancel)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def poll_flagged(self) -> None:
        """One ListClients(min_risk=0.5) from the caller's thread (also run at the end)."""
        import grpc

        from protos import control_pb2

        with grpc.insecure_channel(self.control) as channel:
            raw = channel.unary_unary(CONTROL + "ListClients")(
                control_pb2.ListClientsRequest(limit=1000, min_risk=FLAG_RISK).SerializeToString(),
                metadata=(("authorization", f"Bearer {CONTROL_TOKEN}"),),
                timeout=10,
            )
        self.listed_flagged |= {c.client_id for c in control_pb2.ListClientsResponse.FromString(raw).clients}

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            if not self._stop.is_set():  # stop() may have run before the loop existed
                await self._main()

        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(main())

    async def _main(self) -> None:
        import grpc

        from protos import control_pb2

        metadata_auth = (("authorization", f"Bearer {CONTROL_TOKEN}"),)
        async with (
            grpc.aio.insecure_channel(self.gateway) as channel,
            grpc.aio.insecure_channel(self.control) as control,
        ):
            predict = channel.unary_unary(PREDICT)
            get_client = control.unary_unary(CONTROL + "GetClient")
            list_clients = control.unary_unary(CONTROL + "ListClients")

            async def one(client: BenignClient, rng: np.random.Generator) -> None:
                trace = client.trace
                await asyncio.sleep(client.start_delay_s)
                trace.started_s = time.monotonic()
                request_id = control_pb2.GetClientRequest(client_id=trace.client_id).SerializeToString()
                i = 0
                while i < len(client.sequence) and not self._stop.is_set():
                    n = int(rng.integers(1, client.max_per_call + 1))
                    batch = client.sequence[i : i + n]
                    try:
                        await predict(
                            _request_bytes(batch), metadata=(("x-api-key", trace.api_key),), timeout=60
                        )
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            trace.rate_limited += 1
                            trace.rate_limited_wait_s += 0.25
                            await asyncio.sleep(0.25)
                            continue
                        self.errors.append(f"{trace.name}: {exc.code().name}: {exc.details()}")
                        return
                    i += len(batch)
                    trace.queries += len(batch)
                    trace.calls += 1
                    state = control_pb2.ClientState.FromString(
                        await get_client(request_id, metadata=metadata_auth, timeout=10)
                    )
                    trace.record(state.risk, dict(state.monitor_risk))
                    await asyncio.sleep(float(rng.exponential(client.mean_gap_s)))
                trace.elapsed_s = time.monotonic() - trace.started_s

            async def watch() -> None:
                while True:
                    raw = await list_clients(
                        control_pb2.ListClientsRequest(limit=1000, min_risk=FLAG_RISK).SerializeToString(),
                        metadata=metadata_auth,
                        timeout=10,
                    )
                    listed = control_pb2.ListClientsResponse.FromString(raw).clients
                    self.listed_flagged |= {c.client_id for c in listed}
                    await asyncio.sleep(2.0)

            watcher = asyncio.ensure_future(watch())
            rngs = np.random.default_rng(self.seed).spawn(len(self.clients))
            await asyncio.gather(*(one(c, r) for c, r in zip(self.clients, rngs, strict=True)))
            watcher.cancel()


# -- the victim, substitutes and thief data ----------------------------------------------------------


def substitute_model(seed: int) -> Any:
    """The attacker's copy: a small CNN (logits), the same for every extraction attack."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential(
        [
            tf.keras.Input((28, 28, 1)),
            tf.keras.layers.Conv2D(16, 3, activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Conv2D(32, 3, activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )


def art_substitute(seed: int) -> Any:
    import tensorflow as tf
    from art.estimators.classification import TensorFlowV2Classifier

    model = substitute_model(seed)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    loss = tf.keras.losses.CategoricalCrossentropy(from_logits=True)

    def train_step(model: Any, images: Any, labels: Any) -> None:
        with tf.GradientTape() as tape:
            value = loss(labels, model(images, training=True))
        gradients = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))

    return TensorFlowV2Classifier(
        model=model,
        nb_classes=10,
        input_shape=(28, 28, 1),
        loss_object=loss,
        train_step=train_step,
        clip_values=(0.0, 1.0),
    )


def train_substitute(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> Any:
    """A fresh substitute fitted to answers ``y`` (probability rows) for ``x``; returns the Keras model."""
    import tensorflow as tf

    model = substitute_model(seed)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return model


def agreement(model: Any, x_eval: np.ndarray, victim_top1: np.ndarray) -> float:
    return float(np.mean(model.predict(x_eval, batch_size=256, verbose=0).argmax(axis=1) == victim_top1))


def out_of_domain(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CopycatCNN's non-problem-domain images: digits rotated by 90/180/270°, mirrored, or inverted."""
    out = np.empty_like(x)
    for i, image in enumerate(x):
        kind = int(rng.integers(4))
        if kind < 3:
            image = np.rot90(image, k=kind + 1, axes=(0, 1))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if rng.random() < 0.5:
            image = 1.0 - image
        out[i] = image
    return out


# -- attacks -------------------------------------------------------------------------------------------


@dataclass
class AttackResult:
    attack: str
    family: str  # evasion or extraction
    label: str
    traces: list[Trace] = field(default_factory=list)
    progress_at_flag: list[float | None] = field(default_factory=list)  # per client
    progress_final: list[float | None] = field(default_factory=list)
    defended: dict[str, float] = field(default_factory=dict)  # extraction: agreement under output defences
    notes: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def detected(self) -> bool:
        return bool(self.traces) and all(t.queries_at_flag is not None for t in self.traces)

    @property
    def median_queries_to_flag(self) -> float | None:
        values = [t.queries_at_flag for t in self.traces if t.queries_at_flag is not None]
        return float(statistics.median(values)) if values else None


EVASION_LABELS = {
    "hopskipjump": "HopSkipJump (L2)",
    "boundary": "BoundaryAttack",
    "square": "SquareAttack (Linf 0.3)",
    "simba": "SimBA (DCT)",
}
EXTRACTION_LABELS = {
    "knockoff_random": "KnockoffNets random",
    "knockoff_adaptive": "KnockoffNets adaptive",
    "copycat": "CopycatCNN (out-of-domain)",
    "jbda": "Papernot JbDA",
}


def make_evasion_attack(name: str, classifier: Any, budget: Budget) -> Any:
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SimBA, SquareAttack

    if name == "hopskipjump":
        return HopSkipJump(
            classifier,
            targeted=False,
            norm=2,
            max_iter=50,
            max_eval=100,
            init_eval=10,
            init_size=20,
            batch_size=64,
            verbose=False,
        )
    if name == "boundary":
        return BoundaryAttack(
            classifier,
            targeted=False,
            delta=0.01,
            epsilon=0.01,
            max_iter=budget.evasion_queries,
            num_trial=10,
            sample_size=10,
            init_size=50,
            batch_size=64,
            verbose=False,
        )
    if name == "square":
        return SquareAttack(
            classifier,
            norm=np.inf,
            eps=0.3,
            max_iter=budget.evasion_queries,
            p_init=0.8,
            nb_restarts=1,
            batch_size=1,
            verbose=False,
        )
    if name == "simba":
        return SimBA(
            classifier,
            attack="dct",
            max_iter=budget.evasion_queries,
            epsilon=0.2,
            freq_dim=7,
            batch_size=1,
            verbose=False,
        )
    raise TfshieldError(f"unknown evasion attack '{name}'")


class EvasionProgress:
    """The best adversarial example an evasion attacker holds: the smallest L2 distance to the
    original of any query the model already misclassified (None: none yet), now and at the flag."""

    def __init__(self, x0: np.ndarray, label: int) -> None:
        self.x0 = x0
        self.label = label
        self.best_l2: float | None = None
        self.at_flag: float | None = None

    def on_queries(self, x: np.ndarray, p: np.ndarray) -> None:
        wrong = p.argmax(axis=1) != self.label
        if wrong.any():
            distances = np.sqrt(((x[wrong] - self.x0[None]) ** 2).reshape(int(wrong.sum()), -1).sum(axis=1))
            l2 = float(distances.min())
            self.best_l2 = l2 if self.best_l2 is None else min(self.best_l2, l2)

    def on_flag(self) -> None:
        self.at_flag = self.best_l2


def run_evasion(
    name: str, targets: list[tuple[np.ndarray, int]], gateway: Any, budget: Budget, log: Log
) -> AttackResult:
    result = AttackResult(name, "evasion", EVASION_LABELS[name])
    for i, (x0, label) in enumerate(targets):
        trace = Trace(f"{name}-{i}", "evasion", f"attacker-{name}-{i}")
        client = GatewayClient(gateway.address(), gateway.address("control"), trace)
        progress = EvasionProgress(x0, label)
        oracle = AttackOracle(
            client,
            budget.evasion_queries,
            budget.evasion_time_s,
            budget.evasion_chunk,
            progress.on_queries,
            progress.on_flag,
        )
        attack = make_evasion_attack(name, art_blackbox(oracle), budget)
        started = time.monotonic()
        try:
            attack.generate(x0[None], y=np.eye(10, dtype=np.float32)[[label]])
        except BudgetExhausted:
            pass
        except Exception as exc:  # an ART failure is reported, not hidden
            result.errors.append(f"{trace.name}: {type(exc).__name__}: {exc}")
            trace.stopped_by = "error"
        finally:
            client.close()
        trace.elapsed_s = time.monotonic() - started
        result.traces.append(trace)
        result.progress_at_flag.append(progress.at_flag)
        result.progress_final.append(progress.best_l2)
        log(
            f"  {trace.name:<22} {trace.queries:>5} queries in {trace.elapsed_s:5.1f} s "
            f"({trace.stopped_by}); "
            f"flagged at {trace.queries_at_flag} by {','.join(trace.flagging_monitors) or '-'}; "
            f"best adversarial L2 at flag {_num(progress.at_flag)}, at end {_num(progress.best_l2)}"
        )
    return result


def run_extraction(
    name: str,
    thief: tuple[np.ndarray, np.ndarray],
    eval_set: tuple[np.ndarray, np.ndarray],
    gateway: Any,
    budget: Budget,
    seed: int,
    log: Log,
) -> AttackResult:
    """One extraction attack as one client; the answers it got are kept for the substitutes."""
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    result = AttackResult(name, "extraction", EXTRACTION_LABELS[name])
    trace = Trace(name, "extraction", f"attacker-{name}")
    client = GatewayClient(gateway.address(), gateway.address("control"), trace)
    seen_x: list[np.ndarray] = []
    seen_p: list[np.ndarray] = []

    def on_queries(x: np.ndarray, p: np.ndarray) -> None:
        seen_x.append(np.array(x))
        seen_p.append(np.array(p))

    chunk = 1 if name == "knockoff_adaptive" else budget.extraction_chunk
    oracle = AttackOracle(client, budget.extraction_queries, budget.extraction_time_s, chunk, on_queries)
    victim = art_blackbox(oracle)
    x_thief, y_thief = thief
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    try:
        if name == "knockoff_random":
            KnockoffNets(
                victim,
                batch_size_fit=32,
                batch_size_query=chunk,
                nb_epochs=1,
                nb_stolen=budget.extraction_queries,
                sampling_strategy="random",
                use_probability=True,
                verbose=False,
            ).extract(x_thief, thieved_classifier=art_substitute(seed))
        elif name == "knockoff_adaptive":
            KnockoffNets(
                victim,
                batch_size_fit=1,
                batch_size_query=1,
                nb_epochs=1,
                nb_stolen=budget.extraction_queries,
                sampling_strategy="adaptive",
                reward="all",
                use_probability=True,
                verbose=False,
            ).extract(
                x_thief, y=np.eye(10, dtype=np.float32)[y_thief], thieved_classifier=art_substitute(seed)
            )
        elif name == "copycat":
            CopycatCNN(
                victim,
                batch_size_fit=32,
                batch_size_query=chunk,
                nb_epochs=1,
                nb_stolen=budget.extraction_queries,
                use_probability=True,
            ).extract(out_of_domain(x_thief, rng), thieved_classifier=art_substitute(seed))
        elif name == "jbda":
            jbda(victim, x_thief, y_thief, budget, seed)
        else:
            raise TfshieldError(f"unknown extraction attack '{name}'")
    except BudgetExhausted:
        pass
    except Exception as exc:
        result.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        trace.stopped_by = "error"
    finally:
        client.close()
    trace.elapsed_s = time.monotonic() - started
    result.traces.append(trace)

    x_all = np.concatenate(seen_x) if seen_x else np.zeros((0, 28, 28, 1), np.float32)
    p_all = np.concatenate(seen_p) if seen_p else np.zeros((0, 10), np.float32)
    x_eval, victim_top1 = eval_set
    flag = trace.queries_at_flag
    at_flag = None
    if flag:
        at_flag = agreement(
            train_substitute(x_all[:flag], p_all[:flag], budget.substitute_epochs, seed), x_eval, victim_top1
        )
    final = (
        agreement(train_substitute(x_all, p_all, budget.substitute_epochs, seed), x_eval, victim_top1)
        if len(x_all)
        else None
    )
    result.progress_at_flag.append(at_flag)
    result.progress_final.append(final)
    if len(x_all):
        result.defended = defended_agreement(x_all, p_all, (x_eval, victim_top1), budget, seed)
    log(
        f"  {trace.name:<22} {trace.queries:>5} queries in {trace.elapsed_s:5.1f} s ({trace.stopped_by}); "
        f"flagged at {flag} by {','.join(trace.flagging_monitors) or '-'}; substitute agreement at flag "
        f"{_num(at_flag)}, at end {_num(final)}; with output defences {result.defended}"
    )
    return result


def jbda(victim: Any, x_pool: np.ndarray, y_pool: np.ndarray, budget: Budget, seed: int) -> None:
    """Papernot et al. 2017 ("Practical Black-Box Attacks against Machine Learning"): Jacobian-based
    dataset augmentation. Seed: 10 attacker digits per class; each round the substitute is trained on
    every answer so far and the set doubles with x + λ·sign(∂ logit_{ŷ(x)} / ∂x), λ = 0.1."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    seed_idx = np.concatenate([rng.choice(np.flatnonzero(y_pool == c), 10, replace=False) for c in range(10)])
    new = x_pool[seed_idx].astype(np.float32)
    xs: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    model = substitute_model(seed)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    for _ in range(12):
        ps.append(victim.predict(new, batch_size=len(new)))
        xs.append(new)
        x_all, p_all = np.concatenate(xs), np.concatenate(ps)
        model.fit(x_all, p_all, batch_size=32, epochs=budget.substitute_epochs, verbose=0)
        x_t = tf.convert_to_tensor(new)
        labels = model(x_t).numpy().argmax(axis=1)
        with tf.GradientTape() as tape:
            tape.watch(x_t)
            picked = tf.gather(model(x_t), labels, axis=1, batch_dims=1)
        gradient = tape.gradient(picked, x_t).numpy()
        new = np.clip(x_all + 0.1 * np.sign(_repeat_to(gradient, len(x_all))), 0.0, 1.0).astype(np.float32)


def _repeat_to(gradient: np.ndarray, n: int) -> np.ndarray:
    """Gradients were computed on the latest points; older ones reuse theirs cyclically (cheap JbDA)."""
    return gradient[np.arange(n) % len(gradient)]


def defended_agreement(
    x: np.ndarray, p: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray], budget: Budget, seed: int
) -> dict[str, float]:
    """The same substitute trained on what the policy's output defences would have answered."""
    from detectors import perturb

    level2 = perturb.rounding(perturb.top_k(perturb.reverse_sigmoid(p, 0.6, 0.4), 3), 2)
    answers = {"perturb_level_2": level2, "label_only": perturb.label_only(p)}
    x_eval, victim_top1 = eval_set
    return {
        name: agreement(train_substitute(x, y, budget.substitute_epochs, seed), x_eval, victim_top1)
        for name, y in answers.items()
    }


# -- the run ---------------------------------------------------------------------------------------


def recording_policy_yaml() -> str:
    """The built-in default policy with its ladder in shadow mode: decisions recorded, every call allowed."""
    from gateway.policy import DEFAULT_POLICY_YAML

    text = DEFAULT_POLICY_YAML.replace("  shadow: false\n", "  shadow: true\n", 1)
    if text == DEFAULT_POLICY_YAML:
        raise TfshieldError("cannot put the default policy's ladder in shadow mode: its text changed")
    return text


def evaluate(
    out: Path,
    cache_dir: Path | None = None,
    quick: bool = False,
    target_fpr: float = DEFAULT_TARGET_FPR,
    seed: int = 0,
    attacks: tuple[str, ...] = EVASION + EXTRACTION,
    log: Log = print,
) -> dict[str, Any]:
    """Run the whole evaluation (see the module docstring); returns the report written as JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from gateway.model.calibrate import (
        UpstreamPredictor,
        calibrate_monitor_suite,
        demo_heldout_labels,
        demo_reference,
    )
    from gateway.model.data import DEFAULT_SEED, split_mnist
    from gateway.model.demo import DemoArtifacts, train_demo_model
    from gateway.model.processes import ServerProcess, start_server, tfshield_command

    budget = Budget.quick() if quick else Budget()
    started = time.monotonic()
    timings: dict[str, float] = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    models = out / "models"
    suite_dir = out / ("suite-quick" if quick else "suite") / f"fpr-{target_fpr:g}"
    for stale in (run_dir, models):
        shutil.rmtree(stale, ignore_errors=True)
    models.mkdir(parents=True)

    log(f"[1/6] demo model ({DemoArtifacts.at(cache_dir).root})")
    train_demo_model(cache_dir, log=lambda line: log("  " + line.lstrip()))
    demo = DemoArtifacts.at(cache_dir)
    (models / MODEL_NAME).symlink_to(demo.export_dir.parent.resolve(), target_is_directory=True)
    reference = demo_reference(cache_dir)
    heldout_labels = demo_heldout_labels(cache_dir)
    train = split_mnist(DEFAULT_SEED)  # the attackers' own digits: the fit split, never the held-out part

    servers: list[ServerProcess] = []
    env = {"TFSHIELD_ID_SALT": ID_SALT, "TFSHIELD_FINGERPRINT_SALT": FINGERPRINT_SALT}
    os.environ.setdefault("TFSHIELD_FINGERPRINT_SALT", FINGERPRINT_SALT)
    results: list[AttackResult] = []
    crowd: BenignCrowd | None = None
    try:
        step = time.monotonic()
        server = start_server(
            tfshield_command("model-server", "--model-base-path", str(models), "--port", "0"),
            run_dir,
            "model-server",
        )
        servers.append(server)
        if _cached_suite_is_current(suite_dir):
            log(f"[2/6] monitor suite: cached in {suite_dir}")
        else:
            shutil.rmtree(suite_dir, ignore_errors=True)
            log(
                "[2/6] calibrating the monitors on the calibration split "
                f"(target FPR {target_fpr} per client)"
            )
            calibrate_monitor_suite(
                MODEL_NAME,
                reference,
                server.address(),
                suite_dir,
                target_fpr=target_fpr,
                seed=seed,
                sequence_options=budget.calibration or None,
                log=lambda line: log("  " + line),
            )
        timings["calibrate_s"] = time.monotonic() - step

        log("[3/6] gateway with the monitors (memory store), control API and a recording policy")
        (run_dir / "token").write_text(CONTROL_TOKEN + "\n")
        (run_dir / "policy.yaml").write_text(recording_policy_yaml())
        config = {
            "monitors": {
                "models": [{"model": MODEL_NAME, "suite": str(suite_dir.resolve())}],
                "store": {"backend": "memory"},
                "failure_mode": "closed",
            },
            "control": {"listen": "127.0.0.1:0", "token_file": str((run_dir / "token").resolve())},
            "policy": {"file": str((run_dir / "policy.yaml").resolve())},
        }
        (run_dir / "gateway.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        gateway = start_server(
            tfshield_command(
                "serve",
                "--config",
                str(run_dir / "gateway.yaml"),
                "--upstream",
                server.address(),
                "--port",
                "0",
                "--metrics-port",
                "0",
            ),
            run_dir,
            "gateway",
            timeout_s=60,
            env=env,
        )
        servers.append(gateway)
        log(
            f"  model server {server.address()}, gateway {gateway.address()}, "
            f"control {gateway.address('control')}"
        )

        with UpstreamPredictor(server.address(), MODEL_NAME, INPUT_NAME, OUTPUT_NAME) as predictor:
            victim_top1 = np.asarray(predictor("", reference.heldout)).argmax(axis=1)
        correct = np.flatnonzero(victim_top1 == heldout_labels)
        rng = np.random.default_rng(seed)
        targets_idx = rng.choice(correct, budget.evasion_digits, replace=False)
        targets = [(reference.heldout[i].astype(np.float32), int(heldout_labels[i])) for i in targets_idx]

        clients = benign_population(reference.heldout, budget, rng)
        log(
            f"[4/6] {len(clients)} benign clients start (held-out digits; {budget.n_random} ordinary, "
            f"{budget.n_heavy} heavy at {budget.extraction_queries} queries, {budget.n_resend} re-senders)"
        )
        crowd = BenignCrowd(gateway.address(), gateway.address("control"), clients, seed)
        crowd.start()
        step = time.monotonic()

        log("[5/6] attacks through the gateway, each its own client")
        thief = (train.x_train.astype(np.float32), train.y_train.astype(int))
        for name in attacks:
            if name in EVASION:
                results.append(run_evasion(name, targets, gateway, budget, log))
            else:
                results.append(
                    run_extraction(name, thief, (reference.heldout, victim_top1), gateway, budget, seed, log)
                )
            crowd.poll_flagged()
        timings["attacks_s"] = time.monotonic() - step
        log("  waiting for the benign clients to finish")
        finished = crowd.join(max(30.0, budget.benign_duration_s * 1.5 - (time.monotonic() - step)))
        crowd.poll_flagged()
        if not finished:
            log("  benign clients stopped at the time limit")
        timings["traffic_s"] = time.monotonic() - step
        metrics = _metrics(gateway.port("metrics"))
    finally:
        if crowd is not None and not crowd.stop():
            log("  the benign clients' thread did not stop within 10 s")
        for proc in reversed(servers):
            proc.stop()

    log("[6/6] report")
    timings["total_s"] = time.monotonic() - started
    report = build_report(results, crowd, budget, quick, target_fpr, seed, timings, metrics)
    write_report(report, results, crowd, out)
    for line in format_table(report).splitlines():
        log(line)
    log(f"written: {out / 'monitors_eval.json'}, {out / 'monitors_eval.md'}, {out / 'risk_over_queries.png'}")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(models, ignore_errors=True)
    return report


def _cached_suite_is_current(suite_dir: Path) -> bool:
    """True when ``suite_dir`` holds a suite of exactly today's default monitors (else recalibrate)."""
    from detectors.monitor_calibration import DEFAULT_MONITORS

    try:
        meta = json.loads((suite_dir / "monitors.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("monitors") == list(DEFAULT_MONITORS)


def _metrics(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ("tfshield_monitor_flags_total", "tfshield_rate_limited_total", "tfshield_policy")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(wanted) and not sample.name.endswith("_created"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


# -- the report --------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def build_report(
    results: list[AttackResult],
    crowd: BenignCrowd | None,
    budget: Budget,
    quick: bool,
    target_fpr: float,
    seed: int,
    timings: dict[str, float],
    metrics: dict[str, float],
) -> dict[str, Any]:
    attacks = []
    for r in results:
        goal_q = GOAL_EVASION_QUERIES if r.family == "evasion" else GOAL_EXTRACTION_QUERIES
        median = r.median_queries_to_flag
        attacks.append(
            {
                "attack": r.attack,
                "label": r.label,
                "family": r.family,
                "detected": r.detected,
                "clients_flagged": sum(t.queries_at_flag is not None for t in r.traces),
                "clients": len(r.traces),
                "queries_to_flag": [t.queries_at_flag for t in r.traces],
                "median_queries_to_flag": median,
                "goal_queries": goal_q,
                "goal_met": r.detected and median is not None and median <= goal_q,
                "flagging_monitors": sorted({m for t in r.traces for m in t.flagging_monitors}),
                "queries_sent": [t.queries for t in r.traces],
                "stopped_by": [t.stopped_by for t in r.traces],
                "rate_limited_calls": sum(t.rate_limited for t in r.traces),
                "elapsed_s": [round(t.elapsed_s, 1) for t in r.traces],
                # evasion: best adversarial L2 held (None: no adversarial yet); extraction: agreement
                "progress_measure": "best adversarial L2"
                if r.family == "evasion"
                else "substitute agreement",
                "progress_at_flag": r.progress_at_flag,
                "progress_final": r.progress_final,
                "output_defences_agreement": r.defended,
                "max_risk": max((t.max_risk for t in r.traces), default=0.0),
                "max_risk_monitor": _peak_monitor(r.traces),
                "quota_min_time_s": (
                    max(0.0, (max(t.queries for t in r.traces) - 2000) / 200.0) if r.traces else None
                ),
                "errors": r.errors,
            }
        )
    benign: dict[str, Any] = {}
    if crowd is not None:
        for kind in ("random", "heavy", "resend"):
            traces = [c.trace for c in crowd.clients if c.trace.kind == kind]
            flagged = [
                t for t in traces if t.queries_at_flag is not None or t.client_id in crowd.listed_flagged
            ]
            benign[kind] = {
                "clients": len(traces),
                "flagged": len(flagged),
                "flagged_clients": [
                    {"name": t.name, "queries_at_flag": t.queries_at_flag, "monitors": t.flagging_monitors}
                    for t in flagged
                ],
                "queries_median": float(np.median([t.queries for t in traces])) if traces else 0,
                "queries_max": max((t.queries for t in traces), default=0),
                "max_risk": max((t.max_risk for t in traces), default=0.0),
                "max_risk_monitor": _peak_monitor(traces),
                "rate_limited_calls": sum(t.rate_limited for t in traces),
            }
    n_benign = sum(b["clients"] for b in benign.values())
    n_flagged = sum(b["flagged"] for b in benign.values())
    evasion = [a for a in attacks if a["family"] == "evasion"]
    extraction = [a for a in attacks if a["family"] == "extraction"]
    # An attack never flagged is measured against the benign clients: if its peak risk is no higher
    # than theirs, these monitors cannot tell it from benign use by its queries (issue 6 asks to say so).
    benign_peak = max((b["max_risk"] for b in benign.values()), default=0.0)
    undetected = {
        a["attack"]: {
            "max_risk": a["max_risk"],
            "benign_max_risk": benign_peak,
            "indistinguishable": a["max_risk"] <= benign_peak,
        }
        for a in attacks
        if not a["detected"]
    }
    goals = {
        "every_attack_detected": all(a["detected"] for a in attacks),
        "evasion_median_queries_le_50": bool(evasion) and all(a["goal_met"] for a in evasion),
        "extraction_median_queries_le_500": bool(extraction) and all(a["goal_met"] for a in extraction),
        "no_benign_client_flagged": n_flagged == 0,
        "benign_clients_at_least_50": n_benign >= 50,
    }
    return {
        "quick": quick,
        "seed": seed,
        "target_fpr": target_fpr,
        "budget": asdict(budget),
        "attacks": attacks,
        "benign": benign,
        "benign_total": {"clients": n_benign, "flagged": n_flagged, "errors": crowd.errors if crowd else []},
        "goals": goals,
        "undetected": undetected,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "gateway_metrics": metrics,
    }


def _peak_monitor(traces: list[Trace]) -> str | None:
    """The monitor behind the highest risk any of ``traces`` reached."""
    peak = max(traces, key=lambda t: t.max_risk, default=None)
    return peak.max_risk_monitor if peak is not None else None


def _undetected_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for attack, u in report.get("undetected", {}).items():
        verdict = (
            "no higher than a benign client's: these monitors cannot tell it from benign use"
            if u["indistinguishable"]
            else "above every benign client's, below the flag line"
        )
        lines.append(
            f"{attack}: never flagged; peak risk {u['max_risk']:.3f} vs benign peak "
            f"{u['benign_max_risk']:.3f}, {verdict}"
        )
    return lines


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'attack':<28} {'detected':>9} {'queries to flag':>18} {'median':>7} {'progress at flag':>18} "
        f"{'at end':>14} {'monitors':<20}"
    ]
    for a in report["attacks"]:
        queries = ",".join("-" if q is None else str(q) for q in a["queries_to_flag"])
        lines.append(
            f"{a['label']:<28} {a['clients_flagged']:>4}/{a['clients']:<4} {queries:>18} "
            f"{_num(a['median_queries_to_flag'], 0):>7} "
            f"{','.join(_num(p) for p in a['progress_at_flag']):>18} "
            f"{','.join(_num(p) for p in a['progress_final']):>14} "
            f"{','.join(a['flagging_monitors']) or '-':<20}"
        )
    lines.append("")
    lines.append(
        f"{'benign population':<20} {'clients':>8} {'flagged':>8} "
        f"{'queries (median/max)':>22} {'max risk':>9} {'by':<14}"
    )
    for kind, b in report["benign"].items():
        lines.append(
            f"{kind:<20} {b['clients']:>8} {b['flagged']:>8} "
            f"{b['queries_median']:>12.0f}/{b['queries_max']:<9} {b['max_risk']:>9.3f} "
            f"{b.get('max_risk_monitor') or '-':<14}"
        )
    lines.append("")
    lines += _undetected_lines(report)
    lines.append("goals: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in report["goals"].items()))
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "# tfshield eval monitors",
        "",
        ("**QUICK RUN: tiny budgets, numbers mean nothing.**\n" if report["quick"] else ""),
        f"Monitors calibrated at target FPR {report['target_fpr']} per benign client (calibration split); "
        f"benign clients replay held-out digits concurrently with the attacks. A client is flagged when its "
        f"risk reaches {FLAG_RISK}. Evasion progress: L2 distance of the best adversarial example the "
        "attacker held (- = none yet). Extraction progress: top-1 agreement with the victim, on the held-out "
        "digits, of a substitute trained on the attacker's answers so far.",
        "",
        "| attack | detected | queries to first flag | median | progress at flag | at end | queries sent | "
        "flagging monitors | peak risk (monitor) | output defences (agreement) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report["attacks"]:
        rows.append(
            f"| {a['label']} | {a['clients_flagged']}/{a['clients']} | "
            f"{', '.join('-' if q is None else str(q) for q in a['queries_to_flag'])} | "
            f"{_num(a['median_queries_to_flag'], 0)} | {', '.join(_num(p) for p in a['progress_at_flag'])} | "
            f"{', '.join(_num(p) for p in a['progress_final'])} | {', '.join(map(str, a['queries_sent']))} | "
            f"{', '.join(a['flagging_monitors']) or '-'} | "
            f"{a['max_risk']:.3f} ({a['max_risk_monitor'] or '-'}) | "
            f"{', '.join(f'{k} {v:.2f}' for k, v in a['output_defences_agreement'].items()) or '-'} |"
        )
    rows += [
        "",
        "| benign population | clients | ever flagged | queries median / max | max risk (monitor) |",
        "|---|---|---|---|---|",
    ]
    for kind, b in report["benign"].items():
        rows.append(
            f"| {kind} | {b['clients']} | {b['flagged']} | {b['queries_median']:.0f} / {b['queries_max']} | "
            f"{b['max_risk']:.3f} ({b.get('max_risk_monitor') or '-'}) |"
        )
    undetected = _undetected_lines(report)
    if undetected:
        rows += ["", "Attacks never flagged, against the benign clients:", ""]
        rows += [f"- {line}" for line in undetected]
    rows += ["", "Goals:", ""]
    rows += [f"- {k}: {'yes' if v else '**no**'}" for k, v in report["goals"].items()]
    rows += ["", f"Timings (s): {report['timings_s']}", "", "![risk over queries](risk_over_queries.png)", ""]
    return "\n".join(rows)


def write_report(
    report: dict[str, Any], results: list[AttackResult], crowd: BenignCrowd | None, out: Path
) -> None:
    (out / "monitors_eval.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "monitors_eval.md").write_text(markdown(report))
    plot_risk(results, crowd, out / "risk_over_queries.png")


def plot_risk(results: list[AttackResult], crowd: BenignCrowd | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(results) + (1 if crowd is not None else 0)
    cols = 3
    rows = max(1, (panels + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.3 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, r in zip(flat, results, strict=False):
        for t in r.traces:
            if t.risk_points:
                q, risk = zip(*t.risk_points, strict=True)
                ax.plot(q, risk, lw=1, label=t.name)
            if t.queries_at_flag is not None:
                ax.axvline(t.queries_at_flag, color="red", lw=0.6, ls=":")
        ax.axhline(FLAG_RISK, color="black", lw=0.8, ls="--")
        ax.set_title(f"{r.label} ({r.family})", fontsize=9)
        ax.set_xlabel("queries")
        ax.set_ylabel("risk")
        ax.set_ylim(0, 1.02)
    if crowd is not None and len(flat) > len(results):
        ax = flat[len(results)]
        for c in crowd.clients:
            if c.trace.risk_points:
                q, risk = zip(*c.trace.risk_points, strict=True)
                color = {"random": "tab:green", "heavy": "tab:blue", "resend": "tab:orange"}[c.trace.kind]
                ax.plot(q, risk, lw=0.5, color=color, alpha=0.6)
        ax.axhline(FLAG_RISK, color="black", lw=0.8, ls="--")
        ax.set_title("benign clients (green ordinary, blue heavy, orange re-senders)", fontsize=9)
        ax.set_xlabel("queries")
        ax.set_ylim(0, 1.02)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tfshield eval monitors",
        description="Query-based evasion and extraction attacks (IBM ART, black-box) and a benign crowd "
        "through one gateway with per-client monitors; reports who gets flagged and when.",
    )
    add_common_arguments(
        parser,
        DEFAULT_OUT,
        quick="tiny budgets and a few benign clients (for tests)",
        seed="seeds the benign crowd and the attacks (default 0)",
    )
    parser.add_argument(
        "--target-fpr",
        type=float,
        default=DEFAULT_TARGET_FPR,
        help=f"per-client false-positive rate each monitor is calibrated at (default {DEFAULT_TARGET_FPR})",
    )
    parser.add_argument(
        "--attacks",
        default=",".join(EVASION + EXTRACTION),
        help=f"comma-separated subset of {','.join(EVASION + EXTRACTION)}",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    attacks = tuple(a for a in args.attacks.split(",") if a)
    unknown = [a for a in attacks if a not in EVASION + EXTRACTION]
    if unknown:
        print(
            f"tfshield eval monitors: unknown attack(s) {', '.join(unknown)}; known: "
            f"{', '.join(EVASION + EXTRACTION)}",
            file=sys.stderr,
        )
        return 2
    try:
        evaluate(
            args.out,
            args.cache_dir,
            args.quick,
            args.target_fpr,
            args.seed,
            attacks,
            log=lambda line: print(line, flush=True),
        )
    except TfshieldError as exc:
        print(f"tfshield eval monitors: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

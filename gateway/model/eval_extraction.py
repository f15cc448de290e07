"""``tfshield eval extraction``: steal the demo model through the gateway, with and without defences.

Attack strength (queries) against defence effect (policy), measured as what
the thief ends up with and what honest clients lose.

**Victim.** The demo MNIST CNN (``train_demo_model``, cached) served by the
reference model server, behind a gateway (``tfshield serve``), both child
processes on port 0.

**Thieves** (IBM ART's extraction attacks; the victim is an ART
``BlackBoxClassifier`` whose ``predict_fn`` is :class:`PredictOracle`, a
Predict client sending the thief's images THROUGH THE GATEWAY with an API key,
so the gateway sees the thief as client ``key:<hash>``):

- ``knockoff_prob``: ``KnockoffNets`` (Orekondy et al., CVPR 2019), random
  sampling strategy, ``use_probability=True``: trained on the returned
  probability vectors (soft labels);
- ``knockoff_argmax``: the same with ``use_probability=False``: trained on
  the one-hot of the returned top-1 class;
- ``copycat``: ``CopycatCNN`` (Correia-Silva et al., IJCNN 2018): argmax
  labels of *non-problem-domain* natural images.

Each thief trains a fresh substitute (:func:`substitute_classifier`: two conv
blocks and a dense head, Adam 1e-3, batch 64, seeded) on its answers, for
``ceil(10000 / queries)`` epochs clipped to [4, 20] (each substitute sees
10,000-20,000 samples; ``--quick``: 1 epoch). Every (condition, thief,
budget) is a separate client with its own API key and fresh per-client
state, and the same (thief, budget) sends the same images in every
condition, so conditions are paired. Thieves send DEFAULT_QUERY_BATCH (25)
images per call. A thief is patient: a RESOURCE_EXHAUSTED refusal (rate
limit, throttle) is retried after the wait the gateway asks for, up to
PATIENCE_S (15 s) of waiting per run, which bounds the run's time; calls
still refused (and blocked ones) are spent and unanswered: the substitute
trains on the answered ones only (:func:`substitute_classifier`).

**Query pools** (none of it is victim training data, and none of it is the
held-out evaluation data):

- problem domain (the KnockoffNets thieves): the demo split's 500
  *validation* digits (never trained on), scikit-learn's ``load_digits``
  (1,797 8×8 digits from a different collection, rescaled MNIST-style into a
  20×20 box centred by mass in 28×28) and random affine variants of both
  (rotation ±15°, scale 0.85-1.15, shift ±2 px) up to the pool size;
- non-problem domain (CopycatCNN): random square crops (16-160 px) of the
  three photographs that ship with scikit-learn and matplotlib (``china``,
  ``flower``, ``grace_hopper``), greyscale, resized to 28×28, half of them
  inverted. Three photographs are little variety; a real copycat would use
  ImageNet-scale data and do better.

**Held out**: the demo's 1,000 *test* digits: the stolen model's accuracy
(vs the true labels) and agreement (top-1 equal to the victim's, asked
directly of the model server) are measured on them, and the benign client
sends them.

**Conditions** (a fresh gateway each; :data:`CONDITIONS`):

- ``undefended``: a policy whose only rule allows every call;
- ``perturb1``, ``perturb2``, ``perturb3``: a rule perturbs every call of an
  API-key client (group ``api_clients``: the thieves) at that level
  (:mod:`gateway.policy`: 1 keyed noise + rounding, 2 reverse sigmoid +
  top-3 + rounding, 3 label only); both score outputs (``probabilities``,
  ``logits``) are listed;
- ``deceive``: a rule deceives every call of an API-key client (mode
  ``permutation``);
- ``default``: no policy file: the built-in policy, whose escalation ladder
  acts on the client risk the gateway's per-client monitors compute. These
  rows show what the gateway does on its own; the others show each defence
  applied to a client known to be a thief (an upper bound on its effect).
  The run calibrates the default monitors for ``mnist``
  (:func:`calibrate_monitor_suite`: the embedding fitted on the victim's
  training split, benign client sequences drawn from the validation split,
  MONITOR_FPR per client) and configures them (``monitors.models``) for
  this condition only, so that ``undefended`` stays undefended.
  ``--gateway-config`` merges a YAML file into this condition's gateway
  config; one with a ``monitors`` section replaces the calibrated suite.
  Blacklight's fingerprint index is shared by every client, so here every
  (thief, budget) run gets a fresh gateway of its own: a thief alone would
  not meet the other thieves' queries.

**Benign client**: in every condition, after the thieves (on the gateway of
the last run), a client without API key (``peer:127.0.0.1``, group
``default``) sends the held-out digits one per call, as patient as a thief;
its top-1 accuracy vs the true labels, and the fraction of its answers whose
top-1 equals the direct answer, are reported.

**Report** (``--out``, default ``eval-results/extraction/``): per (thief,
condition, queries) the stolen model's accuracy and agreement, the fraction
of queries answered, how faithful the answers were (top-1 as the victim's,
total-variation distance to the victim's probabilities), the gateway's
decisions on the thief's calls and the monitors' flags (increases of
``tfshield_decisions_total`` and ``tfshield_monitor_flags_total``); per
condition the benign client's accuracy. Printed, and written as
``extraction_eval.json``, ``extraction_eval.md`` and ``extraction_agreement.png``
(agreement vs queries, one line per condition, one panel per thief).

**Goal** (issue 4): with the default policy, the stolen model's agreement at
the largest budget falls by at least 30 points against the undefended
gateway for both KnockoffNets thieves, while the benign client's accuracy is
unchanged. The report says whether it holds, and how far each other
condition would get.

``--conditions`` re-runs some conditions only; the other conditions' rows
are kept from the previous report in ``--out`` when it was made with the
same settings. ``--quick`` (200 queries, 1 epoch, few digits) is for tests;
its numbers mean nothing. A full run takes about 10 minutes on two idle cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import TfshieldError
from gateway.model.evaluate import add_common_arguments
from gateway.model.processes import flushing_print

MODEL_NAME = "mnist"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
DEFAULT_OUT = Path("eval-results") / "extraction"
BUDGETS = (500, 1000, 2000, 5000)
QUICK_BUDGETS = (200,)
DEFAULT_QUERY_BATCH = 25
# Substitute training: epochs = ceil(EPOCH_SAMPLES / queries), clipped.
EPOCH_SAMPLES = 10_000
MIN_EPOCHS, MAX_EPOCHS = 4, 20
FIT_BATCH = 64
LEARNING_RATE = 1e-3
# The default condition's monitors: calibrated at this FPR per benign client, the default of
# `tfshield calibrate --monitors-fpr`; --quick replays fewer, shorter benign sequences.
MONITOR_FPR = 0.001
QUICK_SEQUENCES: dict[str, Any] = {
    "n_random": 12,
    "n_heavy": 2,
    "n_resend": 6,
    "random_length": (50, 150),
    "heavy_length": (400, 600),
    "resend_length": (50, 150),
}
FINGERPRINT_SALT = "tfshield-eval-extraction-fingerprint-salt"
# The goal: default policy vs undefended at the largest budget.
GOAL_DROP = 0.30
GOAL_THIEVES = ("knockoff_prob", "knockoff_argmax")
# Refusals a policy or a monitor makes (throttle, rate limit, block); any other status is an error.
REFUSAL_CODES = frozenset({"RESOURCE_EXHAUSTED", "PERMISSION_DENIED"})
# Clients retry RESOURCE_EXHAUSTED: after the pushback the gateway asks for, else this long; each
# (thief, budget) run and the benign client wait at most PATIENCE_S in all.
RETRY_WAIT_S = 0.25
PATIENCE_S = 15.0
DECEIVE_KEY = "tfshield-eval-extraction-deceive-key"
ID_SALT = "tfshield-eval-extraction-salt"
REPORT_JSON = "extraction_eval.json"
REPORT_MD = "extraction_eval.md"
REPORT_PNG = "extraction_agreement.png"

Log = Callable[[str], None]


class EvaluationError(TfshieldError):
    """The evaluation could not run; the message says why."""


# -- what is compared ------------------------------------------------------------------------


@dataclass(frozen=True)
class ThiefSpec:
    key: str
    label: str
    attack: str  # knockoff, copycat (ART class)
    use_probability: bool
    pool: str  # digits (problem domain), npd (non-problem domain)


THIEVES: tuple[ThiefSpec, ...] = (
    ThiefSpec("knockoff_prob", "KnockoffNets, probabilities", "knockoff", True, "digits"),
    ThiefSpec("knockoff_argmax", "KnockoffNets, argmax only", "knockoff", False, "digits"),
    ThiefSpec("copycat", "CopycatCNN (non-problem-domain images)", "copycat", False, "npd"),
)

THIEF_GROUP = "api_clients"
_OUTPUTS = """\
outputs:
  mnist:
    - {name: probabilities, kind: probabilities}
    - {name: logits, kind: logits}
"""
_THIEVES_GROUP = f"""\
client_groups:
  {THIEF_GROUP}: {{prefix: ["key:"]}}
"""


@dataclass(frozen=True)
class Condition:
    key: str
    label: str
    # The policy file's text; None runs the gateway's built-in default policy.
    policy_yaml: str | None


def _thief_rule(action: str) -> str:
    return (
        f"version: 1\n{_THIEVES_GROUP}{_OUTPUTS}rules:\n"
        f"  - {{name: thieves-{action.replace(', level: ', '-')}, match: {{groups: [{THIEF_GROUP}]}}, "
        f"action: {action}}}\n"
    )


CONDITIONS: tuple[Condition, ...] = (
    Condition(
        "undefended",
        "undefended (allow all)",
        f"version: 1\n{_OUTPUTS}rules:\n  - {{name: allow-everything, match: {{}}, action: allow}}\n",
    ),
    Condition("perturb1", "perturb level 1", _thief_rule("perturb, level: 1")),
    Condition("perturb2", "perturb level 2", _thief_rule("perturb, level: 2")),
    Condition("perturb3", "perturb level 3 (label only)", _thief_rule("perturb, level: 3")),
    Condition("deceive", "deceive (permutation)", _thief_rule("deceive") + "deceive: {mode: permutation}\n"),
    Condition("default", "default policy (no policy file)", None),
)


@dataclass(frozen=True)
class Settings:
    """How much the run spends; ``quick`` shrinks everything for tests."""

    budgets: tuple[int, ...] = BUDGETS
    query_batch: int = DEFAULT_QUERY_BATCH
    heldout: int | None = None  # held-out digits used (None: all 1,000)
    benign: int | None = None  # digits the benign client sends (None: all held-out ones)
    fixed_epochs: int | None = None  # None: epochs_for(queries)
    patience_s: float = PATIENCE_S  # a client's total wait for RESOURCE_EXHAUSTED retries

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            budgets=QUICK_BUDGETS,
            query_batch=DEFAULT_QUERY_BATCH,
            heldout=200,
            benign=50,
            fixed_epochs=1,
            patience_s=2.0,
        )

    def epochs(self, queries: int) -> int:
        return self.fixed_epochs if self.fixed_epochs is not None else epochs_for(queries)

    @property
    def pool_size(self) -> int:
        """Images in each query pool: enough for the largest budget to be all distinct."""
        return max(self.budgets) + max(self.budgets) // 5


def epochs_for(queries: int) -> int:
    """Substitute epochs: about EPOCH_SAMPLES samples seen, within [MIN_EPOCHS, MAX_EPOCHS]."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(EPOCH_SAMPLES / queries))))


# -- query pools -----------------------------------------------------------------------------


def mnist_style(image: np.ndarray) -> np.ndarray:
    """A 2-D image in [0, 1] (ink bright), MNIST-style: fitted into a 20×20 box, centred by mass in 28×28."""
    from PIL import Image
    from scipy import ndimage

    height, width = image.shape
    scale = 20.0 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255)).resize(size, Image.Resampling.BILINEAR)
    box = np.asarray(resized, dtype=np.float32) / 255.0
    out = np.zeros((28, 28), dtype=np.float32)
    top, left = (28 - box.shape[0]) // 2, (28 - box.shape[1]) // 2
    out[top : top + box.shape[0], left : left + box.shape[1]] = box
    if out.sum() > 0:
        cy, cx = ndimage.center_of_mass(out)
        out = ndimage.shift(out, (13.5 - cy, 13.5 - cx), order=1, mode="constant")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def sklearn_digits() -> np.ndarray:
    """scikit-learn's 1,797 bundled 8×8 digits, MNIST-style: float32 (n, 28, 28, 1) in [0, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images / 16.0
    return np.stack([mnist_style(image) for image in images])[..., None]


def random_affine(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random variant per image: rotation ±15°, scale 0.85-1.15, shift ±2 px about the centre."""
    from scipy import ndimage

    out = np.empty_like(images)
    centre = np.array([13.5, 13.5])
    for i, image in enumerate(images[..., 0]):
        angle = np.deg2rad(rng.uniform(-15, 15))
        scale = rng.uniform(0.85, 1.15)
        shift = rng.uniform(-2, 2, size=2)
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        matrix = np.array([[cos, -sin], [sin, cos]])
        offset = centre - matrix @ centre - shift
        out[i, ..., 0] = ndimage.affine_transform(image, matrix, offset=offset, order=1)
    return np.clip(out, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class Pool:
    """Images a thief draws its queries from, and where each came from."""

    x: np.ndarray  # float32 (n, 28, 28, 1) in [0, 1]
    source: np.ndarray  # (n,) str

    def composition(self) -> dict[str, int]:
        names, counts = np.unique(self.source, return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def digit_pool(validation_x: np.ndarray, size: int, seed: int) -> Pool:
    """Problem-domain pool: MNIST validation digits, sklearn digits, then random affine variants of both."""
    rng = np.random.default_rng(seed)
    originals = np.concatenate([validation_x.astype(np.float32), sklearn_digits()])
    sources = np.array(
        ["mnist_validation"] * len(validation_x) + ["sklearn_digits"] * (len(originals) - len(validation_x))
    )
    if size <= len(originals):
        chosen = rng.choice(len(originals), size, replace=False)
        return Pool(originals[chosen], sources[chosen])
    base = rng.integers(0, len(originals), size - len(originals))
    variants = random_affine(originals[base], rng)
    x = np.concatenate([originals, variants])
    source = np.concatenate([sources, np.char.add(sources[base], "+affine")])
    order = rng.permutation(len(x))
    return Pool(x[order], source[order])


def _photographs() -> list[np.ndarray]:
    """The greyscale photographs bundled with scikit-learn (2) and matplotlib (1), in [0, 1]."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [image.mean(axis=-1) / 255.0 for image in load_sample_images().images]
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos.append(np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0)
    return photos


def npd_pool(size: int, seed: int) -> Pool:
    """Non-problem-domain pool: random square crops of photographs, 28×28 greyscale, half inverted."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photographs()
    out = np.empty((size, *IMAGE_SHAPE), dtype=np.float32)
    for i in range(size):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(16, 161))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        crop = np.uint8(photo[top : top + side, left : left + side] * 255)
        patch = (
            np.asarray(Image.fromarray(crop).resize((28, 28), Image.Resampling.BILINEAR), np.float32) / 255
        )
        out[i, ..., 0] = 1.0 - patch if rng.random() < 0.5 else patch
    return Pool(out, np.array(["photo_crop"] * size))


def digests(x: np.ndarray) -> list[bytes]:
    """One digest per image of its exact float32 bytes (to find an image again)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


# -- the victim as a black box -----------------------------------------------------------------


class PredictOracle:
    """``predict_fn`` for ART's BlackBoxClassifier: images -> probabilities as served at ``address``.

    One Predict call per ``predict_fn`` call (ART batches by its
    ``batch_size_query``), with ``x-api-key: <api_key>`` metadata when given.
    A patient client: a call refused with RESOURCE_EXHAUSTED (a rate limit, a
    throttle) is retried after the wait the gateway asks for
    (``grpc-retry-pushback-ms``, else RETRY_WAIT_S), until ``patience_s`` of
    waiting is spent over the oracle's life. A call still refused
    (RESOURCE_EXHAUSTED, PERMISSION_DENIED: blocked) returns rows of NaN and is
    counted in ``refused``; any other status is counted in ``errors``.
    ``queries`` and ``answers`` keep every image sent and every row returned,
    in order; :meth:`answered_mask` says which rows got an answer. Close it
    (or use it as a context manager) to close its channel.
    """

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        patience_s: float = 0.0,
        output: str = OUTPUT_NAME,
        timeout_s: float = 30.0,
    ) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.address = address
        self.output = output
        self.patience_s = patience_s
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.calls = 0
        self.retries = 0
        self.waited_s = 0.0
        self.refused: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self._queries: list[np.ndarray] = []
        self._answers: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(np.asarray(x, dtype=np.float32)))
        while True:
            self.calls += 1
            try:
                response = self._stub.Predict(request, timeout=self._timeout_s, metadata=self._metadata)
                out = tf.make_ndarray(response.outputs[self.output]).astype(np.float32).reshape(len(x), -1)
                break
            except grpc.RpcError as exc:
                code = exc.code()
                wait = _retry_wait_s(exc) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                if wait is not None and self.waited_s + wait <= self.patience_s:
                    time.sleep(wait)
                    self.waited_s += wait
                    self.retries += 1
                    continue
                counts = self.refused if code.name in REFUSAL_CODES else self.errors
                counts[code.name] = counts.get(code.name, 0) + len(x)
                out = np.full((len(x), NUM_CLASSES), np.nan, dtype=np.float32)
                break
        self._queries.append(np.array(x, dtype=np.float32))
        self._answers.append(out)
        return out

    def predict(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """All of ``x``, ``batch_size`` images per call."""
        if not len(x):
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        return np.concatenate([self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    @property
    def queries(self) -> np.ndarray:
        """Every image sent, in order: float32 (n, 28, 28, 1)."""
        return np.concatenate(self._queries) if self._queries else np.zeros((0, *IMAGE_SHAPE), np.float32)

    @property
    def answers(self) -> np.ndarray:
        """Every row returned, in order (NaN rows: refused)."""
        return np.concatenate(self._answers) if self._answers else np.zeros((0, NUM_CLASSES), np.float32)

    def answered_mask(self) -> np.ndarray:
        return np.isfinite(self.answers).all(axis=1)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PredictOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_wait_s(exc: Any) -> float:
    """The wait a RESOURCE_EXHAUSTED refusal asks for (the throttle's pushback trailer), else RETRY_WAIT_S."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0.0, int(value) / 1000.0)
            except ValueError:
                break
    return RETRY_WAIT_S


def victim_blackbox(oracle: PredictOracle) -> Any:
    """The victim as ART sees it: a BlackBoxClassifier over the oracle."""
    from art.estimators.classification import BlackBoxClassifier

    return BlackBoxClassifier(oracle, input_shape=IMAGE_SHAPE, nb_classes=NUM_CLASSES, clip_values=(0.0, 1.0))


# -- the thief's model ---------------------------------------------------------------------------


def substitute_classifier(seed: int, answered: Callable[[], np.ndarray] | None = None) -> Any:
    """A fresh, seeded substitute CNN as an ART classifier (logits; soft or one-hot labels)."""
    import keras
    import tensorflow as tf
    from art.estimators.classification import TensorFlowV2Classifier

    class Substitute(TensorFlowV2Classifier):  # type: ignore[misc]
        """Trains only on the queries the gateway answered (``answered()``: one bool per query)."""

        def fit(
            self, x: np.ndarray, y: np.ndarray, batch_size: int = 128, nb_epochs: int = 10, **kwargs: Any
        ) -> None:
            if answered is not None:
                mask = answered()
                if len(mask) != len(x):
                    raise EvaluationError(f"{len(x)} training samples but {len(mask)} queries recorded")
                x, y = x[mask], y[mask]
            if len(x):
                super().fit(x, y, batch_size=batch_size, nb_epochs=nb_epochs, **kwargs)

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    images = keras.Input(shape=IMAGE_SHAPE)
    h = layers.Conv2D(32, 3, activation="relu")(images)
    h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(64, 3, activation="relu")(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Flatten()(h)
    h = layers.Dense(128, activation="relu")(h)
    model = keras.Model(images, layers.Dense(NUM_CLASSES)(h), name="substitute")
    return Substitute(
        model=model,
        nb_classes=NUM_CLASSES,
        input_shape=IMAGE_SHAPE,
        loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        clip_values=(0.0, 1.0),
    )


def make_attack(spec: ThiefSpec, victim: Any, queries: int, epochs: int, query_batch: int) -> Any:
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    if spec.attack == "knockoff":
        return KnockoffNets(
            victim,
            batch_size_fit=FIT_BATCH,
            batch_size_query=query_batch,
            nb_epochs=epochs,
            nb_stolen=queries,
            sampling_strategy="random",
            use_probability=spec.use_probability,
            verbose=False,
        )
    if spec.attack == "copycat":
        return CopycatCNN(
            victim,
            batch_size_fit=FIT_BATCH,
            batch_size_query=query_batch,
            nb_epochs=epochs,
            nb_stolen=queries,
            use_probability=spec.use_probability,
        )
    raise EvaluationError(f"unknown extraction attack '{spec.attack}'; known: knockoff, copycat")


# -- the gateway's decisions ---------------------------------------------------------------------

_SAMPLE = re.compile(
    r"^(tfshield_decisions_total|tfshield_monitor_flags_total)\{([^}]*)\} (\S+)$", re.MULTILINE
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_counters(text: str, model: str = MODEL_NAME) -> dict[str, dict[str, float]]:
    """From a Prometheus text exposition: ``calls_by_action`` (decided calls of ``model`` by action) and
    ``monitor_flags`` (queries after which each monitor flagged a client)."""
    out: dict[str, dict[str, float]] = {"calls_by_action": {}, "monitor_flags": {}}
    for name, labels, value in _SAMPLE.findall(text):
        found = dict(_LABEL.findall(labels))
        if name == "tfshield_decisions_total" and found.get("model") == model:
            key, counts = found["action"], out["calls_by_action"]
        elif name == "tfshield_monitor_flags_total":
            key, counts = found.get("monitor", "?"), out["monitor_flags"]
        else:
            continue
        counts[key] = counts.get(key, 0.0) + float(value)
    return out


def gateway_counters(metrics_port: int) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        return parse_counters(response.read().decode("utf-8", errors="replace"))


def _increase(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, int]]:
    return {
        family: {
            k: int(v - before[family].get(k, 0.0))
            for k, v in sorted(counts.items())
            if v > before[family].get(k, 0.0)
        }
        for family, counts in after.items()
    }


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Victim:
    """What the victim answers directly (no gateway): held-out and pool top-1 classes, pool probabilities."""

    heldout_top1: np.ndarray
    by_digest: dict[bytes, int]  # pool image -> row in ``probabilities``
    probabilities: np.ndarray

    def lookup(self, x: np.ndarray) -> np.ndarray:
        return self.probabilities[[self.by_digest[d] for d in digests(x)]]


def steal(
    spec: ThiefSpec, queries: int, address: str, api_key: str, shared: Shared, seed: int
) -> dict[str, Any]:
    """One thief with one budget through ``address``; the stolen model's numbers and the answers' quality."""
    settings = shared.settings
    epochs = settings.epochs(queries)
    with PredictOracle(address, api_key, patience_s=settings.patience_s) as oracle:
        substitute = substitute_classifier(seed, oracle.answered_mask)
        np.random.seed(seed)  # ART draws the queries from numpy's global generator
        attack = make_attack(spec, victim_blackbox(oracle), queries, epochs, settings.query_batch)
        started = time.monotonic()
        attack.extract(shared.pools[spec.pool].x, thieved_classifier=substitute)
        seconds = time.monotonic() - started
        x_queried, answers, ok = oracle.queries, oracle.answers, oracle.answered_mask()
        refused, errors, waited_s = dict(oracle.refused), dict(oracle.errors), oracle.waited_s
    truth = shared.victim.lookup(x_queried)
    stolen = substitute.predict(shared.x_heldout, batch_size=500).argmax(axis=1)
    return {
        "thief": spec.key,
        "queries": queries,
        "answered": float(ok.mean()) if len(ok) else 0.0,
        "refused": refused,
        "errors": errors,
        "waited_s": round(waited_s, 1),
        # How faithful the answered ones were: top-1 as the victim's, total variation to its probabilities.
        "answer_top1_fidelity": _mean(answers[ok].argmax(1) == truth[ok].argmax(1)),
        "answer_tv_distance": _mean(0.5 * np.abs(answers[ok] - truth[ok]).sum(1)),
        "epochs": epochs,
        "stolen_accuracy": float((stolen == shared.y_heldout).mean()),
        "agreement": float((stolen == shared.victim.heldout_top1).mean()),
        "seconds": round(seconds, 1),
    }


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def benign_traffic(
    address: str, x: np.ndarray, y: np.ndarray, direct_top1: np.ndarray, patience_s: float
) -> dict[str, Any]:
    """A client without API key sends ``x``, one digit per call: its accuracy, and agreement with direct."""
    with PredictOracle(address, patience_s=patience_s) as oracle:
        answers = oracle.predict(x, batch_size=1)
        refused, errors, waited_s = dict(oracle.refused), dict(oracle.errors), oracle.waited_s
    answered = np.isfinite(answers).all(axis=1)
    top1 = np.where(answered, np.nan_to_num(answers).argmax(axis=1), -1)
    return {
        "n": len(x),
        "answered": float(answered.mean()),
        "accuracy": float((top1 == y).mean()),
        "same_top1_as_direct": float((top1 == direct_top1).mean()),
        "refused": refused,
        "errors": errors,
        "waited_s": round(waited_s, 1),
    }


def thief_seed(seed: int, spec: ThiefSpec, queries: int) -> int:
    """The same (thief, budget) draws the same queries and initial weights in every condition."""
    index = [t.key for t in THIEVES].index(spec.key)
    return (seed * 1_000_003 + index * 100_003 + queries) % (2**31)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True, eq=False)
class Shared:
    """What every condition's runs share."""

    upstream: str
    pools: dict[str, Pool]
    x_heldout: np.ndarray
    y_heldout: np.ndarray
    n_benign: int
    victim: Victim
    settings: Settings
    seed: int
    log: Log


def ask_victim(upstream: str, x_heldout: np.ndarray, pools: dict[str, Pool]) -> Victim:
    """The model server's own answers on the held-out digits and on every pool image."""
    with PredictOracle(upstream) as direct:
        heldout = direct.predict(x_heldout, batch_size=500)
        everything = np.concatenate([pool.x for pool in pools.values()])
        probabilities = direct.predict(everything, batch_size=500)
        if direct.refused or direct.errors:
            raise EvaluationError(f"the model server failed direct calls: {direct.refused or direct.errors}")
    return Victim(heldout.argmax(axis=1), {d: i for i, d in enumerate(digests(everything))}, probabilities)


def calibrate_monitor_suite(
    upstream: str,
    x_fit: np.ndarray,
    x_calibration: np.ndarray,
    folder: Path,
    quick: bool,
    seed: int,
    log: Log,
) -> tuple[Path, dict[str, Any]]:
    """Calibrate the gateway's default monitors (detectors/monitor_calibration.py) for the default condition.

    The embedding is fitted on the victim's training split (the defender has
    it); benign client sequences are drawn from the validation split, never
    from the held-out test digits the benign client sends. Monitor FPR
    MONITOR_FPR per benign client. Returns the suite folder and what to report.
    """
    from detectors.monitor_calibration import DEFAULT_MONITORS, benign_sequences, calibrate_monitors

    options = QUICK_SEQUENCES if quick else {}
    sequences = benign_sequences(x_calibration, np.random.default_rng(seed), **options)
    started = time.monotonic()
    with PredictOracle(upstream) as direct:

        def predicted(batch: np.ndarray) -> np.ndarray:
            return direct.predict(batch.reshape(-1, *IMAGE_SHAPE), batch_size=500).argmax(axis=1)

        suite = calibrate_monitors(
            x_fit, sequences, MONITOR_FPR, predicted, names=DEFAULT_MONITORS, secret=FINGERPRINT_SALT
        )
    suite.save(folder)
    thresholds = {name: float(m.threshold_) for name, m in suite.monitors.items()}
    log(
        f"{len(sequences)} benign clients, {sum(len(q) for q in sequences)} queries, FPR {MONITOR_FPR} per "
        f"client, {time.monotonic() - started:.0f} s; thresholds {thresholds}"
    )
    return folder, {
        "monitors": list(suite.monitors),
        "fpr_per_client": MONITOR_FPR,
        "benign_clients": len(sequences),
        "benign_queries": int(sum(len(q) for q in sequences)),
        "thresholds": thresholds,
        "fit": "victim training split",
        "calibration": "validation split",
    }


def _start_gateway(upstream: str, directory: Path, name: str, config: dict[str, Any]) -> Any:
    from gateway.model.processes import start_server, tfshield_command

    argv = ["serve", "--upstream", upstream, "--port", "0", "--metrics-port", "0"]
    if config:
        path = directory / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        argv += ["--config", str(path)]
    env = {
        "TFSHIELD_DECEIVE_KEY": DECEIVE_KEY,
        "TFSHIELD_ID_SALT": ID_SALT,
        "TFSHIELD_FINGERPRINT_SALT": FINGERPRINT_SALT,
    }
    return start_server(tfshield_command(*argv), directory, name, timeout_s=60, env=env)


def run_condition(
    condition: Condition, directory: Path, extra: dict[str, Any], shared: Shared
) -> dict[str, Any]:
    """Every thief and budget, then the benign client, through gateways configured for ``condition``.

    With monitors, each (thief, budget) run gets a fresh gateway: Blacklight's
    fingerprint index is global, so later thieves would otherwise be caught
    matching earlier thieves' queries, which one thief alone would not meet.
    The benign client follows the last run on the same gateway.
    """
    started = time.monotonic()
    directory.mkdir(parents=True)
    config: dict[str, Any] = {}
    if condition.policy_yaml is not None:
        (directory / "policy.yaml").write_text(condition.policy_yaml)
        config = {"policy": {"file": str(directory / "policy.yaml")}}
    config = _merge(config, extra)
    fresh_per_run = bool(config.get("monitors"))
    gateway = None
    rows = []
    try:
        for spec in THIEVES:
            for queries in shared.settings.budgets:
                if gateway is None or fresh_per_run:
                    if gateway is not None:
                        gateway.stop()
                    gateway = _start_gateway(
                        shared.upstream, directory, f"gateway-{spec.key}-{queries}", config
                    )
                metrics_port = gateway.port("metrics")
                before = gateway_counters(metrics_port)
                row = steal(
                    spec,
                    queries,
                    gateway.address(),
                    f"tfshield-eval-{condition.key}-{spec.key}-{queries}",
                    shared,
                    thief_seed(shared.seed, spec, queries),
                )
                row["condition"] = condition.key
                row.update(_increase(gateway_counters(metrics_port), before))
                rows.append(row)
                shared.log("    " + _row_line(row))
        assert gateway is not None
        before = gateway_counters(gateway.port("metrics"))
        n = shared.n_benign
        benign = benign_traffic(
            gateway.address(),
            shared.x_heldout[:n],
            shared.y_heldout[:n],
            shared.victim.heldout_top1[:n],
            shared.settings.patience_s,
        )
        benign.update(_increase(gateway_counters(gateway.port("metrics")), before))
    finally:
        if gateway is not None:
            gateway.stop()
    shared.log(
        f"    benign client: accuracy {benign['accuracy']:.2%}, same top-1 as direct "
        f"{benign['same_top1_as_direct']:.2%}, answered {benign['answered']:.2%} "
        f"({time.monotonic() - started:.0f} s for this condition)"
    )
    return {
        "label": condition.label,
        "policy": condition.policy_yaml,
        "gateway_config": config,
        "benign": benign,
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }


def evaluate(
    out: Path,
    cache_dir: Path | None = None,
    quick: bool = False,
    seed: int = 0,
    conditions: Sequence[str] | None = None,
    budgets: Sequence[int] | None = None,
    query_batch: int | None = None,
    gateway_config: Path | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Run the evaluation (see the module docstring); returns the report written as JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from gateway.model.demo import DemoArtifacts, import_tensorflow_quietly, train_demo_model
    from gateway.model.processes import start_server, tfshield_command

    settings = Settings.quick() if quick else Settings()
    if budgets:
        settings = _replace(settings, budgets=tuple(sorted(set(budgets))))
    if query_batch:
        settings = _replace(settings, query_batch=query_batch)
    known = [c.key for c in CONDITIONS]
    chosen = list(conditions) if conditions else known
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise EvaluationError(f"unknown condition {', '.join(unknown)}; known: {', '.join(known)}")
    extra_config: dict[str, Any] = {}
    if gateway_config is not None:
        import yaml

        try:
            extra_config = yaml.safe_load(Path(gateway_config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise EvaluationError(f"--gateway-config {gateway_config}: {exc}") from None
        if not isinstance(extra_config, dict):
            raise EvaluationError(f"--gateway-config {gateway_config}: must be a mapping")

    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    models = run_dir / "models"
    models.mkdir(parents=True)

    log(f"[1/4] demo model ({DemoArtifacts.at(cache_dir).root})")
    train_demo_model(cache_dir, log=lambda line: log("  " + line.lstrip()))
    demo = DemoArtifacts.at(cache_dir)
    (models / MODEL_NAME).symlink_to(demo.export_dir.parent.resolve(), target_is_directory=True)
    # One substitute per run, so ART's compiled forward pass is traced again each time (a warning each).
    import_tensorflow_quietly().get_logger().setLevel("ERROR")

    log("[2/4] query pools and held-out digits")
    with np.load(demo.validation_npz) as data:
        x_validation = data["x"]
    x_heldout, y_heldout = demo.load_test_split()
    if settings.heldout is not None:
        x_heldout, y_heldout = x_heldout[: settings.heldout], y_heldout[: settings.heldout]
    n_benign = len(x_heldout) if settings.benign is None else min(settings.benign, len(x_heldout))
    pools = {
        "digits": digit_pool(x_validation, settings.pool_size, seed),
        "npd": npd_pool(settings.pool_size, seed),
    }
    for name, pool in pools.items():
        log(f"  {name}: {len(pool.x)} images {pool.composition()}")
    log(f"  held out: {len(x_heldout)} test digits (benign client: {n_benign})")

    previous = _previous_rows(out / REPORT_JSON, settings, seed, quick) if conditions else {}
    results: dict[str, Any] = {}
    monitors: dict[str, Any] = {}
    server = start_server(
        tfshield_command("model-server", "--model-base-path", str(models), "--port", "0"),
        run_dir,
        "model-server",
    )
    try:
        victim = ask_victim(server.address(), x_heldout, pools)
        victim_accuracy = float((victim.heldout_top1 == y_heldout).mean())
        log(
            f"  victim (direct): accuracy {victim_accuracy:.2%} on the held-out digits; "
            f"model server {server.address()}"
        )
        default_config = dict(extra_config)
        if "default" in chosen and "monitors" not in extra_config:
            from gateway.model.data import DEFAULT_SEED, split_mnist

            log("  calibrating the per-client monitors for the default condition")
            suite, monitors = calibrate_monitor_suite(
                server.address(),
                split_mnist(DEFAULT_SEED).x_train,
                x_validation,
                run_dir / "monitors",
                quick,
                seed,
                lambda line: log("    " + line),
            )
            default_config = _merge(
                {"monitors": {"models": [{"model": MODEL_NAME, "suite": str(suite)}]}}, extra_config
            )

        log(f"[3/4] {len(chosen)} conditions × {len(THIEVES)} thieves × budgets {list(settings.budgets)}")
        shared = Shared(server.address(), pools, x_heldout, y_heldout, n_benign, victim, settings, seed, log)
        for number, key in enumerate(chosen, 1):
            condition = next(c for c in CONDITIONS if c.key == key)
            log(f"  [{number}/{len(chosen)}] {condition.label}")
            extra = default_config if key == "default" else {}
            results[key] = run_condition(condition, run_dir / key, extra, shared)
            if key == "default":
                results[key]["monitors"] = monitors or "configured by --gateway-config"
    finally:
        server.stop()

    log("[4/4] report")
    for key, kept in previous.items():
        if key not in results:
            results[key] = {**kept, "from_previous_run": True}
    ordered = {c.key: results[c.key] for c in CONDITIONS if c.key in results}
    report = build_report(
        ordered,
        settings,
        quick,
        seed,
        victim_accuracy,
        {name: {"size": len(p.x), "composition": p.composition()} for name, p in pools.items()},
        {"heldout": len(x_heldout), "benign": n_benign},
        extra_config,
        time.monotonic() - started,
    )
    write_report(report, out)
    for line in format_table(report).splitlines():
        log(line)
    log(f"written: {out / REPORT_JSON}, {out / REPORT_MD}, {out / REPORT_PNG}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return report


def _replace(settings: Settings, **changes: Any) -> Settings:
    return Settings(**{**asdict(settings), **changes})


def _settings_key(settings: Settings, seed: int, quick: bool) -> dict[str, Any]:
    return {"settings": asdict(settings) | {"budgets": list(settings.budgets)}, "seed": seed, "quick": quick}


def _previous_rows(path: Path, settings: Settings, seed: int, quick: bool) -> dict[str, Any]:
    """The conditions of the last report at ``path``, if it was made with the same settings."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = all(previous.get(k) == v for k, v in _settings_key(settings, seed, quick).items())
    return previous.get("conditions", {}) if same else {}


def _row_line(row: dict[str, Any]) -> str:
    refused = f", refused {sum(row['refused'].values())}" if row["refused"] else ""
    errors = f", ERRORS {row['errors']}" if row["errors"] else ""
    waited = f", waited {row['waited_s']} s" if row["waited_s"] else ""
    flags = f"; monitor flags {row['monitor_flags']}" if row["monitor_flags"] else ""
    return (
        f"{row['thief']:<16} {row['queries']:>5} queries: "
        f"answered {row['answered']:.0%}{refused}{errors}{waited}; "
        f"agreement {row['agreement']:.2%}, accuracy {row['stolen_accuracy']:.2%} "
        f"({row['epochs']} epochs, {row['seconds']:.0f} s; calls {row['calls_by_action']}{flags})"
    )


# -- the report ------------------------------------------------------------------------------------


def build_report(
    conditions: dict[str, Any],
    settings: Settings,
    quick: bool,
    seed: int,
    victim_accuracy: float,
    pools: dict[str, Any],
    sizes: dict[str, int],
    extra_config: dict[str, Any],
    total_s: float,
) -> dict[str, Any]:
    largest = max(settings.budgets)
    return {
        **_settings_key(settings, seed, quick),
        "model": MODEL_NAME,
        "thieves": {t.key: t.label for t in THIEVES},
        "victim_accuracy": victim_accuracy,
        "pools": pools,
        "sizes": sizes,
        "gateway_config_extra": extra_config,
        "epochs": {str(q): settings.epochs(q) for q in settings.budgets},
        "conditions": conditions,
        "drop_at_largest_budget": drops(conditions, largest),
        "goal": goal(conditions, largest),
        "total_s": round(total_s, 1),
    }


def _agreement(conditions: dict[str, Any], condition: str, thief: str, queries: int) -> float | None:
    for row in conditions.get(condition, {}).get("rows", ()):
        if row["thief"] == thief and row["queries"] == queries:
            return float(row["agreement"])
    return None


def drops(conditions: dict[str, Any], queries: int) -> dict[str, dict[str, float | None]]:
    """Agreement lost against undefended at ``queries``, per condition and thief (> 0: the defence helps)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in conditions:
        out[key] = {}
        for thief in THIEVES:
            base = _agreement(conditions, "undefended", thief.key, queries)
            this = _agreement(conditions, key, thief.key, queries)
            out[key][thief.key] = None if base is None or this is None else base - this
    return out


def goal(conditions: dict[str, Any], queries: int, condition: str = "default") -> dict[str, Any]:
    """Issue 4's goal for ``condition`` (the default policy) at ``queries``."""
    drop = drops(conditions, queries).get(condition, {})
    benign = conditions.get(condition, {}).get("benign")
    base_benign = conditions.get("undefended", {}).get("benign")
    drop_met = all((drop.get(t) or 0.0) >= GOAL_DROP - 1e-9 for t in GOAL_THIEVES) and all(
        drop.get(t) is not None for t in GOAL_THIEVES
    )
    benign_met = (
        benign is not None
        and base_benign is not None
        and benign["accuracy"] == base_benign["accuracy"]
        and benign["same_top1_as_direct"] == 1.0
    )
    return {
        "condition": condition,
        "queries": queries,
        "drop_at_least": GOAL_DROP,
        "thieves": list(GOAL_THIEVES),
        "drop": {t: drop.get(t) for t in GOAL_THIEVES},
        "drop_met": drop_met,
        "benign_unchanged": benign_met,
        "met": drop_met and benign_met,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _cells(report: dict[str, Any], key: str, thief: str) -> list[str]:
    rows = {r["queries"]: r for r in report["conditions"][key]["rows"] if r["thief"] == thief}
    budgets = report["settings"]["budgets"]
    return [
        f"{_pct(rows[q]['agreement'])} / {_pct(rows[q]['stolen_accuracy'])}" if q in rows else "n/a"
        for q in budgets
    ]


def _answered(report: dict[str, Any], key: str, thief: str) -> str:
    rows = [r for r in report["conditions"][key]["rows"] if r["thief"] == thief]
    return _pct(min(r["answered"] for r in rows)) if rows else "n/a"


def _goal_line(report: dict[str, Any]) -> str:
    g = report["goal"]
    drops_text = ", ".join(f"{t} {_pct(d)} points" for t, d in g["drop"].items())
    return (
        f"goal (default policy, {g['queries']} queries): agreement drop ≥ {g['drop_at_least'] * 100:.0f} "
        f"points for {' and '.join(g['thieves'])}: {'met' if g['drop_met'] else 'NOT met'} ({drops_text}); "
        f"benign accuracy unchanged: {'yes' if g['benign_unchanged'] else 'NO'} "
        f"→ goal {'MET' if g['met'] else 'NOT MET'}"
    )


def format_table(report: dict[str, Any]) -> str:
    budgets = report["settings"]["budgets"]
    largest = max(budgets)
    lines = [
        "stolen model on held-out digits: agreement with the victim / accuracy (%), by queries"
        + (" (--quick: numbers mean nothing)" if report["quick"] else ""),
        f"victim accuracy (direct): {_pct(report['victim_accuracy'])} %",
    ]
    head = (
        f"{'condition':<31}"
        + "".join(f"{q:>14}" for q in budgets)
        + f"{'answered':>10}{'drop@' + str(largest):>10}{'benign acc':>12}{'=direct':>9}"
    )
    for thief in THIEVES:
        lines += ["", f"{thief.key}: {thief.label}", head, "-" * len(head)]
        for key, condition in report["conditions"].items():
            benign = condition["benign"]
            drop = report["drop_at_largest_budget"][key][thief.key]
            lines.append(
                f"{condition['label'] + ('†' if condition.get('from_previous_run') else ''):<31}"
                + "".join(f"{cell:>14}" for cell in _cells(report, key, thief.key))
                + f"{_answered(report, key, thief.key):>10}{_pct(drop):>10}"
                + f"{_pct(benign['accuracy']):>12}{_pct(benign['same_top1_as_direct']):>9}"
            )
    lines += ["", _goal_line(report)]
    if any(c.get("from_previous_run") for c in report["conditions"].values()):
        lines.append("† kept from the previous run in this folder (same settings)")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    budgets = report["settings"]["budgets"]
    largest = max(budgets)
    lines = [
        "# Model extraction evaluation (demo MNIST model, ART thieves through the gateway)",
        "",
        f"Victim accuracy (direct, held-out): {_pct(report['victim_accuracy'])} % on "
        f"{report['sizes']['heldout']} test digits; benign client: {report['sizes']['benign']} of them, one "
        f"per call, no API key. Thieves query {report['settings']['query_batch']} images per call with an "
        "API key; "
        f"substitute epochs by budget: {report['epochs']}. Query pools: "
        + "; ".join(f"{name} {p['composition']}" for name, p in report["pools"].items())
        + "."
        + (" **--quick run: the numbers mean nothing.**" if report["quick"] else ""),
        "",
        "Cells: the stolen model's agreement with the victim / its accuracy on the held-out digits (%). "
        "'answered': the smallest fraction of a thief's queries answered; 'drop': agreement points lost "
        f"against undefended at {largest} queries; 'benign': the benign client's accuracy and the fraction "
        "of its answers with the same top-1 as the model server's direct answer.",
    ]
    for thief in THIEVES:
        lines += [
            "",
            f"## {thief.key}: {thief.label}",
            "",
            "| condition | "
            + " | ".join(f"{q} queries" for q in budgets)
            + f" | answered | drop @ {largest} | "
            "benign acc | benign = direct |",
            "|---|" + "---:|" * (len(budgets) + 4),
        ]
        for key, condition in report["conditions"].items():
            drop = report["drop_at_largest_budget"][key][thief.key]
            lines.append(
                f"| {condition['label']}{' †' if condition.get('from_previous_run') else ''} | "
                + " | ".join(_cells(report, key, thief.key))
                + f" | {_answered(report, key, thief.key)} | {_pct(drop)} | "
                + f"{_pct(condition['benign']['accuracy'])} | "
                + f"{_pct(condition['benign']['same_top1_as_direct'])} |"
            )
    lines += ["", _goal_line(report), "", "## Every run", ""]
    lines += [
        "| thief | condition | queries | answered | answers' top-1 = victim's | answers' TV distance | "
        "agreement | accuracy | gateway decisions on the thief's calls; monitor flags |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, condition in report["conditions"].items():
        for row in condition["rows"]:
            tv = "n/a" if row["answer_tv_distance"] is None else f"{row['answer_tv_distance']:.3f}"
            lines.append(
                f"| {row['thief']} | {key} | {row['queries']} | {_pct(row['answered'])} | "
                f"{_pct(row['answer_top1_fidelity'])} | {tv} | {_pct(row['agreement'])} | "
                f"{_pct(row['stolen_accuracy'])} | {row['calls_by_action']} {row['monitor_flags'] or ''} |"
            )
    lines += ["", "## Policies and gateway configs", ""]
    for key, condition in report["conditions"].items():
        policy = condition["policy"] or "# none: the built-in default policy\n"
        lines += [f"`{key}`:", "", "```yaml", policy.rstrip(), "```", ""]
        config = {k: v for k, v in condition.get("gateway_config", {}).items() if k != "policy"}
        if config:
            lines += [
                "Gateway config besides the policy:",
                "",
                "```json",
                json.dumps(config, indent=2),
                "```",
                "",
            ]
        if condition.get("monitors"):
            lines += [f"Monitors: {json.dumps(condition['monitors'])}", ""]
    lines += [f"Total time: {report['total_s']} s", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MD).write_text(markdown(report))
    plot_agreement(report, out / REPORT_PNG)


def plot_agreement(report: dict[str, Any], path: Path) -> None:
    """Agreement vs queries: one panel per thief, one line per condition (benign accuracy in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(THIEVES), figsize=(5.5 * len(THIEVES), 4.8), sharey=True)
    for ax, thief in zip(np.atleast_1d(axes), THIEVES, strict=True):
        for key, condition in report["conditions"].items():
            rows = sorted(
                (r for r in condition["rows"] if r["thief"] == thief.key), key=lambda r: r["queries"]
            )
            if not rows:
                continue
            style = "--" if key == "undefended" else ("-" if key == "default" else ":")
            ax.plot(
                [r["queries"] for r in rows],
                [100 * r["agreement"] for r in rows],
                style,
                marker="o",
                linewidth=2.5 if key == "default" else 1.5,
                label=f"{condition['label']} (benign {_pct(condition['benign']['accuracy'])} %)",
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(report["settings"]["budgets"], [str(q) for q in report["settings"]["budgets"]])
        ax.set_ylim(0, 100)
        ax.set_xlabel("queries")
        ax.set_title(thief.label, fontsize=10)
        ax.grid(alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_ylabel("agreement with the victim on held-out digits (%)")
    first.legend(loc="lower right", fontsize=7)
    figure.suptitle(
        f"Model extraction through the gateway (victim accuracy {_pct(report['victim_accuracy'])} %; "
        "lines of identical runs overlap)" + (" — quick run" if report["quick"] else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- command line -----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("budgets must be positive integers")
    return values


def _condition_list(text: str) -> list[str]:
    known = [c.key for c in CONDITIONS]
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown condition '{','.join(unknown)}'; known: {', '.join(known)}"
        )
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tfshield eval extraction",
        description="Steal the demo model through the gateway (ART KnockoffNets, CopycatCNN) under each "
        "defence and report the stolen model's agreement next to benign clients' accuracy.",
    )
    add_common_arguments(
        parser,
        DEFAULT_OUT,
        quick="200 queries, 1 epoch, few digits (for tests)",
        seed="seeds pools, queries and substitutes (default 0)",
    )
    parser.add_argument(
        "--conditions",
        type=_condition_list,
        help="comma-separated conditions to run (default all: "
        + ",".join(c.key for c in CONDITIONS)
        + "); the others are kept from the previous report in --out if its settings match",
    )
    parser.add_argument(
        "--budgets",
        type=_int_list,
        help=f"comma-separated query budgets (default {','.join(map(str, BUDGETS))})",
    )
    parser.add_argument(
        "--query-batch", type=int, help=f"images per thief Predict call (default {DEFAULT_QUERY_BATCH})"
    )
    parser.add_argument(
        "--gateway-config",
        type=Path,
        help="YAML merged into the default condition's gateway config (e.g. monitors.models)",
    )
    args = parser.parse_args(argv)
    if args.query_batch is not None and args.query_batch < 1:
        parser.error("--query-batch must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        evaluate(
            args.out,
            args.cache_dir,
            args.quick,
            args.seed,
            conditions=args.conditions,
            budgets=args.budgets,
            query_batch=args.query_batch,
            gateway_config=args.gateway_config,
            log=flushing_print,
        )
    except TfshieldError as exc:
        print(f"tfshield eval extraction: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

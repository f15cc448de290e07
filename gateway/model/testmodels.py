"""Small deterministic SavedModels for tests and benchmarks (no training).

``build_test_models(base_dir)`` writes, in TF Serving's layout
(``base_dir/<name>/<version>/saved_model.pb``):

``echo/1``
    The trivial upstream for benchmarks and wire tests. Signature
    ``serving_default`` (predict): input ``x`` float32 of any shape (unknown
    rank, so a proxy test may send any float tensor) → output ``y`` = ``x``
    (one Identity op, no variables, so it costs almost nothing).

``classifier/1`` and ``classifier/2``
    A fixed linear model over one tf.Example feature ``x`` (float, length 4).
    Class ``k`` (k = 0, 1, 2, labelled ``CLASS_LABELS[k]``) scores
    ``softmax(x[:3] * SCORE_SCALE)``, so the predicted class is the index of
    the largest of the first three features. The regression value is
    ``0.5 * sum(x) + bias`` with ``bias = 2`` in version 1 and ``3`` in
    version 2, so a test can tell which version answered. Signatures:

    - ``serving_default`` (predict): input ``x`` float32 ``[-1, 4]`` →
      ``scores`` float32 ``[-1, 3]``, ``class_ids`` int64 ``[-1]``,
      ``labels`` string ``[-1]``, ``value`` float32 ``[-1]``;
    - ``classify`` (``tensorflow/serving/classify``): input ``inputs``
      (serialized tf.Example strings ``[-1]``) → ``classes`` string
      ``[-1, 3]`` and ``scores`` float32 ``[-1, 3]``;
    - ``regress`` (``tensorflow/serving/regress``): input ``inputs`` →
      ``outputs`` float32 ``[-1, 1]``.

TF2's ``tf.saved_model.save`` always records method_name
``tensorflow/serving/predict``; the classify and regress signatures get their
method names by editing ``saved_model.pb`` after saving (and its fingerprint is
rewritten to match).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"
REGRESS_METHOD_NAME = "tensorflow/serving/regress"
PREDICT_METHOD_NAME = "tensorflow/serving/predict"

CLASS_LABELS = ("zero", "one", "two")
FEATURE_LENGTH = 4
SCORE_SCALE = 4.0
REGRESSION_SLOPE = 0.5
REGRESSION_BIAS_BY_VERSION = {1: 2.0, 2: 3.0}

# Bump when a model below changes, so cached copies are rebuilt.
TEST_MODELS_RECIPE = "test-models-v2"


def expected_classifier_scores(x: np.ndarray) -> np.ndarray:
    """What ``classifier`` answers for features ``x`` (n, 4): softmax scores (n, 3)."""
    logits = np.asarray(x, dtype=np.float64)[:, :3] * SCORE_SCALE
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def expected_regression(x: np.ndarray, version: int) -> np.ndarray:
    """What ``classifier`` version ``version`` regresses for features ``x`` (n, 4): values (n,)."""
    x = np.asarray(x, dtype=np.float32)
    return (REGRESSION_SLOPE * x.sum(axis=1) + REGRESSION_BIAS_BY_VERSION[version]).astype(np.float32)


def make_example(features: np.ndarray | list[float]) -> bytes:
    """A serialized tf.Example with float feature ``x`` = ``features`` (length 4)."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    example.features.feature["x"].float_list.value.extend([float(v) for v in features])
    return example.SerializeToString()


def build_test_models(base_dir: str | os.PathLike[str]) -> Path:
    """Write ``echo`` and ``classifier`` (two versions) under ``base_dir``; returns it.

    Existing model directories of the same name are replaced.
    """
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    _save(base / "echo" / "1", *_echo_module_and_signatures())
    for version in sorted(REGRESSION_BIAS_BY_VERSION):
        module, signatures = _classifier_module_and_signatures(REGRESSION_BIAS_BY_VERSION[version])
        _save(base / "classifier" / str(version), module, signatures)
        set_signature_method_names(
            base / "classifier" / str(version),
            {"classify": CLASSIFY_METHOD_NAME, "regress": REGRESS_METHOD_NAME},
        )
    return base


def build_test_models_cached(cache_dir: str | os.PathLike[str]) -> Path:
    """``build_test_models`` once into ``cache_dir/<recipe>/`` (atomically); returns that directory."""
    target = Path(cache_dir) / TEST_MODELS_RECIPE
    if (target / "echo" / "1" / "saved_model.pb").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TEST_MODELS_RECIPE}-", dir=target.parent))
    try:
        build_test_models(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not "another process won the race": a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def set_signature_method_names(export_dir: str | os.PathLike[str], method_names: dict[str, str]) -> None:
    """Rewrite ``signature_def[name].method_name`` in ``export_dir/saved_model.pb``.

    TF2 cannot save classify/regress method names; TF Serving's MultiInference
    reads them, so the test models are patched after saving.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    pb_path = Path(export_dir) / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(pb_path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        for name, method_name in method_names.items():
            if name not in meta_graph.signature_def:
                known = ", ".join(sorted(meta_graph.signature_def))
                raise KeyError(f"{export_dir} has no signature '{name}'; it has: {known}")
            meta_graph.signature_def[name].method_name = method_name
    pb_path.write_bytes(saved_model.SerializeToString())
    _rewrite_fingerprint(Path(export_dir))


def _rewrite_fingerprint(export_dir: Path) -> None:
    """Keep ``fingerprint.pb`` consistent with the edited ``saved_model.pb``.

    The fingerprint is optional for loading; if TensorFlow's (internal) writer
    is unavailable, drop the stale file rather than leave a wrong checksum.
    """
    try:
        from tensorflow.python.saved_model import fingerprinting_utils

        fingerprinting_utils.write_fingerprint(str(export_dir))
    except (ImportError, AttributeError, ValueError):
        (export_dir / "fingerprint.pb").unlink(missing_ok=True)


def _save(export_dir: Path, module: object, signatures: dict[str, object]) -> None:
    import tensorflow as tf

    if export_dir.exists():
        shutil.rmtree(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(export_dir), signatures=signatures)


def _echo_module_and_signatures() -> tuple[object, dict[str, object]]:
    import tensorflow as tf

    class Echo(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.identity(x)}

    module = Echo()
    return module, {"serving_default": module.serve}


def _classifier_module_and_signatures(regression_bias: float) -> tuple[object, dict[str, object]]:
    import tensorflow as tf

    feature_spec = {"x": tf.io.FixedLenFeature([FEATURE_LENGTH], tf.float32)}
    labels = tf.constant(CLASS_LABELS)
    bias = tf.constant(regression_bias, tf.float32)

    def scores_of(x: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(x[:, :3] * SCORE_SCALE, axis=1)

    def value_of(x: tf.Tensor) -> tf.Tensor:
        return REGRESSION_SLOPE * tf.reduce_sum(x, axis=1) + bias

    class Classifier(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, FEATURE_LENGTH], tf.float32, name="x")])
        def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            scores = scores_of(x)
            class_ids = tf.argmax(scores, axis=1, output_type=tf.int64)
            return {
                "scores": scores,
                "class_ids": class_ids,
                "labels": tf.gather(labels, class_ids),
                "value": value_of(x),
            }

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            x = tf.io.parse_example(inputs, feature_spec)["x"]
            batch_size = tf.shape(x)[0]
            return {
                "classes": tf.tile(labels[tf.newaxis, :], [batch_size, 1]),
                "scores": scores_of(x),
            }

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            x = tf.io.parse_example(inputs, feature_spec)["x"]
            return {"outputs": value_of(x)[:, tf.newaxis]}

    module = Classifier()
    return module, {
        "serving_default": module.predict,
        "classify": module.classify,
        "regress": module.regress,
    }

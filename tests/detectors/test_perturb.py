"""Output perturbations keep every sample's top-1 class; deception changes it, consistently."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow_serving.apis import predict_pb2

from detectors.perturb import (
    Chain,
    PerturbError,
    apply,
    class_permutation,
    deceive,
    deceive_labels,
    deceiving,
    keep_top1,
    label_only,
    looks_like_probabilities,
    noise,
    perturb_response,
    perturbing,
    reverse_sigmoid,
    rounding,
    row_keys,
    top_k,
)
from gateway.policy import DEFAULT_PERTURB_LEVELS

KEY = b"a-test-deceive-key-0123456789"
OTHER_KEY = b"another-gateway-key-9876543210"
DTYPES = (np.float16, np.float32, np.float64)


def keys_for(n: int, seed: int = 0) -> np.ndarray:
    return row_keys(KEY, {"x": np.random.default_rng(seed).random((n, 4))}, n)


def chain_of(level: int) -> Chain:
    return Chain(tuple((step.kind, step.params()) for step in DEFAULT_PERTURB_LEVELS[level]))


PERTURBATIONS = {
    "top_k(1)": lambda p, keys: top_k(p, 1),
    "top_k(3)": lambda p, keys: top_k(p, 3),
    "rounding(0)": lambda p, keys: rounding(p, 0),
    "rounding(1)": lambda p, keys: rounding(p, 1),
    "rounding(3)": lambda p, keys: rounding(p, 3),
    "label_only": lambda p, keys: label_only(p),
    "reverse_sigmoid(0.3, 0.5)": lambda p, keys: reverse_sigmoid(p, 0.3, 0.5),
    "reverse_sigmoid(1, 2)": lambda p, keys: reverse_sigmoid(p, 1.0, 2.0),
    "noise(0.1)": lambda p, keys: noise(p, 0.1, keys),
    "noise(2)": lambda p, keys: noise(p, 2.0, keys),
    "level 1": lambda p, keys: chain_of(1)(p, keys),
    "level 2": lambda p, keys: chain_of(2)(p, keys),
    "level 3": lambda p, keys: chain_of(3)(p, keys),
}


def sum_tolerance(dtype: type, classes: int) -> float:
    return max(1e-5, 4 * classes * float(np.finfo(dtype).eps))


@st.composite
def probability_batches(draw: st.DrawFn) -> np.ndarray:
    """Batches of probability rows, with the hard cases: ties, near-ties, one-hots, zeros, uniform rows."""
    n = draw(st.integers(1, 12))
    k = draw(st.integers(2, 24))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    alpha = draw(st.sampled_from([0.05, 0.3, 1.0, 20.0]))
    p = rng.dirichlet(np.full(k, alpha), size=n)
    shape = draw(st.sampled_from(["plain", "coarse", "one_hot", "uniform", "near_tie"]))
    if shape == "coarse":  # many exact ties
        p = np.round(p * 4) + 1e-3
    elif shape == "one_hot":
        p = np.eye(k)[rng.integers(0, k, n)]
    elif shape == "uniform":
        p = np.ones((n, k))
    elif shape == "near_tie":
        top = p.argmax(axis=1)
        other = (top + 1 + rng.integers(0, k - 1, n)) % k
        p[np.arange(n), other] = p[np.arange(n), top] * (1 - 1e-7)
    p = p / p.sum(axis=1, keepdims=True)
    return p.astype(dtype)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
@settings(max_examples=60, deadline=None)
@given(p=probability_batches())
def test_every_perturbation_keeps_top1_row_sums_dtype_and_shape(name: str, p: np.ndarray) -> None:
    keys = keys_for(len(p))
    out = PERTURBATIONS[name](p, keys)
    assert out.dtype == p.dtype and out.shape == p.shape
    np.testing.assert_array_equal(out.argmax(axis=1), p.argmax(axis=1))
    assert np.all(out >= 0) and np.all(np.isfinite(out))
    sums = out.astype(np.float64).sum(axis=1)
    assert np.all(np.abs(sums - 1) <= sum_tolerance(p.dtype, p.shape[1])), sums


@pytest.mark.parametrize("name", list(PERTURBATIONS))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(DTYPES))
def test_rows_that_did_not_sum_to_one_keep_top1_and_stay_in_range(name: str, seed: int, dtype: type) -> None:
    # Independent sigmoid scores (multi-label outputs): no renormalisation, still top-1.
    rng = np.random.default_rng(seed)
    p = rng.random((6, 5)).astype(dtype)
    out = PERTURBATIONS[name](p, keys_for(6))
    np.testing.assert_array_equal(out.argmax(axis=1), p.argmax(axis=1))
    assert np.all((out >= 0) & (out <= 1))


def test_a_perturbation_works_on_any_leading_shape() -> None:
    p = np.random.default_rng(0).dirichlet(np.ones(7), size=(3, 4)).astype(np.float32)
    out = chain_of(2)(p, keys_for(12))
    assert out.shape == (3, 4, 7)
    np.testing.assert_array_equal(out.argmax(axis=-1), p.argmax(axis=-1))


def test_rows_with_nan_or_infinity_pass_unchanged() -> None:
    p = np.array([[0.2, np.nan, 0.8], [0.1, 0.7, 0.2]], dtype=np.float32)
    out = top_k(p, 1)
    np.testing.assert_array_equal(out[0], p[0])
    np.testing.assert_array_equal(out[1], [0, 1, 0])


def test_the_input_array_is_never_written() -> None:
    p = np.array([[0.2, 0.5, 0.3]], dtype=np.float32)
    p.setflags(write=False)  # decoded outputs are read-only views of the message
    for perturb in PERTURBATIONS.values():
        perturb(p, keys_for(1))


def test_rounding_gives_the_remainder_to_the_top_class() -> None:
    p = np.array([[0.296, 0.404, 0.3]])
    np.testing.assert_allclose(rounding(p, 1), [[0.2, 0.5, 0.3]])
    # Nearest rounding would tie 0.396 with 0.404 at 0.4, or overtake: the top class stays on top.
    np.testing.assert_allclose(rounding(np.array([[0.396, 0.404, 0.2]]), 1), [[0.3, 0.5, 0.2]])


def test_top1_guard_swaps_then_breaks_ties_downwards() -> None:
    out = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]], dtype=np.float32)
    keep_top1(out, np.array([1, 1]))
    np.testing.assert_array_equal(out.argmax(axis=1), [1, 1])
    assert out[0].tolist() == pytest.approx([0.3, 0.5, 0.2]) and out[1, 1] == np.float32(0.4)
    assert out[1, 0] == np.nextafter(np.float32(0.4), np.float32(0))


def test_reverse_sigmoid_follows_lee_et_al() -> None:
    y = np.array([[0.7, 0.2, 0.1]])
    beta, gamma = 0.5, 0.8
    s = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    raw = y - beta * (s(gamma * np.log(y / (1 - y))) - 0.5)
    np.testing.assert_allclose(reverse_sigmoid(y, beta, gamma), raw / raw.sum())


# -- keyed noise ----------------------------------------------------------------------------------


def test_noise_is_the_same_for_the_same_input_and_differs_between_inputs() -> None:
    p = np.tile(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), (4, 1))
    x = np.random.default_rng(1).random((4, 8))
    x[2] = x[0]  # the same sample asked twice in one batch
    keys = row_keys(KEY, {"x": x}, 4)
    out = noise(p, 0.2, keys)
    np.testing.assert_array_equal(out[0], out[2])
    assert not np.array_equal(out[0], out[1])
    np.testing.assert_array_equal(out, noise(p, 0.2, row_keys(KEY, {"x": x.copy()}, 4)))
    assert not np.array_equal(out, noise(p, 0.2, row_keys(OTHER_KEY, {"x": x}, 4)))


def test_row_keys_depend_on_every_input_and_fall_back_to_the_request_bytes() -> None:
    x, y = np.zeros((2, 3), np.float32), np.ones((2, 1), np.int64)
    both = row_keys(KEY, {"x": x, "y": y}, 2)
    assert both[0] == both[1]
    assert row_keys(KEY, {"x": x}, 2)[0] != both[0]
    # Three output rows for two input rows: keyed by the request bytes and the row index.
    fallback = row_keys(KEY, {"x": x}, 3, fallback=b"request")
    assert len(set(fallback.tolist())) == 3
    np.testing.assert_array_equal(fallback, row_keys(KEY, {}, 3, fallback=b"request"))
    # Scalar rows and string inputs (tf.Example bytes) key per row too.
    strings = np.array([b"a", b"b", b"a"], dtype=object)
    keys = row_keys(KEY, {"s": strings, "v": np.array([1.0, 2.0, 1.0])}, 3)
    assert keys[0] == keys[2] != keys[1]


# -- logits ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), level=st.sampled_from([1, 2, 3]), dtype=st.sampled_from(DTYPES))
def test_logits_are_perturbed_in_probability_space_and_keep_top1(seed: int, level: int, dtype: type) -> None:
    logits = (np.random.default_rng(seed).normal(size=(8, 6)) * 4).astype(dtype)
    out = apply(lambda p: chain_of(level)(p, keys_for(8)), logits, "logits")
    assert out.dtype == logits.dtype and out.shape == logits.shape and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out.argmax(axis=1), logits.argmax(axis=1))


def test_an_unchanged_distribution_gives_back_the_original_logits() -> None:
    logits = np.array([[2.0, -1.0, 0.5], [10.0, 9.0, -3.0]])
    np.testing.assert_allclose(apply(lambda p: p, logits, "logits"), logits, atol=1e-12)


# -- deception -------------------------------------------------------------------------------------------


def batch(n: int = 200, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(k, 0.3), size=n).astype(np.float32)


@pytest.mark.parametrize("mode", ["permutation", "misinformation"])
def test_deception_changes_the_top1_class_of_almost_every_input(mode: str) -> None:
    p = batch()
    out = deceive(p, KEY, mode, keys_for(len(p)))
    assert out.dtype == p.dtype and out.shape == p.shape
    assert np.mean(out.argmax(axis=1) != p.argmax(axis=1)) > 0.99
    # A plausible answer: the same values, so a probability vector still.
    np.testing.assert_allclose(np.sort(out, axis=1), np.sort(p, axis=1))


@pytest.mark.parametrize("mode", ["permutation", "misinformation"])
def test_deception_is_consistent_per_input(mode: str) -> None:
    p = batch(50)
    x = np.random.default_rng(3).random((50, 8)).astype(np.float32)
    first = deceive(p, KEY, mode, row_keys(KEY, {"x": x}, 50))
    # The same inputs again, in another order and another batch: the same answers.
    order = np.random.default_rng(4).permutation(50)
    again = deceive(p[order], KEY, mode, row_keys(KEY, {"x": x[order]}, 50))
    np.testing.assert_array_equal(again, first[order])


@pytest.mark.parametrize("mode", ["permutation", "misinformation"])
def test_a_differently_keyed_gateway_deceives_differently(mode: str) -> None:
    p = batch(100)
    x = np.random.default_rng(5).random((100, 8))
    ours = deceive(p, KEY, mode, row_keys(KEY, {"x": x}, 100))
    theirs = deceive(p, OTHER_KEY, mode, row_keys(OTHER_KEY, {"x": x}, 100))
    assert np.mean(ours.argmax(axis=1) != theirs.argmax(axis=1)) > 0.5


def test_the_class_permutation_is_a_keyed_derangement() -> None:
    for classes in (2, 3, 10, 1000):
        perm = class_permutation(KEY, classes)
        assert sorted(perm.tolist()) == list(range(classes))
        assert np.all(perm != np.arange(classes))
    assert class_permutation(KEY, 10).tolist() != class_permutation(OTHER_KEY, 10).tolist()


@pytest.mark.parametrize("mode", ["permutation", "misinformation"])
def test_deceived_labels_agree_with_deceived_scores(mode: str) -> None:
    p = batch(40)
    keys = keys_for(40)
    labels = p.argmax(axis=1).astype(np.int64)
    np.testing.assert_array_equal(
        deceive_labels(labels, 10, KEY, mode, keys), deceive(p, KEY, mode, keys).argmax(axis=1)
    )


def _softmax_regression(x: np.ndarray, targets: np.ndarray, steps: int = 300) -> np.ndarray:
    """A copycat: multinomial logistic regression trained on soft targets by gradient descent."""
    w = np.zeros((x.shape[1] + 1, targets.shape[1]))
    xb = np.hstack([x, np.ones((len(x), 1))])
    for _ in range(steps):
        z = xb @ w
        q = np.exp(z - z.max(axis=1, keepdims=True))
        q /= q.sum(axis=1, keepdims=True)
        w -= 0.5 * xb.T @ (q - targets) / len(x)
    return w


@pytest.mark.parametrize("mode, at_most", [("permutation", 0.05), ("misinformation", 0.3)])
def test_a_copycat_trained_on_deceived_answers_learns_the_wrong_function(mode: str, at_most: float) -> None:
    # Permutation: the copycat learns π∘f, right almost never. Misinformation: the true
    # class is never the answer, so the copycat does no better than chance (1/4).
    rng = np.random.default_rng(7)
    k, n = 4, 2000
    centres = rng.normal(size=(k, 2)) * 4
    true_class = rng.integers(0, k, n)
    x = centres[true_class] + rng.normal(size=(n, 2))
    logits = -((x[:, None, :] - centres[None]) ** 2).sum(axis=2)  # the victim: nearest centre
    victim = np.exp(logits - logits.max(axis=1, keepdims=True))
    victim /= victim.sum(axis=1, keepdims=True)
    keys = row_keys(KEY, {"x": x}, n)

    def copycat_accuracy(answers: np.ndarray) -> float:
        w = _softmax_regression(x, answers)
        predicted = (np.hstack([x, np.ones((n, 1))]) @ w).argmax(axis=1)
        return float(np.mean(predicted == victim.argmax(axis=1)))

    assert copycat_accuracy(victim) > 0.9
    assert copycat_accuracy(deceive(victim, KEY, mode, keys)) < at_most


# -- responses ---------------------------------------------------------------------------------------

UNKNOWN_FIELD = b"\xa8\x06\x2a"  # field 101, varint 42: from a newer TF Serving


def response_with(
    outputs: dict[str, np.ndarray], content: bool, **dtypes: tf.DType
) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "mnist"
    response.model_spec.version.value = 3
    response.model_spec.signature_name = "serving_default"
    for name, array in outputs.items():
        tensor = tf.make_tensor_proto(array, dtype=dtypes.get(name))
        if not content and tensor.tensor_content:
            # The model server's default: typed fields (float_val), unless serialising as tensor_content.
            values = tf.make_ndarray(tensor)
            tensor = tf.make_tensor_proto(values, dtype=dtypes.get(name))
            tensor.ClearField("tensor_content")
            field = {tf.float32: "float_val", tf.float64: "double_val", tf.int64: "int64_val"}[
                tensor.dtype and tf.as_dtype(tensor.dtype)
            ]
            getattr(tensor, field).extend(values.ravel().tolist())
        response.outputs[name].CopyFrom(tensor)
    return response


def level_fn(level: int, kinds: dict[str, str] | None = None, n: int = 8):
    return perturbing(chain_of(level), kinds, lambda rows: keys_for(rows))


@pytest.mark.parametrize("content", [True, False], ids=["tensor_content", "typed"])
def test_perturb_response_rewrites_the_named_output_in_its_own_form_and_keeps_the_rest(content: bool) -> None:
    probs = batch(8)
    embedding = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
    classes = probs.argmax(axis=1).astype(np.int64)
    official = response_with({"probs": probs, "embedding": embedding, "classes": classes}, content)
    official.outputs["probs"].resource_handle_val.add(device="/cpu:0")  # a field the gateway does not declare
    raw = official.SerializeToString() + UNKNOWN_FIELD

    out = perturb_response(raw, ["probs"], level_fn(2, {"probs": "probabilities"}))

    result = predict_pb2.PredictResponse.FromString(out)
    assert result.model_spec == official.model_spec
    assert result.outputs["embedding"] == official.outputs["embedding"]
    assert result.outputs["classes"] == official.outputs["classes"]
    tensor = result.outputs["probs"]
    assert tensor.dtype == official.outputs["probs"].dtype
    assert tensor.tensor_shape == official.outputs["probs"].tensor_shape
    assert bool(tensor.tensor_content) == content and (len(tensor.float_val) == 0) == content
    assert tensor.resource_handle_val[0].device == "/cpu:0"
    assert UNKNOWN_FIELD in result.SerializeToString()
    perturbed = tf.make_ndarray(tensor)
    assert not np.array_equal(perturbed, probs)
    np.testing.assert_array_equal(perturbed.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_allclose(perturbed.sum(axis=1), 1, atol=1e-5)


def test_a_response_nothing_was_done_to_is_returned_as_it_came() -> None:
    raw = response_with(
        {"class_ids": np.arange(4, dtype=np.int64), "value": np.ones((4, 1), np.float32)}, True
    )
    raw = raw.SerializeToString()
    # No scores to find (no floating output with a class axis); an absent named output is skipped.
    assert perturb_response(raw, None, level_fn(1)) is raw
    assert perturb_response(raw, ["probs"], level_fn(1, {"probs": "probabilities"})) is raw


def test_auto_detection_treats_probabilities_and_logits_alike() -> None:
    # Logits left untouched beside perturbed probabilities would give the true scores away.
    probs, logits = batch(4), np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    raw = response_with({"probs": probs, "logits": logits}, True).SerializeToString()
    result = predict_pb2.PredictResponse.FromString(perturb_response(raw, None, level_fn(3)))
    np.testing.assert_array_equal(tf.make_ndarray(result.outputs["probs"]), np.eye(10)[probs.argmax(axis=1)])
    out_logits = tf.make_ndarray(result.outputs["logits"])
    assert not np.array_equal(out_logits, logits)
    np.testing.assert_array_equal(out_logits.argmax(axis=1), logits.argmax(axis=1))
    assert looks_like_probabilities(probs) and not looks_like_probabilities(logits)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16, tf.float64])
def test_narrow_and_wide_float_outputs_keep_their_dtype_and_top1(dtype: tf.DType) -> None:
    probs = batch(32, k=6, seed=9)
    probs[:, 1] = probs[:, 0] * (1 - 1e-3)  # near ties that a narrow type cannot tell apart
    probs /= probs.sum(axis=1, keepdims=True)
    official = predict_pb2.PredictResponse()
    official.outputs["probs"].CopyFrom(tf.make_tensor_proto(probs, dtype=dtype))
    raw = official.SerializeToString()
    on_the_wire = tf.make_ndarray(official.outputs["probs"]).astype(np.float64)
    for level in (1, 2):
        result = predict_pb2.PredictResponse.FromString(
            perturb_response(raw, ["probs"], level_fn(level, {"probs": "probabilities"}))
        )
        assert result.outputs["probs"].dtype == official.outputs["probs"].dtype
        perturbed = tf.make_ndarray(result.outputs["probs"]).astype(np.float64)
        np.testing.assert_array_equal(perturbed.argmax(axis=1), on_the_wire.argmax(axis=1))


def test_deceiving_rewrites_scores_logits_and_labels_consistently() -> None:
    probs = batch(8)
    logits = np.log(probs)
    labels = probs.argmax(axis=1).astype(np.int64)
    raw = response_with({"probs": probs, "logits": logits, "classes": labels}, False).SerializeToString()
    kinds = {"probs": "probabilities", "logits": "logits", "classes": "labels"}
    fn = deceiving(KEY, "permutation", kinds, {"classes": 10}, lambda rows: keys_for(rows))
    result = predict_pb2.PredictResponse.FromString(perturb_response(raw, list(kinds), fn))
    deceived = tf.make_ndarray(result.outputs["probs"]).argmax(axis=1)
    assert np.all(deceived != labels)
    np.testing.assert_array_equal(tf.make_ndarray(result.outputs["logits"]).argmax(axis=1), deceived)
    np.testing.assert_array_equal(tf.make_ndarray(result.outputs["classes"]), deceived)


def test_deceiving_rewrites_string_labels_by_their_class_names() -> None:
    probs = batch(8, k=3)
    names = ("zero", "one", "two")
    labels = np.array([names[i].encode() for i in probs.argmax(axis=1)], dtype=object)
    response = predict_pb2.PredictResponse()
    response.outputs["probs"].CopyFrom(tf.make_tensor_proto(probs))
    response.outputs["labels"].CopyFrom(tf.make_tensor_proto(labels))
    kinds = {"probs": "probabilities", "labels": "labels"}
    fn = deceiving(KEY, "misinformation", kinds, {"labels": 3}, keys_for, {"labels": names})
    result = predict_pb2.PredictResponse.FromString(
        perturb_response(response.SerializeToString(), list(kinds), fn)
    )
    deceived = tf.make_ndarray(result.outputs["probs"]).argmax(axis=1)
    assert np.all(deceived != probs.argmax(axis=1))
    assert [v.decode() for v in tf.make_ndarray(result.outputs["labels"])] == [names[i] for i in deceived]


@pytest.mark.parametrize(
    "kinds, output, message",
    [
        (
            {"classes": "probabilities"},
            "classes",
            "output 'classes' holds DT_INT64; only floating outputs can be perturbed",
        ),
        ({"probs": "labels"}, "probs", "output 'probs' is configured as labels but holds DT_FLOAT"),
    ],
)
def test_a_misconfigured_output_is_a_perturb_error(kinds: dict[str, str], output: str, message: str) -> None:
    raw = response_with({"probs": batch(2), "classes": np.zeros(2, np.int64)}, True).SerializeToString()
    with pytest.raises(PerturbError) as error:
        perturb_response(raw, [output], level_fn(1, kinds))
    assert str(error.value) == message


def test_an_undecodable_response_is_a_perturb_error() -> None:
    with pytest.raises(PerturbError, match="not a PredictResponse"):
        perturb_response(b"\xff\xff\xff", None, level_fn(1))

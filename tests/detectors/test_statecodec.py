"""The per-client state codec: round trips, and clear errors (never a crash) on any other bytes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.statecodec import MAGIC, StateError, decode_state, encode_state

DTYPES = ["float16", "float32", "float64", "uint8", "int32", "uint32", "int64", "uint64"]


def test_arrays_round_trip_with_names_dtypes_and_shapes():
    arrays = {
        "sets": np.arange(24, dtype=np.float16).reshape(2, 3, 4),
        "count": np.int64(7),
        "ids": np.array([1, 2**63 + 5], dtype=np.uint64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    decoded = decode_state(encode_state(arrays))
    assert list(decoded) == list(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(decoded[name], value)
        assert decoded[name].dtype == np.asarray(value).dtype
        assert decoded[name].shape == np.shape(value)


def test_decoded_arrays_are_writable_copies():
    blob = encode_state({"x": np.zeros(3, np.float32)})
    decoded = decode_state(blob)
    decoded["x"][0] = 1.0
    assert decode_state(blob)["x"][0] == 0.0


def test_big_endian_input_is_stored_little_endian():
    blob = encode_state({"x": np.arange(3, dtype=">i4")})
    assert decode_state(blob)["x"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(decode_state(blob)["x"], [0, 1, 2])


def test_unsupported_dtypes_and_names_are_refused_when_encoding():
    with pytest.raises(StateError, match="cannot encode dtype complex128"):
        encode_state({"x": np.zeros(2, np.complex128)})
    with pytest.raises(StateError, match="cannot encode dtype object"):
        encode_state({"x": np.array([object()], dtype=object)})
    with pytest.raises(StateError, match="array name must be 1..32 ASCII bytes"):
        encode_state({"": np.zeros(1)})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "header describes"),
        (lambda b: b + b"\x00", "header describes"),
        (lambda b: b"ZZZZ" + b[4:], "does not start with the TFS1 magic"),
        (lambda b: b[:5], "does not start with the TFS1 magic"),
        (lambda b: b[:6] + b"\xff" + b[7:], "claims 255 arrays"),
        (lambda b: b[:4] + b"\xff\xff" + b[6:], "runs past the end"),
        (lambda b: pickle.dumps({"x": 1}), "does not start with the TFS1 magic"),
        (lambda b: b"", "does not start with the TFS1 magic"),
    ],
)
def test_anything_else_raises_state_error_saying_why(mutate, message):
    blob = encode_state({"a": np.zeros((2, 2), np.float16), "b": np.int64(1)})
    with pytest.raises(StateError, match=message):
        decode_state(mutate(blob))


def test_a_blob_larger_than_allowed_is_refused_before_parsing():
    blob = encode_state({"x": np.zeros(100, np.float64)})
    with pytest.raises(StateError, match=r"state is \d+ bytes, more than the 64 allowed"):
        decode_state(blob, max_bytes=64)


def test_a_header_claiming_huge_dimensions_does_not_allocate():
    blob = bytearray(encode_state({"x": np.zeros((1, 1, 1, 1), np.float64)}))
    header_dims = blob.index(b"x") + 3  # name, dtype code, ndim, then dims
    blob[header_dims : header_dims + 16] = b"\xff" * 16  # four dimensions of 2^32 - 1
    with pytest.raises(StateError, match="header describes"):
        decode_state(bytes(blob))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(blob):
    try:
        decode_state(blob)
    except StateError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(0, 10_000))
def test_corrupting_a_valid_blob_raises_state_error_or_decodes(junk, position):
    blob = encode_state({"v": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3)})
    at = position % len(blob)
    corrupted = blob[:at] + junk + blob[at + len(junk) :]
    try:
        decoded = decode_state(corrupted)
    except StateError:
        return
    assert set(decoded) <= {"v", "n"} or all(isinstance(v, np.ndarray) for v in decoded.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_supported_dtype_round_trips(dtype):
    value = np.arange(5).astype(dtype)
    np.testing.assert_array_equal(decode_state(encode_state({"x": value}))["x"], value)


def test_the_encoding_starts_with_the_magic():
    assert encode_state({"x": np.zeros(1)}).startswith(MAGIC)

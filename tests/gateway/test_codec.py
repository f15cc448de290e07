"""gateway.codec decodes every tensor exactly as TensorFlow does, and refuses garbage by name.

Two oracles: ``tf.make_ndarray`` (TensorFlow's Python decoder) and
``tf.io.parse_tensor``, which runs the C++ ``Tensor::FromProto`` the model
server itself uses. Messages are built with TensorFlow's own TensorProto,
serialised, and parsed into the gateway's wire-compatible one.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.framework import types_pb2 as tf_types_pb2

from gateway import codec
from gateway.codec import DTYPES, MAX_RANK, numpy_to_tensor, tensor_to_numpy, tensor_uses_content
from gateway.errors import InvalidInput
from protos import tensor_pb2, types_pb2

DT = types_pb2.DataType
MAX_ELEMENTS = 10_000
STRING = np.dtype(object)
NATIVE_DTYPES = [
    np.dtype(name)
    for name in (
        "float16", "float32", "float64", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
    )
]  # fmt: skip
# numpy has no dtype for these; the codec decodes them to float32 values.
ML_DTYPES = [np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e5m2), np.dtype(ml_dtypes.float8_e4m3fn)]
ALL_DTYPES = NATIVE_DTYPES + ML_DTYPES + [STRING]

few = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def dtype_id(dtype: np.dtype) -> str:
    return "string" if dtype == STRING else dtype.name


def arrays_of(dtype: np.dtype, shape=shapes) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``dtype``, every bit pattern possible (NaNs, infinities, -0.0, subnormals)."""
    shape_strategy = shape if isinstance(shape, st.SearchStrategy) else st.just(shape)
    if dtype == STRING:

        def strings(dims: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
            count = math.prod(dims)
            return st.lists(st.binary(max_size=12), min_size=count, max_size=count).map(
                lambda values: _object_array(values).reshape(dims)
            )

        return shape_strategy.flatmap(strings)
    if dtype in ML_DTYPES:
        return hnp.arrays(np.dtype(f"uint{dtype.itemsize * 8}"), shape_strategy).map(lambda a: a.view(dtype))
    return hnp.arrays(dtype, shape_strategy)


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def ours(official: tf_tensor_pb2.TensorProto) -> tensor_pb2.TensorProto:
    """The same message, as the gateway parses it off the wire."""
    return tensor_pb2.TensorProto.FromString(official.SerializeToString())


def server_decode(official: tf_tensor_pb2.TensorProto) -> np.ndarray:
    """What the model server makes of the message: C++ Tensor::FromProto."""
    serialized = official.SerializeToString()
    decoded = tf.io.parse_tensor(serialized, tf.dtypes.as_dtype(official.dtype)).numpy()
    # Scalars come back as numpy scalars, a scalar string as bare bytes.
    return np.array(decoded, dtype=object) if isinstance(decoded, bytes) else np.asarray(decoded)


def assert_same_tensor(got: np.ndarray, want: np.ndarray) -> None:
    """Same shape, dtype and bits; NaN matches NaN (payloads may differ across decoders)."""
    if want.dtype in ML_DTYPES:
        want = want.astype(np.float32)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if want.dtype == STRING:
        assert list(got.ravel()) == list(want.ravel())
        assert all(type(value) is bytes for value in got.ravel())
        return
    if want.dtype.kind in "fc":
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        got, want = np.where(nan, 0, got), np.where(nan, 0, want)
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def typed_official(values: np.ndarray, dims: tuple[int, ...]) -> tf_tensor_pb2.TensorProto:
    """TensorFlow's TensorProto with ``values`` in the dtype's typed field, written by hand."""
    dtype = values.dtype
    official = tf_tensor_pb2.TensorProto(dtype=_datatype(dtype))
    for size in dims:
        official.tensor_shape.dim.add(size=size)
    flat = values.ravel()
    if dtype == STRING:
        official.string_val.extend(flat.tolist())
    elif dtype in ML_DTYPES[1:]:
        official.float8_val = flat.view(np.uint8).tobytes()
    elif dtype in (np.float16, ml_dtypes.bfloat16):
        official.half_val.extend(flat.view(np.uint16).tolist())
    elif dtype.kind == "c":
        field = official.scomplex_val if dtype == np.complex64 else official.dcomplex_val
        field.extend(flat.view(np.float32 if dtype == np.complex64 else np.float64).tolist())
    else:
        field = {
            "float32": "float_val", "float64": "double_val", "int64": "int64_val", "uint32": "uint32_val",
            "uint64": "uint64_val", "bool": "bool_val",
        }.get(dtype.name, "int_val")  # fmt: skip
        getattr(official, field).extend(flat.tolist())
    return official


def _datatype(dtype: np.dtype) -> int:
    return tf.dtypes.as_dtype(tf.string if dtype == STRING else dtype).as_datatype_enum


def tensor(datatype: int, dims: list[int], **fields) -> tensor_pb2.TensorProto:
    """The gateway's TensorProto, built directly (for malformed cases)."""
    message = tensor_pb2.TensorProto(dtype=datatype)
    for size in dims:
        message.tensor_shape.dim.add(size=size)
    for name, value in fields.items():
        if isinstance(value, bytes):
            setattr(message, name, value)
        else:
            getattr(message, name).extend(value)
    return message


def problem(message: tensor_pb2.TensorProto, max_elements: int = MAX_ELEMENTS) -> str:
    with pytest.raises(InvalidInput) as caught:
        tensor_to_numpy(message, "pixels", max_elements)
    assert caught.value.input_name == "pixels"
    assert str(caught.value) == f"input 'pixels': {caught.value.problem}"
    return caught.value.problem


# --- against TensorFlow --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@few
@given(data=st.data())
def test_decodes_make_tensor_proto_output_like_tensorflow(dtype, data):
    # make_tensor_proto writes tensor_content for most numeric types with more than one element,
    # and typed fields for scalars, single elements, bool, uint16, complex and strings.
    arr = data.draw(arrays_of(dtype))
    official = tf.make_tensor_proto(arr)
    got = tensor_to_numpy(ours(official), "x", MAX_ELEMENTS)
    assert_same_tensor(got, tf.make_ndarray(official))
    assert_same_tensor(got, server_decode(official))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@few
@given(data=st.data())
def test_decodes_typed_fields_repeating_the_last_value_like_tensorflow(dtype, data):
    dims = data.draw(shapes)
    elements = math.prod(dims)
    # No values (zeros), one value (broadcast), all of them, or anything between.
    count = data.draw(st.sampled_from(sorted({0, min(1, elements), elements})) | st.integers(0, elements))
    values = data.draw(arrays_of(dtype, (count,)))
    official = typed_official(values, dims)
    got = tensor_to_numpy(ours(official), "x", MAX_ELEMENTS)
    assert_same_tensor(got, server_decode(official))
    if not (dtype == STRING and count == 0):  # make_ndarray pads strings with str "", not b""
        assert_same_tensor(got, tf.make_ndarray(official))


@pytest.mark.parametrize("dtype", NATIVE_DTYPES + [STRING], ids=dtype_id)
@pytest.mark.parametrize("as_tensor_content", [True, False], ids=["content", "typed"])
@few
@given(data=st.data())
def test_numpy_to_tensor_round_trips_through_tensorflow(dtype, as_tensor_content, data):
    arr = data.draw(arrays_of(dtype))
    message = numpy_to_tensor(arr, as_tensor_content=as_tensor_content)
    assert tensor_uses_content(message) == (as_tensor_content and arr.size > 0)
    official = tf_tensor_pb2.TensorProto.FromString(message.SerializeToString())
    assert_same_tensor(arr, server_decode(official))
    if not (dtype == STRING and as_tensor_content):  # make_ndarray cannot read string tensor_content
        assert_same_tensor(arr, tf.make_ndarray(official))
    assert_same_tensor(tensor_to_numpy(ours(official), "x", MAX_ELEMENTS), arr)


@pytest.mark.parametrize("as_tensor_content", [True, False], ids=["content", "typed"])
@few
@given(arr=hnp.arrays(np.float32, shapes))
def test_numpy_to_tensor_rounds_float32_to_bfloat16_like_tensorflow(as_tensor_content, arr):
    message = numpy_to_tensor(arr, as_tensor_content=as_tensor_content, dtype=DT.DT_BFLOAT16)
    official = tf_tensor_pb2.TensorProto.FromString(message.SerializeToString())
    assert official.dtype == tf_types_pb2.DT_BFLOAT16
    assert_same_tensor(tf.make_ndarray(official).astype(np.float32), arr.astype(ml_dtypes.bfloat16))
    assert_same_tensor(tensor_to_numpy(message, "x", MAX_ELEMENTS), arr.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("as_tensor_content", [True, False], ids=["content", "typed"])
def test_numpy_to_tensor_casts_to_the_requested_dtype(as_tensor_content):
    arr = np.array([[0.1, 65504.0, -2.5]], dtype=np.float64)
    message = numpy_to_tensor(arr, as_tensor_content=as_tensor_content, dtype=DT.DT_HALF)
    assert message.dtype == DT.DT_HALF
    assert_same_tensor(tensor_to_numpy(message, "x", MAX_ELEMENTS), arr.astype(np.float16))


@pytest.mark.parametrize("as_tensor_content", [True, False], ids=["content", "typed"])
def test_numpy_to_tensor_writes_big_endian_arrays_little_endian(as_tensor_content):
    message = numpy_to_tensor(np.array([1, -2], dtype=">i4"), as_tensor_content=as_tensor_content)
    assert message.dtype == DT.DT_INT32
    assert_same_tensor(tensor_to_numpy(message, "x", 2), np.array([1, -2], dtype=np.int32))


def test_one_value_fills_the_whole_shape():
    official = typed_official(np.array([7.5], dtype=np.float32), (2, 3))
    got = tensor_to_numpy(ours(official), "x", MAX_ELEMENTS)
    assert_same_tensor(got, np.full((2, 3), 7.5, dtype=np.float32))
    assert_same_tensor(got, tf.make_ndarray(official))
    assert_same_tensor(got, server_decode(official))


def test_no_values_decode_to_zeros_and_empty_strings():
    assert_same_tensor(tensor_to_numpy(tensor(DT.DT_INT64, [2]), "x", 10), np.zeros(2, np.int64))
    strings = tensor_to_numpy(tensor(DT.DT_STRING, [2]), "x", 10)
    assert_same_tensor(strings, _object_array([b"", b""]))
    assert_same_tensor(strings, server_decode(typed_official(_object_array([]), (2,))))


@pytest.mark.parametrize(
    ("dtype", "datatype", "field", "values"),
    [
        (np.int8, tf_types_pb2.DT_INT8, "int_val", [300, -129]),
        (np.uint8, tf_types_pb2.DT_UINT8, "int_val", [-1, 256]),
        (np.uint16, tf_types_pb2.DT_UINT16, "int_val", [-1, 65537]),
        (np.int16, tf_types_pb2.DT_INT16, "int_val", [40000, -40000]),
        (np.float16, tf_types_pb2.DT_HALF, "half_val", [-16384, 0x1C000]),  # both are 0xC000, -2.0
    ],
    ids=["int8", "uint8", "uint16", "int16", "half"],
)
def test_out_of_range_int_val_and_half_val_keep_their_low_bits_like_the_server(
    dtype, datatype, field, values
):
    official = tf_tensor_pb2.TensorProto(dtype=datatype)
    official.tensor_shape.dim.add(size=2)
    getattr(official, field).extend(values)
    got = tensor_to_numpy(ours(official), "x", 10)
    assert got.dtype == dtype
    assert_same_tensor(got, server_decode(official))


def test_bfloat16_half_val_keeps_the_low_16_bits_like_the_server():
    official = tf_tensor_pb2.TensorProto(dtype=tf_types_pb2.DT_BFLOAT16, half_val=[0x3F80, 0x13F80, -0x4040])
    official.tensor_shape.dim.add(size=3)
    got = tensor_to_numpy(ours(official), "x", 10)
    assert_same_tensor(got, np.array([1.0, 1.0, -1.5], dtype=np.float32))
    assert_same_tensor(got, server_decode(official))


@pytest.mark.parametrize("datatype", [DT.DT_FLOAT8_E5M2, DT.DT_FLOAT8_E4M3FN], ids=DT.Name)
@pytest.mark.parametrize("field", ["tensor_content", "float8_val"])
def test_every_float8_byte_decodes_like_the_server(datatype, field):
    official = tf_tensor_pb2.TensorProto(dtype=datatype)
    official.tensor_shape.dim.add(size=256)
    setattr(official, field, bytes(range(256)))
    got = tensor_to_numpy(ours(official), "x", 256)
    assert_same_tensor(got, server_decode(official))


def test_string_tensor_content_decodes_like_the_server():
    # C++ encoders: the varint32 lengths (2, 0, 200), then the bytes.
    content = b"\x02\x00\xc8\x01" + b"ab" + b"z" * 200
    official = tf_tensor_pb2.TensorProto(dtype=tf_types_pb2.DT_STRING, tensor_content=content)
    official.tensor_shape.dim.add(size=3)
    got = tensor_to_numpy(ours(official), "x", 10)
    assert_same_tensor(got, _object_array([b"ab", b"", b"z" * 200]))
    assert_same_tensor(got, server_decode(official))


def test_a_fifth_varint_byte_loses_its_high_bits_like_the_server():
    # 0x81 0x80 0x80 0x80 0x10 is 1 + 2**32; GetVarint32 keeps the low 32 bits: 1.
    official = tf_tensor_pb2.TensorProto(
        dtype=tf_types_pb2.DT_STRING, tensor_content=b"\x81\x80\x80\x80\x10a"
    )
    official.tensor_shape.dim.add(size=1)
    got = tensor_to_numpy(ours(official), "x", 10)
    assert_same_tensor(got, _object_array([b"a"]))
    assert_same_tensor(got, server_decode(official))


def test_tensor_content_wins_over_the_typed_field():
    official = tf.make_tensor_proto(np.array([1.0, 2.0], dtype=np.float32))
    official.float_val.extend([9.0])
    got = tensor_to_numpy(ours(official), "x", 10)
    assert_same_tensor(got, np.array([1.0, 2.0], dtype=np.float32))
    assert_same_tensor(got, server_decode(official))


def test_version_number_is_ignored():
    message = numpy_to_tensor(np.arange(3, dtype=np.int32), as_tensor_content=True)
    message.version_number = 7
    assert_same_tensor(tensor_to_numpy(message, "x", 10), np.arange(3, dtype=np.int32))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_other_protobuf_backends_decode_typed_fields_the_same(dtype, monkeypatch):
    # Without upb's __array__ on repeated fields the codec iterates; same values.
    values = np.arange(6).astype(np.float64).astype(dtype) if dtype != STRING else _object_array([b"a"] * 6)
    message = ours(typed_official(values[:4], (2, 3)))
    fast = tensor_to_numpy(message, "x", 10)
    monkeypatch.setattr(codec, "_ARRAY_FIELDS", frozenset())
    assert_same_tensor(tensor_to_numpy(message, "x", 10), fast)


def test_the_dtype_table_matches_tensorflow():
    for spec in DTYPES:
        tf_dtype = tf.dtypes.as_dtype(spec.datatype)
        assert spec.name == tf_types_pb2.DataType.Name(spec.datatype)
        if tf_dtype == tf.string:
            assert spec.numpy_dtype == STRING
        elif np.dtype(tf_dtype.as_numpy_dtype) in ML_DTYPES:
            assert spec.numpy_dtype == np.float32
        else:
            assert spec.numpy_dtype == np.dtype(tf_dtype.as_numpy_dtype)
            assert spec.content_dtype.itemsize == tf_dtype.size


def test_the_codec_does_not_import_tensorflow():
    code = "import sys, gateway.codec; sys.exit('tensorflow' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


# --- zero copy ----------------------------------------------------------------------------------------


def test_tensor_content_decodes_without_a_copy():
    message = numpy_to_tensor(np.ones((1, 28, 28, 1), dtype=np.float32), as_tensor_content=True)
    arr = tensor_to_numpy(message, "x", 1000)
    assert not arr.flags.owndata
    assert not arr.flags.writeable
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes)
    assert len(base) == arr.nbytes


def test_typed_fields_decode_to_a_writable_array():
    arr = tensor_to_numpy(numpy_to_tensor(np.ones(4, np.float32), as_tensor_content=False), "x", 10)
    assert arr.flags.writeable


# --- refusals -----------------------------------------------------------------------------------------


def test_content_length_must_match_shape_and_dtype():
    message = tensor(DT.DT_FLOAT, [2, 3], tensor_content=bytes(12))
    assert problem(message) == "tensor_content has 12 bytes; shape [2, 3] of DT_FLOAT needs 24"
    with pytest.raises(tf.errors.InvalidArgumentError):  # the server refuses it too
        server_decode(tf_tensor_pb2.TensorProto.FromString(message.SerializeToString()))


def test_content_on_a_tensor_without_elements_is_refused():
    message = tensor(DT.DT_INT32, [0, 3], tensor_content=bytes(4))
    assert problem(message) == "tensor_content has 4 bytes; shape [0, 3] of DT_INT32 needs 0"


def test_negative_dimensions_are_refused():
    message = tensor(DT.DT_FLOAT, [2, -1], float_val=[1.0])
    assert problem(message) == (
        "tensor_shape [2, -1] has a negative dimension; a request tensor needs a known shape"
    )


def test_unknown_rank_is_refused():
    message = tensor(DT.DT_FLOAT, [], float_val=[1.0])
    message.tensor_shape.unknown_rank = True
    assert problem(message) == "tensor_shape has unknown_rank set; a request tensor needs a known shape"


def test_rank_beyond_numpy_is_refused():
    message = tensor(DT.DT_FLOAT, [1] * (MAX_RANK + 1))
    assert problem(message) == f"tensor_shape has rank {MAX_RANK + 1}; the limit is {MAX_RANK}"


def test_element_limit_is_checked_before_allocating():
    # One value broadcast over 10**12 elements would need 4 TB.
    message = tensor(DT.DT_FLOAT, [1_000_000, 1_000_000], float_val=[1.0])
    assert problem(message, max_elements=1_000_000) == (
        "shape [1000000, 1000000] has 1000000000000 elements; the limit is 1000000"
    )


def test_huge_dimensions_do_not_overflow():
    big = 2**62
    message = tensor(DT.DT_UINT8, [big, big, 4], tensor_content=b"\x00")
    assert (
        problem(message, max_elements=100)
        == f"shape [{big}, {big}, 4] has {big * big * 4} elements; the limit is 100"
    )


def test_empty_tensors_keep_their_shape():
    assert tensor_to_numpy(tensor(DT.DT_FLOAT, [0, 784]), "x", 784).shape == (0, 784)


def test_empty_tensors_with_huge_other_dimensions_are_refused():
    # numpy cannot even hold the shape [2**62, 0]; the other dimensions count against the limit.
    assert problem(tensor(DT.DT_FLOAT, [2**62, 0]), max_elements=100) == (
        f"shape [{2**62}, 0] has no elements, but its other dimensions multiply to {2**62}; the limit is 100"
    )


def test_the_element_limit_is_inclusive():
    got = tensor_to_numpy(tensor(DT.DT_FLOAT, [10, 10], float_val=[1.0]), "x", 100)
    assert_same_tensor(got, np.ones((10, 10), np.float32))


def test_more_typed_values_than_elements_are_refused():
    assert problem(tensor(DT.DT_FLOAT, [2, 3], float_val=[1.0] * 7)) == (
        "float_val has 7 values; shape [2, 3] has 6 elements"
    )


def test_an_odd_count_of_complex_parts_is_refused():
    assert problem(tensor(DT.DT_COMPLEX64, [2], scomplex_val=[1.0, 2.0, 3.0])) == (
        "scomplex_val has 3 numbers; DT_COMPLEX64 values are (real, imaginary) pairs"
    )


@pytest.mark.parametrize(
    "fields",
    [{"int_val": [1, 2]}, {"tensor_content": bytes(8), "double_val": [1.0]}],
    ids=["typed", "beside-content"],
)
def test_values_in_another_dtypes_field_are_refused(fields):
    message = tensor(DT.DT_FLOAT, [2], **fields)
    wrong = next(name for name in fields if name != "tensor_content")
    assert problem(message) == f"{wrong} is set, but DT_FLOAT values go in float_val or tensor_content"


SUPPORTED = (
    "DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING, DT_COMPLEX64, DT_INT64, "
    "DT_BOOL, DT_BFLOAT16, DT_UINT16, DT_COMPLEX128, DT_HALF, DT_UINT32, DT_UINT64, DT_FLOAT8_E5M2, "
    "DT_FLOAT8_E4M3FN"
)


@pytest.mark.parametrize(
    ("datatype", "expected"),
    [
        (DT.DT_RESOURCE, f"dtype DT_RESOURCE is not supported; supported dtypes: {SUPPORTED}"),
        (DT.DT_VARIANT, f"dtype DT_VARIANT is not supported; supported dtypes: {SUPPORTED}"),
        (DT.DT_QINT8, f"dtype DT_QINT8 is not supported; supported dtypes: {SUPPORTED}"),
        (DT.DT_QUINT16, f"dtype DT_QUINT16 is not supported; supported dtypes: {SUPPORTED}"),
        (101, f"dtype 101 (not a known DataType) is not supported; supported dtypes: {SUPPORTED}"),
        (-3, f"dtype -3 (not a known DataType) is not supported; supported dtypes: {SUPPORTED}"),
        (DT.DT_INVALID, f"dtype is not set (DT_INVALID); set it to one of {SUPPORTED}"),
    ],
    ids=["resource", "variant", "qint8", "quint16", "ref-101", "negative", "invalid"],
)
def test_unsupported_dtypes_are_refused_by_name(datatype, expected):
    assert problem(tensor(datatype, [1], int_val=[1])) == expected


def test_bool_content_bytes_must_be_0_or_1():
    message = tensor(DT.DT_BOOL, [2], tensor_content=b"\x02\x01")
    assert problem(message) == "tensor_content of DT_BOOL has a byte other than 0 or 1"
    with pytest.raises(tf.errors.InvalidArgumentError):  # the server refuses it too
        server_decode(tf_tensor_pb2.TensorProto.FromString(message.SerializeToString()))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x01", "tensor_content of DT_STRING ends inside its 2 varint32 lengths"),
        (b"\x80\x80", "tensor_content of DT_STRING ends inside its 2 varint32 lengths"),
        (b"\x80\x80\x80\x80\x80\x01a", "tensor_content of DT_STRING has a varint32 longer than 5 bytes"),
        (b"\x02\x01abcd", "tensor_content of DT_STRING has 4 bytes of strings; its lengths add up to 3"),
        (b"\x02\x01ab", "tensor_content of DT_STRING has 2 bytes of strings; its lengths add up to 3"),
    ],
    ids=["short-header", "cut-varint", "long-varint", "extra-bytes", "missing-bytes"],
)
def test_malformed_string_content_is_refused(content, expected):
    message = tensor(DT.DT_STRING, [2], tensor_content=content)
    assert problem(message) == expected
    with pytest.raises(tf.errors.InvalidArgumentError):  # the server refuses it too
        server_decode(tf_tensor_pb2.TensorProto.FromString(message.SerializeToString()))


# --- garbage ------------------------------------------------------------------------------------------

TYPED_FIELDS = {
    "half_val": st.integers(-(2**31), 2**31 - 1),
    "float_val": st.floats(width=32),
    "double_val": st.floats(),
    "int_val": st.integers(-(2**31), 2**31 - 1),
    "string_val": st.binary(max_size=4),
    "scomplex_val": st.floats(width=32),
    "int64_val": st.integers(-(2**63), 2**63 - 1),
    "bool_val": st.booleans(),
    "dcomplex_val": st.floats(),
    "uint32_val": st.integers(0, 2**32 - 1),
    "uint64_val": st.integers(0, 2**64 - 1),
}


SUPPORTED_DATATYPES = [spec.datatype for spec in DTYPES]


@st.composite
def garbage_tensors(draw) -> tf_tensor_pb2.TensorProto:
    """Mostly plausible tensors with something off: the cases a hostile or broken client sends."""
    rarely = st.integers(0, 4).map(lambda n: n == 0)
    official = tf_tensor_pb2.TensorProto()
    if draw(rarely):
        official.dtype = draw(st.sampled_from([*tf_types_pb2.DataType.values(), 999, -1]))
    else:
        official.dtype = draw(st.sampled_from(SUPPORTED_DATATYPES))
    odd_side = st.sampled_from([-1, -2, 2**31, 2**62, 2**63 - 1])
    for _ in range(draw(st.integers(0, 4))):
        odd = draw(rarely) and draw(st.booleans())
        official.tensor_shape.dim.add(size=draw(odd_side) if odd else draw(st.integers(0, 4)))
    official.tensor_shape.unknown_rank = draw(rarely) and draw(rarely)
    spec = codec.spec_for_datatype(official.dtype)
    if draw(st.booleans()):
        size = len(draw(st.binary(max_size=40)))
        if spec is not None and spec.content_dtype is not None and not draw(rarely):
            size = math.prod(d.size for d in official.tensor_shape.dim) * spec.content_dtype.itemsize
        size = max(0, min(size, 512))
        official.tensor_content = draw(st.binary(min_size=size, max_size=size))
    own_field = [spec.field] if spec is not None and spec.field in TYPED_FIELDS else []
    for field in draw(st.lists(st.sampled_from(own_field * 8 + list(TYPED_FIELDS)), max_size=2)):
        getattr(official, field).extend(draw(st.lists(TYPED_FIELDS[field], max_size=10)))
    if draw(rarely) or (spec is not None and spec.field == "float8_val" and draw(st.booleans())):
        official.float8_val = draw(st.binary(max_size=10))
    return official


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(official=garbage_tensors())
def test_garbage_is_refused_or_decoded_exactly_as_the_server_does(official):
    try:
        got = tensor_to_numpy(ours(official), "x", 64)
    except InvalidInput as error:
        assert error.input_name == "x"
        return
    assert_same_tensor(got, server_decode(official))


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_invalid_input(raw):
    message = tensor_pb2.TensorProto()
    try:
        message.ParseFromString(raw)
    except Exception:  # not a message at all: the decode stage refuses it before the codec
        return
    try:
        tensor_to_numpy(message, "x", 64)
    except InvalidInput:
        pass

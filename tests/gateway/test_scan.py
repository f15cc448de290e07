"""scan_predict, the decode stage's fast path, reads a request exactly as the full parse does, or declines.

The oracle is the full path (``parse_predict`` + ``decode_inputs``), itself
checked against TensorFlow in test_codec.py. Requests are built with
TensorFlow Serving's own messages, then damaged byte by byte: whatever the
scan accepts must decode to the same arrays, and it must accept nothing the
full path refuses. And it must not decline what clients send, or the fast path
would be dead code that every one of these tests still passed.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow_serving.apis import predict_pb2 as tfs_predict_pb2

from gateway import decode
from gateway.decode import LayoutCache, decode_inputs, parse_predict, read_inputs, scan_predict
from gateway.errors import InvalidInput
from gateway.pipeline import Call, DecodeStage
from protos import predict_pb2
from tests.gateway.test_codec import (
    ML_DTYPES,
    NATIVE_DTYPES,
    STRING,
    arrays_of,
    assert_same_tensor,
    typed_official,
)

MAX_ELEMENTS = 10_000
FIXED_WIDTH = NATIVE_DTYPES + ML_DTYPES
some = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
names = st.text(min_size=0, max_size=6)


def full_path(raw: bytes, max_elements: int = MAX_ELEMENTS) -> tuple[str, dict[str, np.ndarray]]:
    request = parse_predict(raw)
    return request.model_spec.signature_name, decode_inputs(request, max_elements)


def agreement(raw: bytes, max_elements: int = MAX_ELEMENTS) -> tuple[str, dict[str, np.ndarray]] | None:
    """The scan's answer, after checking it declined or matched the full path exactly."""
    scanned = scan_predict(raw, max_elements)
    try:
        want = full_path(raw, max_elements)
    except InvalidInput:
        assert scanned is None, "the scan accepted a request the full path refuses"
        return None
    if scanned is None:
        return None
    signature, spans = scanned
    inputs = read_inputs(raw, spans)
    assert signature == want[0]
    assert sorted(inputs) == sorted(want[1])
    for name, array in inputs.items():
        assert_same_tensor(array, want[1][name])
        # Views of the bytes are read-only in both; bfloat16 and float8 are converted into new arrays.
        assert array.flags.writeable == want[1][name].flags.writeable
    return signature, inputs


@st.composite
def requests(draw, tensors: st.SearchStrategy) -> tuple[bytes, bool]:
    """A serialised official PredictRequest, and whether every input carries only tensor_content."""
    request = tfs_predict_pb2.PredictRequest()
    request.model_spec.name = draw(names)
    if draw(st.booleans()):
        request.model_spec.signature_name = draw(names)
    if draw(st.booleans()):
        request.model_spec.version.value = draw(st.integers(0, 2**40))
    request.output_filter.extend(draw(st.lists(names, max_size=2)))
    content_only = True
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        official = draw(tensors)
        request.inputs[name].CopyFrom(official)
        listed = {field.name for field, _ in official.ListFields()}
        content_only &= listed <= {"dtype", "tensor_shape", "tensor_content"} and "tensor_content" in listed
    return request.SerializeToString(), content_only


def made_by_the_client(dtypes: list[np.dtype]) -> st.SearchStrategy:
    """What tf.make_tensor_proto builds from an array, as stock clients do."""
    return st.sampled_from(dtypes).flatmap(arrays_of).map(tf.make_tensor_proto)


def typed(dtypes: list[np.dtype]) -> st.SearchStrategy:
    return st.sampled_from(dtypes).flatmap(lambda d: arrays_of(d)).map(lambda a: typed_official(a, a.shape))


@pytest.mark.parametrize("dtype", FIXED_WIDTH, ids=lambda d: d.name)
@some
@given(data=st.data())
def test_what_stock_clients_send_takes_the_fast_path_and_reads_as_the_full_parse(dtype, data) -> None:
    raw, content_only = data.draw(requests(made_by_the_client([dtype])))
    scanned = agreement(raw)
    valid = True
    try:
        full_path(raw)
    except InvalidInput:
        valid = False
    # Every valid request whose tensors sit in tensor_content is read by the scan; the others
    # (make_tensor_proto writes typed fields for single elements, bool, uint16, complex) are not.
    assert (scanned is not None) == (valid and content_only)


@some
@given(data=st.data(), max_elements=st.sampled_from([1, 7, MAX_ELEMENTS]))
def test_any_request_is_declined_or_read_as_the_full_parse(data, max_elements) -> None:
    everything = FIXED_WIDTH + [STRING]
    tensors = st.one_of(made_by_the_client(everything), typed(everything))
    raw, _ = data.draw(requests(tensors))
    agreement(raw, max_elements)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    damage=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3),
    cut=st.integers(0, 10**6) | st.none(),
)
def test_damaged_bytes_are_declined_or_read_as_the_full_parse(data, damage, cut) -> None:
    dtypes = [np.dtype("float32"), np.dtype("int64"), np.dtype("bool")]
    raw, _ = data.draw(requests(made_by_the_client(dtypes)))
    damaged = bytearray(raw)
    for position, value in damage:
        damaged[position % len(damaged)] = value
    if cut is not None:
        del damaged[cut % (len(damaged) + 1) :]
    agreement(bytes(damaged))


def _request(*tensor_bytes: bytes, spec: bytes = b"") -> bytes:
    """A PredictRequest written field by field: model_spec, then one inputs entry per tensor."""
    out = b"\x0a" + bytes([len(spec)]) + spec if spec else b""
    for index, tensor in enumerate(tensor_bytes):
        entry = b"\x0a\x01" + bytes([0x61 + index]) + b"\x12" + bytes([len(tensor)]) + tensor
        out += b"\x12" + bytes([len(entry)]) + entry
    return out


FLOAT_2 = b"\x08\x01" + b"\x12\x04\x12\x02\x08\x02" + b"\x22\x08" + np.array([1.5, -2], "<f4").tobytes()


def test_the_hand_written_reference_request_is_read() -> None:
    signature, inputs = agreement(_request(FLOAT_2, spec=b"\x0a\x01m\x1a\x03sig"))
    assert signature == "sig"
    assert inputs["a"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    "raw, why",
    [
        (
            _request(FLOAT_2.replace(b"\x08\x02", b"\x08\x01") + b"\x12\x04\x12\x02\x08\x02"),
            "tensor_shape twice: protobuf merges the dims into [1, 2], the last alone says [2]",
        ),
        (
            _request(b"\x12\x04\x12\x02\x08\x01\x22\x10" + b"\0" * 16 + b"\x08", FLOAT_2),
            "a dtype varint cut off by the end of its tensor (the next byte would make it DT_COMPLEX128)",
        ),
        (_request(FLOAT_2, FLOAT_2).replace(b"\x0a\x01b", b"\x0a\x01a"), "one input name twice"),
        (_request(FLOAT_2, spec=b"\x0a\x01m") + b"\x0a\x03\x0a\x01n", "model_spec twice"),
        (_request(FLOAT_2) + b"\x22\x00", "a field PredictRequest does not have"),
        (_request(FLOAT_2.replace(b"\x08\x02", b"\x08\x03")), "content length does not match the shape"),
        (_request(b"\x08\x01\x12\x0d\x12\x0b\x08" + b"\xfe" + b"\xff" * 8 + b"\x01" + b"\x22\x00"), "dim -2"),
        (_request(FLOAT_2[:2] + b"\x12\x06\x12\x02\x08\x02\x18\x01" + FLOAT_2[8:]), "unknown_rank"),
        (_request(b"\x08\x0a\x12\x04\x12\x02\x08\x02\x22\x02\x01\x02"), "a DT_BOOL byte of 2"),
        (_request(FLOAT_2 + b"\x2a\x04" + b"\0" * 4), "float_val beside tensor_content"),
        (_request(b"\x08\x07\x12\x04\x12\x02\x08\x01\x22\x02\x01a"), "DT_STRING"),
        (_request(FLOAT_2, spec=b"\x0a\x02\xff\xfe"), "a model name that is not UTF-8"),
    ],
)
def test_what_the_scan_cannot_vouch_for_goes_to_the_full_path(raw: bytes, why: str) -> None:
    assert scan_predict(raw, MAX_ELEMENTS) is None, why
    agreement(raw)


def test_the_element_limit_sends_a_request_to_the_full_path_which_refuses_it() -> None:
    raw = _request(FLOAT_2)
    assert scan_predict(raw, 2) is not None
    assert scan_predict(raw, 1) is None
    with pytest.raises(InvalidInput, match="input 'a'.*the limit is 1"):
        full_path(raw, 1)


def test_inputs_are_read_only_views_of_the_request_bytes() -> None:
    raw = _request(FLOAT_2)
    _, spans = scan_predict(raw, MAX_ELEMENTS)
    inputs = read_inputs(raw, spans)
    assert np.shares_memory(inputs["a"], np.frombuffer(raw, np.uint8))
    assert not inputs["a"].flags.writeable


async def test_the_decode_stage_parses_the_message_only_when_a_stage_asks_for_it() -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.signature_name = "sig"
    client_tensor = tf.make_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3))
    request.inputs["x"].MergeFromString(client_tensor.SerializeToString())
    raw = request.SerializeToString()
    call = Call("Predict", raw, "m")
    await DecodeStage(MAX_ELEMENTS).on_request(call)
    assert call.decoded and call.signature == "sig"
    assert call._inputs is None  # no arrays made while no stage reads them
    assert call.inputs["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert np.shares_memory(call.inputs["x"], np.frombuffer(raw, np.uint8))
    assert call._request is None  # the fast path made no message
    assert call.request == request  # ... until one is asked for

    typed_request = predict_pb2.PredictRequest.FromString(raw)
    typed_request.inputs["x"].ClearField("tensor_content")
    typed_request.inputs["x"].float_val.extend(range(6))
    slow = Call("Predict", typed_request.SerializeToString(), "m")
    await DecodeStage(MAX_ELEMENTS).on_request(slow)
    assert slow._request == typed_request and slow.signature == "sig"
    assert slow.inputs["x"].tolist() == call.inputs["x"].tolist()

    other = Call("Classify", b"", "m")
    await DecodeStage(MAX_ELEMENTS).on_request(other)
    assert not other.decoded and other.request is None and other.inputs == {}


def _same_scan(got, want) -> None:
    assert (got is None) == (want is None)
    if got is not None:
        assert got[0] == want[0] and got[1].keys() == want[1].keys()
        for name, value in want[1].items():
            assert type(got[1][name]) is type(value)
            if isinstance(value, tuple):
                assert got[1][name] == value
            else:
                assert_same_tensor(got[1][name], value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), damage=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3))
def test_a_remembered_layout_gives_exactly_the_scan_of_the_new_bytes(data, damage) -> None:
    cache = LayoutCache(MAX_ELEMENTS)
    dtypes = [np.dtype("float32"), np.dtype("int64"), np.dtype("uint8"), np.dtype("bool")]
    first, _ = data.draw(requests(made_by_the_client(dtypes)))
    _same_scan(cache.scan(first), scan_predict(first, MAX_ELEMENTS))
    # The same layout with other values, then damage anywhere: inside the contents (a hit that must
    # read the new values) or outside them (a different layout: scanned afresh, or declined).
    again = bytearray(first)
    for position, value in damage:
        again[position % len(again)] = value
    again = bytes(again)
    _same_scan(cache.scan(again), scan_predict(again, MAX_ELEMENTS))
    if scan_predict(again, MAX_ELEMENTS) is not None:
        assert_same_tensor_dicts(read_inputs(again, cache.scan(again)[1]), full_path(again)[1])


def assert_same_tensor_dicts(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert_same_tensor(got[name], want[name])


def test_a_layout_seen_before_is_not_walked_again(monkeypatch) -> None:
    cache = LayoutCache(MAX_ELEMENTS)
    first = _request(FLOAT_2, spec=b"\x0a\x01m\x1a\x03sig")
    assert cache.scan(first) is not None
    monkeypatch.setattr(decode, "scan_predict", lambda raw, limit: pytest.fail("walked again"))
    other_values = first.replace(np.array([1.5, -2], "<f4").tobytes(), np.array([7, 8], "<f4").tobytes())
    signature, spans = cache.scan(other_values)
    assert signature == "sig" and read_inputs(other_values, spans)["a"].tolist() == [7.0, 8.0]


def test_the_layout_cache_is_bounded_in_count_and_bytes(monkeypatch) -> None:
    cache = LayoutCache(MAX_ELEMENTS, size=4, max_layout_bytes=40)
    for index in range(20):
        cache.scan(_request(FLOAT_2, spec=b"\x0a\x02m" + bytes([0x41 + index])))
    assert cache._count <= 4 and sum(map(len, cache._layouts.values())) <= 4
    long_name = _request(FLOAT_2, spec=b"\x0a\x32" + b"n" * 50)
    assert cache.scan(long_name) is not None  # still scanned ...
    assert all(
        len(raw_len_layouts) == 0 or length != len(long_name)
        for length, raw_len_layouts in cache._layouts.items()
    )  # ... but not remembered

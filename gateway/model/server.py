"""A small TF-Serving-compatible model server: the project's stand-in for ``tensorflow/serving``.

``tfshield model-server --model-base-path DIR`` serves every SavedModel laid
out as ``DIR/<name>/<version>/saved_model.pb`` (every numeric version is
loaded; requests without a version get the latest) over TF Serving's gRPC API,
with the official ``tensorflow_serving.apis`` messages and generated servicers:

- ``PredictionService``: Predict, Classify, Regress, MultiInference,
  GetModelMetadata (``signature_def`` only);
- ``ModelService``: GetModelStatus; HandleReloadConfigRequest answers
  UNIMPLEMENTED (models are fixed at start);
- ``grpc.health.v1.Health`` with ``--enable-grpc-healthcheck-service``
  (service names ``ModelService`` and ``PredictionService``, as upstream).

Behaviour follows TensorFlow Serving's sources (predict_util.cc, util.cc,
classifier.cc, regressor.cc, multi_inference.cc, get_model_metadata_impl.cc,
get_model_status_impl.cc, server_core.cc): the same status codes and, where
upstream produces them itself, the same messages, e.g.
``NOT_FOUND: Servable not found for request: Latest(NAME)``; messages longer
than 1024 characters are cut and end in ``...TRUNCATED``. Responses carry
typed fields (``float_val`` ...) unless ``--enable-serialization-as-tensor-
content`` is given. Version labels are not configurable here, so every label
is unknown: INVALID_ARGUMENT ``Unrecognized servable version label: L``.

Differences from upstream, on purpose: request tensors are checked against the
signature's dtype *and shape* before running (upstream only checks dtype and
leaves shapes to the graph's ops); the dtype message is upstream's
(``Expects arg[i] to be float but double is provided``), with ``i`` the
input's position among the signature's inputs sorted by name. There is no
batching, no REST port, no model config file and no hot reload.

Test hooks (also described in :mod:`gateway.model.testhooks`, which tests
import without TensorFlow):

- request metadata ``x-echo-<name>: v`` comes back as trailing metadata
  ``x-tfshield-echo-<name>: v``; ``x-echo-deadline`` also adds
  ``x-tfshield-deadline-ms``, the caller's remaining deadline on arrival;
- request metadata ``x-sleep-ms: N`` waits N ms before answering; a deadline
  that passes meanwhile gives DEADLINE_EXCEEDED (so does one that has
  already passed on arrival);
- ``/tfshield.modelserver.Debug/Counts`` (raw bytes in and out) returns JSON
  ``{"Predict": n, ...}``: calls received per method, failures included.

Startup: load every model, bind ``--host:--port`` (0 = ephemeral) and, with
``--grpc-socket-path``, a unix socket too (as TF Serving's
``--grpc_socket_path``, how the Kubernetes sidecar in ``deploy/`` reaches it),
then write ``--ready-file`` with ``{"pid": ..., "grpc_port": ...}`` (and
``"grpc_socket_path"``). SIGTERM or SIGINT
stops accepting calls and lets in-flight ones finish (``--shutdown-grace-s``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tensorflow.core.framework import tensor_pb2, types_pb2  # noqa: E402
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from gateway.errors import TfshieldError  # noqa: E402
from gateway.model import testhooks  # noqa: E402
from gateway.readyfile import write_ready_file  # noqa: E402

logger = logging.getLogger("tfshield.model_server")

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD_NAME = "tensorflow/serving/predict"
CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"
REGRESS_METHOD_NAME = "tensorflow/serving/regress"
CLASSIFY_INPUTS = "inputs"
CLASSIFY_OUTPUT_CLASSES = "classes"
CLASSIFY_OUTPUT_SCORES = "scores"
REGRESS_INPUTS = "inputs"
REGRESS_OUTPUTS = "outputs"
SIGNATURE_DEF_FIELD = "signature_def"
SERVE_TAG = "serve"

# Like tensorflow_model_server: accept and send messages up to INT32_MAX bytes.
MAX_MESSAGE_BYTES = 2**31 - 1
# grpc_status_util.cc cuts longer status messages.
MAX_STATUS_MESSAGE_CHARS = 1024
SLEEP_POLL_S = 0.01
_NO_DEADLINE_S = 1e9  # grpc reports "no deadline" as a huge remaining time

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(TfshieldError):
    """A request the model server refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# -- loading ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Servable:
    """One loaded version of one model.

    ``signature_defs`` is the SavedModel's own ``signature_def`` map (from
    ``saved_model.pb``, as TF Serving reports it, ``__saved_model_init_op``
    included); ``functions`` holds the callable signatures.
    """

    name: str
    version: int
    path: Path
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]
    functions: dict[str, Any]
    loaded: Any  # keeps the restored object (and its variables) alive


def read_signature_defs(export_dir: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The ``signature_def`` map of the ``serve`` meta graph in ``export_dir``."""
    saved_model = saved_model_pb2.SavedModel()
    binary = export_dir / "saved_model.pb"
    if binary.is_file():
        saved_model.ParseFromString(binary.read_bytes())
    else:
        text_format.Parse((export_dir / "saved_model.pbtxt").read_text(), saved_model)
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise TfshieldError(f"{export_dir} has no meta graph tagged '{SERVE_TAG}'; re-export it for serving")


def load_servable(name: str, version: int, export_dir: Path) -> Servable:
    loaded = tf.saved_model.load(str(export_dir), tags=[SERVE_TAG])
    return Servable(
        name=name,
        version=version,
        path=export_dir,
        signature_defs=read_signature_defs(export_dir),
        functions=dict(loaded.signatures),
        loaded=loaded,
    )


def find_versions(model_dir: Path) -> dict[int, Path]:
    """Numeric version directories of one model that hold a SavedModel (others are ignored, as upstream)."""
    versions = {}
    for child in model_dir.iterdir():
        is_saved_model = (child / "saved_model.pb").is_file() or (child / "saved_model.pbtxt").is_file()
        if child.is_dir() and child.name.isdigit() and is_saved_model:
            versions[int(child.name)] = child
    return versions


class ModelRegistry:
    """Every loaded servable, by model name and version; resolves a ModelSpec as ServerCore does."""

    def __init__(self, servables: Iterable[Servable]) -> None:
        self._by_name: dict[str, dict[int, Servable]] = {}
        for servable in servables:
            self._by_name.setdefault(servable.name, {})[servable.version] = servable

    @classmethod
    def load(cls, model_base_path: str | os.PathLike[str]) -> ModelRegistry:
        base = Path(model_base_path)
        if not base.is_dir():
            raise TfshieldError(f"--model-base-path {base} is not a directory")
        servables = []
        for model_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = find_versions(model_dir)
            if not versions:
                logger.warning("no versions of model %s under %s; skipping it", model_dir.name, model_dir)
                continue
            for version, export_dir in sorted(versions.items()):
                started = time.monotonic()
                servables.append(load_servable(model_dir.name, version, export_dir))
                logger.info(
                    "loaded model %s version %d from %s in %.1f s",
                    model_dir.name,
                    version,
                    export_dir,
                    time.monotonic() - started,
                )
        if not servables:
            raise TfshieldError(f"no models under {base}: expected {base}/<name>/<version>/saved_model.pb")
        return cls(servables)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> dict[int, Servable]:
        return self._by_name.get(name, {})

    def resolve(self, model_spec: model_pb2.ModelSpec) -> Servable:
        """The servable a ModelSpec asks for, or the error TF Serving gives."""
        name = model_spec.name
        if not name:
            raise _invalid("ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        versions = self._by_name.get(name, {})
        if choice == "version_label":
            # No model config, so no labels: every label is unrecognized.
            raise _invalid(f"Unrecognized servable version label: {model_spec.version_label}")
        if choice == "version":
            version = model_spec.version.value
            if version not in versions:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})"
                )
            return versions[version]
        if not versions:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        return versions[max(versions)]


# -- tensors ------------------------------------------------------------------


def dtype_string(dtype_enum: int) -> str:
    """TensorFlow's own name of a dtype, as in its error messages (``float``, ``double``, ``int64``)."""
    names = {types_pb2.DT_FLOAT: "float", types_pb2.DT_DOUBLE: "double", types_pb2.DT_HALF: "half"}
    if dtype_enum in names:
        return names[dtype_enum]
    try:
        return tf.dtypes.as_dtype(dtype_enum).name
    except TypeError:
        return f"<unknown dtype {dtype_enum}>"


def _read_varint(buffer: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if offset >= len(buffer):
            raise ValueError("truncated varint")
        byte = buffer[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_string_content(content: bytes, count: int) -> list[bytes]:
    """DT_STRING in ``tensor_content`` (C++ encoders): ``count`` varint lengths, then the bytes."""
    lengths, offset = [], 0
    for _ in range(count):
        length, offset = _read_varint(content, offset)
        lengths.append(length)
    strings = []
    for length in lengths:
        strings.append(content[offset : offset + length])
        offset += length
    if offset != len(content):
        raise ValueError("string tensor_content has trailing or missing bytes")
    return strings


def tensor_to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """Decode a request tensor like ``Tensor::FromProto``; raises ValueError if it cannot be parsed."""
    if proto.dtype == types_pb2.DT_STRING and proto.tensor_content:
        shape = [dim.size for dim in proto.tensor_shape.dim]
        count = int(np.prod(shape, dtype=np.int64))
        return np.array(decode_string_content(proto.tensor_content, count), dtype=object).reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except Exception as exc:  # make_ndarray raises ValueError, TypeError or worse on bad protos
        raise ValueError(str(exc)) from exc


def _shape_is_compatible(shape: tuple[int, ...], expected: Any) -> bool:
    if expected.unknown_rank:
        return True
    return len(shape) == len(expected.dim) and all(
        dim.size < 0 or dim.size == actual for dim, actual in zip(expected.dim, shape, strict=True)
    )


def _shape_string(dims: Iterable[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


# Typed field of TensorProto per dtype, and how its values are packed on the wire.
_FIXED32_FIELDS = {types_pb2.DT_FLOAT: 5, types_pb2.DT_COMPLEX64: 9}
_FIXED64_FIELDS = {types_pb2.DT_DOUBLE: 6, types_pb2.DT_COMPLEX128: 12}
_VARINT_FIELDS = {
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_QINT8: "int_val",
    types_pb2.DT_QUINT8: "int_val",
    types_pb2.DT_QINT16: "int_val",
    types_pb2.DT_QUINT16: "int_val",
    types_pb2.DT_QINT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
}
_HALF_TYPES = (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)


def write_tensor(
    array: np.ndarray, dtype_enum: int, out: tensor_pb2.TensorProto, as_tensor_content: bool
) -> None:
    """Encode ``array`` into ``out`` as TF Serving does (``AsProtoField`` or ``AsProtoTensorContent``).

    Fixed-width values are written as one packed field straight from the
    array's bytes (the wire form of ``float_val`` is the same little-endian
    bytes as ``tensor_content``), so a 32 MiB output costs a copy, not a loop.
    """
    out.dtype = dtype_enum
    for size in array.shape:
        out.tensor_shape.dim.add().size = size
    if dtype_enum == types_pb2.DT_STRING:
        values = [bytes(v) if not isinstance(v, str) else v.encode() for v in array.ravel()]
        if as_tensor_content:
            out.tensor_content = b"".join(_encode_varint(len(v)) for v in values) + b"".join(values)
        else:
            out.string_val.extend(values)
        return
    little_endian = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
    if as_tensor_content:
        out.tensor_content = little_endian.tobytes()
        return
    if array.size == 0:
        return
    if dtype_enum in _FIXED32_FIELDS or dtype_enum in _FIXED64_FIELDS:
        field_number = _FIXED32_FIELDS.get(dtype_enum) or _FIXED64_FIELDS[dtype_enum]
        payload = little_endian.tobytes()
        out.MergeFromString(_encode_varint(field_number << 3 | 2) + _encode_varint(len(payload)) + payload)
    elif dtype_enum in _HALF_TYPES:
        out.half_val.extend(little_endian.view(np.uint16).ravel().tolist())
    elif dtype_enum in _VARINT_FIELDS:
        getattr(out, _VARINT_FIELDS[dtype_enum]).extend(array.ravel().tolist())
    else:
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED, f"cannot encode output of dtype {dtype_string(dtype_enum)}"
        )


def _set_model_spec(out: model_pb2.ModelSpec, name: str, version: int, signature_name: str | None) -> None:
    """MakeModelSpec: name, version, and the signature (``serving_default`` when empty) if given."""
    out.name = name
    if signature_name is not None:
        out.signature_name = signature_name or DEFAULT_SIGNATURE
    out.version.value = version


def _run(servable: Servable, signature_name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Call one signature; TensorFlow's own errors keep their status code and message."""
    function = servable.functions.get(signature_name)
    if function is None:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f'Signature "{signature_name}" of model {servable.name} cannot be run (it has no function)',
        )
    try:
        return function(**{alias: tf.constant(value) for alias, value in inputs.items()})
    except tf.errors.OpError as exc:
        raise ServingError(
            _STATUS_BY_NUMBER.get(exc.error_code, grpc.StatusCode.UNKNOWN), exc.message
        ) from exc
    except (TypeError, ValueError) as exc:
        raise _invalid(str(exc).strip().splitlines()[0]) from exc


# -- Predict ------------------------------------------------------------------


def predict(
    registry: ModelRegistry,
    request: predict_pb2.PredictRequest,
    as_tensor_content: bool,
    check_method_name: bool = False,
) -> predict_pb2.PredictResponse:
    if not request.HasField("model_spec"):
        raise _invalid("Missing ModelSpec")
    servable = registry.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = servable.signature_defs.get(signature_name)
    if signature is None:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.'
        )
    if check_method_name and signature.method_name not in (
        PREDICT_METHOD_NAME,
        CLASSIFY_METHOD_NAME,
        REGRESS_METHOD_NAME,
    ):
        raise ServingError(
            grpc.StatusCode.INTERNAL,
            "Expected prediction signature method_name to be one of {"
            f"{PREDICT_METHOD_NAME}, {CLASSIFY_METHOD_NAME}, {REGRESS_METHOD_NAME}}}. "
            f"Was: {signature.method_name}",
        )
    response = predict_pb2.PredictResponse()
    _set_model_spec(response.model_spec, servable.name, servable.version, signature_name)

    inputs = _predict_inputs(signature, request)
    output_aliases = _predict_output_aliases(signature, request)
    outputs = _run(servable, signature_name, inputs)
    for alias in output_aliases:
        tensor = outputs[alias]
        write_tensor(
            tensor.numpy(), tensor.dtype.as_datatype_enum, response.outputs[alias], as_tensor_content
        )
    return response


def _predict_inputs(
    signature: meta_graph_pb2.SignatureDef, request: predict_pb2.PredictRequest
) -> dict[str, Any]:
    """Check and decode the request's inputs against the signature (predict_util.cc, saved_model/util.cc)."""
    request_keys, signature_keys = set(request.inputs), set(signature.inputs)
    if len(request_keys) > len(signature_keys) or (
        len(request_keys) < len(signature_keys) and not signature.defaults
    ):
        raise _invalid(
            f"input size does not match signature: {len(request_keys)}!={len(signature_keys)} "
            f"len({{{','.join(sorted(request_keys))}}}) != len({{{','.join(sorted(signature_keys))}}}). "
            f"Sent extra: {{{','.join(sorted(request_keys - signature_keys))}}}. "
            f"Missing but required: {{{','.join(sorted(signature_keys - request_keys))}}}."
        )
    decoded: dict[str, np.ndarray] = {}
    protos: dict[str, tensor_pb2.TensorProto] = {}
    for alias in sorted(signature_keys):
        info = signature.inputs[alias]
        if alias in request.inputs:
            proto = request.inputs[alias]
        elif alias in signature.defaults:
            proto = signature.defaults[alias]
        else:
            raise _invalid(
                f"Signature input alias: {alias}(feed name: {info.name}) not found in request and no default "
                f"value provided. Inputs expected to be in the request {{{','.join(sorted(request_keys))}}}, "
                f"or default input alias set: {','.join(sorted(signature.defaults))}"
            )
        try:
            decoded[alias] = tensor_to_ndarray(proto)
        except ValueError:
            raise _invalid(f"tensor parsing error: {alias}") from None
        protos[alias] = proto
    if request_keys - signature_keys:
        used = sorted(request_keys & signature_keys)
        raise _invalid(
            f"Inputs contains invalid name. Used request inputs: {','.join(used)}, "
            f"request input: {','.join(sorted(request_keys))}"
        )
    for index, alias in enumerate(sorted(signature_keys)):
        info, proto = signature.inputs[alias], protos[alias]
        if proto.dtype != info.dtype:
            raise _invalid(
                f"Expects arg[{index}] to be {dtype_string(info.dtype)} "
                f"but {dtype_string(proto.dtype)} is provided"
            )
        if not _shape_is_compatible(decoded[alias].shape, info.tensor_shape):
            expected = _shape_string(dim.size for dim in info.tensor_shape.dim)
            raise _invalid(
                f"input tensor alias {alias} has shape {_shape_string(decoded[alias].shape)}, which is not "
                f"compatible with the signature's shape {expected} (-1 means any size)"
            )
    return decoded


def _predict_output_aliases(
    signature: meta_graph_pb2.SignatureDef, request: predict_pb2.PredictRequest
) -> list[str]:
    if not request.output_filter:
        return list(signature.outputs)
    seen: set[str] = set()
    for alias in request.output_filter:
        if alias not in signature.outputs:
            raise _invalid(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.outputs))}}}."
            )
        if alias in seen:
            raise _invalid(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return list(request.output_filter)


# -- Classify, Regress, MultiInference ----------------------------------------


def serialized_examples(model_input: input_pb2.Input) -> list[bytes]:
    """The serialized tf.Examples of an Input (context + example concatenated, as util.cc does)."""
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [example.SerializeToString() for example in model_input.example_list.examples]
    elif kind == "example_list_with_context":
        with_context = model_input.example_list_with_context
        context = with_context.context.SerializeToString()
        examples = [context + example.SerializeToString() for example in with_context.examples]
    else:
        examples = []
    if not examples:
        raise _invalid("Input is empty.")
    return examples


def _signature_for(
    servable: Servable, model_spec: model_pb2.ModelSpec
) -> tuple[str, meta_graph_pb2.SignatureDef]:
    signature_name = model_spec.signature_name or DEFAULT_SIGNATURE
    signature = servable.signature_defs.get(signature_name)
    if signature is None:
        raise _invalid(f"No signature was found with the name: {signature_name}")
    return signature_name, signature


def _check_classification_signature(signature: meta_graph_pb2.SignatureDef, check_method_name: bool) -> None:
    if check_method_name and signature.method_name != CLASSIFY_METHOD_NAME:
        raise _invalid(
            f"Expected classification signature method_name to be {CLASSIFY_METHOD_NAME}. "
            f"Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise _invalid("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise _invalid(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if CLASSIFY_INPUTS not in signature.inputs:
        raise _invalid(
            f"No classification inputs found in SignatureDef: {text_format.MessageToString(signature)}"
        )
    if CLASSIFY_OUTPUT_CLASSES not in signature.outputs and CLASSIFY_OUTPUT_SCORES not in signature.outputs:
        raise _invalid(
            "Expected classification signature outputs to contain at least one of "
            f'"{CLASSIFY_OUTPUT_CLASSES}" '
            f'or "{CLASSIFY_OUTPUT_SCORES}". Signature was: {text_format.MessageToString(signature)}'
        )


def _check_regression_signature(signature: meta_graph_pb2.SignatureDef, check_method_name: bool) -> None:
    if check_method_name and signature.method_name != REGRESS_METHOD_NAME:
        raise _invalid(
            f"Expected regression signature method_name to be {REGRESS_METHOD_NAME}. "
            f"Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise _invalid("Expected one input Tensor.")
    if len(signature.outputs) != 1:
        raise _invalid("Expected one output Tensor.")
    if REGRESS_INPUTS not in signature.inputs:
        raise _invalid(
            f"No regression inputs found in SignatureDef: {text_format.MessageToString(signature)}"
        )
    if REGRESS_OUTPUTS not in signature.outputs:
        raise _invalid(
            f"No regression outputs found in SignatureDef: {text_format.MessageToString(signature)}"
        )


NOT_A_SCORE_MATRIX = "Expected Tensor shape: [batch_size num_classes] but got "


def _classification_matrix(
    outputs: dict[str, Any], alias: str, dtype_enum: int, num_examples: int
) -> np.ndarray | None:
    """Output ``alias`` (``classes`` or ``scores``) as a checked [batch, num_classes] array, if present."""
    tensor = outputs.get(alias)
    if tensor is None:
        return None
    values = tensor.numpy()
    if values.ndim != 2:
        raise _invalid(NOT_A_SCORE_MATRIX + _shape_string(values.shape))
    if tensor.dtype.as_datatype_enum != dtype_enum:
        raise _invalid(
            f"Expected {alias} Tensor of {types_pb2.DataType.Name(dtype_enum)}. "
            f"Got: {types_pb2.DataType.Name(tensor.dtype.as_datatype_enum)}"
        )
    if values.shape[0] != num_examples:
        raise _invalid(f"Expected {alias} output batch size of {num_examples}. Got: {values.shape[0]}")
    return values


def _fill_classification(
    outputs: dict[str, Any], num_examples: int, result: classification_pb2.ClassificationResult
) -> None:
    classes = _classification_matrix(outputs, CLASSIFY_OUTPUT_CLASSES, types_pb2.DT_STRING, num_examples)
    scores = _classification_matrix(outputs, CLASSIFY_OUTPUT_SCORES, types_pb2.DT_FLOAT, num_examples)
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise _invalid(
            "Tensors class and score should match in dim_size(1). "
            f"Got {classes.shape[1]} vs. {scores.shape[1]}"
        )
    present = classes if classes is not None else scores
    if present is None:  # the signature check guarantees one of them; the graph may still not return it
        raise _invalid(
            f'Expected classification outputs "{CLASSIFY_OUTPUT_CLASSES}" or "{CLASSIFY_OUTPUT_SCORES}"'
        )
    num_classes = present.shape[1]
    for i in range(num_examples):
        classifications = result.classifications.add()
        for c in range(num_classes):
            entry = classifications.classes.add()
            if classes is not None:
                entry.label = bytes(classes[i, c]).decode("utf-8", errors="replace")
            if scores is not None:
                entry.score = float(scores[i, c])


def _fill_regression(
    outputs: dict[str, Any], num_examples: int, result: regression_pb2.RegressionResult
) -> None:
    tensor = outputs[REGRESS_OUTPUTS]
    values = tensor.numpy()
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise _invalid(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
            f"but got {_shape_string(values.shape)}"
        )
    if values.shape[0] != num_examples:
        raise _invalid(
            f"Input batch size did not match output batch size: {num_examples} vs. {values.shape[0]}"
        )
    if tensor.dtype != tf.float32:
        raise _invalid(
            "Expected output Tensor of DT_FLOAT.  "
            f"Got: {types_pb2.DataType.Name(tensor.dtype.as_datatype_enum)}"
        )
    for value in values.ravel():
        result.regressions.add().value = float(value)


def _example_outputs(servable: Servable, signature_name: str, examples: list[bytes]) -> dict[str, Any]:
    inputs = {CLASSIFY_INPUTS: np.array(examples, dtype=object)}
    return _run(servable, signature_name, inputs)


def classify(
    registry: ModelRegistry,
    request: classification_pb2.ClassificationRequest,
    check_method_name: bool = False,
) -> classification_pb2.ClassificationResponse:
    if not request.HasField("model_spec"):
        raise _invalid("Missing ModelSpec")
    servable = registry.resolve(request.model_spec)
    signature_name, signature = _signature_for(servable, request.model_spec)
    _check_classification_signature(signature, check_method_name)
    response = classification_pb2.ClassificationResponse()
    _set_model_spec(response.model_spec, servable.name, servable.version, request.model_spec.signature_name)
    examples = serialized_examples(request.input)
    outputs = _example_outputs(servable, signature_name, examples)
    _fill_classification(outputs, len(examples), response.result)
    return response


def regress(
    registry: ModelRegistry, request: regression_pb2.RegressionRequest, check_method_name: bool = False
) -> regression_pb2.RegressionResponse:
    if not request.HasField("model_spec"):
        raise _invalid("Missing ModelSpec")
    servable = registry.resolve(request.model_spec)
    signature_name, signature = _signature_for(servable, request.model_spec)
    _check_regression_signature(signature, check_method_name)
    response = regression_pb2.RegressionResponse()
    _set_model_spec(response.model_spec, servable.name, servable.version, request.model_spec.signature_name)
    examples = serialized_examples(request.input)
    outputs = _example_outputs(servable, signature_name, examples)
    _fill_regression(outputs, len(examples), response.result)
    return response


def multi_inference(
    registry: ModelRegistry, request: inference_pb2.MultiInferenceRequest
) -> inference_pb2.MultiInferenceResponse:
    """Several classify/regress tasks over one input (multi_inference.cc); method names are always checked."""
    first_spec = request.tasks[0].model_spec if request.tasks else model_pb2.ModelSpec()
    servable = registry.resolve(first_spec)
    model_name = ""
    signature_names: list[str] = []
    for task in request.tasks:
        if not task.model_spec.name:
            raise _invalid("Found ModelSpec with an empty model name.")
        if not model_name:
            model_name = task.model_spec.name
        elif task.model_spec.name != model_name:
            raise _invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature_name in signature_names:
            raise _invalid(f"Duplicate evaluation of signature: {signature_name}")
        signature_names.append(signature_name)
        signature = servable.signature_defs.get(signature_name)
        if signature is None:
            raise _invalid(f"Requested signature not found in model graph: {signature_name}")
        if task.method_name == CLASSIFY_METHOD_NAME:
            _check_classification_signature(signature, check_method_name=False)
        elif task.method_name == REGRESS_METHOD_NAME:
            _check_regression_signature(signature, check_method_name=False)
        else:
            raise ServingError(
                grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}"
            )
    examples = serialized_examples(request.input)
    response = inference_pb2.MultiInferenceResponse()
    for task, signature_name in zip(request.tasks, signature_names, strict=True):
        outputs = _example_outputs(servable, signature_name, examples)
        result = response.results.add()
        if task.method_name == CLASSIFY_METHOD_NAME:
            _fill_classification(outputs, len(examples), result.classification_result)
        else:
            _fill_regression(outputs, len(examples), result.regression_result)
        _set_model_spec(
            result.model_spec, task.model_spec.name, servable.version, task.model_spec.signature_name
        )
    return response


# -- metadata and status ------------------------------------------------------


def model_metadata(
    registry: ModelRegistry, request: get_model_metadata_pb2.GetModelMetadataRequest
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if not request.HasField("model_spec"):
        raise _invalid("Missing ModelSpec")
    if not request.metadata_field:
        raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != SIGNATURE_DEF_FIELD:
            raise _invalid(f"Metadata field {field} is not supported")
    servable = registry.resolve(request.model_spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in servable.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def model_status(
    registry: ModelRegistry, request: get_model_status_pb2.GetModelStatusRequest
) -> get_model_status_pb2.GetModelStatusResponse:
    if not request.HasField("model_spec"):
        raise _invalid("Missing ModelSpec")
    name = request.model_spec.name
    versions = registry.versions(name)
    if request.model_spec.HasField("version"):
        version = request.model_spec.version.value
        if version not in versions:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
        chosen = [version]
    else:
        if not versions:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        chosen = sorted(versions, reverse=True)  # upstream's VersionMap is ordered newest first
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in chosen:
        status = response.model_version_status.add()
        status.version = version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        status.status.SetInParent()  # error_code OK, no message, as ToStatusProto writes it
    return response


# -- gRPC services ------------------------------------------------------------


class CallCounts:
    """Calls received per method (the Counts test hook); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(testhooks.COUNTED_METHODS, 0)

    def add(self, method: str) -> None:
        with self._lock:
            self._counts[method] = self._counts.get(method, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


Response = TypeVar("Response")


class _Hooks:
    """Test hooks and the error mapping every method shares, in one place."""

    def __init__(self, counts: CallCounts) -> None:
        self.counts = counts

    def handle(self, method: str, context: grpc.ServicerContext, work: Callable[[], Response]) -> Response:
        self.counts.add(method)
        metadata = context.invocation_metadata() or ()
        self._echo(metadata, context)
        self._sleep(metadata, context)
        if context.time_remaining() <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        try:
            return work()
        except ServingError as exc:
            message = exc.message
            if len(message) > MAX_STATUS_MESSAGE_CHARS:
                message = message[:MAX_STATUS_MESSAGE_CHARS] + "...TRUNCATED"
            context.abort(exc.code, message)
        except Exception as exc:
            logger.exception("%s failed unexpectedly", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    @staticmethod
    def _echo(metadata: Iterable[Any], context: grpc.ServicerContext) -> None:
        trailers = []
        for key, value in metadata:
            if key.startswith(testhooks.ECHO_REQUEST_PREFIX):
                trailers.append(
                    (testhooks.ECHO_TRAILER_PREFIX + key[len(testhooks.ECHO_REQUEST_PREFIX) :], value)
                )
            if key == testhooks.DEADLINE_ECHO_KEY:
                remaining_s = context.time_remaining()
                if remaining_s is not None and remaining_s < _NO_DEADLINE_S:
                    trailers.append((testhooks.DEADLINE_TRAILER_KEY, f"{remaining_s * 1000:.1f}"))
        if trailers:
            context.set_trailing_metadata(tuple(trailers))

    @staticmethod
    def _sleep(metadata: Iterable[Any], context: grpc.ServicerContext) -> None:
        raw = next((value for key, value in metadata if key == testhooks.SLEEP_KEY), None)
        if raw is None:
            return
        try:
            sleep_ms = int(raw)
            if sleep_ms < 0:
                raise ValueError
        except ValueError:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{testhooks.SLEEP_KEY} must be a whole number of milliseconds >= 0, got {raw!r}",
            )
        wake_at = time.monotonic() + sleep_ms / 1000
        while context.is_active() and context.time_remaining() > 0:
            left_s = wake_at - time.monotonic()
            if left_s <= 0:
                return
            time.sleep(min(SLEEP_POLL_S, left_s))


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(
        self, registry: ModelRegistry, hooks: _Hooks, as_tensor_content: bool, check_method_name: bool
    ):
        self._registry = registry
        self._hooks = hooks
        self._as_tensor_content = as_tensor_content
        self._check_method_name = check_method_name

    def Predict(self, request, context):  # noqa: N802 (gRPC's method names)
        return self._hooks.handle(
            "Predict",
            context,
            lambda: predict(self._registry, request, self._as_tensor_content, self._check_method_name),
        )

    def Classify(self, request, context):  # noqa: N802
        return self._hooks.handle(
            "Classify", context, lambda: classify(self._registry, request, self._check_method_name)
        )

    def Regress(self, request, context):  # noqa: N802
        return self._hooks.handle(
            "Regress", context, lambda: regress(self._registry, request, self._check_method_name)
        )

    def MultiInference(self, request, context):  # noqa: N802
        return self._hooks.handle("MultiInference", context, lambda: multi_inference(self._registry, request))

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._hooks.handle(
            "GetModelMetadata", context, lambda: model_metadata(self._registry, request)
        )


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry, hooks: _Hooks):
        self._registry = registry
        self._hooks = hooks

    def GetModelStatus(self, request, context):  # noqa: N802
        return self._hooks.handle("GetModelStatus", context, lambda: model_status(self._registry, request))

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        def refuse() -> model_management_pb2.ReloadConfigResponse:
            raise ServingError(
                grpc.StatusCode.UNIMPLEMENTED,
                "HandleReloadConfigRequest is not supported by the tfshield reference model server: "
                "its models are fixed at start; restart it with another --model-base-path",
            )

        return self._hooks.handle("HandleReloadConfigRequest", context, refuse)


def _debug_handler(counts: CallCounts) -> grpc.GenericRpcHandler:
    def counts_method(request: bytes, context: grpc.ServicerContext) -> bytes:
        return json.dumps(counts.snapshot(), sort_keys=True).encode()

    return grpc.method_handlers_generic_handler(
        testhooks.DEBUG_SERVICE,
        {testhooks.COUNTS_METHOD_NAME: grpc.unary_unary_rpc_method_handler(counts_method)},
    )


@dataclass(frozen=True)
class ServerOptions:
    """How the model server answers; mirrors tensorflow_model_server's flags of the same names."""

    enable_serialization_as_tensor_content: bool = False
    enable_signature_method_name_check: bool = False
    enable_grpc_healthcheck_service: bool = False
    workers: int = 16
    # Also listen on this unix socket (tensorflow_model_server's --grpc_socket_path), as a
    # sidecar deployment reaches TF Serving; None: TCP only.
    grpc_socket_path: str | None = None


def create_server(
    registry: ModelRegistry, host: str = "127.0.0.1", port: int = 0, options: ServerOptions | None = None
) -> tuple[grpc.Server, int, CallCounts]:
    """A started gRPC server for ``registry``; returns (server, bound port, call counts)."""
    options = options or ServerOptions()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="model-server"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    counts = CallCounts()
    hooks = _Hooks(counts)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(
            registry,
            hooks,
            options.enable_serialization_as_tensor_content,
            options.enable_signature_method_name_check,
        ),
        server,
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry, hooks), server)
    server.add_generic_rpc_handlers((_debug_handler(counts),))
    if options.enable_grpc_healthcheck_service:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        health_servicer = health.HealthServicer()
        for service in ("ModelService", "PredictionService"):
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound_port = server.add_insecure_port(address)
    if bound_port == 0:
        raise TfshieldError(f"cannot bind {address}; is the port in use?")
    if options.grpc_socket_path:
        socket_path = Path(options.grpc_socket_path)
        if not socket_path.parent.is_dir():
            raise TfshieldError(f"--grpc-socket-path {socket_path}: no directory {socket_path.parent}")
        if socket_path.exists() and not socket_path.is_socket():
            raise TfshieldError(f"--grpc-socket-path {socket_path} is not a socket; not replacing it")
        # A socket left by a crashed run is replaced: gRPC unlinks it before binding.
        try:
            server.add_insecure_port(f"unix:{socket_path}")
        except RuntimeError as exc:
            raise TfshieldError(f"cannot listen on unix socket {socket_path}: {exc}") from None
    server.start()
    return server, bound_port, counts


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tfshield model-server",
        description="Serve SavedModels under DIR/<name>/<version>/ over TF Serving's gRPC API.",
    )
    parser.add_argument("--model-base-path", required=True, help="directory of models: DIR/<name>/<version>/")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one (default 0)")
    parser.add_argument("--ready-file", help="write {'pid', 'grpc_port'} here once serving")
    parser.add_argument(
        "--enable-serialization-as-tensor-content",
        action="store_true",
        help="encode Predict outputs in tensor_content instead of typed fields",
    )
    parser.add_argument(
        "--enable-signature-method-name-check",
        action="store_true",
        help="refuse signatures whose method_name does not fit the API called, as upstream's flag",
    )
    parser.add_argument(
        "--enable-grpc-healthcheck-service", action="store_true", help="serve grpc.health.v1.Health"
    )
    parser.add_argument(
        "--grpc-socket-path",
        help="also listen on this unix socket, as tensorflow_model_server's --grpc_socket_path",
    )
    parser.add_argument("--workers", type=int, default=16, help="threads answering calls (default 16)")
    parser.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds in-flight calls may take to finish (default 10)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    # Install handlers before the slow model loading, so a SIGTERM during startup stops cleanly too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        registry = ModelRegistry.load(args.model_base_path)
    except TfshieldError as exc:
        logger.error("%s", exc)
        return 1
    if stop.is_set():
        return 0
    options = ServerOptions(
        enable_serialization_as_tensor_content=args.enable_serialization_as_tensor_content,
        enable_signature_method_name_check=args.enable_signature_method_name_check,
        enable_grpc_healthcheck_service=args.enable_grpc_healthcheck_service,
        workers=args.workers,
        grpc_socket_path=args.grpc_socket_path,
    )
    try:
        server, port, _ = create_server(registry, args.host, args.port, options)
    except TfshieldError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("serving %s on %s:%d", ", ".join(registry.names()), args.host, port)
    if args.grpc_socket_path:
        logger.info("and on unix socket %s", args.grpc_socket_path)
    if args.ready_file:
        socket = {"grpc_socket_path": args.grpc_socket_path} if args.grpc_socket_path else {}
        write_ready_file(args.ready_file, grpc_port=port, **socket)
    while not stop.wait(0.5):
        pass
    logger.info("stopping: letting in-flight calls finish (up to %.1f s)", args.shutdown_grace_s)
    server.stop(args.shutdown_grace_s).wait()
    return 0

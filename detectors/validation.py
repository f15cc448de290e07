"""Input validation: dtype, per-sample shape, NaN/Inf and value range of one input.

Not from a paper: this is schema validation, the first and cheapest filter
(the "input sanitisation" every serving stack should do). What it assumes:

- axis 0 of the input is the batch axis; everything after it is one sample;
- the model's signature (``GetModelMetadata``) gives the dtype and shape
  (build validators with :func:`validators_from_signature`); ``fit`` learns
  whatever the signature left open from benign reference data: the dtype and
  the per-sample shape when not given, and the value range;
- benign values lie within the range seen in the reference data, widened by
  ``range_margin`` (a fraction of the reference span) and then by the
  calibrated threshold.

Scores (one per sample, higher = more anomalous; unit: fractions of the
reference value span ``span_ = max(high_) - min(low_)``):

- ``0`` inside ``[low_ - m, high_ + m]`` with ``m = range_margin * span_``;
- ``max over features of (distance outside that interval) / span_`` outside;
- ``+inf`` for a sample holding NaN or ±Inf, and for every sample of a batch
  of the wrong dtype or per-sample shape (nothing in it can be trusted).

``per_feature=False`` (the default) learns one ``[low, high]`` for the whole
input: 2 floats, whatever the input's size, and the check is the crisp
"values in [0, 1]" of an image model. ``per_feature=True`` learns one interval
per feature (16 bytes per feature, so a 224×224×3 image costs 2.4 MB) and also
catches values that are legal for the input but never occur at that position
(a lit pixel in the always-dark border of an MNIST digit); it needs a fixed
per-sample shape.

On the request path use :meth:`InputValidator.check`, which raises
:class:`~gateway.errors.InvalidInput` naming the input, with a fixed ``reason``
word for metrics: ``dtype``, ``shape``, ``nonfinite``, ``range``. The dtype,
shape and finiteness checks need no calibration (a validator built from the
signature enforces them at once); the range check runs once the validator is
calibrated (``checks_range``).

Cost: per-input range on one 28×28×1 float32 sample, a few µs (a min, a max,
a few comparisons); see ``tests/detectors/test_validation.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from detectors.base import Detector, DetectorError, Predictor, register
from gateway.codec import spec_for_datatype
from gateway.errors import InvalidInput

__all__ = ["InputValidator", "validators_from_signature"]

# Dtype kinds with an ordered value range (bool, strings and complex have none).
_RANGE_KINDS = "iuf"
# Dtype kinds that can hold NaN or Inf.
_FLOAT_KINDS = "fc"


def _shape_tuple(shape: Iterable[int] | None) -> tuple[int, ...] | None:
    return None if shape is None else tuple(int(d) for d in shape)


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _shape_matches(actual: tuple[int, ...], expected: Sequence[int]) -> bool:
    return len(actual) == len(expected) and all(e in (-1, a) for a, e in zip(actual, expected, strict=True))


@register
class InputValidator(Detector):
    """Validates one input: dtype, per-sample shape, finiteness, value range.

    Hyperparameters:

    ``dtype`` (str or None, default None)
        numpy dtype name the input must have (``"float32"``); None: learned
        from the reference data in ``fit``.
    ``shape`` (list of int or None, default None)
        per-sample shape (without the batch axis), -1 for a dimension of any
        size; None: the reference data's per-sample shape.
    ``range_margin`` (float ≥ 0, default 0.0)
        widen the learned range by this fraction of the reference span on
        each side before scoring.
    ``per_feature`` (bool, default False)
        learn one range per feature instead of one for the whole input.

    Learned (set by ``fit``): ``dtype_`` (str), ``shape_`` (int array, -1 =
    any), ``low_`` and ``high_`` (float64; shape ``(1,)`` or one per feature;
    empty for dtypes without a range), ``span_`` (float, > 0).
    """

    name = "validation"
    params = ("dtype", "shape", "range_margin", "per_feature")

    dtype_: str
    shape_: np.ndarray
    low_: np.ndarray
    high_: np.ndarray
    span_: float

    def __init__(
        self,
        dtype: str | None = None,
        shape: Sequence[int] | None = None,
        range_margin: float = 0.0,
        per_feature: bool = False,
    ) -> None:
        if dtype is not None:
            try:
                np.dtype(dtype)
            except TypeError:
                raise DetectorError(f"validation: dtype {dtype!r} is not a numpy dtype name") from None
        if shape is not None and any(int(d) < -1 for d in shape):
            raise DetectorError(f"validation: shape {list(shape)} has a dimension below -1")
        if not range_margin >= 0.0:
            raise DetectorError(f"validation: range_margin must be >= 0, got {range_margin}")
        self.dtype = dtype
        # A tuple, so that a saved and reloaded validator has equal params.
        self.shape = _shape_tuple(shape)
        self.range_margin = float(range_margin)
        self.per_feature = bool(per_feature)

    @classmethod
    def from_tensor_info(cls, input_name: str, tensor_info: Any, **params: Any) -> InputValidator:
        """A validator for one input of a signature (a ``protos.meta_graph_pb2.TensorInfo``).

        The dtype comes from the DataType through the codec's table (so
        DT_BFLOAT16, which decodes to float32, expects float32), the
        per-sample shape from ``tensor_shape`` without its first (batch)
        dimension; an unknown rank leaves the shape open. ``params`` are the
        other hyperparameters.
        """
        spec = spec_for_datatype(int(tensor_info.dtype))
        if spec is None:
            raise DetectorError(
                f"validation: input '{input_name}' has DataType {int(tensor_info.dtype)}, "
                "which the gateway cannot decode"
            )
        shape: tuple[int, ...] | None = None
        # As in TensorFlow, an absent tensor_shape is the empty one: a scalar.
        if not tensor_info.tensor_shape.unknown_rank:
            dims = [int(dim.size) for dim in tensor_info.tensor_shape.dim]
            if not dims:
                raise DetectorError(
                    f"validation: input '{input_name}' is a scalar (rank 0) in the signature, so it has "
                    "no batch axis to validate per sample; leave it out with inputs=[...]"
                )
            shape = tuple(dims[1:])
        return cls(dtype=spec.numpy_dtype.name, shape=shape, **params)

    # -- estimator ---------------------------------------------------------------

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        if x_ref.dtype == object or self.dtype == "object":
            dtype = np.dtype(object)
        else:
            dtype = x_ref.dtype
        if self.dtype is not None and np.dtype(self.dtype) != dtype:
            raise DetectorError(
                f"validation: reference data has dtype {dtype}, but dtype={self.dtype!r}; "
                f"cast the reference data to {self.dtype}"
            )
        sample_shape = tuple(x_ref.shape[1:])
        if self.shape is not None and not _shape_matches(sample_shape, self.shape):
            raise DetectorError(
                f"validation: reference samples have shape {_shape_text(sample_shape)}, but "
                f"shape={_shape_text(self.shape)}"
            )
        shape = self.shape if self.shape is not None else sample_shape
        if self.per_feature and -1 in shape:
            raise DetectorError(
                f"validation: per_feature=True needs a fixed per-sample shape, got {_shape_text(shape)}"
            )
        low = high = np.empty(0, dtype=np.float64)
        span = 1.0
        if dtype.kind in _RANGE_KINDS:
            flat = x_ref.reshape(len(x_ref), -1)
            if dtype.kind == "f" and not np.all(np.isfinite(flat)):
                raise DetectorError("validation: reference data holds NaN or Inf; clean it first")
            axis = 0 if self.per_feature else None
            low = np.atleast_1d(flat.min(axis=axis)).astype(np.float64)
            high = np.atleast_1d(flat.max(axis=axis)).astype(np.float64)
            # Distances are measured in spans; a constant input still needs a unit.
            span = float(high.max() - low.min()) or 1.0
        self.dtype_ = dtype.name
        self.shape_ = np.asarray(shape, dtype=np.int64)
        self.low_ = low
        self.high_ = high
        self.span_ = span

    def _scalars(self) -> dict[str, float | int | str]:
        return {"dtype_": self.dtype_, "span_": self.span_}

    def _state(self) -> dict[str, np.ndarray]:
        return {"shape_": self.shape_, "low_": self.low_, "high_": self.high_}

    def _score(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        n = len(x) if x.ndim else 0
        if (
            x.ndim == 0
            or x.dtype.name != self.dtype_
            or not _shape_matches(x.shape[1:], self.shape_.tolist())
        ):
            return np.full(n, np.inf)
        if x.dtype.kind in _RANGE_KINDS:
            return self._range_excess(x)
        if x.dtype.kind in _FLOAT_KINDS:  # complex: no range, only finiteness
            finite = np.isfinite(x.reshape(n, math.prod(x.shape[1:]))).all(axis=1)
            return np.where(finite, 0.0, np.inf)
        return np.zeros(n)

    def _range_excess(self, x: np.ndarray) -> np.ndarray:
        """Distance outside the widened reference range in spans; +inf for NaN/Inf."""
        n = len(x)
        features = math.prod(x.shape[1:])
        if features == 0:
            return np.zeros(n)
        flat = x.reshape(n, features)
        margin = self.range_margin * self.span_
        if self.per_feature:
            below = (self.low_ - margin) - flat
            above = flat - (self.high_ + margin)
            excess = np.maximum(np.maximum(below, above).max(axis=1), 0.0)
        else:
            lowest = flat.min(axis=1).astype(np.float64)
            highest = flat.max(axis=1).astype(np.float64)
            excess = np.maximum(
                np.maximum(self.low_[0] - margin - lowest, highest - self.high_[0] - margin), 0.0
            )
        excess = excess / self.span_
        # NaN propagates through min/max; a NaN sample is maximally anomalous.
        excess[np.isnan(excess)] = np.inf
        return excess

    # -- the request path ----------------------------------------------------------

    @property
    def checks_range(self) -> bool:
        """True when :meth:`check` also checks the value range (after calibration)."""
        return self.calibrated and self.low_.size > 0

    def check(self, input_name: str, array: np.ndarray) -> None:
        """Raise :class:`InvalidInput` naming ``input_name`` if ``array`` (a batch) is not valid.

        In order: dtype (reason ``dtype``), per-sample shape (``shape``),
        NaN/Inf (``nonfinite``), value range beyond the calibrated threshold
        (``range``, only once calibrated). Messages name the rule broken and
        the first offending sample, never a score.
        """
        expected_dtype = self.dtype_ if self.fitted else self.dtype
        if expected_dtype is not None and array.dtype.name != expected_dtype:
            raise InvalidInput(
                input_name, f"dtype is {array.dtype.name}, expected {expected_dtype}", reason="dtype"
            )
        expected_shape = self.shape_.tolist() if self.fitted else self.shape
        if array.ndim == 0:
            wanted = "" if expected_shape is None else f" of shape {_shape_text([-1, *expected_shape])}"
            raise InvalidInput(input_name, f"is a scalar; expected a batch{wanted}", reason="shape")
        if expected_shape is not None and not _shape_matches(array.shape[1:], expected_shape):
            any_size = " (-1 = any size)" if -1 in expected_shape else ""
            raise InvalidInput(
                input_name,
                f"per-sample shape is {_shape_text(array.shape[1:])} "
                f"(batch shape {_shape_text(array.shape)}), expected {_shape_text(expected_shape)}{any_size}",
                reason="shape",
            )
        kind = array.dtype.kind
        if not array.size or kind not in _RANGE_KINDS + _FLOAT_KINDS:
            return
        checks_range = self.checks_range
        if kind in _RANGE_KINDS and not (checks_range and self.per_feature):
            # Fast path, two passes over the batch: a benign batch lies within
            # the reference range (so within the accepted one) and is finite.
            # NaN fails every comparison and takes the exact path below.
            lowest, highest = array.min(), array.max()
            if checks_range:
                margin = self.range_margin * self.span_
                if lowest >= self.low_[0] - margin and highest <= self.high_[0] + margin:
                    return
            elif kind != "f" or (np.isfinite(lowest) and np.isfinite(highest)):
                return
        if kind in _FLOAT_KINDS:
            finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            if not finite.all():
                first = int(np.argmin(finite))
                raise InvalidInput(
                    input_name, f"sample {first} holds NaN or Inf; send finite values", reason="nonfinite"
                )
        if checks_range and kind in _RANGE_KINDS:
            outside = self._range_excess(array) > self.threshold_
            if outside.any():
                raise InvalidInput(
                    input_name,
                    f"sample {int(np.argmax(outside))} has values outside {self._accepted_range_text()}",
                    reason="range",
                )

    def _accepted_range_text(self) -> str:
        if self.per_feature:
            return "the per-feature ranges learned from the reference data"
        widen = (self.range_margin + self.threshold_) * self.span_
        return f"the accepted range [{self.low_[0] - widen:.6g}, {self.high_[0] + widen:.6g}]"


def validators_from_signature(
    signature_def: Any, inputs: Iterable[str] | None = None, **params: Any
) -> dict[str, InputValidator]:
    """One unfitted :class:`InputValidator` per input of a ``protos.meta_graph_pb2.SignatureDef``.

    ``inputs`` selects input names (default: all of them, sorted); ``params``
    are the other hyperparameters, the same for every input. The validators
    check dtype, shape and finiteness as they are; ``fit`` and ``calibrate``
    them on reference data to add the range check.
    """
    names = sorted(signature_def.inputs) if inputs is None else list(inputs)
    missing = [name for name in names if name not in signature_def.inputs]
    if missing:
        known = ", ".join(sorted(signature_def.inputs))
        raise DetectorError(f"validation: the signature has no input {missing}; its inputs: {known}")
    return {
        name: InputValidator.from_tensor_info(name, signature_def.inputs[name], **params) for name in names
    }

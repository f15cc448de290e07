"""Output defences: perturbations of probability/logit outputs, and deception.

Every function works on a batch: an array whose last axis holds one sample's
class scores (``(n, classes)``; any leading shape), in any floating dtype, and
returns a new array of the same shape and dtype. Probabilities are computed in
float64 and cast back once.

Perturbations (the policy's ``perturb`` action; levels chain them) keep each
sample's top-1 class exactly, as ``argmax`` reports it on the input (the first
maximum on ties), and keep rows that summed to one summing to one (within the
dtype's rounding). A final guard in the output dtype enforces the first
property where a cast or a strong setting would break it: it swaps the
original top class's value back to the top, and lowers a tied earlier class by
one ulp. Rows holding NaN or infinity are returned unchanged.

- :func:`top_k` keeps the k largest scores and zeroes the rest (Tramèr et al.,
  "Stealing Machine Learning Models via Prediction APIs", USENIX Security 2016,
  discuss truncation and rounding as countermeasures).
- :func:`rounding` to ``decimals``: the classes other than the top one are
  rounded down and the top one gets the remainder, which is what keeps the
  row's sum and its top-1 (nearest rounding can tie or overtake the top).
- :func:`label_only`: one-hot of the top-1 class (the strongest level: only
  the label leaves).
- :func:`reverse_sigmoid` (Lee, Edwards, Molloy, Srivastava, "Defending
  Against NN Model Stealing Attacks Using Deceptive Perturbations", IEEE S&P
  Workshops 2019): ``ŷ = α (y − β (s(γ s⁻¹(y)) − ½))`` with ``s`` the sigmoid and
  ``α`` renormalising; β in (0, 1] is the strength, γ > 0 the slope. It makes
  the scores' gradients misleading for a copycat trained on them.
- :func:`noise`: multiplicative log-normal noise, ``p · exp(σ z)``,
  renormalised. ``z`` is keyed by the input (:func:`row_keys`), so asking the
  same question again returns the same answer and averaging repeats learns
  nothing.

Deception (the policy's ``deceive`` action; only for flagged clients) is
different on purpose: it changes the top-1 class. :func:`deceive` either
applies a keyed derangement of the classes (``permutation``: the same for every
input, so the answers look like a real model's and a copycat trained on them
learns the wrong function, π∘f) or moves the top probability to a keyed wrong
class per input (``misinformation``, after Adaptive Misinformation, Kariyappa
and Qureshi, CVPR 2020, with a keyed choice standing in for their
misinformation network). Both are consistent per input and differ per key.

Logit outputs (:func:`apply`, ``kind="logits"``): perturbed in probability
space (softmax), written back as ``log p + logsumexp(logits)`` so that the
softmax of the result is the perturbed distribution and an unchanged
distribution gives back the original logits; zeros become log(1e-30)
(≈ −69 below the row's logsumexp) rather than −inf. Deception permutes or swaps
the logits directly. Label outputs (integer class ids) are rewritten by
deception only.

:func:`perturb_response` applies any of these to the named outputs of a
serialized ``PredictResponse`` and re-encodes only what it changed, in the
form (``tensor_content`` or typed field) and dtype it found.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.codec import (
    _bfloat16_to_float32,
    _float32_to_bfloat16_bits,
    numpy_to_tensor,
    tensor_to_numpy,
    tensor_uses_content,
)
from gateway.errors import InvalidInput, TfshieldError
from protos import predict_pb2, types_pb2

PERTURBATIONS = ("top_k", "rounding", "label_only", "reverse_sigmoid", "noise")
# Floating wire types a perturbation can write back.
FLOAT_DATATYPES = frozenset(
    {types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16}
)
INTEGER_DATATYPES = frozenset(
    {
        types_pb2.DT_INT8,
        types_pb2.DT_INT16,
        types_pb2.DT_INT32,
        types_pb2.DT_INT64,
        types_pb2.DT_UINT8,
        types_pb2.DT_UINT16,
        types_pb2.DT_UINT32,
        types_pb2.DT_UINT64,
    }
)
# Responses are the upstream's: no request element limit.
_RESPONSE_MAX_ELEMENTS = 2**40
_LOG_FLOOR = 1e-30
_EPS = 1e-12


class PerturbError(TfshieldError):
    """A response could not be perturbed; the caller applies the perturb failure mode."""


# -- helpers ----------------------------------------------------------------------------


def _rows(values: np.ndarray) -> np.ndarray:
    """(…, k) -> (n, k) float64 copy."""
    if values.ndim == 0:
        raise PerturbError("a scalar output has no classes to perturb")
    return np.array(values, dtype=np.float64).reshape(-1, values.shape[-1])


def normalized_rows(p: np.ndarray) -> np.ndarray:
    """(n,) bool: rows that are probability vectors (in [0, 1], summing to one within rounding)."""
    k = p.shape[-1]
    eps = float(np.finfo(p.dtype).eps) if np.issubdtype(p.dtype, np.floating) else 1e-7
    tolerance = max(1e-5, 4 * k * eps)
    with np.errstate(invalid="ignore"):
        return (
            (np.abs(p.sum(axis=-1) - 1.0) <= tolerance)
            & (p >= 0).all(axis=-1)
            & (p <= 1 + tolerance).all(axis=-1)
        )


def _normalized(p: np.ndarray, given: np.ndarray | None) -> np.ndarray:
    # Judged on the original dtype: its rounding sets the tolerance.
    return normalized_rows(p.reshape(-1, p.shape[-1])) if given is None else given


def looks_like_probabilities(values: np.ndarray) -> bool:
    """Whether an output is a batch of probability rows (auto-detection of score outputs)."""
    if values.ndim == 0 or values.shape[-1] < 2 or values.size == 0:
        return False
    if not np.issubdtype(values.dtype, np.floating):
        return False
    return bool(normalized_rows(values.reshape(-1, values.shape[-1])).all())


def _finish(out: np.ndarray, original: np.ndarray, normalized: np.ndarray) -> np.ndarray:
    """Renormalise rows that summed to one, cast to the original dtype, guard top-1, reshape."""
    sums = out.sum(axis=1, keepdims=True)
    norm_rows = normalized & (sums[:, 0] > 0)
    out[norm_rows] /= sums[norm_rows]
    flat_original = original.reshape(out.shape)
    result = out.astype(original.dtype)
    keep_top1(result, flat_original.argmax(axis=1))
    finite = np.isfinite(flat_original).all(axis=1)
    if not finite.all():
        result[~finite] = flat_original[~finite]
    return result.reshape(original.shape)


def keep_top1(out: np.ndarray, top: np.ndarray, below: Callable[[Any], Any] | None = None) -> None:
    """Make ``out.argmax(axis=1) == top`` in place, in ``out``'s own dtype.

    Swaps the top class's value with the current maximum's (the row keeps its
    values, so its sum); a tie with an earlier class is broken by lowering that
    class to the next value below (``below(peak)``; default one ulp of the
    dtype), never raising the top above 1.
    """
    rows = np.nonzero(out.argmax(axis=1) != top)[0]
    if rows.size == 0:
        return
    current = out[rows].argmax(axis=1)
    top_rows = top[rows]
    top_values = out[rows, top_rows].copy()
    out[rows, top_rows] = out[rows, current]
    out[rows, current] = top_values
    zero = np.zeros((), dtype=out.dtype)
    for row, t in zip(rows.tolist(), top_rows.tolist(), strict=True):
        peak = out[row, t]
        ties = np.nonzero(out[row, :t] >= peak)[0]
        if not ties.size:
            continue
        if peak > 0:
            out[row, ties] = np.nextafter(peak, zero) if below is None else below(peak)
        else:  # nothing below zero to go to: raise the top class off it instead
            out[row, t] = np.nextafter(zero, np.ones((), dtype=out.dtype)) if below is None else -below(-peak)


# -- perturbations ------------------------------------------------------------------------


def top_k(p: np.ndarray, k: int, normalized: np.ndarray | None = None) -> np.ndarray:
    """Keep the ``k`` highest scores of each row (the first maximum among them), zero the rest."""
    x = _rows(p)
    norm = _normalized(p, normalized)
    if k < x.shape[1]:
        # Stable sort on -x: among equal scores the lower index ranks first, as argmax does.
        order = np.argsort(-x, axis=1, kind="stable")
        np.put_along_axis(x, order[:, k:], 0.0, axis=1)
    return _finish(x, p, norm)


def rounding(p: np.ndarray, decimals: int, normalized: np.ndarray | None = None) -> np.ndarray:
    """Round scores to ``decimals``: non-top classes round down, the top class takes the remainder.

    Rows that did not sum to one: others round to nearest, the top class rounds up.
    """
    x = _rows(p)
    norm = _normalized(p, normalized)
    scale = 10.0**decimals
    top = x.argmax(axis=1)
    rows = np.arange(len(x))
    out = np.round(x * scale) / scale
    out[rows, top] = np.ceil(x[rows, top] * scale - 1e-9) / scale
    if norm.any():
        # 1e-9 absorbs binary representation error (0.29 * 100 = 28.999999999999996).
        down = np.floor(x[norm] * scale + 1e-9) / scale
        down[rows[: norm.sum()], top[norm]] = 0.0
        remainder = 1.0 - down.sum(axis=1)
        down[rows[: norm.sum()], top[norm]] = np.round(remainder * scale) / scale
        out[norm] = down
    return _finish(out, p, np.zeros(len(x), dtype=bool))


def label_only(p: np.ndarray, normalized: np.ndarray | None = None) -> np.ndarray:
    """One-hot of each row's top-1 class."""
    x = _rows(p)
    out = np.zeros_like(x)
    out[np.arange(len(x)), x.argmax(axis=1)] = 1.0
    return _finish(out, p, np.zeros(len(x), dtype=bool))


def reverse_sigmoid(
    p: np.ndarray, beta: float, gamma: float, normalized: np.ndarray | None = None
) -> np.ndarray:
    """Reverse sigmoid (Lee et al., 2019): ``α (y − β (s(γ s⁻¹(y)) − ½))``, renormalised.

    ``beta`` in (0, 1]: the perturbation's size (with β ≤ 1 no score goes
    negative); ``gamma`` > 0: the sigmoid's slope (larger = flatter posteriors
    around the middle). Rows that did not sum to one are clipped to [0, 1]
    instead of renormalised.
    """
    x = _rows(p)
    norm = _normalized(p, normalized)
    y = np.clip(x, _EPS, 1.0 - _EPS)
    inner = gamma * np.log(y / (1.0 - y))
    out = x - beta * (1.0 / (1.0 + np.exp(-inner)) - 0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return _finish(out, p, norm)


def noise(
    p: np.ndarray, sigma: float, keys: np.ndarray | None = None, normalized: np.ndarray | None = None
) -> np.ndarray:
    """Multiplicative log-normal noise ``p · exp(σ z)``, keyed per row by ``keys`` (uint64, one per row).

    Without keys the noise is fresh (os entropy) on every call.
    """
    x = _rows(p)
    norm = _normalized(p, normalized)
    if keys is None:
        keys = np.frombuffer(np.random.default_rng().bytes(8 * len(x)), dtype=np.uint64)
    z = _normal(_expand_keys(keys, len(x)), x.shape[1], stream=1)
    out = x * np.exp(sigma * z)
    out[~norm] = np.clip(out[~norm], 0.0, 1.0)
    return _finish(out, p, norm)


# -- deception ---------------------------------------------------------------------------------


def deceive(
    values: np.ndarray,
    key: bytes,
    mode: str = "permutation",
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """Misleading scores with a wrong top-1 class, consistent per input and per ``key``.

    ``values``: (…, classes) probabilities or logits (anything ordered by
    class). ``permutation`` moves class c's score to π(c), π a derangement
    drawn from ``key`` (so the top class always changes). ``misinformation``
    swaps each row's top score with a wrong class chosen from the row's key
    (``keys``, see :func:`row_keys`; required). Same dtype and shape out.
    """
    if values.ndim == 0 or values.shape[-1] < 2:
        raise PerturbError("deception needs at least two classes")
    classes = values.shape[-1]
    flat = np.array(values).reshape(-1, classes)
    if mode == "permutation":
        out = np.empty_like(flat)
        out[:, class_permutation(key, classes)] = flat
    elif mode == "misinformation":
        if keys is None:
            raise PerturbError("misinformation deception needs per-row keys")
        top = flat.argmax(axis=1)
        wrong = _wrong_classes(_expand_keys(keys, len(flat)), top, classes)
        out = flat.copy()
        rows = np.arange(len(flat))
        out[rows, top], out[rows, wrong] = flat[rows, wrong], flat[rows, top]
    else:
        raise PerturbError(f"unknown deception mode '{mode}'; known: permutation, misinformation")
    return out.reshape(values.shape)


def deceive_labels(
    labels: np.ndarray, classes: int, key: bytes, mode: str = "permutation", keys: np.ndarray | None = None
) -> np.ndarray:
    """The class ids :func:`deceive` would make top-1, for an integer labels output."""
    flat = np.array(labels).reshape(-1)
    valid = (flat >= 0) & (flat < classes)
    safe = np.where(valid, flat, 0).astype(np.int64)
    if mode == "permutation":
        mapped = class_permutation(key, classes)[safe]
    elif mode == "misinformation":
        if keys is None:
            raise PerturbError("misinformation deception needs per-row keys")
        mapped = _wrong_classes(_expand_keys(keys, len(flat)), safe, classes)
    else:
        raise PerturbError(f"unknown deception mode '{mode}'; known: permutation, misinformation")
    return np.where(valid, mapped, flat).astype(labels.dtype).reshape(labels.shape)


_PERMUTATIONS: dict[tuple[bytes, int], np.ndarray] = {}


def class_permutation(key: bytes, classes: int) -> np.ndarray:
    """A keyed derangement of ``range(classes)`` (Sattolo's algorithm: one cycle, no fixed point).

    ``perm[c]`` is where class c's score goes. Built from BLAKE2b, so every
    replica with the same key and any numpy version agrees.
    """
    cache_key = (hashlib.sha256(key).digest(), classes)
    perm = _PERMUTATIONS.get(cache_key)
    if perm is not None:
        return perm
    items = list(range(classes))
    for i in range(classes - 1, 0, -1):
        digest = hashlib.blake2b(
            i.to_bytes(8, "little") + classes.to_bytes(8, "little"), key=_mac_key(key), person=b"tfs-perm"
        ).digest()
        j = int.from_bytes(digest[:8], "little") % i
        items[i], items[j] = items[j], items[i]
    perm = np.asarray(items, dtype=np.int64)
    perm.setflags(write=False)
    if len(_PERMUTATIONS) > 256:
        _PERMUTATIONS.clear()
    _PERMUTATIONS[cache_key] = perm
    return perm


def _wrong_classes(keys: np.ndarray, top: np.ndarray, classes: int) -> np.ndarray:
    offset = (_mix64(keys ^ np.uint64(0x5EED_0003)) % np.uint64(classes - 1)).astype(np.int64)
    return (top + 1 + offset) % classes


# -- keys -----------------------------------------------------------------------------------------


def _mac_key(key: bytes) -> bytes:
    # BLAKE2b takes keys up to 64 bytes.
    return key if len(key) <= 64 else hashlib.sha512(key).digest()


def row_keys(secret: bytes, inputs: Mapping[str, np.ndarray], rows: int, fallback: bytes = b"") -> np.ndarray:
    """One keyed 64-bit hash per sample of the request: (rows,) uint64.

    Sample i is every input's i-th row (inputs in name order, each with its
    name, dtype and row shape), hashed with keyed BLAKE2b: the same input gives
    the same key, and nobody without ``secret`` can predict it. When the inputs
    do not have ``rows`` rows each (non-batched outputs), the key of row i is the
    keyed hash of ``fallback`` (the request's bytes) and i.
    """
    base = hashlib.blake2b(key=_mac_key(secret), digest_size=8, person=b"tfs-row")
    arrays = [
        (f"{name}\0{a.dtype.str}\0{a.shape[1:]}\0".encode(), a)
        for name in sorted(inputs)
        for a in [np.ascontiguousarray(inputs[name])]
    ]
    batched = bool(arrays) and all(a.ndim >= 1 and len(a) == rows for _, a in arrays)
    if not batched:
        base.update(fallback)
    out = np.empty(rows, dtype=np.uint64)
    for i in range(rows):
        h = base.copy()  # cheaper than keying a new hash per row
        if batched:
            for header, array in arrays:
                h.update(header)
                row = array[i : i + 1]  # an array even when rows are scalars or strings
                h.update(row.data if row.dtype != object else repr(row.tolist()).encode())
        else:
            h.update(i.to_bytes(8, "little"))
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def _expand_keys(keys: np.ndarray, rows: int) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    if len(keys) == rows:
        return keys
    if len(keys) == 0:
        raise PerturbError("no row keys")
    # An output with more rows than keys (e.g. (n, t, k) flattened): cycle, mixed with the row index.
    index = np.arange(rows, dtype=np.uint64)
    return _mix64(keys[np.arange(rows) % len(keys)] ^ index)


_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xBF58476D1CE4E5B9)
_C3 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64) + _C1
    x = (x ^ (x >> np.uint64(30))) * _C2
    x = (x ^ (x >> np.uint64(27))) * _C3
    return x ^ (x >> np.uint64(31))


def _uniform(keys: np.ndarray, k: int, stream: int) -> np.ndarray:
    """(n, k) uniforms in (0, 1), a deterministic function of (key, stream, column)."""
    counters = (np.uint64(stream) << np.uint64(32)) + np.arange(k, dtype=np.uint64)
    bits = _mix64(_mix64(keys[:, None]) ^ counters[None, :])
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _normal(keys: np.ndarray, k: int, stream: int) -> np.ndarray:
    """(n, k) standard normals (Box–Muller on two keyed uniform streams)."""
    u1 = _uniform(keys, k, 2 * stream)
    u2 = _uniform(keys, k, 2 * stream + 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# -- chains, kinds and responses -------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = _rows(logits)
    shift = x.max(axis=1, keepdims=True)
    e = np.exp(x - shift)
    total = e.sum(axis=1, keepdims=True)
    return e / total, shift + np.log(total)


@dataclass(frozen=True)
class Chain:
    """A level's perturbations, applied in order: ``steps`` are (kind, params) pairs."""

    steps: tuple[tuple[str, Mapping[str, Any]], ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _ in self.steps)

    @property
    def needs_keys(self) -> bool:
        return "noise" in self.kinds

    def __call__(self, p: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """Apply every step to probability rows ``p`` (same shape and dtype out)."""
        flat = p.reshape(-1, p.shape[-1])
        # Which rows summed to one is decided once, on the original scores.
        norm = normalized_rows(flat)
        original_top = flat.argmax(axis=1)
        out = flat
        for kind, params in self.steps:
            if kind == "top_k":
                out = top_k(out, params["k"], norm)
            elif kind == "rounding":
                out = rounding(out, params["decimals"], norm)
            elif kind == "label_only":
                out = label_only(out, norm)
            elif kind == "reverse_sigmoid":
                out = reverse_sigmoid(out, params["beta"], params["gamma"], norm)
            elif kind == "noise":
                out = noise(out, params["sigma"], keys, norm)
            else:
                raise PerturbError(f"unknown perturbation '{kind}'; known: {', '.join(PERTURBATIONS)}")
        out = np.array(out)
        keep_top1(out, original_top)  # each step keeps it; this is the contract, checked once more
        return out.reshape(p.shape)


def apply(
    fn: Callable[[np.ndarray], np.ndarray], values: np.ndarray, kind: str = "probabilities"
) -> np.ndarray:
    """Apply a probability-space ``fn`` to an output of ``kind`` (probabilities or logits)."""
    if kind == "probabilities":
        return fn(values)
    if kind == "logits":
        probabilities, lse = _softmax(values)
        perturbed = _rows(fn(probabilities))
        out = (np.log(np.maximum(perturbed, _LOG_FLOOR)) + lse).astype(values.dtype)
        original = values.reshape(out.shape)
        keep_top1(out, original.argmax(axis=1))
        finite = np.isfinite(original).all(axis=1)
        if not finite.all():
            out[~finite] = original[~finite]
        return out.reshape(values.shape)
    raise PerturbError(f"cannot perturb an output of kind '{kind}'")


OutputFn = Callable[[str, np.ndarray, int], "np.ndarray | None"]


def perturb_response(response: bytes, outputs: Sequence[str] | None, fn: OutputFn) -> bytes:
    """Apply ``fn`` to outputs of a serialized PredictResponse; re-encode only what changed.

    ``outputs``: the names to offer to ``fn`` (absent ones are skipped: a client
    may have filtered them out), or None to offer every output. ``fn(name,
    values, datatype)`` returns the new values (same shape) or None to leave
    the output as it is. A changed output is written back in the form it came
    in (``tensor_content`` or the typed field) with its original dtype and
    shape; every other field, the model spec, the other outputs and unknown
    fields are kept. Returns ``response`` itself when nothing changed.
    Raises :class:`PerturbError` for an undecodable response or output.
    """
    try:
        message = predict_pb2.PredictResponse.FromString(response)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PerturbError(f"the response is not a PredictResponse: {exc}") from None
    names = list(message.outputs.keys()) if outputs is None else [n for n in outputs if n in message.outputs]
    changed = False
    for name in names:
        tensor = message.outputs[name]
        try:
            values = tensor_to_numpy(tensor, name, _RESPONSE_MAX_ELEMENTS)
        except InvalidInput as exc:
            raise PerturbError(f"output {exc}") from None
        new = fn(name, values, tensor.dtype)
        if new is None:
            continue
        if new.shape != values.shape:
            raise PerturbError(
                f"output '{name}': a perturbation changed its shape {values.shape} to {new.shape}"
            )
        _write_back(tensor, new)
        changed = True
    return message.SerializeToString() if changed else response


def _write_back(tensor: Any, values: np.ndarray) -> None:
    """Replace the values of ``tensor`` in place: its shape, dtype and unknown fields stay."""
    fresh = numpy_to_tensor(values, as_tensor_content=tensor_uses_content(tensor), dtype=tensor.dtype)
    fresh.ClearField("tensor_shape")
    fresh.ClearField("dtype")
    for fd, _ in tensor.ListFields():
        if fd.name not in ("dtype", "tensor_shape", "version_number"):
            tensor.ClearField(fd.name)
    tensor.MergeFromString(fresh.SerializeToString())


def _bfloat16_values(x: np.ndarray) -> np.ndarray:
    """float32 values as they will be on the wire in DT_BFLOAT16 (the codec's rounding)."""
    x = np.asarray(x, dtype=np.float32)
    return _bfloat16_to_float32(_float32_to_bfloat16_bits(x)).reshape(x.shape)


def _bfloat16_below(value: Any) -> np.float32:
    """The next bfloat16 value below ``value`` (>= 0); below zero: the negative of the smallest above."""
    bits = np.asarray(value, dtype=np.float32).reshape(1).view(np.uint32)
    if bits[0] & np.uint32(0x7FFF0000) == 0:
        return -np.uint32(0x10000).reshape(1).view(np.float32)[0]
    return (bits - np.uint32(0x10000)).view(np.float32)[0]


def _fit_wire(out: np.ndarray, original: np.ndarray, datatype: int, top1: bool) -> np.ndarray:
    """Round to what the wire type holds (bfloat16 is narrower than its float32 carrier); re-guard top-1."""
    if datatype != types_pb2.DT_BFLOAT16:
        return out
    wire = _bfloat16_values(out).reshape(-1, out.shape[-1])
    if top1:
        keep_top1(wire, original.reshape(wire.shape).argmax(axis=1), below=_bfloat16_below)
    return wire.reshape(out.shape)


def _output_kind(name: str, values: np.ndarray, datatype: int, kinds: Mapping[str, str] | None) -> str | None:
    """The kind of an output to act on, or None to leave it.

    Auto mode (no outputs configured for the model) treats every floating
    output with a class axis as scores: probability rows as probabilities,
    anything else as logits. Leaving logits untouched beside perturbed or
    deceiving probabilities would hand a thief the true answer (found in
    ``tfshield eval extraction``); a model with other floating outputs
    (embeddings, regressions) should list its outputs in the policy.
    """
    if kinds is None:
        if datatype not in FLOAT_DATATYPES or values.ndim == 0 or values.shape[-1] < 2 or values.size == 0:
            return None
        return "probabilities" if looks_like_probabilities(values) else "logits"
    kind = kinds[name]
    if kind == "labels":
        if datatype not in INTEGER_DATATYPES and datatype != types_pb2.DT_STRING:
            raise PerturbError(
                f"output '{name}' is configured as labels but holds {types_pb2.DataType.Name(datatype)}"
            )
    elif datatype not in FLOAT_DATATYPES:
        raise PerturbError(
            f"output '{name}' holds {types_pb2.DataType.Name(datatype)}; "
            "only floating outputs can be perturbed"
        )
    elif values.ndim == 0 or values.shape[-1] < 2:
        raise PerturbError(
            f"output '{name}' has shape {list(values.shape)}; scores need a class axis of 2 or more"
        )
    return kind


KeysFor = Callable[[int], np.ndarray]


def perturbing(chain: Chain, kinds: Mapping[str, str] | None, keys_for: KeysFor) -> OutputFn:
    """The :func:`perturb_response` function applying ``chain`` to score outputs.

    ``kinds``: output name -> probabilities | logits | labels, or None for
    auto-detection (probability rows only). Labels are left as they are (the
    top-1 class is kept anyway). ``keys_for(rows)`` gives the per-row keys.
    """

    def fn(name: str, values: np.ndarray, datatype: int) -> np.ndarray | None:
        kind = _output_kind(name, values, datatype, kinds)
        if kind is None or kind == "labels" or values.size == 0:
            return None
        keys = keys_for(values.size // values.shape[-1]) if chain.needs_keys else None
        out = apply(lambda p: chain(p, keys), values, kind)
        return _fit_wire(out, values, datatype, top1=True)

    return fn


def deceiving(
    key: bytes,
    mode: str,
    kinds: Mapping[str, str] | None,
    classes: Mapping[str, int],
    keys_for: KeysFor,
    label_names: Mapping[str, Sequence[str]] | None = None,
) -> OutputFn:
    """The :func:`perturb_response` function deceiving every score and label output.

    Label outputs: integer class ids (``classes[name]`` classes), or strings
    (``label_names[name]``: the class names in class order; a string that is
    not one of them is left as it is).
    """

    def fn(name: str, values: np.ndarray, datatype: int) -> np.ndarray | None:
        kind = _output_kind(name, values, datatype, kinds)
        if kind is None or values.size == 0:
            return None
        if kind == "labels":
            keys = keys_for(values.size) if mode != "permutation" else None
            if datatype != types_pb2.DT_STRING:
                return deceive_labels(values, classes[name], key, mode, keys)
            names = [n.encode() for n in (label_names or {}).get(name, ())]
            if len(names) < 2:
                raise PerturbError(f"string labels output '{name}' needs the class names (outputs: names)")
            index = {n: i for i, n in enumerate(names)}
            ids = np.array([index.get(bytes(v), -1) for v in values.reshape(-1)], dtype=np.int64)
            deceived = deceive_labels(ids, len(names), key, mode, keys)
            out = np.array(
                [names[i] if i >= 0 else v for i, v in zip(deceived, values.reshape(-1), strict=True)],
                dtype=object,
            )
            return out.reshape(values.shape)
        rows = values.size // values.shape[-1]
        return deceive(values, key, mode, keys_for(rows) if mode != "permutation" else None)

    return fn

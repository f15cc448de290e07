"""A compact, safe encoding of a monitor's per-client state: a few small numpy arrays.

Monitor state travels through the store (memory or Redis) as bytes, and bytes
read back from a shared Redis are untrusted: anyone with access to it, a bug
in another version, or a truncated write can put anything there. So the
format is a flat, fully validated layout, never pickle, never ``np.load``::

    magic      4 bytes   b"TFS1"
    header_len u16       bytes of the header that follows
    header:
      count    u8        number of arrays
      then per array:
        name_len u8, name (ASCII, 1..32 bytes)
        dtype    u8        code from DTYPES
        ndim     u8        0..4
        dims     ndim × u32
    then the arrays' data, in header order, little-endian, C order

Decoding checks every field (magic, known dtype, sizes adding up to exactly
the blob's length, a size cap) and raises :class:`StateError` with the reason;
a monitor treats that as a fresh client and counts it (``Monitor.corrupt_states_total``).
A monitor writes the same header for every client, so parsed headers are
cached (by their bytes): decoding a known layout is a dictionary lookup and
one copy per array, a few microseconds.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping

import numpy as np

from detectors.base import DetectorError

__all__ = ["MAGIC", "StateError", "decode_state", "encode_state"]

MAGIC = b"TFS1"
MAX_ARRAYS = 32
MAX_NAME_BYTES = 32
MAX_NDIM = 4
# The largest blob decode accepts unless told otherwise (monitors pass their max_state_bytes).
DEFAULT_MAX_BYTES = 1 << 20

# Codes are part of the format: append, never renumber.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f2"),
    2: np.dtype("<f4"),
    3: np.dtype("<f8"),
    4: np.dtype("u1"),
    5: np.dtype("<i4"),
    6: np.dtype("<u4"),
    7: np.dtype("<i8"),
    8: np.dtype("<u8"),
}
_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in DTYPES.items()}


class StateError(DetectorError):
    """A state blob is not a valid encoding; the message says why."""


def _code(dtype: np.dtype) -> int:
    code = _CODES.get((dtype.kind, dtype.itemsize))
    if code is None:
        raise StateError(
            f"cannot encode dtype {dtype}; supported: {', '.join(str(d) for d in DTYPES.values())}"
        )
    return code


@functools.lru_cache(maxsize=1024)
def _encode_header(layout: tuple[tuple[str, int, tuple[int, ...]], ...]) -> bytes:
    parts = [struct.pack("<B", len(layout))]
    for name, code, shape in layout:
        raw_name = name.encode("ascii")
        if not 0 < len(raw_name) <= MAX_NAME_BYTES:
            raise StateError(f"array name must be 1..{MAX_NAME_BYTES} ASCII bytes, got {name!r}")
        if len(shape) > MAX_NDIM:
            raise StateError(f"array '{name}' has {len(shape)} dimensions, at most {MAX_NDIM}")
        parts.append(
            struct.pack(
                f"<B{len(raw_name)}sBB{len(shape)}I", len(raw_name), raw_name, code, len(shape), *shape
            )
        )
    header = b"".join(parts)
    return MAGIC + struct.pack("<H", len(header)) + header


def encode_state(arrays: Mapping[str, np.ndarray | np.generic]) -> bytes:
    """Pack ``{name: array}`` (dtypes in ``DTYPES``, at most 4 dimensions) into bytes."""
    if len(arrays) > MAX_ARRAYS:
        raise StateError(f"at most {MAX_ARRAYS} arrays per state, got {len(arrays)}")
    layout = []
    data = []
    for name, value in arrays.items():
        array = np.asarray(value)
        code = _code(array.dtype)
        layout.append((name, code, array.shape))
        data.append(np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes())
    try:
        header = _encode_header(tuple(layout))
    except UnicodeEncodeError:
        raise StateError(f"array names must be ASCII, got {list(arrays)}") from None
    return header + b"".join(data)


@functools.lru_cache(maxsize=1024)
def _parse_header(header: bytes) -> tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]:
    """(name, dtype, shape, bytes) per array; raises StateError (never cached) when malformed."""
    if not header:
        raise StateError("state header is empty")
    count = header[0]
    if count > MAX_ARRAYS:
        raise StateError(f"state claims {count} arrays, at most {MAX_ARRAYS}")
    offset = 1
    specs = []
    try:
        for _ in range(count):
            (name_len,) = struct.unpack_from("<B", header, offset)
            offset += 1
            if not 0 < name_len <= MAX_NAME_BYTES:
                raise StateError(f"array name length {name_len} out of range")
            name = header[offset : offset + name_len].decode("ascii")
            if len(name) != name_len:
                raise StateError("state header is truncated in an array name")
            offset += name_len
            code, ndim = struct.unpack_from("<BB", header, offset)
            offset += 2
            if code not in DTYPES:
                raise StateError(f"array '{name}' has unknown dtype code {code}")
            if ndim > MAX_NDIM:
                raise StateError(f"array '{name}' has {ndim} dimensions, at most {MAX_NDIM}")
            shape = struct.unpack_from(f"<{ndim}I", header, offset)
            offset += 4 * ndim
            dtype = DTYPES[code]
            specs.append((name, dtype, tuple(shape), dtype.itemsize * math.prod(shape)))  # Python ints
    except (struct.error, UnicodeDecodeError) as exc:
        raise StateError(f"state header is truncated or malformed: {exc}") from None
    if offset != len(header):
        raise StateError(f"{len(header) - offset} stray bytes at the end of the state header")
    return tuple(specs)


def decode_state(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Unpack bytes written by :func:`encode_state`; raises :class:`StateError` on anything else.

    Arrays are fresh, writable copies (the caller updates them in place).
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise StateError(f"state must be bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise StateError(f"state is {len(blob)} bytes, more than the {max_bytes} allowed")
    if len(blob) < 6 or blob[:4] != MAGIC:
        raise StateError("state does not start with the TFS1 magic")
    (header_len,) = struct.unpack_from("<H", blob, 4)
    if 6 + header_len > len(blob):
        raise StateError(f"state header of {header_len} bytes runs past the end")
    specs = _parse_header(bytes(blob[6 : 6 + header_len]))
    offset = 6 + header_len
    if offset + sum(spec[3] for spec in specs) != len(blob):
        raise StateError(
            f"state holds {len(blob) - offset} bytes of data, its header describes {sum(s[3] for s in specs)}"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape, size in specs:
        arrays[name] = (
            np.frombuffer(blob, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            .reshape(shape)
            .copy()
        )
        offset += size
    return arrays

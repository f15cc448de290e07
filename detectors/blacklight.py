"""Query-based evasion: probabilistic fingerprints of every query, matched across all clients.

Paper: Li, Shan, Wenger, Zhang, Zheng, Zhao, "Blacklight: Scalable Defense
for Neural Networks against Query-Based Black-Box Attacks", USENIX Security
2022. Query-based attacks (HopSkipJump, Boundary, Square, SimBA, ...) walk
the input space in small steps, so their queries are near-duplicates of each
other; benign traffic rarely is. Blacklight quantises each query, hashes
sliding windows of it with a secret salt, keeps the top-S hashes as the
query's fingerprint, and counts how many of them an earlier query shares.

Fingerprint (per sample; the image shape and value range come from ``fit``):

1. quantise: ``level = rint((x − lo) / (hi − lo) / step)``; ``step = 0.2``
   (the paper's 50 grey levels ≈ 0.196), with rounding rather than flooring
   so that black (0) and white (1) sit in the middle of their bins: MNIST
   strokes are 253–255, and a floor at 250 would flip them under the
   slightest re-encoding noise;
2. windows: every ``patch × patch`` square (all channels), stride 1, for
   image-shaped inputs; ``patch²`` consecutive values for flat ones. The
   paper slides 1-D windows over the flattened image; on MNIST those are
   mostly pieces of one row (runs of background and stroke) and different
   digits share many of them: the most similar of 1,000 distinct test digits
   matched up to 35 of 50 hashes (20-wide windows), overlapping the near-
   duplicates the monitor must catch. 4 × 4 squares capture stroke shapes:
   distinct digits share at most 12 of 50 (9 of 32), while re-encoded copies
   and attack steps share 60–100 % (measured on the bundled MNIST split);
3. skip flat windows (one quantised level throughout: background, the inside
   of a stroke): they carry no shape, and every image has them;
4. code each window exactly (3 bits per level × 16 values fit in 64 bits, so
   two different windows never collide; wider windows fall back to a keyed
   multiply-add hash), scramble the code with a keyed bijection (the
   splitmix64 finaliser of ``code ^ key``, the key derived from the secret)
   and keep the ``top_s`` largest distinct hashes. Without the secret an
   attacker cannot tell which windows are in the fingerprint, the paper's
   defence against adaptive attacks.

``top_s = 32``, ``match_threshold = 16`` (the paper: 50 and 25). On the ART
attacks replayed offline (HopSkipJump, Boundary, SimBA pixel and DCT, against
the demo CNN) 20, 32 and 50 hashes detected every attack after the same
number of queries, and distinct benign digits never came near half of them;
each hash is a key in the index, so 32 costs a third less memory and Redis
time than 50.

The index (global, shared by every client and replica, in the store): one key
per hash ``tfs:blacklight:g:h:<hash>`` → the **cluster** of the most recent
query that had it, and one key per exact content ``tfs:blacklight:g:d:<digest>``
→ its cluster, all expiring after ``ttl_s`` (so the index holds only the
queries of the last ``ttl_s`` seconds). A query is a **hit** when at least
``match_threshold`` of its hashes were last written by queries of one single
cluster, from any client: spreading an attack over many accounts does not
hide it, and the hit is attributed to the client who sent the query. A hit
joins that cluster; any other query starts a new one (its own digest).

Why clusters rather than the paper's one earlier query: the index keeps one
owner per hash, the most recent. An attack that sends a batch of probes
around one point (Boundary's 20 candidates per step, HopSkipJump's gradient
estimation) spreads the owners of a point's windows over many probes, none
holding half of them, and in the offline replay the Boundary attack went
unseen. All those probes are in one cluster, so counting per cluster finds it.

Benign near-duplicates, and why the score is per cluster. Re-sending the same
digit is normal (a retry, a cache miss, a popular input sent by many users),
and a re-encoding (float → uint8 → float, light JPEG, a little noise)
produces a near-duplicate that Blacklight matches by design, exactly like an
attack step: HopSkipJump's gradient probes differ from each other by less
than a JPEG round trip does. So the content alone cannot separate them.
Two things can:

- an **exact duplicate** (same image at 8-bit resolution, see
  :func:`detectors.monitor.content_digests`) gives an attacker nothing new
  (the same answer again; a cache could serve it), so it is never a hit, no
  matter who sent the original. Counting it, on a service where many users
  send the same popular inputs, would flag them all; a float → uint8 → float
  round trip of 8-bit data is an exact duplicate;
- an attack is a *long* walk: dozens to thousands of distinct queries, each
  a near-duplicate of the ones before. A benign user re-sends one input a
  few times. So the client's score is the largest number of hits it made
  within one cluster, not the number of hits overall (which grows with
  volume for a user who re-sends a little of everything). Each client tracks
  its ``max_clusters`` busiest clusters (the least busy one is replaced,
  starting again from 1), counts decaying with half-life ``half_life_s``.

The threshold on that count is calibrated on benign clients that re-send
digits up to 8 times, lightly re-encoded (see
:mod:`detectors.monitor_calibration`): about 7 on MNIST. Attacks pass it
within a few dozen queries, since every attack step is a hit in the same
cluster; a benign user who re-sends one input, re-encoded differently each
time, more often than that is indistinguishable from a gradient estimation
and will be flagged.

Cost per query: one quantisation and ~600 window codes (numpy), a sort, and
``top_s + 1`` keys read and written in one ``get_many`` and one ``set_many``
per request. Per-client state: ``max_clusters`` ids and counts (< 200 bytes).
The index: ``top_s + 1`` keys of 8-byte values per distinct query within
``ttl_s`` (about 7 KB per query in the memory store, less in Redis; see
:mod:`detectors.monitor_bench`), so its size is ``ttl_s`` × the rate of
distinct queries: 10 distinct queries per second for the default 30 minutes
is about 18,000 queries, 120 MB.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np

from detectors.base import DetectorError, Predictor, register
from detectors.monitor import Monitor, MonitorResult, QueryBatch, content_digests
from gateway.store import Store

__all__ = ["Blacklight"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(h: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of ``h ^ key``: a bijection that scrambles every bit."""
    h = h ^ key
    h = (h ^ (h >> _S30)) * _M1
    h = (h ^ (h >> _S27)) * _M2
    return h ^ (h >> _S31)


@register
class Blacklight(Monitor):
    """Near-duplicate queries across all clients, counted per client and cluster.

    Hyperparameters:

    ``step`` (float in (0, 1], default 0.2)
        quantisation step, as a fraction of the value range.
    ``patch`` (int ≥ 1, default 4)
        window side (``patch × patch`` squares; ``patch²`` values for flat inputs).
    ``top_s`` (int ≥ 1, default 32)
        hashes kept per query (the fingerprint).
    ``match_threshold`` (int in [1, top_s], default 16)
        hashes one earlier query must share for a hit.
    ``max_clusters`` (int ≥ 1, default 8)
        clusters tracked per client.
    ``half_life_s`` (float > 0, default 600)
        half-life of the per-cluster hit counts, seconds.
    ``ttl_s`` (float > 0, default 1800)
        how long the index remembers a query, and a client's counts, seconds
        (the index's size is ttl_s × distinct queries per second).

    Learned by ``fit``: ``input_shape_`` (the sample shape) and ``value_low_`` /
    ``value_high_`` (the reference data's value range).

    Score: the client's largest decayed hit count within one cluster, ≥ 0;
    flagged above ``threshold_`` (calibrated).

    Secret: call :meth:`set_secret` with the configured salt before serving;
    every replica sharing a store must use the same one. Without it a random
    per-instance salt is used, which is fine for a single replica on the
    memory store only. The salt is never saved with the artefact.
    """

    name = "blacklight"
    params = ("step", "patch", "top_s", "match_threshold", "max_clusters", "half_life_s", "ttl_s")
    max_state_bytes = 512
    needs_prediction = False
    flags_when = "above"

    input_shape_: np.ndarray
    value_low_: float
    value_high_: float

    def __init__(
        self,
        step: float = 0.2,
        patch: int = 4,
        top_s: int = 32,
        match_threshold: int = 16,
        max_clusters: int = 8,
        half_life_s: float = 600.0,
        ttl_s: float = 1800.0,
    ) -> None:
        if not 0.0 < step <= 1.0:
            raise DetectorError(f"blacklight: step must be in (0, 1], got {step}")
        for label, value in (("patch", patch), ("top_s", top_s), ("max_clusters", max_clusters)):
            if int(value) != value or value < 1:
                raise DetectorError(f"blacklight: {label} must be an integer >= 1, got {value}")
        if int(match_threshold) != match_threshold or not 1 <= match_threshold <= top_s:
            raise DetectorError(
                f"blacklight: match_threshold must be an integer in [1, top_s], got {match_threshold}"
            )
        if not half_life_s > 0 or not ttl_s > 0:
            raise DetectorError("blacklight: half_life_s and ttl_s must be > 0")
        self.step = float(step)
        self.patch = int(patch)
        self.top_s = int(top_s)
        self.match_threshold = int(match_threshold)
        self.max_clusters = int(max_clusters)
        self.half_life_s = float(half_life_s)
        self.ttl_s = float(ttl_s)
        self.set_secret(os.urandom(32))

    def set_secret(self, secret: bytes | str) -> Blacklight:
        """Key the window hashes and content digests (the paper's secret salt)."""
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not raw:
            raise DetectorError("blacklight: the secret must not be empty")
        seed = hashlib.blake2b(raw, digest_size=32, person=b"tfs-blacklight").digest()
        rng = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))
        # Enough odd multipliers for any window (patch² × channels values).
        self._multipliers = rng.integers(0, 2**63, size=4096, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._hash_key = np.uint64(rng.integers(0, 2**63, dtype=np.uint64))
        self._digest_key = seed
        return self

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        shape = x_ref.shape[1:]
        if math.prod(shape) < self.patch * self.patch:
            raise DetectorError(f"blacklight: samples of shape {list(shape)} are smaller than one window")
        if len(shape) >= 2 and (shape[0] < self.patch or shape[1] < self.patch):
            raise DetectorError(
                f"blacklight: images {list(shape)} are smaller than {self.patch}x{self.patch}"
            )
        self.input_shape_ = np.asarray(shape, dtype=np.int64)
        low, high = float(np.min(x_ref)), float(np.max(x_ref))
        self.value_low_ = low
        self.value_high_ = high if high > low else low + 1.0

    def _state(self) -> dict[str, np.ndarray]:
        return {"input_shape_": self.input_shape_}

    def _scalars(self) -> dict[str, float | int | str]:
        return {"value_low_": self.value_low_, "value_high_": self.value_high_}

    # -- fingerprints ------------------------------------------------------------------

    def fingerprints(self, x: np.ndarray) -> list[np.ndarray]:
        """The fingerprint of every sample of ``x`` (n, features): up to ``top_s`` sorted uint64 hashes."""
        n = len(x)
        shape = tuple(int(s) for s in self.input_shape_)
        if n == 0:
            return []
        if x.shape[1:] != (math.prod(shape),) and x.shape[1:] != shape:
            raise DetectorError(
                f"blacklight: samples have shape {list(x.shape[1:])}, fitted on {list(shape)}"
            )
        scale = np.float32(1.0 / ((self.value_high_ - self.value_low_) * self.step))
        scaled = (np.asarray(x, dtype=np.float32).reshape(n, -1) - np.float32(self.value_low_)) * scale
        levels = np.clip(np.rint(scaled), 0, self._max_level).astype(np.uint64)
        if len(shape) >= 2:
            codes, flat = self._window_codes_2d(levels.reshape(n, shape[0], shape[1], -1))
        else:
            codes, flat = self._window_codes_1d(levels)
        hashes = _mix(codes, self._hash_key)
        out = []
        for i in range(n):
            kept = np.sort(hashes[i][~flat[i]])
            if kept.size:
                kept = kept[np.concatenate(([True], kept[1:] != kept[:-1]))]
            out.append(kept[-self.top_s :])
        return out

    @property
    def _max_level(self) -> int:
        return int(math.floor(1.0 / self.step + 0.5))

    def _window_codes_2d(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A code per patch × patch × channels window, (n, windows) uint64, and whether it is flat.

        When the window's levels fit in 64 bits (3 bits × 16 values for the
        defaults) the code is the window itself, packed: no two windows
        collide. Otherwise it is a sum of levels times random odd 64-bit
        multipliers (a keyed linear hash; collisions are 2^-64-unlikely for
        windows that are not adversarially chosen, and the multipliers are secret).
        Both are computed separably: rows of ``patch`` first, then ``patch`` rows.
        """
        n, h, w, c = images.shape
        p = self.patch
        bits = max(1, self._max_level.bit_length())
        packed = bits * p * p * c <= 64
        shift_pixel = np.uint64(0)
        if packed:
            shift_pixel = np.uint64(bits * c)
            pixel = images[..., 0].copy()
            for ch in range(1, c):
                pixel |= images[..., ch] << np.uint64(bits * ch)
        else:
            pixel = (images * self._multipliers[:c]).sum(axis=3, dtype=np.uint64)
        rows = np.zeros((n, h, w - p + 1), dtype=np.uint64)
        for dx in range(p):
            part = pixel[:, :, dx : dx + w - p + 1]
            rows += part << np.uint64(dx * int(shift_pixel)) if packed else part * self._multipliers[64 + dx]
        codes = np.zeros((n, h - p + 1, w - p + 1), dtype=np.uint64)
        for dy in range(p):
            part = rows[:, dy : dy + h - p + 1, :]
            codes += (
                part << np.uint64(dy * p * int(shift_pixel)) if packed else part * self._multipliers[128 + dy]
            )
        # Flat: every value of the window equals its first one (for packed codes, a repunit of it).
        if packed:
            first = images[:, : h - p + 1, : w - p + 1, 0]
            repunit = np.uint64(sum(1 << (k * bits) for k in range(p * p * c)))
            flat = codes == first * repunit
        else:
            window_max = np.lib.stride_tricks.sliding_window_view(images, (p, p), axis=(1, 2)).max(
                axis=(3, 4, 5)
            )
            window_min = np.lib.stride_tricks.sliding_window_view(images, (p, p), axis=(1, 2)).min(
                axis=(3, 4, 5)
            )
            flat = window_max == window_min
        return codes.reshape(n, -1), flat.reshape(n, -1)

    def _window_codes_1d(self, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`_window_codes_2d` for flat inputs: windows of ``patch²`` consecutive values."""
        size = self.patch * self.patch
        windows = np.lib.stride_tricks.sliding_window_view(levels, size, axis=1)
        codes = (windows * self._multipliers[:size]).sum(axis=2, dtype=np.uint64)
        flat = windows.max(axis=2) == windows.min(axis=2)
        return codes, flat

    def digests(self, x: np.ndarray) -> np.ndarray:
        return content_digests(x, self._digest_key)

    # -- the monitor ---------------------------------------------------------------------

    def _hash_key_names(self, hashes: np.ndarray) -> list[str]:
        """``tfs:blacklight:g:h:<16 hex digits>`` per hash (one hex() call, then slices)."""
        prefix = f"tfs:{self.name}:g:h:"
        hexed = hashes.astype(">u8").tobytes().hex()
        return [prefix + hexed[j : j + 16] for j in range(0, len(hexed), 16)]

    def _digest_key_names(self, digests: np.ndarray) -> list[str]:
        prefix = f"tfs:{self.name}:g:d:"
        hexed = digests.astype(">u8").tobytes().hex()
        return [prefix + hexed[j : j + 16] for j in range(0, len(hexed), 16)]

    async def observe(self, store: Store, client: str, batch: QueryBatch, now: float) -> MonitorResult:
        prints = self.fingerprints(batch.x)
        digests = self.digests(batch.x)
        hash_keys = [self._hash_key_names(fp) for fp in prints]
        digest_keys = self._digest_key_names(digests)
        keys = list(dict.fromkeys([self.key(client), *digest_keys, *(k for ks in hash_keys for k in ks)]))
        fetched = dict(zip(keys, await store.get_many(keys), strict=True))

        state = self._decode(fetched[self.key(client)])
        ids = np.zeros(self.max_clusters, dtype=np.uint64)
        counts = np.zeros(self.max_clusters, dtype=np.float32)
        if (
            state is not None
            and state.get("ids", ids).shape == ids.shape
            and state.get("counts", counts).shape == counts.shape
        ):
            ids, counts = state["ids"], state["counts"]
            elapsed = max(0.0, now - float(state.get("t", np.float64(now))))
            counts = (counts * np.float32(0.5 ** (elapsed / self.half_life_s))).astype(np.float32)

        writes: dict[str, bytes] = {}

        def lookup(key: str) -> bytes | None:
            return writes[key] if key in writes else fetched.get(key)

        for i in range(len(prints)):
            digest_bytes = int(digests[i]).to_bytes(8, "little")
            exact = lookup(digest_keys[i])
            if exact is not None and len(exact) == 8:
                cluster = exact  # the same image again: never a hit
            else:
                cluster = digest_bytes  # a new query starts its own cluster...
                shared: dict[bytes, int] = {}
                for key in hash_keys[i]:
                    owner = lookup(key)
                    if owner is not None:
                        shared[owner] = shared.get(owner, 0) + 1
                if shared:
                    best = max(shared, key=shared.__getitem__)
                    if shared[best] >= self.match_threshold:  # ...unless it is a near-duplicate
                        cluster = best
                        ids, counts = self._count_hit(ids, counts, int.from_bytes(best, "little"))
            writes[digest_keys[i]] = cluster
            for key in hash_keys[i]:
                writes[key] = cluster

        score = float(counts.max()) if len(counts) else 0.0
        writes[self.key(client)] = self._encode({"ids": ids, "counts": counts, "t": np.float64(now)})
        await store.set_many(writes.items(), self.ttl_s)
        return self._result(score)

    def _count_hit(self, ids: np.ndarray, counts: np.ndarray, cluster: int) -> tuple[np.ndarray, np.ndarray]:
        match = np.flatnonzero((ids == np.uint64(cluster)) & (counts > 0))
        if match.size:
            counts[match[0]] += 1.0
        else:
            slot = int(np.argmin(counts))  # the least busy cluster makes room
            ids[slot] = np.uint64(cluster)
            counts[slot] = 1.0
        return ids, counts

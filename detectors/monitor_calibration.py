"""Benign client sequences, and calibrating every monitor on them in one call.

Monitors flag *clients*, so their thresholds are set on benign clients'
whole query sequences (DESIGN.md, decision 4): each monitor replays them and
keeps each client's most suspicious score (``Monitor.calibrate``). What the
benign population looks like decides what is never flagged, so
:func:`benign_sequences` builds the kinds of benign users the gateway must
leave alone, from held-out digits:

``random`` (40 by default)
    draws with replacement from the pool, 50–400 queries: most benign traffic.
``heavy`` (12)
    the same at attacker-level volume (1,500–3,000 queries): with a pool of
    a few hundred digits every one is re-sent several times, exactly. Their
    most suspicious scores set most thresholds (a long sequence has many
    chances to look odd), so there are many of them.
``resend`` (20)
    a user who re-sends the same digit (100–600 queries): each digit
    1–``max_resends`` (8) times in a row, every copy but the first lightly
    re-encoded at random: a float → uint8 → float round trip (a no-op on
    8-bit data), Gaussian noise of 0.5–2 grey levels, or a JPEG-like round
    trip (8 × 8 block DCT quantised at quality 90–98, :func:`jpeg_like`).

Use a pool the evaluation does not use (the validation split). About 48,000
queries in all; calibrating the five monitors takes about a minute with the
demo CNN on two cores.

:func:`calibrate_monitors` fits the shared embedding on reference data and
calibrates every requested monitor at the target false-positive rate (per
client) on such sequences, returning a :class:`MonitorSuite` to save next to
the detectors' artefacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detectors import knn, ood_rate, prada, volume  # noqa: F401  (registers the monitors)
from detectors.base import (
    REGISTRY,
    ArtefactError,
    Detector,
    DetectorError,
    detector_class,
    read_artefact_json,
    write_artefact_json,
)
from detectors.blacklight import Blacklight
from detectors.embedding import Embedding
from detectors.monitor import Monitor, PredictedFn, prepare_batches

__all__ = [
    "DEFAULT_MONITORS",
    "MonitorSuite",
    "benign_sequences",
    "calibrate_monitors",
    "jpeg_like",
    "reencode_lightly",
]

# Calibrated by default, in the order the gateway should run them.
DEFAULT_MONITORS = ("rate_limit", "blacklight", "knn", "ood_rate", "prada", "class_coverage")
SUITE_FILE = "monitors.json"
SUITE_FORMAT_VERSION = 1

# The IJG luminance quantisation table (JPEG standard, Annex K), scaled by quality.
_JPEG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)


def _dct_matrix(n: int = 8) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT8 = _dct_matrix()


def jpeg_like(image: np.ndarray, quality: int = 95) -> np.ndarray:
    """A JPEG round trip's loss on a greyscale image in [0, 1] (h, w[, 1]), numpy only.

    8 × 8 blocks (edge-padded), level shift, orthonormal DCT-II, quantisation
    with the standard luminance table scaled for ``quality`` (IJG formula),
    inverse, rounded to 8 bits. No chroma subsampling or entropy coding,
    which are lossless or absent for one channel.
    """
    if not 1 <= quality <= 100:
        raise DetectorError(f"jpeg_like: quality must be in [1, 100], got {quality}")
    squeeze = image.ndim == 3
    pixels = (image[..., 0] if squeeze else image).astype(np.float64) * 255.0
    h, w = pixels.shape
    padded = np.pad(pixels, ((0, -h % 8), (0, -w % 8)), mode="edge") - 128.0
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    table = np.clip(np.floor((_JPEG_LUMA * scale + 50.0) / 100.0), 1, 255)
    blocks = padded.reshape(padded.shape[0] // 8, 8, padded.shape[1] // 8, 8).transpose(0, 2, 1, 3)
    coefficients = _DCT8 @ blocks @ _DCT8.T
    restored = _DCT8.T @ (np.rint(coefficients / table) * table) @ _DCT8
    out = restored.transpose(0, 2, 1, 3).reshape(padded.shape)[:h, :w] + 128.0
    out = np.clip(np.rint(out), 0, 255).astype(np.float32) / np.float32(255.0)
    return out[..., None] if squeeze else out


def reencode_lightly(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A benign re-encoding of ``image`` in [0, 1], one of three at random: a float → uint8 → float
    round trip, Gaussian noise of 0.5–2 grey levels (clipped), or :func:`jpeg_like` at quality 90–98."""
    kind = rng.integers(3)
    if kind == 0:
        return np.rint(image * 255.0).astype(np.uint8).astype(np.float32) / np.float32(255.0)
    if kind == 1:
        sigma = rng.uniform(0.5, 2.0) / 255.0
        return np.clip(image + rng.normal(0.0, sigma, image.shape), 0.0, 1.0).astype(np.float32)
    return jpeg_like(image, int(rng.integers(90, 99)))


def benign_sequences(
    pool: np.ndarray,
    rng: np.random.Generator,
    n_random: int = 40,
    n_heavy: int = 12,
    n_resend: int = 20,
    max_resends: int = 8,
    random_length: tuple[int, int] = (50, 400),
    heavy_length: tuple[int, int] = (1500, 3000),
    resend_length: tuple[int, int] = (100, 600),
) -> list[np.ndarray]:
    """Benign clients' query sequences drawn from ``pool`` (inputs in [0, 1], (n, ...)), shuffled.

    ``n_random`` ordinary users (``random_length`` queries, inclusive range),
    ``n_heavy`` heavy users (``heavy_length``), ``n_resend`` users who re-send
    each input 1–``max_resends`` times in a row, re-encoded
    (``resend_length``); see the module docstring.
    """
    pool = np.asarray(pool, dtype=np.float32)

    def length(bounds: tuple[int, int]) -> int:
        return int(rng.integers(bounds[0], bounds[1] + 1))

    out: list[np.ndarray] = []
    for _ in range(n_random):
        out.append(pool[rng.integers(0, len(pool), length(random_length))])
    for _ in range(n_heavy):
        out.append(pool[rng.integers(0, len(pool), length(heavy_length))])
    for _ in range(n_resend):
        wanted = length(resend_length)
        queries: list[np.ndarray] = []
        while len(queries) < wanted:
            original = pool[rng.integers(len(pool))]
            queries.append(original)
            for _ in range(int(rng.integers(0, max_resends))):
                queries.append(reencode_lightly(original, rng))
        out.append(np.stack(queries[:wanted]))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


@dataclass
class MonitorSuite:
    """Calibrated monitors and the embedding they were calibrated with.

    The gateway computes ``embedding.transform(x)`` once per request for
    ``QueryBatch.embedding`` and runs ``monitors`` (in this order).
    Saved as ``DIR/monitors.json``, ``DIR/embedding/`` and one folder per monitor.
    """

    embedding: Embedding
    monitors: dict[str, Monitor] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.embedding.save(folder / "embedding")
        for name, monitor in self.monitors.items():
            monitor.save(folder / name)
        meta = {
            "format_version": SUITE_FORMAT_VERSION,
            "monitors": list(self.monitors),
            "embedding": self.embedding.fingerprint(),
        }
        write_artefact_json(folder / SUITE_FILE, meta)
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> MonitorSuite:
        folder = Path(directory)
        path = folder / SUITE_FILE
        meta = read_artefact_json(path, "the monitor suite")
        if meta.get("format_version") != SUITE_FORMAT_VERSION:
            raise ArtefactError(
                f"{path}: format_version {meta.get('format_version')!r}, this tfshield reads "
                f"{SUITE_FORMAT_VERSION}; re-run tfshield calibrate"
            )
        embedding = Embedding.load(folder / "embedding")
        if embedding.fingerprint() != meta.get("embedding"):
            raise ArtefactError(
                f"{folder / 'embedding'}: not the embedding the monitors were calibrated with"
            )
        monitors: dict[str, Monitor] = {}
        for name in meta.get("monitors", []):
            monitor = Detector.load(folder / name)
            if not isinstance(monitor, Monitor):
                raise ArtefactError(f"{folder / name}: holds the detector '{monitor.name}', not a monitor")
            monitors[name] = monitor
        return cls(embedding, monitors)


def calibrate_monitors(
    x_ref: np.ndarray,
    benign: Sequence[np.ndarray],
    fpr: float,
    predicted_fn: PredictedFn,
    *,
    names: Sequence[str] = DEFAULT_MONITORS,
    params: dict[str, dict] | None = None,
    embedding: Embedding | None = None,
    secret: bytes | str | None = None,
) -> MonitorSuite:
    """Fit the embedding on ``x_ref`` and calibrate each monitor in ``names`` on ``benign``.

    ``benign``: one array of queries per benign client (e.g. from
    :func:`benign_sequences` on a held-out split, never the evaluation
    data). ``fpr``: the fraction of those clients each monitor may flag
    (with n clients, at most floor(fpr × n); below 1/n the threshold is the
    most suspicious benign client's score). ``predicted_fn``: batch → top-1
    classes (the protected model). ``params``: hyperparameters per monitor
    name (defaults otherwise). ``secret``: Blacklight's salt.
    """
    unknown = [n for n in names if n not in REGISTRY or not issubclass(REGISTRY[n], Monitor)]
    if unknown:
        known = sorted(n for n, c in REGISTRY.items() if issubclass(c, Monitor))
        raise DetectorError(f"unknown monitor(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if len(benign) == 0:
        raise DetectorError("calibrate_monitors needs at least one benign sequence")
    embedding = embedding if embedding is not None else Embedding().fit(x_ref)
    # Embed and predict every sequence once; each monitor replays the same batches.
    batches = [prepare_batches(seq, embedding.transform, predicted_fn) for seq in benign]
    suite = MonitorSuite(embedding)
    for name in names:
        monitor = detector_class(name)(**(params or {}).get(name, {}))
        if not isinstance(monitor, Monitor):  # excluded above; keeps type checkers informed
            raise DetectorError(f"'{name}' is not a monitor")
        if secret is not None and isinstance(monitor, Blacklight):
            monitor.set_secret(secret)
        monitor.fit(x_ref)
        monitor.calibrate_batches(batches, fpr)
        suite.monitors[name] = monitor
    return suite
